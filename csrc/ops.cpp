// The op schema (TORCH_LIBRARY) and the argument checks every kernel shares.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "masked_merge.h"
#include "nearest.h"
#include "topdown_epilogue.h"

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
  TORCH_CHECK(coarse_size.empty() || coarse_size.size() == 2,
              op, "_backward: coarse_size must be [] or [h, w], got ", coarse_size);
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

void check_epilogue_inputs(const Tensor& conv, const Tensor& weight, const Tensor& bias,
                           const Tensor& logits, const std::optional<Tensor>& coarse,
                           const std::optional<Tensor>& noise, double temperature, double eps) {
  constexpr const char* op = "topdown_epilogue";
  TORCH_CHECK(conv.dim() == 4, op, ": conv must be 4-D (N, C, H, W), got ", conv.dim(),
              "-D with shape ", conv.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"ln_weight", weight},
                                std::pair<const char*, const Tensor&>{"ln_bias", bias}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == conv.size(1), op, ": ", name, " must have shape (",
                conv.size(1), ",) (one value per channel of conv), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                " must be a floating-point tensor, got ", t.scalar_type());
    TORCH_CHECK(t.device() == conv.device(), op, ": ", name, " is on ", t.device(),
                " but conv is on ", conv.device());
  }
  check_merge_inputs(conv, logits, coarse, noise, temperature, op, "conv");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

void check_epilogue_backward_inputs(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                    const std::optional<Tensor>& grad_features, const Tensor& conv,
                                    const Tensor& weight, const Tensor& bias, const Tensor& logits,
                                    const std::optional<Tensor>& noise, double temperature, double eps,
                                    at::IntArrayRef coarse_size) {
  check_epilogue_inputs(conv, weight, bias, logits, std::nullopt, noise, temperature, eps);
  check_merge_backward_inputs(grad_out, grad_mask, conv, logits, noise, temperature, coarse_size,
                              "topdown_epilogue", "conv");
  if (grad_features.has_value()) {
    TORCH_CHECK(grad_features->sizes() == conv.sizes() && grad_features->device() == conv.device(),
                "topdown_epilogue_backward: grad_features ", grad_features->sizes(),
                " does not match conv ", conv.sizes());
  }
}

EpilogueForward prepare_epilogue_forward(const Tensor& conv, const Tensor& weight,
                                         const Tensor& bias, const Tensor& logits,
                                         const std::optional<Tensor>& coarse,
                                         const std::optional<Tensor>& noise, double temperature,
                                         double eps) {
  check_epilogue_inputs(conv, weight, bias, logits, coarse, noise, temperature, eps);
  const auto fmt = merge_memory_format(conv);
  const auto acc = acc_dtype(conv);
  EpilogueForward b;
  b.conv = conv.contiguous(fmt);
  b.weight = weight.to(acc).contiguous();
  b.bias = bias.to(acc).contiguous();
  if (coarse.has_value()) b.coarse = coarse->contiguous(fmt);
  b.z = mask_preactivation(logits, noise, temperature, acc);
  b.out = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  b.features = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  b.mask = at::empty({conv.size(0), 1, conv.size(2), conv.size(3)}, conv.options().memory_format(fmt));
  return b;
}

EpilogueBackward prepare_epilogue_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
    const std::optional<Tensor>& grad_features, const Tensor& conv, const Tensor& weight,
    const Tensor& bias, const Tensor& logits, const std::optional<Tensor>& noise,
    double temperature, double eps, at::IntArrayRef coarse_size) {
  check_epilogue_backward_inputs(grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise,
                                 temperature, eps, coarse_size);
  const auto fmt = merge_memory_format(conv);
  const auto acc = acc_dtype(conv);
  const int64_t n = conv.size(0), c = conv.size(1), hw = conv.size(2) * conv.size(3);
  EpilogueBackward b;
  b.conv = conv.contiguous(fmt);
  b.weight = weight.to(acc).contiguous();
  b.bias = bias.to(acc).contiguous();
  b.grad_out = grad_out.to(conv.scalar_type()).contiguous(fmt);
  if (grad_features.has_value()) b.grad_features = grad_features->to(conv.scalar_type()).contiguous(fmt);
  b.z = mask_preactivation(logits, noise, temperature, acc);
  b.grad_mask = grad_mask.has_value() ? grad_mask->to(acc).reshape({n, hw}).contiguous()
                                      : at::zeros({n, hw}, b.z.options());
  b.grad_conv = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  b.grad_weight = at::empty({c}, b.weight.options());
  b.grad_bias = at::empty({c}, b.weight.options());
  b.grad_z = at::empty({n, hw}, b.z.options());
  b.h = coarse_size.empty() ? 0 : coarse_size[0];
  b.w = coarse_size.empty() ? 0 : coarse_size[1];
  b.grad_coarse = b.h > 0 ? at::empty({n, c, b.h, b.w}, conv.options().memory_format(fmt))
                          : at::empty({0}, conv.options());
  return b;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> epilogue_grads(const EpilogueBackward& b,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias,
                                                                  const Tensor& logits) {
  return {b.grad_conv, b.grad_weight.to(weight.scalar_type()), b.grad_bias.to(bias.scalar_type()),
          grad_logits_from(b.grad_z, logits), b.grad_coarse};
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
  // The whole epilogue of a top-down stage: returns (out, mask, features), features being
  // GELU(LayerNorm_C(conv)) before masking (the auxiliary heads pool it).
  m.def(
      "topdown_epilogue(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
      "Tensor? coarse, Tensor? noise, float temperature, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward: returns (grad_conv, grad_ln_weight, grad_ln_bias, grad_logits, grad_coarse).
  m.def(
      "topdown_epilogue_backward(Tensor grad_out, Tensor? grad_mask, Tensor? grad_features, "
      "Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, Tensor? noise, "
      "float temperature, float eps, SymInt[] coarse_size) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}
