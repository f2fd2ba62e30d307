"""Folding a model for inference: BatchNorm into the convolution before it, and the guard that keeps
a folded model out of training.

A BatchNorm in evaluation mode is an affine map per channel, y = (x - mean) * g / sqrt(var + eps)
+ beta, so after a convolution it folds into that convolution's weight and bias. The arithmetic
runs in float64 and is rounded once to the convolution's dtype, so a model folded in float32 and
cast to half precision afterwards rounds as the unfolded one would.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter

import torch
import torch.fx
from timm.utils.model import reparameterize_model
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

INFERENCE_ONLY = "fused_for_inference"


def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A new convolution computing bn(conv(x)) with ``bn``'s running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"cannot fold {bn} into {conv}: {bn.num_features} != {conv.out_channels} channels")
    f64 = torch.float64
    scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach().to(f64)
    shift = -bn.running_mean.to(f64) * scale
    if bn.affine:
        shift = shift + bn.bias.detach().to(f64)
    bias = conv.bias.detach().to(f64) if conv.bias is not None else torch.zeros_like(shift)
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        weight = conv.weight.detach().to(f64) * scale.view(-1, 1, 1, 1)
        folded.weight.copy_(weight.to(conv.weight.dtype))
        folded.bias.copy_((bias * scale + shift).to(conv.weight.dtype))
    return folded.train(conv.training)


class _BatchNormLeaves(torch.fx.Tracer):
    """Traces a model keeping every BatchNorm (and timm's BatchNormAct2d) as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _after_norm(bn: _BatchNorm) -> nn.Module:
    """What is left of ``bn`` once folded: nothing, or timm's BatchNormAct2d's dropout and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm whose input is a Conv2d's output read by nothing else, the
    two modules each called once (a module shared between call sites stays, and so does one a hook
    watches); return how many were folded. The data flow comes from a torch.fx trace of ``model``;
    where a module does not trace (control flow on tensors, timm's feature wrappers), each of its
    children is traced and folded on its own, so only pairs of siblings in an untraceable module
    stay unfolded."""
    return _fold(model, [])


def _fold(module: nn.Module, untraced: list[nn.Module]) -> int:
    """`fold_batch_norms`, collecting the modules that do not trace in ``untraced``."""
    try:
        graph = _BatchNormLeaves().trace(module)
    except Exception:  # noqa: BLE001 - fx raises many kinds; fold what each child holds instead
        untraced.append(module)
        return sum(_fold(child, untraced) for child in module.children())
    pairs = _conv_bn_pairs(module, graph)
    for conv_name, bn_name, conv, bn in pairs:
        _set_submodule(module, conv_name, fold_conv_bn(conv, bn))
        _set_submodule(module, bn_name, _after_norm(bn))
    return len(pairs)


def _conv_bn_pairs(model: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str, nn.Conv2d, _BatchNorm]]:
    """The (conv name, BatchNorm name, conv, BatchNorm) pairs of a traced ``model`` that fold."""
    called = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(id(model.get_submodule(n.target)) for n in called)
    pairs = []
    for node in called:
        bn = model.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if (
            not isinstance(bn, _BatchNorm)
            or not isinstance(source, torch.fx.Node)
            or source.op != "call_module"
        ):
            continue
        conv = model.get_submodule(source.target)
        if (
            type(conv) is nn.Conv2d
            and len(source.users) == 1
            and calls[id(conv)] == calls[id(bn)] == 1
            and bn.running_mean is not None
            and not _hooked(conv)
            and not _hooked(bn)
        ):
            pairs.append((source.target, node.target, conv, bn))
    return pairs


def _hooked(module: nn.Module) -> bool:
    """Whether a hook watches ``module`` (timm's FeatureHookNet collects features so): replacing
    it would lose the hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def fold_for_inference(module: nn.Module, name: str | None = None) -> nn.Module:
    """timm's own re-parameterisations (``reparameterize_model``), then `fold_batch_norms`, in
    place; returns ``module`` in evaluation mode. BatchNorms left unfolded because torch.fx cannot
    trace the module holding them are reported once, in one line naming ``name`` (the model)."""
    module.eval()
    reparameterize_model(module, inplace=True)
    untraced: list[nn.Module] = []
    _fold(module, untraced)
    # A BatchNorm child of a module that did not trace stays: its pair was never seen.
    holders = [m for m in untraced if any(isinstance(c, _BatchNorm) for c in m.children())]
    count = sum(isinstance(c, _BatchNorm) for m in holders for c in m.children())
    if count:
        classes = ", ".join(sorted({type(m).__name__ for m in holders}))
        warnings.warn(
            f"fuse_for_inference: {count} BatchNorm(s) of {name or type(module).__name__} stay unfolded "
            f"(torch.fx cannot trace {classes}): each costs one more pass over its feature map; "
            "the outputs are the same",
            RuntimeWarning,
            stacklevel=3,
        )
    return module


def make_inference_only(model: nn.Module) -> nn.Module:
    """Mark ``model`` as fused for inference: its parameters stop requiring gradients, ``.train()``
    raises, and a forward pass that would record gradients raises."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, INFERENCE_ONLY, True)
    # An instance attribute (a partial, which pickles) shadows nn.Module.train; eval() still works.
    model.train = functools.partial(_refuse_training, model)
    model.register_forward_pre_hook(_refuse_gradients)
    return model


def is_inference_only(model: nn.Module) -> bool:
    return bool(getattr(model, INFERENCE_ONLY, False))


def _refuse_training(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            f"this {type(self).__name__} is fused for inference (BatchNorm folded into convolutions): "
            "it cannot train; train the model you passed to aim_ext.fuse_for_inference"
        )
    return nn.Module.train(self, False)


def _refuse_gradients(module: nn.Module, args: tuple) -> None:
    if not torch.is_grad_enabled():
        return
    asks = any(isinstance(a, Tensor) and a.requires_grad for a in args) or any(
        p.requires_grad for p in module.parameters()
    )
    if asks:
        raise RuntimeError(
            f"this {type(module).__name__} is fused for inference and computes no gradients; "
            "use the unfused model for gradients (GradCAM, training), or run under torch.no_grad()"
        )
