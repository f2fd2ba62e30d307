// The masked_merge kernels for float (see masked_merge_kernels.h).
#include "masked_merge_kernels_impl.cuh"

template struct aim::cuda::MergeKernels<float>;
