// The epilogue of a top-down stage as one op (the paper's feature branch end, Eq. 2-3, the merge):
//   features = GELU(LayerNorm_C(conv))            rounded once to conv's dtype
//   mask     = 1[(logits + noise) / temperature >= 0]
//   out      = features * mask + nearest_resize(coarse, (H, W))
// Declarations shared by the schema (ops.cpp) and the CPU / CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "masked_merge.h"

namespace aim {

// Validates the forward arguments; the messages name the offending argument.
void check_epilogue_inputs(const Tensor& conv, const Tensor& weight, const Tensor& bias,
                           const Tensor& logits, const std::optional<Tensor>& coarse,
                           const std::optional<Tensor>& noise, double temperature, double eps);

// The same for the backward's arguments (the forward's plus the incoming gradients).
void check_epilogue_backward_inputs(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                    const std::optional<Tensor>& grad_features, const Tensor& conv,
                                    const Tensor& weight, const Tensor& bias, const Tensor& logits,
                                    const std::optional<Tensor>& noise, double temperature, double eps,
                                    at::IntArrayRef coarse_size);

// Checked, laid-out inputs and allocated outputs. conv, coarse, out and features share conv's
// memory format (merge_memory_format); weight and bias are contiguous in the accumulation type;
// z = (logits + noise) / temperature is (N, H*W) in the accumulation type.
struct EpilogueForward {
  Tensor conv, weight, bias, coarse, z, out, mask, features;  // coarse undefined when absent
};
EpilogueForward prepare_epilogue_forward(const Tensor& conv, const Tensor& weight,
                                         const Tensor& bias, const Tensor& logits,
                                         const std::optional<Tensor>& coarse,
                                         const std::optional<Tensor>& noise, double temperature,
                                         double eps);

// The same for the backward. grad_mask and grad_z are (N, H*W) in the accumulation type;
// grad_features is undefined when absent; grad_weight and grad_bias are (C,) in the
// accumulation type (cast back by grads_from); grad_coarse is empty when coarse_size is [].
struct EpilogueBackward {
  Tensor grad_out, grad_mask, grad_features, conv, weight, bias, z;
  Tensor grad_conv, grad_weight, grad_bias, grad_z, grad_coarse;
  int64_t h, w;  // coarse size, 0 when absent
};
EpilogueBackward prepare_epilogue_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
    const std::optional<Tensor>& grad_features, const Tensor& conv, const Tensor& weight,
    const Tensor& bias, const Tensor& logits, const std::optional<Tensor>& noise,
    double temperature, double eps, at::IntArrayRef coarse_size);

// The op's five outputs, each cast to its input's dtype and shape.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> epilogue_grads(const EpilogueBackward& b,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias,
                                                                  const Tensor& logits);

}  // namespace aim
