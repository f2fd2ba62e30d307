"""Waterbirds (Sagawa et al., 2020): CUB birds pasted on Places backgrounds, with group labels.

``root`` is the released folder, which also picks the variant: ``waterbird_complete95_forest2water2``
(Waterbirds-95%) or ``waterbird_1.0_forest2water2`` (Waterbirds-100%). It holds the images under
their CUB relative paths and ``metadata.csv`` with columns img_id, img_filename, y (0 landbird,
1 waterbird), split (0 train, 1 val, 2 test), place (0 land, 1 water), place_filename.

Groups are ``2 * y + place`` (0 landbird on land, 1 landbird on water, 2 waterbird on land,
3 waterbird on water). The images keep CUB's paths and sizes, so the CUB segmentations are the masks:
``<segmentations>/<img_filename with .png>``, from ``segmentations_dir=`` or ``cub_root=``
(``<cub_root>/segmentations`` or a ``segmentations`` folder beside it), binarised above half of
the mask's maximum.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aim_ext.data.common import (
    MaskedImageDataset,
    Record,
    check_split,
    find_segmentations,
    require_dir,
    require_file,
)

__all__ = ["WATERBIRDS_CLASSES", "WaterbirdsDataset"]

WATERBIRDS_CLASSES = ("landbird", "waterbird")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")


def _integer(value: str, column: str, path: Path, line: int) -> int:
    try:
        # Some re-exports write the codes as floats ("1.0").
        return int(float(value))
    except ValueError:
        raise ValueError(f"{path}, line {line}: column {column} is not an integer: {value!r}") from None


class WaterbirdsDataset(MaskedImageDataset):
    """Waterbirds-95% or -100%: landbird vs waterbird, groups 2*y + place, CUB masks when given."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        *,
        cub_root: str | Path | None = None,
        segmentations_dir: str | Path | None = None,
        masks: bool | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        """``masks``: None uses segmentations when found, True requires them, False ignores them."""
        root = require_dir(Path(root), "Waterbirds root")
        code = SPLIT_CODES[check_split(split)]
        metadata = require_file(root / "metadata.csv", "Waterbirds index file")
        candidates = (
            []
            if cub_root is None
            else [Path(cub_root) / "segmentations", Path(cub_root).parent / "segmentations"]
        )
        seg = find_segmentations(masks, segmentations_dir, candidates)
        records = []
        with metadata.open(newline="") as file:
            reader = csv.DictReader(file)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{metadata} lacks the column(s) {', '.join(missing)}")
            for line, row in enumerate(reader, start=2):
                if _integer(row["split"], "split", metadata, line) != code:
                    continue
                y = _integer(row["y"], "y", metadata, line)
                place = _integer(row["place"], "place", metadata, line)
                if y not in (0, 1) or place not in (0, 1):
                    raise ValueError(f"{metadata}, line {line}: y and place must be 0 or 1, got {y}, {place}")
                name = row["img_filename"]
                image = require_file(root / name, "image listed in metadata.csv")
                mask = None
                if seg is not None:
                    mask = require_file((seg / name).with_suffix(".png"), f"segmentation of {image}")
                records.append(Record(image=image, label=y, id=name, mask=mask, group=2 * y + place))
        self.split = split
        super().__init__(
            records, WATERBIRDS_CLASSES, transform, has_masks=seg is not None, skip_bad_images=skip_bad_images
        )
        # Derived from the groups so it stays aligned if unreadable images were skipped.
        self.places = [group % 2 for group in self.groups or []]
