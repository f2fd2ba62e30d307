"""CUB-200-2011 in its distributed layout, with the Farrell segmentations as foreground masks.

Layout (``root`` is the ``CUB_200_2011`` folder)::

    images/<NNN.Species>/<name>.jpg
    images.txt               <id> <relative path under images/>
    image_class_labels.txt   <id> <class, 1-based>
    train_test_split.txt     <id> <1 train | 0 test>
    classes.txt              <class> <NNN.Species>   (optional: names come from the image folders otherwise)
    segmentations/<NNN.Species>/<name>.png   (also found next to root, as the separate download extracts)

Splits: "test" is the official test split; "train" and "val" divide the official train split, with
``val_fraction`` (20%) of each class held out for validation by a seeded shuffle, so the split is
the same on every run. Labels are 0-based. Masks: grey levels above half of the mask's maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aim_ext.data.common import (
    VAL_FRACTION,
    VAL_SEED,
    MaskedImageDataset,
    Record,
    check_split,
    find_segmentations,
    holdout_split,
    read_rows,
    require_dir,
    require_file,
)

__all__ = ["CUBDataset", "CUBIndex", "read_cub_index", "split_positions"]


@dataclass(frozen=True)
class CUBIndex:
    """CUB's index files joined by image id, in images.txt order."""

    paths: list[str]
    labels: list[int]
    is_train: list[bool]
    classes: list[str]


def read_cub_index(root: Path) -> CUBIndex:
    """Read and cross-check images.txt, image_class_labels.txt, train_test_split.txt (and classes.txt)."""
    require_dir(root, "CUB-200-2011 root")
    images = read_rows(require_file(root / "images.txt", "CUB index file"), 2)
    labels_file = require_file(root / "image_class_labels.txt", "CUB index file")
    split_file = require_file(root / "train_test_split.txt", "CUB index file")
    label_of = dict(read_rows(labels_file, 2))
    train_of = dict(read_rows(split_file, 2))
    paths, labels, is_train = [], [], []
    for image_id, path in images:
        for table, file in ((label_of, labels_file), (train_of, split_file)):
            if image_id not in table:
                raise ValueError(f"{file} has no row for image id {image_id} ({path})")
        paths.append(path)
        labels.append(int(label_of[image_id]) - 1)
        is_train.append(train_of[image_id] == "1")
    if min(labels, default=0) < 0:
        raise ValueError(f"{labels_file}: class labels must be 1-based")
    return CUBIndex(paths, labels, is_train, _class_names(root, paths, labels))


def _class_names(root: Path, paths: list[str], labels: list[int]) -> list[str]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        rows = read_rows(classes_file, 2)
        return [name for _, name in sorted(rows, key=lambda row: int(row[0]))]
    # Without classes.txt, name each class after the folder its images live in.
    folder_of = {label: Path(path).parts[0] for path, label in zip(paths, labels, strict=True)}
    return [folder_of.get(label, str(label)) for label in range(max(labels, default=-1) + 1)]


def split_positions(index: CUBIndex, split: str, val_fraction: float, seed: int) -> list[int]:
    """Positions in ``index`` that belong to ``split``: the official test set, or train minus val."""
    check_split(split)
    if split == "test":
        return [i for i, train in enumerate(index.is_train) if not train]
    train = [i for i, is_train in enumerate(index.is_train) if is_train]
    kept, held = holdout_split([index.labels[i] for i in train], val_fraction, seed)
    return [train[p] for p in (kept if split == "train" else held)]


class CUBDataset(MaskedImageDataset):
    """CUB-200-2011: 200 bird species; masks from the Farrell segmentations."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        *,
        masks: bool | None = None,
        segmentations_dir: str | Path | None = None,
        val_fraction: float = VAL_FRACTION,
        seed: int = VAL_SEED,
        skip_bad_images: bool = False,
    ) -> None:
        """``masks``: None uses segmentations when found, True requires them, False ignores them."""
        root = Path(root)
        index = read_cub_index(root)
        images = require_dir(root / "images", "CUB image folder")
        seg = find_segmentations(
            masks, segmentations_dir, [root / "segmentations", root.parent / "segmentations"]
        )
        records = []
        for i in split_positions(index, split, val_fraction, seed):
            path = index.paths[i]
            image = require_file(images / path, "image listed in images.txt")
            mask = None
            if seg is not None:
                mask = require_file((seg / path).with_suffix(".png"), f"segmentation of {image}")
            records.append(Record(image=image, label=index.labels[i], id=path, mask=mask))
        self.split = split
        super().__init__(
            records, index.classes, transform, has_masks=seg is not None, skip_bad_images=skip_bad_images
        )
