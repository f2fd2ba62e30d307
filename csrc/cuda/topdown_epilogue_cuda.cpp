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
  const auto fmt = merge_memory_format(conv);
  const auto acc = acc_dtype(conv);
  const Tensor x = conv.contiguous(fmt);
  const Tensor c = coarse.has_value() ? coarse->contiguous(fmt) : Tensor();
  const Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const MaskArgs mask_in(logits, noise, temperature);
  Tensor out = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  Tensor features = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  Tensor mask = at::empty({conv.size(0), 1, conv.size(2), conv.size(3)}, conv.options().memory_format(fmt));
  cuda::epilogue_forward(kernel_dtype(conv.scalar_type()), merge_shape(x, c), mask_in.input, x.const_data_ptr(),
                         w.const_data_ptr(), b.const_data_ptr(), eps, c.defined() ? c.const_data_ptr() : nullptr,
                         out.mutable_data_ptr(), mask.mutable_data_ptr(), features.mutable_data_ptr(),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask, features};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topdown_epilogue_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
    const std::optional<Tensor>& grad_features, const Tensor& conv, const Tensor& weight,
    const Tensor& bias, const Tensor& logits, const std::optional<Tensor>& noise,
    double temperature, double eps, at::IntArrayRef coarse_size) {
  check_epilogue_backward_inputs(grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise,
                                 temperature, eps, coarse_size);
  const c10::cuda::CUDAGuard guard(conv.device());
  const auto fmt = merge_memory_format(conv);
  const auto acc = acc_dtype(conv);
  const Tensor x = conv.contiguous(fmt);
  const Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const Tensor go = grad_out.to(conv.scalar_type()).contiguous(fmt);
  const Tensor gf = grad_features.has_value() ? grad_features->to(conv.scalar_type()).contiguous(fmt) : Tensor();
  const Tensor gm = grad_mask.has_value() ? readable_pixels(*grad_mask) : Tensor();
  const MaskArgs mask_in(logits, noise, temperature);
  Tensor grad_conv = at::empty(conv.sizes(), conv.options().memory_format(fmt));
  Tensor grad_weight = at::empty({conv.size(1)}, w.options());
  Tensor grad_bias = at::empty({conv.size(1)}, w.options());
  // In the dtype the kernel writes (the logits' own, unless it had to widen them).
  Tensor grad_logits = at::empty(logits.sizes(), mask_in.logits.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_coarse = coarse_size.empty()
                           ? at::empty({0}, conv.options())
                           : at::empty({conv.size(0), conv.size(1), coarse_size[0], coarse_size[1]},
                                       conv.options().memory_format(fmt));
  const cuda::MergeShape shape = merge_shape(x, grad_coarse);
  Tensor workspace = at::empty({cuda::epilogue_workspace_elements(shape)}, w.options());
  cuda::epilogue_backward(kernel_dtype(conv.scalar_type()), shape, mask_in.input, go.const_data_ptr(),
                          gm.defined() ? gm.const_data_ptr() : nullptr,
                          gm.defined() ? kernel_dtype(gm.scalar_type()) : cuda::DType::Float,
                          gf.defined() ? gf.const_data_ptr() : nullptr, x.const_data_ptr(), w.const_data_ptr(),
                          b.const_data_ptr(), eps, grad_conv.mutable_data_ptr(), grad_weight.mutable_data_ptr(),
                          grad_bias.mutable_data_ptr(), grad_logits.mutable_data_ptr(),
                          coarse_size.empty() ? nullptr : grad_coarse.mutable_data_ptr(), workspace.mutable_data_ptr(),
                          c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_conv, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type()),
          grad_logits.to(logits.scalar_type()), grad_coarse};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) {
  m.impl("topdown_epilogue", &topdown_epilogue_cuda);
  m.impl("topdown_epilogue_backward", &topdown_epilogue_backward_cuda);
}

}  // namespace aim
