"""What every dataset shares: records, image and mask loading, error reporting, the validation holdout.

A dataset module parses its on-disk format into a list of ``Record`` and hands it to
``MaskedImageDataset``, which loads, transforms and returns samples as dicts:
``image`` (float C x H x W, normalised), ``label`` (int), ``mask`` (bool H x W, when the dataset has
masks), ``group`` (int, when it has groups) and ``index`` (int).

Bad input is reported by file: a missing root or index file and a row that points to a missing image
raise ``FileNotFoundError`` naming the path when the dataset is built (existence checks are cheap);
a corrupt image raises ``CorruptImageError`` naming the path when it is loaded. With
``skip_bad_images=True`` every image and mask is decoded once when the dataset is built (a JPEG at
reduced scale, which still reads the whole stream), and unreadable ones are dropped with one
``BadImageWarning`` per file and counted in ``num_bad_images``. Missing images still raise: they mean
a wrong root or a mismatched index rather than a few damaged files.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from aim_ext.data.transforms import eval_transform

__all__ = [
    "BadImageWarning",
    "CorruptImageError",
    "MaskedImageDataset",
    "Record",
    "binarize_half_max",
    "binarize_nonzero",
    "check_split",
    "find_segmentations",
    "holdout_split",
    "load_mask",
    "load_rgb",
    "read_rows",
    "require_dir",
    "require_file",
]

SPLITS = ("train", "val", "test")
# The validation holdout carved from a training split (CUB, TravelingBirds, Hard ImageNet).
VAL_FRACTION = 0.2
VAL_SEED = 0


class CorruptImageError(OSError):
    """An image or mask file exists but cannot be decoded."""


class BadImageWarning(UserWarning):
    """An unreadable image or mask was skipped (``skip_bad_images=True``)."""


@dataclass(frozen=True)
class Record:
    """One sample on disk: its image, label, optional mask file and group, and a stable id."""

    image: Path
    label: int
    id: str
    mask: Path | None = None
    group: int | None = None


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise FileNotFoundError naming it."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise ValueError listing them."""
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")
    return split


def read_rows(path: Path, columns: int) -> list[tuple[str, ...]]:
    """Whitespace-separated rows of a text index (blank lines skipped); a short row names file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split(maxsplit=columns - 1)
        if not fields:
            continue
        if len(fields) != columns:
            raise ValueError(f"{path}, line {number}: expected {columns} fields, got {line!r}")
        rows.append(tuple(fields))
    return rows


def find_segmentations(
    masks: bool | None, explicit: Path | str | None, candidates: Sequence[Path]
) -> Path | None:
    """The segmentation folder to use: ``explicit`` or the first existing candidate; None when off.

    ``masks=None`` uses masks when a folder is found, ``True`` requires one (FileNotFoundError naming
    where it looked), ``False`` turns masks off.
    """
    if masks is False:
        return None
    if explicit is not None:
        return require_dir(Path(explicit), "segmentation folder")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if masks:
        looked = f" (looked in {', '.join(str(c) for c in candidates)})" if candidates else ""
        raise FileNotFoundError(
            f"segmentation folder not found{looked}; pass segmentations_dir=, or masks=False"
        )
    return None


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of positions into (kept, held out): ``round(fraction * n)`` per class, seeded.

    The same labels, fraction and seed give the same split on every machine and Python version
    (``random.Random`` with an integer seed is stable).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[label].append(position)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_class):
        positions = by_class[label]
        rng.shuffle(positions)
        held.update(positions[: round(fraction * len(positions))])
    kept = [p for p in range(len(labels)) if p not in held]
    return kept, sorted(held)


# Pillow's modes of 16-bit greyscale files (PNG opens as I;16, some readers as I).
SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, whatever its mode: 16-bit greyscale (a 16-bit PNG: mode I;16 or I) scaled
    to 8 bits, since Pillow's own conversion clips it at 255 and turns it white; CMYK, palette and
    8-bit greyscale as Pillow converts them."""
    if image.mode in SIXTEEN_BIT:
        levels = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as RGB (`to_rgb`: greyscale, 16-bit and CMYK files included);
    CorruptImageError names the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read image {path}: {error}") from error


