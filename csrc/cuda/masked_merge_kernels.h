// The masked_merge kernels of one element type T, declared. Each type's kernels are compiled in a
// file of their own (masked_merge_kernels_<dtype>.cu, which instantiates MergeKernels<T> from the
// definitions in masked_merge_kernels_impl.cuh), so that a parallel build compiles the four at
// once; the launchers of launch.h (masked_merge_launch.cu) pick the type at run time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace aim::cuda {

template <typename T>
struct MergeKernels {
  static void forward(const MergeShape& s, const MaskInput& in, const T* feat, const T* coarse, T* out, T* mask,
                      cudaStream_t stream);
  static void backward(const MergeShape& s, const MaskInput& in, const T* grad_out, const void* grad_mask,
                       DType grad_mask_dtype, const T* feat, T* grad_feat, void* grad_logits, T* grad_coarse,
                       cudaStream_t stream);
  static void adjoint(const MergeShape& s, const T* grad_out, T* grad_coarse, cudaStream_t stream);
};

extern template struct MergeKernels<float>;
extern template struct MergeKernels<double>;
extern template struct MergeKernels<__half>;
extern template struct MergeKernels<__nv_bfloat16>;

}  // namespace aim::cuda
