// The op schema (TORCH_LIBRARY) and the argument checks every kernel shares.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "masked_merge.h"
#include "nearest.h"

namespace aim {

namespace {

void check_logits_like(const Tensor& t, const char* name, const Tensor& feat) {
  TORCH_CHECK(t.dim() == 4, "masked_merge: ", name, " must be 4-D (N, 1, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(t.size(1) == 1, "masked_merge: ", name,
              " must have exactly 1 channel (it is broadcast over C), got ", t.size(1),
              " channels");
  TORCH_CHECK(t.size(0) == feat.size(0) && t.size(2) == feat.size(2) && t.size(3) == feat.size(3),
              "masked_merge: ", name, " shape ", t.sizes(), " does not match feat (N, H, W) = (",
              feat.size(0), ", ", feat.size(2), ", ", feat.size(3), ")");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "masked_merge: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == feat.device(), "masked_merge: ", name, " is on ", t.device(),
              " but feat is on ", feat.device());
}

}  // namespace

void check_merge_inputs(const Tensor& feat, const Tensor& logits,
                        const std::optional<Tensor>& coarse,
                        const std::optional<Tensor>& noise, double temperature) {
  TORCH_CHECK(feat.dim() == 4, "masked_merge: feat must be 4-D (N, C, H, W), got ", feat.dim(),
              "-D with shape ", feat.sizes());
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()),
              "masked_merge: feat must be a floating-point tensor, got ", feat.scalar_type());
  TORCH_CHECK(feat.size(1) > 0, "masked_merge: feat must have at least one channel, got shape ",
              feat.sizes());
  check_logits_like(logits, "logits", feat);
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), "masked_merge: noise shape ", noise->sizes(),
                " does not match logits shape ", logits.sizes());
    check_logits_like(*noise, "noise", feat);
    TORCH_CHECK(temperature > 0, "masked_merge: temperature must be > 0, got ", temperature);
  }
  if (coarse.has_value()) {
    TORCH_CHECK(coarse->dim() == 4, "masked_merge: coarse must be 4-D (N, C, h, w), got ",
                coarse->dim(), "-D with shape ", coarse->sizes());
    TORCH_CHECK(coarse->size(0) == feat.size(0) && coarse->size(1) == feat.size(1),
                "masked_merge: coarse (N, C) = (", coarse->size(0), ", ", coarse->size(1),
                ") does not match feat (N, C) = (", feat.size(0), ", ", feat.size(1), ")");
    TORCH_CHECK(coarse->scalar_type() == feat.scalar_type(), "masked_merge: coarse dtype ",
                coarse->scalar_type(), " does not match feat dtype ", feat.scalar_type());
    TORCH_CHECK(coarse->device() == feat.device(), "masked_merge: coarse is on ",
                coarse->device(), " but feat is on ", feat.device());
    TORCH_CHECK(coarse->size(2) > 0 && coarse->size(3) > 0,
                "masked_merge: coarse must have a non-empty spatial size, got ", coarse->sizes());
  }
}

void check_merge_backward_inputs(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                 const Tensor& feat, const Tensor& logits,
                                 const std::optional<Tensor>& noise, double temperature,
                                 at::IntArrayRef coarse_size) {
  check_merge_inputs(feat, logits, std::nullopt, noise, temperature);
  TORCH_CHECK(grad_out.sizes() == feat.sizes() && grad_out.device() == feat.device(),
              "masked_merge_backward: grad_out ", grad_out.sizes(), " does not match feat ",
              feat.sizes());
  if (grad_mask.has_value()) {
    TORCH_CHECK(grad_mask->sizes() == logits.sizes() && grad_mask->device() == feat.device(),
                "masked_merge_backward: grad_mask ", grad_mask->sizes(),
                " does not match logits ", logits.sizes());
  }
  TORCH_CHECK(coarse_size.empty() || coarse_size.size() == 2,
              "masked_merge_backward: coarse_size must be [] or [h, w], got ", coarse_size);
}

