// C++ test of the aim ops through the dispatcher (CPU only), against ATen compositions of the
// same semantics:
//   mask = 1[(logits + noise) / temperature >= 0]   (noise absent: 1[logits >= 0])
//   out  = feat * mask + upsample_nearest2d(coarse, (H, W))              (aim::masked_merge)
//   feat = gelu(layer_norm over C(conv)), then the same                  (aim::topdown_epilogue)
// Plain main(): prints one line per check and exits non-zero when any fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("[%s] %s\n", ok ? " OK " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Exact equality of values, and of shape and dtype.
bool same(const Tensor& a, const Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

bool close(const Tensor& a, const Tensor& b, double tol = 1e-6) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

auto forward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("aim::masked_merge", "")
      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                        const OptTensor&, double)>();
}

auto backward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("aim::masked_merge_backward", "")
      .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                const Tensor&, const OptTensor&, double,
                                                at::IntArrayRef)>();
}

Tensor reference_mask(const Tensor& logits, const OptTensor& noise, double temperature) {
  const Tensor z = noise ? (logits + *noise) / temperature : logits;
  return (z >= 0).to(at::kFloat);
}

// The forward on the given layout, with and without noise, compared with ATen.
void test_forward(at::MemoryFormat fmt, const char* name) {
  const int64_t N = 2, C = 3, H = 19, W = 13, h = 10, w = 7;  // non-integer ratios
  const Tensor feat = at::randn({N, C, H, W}).contiguous(fmt);
  Tensor logits = at::randn({N, 1, H, W});
  logits.view(-1).slice(0, 0, 5).zero_();  // 1[0 >= 0] = 1: the boundary is inclusive
  const Tensor coarse = at::randn({N, C, h, w}).contiguous(fmt);
  const Tensor noise = at::randn({N, 1, H, W});
  auto op = forward_op();

  for (const OptTensor& nz : {OptTensor(), OptTensor(noise)}) {
    const double temperature = nz ? 0.5 : 1.0;
    const std::string tag = std::string(name) + (nz ? ", training (noise, t=0.5)" : ", eval");
    const auto [out, mask] = op.call(feat, logits, coarse, nz, temperature);
    const Tensor ref_mask = reference_mask(logits, nz, temperature);
    const Tensor ref = feat * ref_mask + at::upsample_nearest2d(coarse, {H, W});
    check(same(mask, ref_mask), tag + ": mask == 1[z >= 0]");
    check(same(out, ref), tag + ": out == feat * mask + upsample_nearest2d(coarse)");
    check(out.is_contiguous(fmt), tag + ": out keeps feat's memory format");
  }
  const auto [out, mask] = op.call(feat, logits, std::nullopt, std::nullopt, 1.0);
  check(same(out, feat * reference_mask(logits, std::nullopt, 1.0)),
        std::string(name) + ", no coarse: out == feat * mask");
}

// One training-mode backward, compared with an independent computation.
void test_backward() {
  const int64_t N = 2, C = 3, H = 19, W = 13, h = 10, w = 7;
  const double temperature = 0.7;
  const Tensor feat = at::randn({N, C, H, W});
  const Tensor logits = at::randn({N, 1, H, W});
  const Tensor noise = at::randn({N, 1, H, W});
  const Tensor grad_out = at::randn({N, C, H, W});
  const Tensor grad_mask = at::randn({N, 1, H, W});

  const auto [grad_feat, grad_logits, grad_coarse] =
      backward_op().call(grad_out, grad_mask, feat, logits, noise, temperature, {h, w});

  const Tensor z = (logits + noise) / temperature;
  const Tensor s = at::sigmoid(z);
  const Tensor ref_feat = grad_out * (z >= 0).to(at::kFloat);
  const Tensor ref_logits =
      ((grad_out * feat).sum(1, /*keepdim=*/true) + grad_mask) * s * (1 - s) / temperature;
  const Tensor ref_coarse = at::upsample_nearest2d_backward(grad_out, {H, W}, {N, C, h, w});
  check(same(grad_feat, ref_feat), "backward: grad_feat == grad_out * mask");
  check(close(grad_logits, ref_logits), "backward: grad_logits == straight-through gradient");
  check(close(grad_coarse, ref_coarse), "backward: grad_coarse == upsample_nearest2d_backward");
}

// The fused epilogue in float64 against at::layer_norm and at::gelu followed by the merge.
void test_epilogue() {
  const int64_t N = 2, C = 5, H = 9, W = 7, h = 4, w = 5;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const Tensor conv = at::randn({N, C, H, W}, f64) * 2 + 1;
  const Tensor weight = at::randn({C}, f64), bias = at::randn({C}, f64);
  const Tensor logits = at::randn({N, 1, H, W}, f64), coarse = at::randn({N, C, h, w}, f64);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("aim::topdown_epilogue", "")
                      .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const OptTensor&,
                                                                const OptTensor&, double, double)>();
  const auto [out, mask, features] = op.call(conv, weight, bias, logits, coarse, std::nullopt, 1.0, 1e-6);
  const Tensor normed = at::layer_norm(conv.permute({0, 2, 3, 1}), {C}, weight, bias, 1e-6).permute({0, 3, 1, 2});
  const Tensor ref_features = at::gelu(normed);
  const Tensor ref_mask = (logits >= 0).to(at::kDouble);
  check(close(features, ref_features, 1e-12), "epilogue: features == gelu(layer_norm(conv))");
  check(same(mask, ref_mask), "epilogue: mask == 1[logits >= 0]");
  check(close(out, features * mask + at::upsample_nearest2d(coarse, {H, W}), 1e-12),
        "epilogue: out == features * mask + upsample_nearest2d(coarse)");
}

void test_bad_input() {
  const Tensor feat = at::randn({2, 3, 8, 8});
  const Tensor logits = at::randn({2, 2, 8, 8});  // must have 1 channel
  std::string message;
  try {
    forward_op().call(feat, logits, std::nullopt, std::nullopt, 1.0);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  check(message.find("1 channel") != std::string::npos,
        "bad input: logits with 2 channels throws c10::Error naming '1 channel'");
}

}  // namespace

int main() {
  at::manual_seed(0);
  try {
    test_forward(at::MemoryFormat::Contiguous, "float32 NCHW");
    test_forward(at::MemoryFormat::ChannelsLast, "float32 channels_last");
    test_backward();
    test_epilogue();
    test_bad_input();
  } catch (const std::exception& e) {
    std::printf("[FAIL] unexpected exception: %s\n", e.what());
    ++failures;
  }
  std::printf("aim ops: %s (%d failure%s)\n", failures ? "FAILED" : "passed", failures,
              failures == 1 ? "" : "s");
  return failures ? 1 : 0;
}
