// The nearest-resize source index, shared by every kernel (CPU, CUDA).
//
// It reproduces F.interpolate(mode="nearest") bit for bit: the scale is the
// float in/out, and src = min(floor(dst * scale), in - 1) in float arithmetic,
// which is what PyTorch's CPU and CUDA upsampling kernels compute.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AIM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AIM_HOST_DEVICE inline
#endif

namespace aim {

AIM_HOST_DEVICE float nearest_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

AIM_HOST_DEVICE int64_t nearest_source_index(int64_t dst, float scale, int64_t in_size) {
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

// First output index whose nearest source is >= src: output indices [start(s), start(s + 1))
// form the footprint of source index s (empty when downsampling skips it). The source index is
// monotone in the output index, so a guess from the exact ratio needs only a few corrections.
AIM_HOST_DEVICE int64_t footprint_start(int64_t src, int64_t in_size, int64_t out_size, float scale) {
  int64_t d = (src * out_size + in_size - 1) / in_size;
  d = d < out_size ? d : out_size;
  while (d > 0 && nearest_source_index(d - 1, scale, in_size) >= src) --d;
  while (d < out_size && nearest_source_index(d, scale, in_size) < src) ++d;
  return d;
}

}  // namespace aim
