"""Backbone weights from a local file (`--pretrained-file`), loaded strictly.

Besides timm's own layout, torchvision's ImageNet MobileNetV2 is accepted for timm's
`mobilenetv2_100`: the two are the same network under other names, with their tensors in the same
order, so the keys map by position (every shape checked).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from aim_ext.models.checkpoint import load_checkpoint
from aim_ext.models.masking import MaskingModel

TORCHVISION_MOBILENET_V2_FIRST_KEY = "features.0.0.weight"


def torchvision_mobilenet_v2_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision `mobilenet_v2` weights to timm `mobilenetv2_100` keys."""
    with torch.device("meta"):
        reference = timm.create_model("mobilenetv2_100").state_dict()
    if len(state) != len(reference):
        raise ValueError(
            f"not a torchvision MobileNetV2 state dict: {len(state)} tensors, timm's mobilenetv2_100 has "
            f"{len(reference)}"
        )
    mapped = {}
    for (source, tensor), (target, expected) in zip(state.items(), reference.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"torchvision key {source} {tuple(tensor.shape)} does not fit timm key {target} "
                f"{tuple(expected.shape)}"
            )
        mapped[target] = tensor
    return mapped


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load pretrained backbone weights strictly from a file in timm's layout of the full network
    (or torchvision's MobileNetV2): every backbone tensor from the file, or an error listing the
    missing and unexpected keys. The file's classifier is not used (the task has its own classes)."""
    path = Path(path)
    state = load_checkpoint(path)
    state = state.get("model", state.get("state_dict", state))
    if TORCHVISION_MOBILENET_V2_FIRST_KEY in state:
        state = torchvision_mobilenet_v2_to_timm(state)
    names = _file_to_model_keys(model)  # file (full timm layout) key -> key of the part we load
    target = model.backbone if isinstance(model, MaskingModel) else model
    weights = {names[k]: v for k, v in state.items() if k in names}
    missing = sorted(set(names.values()) - set(weights))
    unexpected = sorted(set(state) - set(names) - _unused_keys(model))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the backbone of {_name(model)}: missing keys {_preview(missing)}, "
            f"unexpected keys {_preview(unexpected)}"
        )
    target.load_state_dict(weights, strict=False)


def _name(model: nn.Module) -> str:
    return model.backbone_name if isinstance(model, MaskingModel) else model.pretrained_cfg["architecture"]


def _full_keys(model: nn.Module) -> list[str]:
    with torch.device("meta"):
        return list(timm.create_model(_name(model)).state_dict())


def _file_to_model_keys(model: nn.Module) -> dict[str, str]:
    """Full-network keys of the tensors we load, mapped to the model's own keys. timm's
    features_only wrapper flattens nested module names (stages.0 -> stages_0), so an AIM backbone's
    keys are matched with '.' and '_' taken as equal."""
    if not isinstance(model, MaskingModel):
        unused = _unused_keys(model)
        return {k: k for k in _full_keys(model) if k not in unused}
    by_shape = {k.replace("_", "."): k for k in _full_keys(model)}
    mapping = {}
    for key in model.backbone.state_dict():
        full = by_shape.get(key.replace("_", "."))
        if full is None:
            raise ValueError(f"backbone key {key} has no counterpart in timm's {_name(model)}")
        mapping[full] = key
    return mapping


def _unused_keys(model: nn.Module) -> set[str]:
    """Keys of the full timm network that the task does not take from a pretrained file: its
    classifier, and for an AIM backbone (features_only) also the layers after the last feature."""
    if isinstance(model, MaskingModel):
        return set(_full_keys(model)) - set(_file_to_model_keys(model))
    prefix = model.pretrained_cfg.get("classifier", "classifier") + "."
    return {k for k in _full_keys(model) if k.startswith(prefix)}


def _preview(keys: list[str], count: int = 10) -> str:
    return str(keys[:count]) + (f" and {len(keys) - count} more" if len(keys) > count else "")
