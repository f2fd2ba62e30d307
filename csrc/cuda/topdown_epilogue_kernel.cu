// CUDA kernels of aim::topdown_epilogue: LayerNorm over channels, GELU, the binary Gumbel mask,
// the multiply and the nearest-upsample-add, reading conv once and writing out, mask and
// features once (forward); reading conv, grad_out and grad_features once per pass (backward).
//
// channels_last (the fast layout): one warp per pixel, each lane holding K vectors of V
// channels in registers, warp shuffles for the per-pixel sums. NCHW, or widths the register
// version does not cover: one thread per pixel looping over the channel planes (a warp reads 32
// consecutive pixels of each plane). The weight and bias gradients are summed per warp, then
// per block in warp order, then over a fixed number of blocks in block order: deterministic.
#include "../layer_norm_gelu.h"
#include "../nearest.h"
#include "device_utils.cuh"

namespace aim::cuda {
namespace {

constexpr int kMaxRegisterValues = 16;  // K * V values of each kind a lane holds

template <typename acc_t>
__device__ __forceinline__ acc_t finish_rstd(acc_t sq, int64_t C, double eps) {
  return acc_t(1) / sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
}

// The coarse pixel (n, sy, sx) feeding fine pixel p, as an index into (N, h, w).
__device__ __forceinline__ int64_t coarse_pixel(const MergeShape& s, int64_t p, float sh, float sw) {
  const int64_t HW = s.H * s.W, n = p / HW, y = (p % HW) / s.W, x = p % s.W;
  return (n * s.h + nearest_source_index(y, sh, s.h)) * s.w + nearest_source_index(x, sw, s.w);
}

// conv + the convolution's bias where given (evaluation), rounded to T: a convolution with its
// bias writes that sum in T, and every path adds the bias so (csrc/topdown_epilogue.h).
template <typename T>
__device__ __forceinline__ acc_type<T> with_bias(acc_type<T> v, const acc_type<T>* conv_bias, int64_t c) {
  return conv_bias ? rounded<T>(v + conv_bias[c]) : v;
}

// ------------------------------------------------------------------------------------------
// Forward.

template <typename T, int V, int K>
__global__ void __launch_bounds__(kThreads)
    forward_cl(MergeShape s, MaskInput in, const T* conv, const acc_type<T>* weight, const acc_type<T>* bias,
               const acc_type<T>* conv_bias, double eps, const T* coarse, T* out, T* mask, T* features) {
  using acc_t = acc_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t C = s.C, chunks = C / V, pixels = s.N * s.H * s.W;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const float sh = coarse ? nearest_scale(s.h, s.H) : 0.f, sw = coarse ? nearest_scale(s.w, s.W) : 0.f;
  for (int64_t p = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; p < pixels; p += warps) {
    acc_t x[K][V];
    acc_t sum = 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      const int64_t j = lane + kk * kWarp;
      if (j < chunks) {
        const Vec<T, V> v = load_vec<T, V>(conv + p * C + j * V);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += (x[kk][k] = with_bias<T>(to_acc(v.v[k]), conv_bias, j * V + k));
      }
    }
    const acc_t mean = warp_sum(sum) / static_cast<acc_t>(C);
    acc_t sq = 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      if (lane + kk * kWarp < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) sq += (x[kk][k] - mean) * (x[kk][k] - mean);
      }
    }
    const acc_t rstd = finish_rstd<acc_t>(warp_sum(sq), C, eps);
    const acc_t m = mask_at<acc_t>(in, p);
    if (lane == 0) mask[p] = from_acc<T>(m);
    const int64_t q = coarse ? coarse_pixel(s, p, sh, sw) : 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      const int64_t j = lane + kk * kWarp;
      if (j >= chunks) continue;
      Vec<T, V> cv{};
      if (coarse) cv = load_vec<T, V>(coarse + q * C + j * V);
      Vec<T, V> f, o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = j * V + k;
        f.v[k] = from_acc<T>(gelu((x[kk][k] - mean) * rstd * weight[c] + bias[c]));
        o.v[k] = merged<T>(f.v[k], m, coarse != nullptr, cv.v[k]);
      }
      if (features) store_vec<T, V>(features + p * C + j * V, f);
      store_vec<T, V>(out + p * C + j * V, o);
    }
  }
}

