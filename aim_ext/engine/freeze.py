"""Partial fine-tuning: freeze the backbone levels below a feature level (weights and BN statistics).

The same rule applies to a vanilla timm model and to an AIM model's backbone, so both train with the
same recipe. Frozen modules stay in evaluation mode while the rest trains: their BatchNorm layers use
the pretrained running statistics and never update them.
"""

from __future__ import annotations

from torch import nn

from aim_ext.models import MaskingModel

FROZEN = "_aim_frozen"


def _feature_modules(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The backbone and the names of the modules that end each feature level, level 0 first."""
    if isinstance(model, MaskingModel):
        return model.backbone, [info["module"] for info in model.backbone.feature_info.info]
    return model, [info["module"] for info in model.feature_info]


def freeze_levels(model: nn.Module, levels: int) -> list[str]:
    """Freeze every backbone layer up to the end of feature level ``levels - 1`` (stem included);
    returns the frozen module names. ``levels`` 0 freezes nothing."""
    if levels == 0:
        return []
    backbone, ends = _feature_modules(model)
    if not 0 < levels < len(ends):
        raise ValueError(
            f"freeze_levels={levels}: the backbone has feature levels 0..{len(ends) - 1}; freezing must "
            f"leave the top level trainable (choose 0..{len(ends) - 1})"
        )
    last = ends[levels - 1].replace(".", "_")
    frozen: list[str] = []
    # Modules that own parameters or buffers (and leaves), in registration order (the forward order
    # of timm's CNN backbones), up to the end of the last frozen level's module. timm's
    # features_only wrappers write '.' as '_' in module names.
    for name, module in backbone.named_modules():
        key = name.replace(".", "_")
        if frozen and _past(frozen[-1], last, key):
            break
        owns_state = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if owns_state or next(module.children(), None) is None:
            for parameter in module.parameters(recurse=False):  # its children decide for themselves
                parameter.requires_grad_(False)
            setattr(module, FROZEN, True)
            frozen.append(key)
    if not any(_inside(k, last) for k in frozen):
        raise ValueError(
            f"freeze_levels={levels}: the backbone has no module {ends[levels - 1]!r} (the end of "
            f"feature level {levels - 1}) among its modules; cannot tell where to stop freezing"
        )
    return frozen


def _inside(key: str, last: str) -> bool:
    return key == last or key.startswith(last + "_")


def _past(previous: str, last: str, key: str) -> bool:
    """True once the walk has left the subtree of ``last`` after visiting it."""
    return _inside(previous, last) and not _inside(key, last)


def keep_frozen_in_eval(model: nn.Module) -> None:
    """After ``model.train()``: put the frozen modules back in evaluation mode (not their children,
    which are marked themselves when they are frozen)."""
    for module in model.modules():
        if getattr(module, FROZEN, False):
            module.training = False
