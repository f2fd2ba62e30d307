// CPU kernels of aim::topdown_epilogue and aim::topdown_epilogue_backward.
//
// Work goes in tiles of kTile pixels of one image. A tile is walked channel by channel, so the
// same loops serve NCHW (a tile is a contiguous run of each channel plane) and channels_last (a
// tile is kTile contiguous rows of C), and the per-pixel LayerNorm statistics stay in small
// arrays. The weight and bias gradients are summed per tile and then over tiles in a fixed
// order, so the backward gives the same bits whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../gumbel.h"
#include "../layer_norm_gelu.h"
#include "../nearest.h"
#include "../topdown_epilogue.h"
#include "merge_common.h"

namespace aim {
namespace {

constexpr int64_t kTile = 64;

// Element (n, c, p) of an (N, C, H*W) map at n * C * HW + c * cs + p * ps.
struct Tiles {
  int64_t N, C, HW, W, cs, ps;
  int64_t per_image() const { return (HW + kTile - 1) / kTile; }
  int64_t count() const { return N * per_image(); }
  int64_t grain() const { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, kTile * C)); }

  Tiles(const Tensor& t)
      : N(t.size(0)), C(t.size(1)), HW(t.size(2) * t.size(3)), W(t.size(3)),
        cs(merge_memory_format(t) == at::MemoryFormat::ChannelsLast ? 1 : HW),
        ps(merge_memory_format(t) == at::MemoryFormat::ChannelsLast ? t.size(1) : 1) {}
};

// Element (c, i) of a tile of conv, plus the convolution's bias where given (evaluation), the sum
// rounded to conv's dtype as a convolution with its bias writes it (one rounding on every path).
template <typename scalar_t, typename acc_t>
acc_t conv_value(const Tiles& g, const scalar_t* x, const acc_t* conv_bias, int64_t c, int64_t i) {
  const acc_t v = static_cast<acc_t>(x[c * g.cs + i * g.ps]);
  return conv_bias == nullptr ? v : static_cast<acc_t>(static_cast<scalar_t>(v + conv_bias[c]));
}

// The per-pixel LayerNorm statistics of one tile, by two passes over the channels.
template <typename scalar_t, typename acc_t>
void tile_statistics(const Tiles& g, const scalar_t* x, int64_t len, double eps, acc_t* mean, acc_t* rstd,
                     const acc_t* conv_bias = nullptr) {
  std::fill(mean, mean + len, acc_t(0));
  std::fill(rstd, rstd + len, acc_t(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t i = 0; i < len; ++i) mean[i] += conv_value(g, x, conv_bias, c, i);
  for (int64_t i = 0; i < len; ++i) mean[i] /= static_cast<acc_t>(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t i = 0; i < len; ++i) {
      const acc_t d = conv_value(g, x, conv_bias, c, i) - mean[i];
      rstd[i] += d * d;
    }
  }
  for (int64_t i = 0; i < len; ++i)
    rstd[i] = acc_t(1) / std::sqrt(rstd[i] / static_cast<acc_t>(g.C) + static_cast<acc_t>(eps));
}

