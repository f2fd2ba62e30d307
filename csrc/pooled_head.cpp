// The pooled head's ops, for evaluation: each returns a stage's contribution to mean(P_T) and its
// binary mask, without writing T_l(S_l), O_l or P_l.
//
//   aim::pooled_epilogue       from the feature branch's 3x3 convolution output (dense):
//                              pooled[n] = sum_p w(p) B(n, p) GELU(LayerNorm_C(conv))(n, p)
//                              (conv + conv_bias where given, rounded to conv's dtype)
//   aim::sparse_pooled_branch  from the backbone features S_l (sparse): the 1x1 align conv on the
//                              3x3 neighbourhoods of the active positions, the 3x3 refine conv at
//                              the active positions only, then the same LayerNorm, GELU and sum.
//
// w(p) is the position's share of mean(P_T) (its nearest-resize footprint in P_T over P_T's area),
// B = 1[logits >= 0]. pooled is (N, D) in the accumulation type (float32, float64 for float64
// input), the mask (N, 1, H, W) in the input's dtype and memory format. These are the CPU kernels:
// positions are compacted with nonzero (the host knows the count) and the work follows it. On CUDA
// the ops run Triton kernels that keep the count on the device (aim_ext/ops/pooled_head_triton.py),
// or, where Triton is missing, the PyTorch references registered in aim_ext/ops/pooled_head.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "masked_merge.h"

