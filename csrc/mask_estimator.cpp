// aim::mask_estimator: the schema, the argument checks, the convolution route and the CPU
// registration, whose "kernel" route is the CUDA kernels' emulation (mask_estimator.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "mask_estimator.h"
#include "mask_estimator_op.h"

namespace aim {
namespace {

constexpr const char* kOp = "mask_estimator";

void check_param(const Tensor& t, const char* name, at::IntArrayRef shape, const Tensor& s) {
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == s.device(), kOp, ": ", name, " is on ", t.device(), " but s is on ", s.device());
}

Tensor like_s(const Tensor& t, const Tensor& s) { return t.to(s.scalar_type()); }

}  // namespace

EstimatorParams estimator_params(const Tensor& s, const Tensor& stem_weight, const Tensor& stem_bias,
                                 at::TensorList block_weights, at::TensorList block_biases,
                                 const Tensor& local_weight, const Tensor& local_bias,
                                 const Tensor& context_weight, std::string_view algorithm) {
  TORCH_CHECK(algorithm == "auto" || algorithm == "kernel" || algorithm == "convolutions", kOp,
              ": algorithm must be 'auto', 'kernel' or 'convolutions', got '", std::string(algorithm), "'");
  TORCH_CHECK(s.dim() == 4, kOp, ": s must be 4-D (N, C, H, W), got shape ", s.sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), kOp, ": s must be a floating-point tensor, got ",
              s.scalar_type());
  TORCH_CHECK(s.size(1) > 0 && s.size(2) > 0 && s.size(3) > 0, kOp, ": s must have channels and positions, got ",
              s.sizes());
  TORCH_CHECK(stem_weight.dim() == 4 && stem_weight.size(0) > 0, kOp,
              ": stem_weight must be a 3x3 convolution's weight (D, C, 3, 3), got shape ", stem_weight.sizes());
  const int64_t C = s.size(1), D = stem_weight.size(0);
  check_param(stem_weight, "stem_weight", {D, C, 3, 3}, s);
  check_param(stem_bias, "stem_bias", {D}, s);
  TORCH_CHECK(block_weights.size() == block_biases.size() && block_weights.size() % 2 == 0, kOp,
              ": block_weights and block_biases must each hold two convolutions per residual block "
              "(conv1, conv2), got ",
              block_weights.size(), " weights and ", block_biases.size(), " biases");
  EstimatorParams p;
  p.width = D;
  for (size_t i = 0; i < block_weights.size(); ++i) {
    const std::string w = "block_weights[" + std::to_string(i) + "]";
    const std::string b = "block_biases[" + std::to_string(i) + "]";
    check_param(block_weights[i], w.c_str(), {D, D, 3, 3}, s);
    check_param(block_biases[i], b.c_str(), {D}, s);
    p.block_weights.push_back(like_s(block_weights[i], s));
    p.block_biases.push_back(like_s(block_biases[i], s));
  }
  check_param(local_weight, "local_weight", {1, D, 1, 1}, s);
  check_param(local_bias, "local_bias", {1}, s);
  check_param(context_weight, "context_weight", {1, D}, s);
  p.stem_weight = like_s(stem_weight, s);
  p.stem_bias = like_s(stem_bias, s);
  p.local_weight = like_s(local_weight, s);
  p.local_bias = like_s(local_bias, s);
  p.context_weight = like_s(context_weight, s);
  return p;
}

