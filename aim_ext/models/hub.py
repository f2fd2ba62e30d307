"""The torch.hub entry points' work (the repository's `hubconf.py` names them): an AIM architecture
of `ARCHITECTURES`, new or loaded from a saved model checked by SHA-256, carrying its transform."""

from __future__ import annotations

from pathlib import Path

from timm.data import create_transform, resolve_data_config
from torch import nn

from aim_ext.cache import sha256_file
from aim_ext.models.checkpoint import architecture
from aim_ext.models.factory import create_model
from aim_ext.models.registry import ARCHITECTURES
from aim_ext.models.saved import WEIGHTS_FILE, ModelFileError, load_model


def hub_model(
    name: str,
    *,
    num_classes: int | None = None,
    pretrained: str | Path | None = None,
    sha256: str | None = None,
    **kwargs,
) -> nn.Module:
    """`name` (e.g. "convnext_tiny_aim2") in eval mode, with `model.transform`, the evaluation
    transform of a PIL image (timm's, from the model's input size, mean and std).

    `pretrained`: a saved-model folder (`aim_ext.save_pretrained`, an aim-train run's `model/`) or
    an aim-train checkpoint; with `sha256`, the weights file must have that hash. Without it, a new
    model of `num_classes` classes (default 1000); `kwargs` go to `create_model`."""
    backbone, stop_stage = ARCHITECTURES[name]
    if pretrained is None:
        model = create_model(backbone, num_classes=num_classes or 1000, stop_stage=stop_stage, **kwargs)
    else:
        path = Path(pretrained)
        if sha256 is not None:
            _check_sha256(path / WEIGHTS_FILE if path.is_dir() else path, sha256)
        model = load_model(path)
        expected = f"{backbone}+AIM[{stop_stage}]"
        if architecture(model) != expected:
            raise ModelFileError(f"{path} holds a {architecture(model)} model, not {expected} ({name})")
        if num_classes is not None and num_classes != model.num_classes:
            raise ModelFileError(
                f"{path} classifies {model.num_classes} classes, not num_classes={num_classes}"
            )
    model.eval()
    model.transform = create_transform(**resolve_data_config({}, model=model))
    return model


def _check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ModelFileError(f"model not found: {path}")
    digest = sha256_file(path)
    if digest != expected.lower():
        raise ModelFileError(f"{path} has SHA-256 {digest}, not the expected {expected}")