namespace aim {
namespace {

// Positions per matrix product of the sparse refine conv: 512 x 9 x 256 gathered values (4.5 MiB
// in float32) stay in cache; one product over every position was up to 1.5x slower on 2 cores.
constexpr int64_t kChunk = 512;

void check_like_map(const Tensor& t, const char* op, const char* name, const Tensor& map,
                    const char* map_name) {
  TORCH_CHECK(t.dim() == 4 && t.size(1) == 1 && t.size(0) == map.size(0) && t.size(2) == map.size(2) &&
                  t.size(3) == map.size(3),
              op, ": ", name, " must have shape (N, 1, H, W) = (", map.size(0), ", 1, ", map.size(2),
              ", ", map.size(3), ") to fit ", map_name, ", got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == map.device(), op, ": ", name, " is on ", t.device(), " but ", map_name,
              " is on ", map.device());
}

void check_vector(const Tensor& t, int64_t size, const char* op, const char* name, const Tensor& map) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, ",), got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == map.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              map.device());
}

// The checks both ops share: the map, the mask logits, the position weights and the LayerNorm.
void check_pooled_inputs(const Tensor& map, const char* map_name, const Tensor& logits,
                         const Tensor& pool_weight, const Tensor& ln_weight, const Tensor& ln_bias,
                         int64_t width, double eps, const char* op) {
  TORCH_CHECK(map.dim() == 4, op, ": ", map_name, " must be 4-D (N, C, H, W), got shape ", map.sizes());
  TORCH_CHECK(at::isFloatingType(map.scalar_type()), op, ": ", map_name,
              " must be a floating-point tensor, got ", map.scalar_type());
  check_like_map(logits, op, "logits", map, map_name);
  TORCH_CHECK(pool_weight.dim() == 2 && pool_weight.size(0) == map.size(2) && pool_weight.size(1) == map.size(3),
              op, ": pool_weight must have shape (H, W) = (", map.size(2), ", ", map.size(3), "), got ",
              pool_weight.sizes());
  TORCH_CHECK(at::isFloatingType(pool_weight.scalar_type()), op,
              ": pool_weight must be a floating-point tensor, got ", pool_weight.scalar_type());
  TORCH_CHECK(pool_weight.device() == map.device(), op, ": pool_weight is on ", pool_weight.device(),
              " but ", map_name, " is on ", map.device());
  check_vector(ln_weight, width, op, "ln_weight", map);
  check_vector(ln_bias, width, op, "ln_bias", map);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

// The flat indices (n * H * W + p) where `flags` (P,) is set, ascending.
Tensor compact(const Tensor& flags) { return at::nonzero(flags).view({-1}); }

// (N, H, W, C) rows of a map, a view for channels_last and a copy for NCHW.
Tensor position_rows(const Tensor& map) {
  return map.permute({0, 2, 3, 1}).reshape({map.size(0) * map.size(2) * map.size(3), map.size(1)});
}

Tensor mask_of(const Tensor& active, const Tensor& like) {
  const auto fmt = merge_memory_format(like);
  return active.to(like.scalar_type()).view({like.size(0), 1, like.size(2), like.size(3)}).contiguous(fmt);
}

// sum over the rows at positions `index` of w(p) * GELU(LayerNorm(rows)), per image: (N, D) in the
// accumulation type. GELU's output is rounded to the rows' dtype, as the dense T_l(S_l) is.
Tensor pool_rows(const Tensor& rows, const Tensor& index, const Tensor& pool_weight, const Tensor& ln_weight,
                 const Tensor& ln_bias, double eps, int64_t N, int64_t HW,
                 const std::optional<Tensor>& conv_bias = std::nullopt) {
  const auto acc = acc_dtype(rows);
  const int64_t D = rows.size(1);
  // The convolution's bias, where given, is added in the rows' dtype: the sum rounded once, as a
  // convolution with its bias writes it (the same rounding on every path).
  const Tensor x = (conv_bias.has_value() ? at::add(rows, conv_bias->to(rows.scalar_type())) : rows).to(acc);
  const Tensor y = at::layer_norm(x, {D}, ln_weight.to(acc), ln_bias.to(acc), eps);
  const Tensor features = at::gelu(y).to(rows.scalar_type()).to(acc);
  const Tensor weight = pool_weight.reshape({HW}).to(acc).index_select(0, at::remainder(index, HW));
  const Tensor image = at::div(index, HW, "floor");
  // On the CPU index_add_ sums in index order: deterministic.
  return at::zeros({N, D}, rows.options().dtype(acc)).index_add_(0, image, features * weight.unsqueeze(1));
}

std::tuple<Tensor, Tensor> pooled_epilogue(const Tensor& conv, const Tensor& ln_weight, const Tensor& ln_bias,
                                           const Tensor& logits, const Tensor& pool_weight, double eps,
                                           const std::optional<Tensor>& conv_bias) {
  constexpr const char* op = "pooled_epilogue";
  check_pooled_inputs(conv, "conv", logits, pool_weight, ln_weight, ln_bias, conv.size(1), eps, op);
  if (conv_bias.has_value()) check_vector(*conv_bias, conv.size(1), op, "conv_bias", conv);
  const int64_t N = conv.size(0), HW = conv.size(2) * conv.size(3);
  const Tensor active = logits.reshape({N * HW}) >= 0;
  const Tensor index = compact(active);
  const Tensor rows = position_rows(conv);
  const Tensor gathered = rows.index_select(0, index);
  return {pool_rows(gathered, index, pool_weight, ln_weight, ln_bias, eps, N, HW, conv_bias), mask_of(active, conv)};
}

// The active positions' 3x3 neighbourhoods (the positions the refine conv reads), as flags (P,).
Tensor needed_positions(const Tensor& active, int64_t N, int64_t H, int64_t W) {
  const Tensor map = active.to(at::kFloat).view({N, 1, H, W});
  return at::max_pool2d(map, {3, 3}, {1, 1}, {1, 1}).reshape({N * H * W}) > 0;
}

// Each active position's 3x3 neighbourhood, kernel order (ky, kx): the flat positions (K * 9),
// P where the neighbour lies outside the image, and whether it lies inside.
struct Neighbourhoods {
  Tensor position, inside;
  int64_t K, P;
};

Neighbourhoods neighbourhoods(const Tensor& active_index, int64_t N, int64_t H, int64_t W) {
  const int64_t HW = H * W, P = N * HW;
  const Tensor image = at::div(active_index, HW, "floor"), p = at::remainder(active_index, HW);
  const Tensor y = at::div(p, W, "floor"), x = at::remainder(p, W);
  const Tensor offsets = at::arange(-1, 2, active_index.options());
  const Tensor yy = y.unsqueeze(1).unsqueeze(2) + offsets.view({1, 3, 1});
  const Tensor xx = x.unsqueeze(1).unsqueeze(2) + offsets.view({1, 1, 3});
  const Tensor inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W);
  const Tensor q = at::where(inside, image.view({-1, 1, 1}) * HW + yy * W + xx, at::full({}, P, yy.options()));
  return {q.reshape({-1}), inside.reshape({-1, 9}), active_index.size(0), P};
}

// out (K, D) = [rows of `source` at index[9k .. 9k + 8]] (K, 9 X) @ weight_t (9 X, D) + bias, in
// chunks of positions; `keep` (K, 9), when defined, replaces the gathered rows it does not keep by
// zeros (a select, not a product: a row that is not finite must not leak in as 0 * inf).
Tensor gathered_product(const Tensor& source, const Tensor& index, const Tensor& keep, const Tensor& weight_t,
                        const std::optional<Tensor>& bias, int64_t K) {
  const int64_t X = source.size(1), D = weight_t.size(1);
  Tensor out = at::empty({K, D}, source.options());
  const int64_t chunk = kChunk;
  for (int64_t start = 0; start < K; start += chunk) {
    const int64_t len = std::min(chunk, K - start);
    Tensor patches = source.index_select(0, index.narrow(0, start * 9, len * 9)).view({len, 9, X});
    if (keep.defined()) {
      patches = at::where(keep.narrow(0, start, len).unsqueeze(2), patches, at::zeros({}, patches.options()));
    }
    Tensor chunk = out.narrow(0, start, len);
    if (bias.has_value()) {
      at::addmm_out(chunk, bias->to(source.scalar_type()), patches.view({len, 9 * X}), weight_t);
    } else {
      at::mm_out(chunk, patches.view({len, 9 * X}), weight_t);
    }
  }
  return out;
}

// refine(align(s)) at the active positions: the 1x1 align conv as a matrix product on the needed
// positions only, then the refine conv on their rows (a zero row stands for its zero padding).
Tensor refine_aligned(const Tensor& s, const Tensor& active, const Neighbourhoods& nb, const Tensor& align_weight,
                      const std::optional<Tensor>& align_bias, const Tensor& refine_weight,
                      const std::optional<Tensor>& refine_bias) {
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), D = align_weight.size(0);
  const Tensor needed_index = compact(needed_positions(active, N, H, W));
  const int64_t M = needed_index.size(0), P = nb.P;
  const Tensor rows = position_rows(s).index_select(0, needed_index);
  const Tensor a_weight = align_weight.reshape({D, C}).t();
  Tensor aligned = align_bias.has_value() ? at::addmm(align_bias->to(s.scalar_type()), rows, a_weight)
                                          : at::mm(rows, a_weight);
  aligned = at::cat({aligned, at::zeros({1, D}, aligned.options())});
  // Row of `aligned` for every position and the empty slot P: M (the zero row) unless needed.
  Tensor row_of = at::full({P + 1}, M, needed_index.options());
  row_of.index_put_({needed_index}, at::arange(M, needed_index.options()));
  row_of.narrow(0, P, 1).fill_(M);
  const Tensor r_weight = refine_weight.permute({0, 2, 3, 1}).reshape({D, 9 * D}).t();
  return gathered_product(aligned, row_of.index_select(0, nb.position), Tensor(), r_weight, refine_bias, nb.K);
}

