// CUDA registration of aim::topdown_epilogue: argument checks and layouts here, the kernels in
// topdown_epilogue_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../topdown_epilogue.h"
#include "cuda_args.h"
#include "launch.h"

namespace aim {
namespace {

std::tuple<Tensor, Tensor, Tensor> topdown_epilogue_cuda(const Tensor& conv, const Tensor& weight,
                                                         const Tensor& bias, const Tensor& logits,
                                                         const std::optional<Tensor>& coarse,
                                                         const std::optional<Tensor>& noise,
                                                         double temperature, double eps) {
  check_epilogue_inputs(conv, weight, bias, logits, coarse, noise, temperature, eps);
  const c10::cuda::CUDAGuard guard(conv.device());
  const EpilogueForward b = epilogue_forward_layout(conv, weight, bias, coarse);
  const MaskArgs mask(logits, noise, temperature);
  cuda::epilogue_forward(kernel_dtype(conv.scalar_type()), merge_shape(b.input, b.coarse), mask.input,
                         b.input.const_data_ptr(), b.weight.const_data_ptr(), b.bias.const_data_ptr(),
                         /*conv_bias=*/nullptr, eps, data_or_null(b.coarse), b.out.mutable_data_ptr(),
                         b.mask.mutable_data_ptr(), b.features.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.out, b.mask, b.features};
}

std::tuple<Tensor, Tensor> topdown_epilogue_inference_cuda(const Tensor& conv, const Tensor& weight,
                                                           const Tensor& bias, const Tensor& logits,
                                                           const std::optional<Tensor>& coarse, double eps,
                                                           const std::optional<Tensor>& conv_bias) {
  check_epilogue_inputs(conv, weight, bias, logits, coarse, std::nullopt, 1.0, eps);
  check_conv_bias(conv, conv_bias, "topdown_epilogue_inference");
  const c10::cuda::CUDAGuard guard(conv.device());
  const EpilogueForward b =
      epilogue_forward_layout(conv, weight, bias, coarse, /*with_features=*/false, conv_bias);
  const MaskArgs mask(logits, std::nullopt, 1.0);
  cuda::epilogue_forward(kernel_dtype(conv.scalar_type()), merge_shape(b.input, b.coarse), mask.input,
                         b.input.const_data_ptr(), b.weight.const_data_ptr(), b.bias.const_data_ptr(),
                         data_or_null(b.conv_bias), eps, data_or_null(b.coarse), b.out.mutable_data_ptr(),
                         b.mask.mutable_data_ptr(), /*features=*/nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.out, b.mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topdown_epilogue_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
    const std::optional<Tensor>& grad_features, const Tensor& conv, const Tensor& weight,
    const Tensor& bias, const Tensor& logits, const std::optional<Tensor>& noise,
    double temperature, double eps, at::IntArrayRef coarse_size) {
  check_epilogue_backward_inputs(grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise,
                                 temperature, eps, coarse_size);
  const c10::cuda::CUDAGuard guard(conv.device());
  const EpilogueBackward b = epilogue_backward_layout(grad_out, grad_features, conv, weight, bias, coarse_size);
  const MaskGradArgs mask(logits, noise, temperature, grad_mask);
  const cuda::MergeShape shape = merge_shape(b.input, b.grad_coarse);
  Tensor workspace = at::empty({cuda::epilogue_workspace_elements(shape)}, b.weight.options());
  cuda::epilogue_backward(kernel_dtype(conv.scalar_type()), shape, mask.input, b.grad_out.const_data_ptr(),
                          data_or_null(mask.grad_mask), dtype_or_float(mask.grad_mask),
                          data_or_null(b.grad_features), b.input.const_data_ptr(), b.weight.const_data_ptr(),
                          b.bias.const_data_ptr(), eps, b.grad_input.mutable_data_ptr(),
                          b.grad_weight.mutable_data_ptr(), b.grad_bias.mutable_data_ptr(),
                          mask.grad_logits.mutable_data_ptr(),
                          coarse_size.empty() ? nullptr : b.grad_coarse.mutable_data_ptr(),
                          workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return epilogue_grads(b, weight, bias, mask.grad_logits_like(logits));
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) {
  m.impl("topdown_epilogue", &topdown_epilogue_cuda);
  m.impl("topdown_epilogue_inference", &topdown_epilogue_inference_cuda);
  m.impl("topdown_epilogue_backward", &topdown_epilogue_backward_cuda);
}

}  // namespace aim
