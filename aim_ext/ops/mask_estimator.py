"""The folded mask estimator M_l (paper Eq. 1) as one op, for inference.

    aim::mask_estimator(s, stem_weight, stem_bias, block_weights, block_biases,
                        local_weight, local_bias, context_weight, algorithm) -> (logits, mask)

computes, with every BatchNorm already folded into the convolution before it,

    h      = GELU(stem(s))                              3x3, C_l -> 32
    h      = h + conv2(GELU(conv1(h)))   per block      3x3, 32 -> 32
    logits = (W_h h + b) + W_c mean_HW(h)               A_l, (N, 1, H, W)
    mask   = 1[logits >= 0]                             B_l in evaluation

in s's dtype. ``algorithm`` picks the route (csrc/mask_estimator_op.h): "convolutions" (ATen's
convolutions layer by layer), "kernel" (on CUDA two launches for the whole estimator,
csrc/cuda/mask_estimator_kernel.cu; on the CPU the kernels' emulation, the same arithmetic in the
same order, csrc/mask_estimator.h) or "auto" (the kernel on CUDA for small maps and batches,
otherwise the convolutions). `mask_estimator_reference` is the pure PyTorch definition the routes
must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.ops.library import impl_library, no_context, refuse_backward, refuse_gradient_inputs

__all__ = ["ESTIMATOR_ALGORITHMS", "mask_estimator", "mask_estimator_reference"]

ESTIMATOR_ALGORITHMS = ("auto", "kernel", "convolutions")


def mask_estimator_reference(
    s: Tensor,
    stem_weight: Tensor,
    stem_bias: Tensor,
    block_weights: list[Tensor],
    block_biases: list[Tensor],
    local_weight: Tensor,
    local_bias: Tensor,
    context_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(logits, mask)`` of a folded estimator, layer by layer in s's dtype."""
    h = F.gelu(F.conv2d(s, stem_weight, stem_bias, padding=1))
    for conv1, b1, conv2, b2 in zip(
        block_weights[::2], block_biases[::2], block_weights[1::2], block_biases[1::2], strict=True
    ):
        h = h + F.conv2d(F.gelu(F.conv2d(h, conv1, b1, padding=1)), conv2, b2, padding=1)
    context = F.linear(h.mean(dim=(2, 3)), context_weight)
    logits = (F.conv2d(h, local_weight, local_bias) + context[:, :, None, None]).contiguous()
    return logits, (logits >= 0).to(s.dtype)


def _fallback(
    s,
    stem_weight,
    stem_bias,
    block_weights,
    block_biases,
    local_weight,
    local_bias,
    context_weight,
    algorithm="auto",
):
    if algorithm not in ESTIMATOR_ALGORITHMS:
        raise ValueError(
            f"mask_estimator: algorithm must be one of {ESTIMATOR_ALGORITHMS}, got {algorithm!r}"
        )
    if algorithm == "kernel":
        raise RuntimeError("mask_estimator: algorithm='kernel' needs the compiled aim_ext kernels")

    def cast(t):  # the parameters in s's dtype, as the compiled routes take them
        return [x.to(s.dtype) for x in t] if isinstance(t, list) else t.to(s.dtype)

    params = (stem_weight, stem_bias, block_weights, block_biases, local_weight, local_bias, context_weight)
    with torch.no_grad():
        return mask_estimator_reference(s, *(cast(p) for p in params))


def _fake(
    s,
    stem_weight,
    stem_bias,
    block_weights,
    block_biases,
    local_weight,
    local_bias,
    context_weight,
    algorithm="auto",
):
    if s.dim() != 4:
        raise ValueError(f"mask_estimator: s must be 4-D (N, C, H, W), got shape {tuple(s.shape)}")
    n, _, h, w = s.shape
    return s.new_empty((n, 1, h, w)), s.new_empty((n, 1, h, w))


def _register() -> None:
    lib = impl_library()
    # The compiled CPU and CUDA kernels take precedence over this catch-all.
    lib.impl("mask_estimator", _fallback, "CompositeExplicitAutograd")
    torch.library.register_fake("aim::mask_estimator", _fake, lib=lib)
    torch.library.register_autograd(
        "aim::mask_estimator", refuse_backward("mask_estimator"), setup_context=no_context, lib=lib
    )


_register()


def mask_estimator(
    s: Tensor,
    stem_weight: Tensor,
    stem_bias: Tensor,
    block_weights: list[Tensor],
    block_biases: list[Tensor],
    local_weight: Tensor,
    local_bias: Tensor,
    context_weight: Tensor,
    *,
    algorithm: str = "auto",
) -> tuple[Tensor, Tensor]:
    """A folded mask estimator's logits A_l and evaluation mask B_l, each (N, 1, H, W) in s's
    dtype. ``block_weights``/``block_biases`` hold conv1 and conv2 of each residual block in order.
    Inference only (no gradients)."""
    refuse_gradient_inputs("mask_estimator", s, stem_weight, *block_weights, local_weight, context_weight)
    if algorithm not in ESTIMATOR_ALGORITHMS:
        raise ValueError(
            f"mask_estimator: algorithm must be one of {ESTIMATOR_ALGORITHMS}, got {algorithm!r}"
        )
    return torch.ops.aim.mask_estimator(
        s,
        stem_weight,
        stem_bias,
        list(block_weights),
        list(block_biases),
        local_weight,
        local_bias,
        context_weight,
        algorithm,
    )
