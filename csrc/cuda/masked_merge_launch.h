// Launchers of the CUDA kernels of aim::masked_merge. Plain C++ on raw pointers, so
// the .cu file needs no torch headers (it compiles in seconds, not minutes).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aim::cuda {

enum class DType { Float, Double, Half, BFloat16 };

struct MergeShape {
  int64_t N, C, H, W;  // feat
  int64_t h, w;        // coarse; 0 when there is none
  bool channels_last;  // feat, out, coarse and their grads share this layout
};

// z: (N, H*W) pre-activation in the accumulation type (double for double, else float).
void launch_forward(DType dtype, const MergeShape& s, const void* feat, const void* z,
                    const void* coarse, void* out, void* mask, cudaStream_t stream);

// grad_mask and grad_z: (N, H*W) in the accumulation type; grad_coarse may be null.
void launch_backward(DType dtype, const MergeShape& s, const void* grad_out, const void* grad_mask,
                     const void* feat, const void* z, bool training, double temperature,
                     void* grad_feat, void* grad_z, void* grad_coarse, cudaStream_t stream);

}  // namespace aim::cuda