def _grey_levels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            # Keep the stored levels: converting RGB to "L" would weight channels (a pure red mask
            # would fall below half of the maximum), so take the channel maximum instead.
            if image.mode not in ("L", "I", "I;16", "F", "RGB", "RGBA"):
                image = image.convert("RGB")
            levels = np.asarray(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read mask {path}: {error}") from error
    return levels[..., :3].max(axis=-1) if levels.ndim == 3 else levels


def binarize_half_max(levels: np.ndarray) -> np.ndarray:
    """Foreground where the level exceeds half of the mask's own maximum (soft segmentations, e.g. CUB).

    Relative to the mask's maximum so 0/1 and 0/255 files binarise alike; an all-zero mask is empty.
    """
    return levels > 0.5 * levels.max() if levels.size else levels.astype(bool)


def binarize_nonzero(levels: np.ndarray) -> np.ndarray:
    """Foreground wherever the level is above zero (hard masks, e.g. Hard ImageNet)."""
    return levels > 0


def load_mask(path: Path, binarize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Decode a mask file into a bool H x W array; CorruptImageError names the file."""
    return binarize(_grey_levels(path))


def _decodes(path: Path) -> str | None:
    """None if the file decodes fully, else the reason; JPEGs are decoded at 1/8 scale to save time."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


class MaskedImageDataset(Dataset):
    """A list of records served as sample dicts, with masks and groups when the dataset has them.

    What a dataset can give beyond images and labels, evaluation reads from it: ``has_masks``
    (object masks, for the EPG), ``groups`` (None without groups) and ``has_counterfactuals``
    (``counterfactual(index)``: the same object on another background, and the background alone).
    """

    binarize: Callable[[np.ndarray], np.ndarray] = staticmethod(binarize_half_max)
    has_counterfactuals: bool = False

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        has_masks: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.has_masks = has_masks
        # Default: the evaluation transform at 224 with ImageNet statistics, so samples batch.
        self.transform = transform if transform is not None else eval_transform(224)
        self.bad_images: list[str] = []
        if skip_bad_images:
            records = self._drop_unreadable(records)
        self.records = list(records)
        self.labels = [r.label for r in self.records]
        self.ids = [r.id for r in self.records]
        has_groups = bool(self.records) and self.records[0].group is not None
        self.groups: list[int] | None = [r.group for r in self.records] if has_groups else None

    @property
    def num_bad_images(self) -> int:
        """How many unreadable images (or masks) were skipped."""
        return len(self.bad_images)

    def _drop_unreadable(self, records: Sequence[Record]) -> list[Record]:
        kept = []
        for record in records:
            files = [record.image] + ([record.mask] if self.has_masks and record.mask is not None else [])
            reasons = [(f, _decodes(f)) for f in files]
            bad = [(f, why) for f, why in reasons if why is not None]
            if not bad:
                kept.append(record)
                continue
            for path, why in bad:
                warnings.warn(f"skipping unreadable file {path}: {why}", BadImageWarning, stacklevel=3)
            self.bad_images.append(str(record.image))
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = tv_tensors.Image(F.pil_to_tensor(load_rgb(record.image)))
        sample: dict[str, Any] = {"label": record.label}
        if self.has_masks:
            mask = load_mask(record.mask, type(self).binarize)
            if mask.shape != tuple(image.shape[-2:]):
                raise ValueError(
                    f"mask {record.mask} is {mask.shape[1]}x{mask.shape[0]} but image {record.image} is "
                    f"{image.shape[-1]}x{image.shape[-2]} (width x height): they must match"
                )
            image, mask = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))))
            sample["mask"] = mask.as_subclass(torch.Tensor).bool()
        else:
            image = self.transform(image)
        sample["image"] = image.as_subclass(torch.Tensor)
        if record.group is not None:
            sample["group"] = record.group
        sample["index"] = index
        return sample

    def __repr__(self) -> str:
        extras = f", masks={self.has_masks}, groups={self.groups is not None}"
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes{extras})"
