// CUDA kernels of aim::masked_merge: a first, straightforward version (one thread per
// output element, grid-stride loops). Deterministic: the coarse-map gradient sums each
// source pixel's footprint in one thread, without atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "../gumbel.h"
#include "../nearest.h"
#include "masked_merge_launch.h"

namespace aim::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Calls f(T{}) with the element type named by dtype.
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float: return f(float{});
    case DType::Double: return f(double{});
    case DType::Half: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
}

struct Index {
  int64_t n, c, y, x;
};

__device__ __forceinline__ Index unravel(int64_t i, const MergeShape& s) {
  if (s.channels_last) {  // memory order N, H, W, C
    const int64_t c = i % s.C;
    const int64_t p = i / s.C;
    return {p / (s.H * s.W), c, (p / s.W) % s.H, p % s.W};
  }
  const int64_t x = i % s.W;
  const int64_t y = (i / s.W) % s.H;
  const int64_t nc = i / (s.W * s.H);
  return {nc / s.C, nc % s.C, y, x};
}

__device__ __forceinline__ int64_t offset(const MergeShape& s, int64_t n, int64_t c, int64_t y,
                                          int64_t x, int64_t H, int64_t W) {
  return s.channels_last ? ((n * H + y) * W + x) * s.C + c : ((n * s.C + c) * H + y) * W + x;
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename T>
__global__ void forward_kernel(MergeShape s, const T* feat, const acc_type<T>* z, const T* coarse,
                               T* out, T* mask) {
  using acc_t = acc_type<T>;
  const int64_t total = s.N * s.C * s.H * s.W;
  const float sh = s.h ? nearest_scale(s.h, s.H) : 0.f, sw = s.w ? nearest_scale(s.w, s.W) : 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Index t = unravel(i, s);
    const int64_t p = (t.n * s.H + t.y) * s.W + t.x;
    const acc_t m = z[p] >= 0 ? acc_t(1) : acc_t(0);
    if (t.c == 0) mask[p] = from_acc<T>(m);
    // Round the product first, as the reference does (feat * mask, then + coarse).
    T value = from_acc<T>(to_acc(feat[i]) * m);
    if (coarse != nullptr) {
      const int64_t cy = nearest_source_index(t.y, sh, s.h), cx = nearest_source_index(t.x, sw, s.w);
      value = from_acc<T>(to_acc(value) + to_acc(coarse[offset(s, t.n, t.c, cy, cx, s.h, s.w)]));
    }
    out[i] = value;
  }
}

template <typename T>
__global__ void grad_feat_kernel(MergeShape s, const T* grad_out, const acc_type<T>* z, T* grad_feat) {
  using acc_t = acc_type<T>;
  const int64_t total = s.N * s.C * s.H * s.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Index t = unravel(i, s);
    const acc_t m = z[(t.n * s.H + t.y) * s.W + t.x] >= 0 ? acc_t(1) : acc_t(0);
    grad_feat[i] = from_acc<T>(to_acc(grad_out[i]) * m);
  }
}

// Straight-through gradient of the binary Gumbel mask, one thread per pixel.
template <typename T>
__global__ void grad_logits_kernel(MergeShape s, const T* grad_out, const acc_type<T>* grad_mask,
                                   const T* feat, const acc_type<T>* z, bool training,
                                   double temperature, acc_type<T>* grad_z) {
  using acc_t = acc_type<T>;
  const int64_t pixels = s.N * s.H * s.W, HW = s.H * s.W;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pixels;
       p += int64_t(gridDim.x) * blockDim.x) {
    if (!training) {
      grad_z[p] = acc_t(0);
      continue;
    }
    const int64_t n = p / HW, yx = p % HW;
    const int64_t base = s.channels_last ? p * s.C : n * s.C * HW + yx;
    const int64_t stride = s.channels_last ? 1 : HW;
    acc_t dot = 0;
    for (int64_t c = 0; c < s.C; ++c)
      dot += to_acc(grad_out[base + c * stride]) * to_acc(feat[base + c * stride]);
    grad_z[p] = straight_through_grad<acc_t>(dot + grad_mask[p], z[p], static_cast<acc_t>(temperature));
  }
}

