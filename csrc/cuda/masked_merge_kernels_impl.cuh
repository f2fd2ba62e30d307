#pragma once
// CUDA kernels of aim::masked_merge (included by masked_merge_kernels_<dtype>.cu, one element
// type per file so that nvcc compiles them in parallel), written for memory bandwidth: one pass over the feature
// map, vector loads and stores of up to 16 bytes along the contiguous run (C for channels_last,
// the H * W plane for NCHW), 32-bit index arithmetic where the map allows, the mask computed from the logits
// (and noise) in the kernel, so no separate pre-activation pass. Deterministic: the coarse-map
// gradient sums each source pixel's footprint in one thread, without atomics.
#include <limits>

#include "../nearest.h"
#include "device_utils.cuh"
#include "masked_merge_kernels.h"

namespace aim::cuda {
namespace merge_detail {

// channels_last: thread i covers channels [c0, c0 + V) of pixel p.
template <typename T, int V, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_cl(MergeShape s, MaskInput in, const T* feat,
                                                       const T* coarse, T* out, T* mask) {
  using acc_t = acc_type<T>;
  const index_t C = s.C, chunks = C / V, W = s.W, HW = s.H * s.W, total = s.N * HW * chunks;
  const float sh = coarse ? nearest_scale(s.h, s.H) : 0.f, sw = coarse ? nearest_scale(s.w, s.W) : 0.f;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t p = i / chunks, c0 = (i - p * chunks) * V;
    const acc_t m = mask_at<acc_t>(in, p);
    if (c0 == 0) mask[p] = from_acc<T>(m);
    const Vec<T, V> f = load_vec<T, V>(feat + p * C + c0);
    Vec<T, V> o;
    if (coarse != nullptr) {
      const index_t n = p / HW, yx = p - n * HW, y = yx / W, x = yx - y * W;
      const index_t q = (n * index_t(s.h) + index_t(nearest_source_index(y, sh, s.h))) * index_t(s.w) +
                        index_t(nearest_source_index(x, sw, s.w));
      const Vec<T, V> c = load_vec<T, V>(coarse + q * C + c0);
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = merged<T>(f.v[k], m, &c.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = merged<T>(f.v[k], m, nullptr);
    }
    store_vec<T, V>(out + p * C + c0, o);
  }
}

// NCHW: thread i covers elements [o, o + V) of plane (n, c), which may run over a row's end.
template <typename T, int V, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_nchw(MergeShape s, MaskInput in, const T* feat,
                                                         const T* coarse, T* out, T* mask) {
  using acc_t = acc_type<T>;
  const index_t C = s.C, W = s.W, HW = s.H * s.W, runs = HW / V, total = s.N * C * runs;
  const float sh = coarse ? nearest_scale(s.h, s.H) : 0.f, sw = coarse ? nearest_scale(s.w, s.W) : 0.f;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t nc = i / runs, o = (i - nc * runs) * V, n = nc / C, c = nc - n * C;
    const Vec<T, V> f = load_vec<T, V>(feat + nc * HW + o);
    const T* cplane = coarse ? coarse + nc * index_t(s.h) * index_t(s.w) : nullptr;
    index_t y = o / W, x = o - y * W;
    Vec<T, V> v;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const index_t p = n * HW + o + k;
      const acc_t m = mask_at<acc_t>(in, p);
      if (c == 0) mask[p] = from_acc<T>(m);
      const T* cp = cplane ? cplane + index_t(nearest_source_index(y, sh, s.h)) * index_t(s.w) +
                                 index_t(nearest_source_index(x, sw, s.w))
                           : nullptr;
      v.v[k] = merged<T>(f.v[k], m, cp);
      if (++x == W) x = 0, ++y;
    }
    store_vec<T, V>(out + nc * HW + o, v);
  }
}

// channels_last backward: one warp per pixel, lanes over vectors of channels.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_cl(MergeShape s, MaskInput in, const T* grad_out,
                                                        const void* grad_mask, DType grad_mask_dtype, const T* feat,
                                                        T* grad_feat, void* grad_logits) {
  using acc_t = acc_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t chunks = s.C / V, pixels = s.N * s.H * s.W;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t p = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; p < pixels; p += warps) {
    const acc_t m = mask_at<acc_t>(in, p);
    acc_t dot = 0;
    for (int64_t j = lane; j < chunks; j += kWarp) {
      const int64_t e = p * s.C + j * V;
      const Vec<T, V> go = load_vec<T, V>(grad_out + e), f = load_vec<T, V>(feat + e);
      Vec<T, V> gf;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        gf.v[k] = from_acc<T>(to_acc(go.v[k]) * m);
        dot += to_acc(go.v[k]) * to_acc(f.v[k]);
      }
      store_vec<T, V>(grad_feat + e, gf);
    }
    dot = warp_sum(dot);
    if (lane == 0) store_as<acc_t>(grad_logits, in.logits_dtype, p, logit_grad<acc_t>(in, p, dot, grad_mask, grad_mask_dtype));
  }
}

