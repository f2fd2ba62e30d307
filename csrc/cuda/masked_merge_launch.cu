// The launchers of launch.h for aim::masked_merge: they pick the element type and call the
// kernels of that type, compiled in masked_merge_kernels_<dtype>.cu.
#include "device_utils.cuh"
#include "masked_merge_kernels.h"

namespace aim::cuda {

void coarse_adjoint(DType dtype, const MergeShape& s, const void* grad_out, void* grad_coarse, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    MergeKernels<T>::adjoint(s, static_cast<const T*>(grad_out), static_cast<T*>(grad_coarse), stream);
  });
}

void merge_forward(DType dtype, const MergeShape& s, const MaskInput& in, const void* feat, const void* coarse,
                   void* out, void* mask, cudaStream_t stream) {
  if (s.N * s.C * s.H * s.W == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    MergeKernels<T>::forward(s, in, static_cast<const T*>(feat), static_cast<const T*>(coarse),
                             static_cast<T*>(out), static_cast<T*>(mask), stream);
  });
}

void merge_backward(DType dtype, const MergeShape& s, const MaskInput& in, const void* grad_out,
                    const void* grad_mask, DType grad_mask_dtype, const void* feat, void* grad_feat,
                    void* grad_logits, void* grad_coarse, cudaStream_t stream) {
  if (s.N * s.C * (s.H * s.W + s.h * s.w) == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    MergeKernels<T>::backward(s, in, static_cast<const T*>(grad_out), grad_mask, grad_mask_dtype,
                              static_cast<const T*>(feat), static_cast<T*>(grad_feat), grad_logits,
                              static_cast<T*>(grad_coarse), stream);
  });
}

}  // namespace aim::cuda
