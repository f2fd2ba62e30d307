"""Hard ImageNet (Moayeri et al., 2022): 15 ImageNet classes with strong spurious cues, with object masks.

Hard ImageNet ships masks only; the images come from the user's own ImageNet, a class-per-folder tree
``<imagenet_root>/{train,val}/<wnid>/<file>``. ``root`` is the mask folder::

    train/<wnid>_<ImageNet file name>    e.g. train/n01440764_n01440764_10026.JPEG
    val/<wnid>_<ImageNet file name>      e.g. val/n01440764_ILSVRC2012_val_00000293.JPEG

Each mask names its image: ``<imagenet_root>/<train|val>/<wnid>/<ImageNet file name>`` (if that file
is missing, the same stem with ImageNet's ``.JPEG`` extension is tried, for masks saved as PNG).
Masks are binarised above 0.

Assumption about the class list: the release keeps it in pickles that we do not load (unpickling runs
code); the classes are the wnids present in the mask folders (train and val together), sorted, so
labels are 0..14 in wnid order and agree across splits.

Splits, named like the other datasets: "train" and "val" divide the masks' train folder (a seeded,
per-class ``val_fraction`` holdout, as for CUB), "test" is the masks' val folder (ImageNet val images).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aim_ext.data.common import (
    VAL_FRACTION,
    VAL_SEED,
    MaskedImageDataset,
    Record,
    binarize_nonzero,
    check_split,
    holdout_split,
    require_dir,
)

__all__ = ["HardImageNetDataset", "hard_imagenet_classes"]


def _mask_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and "_" in p.name and not p.name.startswith("."))


def hard_imagenet_classes(root: str | Path) -> list[str]:
    """The sorted wnids that name mask files in ``root/train`` and ``root/val``."""
    wnids = {
        p.name.split("_", 1)[0]
        for part in ("train", "val")
        if (Path(root) / part).is_dir()
        for p in _mask_files(Path(root) / part)
    }
    return sorted(wnids)


def _image_for(mask: Path, images: Path) -> Path:
    wnid, name = mask.name.split("_", 1)
    image = images / wnid / name
    if image.is_file():
        return image
    fallback = image.with_suffix(".JPEG")
    if fallback.is_file():
        return fallback
    raise FileNotFoundError(f"ImageNet image for mask {mask} not found: {image}")


class HardImageNetDataset(MaskedImageDataset):
    """Hard ImageNet: masks from the release over images from the user's ImageNet tree."""

    binarize = staticmethod(binarize_nonzero)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        *,
        imagenet_root: str | Path | None = None,
        val_fraction: float = VAL_FRACTION,
        seed: int = VAL_SEED,
        skip_bad_images: bool = False,
    ) -> None:
        """``root``: the Hard ImageNet mask folder; ``imagenet_root``: ImageNet, holding train/ and val/."""
        check_split(split)
        root = require_dir(Path(root), "Hard ImageNet mask root")
        if imagenet_root is None:
            raise ValueError(
                "Hard ImageNet needs imagenet_root= (the ImageNet folder holding train/ and val/)"
            )
        part = "val" if split == "test" else "train"
        mask_dir = require_dir(root / part, "Hard ImageNet mask folder")
        images = require_dir(Path(imagenet_root) / part, "ImageNet image folder")
        classes = hard_imagenet_classes(root)
        label_of = {wnid: label for label, wnid in enumerate(classes)}
        masks = _mask_files(mask_dir)
        if not masks:
            raise FileNotFoundError(f"no Hard ImageNet masks (<wnid>_<file>) found in {mask_dir}")
        labels = [label_of[m.name.split("_", 1)[0]] for m in masks]
        if split != "test":
            kept, held = holdout_split(labels, val_fraction, seed)
            masks = [masks[p] for p in (kept if split == "train" else held)]
        records = [
            Record(
                image=_image_for(m, images),
                label=label_of[m.name.split("_", 1)[0]],
                id=f"{part}/{m.name}",
                mask=m,
            )
            for m in masks
        ]
        self.split = split
        super().__init__(records, classes, transform, has_masks=True, skip_bad_images=skip_bad_images)
