"""The masked merge of a top-down stage: paper Eq. 2-3 and the top-down merge, as one op.

    mask = G(logits)   binary Gumbel-softmax (Eq. 2):
                       evaluation (noise None):  mask = 1[logits >= 0]
                       training (logistic noise): soft = sigmoid((logits + noise) / temperature),
                                                  mask = 1[soft >= 0.5], straight-through
    out  = feat * mask (Eq. 3) + nearest_resize(coarse, (H, W))   (the top-down merge)

One op, ``torch.ops.aim.masked_merge``, with three implementations: the C++ CPU kernel and the
CUDA kernel of ``aim_ext._C``, and the pure PyTorch reference below, which also serves any device
without a compiled kernel (the schema: aim_ext/ops/library.py). Fake kernels and an autograd
formula are registered here, so ``torch.compile``, ``torch.export`` and AOTInductor see one op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from aim_ext.ops.library import impl_library, no_context, refuse_double_backward

__all__ = [
    "acc_dtype",
    "check_merge_inputs",
    "empty_coarse_grad",
    "logistic_noise",
    "mask_and_coarse_grads",
    "masked_merge",
    "masked_merge_reference",
    "memory_format",
    "nearest_resize_adjoint",
    "nearest_source_indices",
]


# ---------------------------------------------------------------------------------------------
# Input checks: one set of messages for every path (the C++ kernels check the same things).


def _check_logits_like(t: Tensor, name: str, feat: Tensor, op: str, feat_name: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, 1, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] != 1:
        raise ValueError(
            f"{op}: {name} must have exactly 1 channel (it is broadcast over C), got {t.shape[1]} channels"
        )
    if (t.shape[0], t.shape[2], t.shape[3]) != (feat.shape[0], feat.shape[2], feat.shape[3]):
        raise ValueError(
            f"{op}: {name} shape {tuple(t.shape)} does not match {feat_name} (N, H, W) = "
            f"{(feat.shape[0], feat.shape[2], feat.shape[3])}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != feat.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {feat_name} is on {feat.device}")


def check_merge_inputs(
    feat: Tensor,
    logits: Tensor,
    coarse: Tensor | None,
    noise: Tensor | None,
    temperature: float,
    op: str = "masked_merge",
    feat_name: str = "feat",
) -> None:
    """Raise a ValueError/TypeError naming the problem if the arguments do not fit together; ``op``
    and ``feat_name`` name the op and its feature argument in the messages."""
    if feat.dim() != 4:
        raise ValueError(f"{op}: {feat_name} must be 4-D (N, C, H, W), got shape {tuple(feat.shape)}")
    if not feat.is_floating_point():
        raise TypeError(f"{op}: {feat_name} must be a floating-point tensor, got {feat.dtype}")
    if feat.shape[1] == 0:
        raise ValueError(f"{op}: {feat_name} must have at least one channel, got shape {tuple(feat.shape)}")
    _check_logits_like(logits, "logits", feat, op, feat_name)
    if noise is not None:
        if noise.shape != logits.shape:
            raise ValueError(
                f"{op}: noise shape {tuple(noise.shape)} does not match logits shape {tuple(logits.shape)}"
            )
        _check_logits_like(noise, "noise", feat, op, feat_name)
        if not temperature > 0:
            raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if coarse is not None:
        if coarse.dim() != 4:
            raise ValueError(f"{op}: coarse must be 4-D (N, C, h, w), got shape {tuple(coarse.shape)}")
        if coarse.shape[:2] != feat.shape[:2]:
            raise ValueError(
                f"{op}: coarse (N, C) = {tuple(coarse.shape[:2])} does not match {feat_name} "
                f"(N, C) = {tuple(feat.shape[:2])}"
            )
        if coarse.dtype != feat.dtype:
            raise TypeError(
                f"{op}: coarse dtype {coarse.dtype} does not match {feat_name} dtype {feat.dtype}"
            )
        if coarse.device != feat.device:
            raise ValueError(f"{op}: coarse is on {coarse.device} but {feat_name} is on {feat.device}")
        if coarse.shape[2] == 0 or coarse.shape[3] == 0:
            raise ValueError(f"{op}: coarse must have a non-empty spatial size, got {tuple(coarse.shape)}")


# ---------------------------------------------------------------------------------------------
# The pure PyTorch reference: differentiable by autograd, the independent check of the kernels.


def acc_dtype(feat: Tensor) -> torch.dtype:
    """The accumulation type of every path: float64 for float64, float32 otherwise."""
    return torch.float64 if feat.dtype == torch.float64 else torch.float32


def _preactivation(logits: Tensor, noise: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    z = logits.to(dtype)
    return z if noise is None else (z + noise.to(dtype)) / temperature


def masked_merge_reference(
    feat: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pure PyTorch masked merge; gradients come from autograd (straight-through in training)."""
    check_merge_inputs(feat, logits, coarse, noise, temperature)
    z = _preactivation(logits, noise, temperature, acc_dtype(feat))
    hard = (z >= 0).to(z.dtype)
    if noise is None:
        mask = hard.to(feat.dtype)
    else:
        soft = torch.sigmoid(z)
        # Straight-through: the value is exactly `hard`, the gradient is d soft.
        mask = (hard + (soft - soft.detach())).to(feat.dtype)
    out = feat * mask
    if coarse is not None and out.numel() > 0:  # interpolate refuses an empty output size
        out = out + F.interpolate(coarse, size=feat.shape[-2:], mode="nearest")
    return out, mask


