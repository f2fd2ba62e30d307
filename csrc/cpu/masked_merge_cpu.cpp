// CPU kernels of aim::masked_merge and aim::masked_merge_backward.
//
// One pass over the feature map in its own memory format: planes of H*W for NCHW,
// rows of C for channels_last. Arithmetic is in the op-math type (float for
// half/bfloat16), so results round exactly as the PyTorch reference does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../gumbel.h"
#include "../masked_merge.h"
#include "../nearest.h"
#include "merge_common.h"

namespace aim {
namespace {

// Work items per parallel chunk, so that small maps are not split across threads.
constexpr int64_t kGrainElements = 1 << 15;

struct Geometry {
  int64_t N, C, H, W, h, w;
  bool channels_last;
  std::vector<int64_t> src_h, src_w;  // nearest source row/column of each output row/column

  Geometry(const Tensor& feat, int64_t coarse_h, int64_t coarse_w)
      : N(feat.size(0)), C(feat.size(1)), H(feat.size(2)), W(feat.size(3)), h(coarse_h),
        w(coarse_w), channels_last(merge_memory_format(feat) == at::MemoryFormat::ChannelsLast) {
    if (h > 0) {
      src_h = nearest_source_indices(h, H);
      src_w = nearest_source_indices(w, W);
    }
  }
  int64_t HW() const { return H * W; }
  bool has_coarse() const { return h > 0; }
  int64_t grain(int64_t per_item) const { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, per_item)); }
};

// [lo, hi) of the output rows whose nearest source is row i, for every coarse row i.
std::vector<std::pair<int64_t, int64_t>> footprints(int64_t in_size, int64_t out_size) {
  const float scale = nearest_scale(in_size, out_size);
  std::vector<std::pair<int64_t, int64_t>> fp(in_size);
  for (int64_t i = 0; i < in_size; ++i)
    fp[i] = {footprint_start(i, in_size, out_size, scale), footprint_start(i + 1, in_size, out_size, scale)};
  return fp;
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* feat, const typename at::opmath_type<scalar_t>* z,
                    const scalar_t* coarse, scalar_t* out, scalar_t* mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.HW(), C = g.C;
  for (int64_t i = 0; i < g.N * HW; ++i) mask[i] = static_cast<scalar_t>(z[i] >= 0 ? 1 : 0);

  if (g.channels_last) {
    at::parallel_for(0, g.N * HW, g.grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t m = static_cast<acc_t>(mask[p]);
        const scalar_t* f = feat + p * C;
        scalar_t* o = out + p * C;
        if (!g.has_coarse()) {
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(static_cast<acc_t>(f[c]) * m);
          continue;
        }
        const int64_t n = p / HW, y = (p % HW) / g.W, x = p % g.W;
        const scalar_t* cp = coarse + ((n * g.h + g.src_h[y]) * g.w + g.src_w[x]) * C;
        for (int64_t c = 0; c < C; ++c) {
          // Round the product first, as the reference does (feat * mask, then + coarse).
          const scalar_t masked = static_cast<scalar_t>(static_cast<acc_t>(f[c]) * m);
          o[c] = static_cast<scalar_t>(static_cast<acc_t>(masked) + static_cast<acc_t>(cp[c]));
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.N * C, g.grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const scalar_t* f = feat + nc * HW;
      const scalar_t* m = mask + (nc / C) * HW;
      scalar_t* o = out + nc * HW;
      if (!g.has_coarse()) {
        for (int64_t i = 0; i < HW; ++i)
          o[i] = static_cast<scalar_t>(static_cast<acc_t>(f[i]) * static_cast<acc_t>(m[i]));
        continue;
      }
      const scalar_t* cp = coarse + nc * g.h * g.w;
      for (int64_t y = 0; y < g.H; ++y) {
        const scalar_t* crow = cp + g.src_h[y] * g.w;
        for (int64_t x = 0; x < g.W; ++x) {
          const int64_t i = y * g.W + x;
          const scalar_t masked = static_cast<scalar_t>(static_cast<acc_t>(f[i]) * static_cast<acc_t>(m[i]));
          o[i] = static_cast<scalar_t>(static_cast<acc_t>(masked) + static_cast<acc_t>(crow[g.src_w[x]]));
        }
      }
    }
  });
}