template <typename scalar_t>
void forward_kernel(const EpilogueForward& b, const Tensor& preactivation, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiles g(b.input);
  const bool has_coarse = b.coarse.defined();
  const int64_t h = has_coarse ? b.coarse.size(2) : 0, w = has_coarse ? b.coarse.size(3) : 0;
  const std::vector<int64_t> src_h = has_coarse ? nearest_source_indices(h, b.input.size(2)) : std::vector<int64_t>{};
  const std::vector<int64_t> src_w = has_coarse ? nearest_source_indices(w, g.W) : std::vector<int64_t>{};
  const int64_t ccs = g.cs == 1 ? 1 : h * w, cps = g.cs == 1 ? g.C : 1;  // coarse strides

  const scalar_t* conv = b.input.const_data_ptr<scalar_t>();
  const scalar_t* coarse = has_coarse ? b.coarse.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* weight = b.weight.const_data_ptr<acc_t>();
  const acc_t* bias = b.bias.const_data_ptr<acc_t>();
  const acc_t* conv_bias = b.conv_bias.defined() ? b.conv_bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* z = preactivation.const_data_ptr<acc_t>();
  scalar_t* out = b.out.mutable_data_ptr<scalar_t>();
  scalar_t* features = b.features.defined() ? b.features.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* mask = b.mask.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, g.count(), g.grain(), [&](int64_t begin, int64_t end) {
    acc_t mean[kTile], rstd[kTile], m[kTile];
    int64_t source[kTile];  // coarse pixel of each fine pixel
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.per_image(), p0 = (t % g.per_image()) * kTile;
      const int64_t len = std::min(kTile, g.HW - p0);
      const int64_t offset = n * g.C * g.HW + p0 * g.ps;
      tile_statistics(g, conv + offset, len, eps, mean, rstd, conv_bias);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t p = n * g.HW + p0 + i;
        m[i] = z[p] >= 0 ? acc_t(1) : acc_t(0);
        mask[p] = static_cast<scalar_t>(m[i]);
        if (has_coarse) source[i] = src_h[(p0 + i) / g.W] * w + src_w[(p0 + i) % g.W];
      }
      const scalar_t* coarse_n = has_coarse ? coarse + n * g.C * h * w : nullptr;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t i = 0; i < len; ++i) {
          const int64_t k = offset + c * g.cs + i * g.ps;
          const acc_t y = (conv_value(g, conv + offset, conv_bias, c, i) - mean[i]) * rstd[i] * weight[c] + bias[c];
          const scalar_t f = static_cast<scalar_t>(gelu(y));
          if (features != nullptr) features[k] = f;
          // Round as the reference does: features, then features * mask, then + coarse.
          const scalar_t masked = static_cast<scalar_t>(static_cast<acc_t>(f) * m[i]);
          out[k] = has_coarse ? static_cast<scalar_t>(static_cast<acc_t>(masked) +
                                                      static_cast<acc_t>(coarse_n[c * ccs + source[i] * cps]))
                              : masked;
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const EpilogueBackward& b, const MaskGrads& mask, bool training, double temperature,
                     double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiles g(b.input);
  const scalar_t* conv = b.input.const_data_ptr<scalar_t>();
  const scalar_t* grad_out = b.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* grad_features = b.grad_features.defined() ? b.grad_features.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* weight = b.weight.const_data_ptr<acc_t>();
  const acc_t* bias = b.bias.const_data_ptr<acc_t>();
  const acc_t* z = mask.z.const_data_ptr<acc_t>();
  const acc_t* grad_mask = mask.grad_mask.const_data_ptr<acc_t>();
  scalar_t* grad_conv = b.grad_input.mutable_data_ptr<scalar_t>();
  acc_t* grad_z = mask.grad_z.mutable_data_ptr<acc_t>();
  // Per-tile sums of d weight (row 2t) and d bias (row 2t + 1).
  Tensor partials = at::empty({g.count() * 2, g.C}, b.weight.options());
  acc_t* part = partials.mutable_data_ptr<acc_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(g.C);

  at::parallel_for(0, g.count(), g.grain(), [&](int64_t begin, int64_t end) {
    acc_t mean[kTile], rstd[kTile], m[kTile], s1[kTile], s2[kTile], dot[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.per_image(), p0 = (t % g.per_image()) * kTile;
      const int64_t len = std::min(kTile, g.HW - p0);
      const int64_t offset = n * g.C * g.HW + p0 * g.ps;
      tile_statistics(g, conv + offset, len, eps, mean, rstd);
      for (int64_t i = 0; i < len; ++i) {
        m[i] = z[n * g.HW + p0 + i] >= 0 ? acc_t(1) : acc_t(0);
        s1[i] = s2[i] = dot[i] = acc_t(0);
      }
      // d y of element k: (d out * mask + d features) * gelu'(y).
      auto grad_y = [&](int64_t k, acc_t y, acc_t mi) {
        acc_t gf = static_cast<acc_t>(grad_out[k]) * mi;
        if (grad_features != nullptr) gf += static_cast<acc_t>(grad_features[k]);
        return gf * gelu_grad(y);
      };
      acc_t* pw = part + 2 * t * g.C;
      acc_t* pb = pw + g.C;
      for (int64_t c = 0; c < g.C; ++c) {
        acc_t sw = 0, sb = 0;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t k = offset + c * g.cs + i * g.ps;
          const acc_t xhat = (static_cast<acc_t>(conv[k]) - mean[i]) * rstd[i];
          const acc_t y = xhat * weight[c] + bias[c];
          const acc_t gy = grad_y(k, y, m[i]);
          const acc_t gx = gy * weight[c];
          s1[i] += gx;
          s2[i] += gx * xhat;
          // The mask's gradient sees the features as the forward stored them.
          dot[i] += static_cast<acc_t>(grad_out[k]) * static_cast<acc_t>(static_cast<scalar_t>(gelu(y)));
          sw += gy * xhat;
          sb += gy;
        }
        pw[c] = sw;
        pb[c] = sb;
      }
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t i = 0; i < len; ++i) {
          const int64_t k = offset + c * g.cs + i * g.ps;
          const acc_t xhat = (static_cast<acc_t>(conv[k]) - mean[i]) * rstd[i];
          const acc_t gx = grad_y(k, xhat * weight[c] + bias[c], m[i]) * weight[c];
          grad_conv[k] = static_cast<scalar_t>(rstd[i] * (gx - s1[i] * inv_c - xhat * s2[i] * inv_c));
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        const int64_t p = n * g.HW + p0 + i;
        grad_z[p] = training ? straight_through_grad<acc_t>(dot[i] + grad_mask[p], z[p], temperature) : acc_t(0);
      }
    }
  });
  // The tile sums, added in tile order for each channel.
  acc_t* gw = b.grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = b.grad_bias.mutable_data_ptr<acc_t>();
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t sw = 0, sb = 0;
      for (int64_t t = 0; t < g.count(); ++t) {
        sw += part[2 * t * g.C + c];
        sb += part[(2 * t + 1) * g.C + c];
      }
      gw[c] = sw;
      gb[c] = sb;
    }
  });
  if (b.h > 0) nearest_resize_adjoint_cpu(b.grad_out, b.grad_coarse);
}

