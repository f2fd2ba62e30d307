// The masked_merge kernels for double (see masked_merge_kernels.h).
#include "masked_merge_kernels_impl.cuh"

template struct aim::cuda::MergeKernels<double>;
