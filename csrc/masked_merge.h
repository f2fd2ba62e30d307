// The masked merge of a top-down stage (paper Eq. 2-3 and the top-down merge):
//   mask = 1[(logits + noise) / temperature >= 0]   (noise = 0 in evaluation)
//   out  = feat * mask + nearest_resize(coarse, (H, W))
// Declarations shared by the schema (ops.cpp) and the CPU / CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace aim {

using at::Tensor;

// Validates the forward arguments; the messages name the op and the offending argument.
void check_merge_inputs(const Tensor& feat, const Tensor& logits,
                        const std::optional<Tensor>& coarse,
                        const std::optional<Tensor>& noise, double temperature,
                        const char* op = "masked_merge", const char* feat_name = "feat");

// Validates the backward arguments (the forward ones plus the incoming grads).
void check_merge_backward_inputs(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                 const Tensor& feat, const Tensor& logits,
                                 const std::optional<Tensor>& noise, double temperature,
                                 at::IntArrayRef coarse_size, const char* op = "masked_merge",
                                 const char* feat_name = "feat");

// The memory format the outputs take: feat's (channels_last stays channels_last).
at::MemoryFormat merge_memory_format(const Tensor& feat);

// Source row/column of every destination row/column of the nearest resize.
std::vector<int64_t> nearest_source_indices(int64_t in_size, int64_t out_size);

// The accumulation type of the kernels: double for double, float otherwise.
at::ScalarType acc_dtype(const Tensor& feat);

// Checked, laid-out inputs and allocated outputs of the forward. All of feat, coarse,
// out and mask share feat's memory format. z = (logits + noise) / temperature (z = logits
// in evaluation) is (N, H*W) in the accumulation type; mask = 1[z >= 0], the exact form of
// 1[sigmoid(z) >= 0.5] (a rounded sigmoid would flip the few z in (-6e-8, 0)).
struct ForwardBuffers {
  Tensor feat, coarse, z, out, mask;  // coarse undefined when absent
};
ForwardBuffers prepare_forward(const Tensor& feat, const Tensor& logits,
                               const std::optional<Tensor>& coarse,
                               const std::optional<Tensor>& noise, double temperature);

// The same for the backward; grad_mask and grad_z are (N, H*W) in the accumulation type,
// grad_coarse is (N, C, h, w), or empty when coarse_size is [].
struct BackwardBuffers {
  Tensor grad_out, grad_mask, feat, z, grad_feat, grad_z, grad_coarse;
  int64_t h, w;  // coarse size, 0 when absent
};
BackwardBuffers prepare_backward(const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
                                 const Tensor& feat, const Tensor& logits,
                                 const std::optional<Tensor>& noise, double temperature,
                                 at::IntArrayRef coarse_size);

// The adjoint of the nearest resize on the CPU: grad_coarse (N, C, h, w) = the sum of grad_out
// (N, C, H, W) over each coarse pixel's footprint. Both laid out in merge_memory_format(grad_out).
void nearest_resize_adjoint_cpu(const Tensor& grad_out, const Tensor& grad_coarse);

// grad_z reshaped and cast to the logits' shape and dtype.
Tensor grad_logits_from(const Tensor& grad_z, const Tensor& logits);

}  // namespace aim
