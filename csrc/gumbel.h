// The straight-through gradient of the binary Gumbel mask (paper Eq. 2), shared by every kernel.
//
// Forward: mask = 1[z >= 0] with z = (logits + noise) / temperature. Backward: the gradient of
// soft = sigmoid(z) with respect to the logits, d logits = upstream * s * (1 - s) / temperature,
// where upstream = d mask (from the merge: sum over C of grad_out * feat; plus grad_mask).
#pragma once

#include <cmath>

#include "nearest.h"  // AIM_HOST_DEVICE

namespace aim {

template <typename acc_t>
AIM_HOST_DEVICE acc_t straight_through_grad(acc_t upstream, acc_t z, acc_t temperature) {
  const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
  return upstream * s * (acc_t(1) - s) / temperature;
}

}  // namespace aim
