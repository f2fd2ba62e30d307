// The masked_merge kernels for __nv_bfloat16 (see masked_merge_kernels.h).
#include "masked_merge_kernels_impl.cuh"

template struct aim::cuda::MergeKernels<__nv_bfloat16>;