// Element (n, c, pixel yx) at n * C * HW + c * cs + yx * ps; one thread per pixel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_strided(MergeShape s, MaskInput in, const T* conv, const acc_type<T>* weight, const acc_type<T>* bias,
                    const acc_type<T>* conv_bias, double eps, const T* coarse, T* out, T* mask, T* features) {
  using acc_t = acc_type<T>;
  const int64_t C = s.C, HW = s.H * s.W, pixels = s.N * HW, hw = s.h * s.w;
  const int64_t cs = s.channels_last ? 1 : HW, ps = s.channels_last ? C : 1;
  const int64_t ccs = s.channels_last ? 1 : hw, cps = s.channels_last ? C : 1;
  const float sh = coarse ? nearest_scale(s.h, s.H) : 0.f, sw = coarse ? nearest_scale(s.w, s.W) : 0.f;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pixels; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, base = n * C * HW + (p - n * HW) * ps;
    // Element c of this pixel, plus the convolution's bias where given (evaluation).
    auto value = [&](int64_t c) { return with_bias<T>(to_acc(conv[base + c * cs]), conv_bias, c); };
    acc_t sum = 0, sq = 0;
    for (int64_t c = 0; c < C; ++c) sum += value(c);
    const acc_t mean = sum / static_cast<acc_t>(C);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = value(c) - mean;
      sq += d * d;
    }
    const acc_t rstd = finish_rstd<acc_t>(sq, C, eps);
    const acc_t m = mask_at<acc_t>(in, p);
    mask[p] = from_acc<T>(m);
    const int64_t cbase = coarse ? n * C * hw + (coarse_pixel(s, p, sh, sw) - n * hw) * cps : 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = base + c * cs;
      const T f = from_acc<T>(gelu((value(c) - mean) * rstd * weight[c] + bias[c]));
      if (features) features[e] = f;
      out[e] = merged<T>(f, m, coarse != nullptr, coarse ? coarse[cbase + c * ccs] : T{});
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward. With g = (d out * mask + d features) * gelu'(y) and gx = g * weight:
//   d conv  = rstd * (gx - mean_C(gx) - xhat * mean_C(gx * xhat))
//   d weight = sum over pixels of g * xhat,  d bias = sum of g
//   d logit = straight-through gradient of sum_C(d out * features) + d mask

struct BackwardArgs {
  const void* grad_out;
  const void* grad_mask;
  DType grad_mask_dtype;
  const void* grad_features;  // may be null
  const void* conv;
  const void* weight;
  const void* bias;
  double eps;
  void* grad_conv;
  void* grad_logits;
  void* partials;     // [gridDim.x][2][C], or [gridDim.x][kWarpsPerBlock][2][C] with warp_rows_in_global
  bool warp_rows_in_global;  // the per-warp sums live in partials, not shared memory (large C)
};

// Adds the block's per-warp sums (smem [kWarpsPerBlock][2][C]) in warp order into its row of
// the partial sums.
template <typename acc_t>
__device__ void write_block_partials(const acc_t* smem, int64_t C, acc_t* partials) {
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 2 * C; i += blockDim.x) {
    acc_t total = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) total += smem[w * 2 * C + i];
    partials[blockIdx.x * 2 * C + i] = total;
  }
}

// Where a block's per-warp sums go: [kWarpsPerBlock][2][C] in shared memory, or the block's
// slice of the global workspace.
template <typename acc_t>
__device__ __forceinline__ acc_t* warp_rows(const BackwardArgs& a, int64_t C) {
  extern __shared__ unsigned char smem_bytes[];
  return a.warp_rows_in_global ? static_cast<acc_t*>(a.partials) + blockIdx.x * int64_t(kWarpsPerBlock) * 2 * C
                               : reinterpret_cast<acc_t*>(smem_bytes);
}

