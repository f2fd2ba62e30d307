// Helpers shared by the CUDA kernels of aim_ext: element types and conversions, vector access,
// warp reductions, the mask and the merge of one element (both ops end with the same merge), launch
// sizes. No torch headers (see launch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../gumbel.h"
#include "launch.h"

namespace aim::cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Blocks of the kernels whose partial sums are reduced afterwards: a fixed number, so that the
// split of the work, and with it the summation order, never depends on the device.
constexpr int kReductionBlocks = 1024;

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

// Rounds v to T and back: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ acc_type<T> rounded(acc_type<T> v) {
  return to_acc(from_acc<T>(v));
}

// Element i of a tensor whose dtype is only known at run time (logits, noise, grad_mask), as acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::Float: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case DType::Double: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case DType::Half: return static_cast<acc_t>(__half2float(static_cast<const __half*>(p)[i]));
    case DType::BFloat16: return static_cast<acc_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
  return acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ void store_as(void* p, DType dtype, int64_t i, acc_t v) {
  switch (dtype) {
    case DType::Float: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case DType::Double: static_cast<double*>(p)[i] = static_cast<double>(v); return;
    case DType::Half: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); return;
    case DType::BFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      return;
  }
}

// The mask's pre-activation z = (logits + noise) / temperature, as the reference computes it
// (in acc_t, then divided); z = logits in evaluation. mask = 1[z >= 0].
template <typename acc_t>
__device__ __forceinline__ acc_t preactivation(const MaskInput& in, int64_t p) {
  acc_t z = load_as<acc_t>(in.logits, in.logits_dtype, p);
  if (in.noise != nullptr) z = (z + load_as<acc_t>(in.noise, in.noise_dtype, p)) / static_cast<acc_t>(in.temperature);
  return z;
}

// The binary Gumbel mask of pixel p (paper Eq. 2), 0 or 1 in acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t mask_at(const MaskInput& in, int64_t p) {
  return preactivation<acc_t>(in, p) >= acc_t(0) ? acc_t(1) : acc_t(0);
}

// One element of the merge (paper Eq. 3 and the top-down merge), rounded as the reference rounds
// it: f * mask in T first, then + the coarse value c when there is a coarse map.
template <typename T>
__device__ __forceinline__ T merged(T f, acc_type<T> m, bool has_coarse, T c) {
  const acc_type<T> masked = rounded<T>(to_acc(f) * m);
  return has_coarse ? from_acc<T>(masked + to_acc(c)) : from_acc<T>(masked);
}

// The same for a caller that holds a pointer to the coarse value, null without a coarse map.
template <typename T>
__device__ __forceinline__ T merged(T f, acc_type<T> m, const T* c) {
  return c == nullptr ? merged<T>(f, m, false, T{}) : merged<T>(f, m, true, *c);
}

// The straight-through gradient of pixel p's mask logit, given dot = sum over C of grad_out * the
// masked features; grad_mask may be null (zero). Zero in evaluation, where the mask is a constant.
template <typename acc_t>
__device__ __forceinline__ acc_t logit_grad(const MaskInput& in, int64_t p, acc_t dot, const void* grad_mask,
                                            DType grad_mask_dtype) {
  if (in.noise == nullptr) return acc_t(0);
  if (grad_mask != nullptr) dot += load_as<acc_t>(grad_mask, grad_mask_dtype, p);
  return straight_through_grad<acc_t>(dot, preactivation<acc_t>(in, p), static_cast<acc_t>(in.temperature));
}

// V elements of T loaded or stored at once (16 bytes for V * sizeof(T) = 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, double>) return DType::Double;
  else if constexpr (std::is_same_v<T, __half>) return DType::Half;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return DType::BFloat16;
  else return DType::Float;
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

// The widest vector (elements) of T that divides `run` (a contiguous run: C for channels_last,
// W for NCHW) and the alignment of every pointer, at most 16 bytes.
template <typename T>
int vector_width(int64_t run, std::initializer_list<const void*> pointers) {
  for (int v = static_cast<int>(16 / sizeof(T)); v > 1; v /= 2) {
    bool ok = run % v == 0;
    for (const void* p : pointers)
      ok = ok && (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * v) == 0);
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>{}) for V in {1, 2, 4, 8}.
template <typename F>
void dispatch_width(int v, F&& f) {
  switch (v) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

inline int blocks_for(int64_t work, int per_block = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, 1 << 20)));
}

}  // namespace aim::cuda
