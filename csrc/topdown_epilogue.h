// The epilogue of a top-down stage as one op (the paper's feature branch end, Eq. 2-3, the merge):
//   features = GELU(LayerNorm_C(conv))            rounded once to conv's dtype
//              (evaluation: conv + conv_bias where given, the bias rounded to conv's dtype, added
//              in the accumulation type and the sum rounded to conv's dtype: the unfused path's
//              conv + bias.to(conv.dtype), one rounding on every path)
//   mask     = 1[(logits + noise) / temperature >= 0]
//   out      = features * mask + nearest_resize(coarse, (H, W))
// The argument checks and the layout of the tensors (topdown_epilogue.cpp), shared by the CPU and
// CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

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

// The merge's tensors (input is conv), plus the LayerNorm parameters, contiguous in the
// accumulation type, and the features, laid out like conv (undefined without `with_features`:
// the evaluation op, aim::topdown_epilogue_inference, does not write them). conv_bias, the
// convolution's bias the evaluation op adds to conv (C values of conv's dtype, held in the
// accumulation type), is undefined when absent.
struct EpilogueForward : MergeForward {
  Tensor weight, bias, features, conv_bias;
};
EpilogueForward epilogue_forward_layout(const Tensor& conv, const Tensor& weight, const Tensor& bias,
                                        const std::optional<Tensor>& coarse, bool with_features = true,
                                        const std::optional<Tensor>& conv_bias = std::nullopt);

// Validates the evaluation op's conv_bias: absent, or one value per channel of conv.
void check_conv_bias(const Tensor& conv, const std::optional<Tensor>& conv_bias, const char* op);

// The same for the backward. grad_features is undefined when absent; grad_weight and grad_bias
// are (C,) in the accumulation type (cast back by epilogue_grads).
struct EpilogueBackward : MergeBackward {
  Tensor weight, bias, grad_features, grad_weight, grad_bias;
};
EpilogueBackward epilogue_backward_layout(const Tensor& grad_out,
                                          const std::optional<Tensor>& grad_features,
                                          const Tensor& conv, const Tensor& weight,
                                          const Tensor& bias, at::IntArrayRef coarse_size);

// The op's five outputs, each in its input's dtype; grad_logits is already in the logits' shape
// and dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> epilogue_grads(const EpilogueBackward& b,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias,
                                                                  const Tensor& grad_logits);

}  // namespace aim
