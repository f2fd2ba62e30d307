// GELU and its derivative, shared by the CPU and CUDA kernels of aim::topdown_epilogue.
//
// The feature branch ends T_l(S_l) = GELU(LayerNorm_C(conv)) with the exact (erf) GELU:
//   gelu(y)  = y * Phi(y),                 Phi(y) = (1 + erf(y / sqrt 2)) / 2
//   gelu'(y) = Phi(y) + y * phi(y),        phi(y) = exp(-y^2 / 2) / sqrt(2 pi)
// and LayerNorm over the C channels of one pixel: xhat = (x - mean) * rstd,
// rstd = 1 / sqrt(var + eps) (biased variance), y = xhat * weight + bias. Its gradient:
//   d x = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)),   g = d y * weight.
#pragma once

#include <cmath>

#include "nearest.h"  // AIM_HOST_DEVICE

namespace aim {

template <typename acc_t>
AIM_HOST_DEVICE acc_t gaussian_cdf(acc_t y) {
  return acc_t(0.5) * (acc_t(1) + std::erf(y * acc_t(0.70710678118654752440)));
}

template <typename acc_t>
AIM_HOST_DEVICE acc_t gelu(acc_t y) {
  return y * gaussian_cdf(y);
}

template <typename acc_t>
AIM_HOST_DEVICE acc_t gelu_grad(acc_t y) {
  return gaussian_cdf(y) + y * std::exp(acc_t(-0.5) * y * y) * acc_t(0.39894228040143267794);
}

}  // namespace aim
