// CUDA kernels of aim::mask_estimator's kernel route: the whole folded estimator in two launches,
// its arithmetic in mask_estimator.h (shared with the CPU emulation in mask_estimator.cpp).
//
//   stem_partials  one block per (chunk of kStemChunk input channels, image): stages the chunk's
//                  padded input and weights in shared memory and writes the stem's partial sums
//                  (32 channels x H*W positions) of that chunk.
//   tail           one block per image: adds the partial sums in chunk order, then the residual
//                  blocks, the context term, the logits and the mask, every map in shared memory.
// No atomics: each output is one thread's sum in a fixed order, so every run and every CUDA-graph
// replay gives the same bits.
#include <algorithm>
#include <mutex>
#include <set>
#include <utility>

#include "../mask_estimator.h"
#include "device_utils.cuh"

namespace aim::cuda {
namespace {

using namespace aim::estimator;

constexpr int kStemThreads = 256;
constexpr int kTailThreads = 512;

// Rounds to T as a tensor of dtype T stores a value (the host side is never called).
template <typename T>
struct RoundTo {
  __host__ __device__ acc_type<T> operator()(acc_type<T> v) const {
#ifdef __CUDA_ARCH__
    return rounded<T>(v);
#else
    return v;
#endif
  }
};

extern __shared__ __align__(16) unsigned char estimator_smem[];

// [c][tap][o] weights of input channels [c0, c0 + channels) of a (32, C, 3, 3) weight, written in
// shared-memory order (consecutive threads, consecutive banks; the reads are served from L2).
template <typename T>
__device__ void stage_weights(const T* weight, int64_t C, int64_t c0, int channels, acc_type<T>* out) {
  for (int i = threadIdx.x; i < channels * kTaps * kWidth; i += blockDim.x) {
    const int r = i / kWidth, o = i % kWidth;  // r = c * 9 + tap
    out[i] = to_acc(weight[(o * C + c0) * kTaps + r]);
  }
}

// Input channels [c0, c0 + channels) of image n, zero-padded, into x [c][plane]. Consecutive
// threads take consecutive channels where those are adjacent in memory (channels_last), else
// consecutive positions.
template <typename T>
__device__ void stage_input(const EstimatorArgs& a, int64_t n, int64_t c0, int channels, int plane,
                            acc_type<T>* x) {
  const T* s = static_cast<const T*>(a.s) + n * a.sN + c0 * a.sC;
  const int W = static_cast<int>(a.W), H = static_cast<int>(a.H);
  const bool channels_inner = a.sC == 1;
  for (int i = threadIdx.x; i < channels * plane; i += blockDim.x) {
    const int c = channels_inner ? i % channels : i / plane, e = channels_inner ? i / channels : i % plane;
    const int y = e / (W + 2) - 1, xx = e % (W + 2) - 1;
    const bool inside = y >= 0 && y < H && xx >= 0 && xx < W;
    x[c * plane + e] = inside ? to_acc(s[c * a.sC + y * a.sH + xx * a.sW]) : acc_type<T>(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kStemThreads) stem_partials(EstimatorArgs a) {
  using acc_t = acc_type<T>;
  const int W = static_cast<int>(a.W), HW = static_cast<int>(a.H * a.W);
  const int plane = static_cast<int>(padded_plane(a.H, a.W));
  const int64_t chunks = stem_chunks(a.C);
  const int64_t k = blockIdx.x % chunks, n = blockIdx.x / chunks, c0 = k * kStemChunk;
  const int channels = static_cast<int>(a.C - c0 < kStemChunk ? a.C - c0 : kStemChunk);
  acc_t* x = reinterpret_cast<acc_t*>(estimator_smem);
  acc_t* w = x + kStemChunk * plane;
  stage_input<T>(a, n, c0, channels, plane, x);
  stage_weights(static_cast<const T*>(a.stem_weight), a.C, c0, channels, w);
  __syncthreads();
  acc_t* partials = static_cast<acc_t*>(a.partials) + (n * chunks + k) * kWidth * HW;
  for (int item = threadIdx.x; item < (kWidth / kGroup) * HW; item += blockDim.x) {
    const int o0 = item / HW * kGroup, q = item % HW;
    acc_t acc[kGroup] = {};
    conv3x3_group(x, channels, plane, W, q / W, q % W, w, o0, acc);
    for (int j = 0; j < kGroup; ++j) partials[(o0 + j) * HW + q] = acc[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kTailThreads) tail(EstimatorArgs a) {
  using acc_t = acc_type<T>;
  const RoundTo<T> round;
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), HW = H * W;
  const int plane = static_cast<int>(padded_plane(H, W));
  const int64_t chunks = stem_chunks(a.C), n = blockIdx.x;
  acc_t* h = reinterpret_cast<acc_t*>(estimator_smem);
  acc_t* hidden = h + kWidth * plane;
  acc_t* w = hidden + kWidth * plane;
  acc_t* means = w + kWidth * kTaps * kWidth;
  acc_t* wl = means + kWidth;
  acc_t* wc = wl + kWidth;
  for (int i = threadIdx.x; i < 2 * kWidth * plane; i += blockDim.x) h[i] = acc_t(0);  // h, hidden
  if (threadIdx.x < kWidth) {
    wl[threadIdx.x] = to_acc(static_cast<const T*>(a.local_weight)[threadIdx.x]);
    wc[threadIdx.x] = to_acc(static_cast<const T*>(a.context_weight)[threadIdx.x]);
  }
  __syncthreads();  // the borders are zero before the interiors are written
  const acc_t* partials = static_cast<const acc_t*>(a.partials) + n * chunks * kWidth * HW;
  const T* stem_bias = static_cast<const T*>(a.stem_bias);
  for (int i = threadIdx.x; i < kWidth * HW; i += blockDim.x) {
    const int o = i / HW, q = i % HW;
    h[o * plane + padded_index(q, W)] =
        stem_output(partials + o * HW + q, chunks, kWidth * HW, to_acc(stem_bias[o]), round);
  }
  for (int b = 0; b < a.convs; ++b) {  // conv1 (h -> hidden), conv2 (hidden -> h += ...), per block
    __syncthreads();  // the previous map is complete and w is no longer read
    stage_weights(static_cast<const T*>(a.conv_weight[b]), kWidth, 0, kWidth, w);
    __syncthreads();
    const T* bias = static_cast<const T*>(a.conv_bias[b]);
    const acc_t* in = b % 2 == 0 ? h : hidden;
    for (int item = threadIdx.x; item < (kWidth / kGroup) * HW; item += blockDim.x) {
      const int o0 = item / HW * kGroup, q = item % HW, e = padded_index(q, W);
      acc_t acc[kGroup] = {};
      conv3x3_group(in, kWidth, plane, W, q / W, q % W, w, o0, acc);
      for (int j = 0; j < kGroup; ++j) {
        const int idx = (o0 + j) * plane + e;
        const acc_t bj = to_acc(bias[o0 + j]);
        if (b % 2 == 0) hidden[idx] = block_hidden(acc[j], bj, round);
        else h[idx] = block_output(h[idx], acc[j], bj, round);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kWidth) means[threadIdx.x] = channel_mean(h + threadIdx.x * plane, H, W, round);
  __syncthreads();
  const acc_t context = context_term(means, wc, round);  // every thread the same sum
  const acc_t bl = to_acc(static_cast<const T*>(a.local_bias)[0]);
  T* logits = static_cast<T*>(a.logits);
  T* mask = static_cast<T*>(a.mask);
  for (int q = threadIdx.x; q < HW; q += blockDim.x) {
    const acc_t l = logit_at(h, plane, padded_index(q, W), wl, bl, context, round);
    logits[n * HW + q] = from_acc<T>(l);
    mask[n * HW + q] = from_acc<T>(l >= acc_t(0) ? acc_t(1) : acc_t(0));
  }
}

// Lets `kernel` use the most dynamic shared memory any call can ask for on the current device
// (kMaxSharedBytes, or the device's smaller opt-in limit; kernel_takes refuses larger maps), set
// once per kernel and device. Setting it per call to that call's size would let two host threads
// on one device interleave and launch with too little allowed, and costs two driver calls a call.
cudaError_t allow_largest_shared(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> done;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({device, kernel}) != 0) return cudaSuccess;
  int optin = 0;
  error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  const int bytes = static_cast<int>(std::min<int64_t>(kMaxSharedBytes, optin));
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (error == cudaSuccess) done.insert({device, kernel});
  return error;
}

}  // namespace

int64_t estimator_partials_elements(int64_t N, int64_t C, int64_t H, int64_t W) {
  return N * stem_chunks(C) * kWidth * H * W;
}

cudaError_t mask_estimator_forward(DType dtype, const EstimatorArgs& a, cudaStream_t stream) {
  cudaError_t error = cudaSuccess;
  if (a.N == 0) return error;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t acc_size = sizeof(acc_type<T>);
    const int64_t stem_bytes = stem_shared_bytes(a.H, a.W, acc_size);
    const int64_t tail_bytes = tail_shared_bytes(a.H, a.W, acc_size);
    error = allow_largest_shared(reinterpret_cast<const void*>(stem_partials<T>));
    if (error == cudaSuccess) error = allow_largest_shared(reinterpret_cast<const void*>(tail<T>));
    if (error != cudaSuccess) return;
    const auto stem_blocks = static_cast<unsigned>(stem_chunks(a.C) * a.N);
    stem_partials<T><<<stem_blocks, kStemThreads, stem_bytes, stream>>>(a);
    tail<T><<<static_cast<unsigned>(a.N), kTailThreads, tail_bytes, stream>>>(a);
  });
  return error;
}

}  // namespace aim::cuda