// The adjoint of the nearest resize: each coarse pixel sums its own footprint.
template <typename T>
__global__ void grad_coarse_kernel(MergeShape s, const T* grad_out, T* grad_coarse) {
  using acc_t = acc_type<T>;
  const int64_t total = s.N * s.C * s.h * s.w;
  const float sh = nearest_scale(s.h, s.H), sw = nearest_scale(s.w, s.W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, cy, cx;
    if (s.channels_last) {
      c = i % s.C;
      const int64_t p = i / s.C;
      n = p / (s.h * s.w), cy = (p / s.w) % s.h, cx = p % s.w;
    } else {
      cx = i % s.w, cy = (i / s.w) % s.h;
      const int64_t nc = i / (s.w * s.h);
      n = nc / s.C, c = nc % s.C;
    }
    const int64_t y0 = footprint_start(cy, s.h, s.H, sh), y1 = footprint_start(cy + 1, s.h, s.H, sh);
    const int64_t x0 = footprint_start(cx, s.w, s.W, sw), x1 = footprint_start(cx + 1, s.w, s.W, sw);
    acc_t acc = 0;
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) acc += to_acc(grad_out[offset(s, n, c, y, x, s.H, s.W)]);
    grad_coarse[i] = from_acc<T>(acc);
  }
}

template <typename T>
void forward_typed(const MergeShape& s, const void* feat, const void* z, const void* coarse,
                   void* out, void* mask, cudaStream_t stream) {
  const int64_t total = s.N * s.C * s.H * s.W;
  if (total == 0) return;
  forward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      s, static_cast<const T*>(feat), static_cast<const acc_type<T>*>(z), static_cast<const T*>(coarse),
      static_cast<T*>(out), static_cast<T*>(mask));
}

template <typename T>
void backward_typed(const MergeShape& s, const void* grad_out, const void* grad_mask, const void* feat,
                    const void* z, bool training, double temperature, void* grad_feat, void* grad_z,
                    void* grad_coarse, cudaStream_t stream) {
  using acc_t = acc_type<T>;
  const int64_t total = s.N * s.C * s.H * s.W, pixels = s.N * s.H * s.W;
  if (total == 0) return;
  const T* go = static_cast<const T*>(grad_out);
  grad_feat_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(s, go, static_cast<const acc_t*>(z),
                                                                   static_cast<T*>(grad_feat));
  grad_logits_kernel<T><<<blocks_for(pixels), kThreads, 0, stream>>>(
      s, go, static_cast<const acc_t*>(grad_mask), static_cast<const T*>(feat),
      static_cast<const acc_t*>(z), training, temperature, static_cast<acc_t*>(grad_z));
  if (grad_coarse != nullptr) {
    grad_coarse_kernel<T><<<blocks_for(s.N * s.C * s.h * s.w), kThreads, 0, stream>>>(
        s, go, static_cast<T*>(grad_coarse));
  }
}

}  // namespace

void launch_forward(DType dtype, const MergeShape& s, const void* feat, const void* z,
                    const void* coarse, void* out, void* mask, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    forward_typed<decltype(tag)>(s, feat, z, coarse, out, mask, stream);
  });
}

void launch_backward(DType dtype, const MergeShape& s, const void* grad_out, const void* grad_mask,
                     const void* feat, const void* z, bool training, double temperature,
                     void* grad_feat, void* grad_z, void* grad_coarse, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    backward_typed<decltype(tag)>(s, grad_out, grad_mask, feat, z, training, temperature,
                                  grad_feat, grad_z, grad_coarse, stream);
  });
}

}  // namespace aim::cuda
