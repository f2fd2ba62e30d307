// aim::topdown_epilogue: the schema, the argument checks and the layout of the tensors every
// kernel shares (topdown_epilogue.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#include "topdown_epilogue.h"

namespace aim {

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

void check_conv_bias(const Tensor& conv, const std::optional<Tensor>& conv_bias, const char* op) {
  if (!conv_bias.has_value()) return;
  TORCH_CHECK(conv_bias->dim() == 1 && conv_bias->size(0) == conv.size(1), op, ": conv_bias must have shape (",
              conv.size(1), ",) (one value per channel of conv), got ", conv_bias->sizes());
  TORCH_CHECK(at::isFloatingType(conv_bias->scalar_type()), op, ": conv_bias must be a floating-point tensor, got ",
              conv_bias->scalar_type());
  TORCH_CHECK(conv_bias->device() == conv.device(), op, ": conv_bias is on ", conv_bias->device(), " but conv is on ",
              conv.device());
}

EpilogueForward epilogue_forward_layout(const Tensor& conv, const Tensor& weight, const Tensor& bias,
                                        const std::optional<Tensor>& coarse, bool with_features,
                                        const std::optional<Tensor>& conv_bias) {
  const auto acc = acc_dtype(conv);
  EpilogueForward b{merge_forward_layout(conv, coarse)};
  b.weight = weight.to(acc).contiguous();
  b.bias = bias.to(acc).contiguous();
  // Rounded to conv's dtype first, as the unfused path adds it (conv + bias.to(conv.dtype)).
  if (conv_bias.has_value()) b.conv_bias = conv_bias->to(conv.scalar_type()).to(acc).contiguous();
  if (with_features) b.features = at::empty(conv.sizes(), conv.options().memory_format(merge_memory_format(conv)));
  return b;
}

EpilogueBackward epilogue_backward_layout(const Tensor& grad_out,
                                          const std::optional<Tensor>& grad_features,
                                          const Tensor& conv, const Tensor& weight,
                                          const Tensor& bias, at::IntArrayRef coarse_size) {
  const auto acc = acc_dtype(conv);
  EpilogueBackward b{merge_backward_layout(grad_out, conv, coarse_size)};
  b.weight = weight.to(acc).contiguous();
  b.bias = bias.to(acc).contiguous();
  if (grad_features.has_value()) {
    b.grad_features = grad_features->to(conv.scalar_type()).contiguous(merge_memory_format(conv));
  }
  b.grad_weight = at::empty({conv.size(1)}, b.weight.options());
  b.grad_bias = at::empty({conv.size(1)}, b.weight.options());
  return b;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> epilogue_grads(const EpilogueBackward& b,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias,
                                                                  const Tensor& grad_logits) {
  return {b.grad_input, b.grad_weight.to(weight.scalar_type()), b.grad_bias.to(bias.scalar_type()),
          grad_logits, b.grad_coarse};
}

}  // namespace aim

// A fragment: the aim library's other schemas are in masked_merge.cpp.
TORCH_LIBRARY_FRAGMENT(aim, m) {
  // The whole epilogue of a top-down stage: returns (out, mask, features), features being
  // GELU(LayerNorm_C(conv)) before masking (the auxiliary heads pool it).
  m.def(
      "topdown_epilogue(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
      "Tensor? coarse, Tensor? noise, float temperature, float eps) -> (Tensor, Tensor, Tensor)");
  // Evaluation (mask 1[logits >= 0], no gradients): (out, mask), the features not written;
  // conv_bias, the convolution's bias, is added to conv inside the op.
  m.def(
      "topdown_epilogue_inference(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
      "Tensor? coarse, float eps, Tensor? conv_bias=None) -> (Tensor, Tensor)");
  // Backward: returns (grad_conv, grad_ln_weight, grad_ln_bias, grad_logits, grad_coarse).
  m.def(
      "topdown_epilogue_backward(Tensor grad_out, Tensor? grad_mask, Tensor? grad_features, "
      "Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, Tensor? noise, "
      "float temperature, float eps, SymInt[] coarse_size) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}
