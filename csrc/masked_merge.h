// The masked merge of a top-down stage (paper Eq. 2-3 and the top-down merge):
//   mask = 1[(logits + noise) / temperature >= 0]   (noise = 0 in evaluation)
//   out  = feat * mask + nearest_resize(coarse, (H, W))
// The argument checks and the layout of the merge's tensors (masked_merge.cpp), shared by the CPU
// and CUDA kernels of both ops: aim::topdown_epilogue ends with the same merge.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

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

// The accumulation type of the kernels: double for double, float otherwise.
at::ScalarType acc_dtype(const Tensor& feat);

// The merge's (N, C, ., .) tensors as every kernel reads and writes them, all in
// merge_memory_format(input): input is feat (masked_merge) or conv (topdown_epilogue), and the
// mask is (N, 1, H, W) in input's dtype.
struct MergeForward {
  Tensor input, coarse, out, mask;  // coarse undefined when absent
};
MergeForward merge_forward_layout(const Tensor& input, const std::optional<Tensor>& coarse);

// The same for the backward: grad_out cast to input's dtype, grad_input like input, grad_coarse
// (N, C, h, w), or empty when coarse_size is [].
struct MergeBackward {
  Tensor grad_out, input, grad_input, grad_coarse;
  int64_t h, w;  // coarse size, 0 when absent
};
MergeBackward merge_backward_layout(const Tensor& grad_out, const Tensor& input,
                                    at::IntArrayRef coarse_size);

}  // namespace aim
