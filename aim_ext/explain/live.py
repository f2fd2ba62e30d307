"""Explanations served one request at a time to many callers: what `aim-app` shows of one image.

`LiveModel` wraps one loaded model shared by every request. Its model work (the prediction, the
masks and GradCAM) runs under the model's own lock: GradCAM hooks the model while it runs, so a
second forward pass at the same time would be seen by the hook. Concurrent requests therefore get
the answers sequential ones get. The panels are plain arrays, so the opacity can change without
running the model again.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from aim_ext.explain.figures import to_display
from aim_ext.explain.images import explain_images, read_image
from aim_ext.models import MaskingModel

# Images with more pixels than this are refused before they are decoded (a 12000 x 8000 photo is
# 96 M pixels); smaller ones are resized by the model's own transform.
MAX_PIXELS = 50_000_000
SHOWN_SIDE = 224  # the panels are enlarged to at least this many pixels on their shorter side


@dataclass
class LiveExplanation:
    """One image through one model: the model's input as shown, and what it says about it."""

    model: str  # the model's name in the page
    top: list[tuple[str, float]]  # (label, probability), most probable first
    image: np.ndarray  # (H, W, 3) float in [0, 1]: the model's input, de-normalised
    masks: list[tuple[str, np.ndarray]]  # (name, (H, W) float 0/1), each stage then "merged"
    active: list[tuple[str, float]]  # (name, active fraction of the mask), as masks
    gradcam: np.ndarray | None  # (H, W), >= 0

    def mask_overlays(self, opacity: float) -> list[tuple[np.ndarray, str]]:
        """Each mask over the image: positions it switches off darkened by ``opacity`` (0 shows the
        image alone, 1 blacks them out); captioned with the mask's name and active share."""
        shares = dict(self.active)
        return [
            (_uint8(self.image * (1 - opacity * (1 - mask[..., None]))), f"{name} {shares[name]:.0%}")
            for name, mask in self.masks
        ]

    def gradcam_overlay(self, opacity: float) -> np.ndarray | None:
        """GradCAM of the top class over the image, the heat map blended in at ``opacity``."""
        if self.gradcam is None:
            return None
        peak = float(self.gradcam.max())
        heat = colormaps["jet"](self.gradcam / peak if peak > 0 else self.gradcam)[..., :3]
        return _uint8((1 - opacity) * self.image + opacity * heat)


class LiveModel:
    """One model and its preprocessing, shared by every request; `explain` is safe from any thread."""

    def __init__(self, model: nn.Module, name: str, *, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.name = name
        self.device = torch.device(device)
        self.data = resolve_data_config({}, model=self.model)
        self.transform = create_transform(**self.data)
        self.is_aim = isinstance(model, MaskingModel)
        self._lock = threading.Lock()

    def explain(self, image: Image.Image, *, top_k: int = 5) -> LiveExplanation:
        """``image`` (RGB, any size) through the model: top-k, masks (AIM) and GradCAM on P_T (AIM)
        or on the last feature map (a vanilla model)."""
        batch = self.transform(image).unsqueeze(0).to(self.device)
        with self._lock:
            e = explain_images(self.model, batch, top_k=top_k, gradcam=True)
        shown = to_display(batch.cpu(), self.data["mean"], self.data["std"])[0]
        size = shown.shape[:2]
        masks, active = [], []
        if e.masks:
            fractions = e.active_fractions()[0].tolist()
            names = [*e.stage_names, "merged"]
            for name, mask, fraction in zip(names, [*e.masks, e.merged], fractions, strict=True):
                full = torch.nn.functional.interpolate(mask.float().cpu(), size=size, mode="nearest")
                masks.append((name, full[0, 0].numpy()))
                active.append((name, float(fraction)))
        heat = e.gradcam[0].clamp_min(0).cpu().numpy() if e.gradcam is not None else None
        return LiveExplanation(self.name, e.top[0], shown, masks, active, heat)


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded file as an RGB image (`read_image`: CMYK, 16-bit and transparency handled), or a
    ValueError naming why it cannot be used; images over ``max_pixels`` are refused before they
    are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:
                width, height = header.size
    except Image.DecompressionBombError:
        raise ValueError(f"too large (far over {max_pixels:,} pixels)") from None
    except Exception:  # noqa: BLE001 - read_image names the problem precisely
        width = height = 0
    if width * height > max_pixels:
        raise ValueError(f"too large ({width}x{height} = {width * height:,} pixels; at most {max_pixels:,})")
    return read_image(path)


def _uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] image as uint8, enlarged by a whole factor (nearest) to at least `SHOWN_SIDE` pixels
    on its shorter side, so that a small model input is not shown as a thumbnail."""
    factor = max(1, -(-SHOWN_SIDE // min(image.shape[:2])))
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)