bool kernel_takes(const Tensor& s, const EstimatorParams& p, int64_t shared_bytes, std::string* why) {
  const auto say = [&](const std::string& reason) {
    if (why != nullptr) *why = reason;
    return false;
  };
  const auto dtype = s.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) {
    return say(std::string("the kernel takes float32, float64, float16 and bfloat16, not ") + c10::toString(dtype));
  }
  if (p.width != estimator::kWidth) {
    return say("the kernel is written for width " + std::to_string(estimator::kWidth) + ", this estimator has " +
               std::to_string(p.width));
  }
  if (p.block_weights.size() > 2 * static_cast<size_t>(estimator::kMaxBlocks)) {
    return say("the kernel takes at most " + std::to_string(estimator::kMaxBlocks) + " residual blocks");
  }
  // The stem's launch has one block per (chunk of input channels, image): within grid.x's limit.
  const int64_t stem_blocks = estimator::stem_chunks(s.size(1)) * s.size(0);
  if (stem_blocks > estimator::kMaxGridBlocks) {
    return say("the stem's launch would need " + std::to_string(stem_blocks) + " blocks (" +
               std::to_string(estimator::stem_chunks(s.size(1))) + " channel chunks x " + std::to_string(s.size(0)) +
               " images), more than a grid's " + std::to_string(estimator::kMaxGridBlocks) + ": split the batch");
  }
  const int64_t acc_size = dtype == at::kDouble ? 8 : 4;
  if (!estimator::map_fits_kernel(s.size(2), s.size(3), acc_size, shared_bytes)) {
    const int64_t side = estimator::largest_square_map(acc_size, shared_bytes);
    return say("a " + std::to_string(s.size(2)) + "x" + std::to_string(s.size(3)) + " " +
               std::string(c10::toString(dtype)) + " map is larger than the kernel's limit (" +
               std::to_string(shared_bytes / 1024) + " KiB of shared memory per block: square maps up to " +
               std::to_string(side) + "x" + std::to_string(side) + ")");
  }
  return true;
}

bool use_kernel(const Tensor& s, const EstimatorParams& p, std::string_view algorithm, int64_t shared_bytes,
                bool auto_wins) {
  if (algorithm == "convolutions") return false;
  std::string why;
  const bool takes = kernel_takes(s, p, shared_bytes, &why);
  if (algorithm == "auto") return takes && auto_wins;
  TORCH_CHECK(takes, kOp, ": algorithm='kernel' cannot run this input: ", why,
              "; use algorithm='auto' or 'convolutions'");
  return true;
}

std::tuple<Tensor, Tensor> estimator_convolutions(const Tensor& s, const EstimatorParams& p) {
  // In place where a map is this function's own: the values of the out-of-place ops, fewer buffers.
  Tensor h = at::conv2d(s, p.stem_weight, p.stem_bias, 1, 1);
  at::gelu_(h);
  for (size_t i = 0; i < p.block_weights.size(); i += 2) {
    Tensor hidden = at::conv2d(h, p.block_weights[i], p.block_biases[i], 1, 1);
    at::gelu_(hidden);
    h.add_(at::conv2d(hidden, p.block_weights[i + 1], p.block_biases[i + 1], 1, 1));
  }
  const Tensor context = at::linear(h.mean({2, 3}), p.context_weight);  // (N, 1)
  const Tensor logits = (at::conv2d(h, p.local_weight, p.local_bias) + context.view({-1, 1, 1, 1})).contiguous();
  return {logits, (logits >= 0).to(s.scalar_type())};
}

std::tuple<Tensor, Tensor> estimator_outputs(const Tensor& s) {
  const auto options = s.options().memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({s.size(0), 1, s.size(2), s.size(3)}, options),
          at::empty({s.size(0), 1, s.size(2), s.size(3)}, options)};
}

