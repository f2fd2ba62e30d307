// aim::masked_merge: the schema, the argument checks and the layout of the merge's tensors,
// which every kernel of both ops shares (masked_merge.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "masked_merge.h"

namespace aim {

namespace {

void check_logits_like(const Tensor& t, const char* name, const Tensor& feat, const char* op,
                       const char* feat_name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, 1, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(t.size(1) == 1, op, ": ", name,
              " must have exactly 1 channel (it is broadcast over C), got ", t.size(1),
              " channels");
  TORCH_CHECK(t.size(0) == feat.size(0) && t.size(2) == feat.size(2) && t.size(3) == feat.size(3),
              op, ": ", name, " shape ", t.sizes(), " does not match ", feat_name, " (N, H, W) = (",
              feat.size(0), ", ", feat.size(2), ", ", feat.size(3), ")");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == feat.device(), op, ": ", name, " is on ", t.device(),
              " but ", feat_name, " is on ", feat.device());
}

}  // namespace

void check_merge_inputs(const Tensor& feat, const Tensor& logits,
                        const std::optional<Tensor>& coarse,
                        const std::optional<Tensor>& noise, double temperature, const char* op,
                        const char* feat_name) {
  TORCH_CHECK(feat.dim() == 4, op, ": ", feat_name, " must be 4-D (N, C, H, W), got ", feat.dim(),
              "-D with shape ", feat.sizes());
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()),
              op, ": ", feat_name, " must be a floating-point tensor, got ", feat.scalar_type());
  TORCH_CHECK(feat.size(1) > 0, op, ": ", feat_name, " must have at least one channel, got shape ",
              feat.sizes());
  check_logits_like(logits, "logits", feat, op, feat_name);
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), op, ": noise shape ", noise->sizes(),
                " does not match logits shape ", logits.sizes());
    check_logits_like(*noise, "noise", feat, op, feat_name);
    TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  }
  if (coarse.has_value()) {
    TORCH_CHECK(coarse->dim() == 4, op, ": coarse must be 4-D (N, C, h, w), got ",
                coarse->dim(), "-D with shape ", coarse->sizes());
    TORCH_CHECK(coarse->size(0) == feat.size(0) && coarse->size(1) == feat.size(1),
                op, ": coarse (N, C) = (", coarse->size(0), ", ", coarse->size(1),
                ") does not match ", feat_name, " (N, C) = (", feat.size(0), ", ", feat.size(1), ")");
    TORCH_CHECK(coarse->scalar_type() == feat.scalar_type(), op, ": coarse dtype ",
                coarse->scalar_type(), " does not match ", feat_name, " dtype ", feat.scalar_type());
    TORCH_CHECK(coarse->device() == feat.device(), op, ": coarse is on ",
                coarse->device(), " but ", feat_name, " is on ", feat.device());
    TORCH_CHECK(coarse->size(2) > 0 && coarse->size(3) > 0,
                op, ": coarse must have a non-empty spatial size, got ", coarse->sizes());
  }
}

void check_merge_backward_inputs(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                 const Tensor& feat, const Tensor& logits,
                                 const std::optional<Tensor>& noise, double temperature,
                                 at::IntArrayRef coarse_size, const char* op,
                                 const char* feat_name) {
  check_merge_inputs(feat, logits, std::nullopt, noise, temperature, op, feat_name);
  TORCH_CHECK(grad_out.sizes() == feat.sizes() && grad_out.device() == feat.device(),
              op, "_backward: grad_out ", grad_out.sizes(), " does not match ", feat_name, " ",
              feat.sizes());
  if (grad_mask.has_value()) {
    TORCH_CHECK(grad_mask->sizes() == logits.sizes() && grad_mask->device() == feat.device(),
                op, "_backward: grad_mask ", grad_mask->sizes(),
                " does not match logits ", logits.sizes());
  }
  // As in the forward, a coarse map is never empty: [h, 0] would index before its first column.
  TORCH_CHECK(coarse_size.empty() || (coarse_size.size() == 2 && coarse_size[0] > 0 && coarse_size[1] > 0),
              op, "_backward: coarse_size must be [] or [h, w] with h, w > 0, got ", coarse_size);
}

at::MemoryFormat merge_memory_format(const Tensor& feat) {
  return feat.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::ScalarType acc_dtype(const Tensor& feat) {
  return feat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

MergeForward merge_forward_layout(const Tensor& input, const std::optional<Tensor>& coarse) {
  const auto fmt = merge_memory_format(input);
  MergeForward b;
  b.input = input.contiguous(fmt);
  if (coarse.has_value()) b.coarse = coarse->contiguous(fmt);
  b.out = at::empty(input.sizes(), input.options().memory_format(fmt));
  b.mask = at::empty({input.size(0), 1, input.size(2), input.size(3)}, input.options().memory_format(fmt));
  return b;
}

MergeBackward merge_backward_layout(const Tensor& grad_out, const Tensor& input,
                                    at::IntArrayRef coarse_size) {
  const auto fmt = merge_memory_format(input);
  MergeBackward b;
  b.input = input.contiguous(fmt);
  b.grad_out = grad_out.to(input.scalar_type()).contiguous(fmt);
  b.grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
  b.h = coarse_size.empty() ? 0 : coarse_size[0];
  b.w = coarse_size.empty() ? 0 : coarse_size[1];
  b.grad_coarse = coarse_size.empty()
                      ? at::empty({0}, input.options())
                      : at::empty({input.size(0), input.size(1), b.h, b.w}, input.options().memory_format(fmt));
  return b;
}

}  // namespace aim

// A fragment: TORCH_LIBRARY may define a namespace only once, and each op's file defines its own
// schemas (topdown_epilogue.cpp the others).
TORCH_LIBRARY_FRAGMENT(aim, m) {
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
