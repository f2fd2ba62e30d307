// CUDA registration of aim::masked_merge: argument checks and layouts here, the kernels behind the
// launchers of launch.h (masked_merge_launch.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../masked_merge.h"
#include "cuda_args.h"
#include "launch.h"

namespace aim {
namespace {

std::tuple<Tensor, Tensor> masked_merge_cuda(const Tensor& feat, const Tensor& logits,
                                             const std::optional<Tensor>& coarse,
                                             const std::optional<Tensor>& noise, double temperature) {
  check_merge_inputs(feat, logits, coarse, noise, temperature);
  const c10::cuda::CUDAGuard guard(feat.device());
  const MergeForward b = merge_forward_layout(feat, coarse);
  const MaskArgs mask(logits, noise, temperature);
  cuda::merge_forward(kernel_dtype(feat.scalar_type()), merge_shape(b.input, b.coarse), mask.input,
                      b.input.const_data_ptr(), data_or_null(b.coarse), b.out.mutable_data_ptr(),
                      b.mask.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.out, b.mask};
}

std::tuple<Tensor, Tensor, Tensor> masked_merge_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask, const Tensor& feat,
    const Tensor& logits, const std::optional<Tensor>& noise, double temperature,
    at::IntArrayRef coarse_size) {
  check_merge_backward_inputs(grad_out, grad_mask, feat, logits, noise, temperature, coarse_size);
  const c10::cuda::CUDAGuard guard(feat.device());
  const MergeBackward b = merge_backward_layout(grad_out, feat, coarse_size);
  const MaskGradArgs mask(logits, noise, temperature, grad_mask);
  cuda::merge_backward(kernel_dtype(feat.scalar_type()), merge_shape(b.input, b.grad_coarse), mask.input,
                       b.grad_out.const_data_ptr(), data_or_null(mask.grad_mask), dtype_or_float(mask.grad_mask),
                       b.input.const_data_ptr(), b.grad_input.mutable_data_ptr(),
                       mask.grad_logits.mutable_data_ptr(),
                       coarse_size.empty() ? nullptr : b.grad_coarse.mutable_data_ptr(),
                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.grad_input, mask.grad_logits_like(logits), b.grad_coarse};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) {
  m.impl("masked_merge", &masked_merge_cuda);
  m.impl("masked_merge_backward", &masked_merge_backward_cuda);
}

}  // namespace aim
