#include "merge_common.h"

#include <ATen/ATen.h>

#include "../nearest.h"

namespace aim {

Tensor mask_preactivation(const Tensor& logits, const std::optional<Tensor>& noise,
                          double temperature, at::ScalarType dtype) {
  Tensor z = logits.to(dtype);
  if (noise.has_value()) z = (z + noise->to(dtype)).div_(temperature);
  return z.reshape({logits.size(0), logits.size(2) * logits.size(3)}).contiguous();
}

MaskGrads mask_grads(const std::optional<Tensor>& grad_mask, const Tensor& logits,
                     const std::optional<Tensor>& noise, double temperature, at::ScalarType acc) {
  const int64_t n = logits.size(0), hw = logits.size(2) * logits.size(3);
  MaskGrads m;
  m.z = mask_preactivation(logits, noise, temperature, acc);
  m.grad_mask = grad_mask.has_value() ? grad_mask->to(acc).reshape({n, hw}).contiguous()
                                      : at::zeros({n, hw}, m.z.options());
  m.grad_z = at::empty({n, hw}, m.z.options());
  return m;
}

Tensor grad_logits_from(const Tensor& grad_z, const Tensor& logits) {
  return grad_z.reshape(logits.sizes()).to(logits.scalar_type());
}

std::vector<int64_t> nearest_source_indices(int64_t in_size, int64_t out_size) {
  std::vector<int64_t> src(out_size);
  const float scale = nearest_scale(in_size, out_size);
  for (int64_t d = 0; d < out_size; ++d) src[d] = nearest_source_index(d, scale, in_size);
  return src;
}

}  // namespace aim
