"""Any class-per-folder tree (ImageNet-100, ImageWoof, ...), as torchvision's ImageFolder reads it.

Layout: ``root/<split>/<class>/**/<image>`` (or ``root/<class>/**/<image>`` with ``split=None``).
These datasets ship train/ and val/ only, and their papers report on val: without a ``test/``
folder, "test" reads ``val/`` and "val" is 20% of ``train/`` held out (stratified, seeded; the
paper's convention), so that model selection never sees the test images. Classes are the sorted
sub-folders of ``root/train`` when it exists (so labels agree across splits), else of the split's
folder. No masks, so no EPG; no groups.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aim_ext.data.common import MaskedImageDataset, Record, check_split, holdout_split, require_dir

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def _class_folders(folder: Path) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )


def _images_under(folder: Path) -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs.sort()
        found.extend(Path(directory) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


class FolderDataset(MaskedImageDataset):
    """Images in one folder per class; labels follow the sorted class names."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        transform: Callable[..., Any] | None = None,
        *,
        skip_bad_images: bool = False,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        """``split`` picks ``root/<split>`` (see the module notes for trees without ``test/``); None
        reads ``root`` itself as the class folders."""
        root = require_dir(Path(root), "image folder root")
        carve = False  # train and val held out of train/
        if split is None:
            folder = root
        else:
            check_split(split)
            folder = root / split
            if not (root / "test").is_dir() and (root / "train").is_dir():
                if split == "test" and (root / "val").is_dir():
                    folder = root / "val"
                elif split in ("train", "val"):
                    folder, carve = root / "train", True
            require_dir(folder, f"{split} folder")
        reference = root / "train" if split is not None and (root / "train").is_dir() else folder
        classes = _class_folders(reference)
        label_of = {name: label for label, name in enumerate(classes)}
        records = []
        for name in _class_folders(folder):
            if name not in label_of:
                raise ValueError(f"class folder {folder / name} has no counterpart in {reference}")
            for image in _images_under(folder / name):
                records.append(Record(image=image, label=label_of[name], id=str(image.relative_to(folder))))
        if not records:
            raise FileNotFoundError(f"no images found under {folder} (expected <class>/<image> folders)")
        if carve:
            kept, held = holdout_split([r.label for r in records], val_fraction, seed)
            records = [records[i] for i in (kept if split == "train" else held)]
        self.split = split
        super().__init__(records, classes, transform, skip_bad_images=skip_bad_images)
