// The folded mask estimator M_l of a top-down stage (paper Eq. 1) as one op, aim::mask_estimator:
//   h      = GELU(stem(s))                        stem: 3x3 conv, C -> D
//   h      = h + conv2(GELU(conv1(h)))  per block  3x3 convs, D -> D (BatchNorm folded into conv2)
//   logits = (W_h h + b) + W_c mean_HW(h)         the 1x1 logits conv and the global-context term
//   mask   = 1[logits >= 0]
// Every map is rounded to s's dtype where the module path stores one: each convolution's output
// (after its bias), each GELU, each residual sum, the channel means, the context term, the 1x1
// conv's output and the logits.
//
// This header is the arithmetic of the kernel route (two launches), in the order it sums, written once
// for the CUDA kernels (cuda/mask_estimator_kernel.cu) and their CPU emulation
// (mask_estimator.cpp): both call these functions, so the emulation checks the kernels'
// arithmetic and indexing on the CPU. Each output is one thread's sum in a fixed order with fused
// multiply-adds (fma on both sides), so the two agree bit for bit up to the GELU, whose erf comes
// from the CUDA math library on the GPU and from libm on the CPU.
//
// Maps live padded, with a zero border of one position: position (y, x) of an H x W map is element
// (y + 1) * (W + 2) + x + 1 of its plane, so a 3x3 convolution reads no bounds.
// Convolution weights are staged [c][tap][o] (tap = 3 ky + kx), D = kWidth output channels.
#pragma once

#include <cmath>
#include <cstdint>

#include "layer_norm_gelu.h"
#include "nearest.h"  // AIM_HOST_DEVICE

