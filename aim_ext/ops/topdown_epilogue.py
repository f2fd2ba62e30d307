"""The epilogue of a top-down stage: everything after the feature branch's 3x3 convolution.

    T_l(S_l) = GELU(LayerNorm_C(conv))                  the end of the feature branch
    B_l      = G(A_l)                                   (Eq. 2) binary Gumbel-softmax
    P_l      = T_l(S_l) * B_l + nearest_resize(P_{l+1}) (Eq. 3 and the top-down merge)

For evaluation, ``torch.ops.aim.topdown_epilogue_inference`` computes P_l and B_l (mask
1[A_l >= 0], no noise) with the same kernels without writing T_l(S_l), which only training's
auxiliary heads read; it computes no gradients.

One op, ``torch.ops.aim.topdown_epilogue``, like ``masked_merge``: a C++ CPU kernel and a CUDA
kernel in ``aim_ext._C`` that read the convolution output once and write P_l, B_l and T_l(S_l)
once, and the pure PyTorch reference below (PyTorch's own LayerNorm and exact erf GELU, then the
masked merge reference), which also serves devices without a compiled kernel.

Precision: LayerNorm and GELU run in float32 (float64 for float64 input) with the weights in
their own dtype, and T_l(S_l) is rounded once to the input's dtype; the merge then rounds as
``masked_merge`` does. The reference computes exactly this, so float32 and float64 results agree
to rounding and half-precision ones to one unit in the last place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.ops.library import (
    impl_library,
    no_context,
    refuse_backward,
    refuse_double_backward,
    refuse_gradient_inputs,
)
from aim_ext.ops.masked_merge import (
    _preactivation,
    acc_dtype,
    check_merge_inputs,
    empty_coarse_grad,
    mask_and_coarse_grads,
    masked_merge_reference,
    memory_format,
)

__all__ = [
    "LAYER_NORM_EPS",
    "check_epilogue_inputs",
    "layer_norm_gelu",
    "topdown_epilogue",
    "topdown_epilogue_inference",
    "topdown_epilogue_reference",
]

# timm's LayerNorm2d default, which the feature branch uses.
LAYER_NORM_EPS = 1e-6
OP = "topdown_epilogue"


def check_epilogue_inputs(conv: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Raise a ValueError/TypeError naming the problem if the LayerNorm arguments do not fit ``conv``."""
    if conv.dim() != 4:
        raise ValueError(f"{OP}: conv must be 4-D (N, C, H, W), got shape {tuple(conv.shape)}")
    if not conv.is_floating_point():
        raise TypeError(f"{OP}: conv must be a floating-point tensor, got {conv.dtype}")
    channels = conv.shape[1]
    for name, t in (("ln_weight", weight), ("ln_bias", bias)):
        if t.shape != (channels,):
            raise ValueError(
                f"{OP}: {name} must have shape ({channels},) (one value per channel of conv), "
                f"got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != conv.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but conv is on {conv.device}")


def _check_all(conv, weight, bias, logits, coarse, noise, temperature, eps) -> None:
    check_epilogue_inputs(conv, weight, bias)
    check_merge_inputs(conv, logits, coarse, noise, temperature, op=OP, feat_name="conv")
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0, got {eps}")


def layer_norm_gelu(
    conv: Tensor, weight: Tensor, bias: Tensor, eps: float = LAYER_NORM_EPS, conv_bias: Tensor | None = None
) -> Tensor:
    """GELU(LayerNorm over channels) in float32 (float64 for float64), rounded once to conv's dtype;
    ``conv_bias`` (C,), the convolution's bias, is added to conv first in conv's dtype (the sum
    rounded once, as a convolution with its bias writes it: the same rounding on every path)."""
    check_epilogue_inputs(conv, weight, bias)
    acc = acc_dtype(conv)
    if conv_bias is not None:
        if conv_bias.shape != (conv.shape[1],):
            raise ValueError(f"conv_bias must have shape ({conv.shape[1]},), got {tuple(conv_bias.shape)}")
        conv = conv + conv_bias.to(conv.dtype)[:, None, None]
    x = conv.to(acc)
    x = x.permute(0, 2, 3, 1)
    normed = F.layer_norm(x, (conv.shape[1],), weight.to(acc), bias.to(acc), eps).permute(0, 3, 1, 2)
    return F.gelu(normed).to(conv.dtype)