// NCHW backward: thread i covers pixels [x0, x0 + V) of one row, looping over the channels
// (a warp reads consecutive pixels of each channel plane).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_nchw(MergeShape s, MaskInput in, const T* grad_out,
                                                          const void* grad_mask, DType grad_mask_dtype,
                                                          const T* feat, T* grad_feat, void* grad_logits) {
  using acc_t = acc_type<T>;
  const int64_t HW = s.H * s.W, runs = HW / V, total = s.N * runs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / runs, yx0 = (i - n * runs) * V;
    acc_t m[V], dot[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      m[k] = mask_at<acc_t>(in, n * HW + yx0 + k);
      dot[k] = 0;
    }
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t e = (n * s.C + c) * HW + yx0;
      const Vec<T, V> go = load_vec<T, V>(grad_out + e), f = load_vec<T, V>(feat + e);
      Vec<T, V> gf;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        gf.v[k] = from_acc<T>(to_acc(go.v[k]) * m[k]);
        dot[k] += to_acc(go.v[k]) * to_acc(f.v[k]);
      }
      store_vec<T, V>(grad_feat + e, gf);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t p = n * HW + yx0 + k;
      store_as<acc_t>(grad_logits, in.logits_dtype, p, logit_grad<acc_t>(in, p, dot[k], grad_mask, grad_mask_dtype));
    }
  }
}

// The adjoint of the nearest resize, channels_last: thread i sums channels [c0, c0 + V) of one
// coarse pixel over its footprint.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) adjoint_cl(MergeShape s, const T* grad_out, T* grad_coarse) {
  using acc_t = acc_type<T>;
  const int64_t chunks = s.C / V, total = s.N * s.h * s.w * chunks;
  const float sh = nearest_scale(s.h, s.H), sw = nearest_scale(s.w, s.W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / chunks, c0 = (i - q * chunks) * V;
    const int64_t n = q / (s.h * s.w), cy = (q / s.w) % s.h, cx = q % s.w;
    const int64_t y0 = footprint_start(cy, s.h, s.H, sh), y1 = footprint_start(cy + 1, s.h, s.H, sh);
    const int64_t x0 = footprint_start(cx, s.w, s.W, sw), x1 = footprint_start(cx + 1, s.w, s.W, sw);
    acc_t acc[V] = {};
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const Vec<T, V> g = load_vec<T, V>(grad_out + ((n * s.H + y) * s.W + x) * s.C + c0);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += to_acc(g.v[k]);
      }
    }
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(acc[k]);
    store_vec<T, V>(grad_coarse + q * s.C + c0, o);
  }
}

// The adjoint of the nearest resize, NCHW: one thread per coarse element.
template <typename T>
__global__ void __launch_bounds__(kThreads) adjoint_nchw(MergeShape s, const T* grad_out, T* grad_coarse) {
  using acc_t = acc_type<T>;
  const int64_t total = s.N * s.C * s.h * s.w;
  const float sh = nearest_scale(s.h, s.H), sw = nearest_scale(s.w, s.W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t cx = i % s.w, cy = (i / s.w) % s.h, nc = i / (s.w * s.h);
    const int64_t y0 = footprint_start(cy, s.h, s.H, sh), y1 = footprint_start(cy + 1, s.h, s.H, sh);
    const int64_t x0 = footprint_start(cx, s.w, s.W, sw), x1 = footprint_start(cx + 1, s.w, s.W, sw);
    const T* plane = grad_out + nc * s.H * s.W;
    acc_t acc = 0;
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x = x0; x < x1; ++x) acc += to_acc(plane[y * s.W + x]);
    grad_coarse[i] = from_acc<T>(acc);
  }
}

// The adjoint of the nearest resize of grad_out into grad_coarse (either layout).
template <typename T>
void adjoint_typed(const MergeShape& s, const T* go, T* gc, cudaStream_t stream) {
  if (s.N * s.C * s.h * s.w == 0) return;
  if (s.channels_last) {
    dispatch_width(vector_width<T>(s.C, {go, gc}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      adjoint_cl<T, V><<<blocks_for(s.N * s.C * s.h * s.w / V), kThreads, 0, stream>>>(s, go, gc);
    });
  } else {
    adjoint_nchw<T><<<blocks_for(s.N * s.C * s.h * s.w), kThreads, 0, stream>>>(s, go, gc);
  }
}

