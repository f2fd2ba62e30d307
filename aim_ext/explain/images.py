"""Explain anyone's images with a trained model: its top classes with their names, every stage's
mask, the merged mask at image resolution and, optionally, GradCAM on P_T; the figure of one image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from aim_ext.data.common import to_rgb
from aim_ext.explain.attributions import attribute
from aim_ext.explain.epg import resize_maps
from aim_ext.explain.figures import _grid, _masked, _overlay, _save, _show, _upsample_mask, to_display
from aim_ext.metrics import mask_areas, merged_mask
from aim_ext.models import MaskingModel

MIN_SIDE = 16  # pixels: smaller images hold too little to classify


def read_image(path: str | Path):
    """The image file as a PIL RGB image, as aim-explain reads it (transparent parts over white), or
    a ValueError naming why it cannot be used (missing, unreadable, empty, not an image, truncated,
    too small)."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _on_white(image)
    except FileNotFoundError:
        raise ValueError("not found") from None
    except (PermissionError, IsADirectoryError) as error:
        raise ValueError(f"cannot be read ({error.strerror})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # not an image, truncated
        if Path(path).stat().st_size == 0:
            raise ValueError("an empty file, not an image") from None
        raise ValueError(
            f"not a readable image ({str(error).splitlines()[0] if str(error) else 'unreadable'})"
        ) from None
    if min(rgb.size) < MIN_SIDE:
        raise ValueError(f"too small ({rgb.size[0]}x{rgb.size[1]} pixels; at least {MIN_SIDE} on each side)")
    return rgb


def _on_white(image):
    """RGB (`to_rgb`: 16-bit and CMYK files included), with any transparent parts (RGBA, LA, a
    palette's transparent colour) shown over white, as a viewer shows them, instead of the black or
    arbitrary colour under zero alpha."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return to_rgb(image)


@dataclass
class Explanation:
    """What a model says about a batch of N images."""

    logits: Tensor  # (N, classes)
    probabilities: Tensor  # (N, classes), softmax of the logits
    top: list[list[tuple[str, float]]]  # per image: the top-k (label name, probability)
    masks: list[Tensor]  # per stage, top stage first: (N, 1, h, w) binary masks; [] for a vanilla model
    merged: Tensor | None  # (N, 1, H, W) bool: the masks' union at image resolution (AIM only)
    gradcam: Tensor | None  # (N, H, W): GradCAM of the top class on P_T (or the last map), when asked
    stage_names: list[str]

    def active_fractions(self) -> Tensor:
        """(N, stages + 1): each stage mask's active share, then the merged mask's."""
        if not self.masks:
            return torch.zeros(self.logits.shape[0], 0)
        return torch.cat([mask_areas(self.masks), mask_areas([self.merged])], dim=1)


def label_names(model: nn.Module) -> list[str]:
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def explain_images(model: nn.Module, images: Tensor, *, top_k: int = 5, gradcam: bool = False) -> Explanation:
    """`model` (put in eval mode) on normalised `images` (N, 3, H, W)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    model.eval()
    with torch.no_grad():
        if isinstance(model, MaskingModel):
            logits, masks = model.predict(images)
        else:
            logits, masks = model(images), []
    probabilities = logits.float().softmax(dim=1)
    names = label_names(model)
    k = min(top_k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    top = [
        [(names[i], float(p)) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=True)]
        for row_i, row_p in zip(indices, values, strict=True)
    ]
    merged = None
    if masks:
        merged = F.interpolate(merged_mask(masks).float(), size=images.shape[-2:], mode="nearest") > 0
    heat = None
    if gradcam:
        heat = resize_maps(attribute(model, images, None, "gradcam", use_predicted=True), images.shape[-2:])
    stage_names = [f"stage {i}" for i in model.stage_indices] if isinstance(model, MaskingModel) else []
    return Explanation(logits, probabilities, top, list(masks), merged, heat, stage_names)


def explanation_figure(
    image: Tensor,
    explanation: Explanation,
    index: int,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str = "",
) -> Path:
    """One image's PNG: the image with its top class | each stage's mask | the merged mask over the
    image | GradCAM (when computed)."""
    shown = to_display(image, mean, std)[0]
    size = shown.shape[:2]
    e = explanation
    panels = 1 + len(e.masks) + (1 if e.merged is not None else 0) + (1 if e.gradcam is not None else 0)
    fig, axes = _grid(1, panels)
    axes = axes[0]
    label, probability = e.top[index][0]
    _show(axes[0], shown, f"{title}\n{label} {probability:.0%}" if title else f"{label} {probability:.0%}")
    col = 1
    for name, mask in zip(e.stage_names, e.masks, strict=True):
        m = mask[index]
        _show(
            axes[col],
            _masked(shown, _upsample_mask(m, size)),
            f"{name} {tuple(m.shape[-2:])} {m.float().mean():.0%}",
        )
        col += 1
    if e.merged is not None:
        merged = e.merged[index, 0].cpu().numpy().astype(np.float32)
        _show(axes[col], _masked(shown, merged), f"merged {merged.mean():.0%}")
        col += 1
    if e.gradcam is not None:
        _overlay(axes[col], shown, e.gradcam[index].clamp_min(0).cpu().numpy(), f"GradCAM ({label})", None)
    return _save(fig, path)