at::MemoryFormat merge_memory_format(const Tensor& feat) {
  return feat.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> nearest_source_indices(int64_t in_size, int64_t out_size) {
  std::vector<int64_t> src(out_size);
  const float scale = nearest_scale(in_size, out_size);
  for (int64_t d = 0; d < out_size; ++d) src[d] = nearest_source_index(d, scale, in_size);
  return src;
}

at::ScalarType acc_dtype(const Tensor& feat) {
  return feat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

Tensor mask_preactivation(const Tensor& logits, const std::optional<Tensor>& noise,
                          double temperature, at::ScalarType dtype) {
  Tensor z = logits.to(dtype);
  if (noise.has_value()) z = (z + noise->to(dtype)).div_(temperature);
  return z.reshape({logits.size(0), logits.size(2) * logits.size(3)}).contiguous();
}

}  // namespace

ForwardBuffers prepare_forward(const Tensor& feat, const Tensor& logits,
                               const std::optional<Tensor>& coarse,
                               const std::optional<Tensor>& noise, double temperature) {
  check_merge_inputs(feat, logits, coarse, noise, temperature);
  const auto fmt = merge_memory_format(feat);
  ForwardBuffers b;
  b.feat = feat.contiguous(fmt);
  if (coarse.has_value()) b.coarse = coarse->contiguous(fmt);
  b.z = mask_preactivation(logits, noise, temperature, acc_dtype(feat));
  b.out = at::empty(feat.sizes(), feat.options().memory_format(fmt));
  b.mask = at::empty({feat.size(0), 1, feat.size(2), feat.size(3)}, feat.options().memory_format(fmt));
  return b;
}

BackwardBuffers prepare_backward(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                 const Tensor& feat, const Tensor& logits,
                                 const std::optional<Tensor>& noise, double temperature,
                                 at::IntArrayRef coarse_size) {
  check_merge_backward_inputs(grad_out, grad_mask, feat, logits, noise, temperature, coarse_size);
  const auto fmt = merge_memory_format(feat);
  const auto acc = acc_dtype(feat);
  const int64_t n = feat.size(0), hw = feat.size(2) * feat.size(3);
  BackwardBuffers b;
  b.feat = feat.contiguous(fmt);
  b.grad_out = grad_out.to(feat.scalar_type()).contiguous(fmt);
  b.z = mask_preactivation(logits, noise, temperature, acc);
  b.grad_mask = grad_mask.has_value() ? grad_mask->to(acc).reshape({n, hw}).contiguous()
                                      : at::zeros({n, hw}, b.z.options());
  b.grad_feat = at::empty(feat.sizes(), feat.options().memory_format(fmt));
  b.grad_z = at::empty({n, hw}, b.z.options());
  b.h = coarse_size.empty() ? 0 : coarse_size[0];
  b.w = coarse_size.empty() ? 0 : coarse_size[1];
  b.grad_coarse = b.h > 0 ? at::empty({n, feat.size(1), b.h, b.w}, feat.options().memory_format(fmt))
                          : at::empty({0}, feat.options());
  return b;
}

Tensor grad_logits_from(const Tensor& grad_z, const Tensor& logits) {
  return grad_z.reshape(logits.sizes()).to(logits.scalar_type());
}

}  // namespace aim

TORCH_LIBRARY(aim, m) {
  // Forward: returns (out, mask); mask is (N, 1, H, W) in feat's dtype, straight-through
  // differentiable in training (noise given), constant in evaluation.
  m.def(
      "masked_merge(Tensor feat, Tensor logits, Tensor? coarse, Tensor? noise, "
      "float temperature) -> (Tensor, Tensor)");
  // Backward: returns (grad_feat, grad_logits, grad_coarse); grad_coarse is empty when
  // coarse_size is [] (no coarse map in the forward).
  m.def(
      "masked_merge_backward(Tensor grad_out, Tensor? grad_mask, Tensor feat, Tensor logits, "
      "Tensor? noise, float temperature, SymInt[] coarse_size) -> (Tensor, Tensor, Tensor)");
}