// The adjoint of the nearest resize: each coarse pixel sums its own footprint, no two threads
// write the same element, so the result does not depend on the thread count.
template <typename scalar_t>
void coarse_adjoint(const Geometry& g, const scalar_t* grad_out, scalar_t* grad_coarse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.HW(), C = g.C;
  if (g.channels_last) {
    const auto rows = footprints(g.h, g.H);
    at::parallel_for(0, g.N * g.h, g.grain(g.w * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.w * C);
      for (int64_t ni = begin; ni < end; ++ni) {
        const int64_t n = ni / g.h, i = ni % g.h;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t y = rows[i].first; y < rows[i].second; ++y) {
          for (int64_t x = 0; x < g.W; ++x) {
            const scalar_t* go = grad_out + ((n * g.H + y) * g.W + x) * C;
            acc_t* a = acc.data() + g.src_w[x] * C;
            for (int64_t c = 0; c < C; ++c) a[c] += static_cast<acc_t>(go[c]);
          }
        }
        scalar_t* gc = grad_coarse + ni * g.w * C;
        for (int64_t k = 0; k < g.w * C; ++k) gc[k] = static_cast<scalar_t>(acc[k]);
      }
    });
    return;
  }
  const auto rows = footprints(g.h, g.H);
  at::parallel_for(0, g.N * C, g.grain(HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.w);
    for (int64_t nc = begin; nc < end; ++nc) {
      const scalar_t* go = grad_out + nc * HW;
      scalar_t* gc = grad_coarse + nc * g.h * g.w;
      for (int64_t i = 0; i < g.h; ++i) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t y = rows[i].first; y < rows[i].second; ++y)
          for (int64_t x = 0; x < g.W; ++x) acc[g.src_w[x]] += static_cast<acc_t>(go[y * g.W + x]);
        for (int64_t j = 0; j < g.w; ++j) gc[i * g.w + j] = static_cast<scalar_t>(acc[j]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad_out, const typename at::opmath_type<scalar_t>* grad_mask,
                     const scalar_t* feat, const typename at::opmath_type<scalar_t>* z, bool training,
                     double temperature, scalar_t* grad_feat, typename at::opmath_type<scalar_t>* grad_z,
                     scalar_t* grad_coarse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.HW(), C = g.C;

  if (g.channels_last) {
    at::parallel_for(0, g.N * HW, g.grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t m = z[p] >= 0 ? acc_t(1) : acc_t(0);
        const scalar_t* go = grad_out + p * C;
        const scalar_t* f = feat + p * C;
        scalar_t* gf = grad_feat + p * C;
        acc_t dot = 0;
        for (int64_t c = 0; c < C; ++c) {
          gf[c] = static_cast<scalar_t>(static_cast<acc_t>(go[c]) * m);
          dot += static_cast<acc_t>(go[c]) * static_cast<acc_t>(f[c]);
        }
        grad_z[p] = training ? straight_through_grad<acc_t>(dot + grad_mask[p], z[p], temperature) : acc_t(0);
      }
    });
    if (g.has_coarse()) coarse_adjoint(g, grad_out, grad_coarse);
    return;
  }

  at::parallel_for(0, g.N * C, g.grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const acc_t* zn = z + (nc / C) * HW;
      const scalar_t* go = grad_out + nc * HW;
      scalar_t* gf = grad_feat + nc * HW;
      for (int64_t i = 0; i < HW; ++i)
        gf[i] = static_cast<scalar_t>(static_cast<acc_t>(go[i]) * (zn[i] >= 0 ? acc_t(1) : acc_t(0)));
    }
  });
  if (training) {
    // Sum over channels in blocks of pixels: each block's accumulator stays in cache.
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (HW + kBlock - 1) / kBlock;
    at::parallel_for(0, g.N * blocks, g.grain(kBlock * C), [&](int64_t begin, int64_t end) {
      acc_t dot[kBlock];
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t n = nb / blocks, lo = (nb % blocks) * kBlock, len = std::min(kBlock, HW - lo);
        std::fill(dot, dot + len, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* go = grad_out + (n * C + c) * HW + lo;
          const scalar_t* f = feat + (n * C + c) * HW + lo;
          for (int64_t i = 0; i < len; ++i) dot[i] += static_cast<acc_t>(go[i]) * static_cast<acc_t>(f[i]);
        }
        for (int64_t i = 0; i < len; ++i) {
          const int64_t p = n * HW + lo + i;
          grad_z[p] = straight_through_grad<acc_t>(dot[i] + grad_mask[p], z[p], temperature);
        }
      }
    });
  } else {
    std::fill(grad_z, grad_z + g.N * HW, acc_t(0));
  }
  if (g.has_coarse()) coarse_adjoint(g, grad_out, grad_coarse);
}

