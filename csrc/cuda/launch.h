// Launchers of the CUDA kernels of aim::masked_merge and aim::topdown_epilogue. Plain C++ on raw
// pointers, so the .cu files need no torch headers (they compile in seconds, not minutes).
//
// Layout: every (N, C, ., .) map of one call shares feat's (or conv's) memory format, NCHW or
// channels_last; the 1-channel maps (logits, noise, mask, grad_mask, grad_logits) are dense
// (N, H*W) arrays, which is both layouts at once.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aim::cuda {

enum class DType { Float, Double, Half, BFloat16 };

struct MergeShape {
  int64_t N, C, H, W;  // feat / conv
  int64_t h, w;        // coarse; 0 when there is none
  bool channels_last;
};

// What the binary Gumbel mask is computed from: mask = 1[(logits + noise) / temperature >= 0],
// or 1[logits >= 0] when noise is null (evaluation). Read in the kernels, in their own dtypes.
struct MaskInput {
  const void* logits;
  DType logits_dtype;
  const void* noise;  // null in evaluation
  DType noise_dtype;
  double temperature;
};

// out = feat * mask + nearest_resize(coarse); coarse may be null. mask is written in dtype.
void merge_forward(DType dtype, const MergeShape& s, const MaskInput& in, const void* feat,
                   const void* coarse, void* out, void* mask, cudaStream_t stream);

// grad_feat = grad_out * mask; grad_logits (logits' dtype) = the straight-through gradient of
// sum_C(grad_out * feat) + grad_mask, zero in evaluation; grad_coarse = the adjoint of the
// nearest resize (may be null). grad_mask may be null (zero).
void merge_backward(DType dtype, const MergeShape& s, const MaskInput& in, const void* grad_out,
                    const void* grad_mask, DType grad_mask_dtype, const void* feat,
                    void* grad_feat, void* grad_logits, void* grad_coarse, cudaStream_t stream);

// grad_coarse (N, C, h, w) = the adjoint of the nearest resize of grad_out (N, C, H, W): each
// coarse pixel sums its own footprint, one thread per output, no atomics.
void coarse_adjoint(DType dtype, const MergeShape& s, const void* grad_out, void* grad_coarse,
                    cudaStream_t stream);

// features = GELU(LayerNorm_C(conv + conv_bias)) (weight, bias, conv_bias: C values in the
// accumulation type; conv_bias may be null: none), out = features * mask + nearest_resize(coarse);
// coarse may be null, features too (not written).
void epilogue_forward(DType dtype, const MergeShape& s, const MaskInput& in, const void* conv,
                      const void* weight, const void* bias, const void* conv_bias, double eps,
                      const void* coarse, void* out, void* mask, void* features, cudaStream_t stream);

// Elements (accumulation type) of the workspace epilogue_backward needs for its partial sums.
int64_t epilogue_workspace_elements(const MergeShape& s);

// The epilogue's gradients. grad_features and grad_mask may be null (zero), grad_coarse too (no
// coarse map); grad_weight and grad_bias are C values in the accumulation type, summed in a
// fixed order (deterministic).
void epilogue_backward(DType dtype, const MergeShape& s, const MaskInput& in, const void* grad_out,
                       const void* grad_mask, DType grad_mask_dtype, const void* grad_features,
                       const void* conv, const void* weight, const void* bias, double eps,
                       void* grad_conv, void* grad_weight, void* grad_bias, void* grad_logits,
                       void* grad_coarse, void* workspace, cudaStream_t stream);

}  // namespace aim::cuda

namespace aim::cuda {

// aim::mask_estimator's kernel route (mask_estimator.h): s is any (N, C, H, W) strided map; the
// parameters are contiguous in s's dtype, the 3x3 weights (32, C_in, 3, 3); partials holds
// estimator_partials_elements(...) values of the accumulation type; logits and mask are dense
// (N, H*W) in s's dtype. Two launches: the stem's partial sums (one block per chunk of input
// channels and image), then one block per image for the rest.
struct EstimatorArgs {
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;  // strides of s, in elements
  const void* s;
  const void* stem_weight;
  const void* stem_bias;
  int convs;  // 2 per residual block, at most 16
  const void* conv_weight[16];
  const void* conv_bias[16];
  const void* local_weight;   // 32 values
  const void* local_bias;     // 1
  const void* context_weight; // 32
  void* partials;
  void* logits;
  void* mask;
};

int64_t estimator_partials_elements(int64_t N, int64_t C, int64_t H, int64_t W);

// Returns the error of setting the kernels' shared-memory limit (nothing is launched then).
cudaError_t mask_estimator_forward(DType dtype, const EstimatorArgs& a, cudaStream_t stream);

}  // namespace aim::cuda
