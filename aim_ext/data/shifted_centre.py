"""The shifted-centre split: the paper's test of centre bias (appendix A.6, Figure 10).

Each image is framed as for evaluation (its shorter side resized to image_size / crop_pct), then a
square of side image_size is cropped whose centre is the object's centre moved by
``deviation * image_size`` pixels in one of four directions (right, left, down, up), chosen per
image by a seeded draw. The object then sits off the crop's centre, or is partly cut off. Where
the crop leaves the frame it is filled with the dataset's mean colour (0 after normalisation) and
the object mask with background.

The object's centre is the centre of its bounding box in the object mask, so the dataset must have
object masks (CUB and its derivatives, TuxBirds).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from aim_ext.data.common import MaskedImageDataset
from aim_ext.data.transforms import frame_transform

# The four candidate shifts, (rows, columns) per unit of deviation: right, left, down, up.
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))
DIRECTION_NAMES = ("right", "left", "down", "up")


def object_centre(mask: Tensor) -> tuple[float, float]:
    """The centre (row, column) of the bounding box of ``mask``'s (H, W) object pixels, in pixel
    coordinates (pixel i spans [i, i + 1)); the frame's centre when the mask is empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return mask.shape[0] / 2, mask.shape[1] / 2
    return (rows[0].item() + rows[-1].item() + 1) / 2, (cols[0].item() + cols[-1].item() + 1) / 2


def crop_box(centre: tuple[float, float], size: int) -> tuple[int, int]:
    """(top, left) of the size x size square centred at ``centre`` (rounded to whole pixels)."""
    return round(centre[0] - size / 2), round(centre[1] - size / 2)


def crop_padded(t: Tensor, top: int, left: int, size: int) -> Tensor:
    """``t[..., top:top + size, left:left + size]``, zero wherever that window leaves ``t``."""
    h, w = t.shape[-2:]
    out = t.new_zeros((*t.shape[:-2], size, size))
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = t[..., y0:y1, x0:x1]
    return out


class ShiftedCentre(Dataset):
    """``dataset``'s images cropped off the object's centre (module docstring); samples have the
    same keys as the dataset's. Labels, groups and ids are the dataset's."""

    has_counterfactuals = False
    has_masks = True

    def __init__(
        self,
        dataset: MaskedImageDataset,
        *,
        image_size: int,
        deviation: float,
        crop_pct: float,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        if not getattr(dataset, "has_masks", False):
            raise ValueError(
                f"the shifted-centre test needs object masks to find the object's centre; "
                f"{type(dataset).__name__} has none"
            )
        if not 0 < deviation <= 0.5:
            raise ValueError(f"the deviation is a share of the crop's side in (0, 0.5], got {deviation}")
        self.image_size, self.deviation, self.seed = image_size, deviation, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.frame_side = math.floor(image_size / crop_pct)
        # The dataset as evaluation frames it, before the centre crop: resized and normalised.
        self.frames = copy.copy(dataset)
        self.frames.transform = frame_transform(self.frame_side, interpolation, mean, std)
        generator = torch.Generator().manual_seed(seed)
        self.directions = torch.randint(len(DIRECTIONS), (len(dataset),), generator=generator).tolist()
        self.classes, self.num_classes = dataset.classes, dataset.num_classes
        self.labels, self.ids, self.groups = dataset.labels, dataset.ids, dataset.groups

    def __len__(self) -> int:
        return len(self.directions)

    def candidate_centres(self, mask: Tensor) -> list[tuple[float, float]]:
        """The four candidate crop centres of a frame whose object mask is ``mask`` (H, W)."""
        row, col = object_centre(mask)
        shift = self.deviation * self.image_size
        return [(row + dy * shift, col + dx * shift) for dy, dx in DIRECTIONS]

    def frame(self, index: int) -> dict[str, Any]:
        """The evaluation frame of image ``index`` before cropping: image, mask and the rest."""
        return self.frames[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.frame(index)
        centre = self.candidate_centres(sample["mask"])[self.directions[index]]
        top, left = crop_box(centre, self.image_size)
        sample["image"] = crop_padded(sample["image"], top, left, self.image_size)
        sample["mask"] = crop_padded(sample["mask"], top, left, self.image_size)
        return sample