namespace {

// ------------------------------------------------------------------------------------------
// The CUDA kernels' route, emulated on the CPU: for each image, the stem's partial sums chunk by
// chunk, then the tail, each output summed by the same function in the same order as the kernels'
// threads sum it (mask_estimator.h). Which thread computes which output does not change any sum.

// [c][tap][o] acc_t weights of input channels [c0, c0 + channels) of a (D, C, 3, 3) weight.
template <typename scalar_t, typename acc_t>
void stage_weights(const scalar_t* weight, int64_t C, int64_t c0, int64_t channels, acc_t* out) {
  using namespace estimator;
  for (int64_t c = 0; c < channels; ++c)
    for (int tap = 0; tap < kTaps; ++tap)
      for (int o = 0; o < kWidth; ++o)
        out[(c * kTaps + tap) * kWidth + o] = static_cast<acc_t>(weight[(o * C + c0 + c) * kTaps + tap]);
}

template <typename scalar_t>
void emulate_kernel(const Tensor& s, const EstimatorParams& p, Tensor& logits, Tensor& mask) {
  using namespace estimator;
  using acc_t = at::opmath_type<scalar_t>;
  const auto round = [](acc_t v) { return static_cast<acc_t>(static_cast<scalar_t>(v)); };
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), HW = H * W;
  const int64_t plane = padded_plane(H, W), chunks = stem_chunks(C);
  const int Pi = static_cast<int>(plane), Wi = static_cast<int>(W);  // the kernel's int indices
  const int64_t sN = s.stride(0), sC = s.stride(1), sH = s.stride(2), sW = s.stride(3);
  const scalar_t* x = s.const_data_ptr<scalar_t>();
  std::vector<Tensor> weights;  // contiguous copies, read by index
  for (const Tensor& t : {p.stem_weight, p.stem_bias, p.local_weight, p.local_bias, p.context_weight})
    weights.push_back(t.contiguous());
  std::vector<Tensor> convs, biases;
  for (size_t i = 0; i < p.block_weights.size(); ++i) {
    convs.push_back(p.block_weights[i].contiguous());
    biases.push_back(p.block_biases[i].contiguous());
  }
  const scalar_t* stem_w = weights[0].const_data_ptr<scalar_t>();
  const scalar_t* stem_b = weights[1].const_data_ptr<scalar_t>();
  scalar_t* out_logits = logits.mutable_data_ptr<scalar_t>();
  scalar_t* out_mask = mask.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> staged(kStemChunk * plane), w(kWidth * kTaps * kWidth), partials(chunks * kWidth * HW);
    std::vector<acc_t> h(kWidth * plane), hidden(kWidth * plane), means(kWidth), wl(kWidth), wc(kWidth);
    acc_t acc[kGroup];
    for (int64_t n = begin; n < end; ++n) {
      // The stem's blocks: chunk k's padded input channels and weights, then its partial sums.
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t c0 = k * kStemChunk, channels = std::min<int64_t>(kStemChunk, C - c0);
        for (int64_t i = 0; i < channels * plane; ++i) {
          const int64_t c = i / plane, y = (i % plane) / (W + 2) - 1, xx = (i % plane) % (W + 2) - 1;
          const bool inside = y >= 0 && y < H && xx >= 0 && xx < W;
          staged[i] = inside ? static_cast<acc_t>(x[n * sN + (c0 + c) * sC + y * sH + xx * sW]) : acc_t(0);
        }
        stage_weights(stem_w, C, c0, channels, w.data());
        for (int64_t item = 0; item < (kWidth / kGroup) * HW; ++item) {
          const int o0 = static_cast<int>(item / HW) * kGroup;
          const int64_t q = item % HW;
          for (acc_t& a : acc) a = 0;
          conv3x3_group(staged.data(), static_cast<int>(channels), Pi, Wi, static_cast<int>(q / W),
                        static_cast<int>(q % W), w.data(), o0, acc);
          for (int j = 0; j < kGroup; ++j) partials[(k * kWidth + o0 + j) * HW + q] = acc[j];
        }
      }
      // The tail's block.
      std::fill(h.begin(), h.end(), acc_t(0));
      std::fill(hidden.begin(), hidden.end(), acc_t(0));
      for (int64_t i = 0; i < kWidth * HW; ++i) {
        const int64_t o = i / HW, q = i % HW;
        h[o * plane + padded_index(static_cast<int>(q), Wi)] =
            stem_output(partials.data() + o * HW + q, chunks, kWidth * HW, static_cast<acc_t>(stem_b[o]), round);
      }
      for (size_t b = 0; b < convs.size(); b += 2) {
        for (int step = 0; step < 2; ++step) {
          const scalar_t* bias = biases[b + step].const_data_ptr<scalar_t>();
          stage_weights(convs[b + step].const_data_ptr<scalar_t>(), kWidth, 0, kWidth, w.data());
          const acc_t* in = step == 0 ? h.data() : hidden.data();
          for (int64_t item = 0; item < (kWidth / kGroup) * HW; ++item) {
            const int o0 = static_cast<int>(item / HW) * kGroup;
            const int64_t q = item % HW, e = padded_index(static_cast<int>(q), Wi);
            for (acc_t& a : acc) a = 0;
            conv3x3_group(in, kWidth, Pi, Wi, static_cast<int>(q / W), static_cast<int>(q % W), w.data(), o0, acc);
            for (int j = 0; j < kGroup; ++j) {
              const int64_t idx = (o0 + j) * plane + e;
              const acc_t bj = static_cast<acc_t>(bias[o0 + j]);
              if (step == 0) hidden[idx] = block_hidden(acc[j], bj, round);
              else h[idx] = block_output(h[idx], acc[j], bj, round);
            }
          }
        }
      }
      for (int c = 0; c < kWidth; ++c) {
        means[c] = channel_mean(h.data() + c * plane, static_cast<int>(H), Wi, round);
        wl[c] = static_cast<acc_t>(weights[2].const_data_ptr<scalar_t>()[c]);
        wc[c] = static_cast<acc_t>(weights[4].const_data_ptr<scalar_t>()[c]);
      }
      const acc_t context = context_term(means.data(), wc.data(), round);
      const acc_t bl = static_cast<acc_t>(weights[3].const_data_ptr<scalar_t>()[0]);
      for (int64_t q = 0; q < HW; ++q) {
        const acc_t l = logit_at(h.data(), Pi, padded_index(static_cast<int>(q), Wi), wl.data(), bl, context, round);
        out_logits[n * HW + q] = static_cast<scalar_t>(l);
        out_mask[n * HW + q] = static_cast<scalar_t>(l >= 0 ? 1 : 0);
      }
    }
  });
}