std::tuple<Tensor, Tensor, Tensor> topdown_epilogue_cpu(const Tensor& conv, const Tensor& weight,
                                                        const Tensor& bias, const Tensor& logits,
                                                        const std::optional<Tensor>& coarse,
                                                        const std::optional<Tensor>& noise,
                                                        double temperature, double eps) {
  check_epilogue_inputs(conv, weight, bias, logits, coarse, noise, temperature, eps);
  const EpilogueForward b = epilogue_forward_layout(conv, weight, bias, coarse);
  const Tensor z = mask_preactivation(logits, noise, temperature, acc_dtype(conv));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "topdown_epilogue_cpu",
                                  [&] { forward_kernel<scalar_t>(b, z, eps); });
  return {b.out, b.mask, b.features};
}

std::tuple<Tensor, Tensor> topdown_epilogue_inference_cpu(const Tensor& conv, const Tensor& weight,
                                                          const Tensor& bias, const Tensor& logits,
                                                          const std::optional<Tensor>& coarse, double eps,
                                                          const std::optional<Tensor>& conv_bias) {
  check_epilogue_inputs(conv, weight, bias, logits, coarse, std::nullopt, 1.0, eps);
  check_conv_bias(conv, conv_bias, "topdown_epilogue_inference");
  const EpilogueForward b =
      epilogue_forward_layout(conv, weight, bias, coarse, /*with_features=*/false, conv_bias);
  const Tensor z = mask_preactivation(logits, std::nullopt, 1.0, acc_dtype(conv));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "topdown_epilogue_inference_cpu",
                                  [&] { forward_kernel<scalar_t>(b, z, eps); });
  return {b.out, b.mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topdown_epilogue_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask,
    const std::optional<Tensor>& grad_features, const Tensor& conv, const Tensor& weight,
    const Tensor& bias, const Tensor& logits, const std::optional<Tensor>& noise,
    double temperature, double eps, at::IntArrayRef coarse_size) {
  check_epilogue_backward_inputs(grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise,
                                 temperature, eps, coarse_size);
  const EpilogueBackward b = epilogue_backward_layout(grad_out, grad_features, conv, weight, bias, coarse_size);
  const MaskGrads m = mask_grads(grad_mask, logits, noise, temperature, acc_dtype(conv));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "topdown_epilogue_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(b, m, noise.has_value(), temperature, eps); });
  return epilogue_grads(b, weight, bias, grad_logits_from(m.grad_z, logits));
}

}  // namespace

TORCH_LIBRARY_IMPL(aim, CPU, m) {
  m.impl("topdown_epilogue", &topdown_epilogue_cpu);
  m.impl("topdown_epilogue_inference", &topdown_epilogue_inference_cpu);
  m.impl("topdown_epilogue_backward", &topdown_epilogue_backward_cpu);
}

}  // namespace aim
