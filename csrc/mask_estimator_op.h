// aim::mask_estimator (the arithmetic: mask_estimator.h): the argument checks, the parameters as
// the routes read them and the convolution route, shared by the CPU (mask_estimator.cpp) and CUDA
// (cuda/mask_estimator_cuda.cpp) registrations.
//
// Routes, chosen by the op's `algorithm` argument:
//   "convolutions"  ATen's convolutions, layer by layer, in s's dtype (any width D, any map)
//   "kernel"        the two-launch kernel on CUDA, its emulation on the CPU (D = 32, maps within
//                   the kernel's shared memory); an error where the map does not fit
//   "auto"          on CUDA the kernel where it fits and wins (kAutoMaxPositions, kAutoMaxBatch),
//                   else the convolutions; on the CPU the convolutions
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>
#include <vector>

namespace aim {

using at::Tensor;

// The automatic choice of the kernel on CUDA: maps of at most this many positions (the top stage
// at 224 px is 7 x 7) and at most this many images.
constexpr int64_t kAutoMaxPositions = 64;
constexpr int64_t kAutoMaxBatch = 8;

// The estimator's parameters, each checked against s and cast to s's dtype (no copy when it
// already is; under autocast the module's float32 weights are cast as a convolution would).
struct EstimatorParams {
  Tensor stem_weight, stem_bias;
  std::vector<Tensor> block_weights, block_biases;  // conv1, conv2 of each block in order
  Tensor local_weight, local_bias, context_weight;
  int64_t width;  // D
};

EstimatorParams estimator_params(const Tensor& s, const Tensor& stem_weight, const Tensor& stem_bias,
                                 at::TensorList block_weights, at::TensorList block_biases,
                                 const Tensor& local_weight, const Tensor& local_bias,
                                 const Tensor& context_weight, std::string_view algorithm);

// Whether the kernel route takes this input: float32, float64, float16 or bfloat16, width 32, at
// most kMaxBlocks blocks, the map within `shared_bytes` of shared memory per block (the kernel's
// kMaxSharedBytes, or the device's smaller limit). With `why`, the reason it does not.
bool kernel_takes(const Tensor& s, const EstimatorParams& p, int64_t shared_bytes, std::string* why = nullptr);

// Whether `algorithm` takes the kernel route: "kernel" always (an error naming the reason where
// the kernel cannot run the input), "auto" where the kernel takes the input and `auto_wins`,
// "convolutions" never.
bool use_kernel(const Tensor& s, const EstimatorParams& p, std::string_view algorithm, int64_t shared_bytes,
                bool auto_wins);

// The convolution route: (logits, mask), each (N, 1, H, W) in s's dtype, contiguous.
std::tuple<Tensor, Tensor> estimator_convolutions(const Tensor& s, const EstimatorParams& p);

// (logits, mask) outputs of the kernel route, (N, 1, H, W) in s's dtype, contiguous.
std::tuple<Tensor, Tensor> estimator_outputs(const Tensor& s);

}  // namespace aim
