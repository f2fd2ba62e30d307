"""A trained model's weights: loaded safely (weights_only=True) and checked against the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from aim_ext.models.fusion import INFERENCE_ONLY

# Files that are often passed where a checkpoint belongs, known by their first bytes.
OTHER_FILES = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF (WebP) file"),
    (b"{", "a JSON file"),
)


def architecture(model: nn.Module) -> str:
    """A name for the architecture, stored in checkpoints and checked on load."""
    stop = getattr(model, "stop_stage", None)
    name = getattr(model, "backbone_name", None) or model.pretrained_cfg.get(
        "architecture", type(model).__name__
    )
    name = f"{name}+AIM[{stop}]" if stop is not None else name
    options = model.architecture_options() if hasattr(model, "architecture_options") else {}
    if options:
        name += " (" + ", ".join(f"{k} {v}" for k, v in sorted(options.items())) + ")"
    return f"{name} (fused for inference)" if getattr(model, INFERENCE_ONLY, False) else name


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), with a clear error when it is missing or is
    not one (truncated, another format, or a pickle that would run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(10)
    if not head:
        raise ValueError(f"{path} is empty, not a checkpoint")
    kind = next((name for magic, name in OTHER_FILES if head.startswith(magic)), None)
    if head[8:10] == b'{"':  # safetensors: an 8-byte header length, then the JSON header
        kind = "a safetensors file (give its folder, with config.json, as a saved model)"
    if kind:
        raise ValueError(f"{path} is {kind}, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds, from UnpicklingError to RuntimeError
        text = str(error).strip()
        if head.startswith(b"PK") and ("central directory" in text or "zip archive" in text):
            raise ValueError(
                f"{path} is a truncated or damaged checkpoint (its zip archive is incomplete)"
            ) from None
        if isinstance(error, EOFError) or "Ran out of input" in text:
            raise ValueError(f"{path} is a truncated checkpoint (it ends early)") from None
        reason = text.splitlines()[0][:160] if text else type(error).__name__
        raise ValueError(f"{path} is not a checkpoint aim-ext can load safely ({reason})") from None


def load_model_state(model: nn.Module, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Load weights strictly; a checkpoint of another architecture or with other keys is an error."""
    expected = architecture(model)
    found = state.get("architecture")
    if found is not None and found != expected:
        raise ValueError(f"{source} holds a {found} model, not {expected}")
    weights = state.get("model", state)
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # tensors of other shapes: its first line is only a heading
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise ValueError(f"{source} does not fit {expected}: {details[0] if details else error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not fit {expected}: missing keys {result.missing_keys[:10]}"
            f"{' ...' if len(result.missing_keys) > 10 else ''}, unexpected keys "
            f"{result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """The weights of an aim-train checkpoint or a plain state_dict file, loaded into ``model``
    strictly; a file that does not fit names the missing and unexpected keys."""
    load_model_state(model, load_checkpoint(path), source=str(path))
    return model
