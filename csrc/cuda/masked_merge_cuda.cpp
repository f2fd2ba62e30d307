// CUDA registration of aim::masked_merge: argument checks and layouts here, the kernels in
// masked_merge_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../masked_merge.h"
#include "cuda_args.h"
#include "launch.h"

namespace aim {
namespace {

std::tuple<Tensor, Tensor> masked_merge_cuda(const Tensor& feat, const Tensor& logits,
                                             const std::optional<Tensor>& coarse,
                                             const std::optional<Tensor>& noise, double temperature) {
  check_merge_inputs(feat, logits, coarse, noise, temperature);
  const c10::cuda::CUDAGuard guard(feat.device());
  const auto fmt = merge_memory_format(feat);
  const Tensor f = feat.contiguous(fmt);
  const Tensor c = coarse.has_value() ? coarse->contiguous(fmt) : Tensor();
  const MaskArgs mask_in(logits, noise, temperature);
  Tensor out = at::empty(feat.sizes(), feat.options().memory_format(fmt));
  Tensor mask = at::empty({feat.size(0), 1, feat.size(2), feat.size(3)}, feat.options().memory_format(fmt));
  cuda::merge_forward(kernel_dtype(feat.scalar_type()), merge_shape(f, c), mask_in.input, f.const_data_ptr(),
                      c.defined() ? c.const_data_ptr() : nullptr, out.mutable_data_ptr(), mask.mutable_data_ptr(),
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask};
}

std::tuple<Tensor, Tensor, Tensor> masked_merge_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask, const Tensor& feat,
    const Tensor& logits, const std::optional<Tensor>& noise, double temperature,
    at::IntArrayRef coarse_size) {
  check_merge_backward_inputs(grad_out, grad_mask, feat, logits, noise, temperature, coarse_size);
  const c10::cuda::CUDAGuard guard(feat.device());
  const auto fmt = merge_memory_format(feat);
  const Tensor f = feat.contiguous(fmt);
  const Tensor go = grad_out.to(feat.scalar_type()).contiguous(fmt);
  const Tensor gm = grad_mask.has_value() ? readable_pixels(*grad_mask) : Tensor();
  const MaskArgs mask_in(logits, noise, temperature);
  Tensor grad_feat = at::empty(feat.sizes(), feat.options().memory_format(fmt));
  // In the dtype the kernel writes (the logits' own, unless it had to widen them).
  Tensor grad_logits = at::empty(logits.sizes(), mask_in.logits.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_coarse = coarse_size.empty()
                           ? at::empty({0}, feat.options())
                           : at::empty({feat.size(0), feat.size(1), coarse_size[0], coarse_size[1]},
                                       feat.options().memory_format(fmt));
  cuda::merge_backward(kernel_dtype(feat.scalar_type()), merge_shape(f, grad_coarse), mask_in.input,
                       go.const_data_ptr(), gm.defined() ? gm.const_data_ptr() : nullptr,
                       gm.defined() ? kernel_dtype(gm.scalar_type()) : cuda::DType::Float, f.const_data_ptr(),
                       grad_feat.mutable_data_ptr(), grad_logits.mutable_data_ptr(),
                       coarse_size.empty() ? nullptr : grad_coarse.mutable_data_ptr(),
                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_feat, grad_logits.to(logits.scalar_type()), grad_coarse};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) {
  m.impl("masked_merge", &masked_merge_cuda);
  m.impl("masked_merge_backward", &masked_merge_backward_cuda);
}

}  // namespace aim