std::tuple<Tensor, Tensor> masked_merge_cpu(const Tensor& feat, const Tensor& logits,
                                            const std::optional<Tensor>& coarse,
                                            const std::optional<Tensor>& noise, double temperature) {
  check_merge_inputs(feat, logits, coarse, noise, temperature);
  const MergeForward b = merge_forward_layout(feat, coarse);
  const Tensor z = mask_preactivation(logits, noise, temperature, acc_dtype(feat));
  const bool has_coarse = b.coarse.defined();
  const Geometry g(b.input, has_coarse ? b.coarse.size(2) : 0, has_coarse ? b.coarse.size(3) : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "masked_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(g, b.input.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(),
                             has_coarse ? b.coarse.const_data_ptr<scalar_t>() : nullptr,
                             b.out.mutable_data_ptr<scalar_t>(), b.mask.mutable_data_ptr<scalar_t>());
  });
  return {b.out, b.mask};
}

std::tuple<Tensor, Tensor, Tensor> masked_merge_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_mask, const Tensor& feat,
    const Tensor& logits, const std::optional<Tensor>& noise, double temperature,
    at::IntArrayRef coarse_size) {
  check_merge_backward_inputs(grad_out, grad_mask, feat, logits, noise, temperature, coarse_size);
  const MergeBackward b = merge_backward_layout(grad_out, feat, coarse_size);
  const MaskGrads m = mask_grads(grad_mask, logits, noise, temperature, acc_dtype(feat));
  const Geometry g(b.input, b.h, b.w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "masked_merge_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(g, b.grad_out.const_data_ptr<scalar_t>(), m.grad_mask.const_data_ptr<acc_t>(),
                              b.input.const_data_ptr<scalar_t>(), m.z.const_data_ptr<acc_t>(), noise.has_value(),
                              temperature, b.grad_input.mutable_data_ptr<scalar_t>(),
                              m.grad_z.mutable_data_ptr<acc_t>(),
                              g.has_coarse() ? b.grad_coarse.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {b.grad_input, grad_logits_from(m.grad_z, logits), b.grad_coarse};
}

}  // namespace

void nearest_resize_adjoint_cpu(const Tensor& grad_out, const Tensor& grad_coarse) {
  const Geometry g(grad_out, grad_coarse.size(2), grad_coarse.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "nearest_resize_adjoint_cpu", [&] {
    coarse_adjoint<scalar_t>(g, grad_out.const_data_ptr<scalar_t>(), grad_coarse.mutable_data_ptr<scalar_t>());
  });
}

TORCH_LIBRARY_IMPL(aim, CPU, m) {
  m.impl("masked_merge", &masked_merge_cpu);
  m.impl("masked_merge_backward", &masked_merge_backward_cpu);
}

}  // namespace aim