template <typename T, int V, int K>
__global__ void __launch_bounds__(kThreads) backward_cl(MergeShape s, MaskInput in, BackwardArgs a) {
  using acc_t = acc_type<T>;
  const T* conv = static_cast<const T*>(a.conv);
  const T* grad_out = static_cast<const T*>(a.grad_out);
  const T* grad_features = static_cast<const T*>(a.grad_features);
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* bias = static_cast<const acc_t*>(a.bias);
  T* grad_conv = static_cast<T*>(a.grad_conv);
  acc_t* rows = warp_rows<acc_t>(a, s.C);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t C = s.C, chunks = C / V, pixels = s.N * s.H * s.W;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  acc_t sum_w[K][V] = {}, sum_b[K][V] = {};  // this lane's channels: sums of g * xhat and of g
  for (int64_t p = blockIdx.x * int64_t(kWarpsPerBlock) + warp; p < pixels; p += warps) {
    acc_t xhat[K][V], gx[K][V];
    acc_t sum = 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      const int64_t j = lane + kk * kWarp;
      if (j < chunks) {
        const Vec<T, V> v = load_vec<T, V>(conv + p * C + j * V);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += (xhat[kk][k] = to_acc(v.v[k]));
      }
    }
    const acc_t mean = warp_sum(sum) / static_cast<acc_t>(C);  // as the forward computes it
    acc_t sq = 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      if (lane + kk * kWarp < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) sq += (xhat[kk][k] - mean) * (xhat[kk][k] - mean);
      }
    }
    const acc_t rstd = finish_rstd<acc_t>(warp_sum(sq), C, a.eps);
    const acc_t m = mask_at<acc_t>(in, p);
    acc_t s1 = 0, s2 = 0, dot = 0;
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      const int64_t j = lane + kk * kWarp;
      if (j >= chunks) continue;
      const Vec<T, V> go = load_vec<T, V>(grad_out + p * C + j * V);
      Vec<T, V> gf{};
      if (grad_features) gf = load_vec<T, V>(grad_features + p * C + j * V);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = j * V + k;
        const acc_t xh = (xhat[kk][k] - mean) * rstd;
        const acc_t y = xh * weight[c] + bias[c];
        const acc_t g = (to_acc(go.v[k]) * m + (grad_features ? to_acc(gf.v[k]) : acc_t(0))) * gelu_grad(y);
        xhat[kk][k] = xh;
        gx[kk][k] = g * weight[c];
        s1 += gx[kk][k];
        s2 += gx[kk][k] * xh;
        dot += to_acc(go.v[k]) * rounded<T>(gelu(y));
        sum_w[kk][k] += g * xh;
        sum_b[kk][k] += g;
      }
    }
    s1 = warp_sum(s1) * inv_c;
    s2 = warp_sum(s2) * inv_c;
    dot = warp_sum(dot);
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      const int64_t j = lane + kk * kWarp;
      if (j >= chunks) continue;
      Vec<T, V> gc;
#pragma unroll
      for (int k = 0; k < V; ++k) gc.v[k] = from_acc<T>(rstd * (gx[kk][k] - s1 - xhat[kk][k] * s2));
      store_vec<T, V>(grad_conv + p * C + j * V, gc);
    }
    if (lane == 0)
      store_as<acc_t>(a.grad_logits, in.logits_dtype, p,
                      logit_grad<acc_t>(in, p, dot, a.grad_mask, a.grad_mask_dtype));
  }
  // Each lane owns its channels in its warp's row: no two threads write the same element.
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    const int64_t j = lane + kk * kWarp;
    if (j >= chunks) continue;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      rows[warp * 2 * C + j * V + k] = sum_w[kk][k];
      rows[warp * 2 * C + C + j * V + k] = sum_b[kk][k];
    }
  }
  if (!a.warp_rows_in_global) write_block_partials(rows, C, static_cast<acc_t*>(a.partials));
}

