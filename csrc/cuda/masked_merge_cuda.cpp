// CUDA registration of aim::masked_merge: tensor checks and layout handling here,
// the kernels in masked_merge_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../masked_merge.h"
#include "masked_merge_launch.h"

namespace aim {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default: TORCH_CHECK(false, "masked_merge: unsupported dtype ", t);
  }
}

cuda::MergeShape merge_shape(const Tensor& feat, int64_t h, int64_t w) {
  return {feat.size(0), feat.size(1), feat.size(2), feat.size(3), h, w,
          merge_memory_format(feat) == at::MemoryFormat::ChannelsLast};
}

std::tuple<Tensor, Tensor> masked_merge_cuda(const Tensor& feat, const Tensor& logits,
                                             const std::optional<Tensor>& coarse,
                                             const std::optional<Tensor>& noise, double temperature) {
  const c10::cuda::CUDAGuard guard(feat.device());
  const ForwardBuffers b = prepare_forward(feat, logits, coarse, noise, temperature);
  const bool has_coarse = b.coarse.defined();
  cuda::launch_forward(kernel_dtype(feat.scalar_type()),
                       merge_shape(b.feat, has_coarse ? b.coarse.size(2) : 0, has_coarse ? b.coarse.size(3) : 0),
                       b.feat.const_data_ptr(), b.z.const_data_ptr(),
                       has_coarse ? b.coarse.const_data_ptr() : nullptr, b.out.mutable_data_ptr(),
                       b.mask.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.out, b.mask};
}

std::tuple<Tensor, Tensor, Tensor> masked_merge_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask, const Tensor& feat,
    const Tensor& logits, const std::optional<Tensor>& noise, double temperature,
    at::IntArrayRef coarse_size) {
  const c10::cuda::CUDAGuard guard(feat.device());
  const BackwardBuffers b = prepare_backward(grad_out, grad_mask, feat, logits, noise, temperature, coarse_size);
  cuda::launch_backward(kernel_dtype(feat.scalar_type()), merge_shape(b.feat, b.h, b.w),
                        b.grad_out.const_data_ptr(), b.grad_mask.const_data_ptr(), b.feat.const_data_ptr(),
                        b.z.const_data_ptr(), noise.has_value(), temperature, b.grad_feat.mutable_data_ptr(),
                        b.grad_z.mutable_data_ptr(), b.h > 0 ? b.grad_coarse.mutable_data_ptr() : nullptr,
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.grad_feat, grad_logits_from(b.grad_z, logits), b.grad_coarse};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CUDA, m) {
  m.impl("masked_merge", &masked_merge_cuda);
  m.impl("masked_merge_backward", &masked_merge_backward_cuda);
}

}  // namespace aim