namespace aim::estimator {

constexpr int kWidth = 32;       // D, the estimator's width (aim_ext MASK_WIDTH): the kernel's only one
constexpr int kTaps = 9;         // 3x3
constexpr int kGroup = 4;        // output channels one work item sums (at one position)
constexpr int kStemChunk = 16;   // input channels per partial sum of the stem (one CUDA block each)
constexpr int kMaxBlocks = 8;    // residual blocks the kernel takes
// Dynamic shared memory one block of the kernel may use: under the A100's 163 KiB opt-in limit
// (the CUDA route takes less where the device allows less: 99 KiB on sm_86/89).
constexpr int64_t kMaxSharedBytes = 160 * 1024;

AIM_HOST_DEVICE int64_t padded_plane(int64_t H, int64_t W) { return (H + 2) * (W + 2); }

// Element of position p (row-major over H x W) in a padded plane of row length W + 2. Within the
// kernel's maps (a plane fits shared memory) every index fits an int.
AIM_HOST_DEVICE int padded_index(int p, int W) { return (p / W + 1) * (W + 2) + p % W + 1; }

// Number of stem partial sums (chunks of kStemChunk input channels).
AIM_HOST_DEVICE int64_t stem_chunks(int64_t C) { return (C + kStemChunk - 1) / kStemChunk; }

// A launch's grid.x limit (2^31 - 1 blocks): the stem launches stem_chunks(C) * N blocks, the tail N.
constexpr int64_t kMaxGridBlocks = 2147483647;

// Shared memory of a stem block: its padded input channels and their weights [c][tap][o].
AIM_HOST_DEVICE int64_t stem_shared_bytes(int64_t H, int64_t W, int64_t acc_size) {
  return acc_size * (kStemChunk * padded_plane(H, W) + kStemChunk * kTaps * kWidth);
}

// Shared memory of the tail block: two padded D-channel maps (h and the block's hidden map), one
// convolution's weights [c][tap][o], and the D channel means, logits weights and context weights.
AIM_HOST_DEVICE int64_t tail_shared_bytes(int64_t H, int64_t W, int64_t acc_size) {
  return acc_size * (2 * kWidth * padded_plane(H, W) + kWidth * kTaps * kWidth + 3 * kWidth);
}

// Whether an H x W map fits the kernel: both blocks within `limit` bytes of shared memory
// (kMaxSharedBytes, or less where the device allows less).
AIM_HOST_DEVICE bool map_fits_kernel(int64_t H, int64_t W, int64_t acc_size, int64_t limit = kMaxSharedBytes) {
  return H >= 1 && W >= 1 && stem_shared_bytes(H, W, acc_size) <= limit && tail_shared_bytes(H, W, acc_size) <= limit;
}

// The largest square map that fits `limit` bytes (20 for 4-byte accumulation at kMaxSharedBytes,
// 11 for float64).
inline int64_t largest_square_map(int64_t acc_size, int64_t limit = kMaxSharedBytes) {
  int64_t side = 0;
  while (map_fits_kernel(side + 1, side + 1, acc_size, limit)) ++side;
  return side;
}

// a * b + acc, rounded once.
AIM_HOST_DEVICE float madd(float acc, float a, float b) { return fmaf(a, b, acc); }
AIM_HOST_DEVICE double madd(double acc, double a, double b) { return fma(a, b, acc); }

// acc[j] += sum over c < channels, then ky, then kx of w[c][3 ky + kx][o0 + j] * x[c](y + ky - 1,
// x + kx - 1): kGroup outputs at one position (y, xx) of a 3x3 convolution with zero padding.
template <typename acc_t>
AIM_HOST_DEVICE void conv3x3_group(const acc_t* x, int channels, int plane, int W, int y, int xx, const acc_t* w,
                                   int o0, acc_t* acc) {
  const int Wp = W + 2;
  for (int c = 0; c < channels; ++c) {
    const acc_t* window = x + c * plane + y * Wp + xx;
    const acc_t* wc = w + c * kTaps * kWidth + o0;
    for (int ky = 0; ky < 3; ++ky) {
      for (int kx = 0; kx < 3; ++kx) {
        const acc_t v = window[ky * Wp + kx];
        const acc_t* wt = wc + (ky * 3 + kx) * kWidth;
        for (int j = 0; j < kGroup; ++j) acc[j] = madd(acc[j], wt[j], v);
      }
    }
  }
}

// The stem's output at one (channel, position): its partial sums added in chunk order (chunk k at
// partials[k * stride]), the bias, then GELU.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t stem_output(const acc_t* partials, int64_t chunks, int64_t stride, acc_t bias,
                                  const Round& round) {
  acc_t sum = 0;
  for (int64_t k = 0; k < chunks; ++k) sum += partials[k * stride];
  return round(gelu(round(sum + bias)));
}

// A residual block's hidden map: GELU(conv1(h) + b1), from conv1's sum.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t block_hidden(acc_t sum, acc_t bias, const Round& round) {
  return round(gelu(round(sum + bias)));
}

// A residual block's output: h + (conv2(hidden) + b2), from conv2's sum.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t block_output(acc_t h, acc_t sum, acc_t bias, const Round& round) {
  return round(h + round(sum + bias));
}

// The mean of one padded H x W channel, summed in position order.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t channel_mean(const acc_t* channel, int H, int W, const Round& round) {
  acc_t sum = 0;
  for (int p = 0; p < H * W; ++p) sum += channel[padded_index(p, W)];
  return round(sum / static_cast<acc_t>(H * W));
}

// The global-context term W_c mean_HW(h): the D means weighted, in channel order.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t context_term(const acc_t* means, const acc_t* weight, const Round& round) {
  acc_t sum = 0;
  for (int c = 0; c < kWidth; ++c) sum = madd(sum, weight[c], means[c]);
  return round(sum);
}

// The mask logit at padded element e of h: (W_h h + b) + context.
template <typename acc_t, typename Round>
AIM_HOST_DEVICE acc_t logit_at(const acc_t* h, int plane, int e, const acc_t* weight, acc_t bias,
                               acc_t context, const Round& round) {
  acc_t sum = 0;
  for (int c = 0; c < kWidth; ++c) sum = madd(sum, weight[c], h[c * plane + e]);
  return round(round(sum + bias) + context);
}

}  // namespace aim::estimator
