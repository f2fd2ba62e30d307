// CUDA registration of aim::mask_estimator: the route chosen here (mask_estimator_op.h), the
// kernels in mask_estimator_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../mask_estimator.h"
#include "../mask_estimator_op.h"
#include "cuda_args.h"
#include "launch.h"

namespace aim {
namespace {

std::tuple<Tensor, Tensor> run_kernel(const Tensor& s, const EstimatorParams& p) {
  auto [logits, mask] = estimator_outputs(s);
  if (s.size(0) == 0) return {logits, mask};
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3);
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor partials = at::empty({cuda::estimator_partials_elements(N, C, H, W)}, s.options().dtype(acc));
  std::vector<Tensor> kept;  // contiguous parameters, alive until the launch is queued
  const auto data = [&](const Tensor& t) {
    kept.push_back(t.contiguous());
    return kept.back().const_data_ptr();
  };
  cuda::EstimatorArgs a{};
  a.N = N, a.C = C, a.H = H, a.W = W;
  a.sN = s.stride(0), a.sC = s.stride(1), a.sH = s.stride(2), a.sW = s.stride(3);
  a.s = s.const_data_ptr();
  a.stem_weight = data(p.stem_weight);
  a.stem_bias = data(p.stem_bias);
  a.convs = static_cast<int>(p.block_weights.size());
  for (int i = 0; i < a.convs; ++i) {
    a.conv_weight[i] = data(p.block_weights[i]);
    a.conv_bias[i] = data(p.block_biases[i]);
  }
  a.local_weight = data(p.local_weight);
  a.local_bias = data(p.local_bias);
  a.context_weight = data(p.context_weight);
  a.partials = partials.mutable_data_ptr();
  a.logits = logits.mutable_data_ptr();
  a.mask = mask.mutable_data_ptr();
  C10_CUDA_CHECK(cuda::mask_estimator_forward(kernel_dtype(s.scalar_type()), a, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, mask};
}

std::tuple<Tensor, Tensor> mask_estimator_cuda(const Tensor& s, const Tensor& stem_weight, const Tensor& stem_bias,
                                               at::TensorList block_weights, at::TensorList block_biases,
                                               const Tensor& local_weight, const Tensor& local_bias,
                                               const Tensor& context_weight, c10::string_view algorithm) {
  const std::string_view route(algorithm.data(), algorithm.size());
  const EstimatorParams p = estimator_params(s, stem_weight, stem_bias, block_weights, block_biases, local_weight,
                                             local_bias, context_weight, route);
  const c10::cuda::CUDAGuard guard(s.device());
  if (route == "convolutions") return estimator_convolutions(s, p);
  // The kernel's shared memory, or the device's smaller opt-in limit (99 KiB on sm_86/89).
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, s.get_device()));
  const bool wins = s.size(0) <= kAutoMaxBatch && s.size(2) * s.size(3) <= kAutoMaxPositions;
  return use_kernel(s, p, route, std::min<int64_t>(estimator::kMaxSharedBytes, optin), wins)
             ? run_kernel(s, p)
             : estimator_convolutions(s, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) { m.impl("mask_estimator", &mask_estimator_cuda); }

}  // namespace aim
