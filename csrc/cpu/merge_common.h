// What the CPU kernels of both ops share: the mask's tensors in the accumulation type (the CUDA
// kernels compute z in the kernel instead), the nearest resize's index tables and its adjoint.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace aim {

using at::Tensor;

// z = (logits + noise) / temperature (z = logits in evaluation) as (N, H*W) in dtype. The kernels
// take mask = 1[z >= 0], the exact form of 1[sigmoid(z) >= 0.5] (a rounded sigmoid would flip the
// few z in (-6e-8, 0)).
Tensor mask_preactivation(const Tensor& logits, const std::optional<Tensor>& noise,
                          double temperature, at::ScalarType dtype);

// The mask's side of a backward, each (N, H*W) in the accumulation type: z, grad_mask (zero when
// absent) and the grad_z the kernel writes.
struct MaskGrads {
  Tensor z, grad_mask, grad_z;
};
MaskGrads mask_grads(const std::optional<Tensor>& grad_mask, const Tensor& logits,
                     const std::optional<Tensor>& noise, double temperature, at::ScalarType acc);

// grad_z reshaped and cast to the logits' shape and dtype.
Tensor grad_logits_from(const Tensor& grad_z, const Tensor& logits);

// Source row/column of every destination row/column of the nearest resize.
std::vector<int64_t> nearest_source_indices(int64_t in_size, int64_t out_size);

// The adjoint of the nearest resize (masked_merge_cpu.cpp): grad_coarse (N, C, h, w) = the sum of
// grad_out (N, C, H, W) over each coarse pixel's footprint. Both laid out in
// merge_memory_format(grad_out).
void nearest_resize_adjoint_cpu(const Tensor& grad_out, const Tensor& grad_coarse);

}  // namespace aim