std::tuple<Tensor, Tensor> mask_estimator_cpu(const Tensor& s, const Tensor& stem_weight, const Tensor& stem_bias,
                                              at::TensorList block_weights, at::TensorList block_biases,
                                              const Tensor& local_weight, const Tensor& local_bias,
                                              const Tensor& context_weight, c10::string_view algorithm) {
  const std::string_view route(algorithm.data(), algorithm.size());
  const EstimatorParams p = estimator_params(s, stem_weight, stem_bias, block_weights, block_biases, local_weight,
                                             local_bias, context_weight, route);
  // "auto" takes the convolutions on the CPU: the emulation is a test tool, not a fast path.
  if (!use_kernel(s, p, route, estimator::kMaxSharedBytes, /*auto_wins=*/false)) return estimator_convolutions(s, p);
  auto [logits, mask] = estimator_outputs(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "mask_estimator_cpu",
                                  [&] { emulate_kernel<scalar_t>(s, p, logits, mask); });
  return {logits, mask};
}

}  // namespace
}  // namespace aim

TORCH_LIBRARY_FRAGMENT(aim, m) {
  // A folded mask estimator end to end (mask_estimator.h): returns (logits, mask), each
  // (N, 1, H, W) in s's dtype. block_weights and block_biases hold conv1 and conv2 of each
  // residual block in order; algorithm is "auto", "kernel" or "convolutions" (mask_estimator_op.h).
  m.def(
      "mask_estimator(Tensor s, Tensor stem_weight, Tensor stem_bias, Tensor[] block_weights, "
      "Tensor[] block_biases, Tensor local_weight, Tensor local_bias, Tensor context_weight, "
      "str algorithm=\"auto\") -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aim, CPU, m) { m.impl("mask_estimator", &aim::mask_estimator_cpu); }