// The same with the two convolutions composed into one 3x3 conv on s. Its bias depends on the
// position: refine pads align's output with zeros, so align's bias enters through the taps that
// lie inside the image only.
Tensor refine_composed(const Tensor& s, const Neighbourhoods& nb, const Tensor& align_weight,
                       const std::optional<Tensor>& align_bias, const Tensor& refine_weight,
                       const std::optional<Tensor>& refine_bias) {
  const int64_t C = s.size(1), D = align_weight.size(0);
  const auto acc = acc_dtype(s);
  const Tensor taps = refine_weight.to(acc).permute({2, 3, 0, 1}).reshape({9, D, D});  // [tap, out, in]
  const Tensor composed = at::matmul(taps, align_weight.to(acc).reshape({D, C}));        // [tap, out, C]
  const Tensor weight_t = composed.permute({0, 2, 1}).reshape({9 * C, D}).to(s.scalar_type());
  const Tensor rows = position_rows(s);
  Tensor out = gathered_product(rows, at::clamp_max(nb.position, nb.P - 1), nb.inside, weight_t, refine_bias, nb.K);
  if (align_bias.has_value()) {
    const Tensor per_tap = at::matmul(taps, align_bias->to(acc));  // [tap, out]
    out = out + at::mm(nb.inside.to(acc), per_tap).to(s.scalar_type());
  }
  return out;
}