def nearest_source_indices(in_size: int, out_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Source index of every output index of the nearest resize, computed as F.interpolate does:
    min(floor(dst * scale), in - 1) with scale = in / out, all in float32."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    # The 0-d CPU scale is a scalar operand (no copy to the device: a CUDA graph captures this).
    return (dst * scale).floor().long().clamp_(max=in_size - 1)


def _selection(in_size: int, out_size: int, like: Tensor) -> Tensor:
    """(out, in) one-hot matrix of the nearest resize along one axis."""
    src = nearest_source_indices(in_size, out_size, like.device)
    return F.one_hot(src, in_size).to(like.dtype)


def nearest_resize_adjoint(grad: Tensor, size: tuple[int, int] | list[int]) -> Tensor:
    """Adjoint of nearest_resize(x, grad.shape[-2:]) for x of spatial `size`: sums each footprint.

    The transposed one-hot selection matrices in float64 (no TF32 rounding), exact on every device;
    PyTorch's CUDA upsample_nearest2d_backward inverts the index map in float and misses some
    footprints.
    """
    acc = grad.to(torch.float64)
    rows = _selection(size[0], grad.shape[-2], acc)
    cols = _selection(size[1], grad.shape[-1], acc)
    return (rows.transpose(0, 1) @ acc @ cols).to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# The op's Python kernels: the fallback for devices without a compiled kernel, and fake kernels.


def memory_format(feat: Tensor) -> torch.memory_format:
    """The layout every output takes: feat's (channels_last stays channels_last, else contiguous)."""
    fmt = suggest_memory_format(feat)
    return torch.channels_last if fmt == torch.channels_last else torch.contiguous_format


def mask_and_coarse_grads(
    grad_out: Tensor,
    grad_mask: Tensor | None,
    features: Tensor,
    logits: Tensor,
    z: Tensor,
    noise: Tensor | None,
    temperature: float,
    coarse_size: list[int],
    fmt: torch.memory_format,
) -> tuple[Tensor, Tensor]:
    """The gradients of the merge's tail, which both ops end with: ``(grad_logits, grad_coarse)``.

    ``grad_logits`` is the straight-through gradient of sum_C(grad_out * features) + grad_mask
    (zero in evaluation, where the mask is a constant); ``grad_coarse`` the adjoint of the nearest
    resize in memory format ``fmt`` (empty when ``coarse_size`` is []). ``grad_out`` and
    ``features`` are in the features' dtype, ``z`` is the mask's pre-activation in the accumulation
    type.
    """
    if noise is None:
        grad_logits = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    else:
        acc = z.dtype
        soft = torch.sigmoid(z)
        dot = (grad_out.to(acc) * features.to(acc)).sum(1, keepdim=True)
        if grad_mask is not None:
            dot = dot + grad_mask.to(acc)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_logits.copy_(dot * soft * (1 - soft) / temperature)
    if coarse_size:
        grad_coarse = nearest_resize_adjoint(grad_out, coarse_size).contiguous(memory_format=fmt)
    else:
        grad_coarse = features.new_empty(0)
    return grad_logits, grad_coarse


def empty_coarse_grad(feat: Tensor, coarse_size: list[int]) -> Tensor:
    """An uninitialised grad_coarse shaped and laid out as the kernels return it (fake kernels)."""
    if not coarse_size:
        return feat.new_empty(0)
    n, c = feat.shape[:2]
    return torch.empty(
        (n, c, *coarse_size), dtype=feat.dtype, device=feat.device, memory_format=memory_format(feat)
    )


def _forward_fallback(
    feat: Tensor, logits: Tensor, coarse: Tensor | None, noise: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    fmt = memory_format(feat)
    with torch.no_grad():
        out, mask = masked_merge_reference(feat, logits, coarse, noise=noise, temperature=temperature)
    return out.contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)


def _backward_fallback(
    grad_out: Tensor,
    grad_mask: Tensor | None,
    feat: Tensor,
    logits: Tensor,
    noise: Tensor | None,
    temperature: float,
    coarse_size: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    fmt = memory_format(feat)
    z = _preactivation(logits, noise, temperature, acc_dtype(feat))
    grad_out = grad_out.to(feat.dtype)
    grad_feat = (grad_out * (z >= 0).to(feat.dtype)).contiguous(memory_format=fmt)
    grad_logits, grad_coarse = mask_and_coarse_grads(
        grad_out, grad_mask, feat, logits, z, noise, temperature, coarse_size, fmt
    )
    return grad_feat, grad_logits, grad_coarse


def _forward_fake(
    feat: Tensor, logits: Tensor, coarse: Tensor | None, noise: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    check_merge_inputs(feat, logits, coarse, noise, temperature)
    fmt = memory_format(feat)
    n, _, h, w = feat.shape
    return (
        torch.empty_like(feat, memory_format=fmt),
        torch.empty((n, 1, h, w), dtype=feat.dtype, device=feat.device, memory_format=fmt),
    )


def _backward_fake(
    grad_out: Tensor,
    grad_mask: Tensor | None,
    feat: Tensor,
    logits: Tensor,
    noise: Tensor | None,
    temperature: float,
    coarse_size: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_feat = torch.empty_like(feat, memory_format=memory_format(feat))
    return grad_feat, grad_logits, empty_coarse_grad(feat, coarse_size)


def _setup_context(ctx, inputs, output) -> None:
    feat, logits, coarse, noise, temperature = inputs
    ctx.save_for_backward(feat, logits, noise)
    ctx.temperature = temperature
    ctx.coarse_size = [] if coarse is None else list(coarse.shape[-2:])


def _backward(ctx, grad_out: Tensor | None, grad_mask: Tensor | None):
    feat, logits, noise = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(feat)
    grad_feat, grad_logits, grad_coarse = torch.ops.aim.masked_merge_backward(
        grad_out, grad_mask, feat, logits, noise, ctx.temperature, ctx.coarse_size
    )
    return grad_feat, grad_logits, grad_coarse if ctx.coarse_size else None, None, None


def _register() -> None:
    lib = impl_library()
    # Backend kernels of aim_ext._C (CPU, CUDA) take precedence over this catch-all.
    lib.impl("masked_merge", _forward_fallback, "CompositeExplicitAutograd")
    lib.impl("masked_merge_backward", _backward_fallback, "CompositeExplicitAutograd")
    torch.library.register_fake("aim::masked_merge", _forward_fake, lib=lib)
    torch.library.register_fake("aim::masked_merge_backward", _backward_fake, lib=lib)
    torch.library.register_autograd("aim::masked_merge", _backward, setup_context=_setup_context, lib=lib)
    torch.library.register_autograd(
        "aim::masked_merge_backward",
        refuse_double_backward("masked_merge"),
        setup_context=no_context,
        lib=lib,
    )


_register()


# ---------------------------------------------------------------------------------------------
# Public API.


def masked_merge(
    feat: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Binary Gumbel mask (Eq. 2), masked features (Eq. 3) plus the upsampled coarse map.

    Returns ``(out, mask)``: ``out`` is (N, C, H, W) in feat's dtype and memory format, ``mask``
    the (N, 1, H, W) binary mask in feat's dtype. ``noise=None`` gives the evaluation mask (no
    gradient to the logits); training passes noise, or zeros to train without noise (the
    straight-through gradient of sigmoid(logits / temperature) remains).
    """
    check_merge_inputs(feat, logits, coarse, noise, temperature)
    if torch.onnx.is_in_onnx_export():
        return masked_merge_reference(feat, logits, coarse, noise=noise, temperature=temperature)
    return torch.ops.aim.masked_merge(feat, logits, coarse, noise, float(temperature))


def logistic_noise(like: Tensor, eps: float = 1e-6) -> Tensor:
    """Float32 Logistic(0, 1) noise shaped like `like`: the difference of two Gumbel(0, 1) draws."""
    u = torch.rand_like(like, dtype=torch.float32).clamp_(eps, 1 - eps)
    return torch.log(u) - torch.log1p(-u)
