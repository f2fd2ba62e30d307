// From tensors to the plain arguments of the CUDA launchers (launch.h), shared by the CUDA
// registrations of both ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../masked_merge.h"
#include "launch.h"

namespace aim {

inline cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default: TORCH_CHECK(false, "aim_ext CUDA kernels: unsupported dtype ", t);
  }
}

// The shape of feat (or conv) and of the coarse map (undefined or empty: none).
inline cuda::MergeShape merge_shape(const Tensor& feat, const Tensor& coarse) {
  const bool has_coarse = coarse.defined() && coarse.dim() == 4;
  return {feat.size(0),
          feat.size(1),
          feat.size(2),
          feat.size(3),
          has_coarse ? coarse.size(2) : 0,
          has_coarse ? coarse.size(3) : 0,
          merge_memory_format(feat) == at::MemoryFormat::ChannelsLast};
}

// A (N, 1, H, W) map whose element (n, 0, y, x) sits at (n * H + y) * W + x: t itself when it
// already does (NCHW or channels_last), a contiguous copy otherwise.
inline Tensor dense_pixels(const Tensor& t) {
  const bool dense = (t.size(0) <= 1 || t.stride(0) == t.size(2) * t.size(3)) &&
                     (t.size(2) <= 1 || t.stride(2) == t.size(3)) && (t.size(3) <= 1 || t.stride(3) == 1);
  return dense ? t : t.contiguous();
}

// A 1-channel map the kernels can read: dense, in one of the four dtypes they know (others, the
// float8 types, widen exactly to float32).
inline Tensor readable_pixels(const Tensor& t) {
  const auto dtype = t.scalar_type();
  const bool known = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
  return dense_pixels(known ? t : t.to(at::kFloat));
}
inline Tensor readable_pixels(const std::optional<Tensor>& t) {
  return t.has_value() ? readable_pixels(*t) : Tensor();
}

// An optional input as the launchers take it: null data when absent (undefined), its dtype then
// unread.
inline const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline cuda::DType dtype_or_float(const Tensor& t) {
  return t.defined() ? kernel_dtype(t.scalar_type()) : cuda::DType::Float;
}

// The mask's inputs as the kernels read them; keeps the dense tensors alive.
struct MaskArgs {
  Tensor logits, noise;
  cuda::MaskInput input;

  MaskArgs(const Tensor& logits_in, const std::optional<Tensor>& noise_in, double temperature)
      : logits(readable_pixels(logits_in)),
        noise(readable_pixels(noise_in)) {
    input = {logits.const_data_ptr(), kernel_dtype(logits.scalar_type()), data_or_null(noise),
             dtype_or_float(noise), temperature};
  }
};

// The backward's mask side: the mask's inputs, grad_mask as the kernels read it, and grad_logits
// in the dtype the kernel writes (the logits' own, unless MaskArgs had to widen them).
struct MaskGradArgs : MaskArgs {
  Tensor grad_mask, grad_logits;

  MaskGradArgs(const Tensor& logits_in, const std::optional<Tensor>& noise_in, double temperature,
               const std::optional<Tensor>& grad_mask_in)
      : MaskArgs(logits_in, noise_in, temperature),
        grad_mask(readable_pixels(grad_mask_in)),
        grad_logits(at::empty(logits_in.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous))) {}

  // grad_logits in the logits' own dtype.
  Tensor grad_logits_like(const Tensor& logits_in) const { return grad_logits.to(logits_in.scalar_type()); }
};

}  // namespace aim