// One thread per pixel; whole warps walk the channels together so that each channel's weight
// and bias sums can be reduced across the warp.
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_strided(MergeShape s, MaskInput in, BackwardArgs a) {
  using acc_t = acc_type<T>;
  const T* conv = static_cast<const T*>(a.conv);
  const T* grad_out = static_cast<const T*>(a.grad_out);
  const T* grad_features = static_cast<const T*>(a.grad_features);
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* bias = static_cast<const acc_t*>(a.bias);
  T* grad_conv = static_cast<T*>(a.grad_conv);
  acc_t* rows = warp_rows<acc_t>(a, s.C);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t C = s.C, HW = s.H * s.W, pixels = s.N * HW;
  const int64_t cs = s.channels_last ? 1 : HW, ps = s.channels_last ? C : 1;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  acc_t* own = rows + warp * 2 * C;
  for (int64_t i = lane; i < 2 * C; i += kWarp) own[i] = 0;
  __syncwarp();
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock * kWarp;
  for (int64_t first = (blockIdx.x * int64_t(kWarpsPerBlock) + warp) * kWarp; first < pixels; first += stride) {
    const int64_t p = first + lane;
    const bool valid = p < pixels;
    const int64_t n = valid ? p / HW : 0, base = valid ? n * C * HW + (p - n * HW) * ps : 0;
    acc_t mean = 0, rstd = 0, m = 0;
    if (valid) {
      acc_t sum = 0, sq = 0;
      for (int64_t c = 0; c < C; ++c) sum += to_acc(conv[base + c * cs]);
      mean = sum / static_cast<acc_t>(C);  // as the forward computes it
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = to_acc(conv[base + c * cs]) - mean;
        sq += d * d;
      }
      rstd = finish_rstd<acc_t>(sq, C, a.eps);
      m = mask_at<acc_t>(in, p);
    }
    // g of element (p, c), with xhat and y.
    auto grad_y = [&](int64_t c, acc_t& xh, acc_t& y) {
      const int64_t e = base + c * cs;
      xh = (to_acc(conv[e]) - mean) * rstd;
      y = xh * weight[c] + bias[c];
      const acc_t gf = to_acc(grad_out[e]) * m + (grad_features ? to_acc(grad_features[e]) : acc_t(0));
      return gf * gelu_grad(y);
    };
    acc_t s1 = 0, s2 = 0, dot = 0;
    for (int64_t c = 0; c < C; ++c) {
      acc_t g = 0, xh = 0, y = 0;
      if (valid) {
        g = grad_y(c, xh, y);
        s1 += g * weight[c];
        s2 += g * weight[c] * xh;
        dot += to_acc(grad_out[base + c * cs]) * rounded<T>(gelu(y));
      }
      const acc_t gw = warp_sum(g * xh), gb = warp_sum(g);
      if (lane == 0) {
        own[c] += gw;
        own[C + c] += gb;
      }
    }
    if (valid) {
      s1 *= inv_c;
      s2 *= inv_c;
      for (int64_t c = 0; c < C; ++c) {
        acc_t xh, y;
        const acc_t gx = grad_y(c, xh, y) * weight[c];
        grad_conv[base + c * cs] = from_acc<T>(rstd * (gx - s1 - xh * s2));
      }
      store_as<acc_t>(a.grad_logits, in.logits_dtype, p,
                      logit_grad<acc_t>(in, p, dot, a.grad_mask, a.grad_mask_dtype));
    }
  }
  if (!a.warp_rows_in_global) write_block_partials(rows, C, static_cast<acc_t*>(a.partials));
}

// d weight and d bias: each of the 2C sums adds the rows of partial sums in order.
template <typename acc_t>
__global__ void sum_partials(const acc_t* partials, int blocks, int64_t C, acc_t* grad_weight, acc_t* grad_bias) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < 2 * C; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int b = 0; b < blocks; ++b) total += partials[b * 2 * C + i];
    if (i < C) grad_weight[i] = total;
    else grad_bias[i - C] = total;
  }
}

// ------------------------------------------------------------------------------------------
// Launch decisions.

// K, the vectors per lane of the register (channels_last) kernels, or 0 where they do not apply.
template <typename T>
int register_chunks(const MergeShape& s, std::initializer_list<const void*> pointers) {
  constexpr int V = 16 / sizeof(T);
  if (!s.channels_last || vector_width<T>(s.C, pointers) != V) return 0;
  const int64_t per_lane = (s.C / V + kWarp - 1) / kWarp;
  for (int k = 1; k * V <= kMaxRegisterValues; k *= 2)
    if (per_lane <= k) return k;
  return 0;
}

template <typename F>
void dispatch_chunks(int k, F&& f) {
  switch (k) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

int reduction_blocks(int64_t pixels, int64_t pixels_per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kReductionBlocks, (pixels + pixels_per_block - 1) / pixels_per_block)));
}