def topdown_epilogue_reference(
    conv: Tensor,
    weight: Tensor,
    bias: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    temperature: float = 1.0,
    eps: float = LAYER_NORM_EPS,
    conv_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, mask, features)``: the merged map P_l, the binary mask B_l and T_l(S_l) before masking
    (the auxiliary heads pool it). Differentiable by autograd, straight-through in training.
    ``conv_bias``: the convolution's bias, added to conv first (`topdown_epilogue_inference`'s)."""
    _check_all(conv, weight, bias, logits, coarse, noise, temperature, eps)
    features = layer_norm_gelu(conv, weight, bias, eps, conv_bias)
    out, mask = masked_merge_reference(features, logits, coarse, noise=noise, temperature=temperature)
    return out, mask, features


# ---------------------------------------------------------------------------------------------
# The op's Python kernels: the fallback for devices without a compiled kernel, and fake kernels.


def _forward_fallback(conv, weight, bias, logits, coarse, noise, temperature, eps):
    fmt = memory_format(conv)
    with torch.no_grad():
        out, mask, features = topdown_epilogue_reference(
            conv, weight, bias, logits, coarse, noise=noise, temperature=temperature, eps=eps
        )
    return tuple(t.contiguous(memory_format=fmt) for t in (out, mask, features))


def _inference_fallback(conv, weight, bias, logits, coarse, eps, conv_bias=None):
    fmt = memory_format(conv)
    with torch.no_grad():
        out, mask, _ = topdown_epilogue_reference(
            conv, weight, bias, logits, coarse, eps=eps, conv_bias=conv_bias
        )
    return out.contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)


def _inference_fake(conv, weight, bias, logits, coarse, eps, conv_bias=None):
    out, mask, _ = _forward_fake(conv, weight, bias, logits, coarse, None, 1.0, eps)
    return out, mask


def _backward_fallback(
    grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise, temperature, eps, coarse_size
):
    """The epilogue's gradients written out (no autograd runs below the autograd key), in the
    accumulation type: the independent formula the C++ and CUDA backward kernels are checked against."""
    _check_all(conv, weight, bias, logits, None, noise, temperature, eps)
    fmt, acc = memory_format(conv), acc_dtype(conv)
    channels = (1, -1, 1, 1)
    x = conv.to(acc)
    centred = x - x.mean(1, keepdim=True)
    rstd = torch.rsqrt((centred * centred).mean(1, keepdim=True) + eps)
    xhat = centred * rstd
    w = weight.to(acc).view(channels)
    y = xhat * w + bias.to(acc).view(channels)
    cdf = 0.5 * (1 + torch.erf(y * math.sqrt(0.5)))
    gelu_grad = cdf + y * torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)
    features = (y * cdf).to(conv.dtype)  # T_l(S_l) as the forward stored it
    z = _preactivation(logits, noise, temperature, acc)
    grad_out = grad_out.to(conv.dtype)
    grad_f = grad_out.to(acc) * (z >= 0).to(acc)
    if grad_features is not None:
        grad_f = grad_f + grad_features.to(acc)
    grad_y = grad_f * gelu_grad
    grad_weight = (grad_y * xhat).sum((0, 2, 3)).to(weight.dtype)
    grad_bias = grad_y.sum((0, 2, 3)).to(bias.dtype)
    grad_xhat = grad_y * w
    grad_x = rstd * (
        grad_xhat - grad_xhat.mean(1, keepdim=True) - xhat * (grad_xhat * xhat).mean(1, keepdim=True)
    )
    grad_conv = grad_x.to(conv.dtype).contiguous(memory_format=fmt)
    grad_logits, grad_coarse = mask_and_coarse_grads(
        grad_out, grad_mask, features, logits, z, noise, temperature, coarse_size, fmt
    )
    return grad_conv, grad_weight, grad_bias, grad_logits, grad_coarse


def _forward_fake(conv, weight, bias, logits, coarse, noise, temperature, eps):
    _check_all(conv, weight, bias, logits, coarse, noise, temperature, eps)
    fmt = memory_format(conv)
    n, _, h, w = conv.shape
    mask = torch.empty((n, 1, h, w), dtype=conv.dtype, device=conv.device, memory_format=fmt)
    return torch.empty_like(conv, memory_format=fmt), mask, torch.empty_like(conv, memory_format=fmt)


def _backward_fake(
    grad_out, grad_mask, grad_features, conv, weight, bias, logits, noise, temperature, eps, coarse_size
):
    return (
        torch.empty_like(conv, memory_format=memory_format(conv)),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty(logits.shape, dtype=logits.dtype, device=logits.device),
        empty_coarse_grad(conv, coarse_size),
    )


def _setup_context(ctx, inputs, output) -> None:
    conv, weight, bias, logits, coarse, noise, temperature, eps = inputs
    ctx.save_for_backward(conv, weight, bias, logits, noise)
    ctx.temperature, ctx.eps = temperature, eps
    ctx.coarse_size = [] if coarse is None else list(coarse.shape[-2:])


def _backward(ctx, grad_out, grad_mask, grad_features):
    conv, weight, bias, logits, noise = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(conv)
    grads = torch.ops.aim.topdown_epilogue_backward(
        grad_out,
        grad_mask,
        grad_features,
        conv,
        weight,
        bias,
        logits,
        noise,
        ctx.temperature,
        ctx.eps,
        ctx.coarse_size,
    )
    grad_conv, grad_weight, grad_bias, grad_logits, grad_coarse = grads
    return (
        grad_conv,
        grad_weight,
        grad_bias,
        grad_logits,
        grad_coarse if ctx.coarse_size else None,
        None,
        None,
        None,
    )


def _register() -> None:
    lib = impl_library()
    # Backend kernels of aim_ext._C (CPU, CUDA) take precedence over this catch-all.
    lib.impl("topdown_epilogue", _forward_fallback, "CompositeExplicitAutograd")
    lib.impl("topdown_epilogue_backward", _backward_fallback, "CompositeExplicitAutograd")
    lib.impl("topdown_epilogue_inference", _inference_fallback, "CompositeExplicitAutograd")
    torch.library.register_fake("aim::topdown_epilogue_inference", _inference_fake, lib=lib)
    torch.library.register_autograd(
        "aim::topdown_epilogue_inference",
        refuse_backward("topdown_epilogue_inference"),
        setup_context=no_context,
        lib=lib,
    )
    torch.library.register_fake("aim::topdown_epilogue", _forward_fake, lib=lib)
    torch.library.register_fake("aim::topdown_epilogue_backward", _backward_fake, lib=lib)
    torch.library.register_autograd("aim::topdown_epilogue", _backward, setup_context=_setup_context, lib=lib)
    torch.library.register_autograd(
        "aim::topdown_epilogue_backward", refuse_double_backward(OP), setup_context=no_context, lib=lib
    )


_register()


def topdown_epilogue(
    conv: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    temperature: float = 1.0,
    eps: float = LAYER_NORM_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over channels, GELU, the binary Gumbel mask (Eq. 2), the multiply (Eq. 3) and the
    nearest-upsample-add of ``coarse``, as one op.

    Returns ``(out, mask, features)``, all in conv's dtype and memory format: P_l (N, C, H, W), the
    binary mask B_l (N, 1, H, W) and T_l(S_l) (N, C, H, W) before masking. ``noise`` and
    ``temperature`` are as in :func:`aim_ext.ops.masked_merge`.
    """
    _check_all(conv, ln_weight, ln_bias, logits, coarse, noise, temperature, eps)
    if torch.onnx.is_in_onnx_export():
        return topdown_epilogue_reference(
            conv, ln_weight, ln_bias, logits, coarse, noise=noise, temperature=temperature, eps=eps
        )
    return torch.ops.aim.topdown_epilogue(
        conv, ln_weight, ln_bias, logits, coarse, noise, float(temperature), float(eps)
    )


def topdown_epilogue_inference(
    conv: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    eps: float = LAYER_NORM_EPS,
    conv_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, mask)`` of :func:`topdown_epilogue` in evaluation (mask 1[logits >= 0]), without
    writing the features; no gradients (use :func:`topdown_epilogue` for them). ``conv_bias`` (C,),
    the convolution's bias, is added to conv inside the op (a convolution without its bias saves
    a launch)."""
    _check_all(conv, ln_weight, ln_bias, logits, coarse, None, 1.0, eps)
    refuse_gradient_inputs("topdown_epilogue_inference", conv, ln_weight, ln_bias, logits, coarse, conv_bias)
    if torch.onnx.is_in_onnx_export():
        out, mask, _ = topdown_epilogue_reference(
            conv, ln_weight, ln_bias, logits, coarse, eps=eps, conv_bias=conv_bias
        )
        return out, mask
    return torch.ops.aim.topdown_epilogue_inference(
        conv, ln_weight, ln_bias, logits, coarse, float(eps), conv_bias
    )