// 32-bit indices when every index into feat and coarse, and the grid-stride step, fit.
inline bool small_indices(const MergeShape& s) {
  const int64_t largest = std::max(s.N * s.C * s.H * s.W, s.N * s.C * s.h * s.w);
  return largest + int64_t(kThreads) * (1 << 20) < std::numeric_limits<int32_t>::max();
}

template <typename T>
void forward_typed(const MergeShape& s, const MaskInput& in, const T* feat, const T* coarse, T* out, T* mask,
                   cudaStream_t stream) {
  // The contiguous run: a pixel's C channels, or an (n, c) plane of H * W.
  // (channels_last also loads vectors of coarse; NCHW gathers it element by element).
  const int v = s.channels_last ? vector_width<T>(s.C, {feat, out, coarse}) : vector_width<T>(s.H * s.W, {feat, out});
  const int64_t elements = s.N * s.C * s.H * s.W;
  dispatch_width(v, [&](auto width) {
    constexpr int V = decltype(width)::value;
    const int blocks = blocks_for(elements / V);
    if (s.channels_last) {
      if (small_indices(s)) forward_cl<T, V, int32_t><<<blocks, kThreads, 0, stream>>>(s, in, feat, coarse, out, mask);
      else forward_cl<T, V, int64_t><<<blocks, kThreads, 0, stream>>>(s, in, feat, coarse, out, mask);
    } else {
      if (small_indices(s)) forward_nchw<T, V, int32_t><<<blocks, kThreads, 0, stream>>>(s, in, feat, coarse, out, mask);
      else forward_nchw<T, V, int64_t><<<blocks, kThreads, 0, stream>>>(s, in, feat, coarse, out, mask);
    }
  });
}

template <typename T>
void backward_typed(const MergeShape& s, const MaskInput& in, const T* grad_out, const void* grad_mask,
                    DType grad_mask_dtype, const T* feat, T* grad_feat, void* grad_logits, T* grad_coarse,
                    cudaStream_t stream) {
  const int64_t pixels = s.N * s.H * s.W;
  if (pixels == 0) {
    // Nothing to do but the coarse gradient, which is zero (empty footprints).
  } else if (s.channels_last) {
    const int v = vector_width<T>(s.C, {grad_out, feat, grad_feat});
    dispatch_width(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      backward_cl<T, V><<<blocks_for(pixels, kWarpsPerBlock), kThreads, 0, stream>>>(
          s, in, grad_out, grad_mask, grad_mask_dtype, feat, grad_feat, grad_logits);
    });
  } else {
    // At most 2 pixels per thread: each thread walks all C channels, so more would leave too
    // few threads (and spill registers).
    const int v = std::min(2, vector_width<T>(s.H * s.W, {grad_out, feat, grad_feat}));
    dispatch_width(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      backward_nchw<T, V><<<blocks_for(pixels / V), kThreads, 0, stream>>>(
          s, in, grad_out, grad_mask, grad_mask_dtype, feat, grad_feat, grad_logits);
    });
  }
  if (grad_coarse != nullptr) adjoint_typed<T>(s, grad_out, grad_coarse, stream);
}

}  // namespace merge_detail

template <typename T>
void MergeKernels<T>::forward(const MergeShape& s, const MaskInput& in, const T* feat, const T* coarse, T* out,
                              T* mask, cudaStream_t stream) {
  merge_detail::forward_typed<T>(s, in, feat, coarse, out, mask, stream);
}

template <typename T>
void MergeKernels<T>::backward(const MergeShape& s, const MaskInput& in, const T* grad_out, const void* grad_mask,
                               DType grad_mask_dtype, const T* feat, T* grad_feat, void* grad_logits,
                               T* grad_coarse, cudaStream_t stream) {
  merge_detail::backward_typed<T>(s, in, grad_out, grad_mask, grad_mask_dtype, feat, grad_feat, grad_logits,
                                  grad_coarse, stream);
}

template <typename T>
void MergeKernels<T>::adjoint(const MergeShape& s, const T* grad_out, T* grad_coarse, cudaStream_t stream) {
  merge_detail::adjoint_typed<T>(s, grad_out, grad_coarse, stream);
}

}  // namespace aim::cuda