std::tuple<Tensor, Tensor> sparse_pooled_branch(const Tensor& s, const Tensor& logits, const Tensor& pool_weight,
                                                const Tensor& align_weight, const std::optional<Tensor>& align_bias,
                                                const Tensor& refine_weight,
                                                const std::optional<Tensor>& refine_bias, const Tensor& ln_weight,
                                                const Tensor& ln_bias, double eps, std::optional<int64_t> capacity) {
  constexpr const char* op = "sparse_pooled_branch";
  TORCH_CHECK(s.dim() == 4, op, ": s must be 4-D (N, C, H, W), got shape ", s.sizes());
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), HW = H * W, P = N * HW;
  TORCH_CHECK(align_weight.dim() == 4 && align_weight.size(1) == C && align_weight.size(2) == 1 &&
                  align_weight.size(3) == 1,
              op, ": align_weight must have shape (D, ", C, ", 1, 1) (a 1x1 conv on s), got ", align_weight.sizes());
  const int64_t D = align_weight.size(0);
  TORCH_CHECK(refine_weight.dim() == 4 && refine_weight.size(0) == D && refine_weight.size(1) == D &&
                  refine_weight.size(2) == 3 && refine_weight.size(3) == 3,
              op, ": refine_weight must have shape (", D, ", ", D, ", 3, 3), got ", refine_weight.sizes());
  for (const Tensor* t : {&align_weight, &refine_weight}) {
    TORCH_CHECK(t->scalar_type() == s.scalar_type() && t->device() == s.device(), op,
                ": the conv weights must be ", s.scalar_type(), " on ", s.device(), " like s, got ",
                t->scalar_type(), " on ", t->device());
  }
  if (align_bias.has_value()) check_vector(*align_bias, D, op, "align_bias", s);
  if (refine_bias.has_value()) check_vector(*refine_bias, D, op, "refine_bias", s);
  check_pooled_inputs(s, "s", logits, pool_weight, ln_weight, ln_bias, D, eps, op);
  if (capacity.has_value()) {
    TORCH_CHECK(*capacity >= 0, op, ": capacity must be >= 0, got ", *capacity);
  }

  const Tensor active = logits.reshape({P}) >= 0;
  const Tensor active_index = compact(active);
  if (capacity.has_value()) {
    const int64_t gathered = compact(needed_positions(active, N, H, W)).size(0);
    TORCH_CHECK(gathered <= *capacity, op, ": the active positions and their 3x3 neighbourhoods are ",
                gathered, " positions, more than capacity=", *capacity);
  }
  const Neighbourhoods nb = neighbourhoods(active_index, N, H, W);
  // refine(align(s)) is linear: one 3x3 conv with the product weights costs 9 C MACs per output
  // channel and active position, against C at each needed position plus 9 D at the active ones.
  const Tensor refined = 8 * C < 9 * D
                             ? refine_composed(s, nb, align_weight, align_bias, refine_weight, refine_bias)
                             : refine_aligned(s, active, nb, align_weight, align_bias, refine_weight, refine_bias);
  return {pool_rows(refined, active_index, pool_weight, ln_weight, ln_bias, eps, N, HW), mask_of(active, s)};
}

}  // namespace
}  // namespace aim

// A fragment: the aim library's other schemas are in masked_merge.cpp and topdown_epilogue.cpp.
TORCH_LIBRARY_FRAGMENT(aim, m) {
  // conv_bias, the convolution's bias, is added to conv inside the op (at the active positions).
  m.def(
      "pooled_epilogue(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
      "Tensor pool_weight, float eps, Tensor? conv_bias=None) -> (Tensor, Tensor)");
  m.def(
      "sparse_pooled_branch(Tensor s, Tensor logits, Tensor pool_weight, Tensor align_weight, "
      "Tensor? align_bias, Tensor refine_weight, Tensor? refine_bias, Tensor ln_weight, "
      "Tensor ln_bias, float eps, int? capacity) -> (Tensor, Tensor)");
}

// The CPU kernels; CUDA calls take aim_ext/ops/pooled_head_triton.py's kernels (aim_ext.ops.pooled_head).
TORCH_LIBRARY_IMPL(aim, CPU, m) {
  m.impl("pooled_epilogue", &aim::pooled_epilogue);
  m.impl("sparse_pooled_branch", &aim::sparse_pooled_branch);
}


