"""The Energy Pointing Game (EPG): how much of an attribution map's positive energy lies on the object."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_maps(attributions: Tensor) -> Tensor:
    """(N, H, W) or (N, 1, H, W) -> (N, 1, H, W) float32."""
    if attributions.dim() == 3:
        attributions = attributions.unsqueeze(1)
    if attributions.dim() != 4 or attributions.shape[1] != 1:
        raise ValueError(f"attributions must be (N, H, W) or (N, 1, H, W), got {tuple(attributions.shape)}")
    # float32 even for bf16/fp16 maps: the sums below must not lose the small values of a large image.
    return attributions.float()


def _as_masks(masks: Tensor) -> Tensor:
    """(N, H, W) or (N, 1, H, W) -> (N, H, W) bool."""
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be bool (foreground = True), got {masks.dtype}")
    return masks


def resize_maps(attributions: Tensor, size: tuple[int, int]) -> Tensor:
    """Attribution maps (N, H, W) or (N, 1, H, W) resized bilinearly to (N, *size), float32."""
    maps = _as_maps(attributions)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0]


def energy_pointing_game(attributions: Tensor, masks: Tensor) -> Tensor:
    """Per-image EPG, (N,): the share of the positive attribution energy inside the foreground mask.

    Negatives are clamped to 0, then maps of any spatial size are resized bilinearly to the mask
    (image) size: clamping first keeps the resized map non-negative, so no negative energy leaks
    across the mask's edge.
    EPG = sum inside the mask / total sum. A map without positive energy scores 0 (and still
    counts in a mean). Both tensors are indexed [n, y, x].
    """
    fg = _as_masks(masks)
    if attributions.shape[0] != fg.shape[0]:
        raise ValueError(f"{attributions.shape[0]} attribution maps but {fg.shape[0]} masks")
    energy = resize_maps(attributions.clamp_min(0), fg.shape[-2:])
    total = energy.sum(dim=(1, 2))
    inside = (energy * fg.to(energy.device)).sum(dim=(1, 2))
    # No eps in the denominator: an empty map is exactly 0 and a faint one keeps its exact ratio.
    has_energy = total > 0
    ratio = inside / torch.where(has_energy, total, torch.ones_like(total))
    return torch.where(has_energy, ratio, torch.zeros_like(ratio))
