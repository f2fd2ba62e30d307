// The masked_merge kernels for __half (see masked_merge_kernels.h).
#include "masked_merge_kernels_impl.cuh"

template struct aim::cuda::MergeKernels<__half>;