// The per-warp sums of one block take kWarpsPerBlock * 2C values: in shared memory when they fit
// the default 48 KB (C up to 1536 in float), else in the global workspace.
size_t partials_smem_bytes(const MergeShape& s, size_t acc_size) { return kWarpsPerBlock * 2 * s.C * acc_size; }
bool rows_in_global(const MergeShape& s, size_t acc_size) { return partials_smem_bytes(s, acc_size) > 48 * 1024; }

}  // namespace

void epilogue_forward(DType dtype, const MergeShape& s, const MaskInput& in, const void* conv, const void* weight,
                      const void* bias, const void* conv_bias, double eps, const void* coarse, void* out, void* mask,
                      void* features, cudaStream_t stream) {
  const int64_t pixels = s.N * s.H * s.W;
  if (pixels == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const T* x = static_cast<const T*>(conv);
    const T* c = static_cast<const T*>(coarse);
    T *o = static_cast<T*>(out), *m = static_cast<T*>(mask), *f = static_cast<T*>(features);
    const auto *w = static_cast<const acc_t*>(weight), *b = static_cast<const acc_t*>(bias);
    const auto* cb = static_cast<const acc_t*>(conv_bias);
    const int k = register_chunks<T>(s, {x, c, o, f});
    if (k == 0) {
      forward_strided<T><<<blocks_for(pixels), kThreads, 0, stream>>>(s, in, x, w, b, cb, eps, c, o, m, f);
      return;
    }
    dispatch_chunks(k, [&](auto chunks) {
      constexpr int K = decltype(chunks)::value, V = 16 / sizeof(T);
      if constexpr (K * V <= kMaxRegisterValues) {
        forward_cl<T, V, K>
            <<<blocks_for(pixels, kWarpsPerBlock), kThreads, 0, stream>>>(s, in, x, w, b, cb, eps, c, o, m, f);
      }
    });
  });
}

int64_t epilogue_workspace_elements(const MergeShape& s) {
  // Sized for double, the widest accumulation type.
  return int64_t(kReductionBlocks) * 2 * s.C * (rows_in_global(s, sizeof(double)) ? kWarpsPerBlock : 1);
}

void epilogue_backward(DType dtype, const MergeShape& s, const MaskInput& in, const void* grad_out,
                       const void* grad_mask, DType grad_mask_dtype, const void* grad_features, const void* conv,
                       const void* weight, const void* bias, double eps, void* grad_conv, void* grad_weight,
                       void* grad_bias, void* grad_logits, void* grad_coarse, void* workspace, cudaStream_t stream) {
  const int64_t pixels = s.N * s.H * s.W;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const bool global_rows = rows_in_global(s, sizeof(acc_t));
    const size_t smem = global_rows ? 0 : partials_smem_bytes(s, sizeof(acc_t));
    int blocks = 0;
    if (pixels > 0) {
      const BackwardArgs a{grad_out, grad_mask, grad_mask_dtype, grad_features, conv, weight, bias, eps,
                           grad_conv, grad_logits, workspace, global_rows};
      const int k = register_chunks<T>(s, {grad_out, grad_features, conv, grad_conv});
      if (k == 0) {
        blocks = reduction_blocks(pixels, kThreads);
        backward_strided<T><<<blocks, kThreads, smem, stream>>>(s, in, a);
      } else {
        blocks = reduction_blocks(pixels, kWarpsPerBlock);
        dispatch_chunks(k, [&](auto chunks) {
          constexpr int K = decltype(chunks)::value, V = 16 / sizeof(T);
          if constexpr (K * V <= kMaxRegisterValues) {
            backward_cl<T, V, K><<<blocks, kThreads, smem, stream>>>(s, in, a);
          }
        });
      }
    }
    if (blocks == 0) {  // no pixels: the sums are zero
      cudaMemsetAsync(grad_weight, 0, s.C * sizeof(acc_t), stream);
      cudaMemsetAsync(grad_bias, 0, s.C * sizeof(acc_t), stream);
    } else {
      sum_partials<acc_t><<<blocks_for(2 * s.C), kThreads, 0, stream>>>(
          static_cast<const acc_t*>(workspace), blocks * (global_rows ? kWarpsPerBlock : 1), s.C, static_cast<acc_t*>(grad_weight), static_cast<acc_t*>(grad_bias));
    }
  });
  if (grad_coarse != nullptr) coarse_adjoint(dtype, s, grad_out, grad_coarse, stream);
}

}  // namespace aim::cuda
