"""TravelingBirds (Koh et al., 2020, "CUB_fixed"): CUB birds on Places backgrounds tied to the species.

Layout (``root`` is ``CUB_fixed`` or the folder holding it)::

    CUB_fixed/train/<NNN.Species>/<name>.jpg   every CUB image, on its species' training background
    CUB_fixed/test/<NNN.Species>/<name>.jpg    every CUB image, on another species' background
    CUB_fixed/train_places.json, CUB_fixed/test_places.json

The generator writes every CUB image into both folders, so the official CUB split (the paper's
protocol) needs CUB's own index: ``cub_root=`` (default: a ``CUB_200_2011`` folder beside
``CUB_fixed`` or inside ``root``). "train" and "val" take the official train images from
``CUB_fixed/train`` (validation held out exactly as in ``CUBDataset``, so the ids match), "test"
takes the official test images from ``CUB_fixed/test``. The images keep CUB's sizes, so CUB's
segmentations are the masks, unchanged.

Assumption about the JSON files: the generator writes one object per split mapping each species
folder name ("001.Black_footed_Albatross") to its Places365 class index. Per-image objects are
accepted too, keyed by the image's relative path ("001.Black_footed_Albatross/x.jpg") or file name;
the per-image key wins over the species key. Each sample's place is in ``.places``; the dataset has
no groups (TravelingBirds reports plain accuracy).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aim_ext.data.common import (
    VAL_FRACTION,
    VAL_SEED,
    MaskedImageDataset,
    Record,
    check_split,
    find_segmentations,
    require_dir,
    require_file,
)
from aim_ext.data.cub import read_cub_index, split_positions

__all__ = ["TravelingBirdsDataset", "read_places"]


def read_places(path: Path) -> dict[str, int]:
    """Read a ``*_places.json`` object (species folder, image path or file name -> place index)."""
    require_file(path, "TravelingBirds places file")
    try:
        places = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(places, dict):
        raise ValueError(f"{path} should hold an object mapping species or images to places")
    try:
        return {str(key): int(value) for key, value in places.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: every place should be an integer class index ({error})") from error


def _place_of(places: dict[str, int], path: str, source: Path) -> int:
    for key in (path, Path(path).name, Path(path).parts[0]):
        if key in places:
            return places[key]
    raise ValueError(f"{source} has no place for {path} (nor for its file name or species folder)")


def _fixed_dir(root: Path) -> Path:
    require_dir(root, "TravelingBirds root")
    return root / "CUB_fixed" if (root / "CUB_fixed").is_dir() else root


class TravelingBirdsDataset(MaskedImageDataset):
    """TravelingBirds: CUB's 200 species on species-tied backgrounds that change at test time."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        *,
        cub_root: str | Path | None = None,
        segmentations_dir: str | Path | None = None,
        masks: bool | None = None,
        val_fraction: float = VAL_FRACTION,
        seed: int = VAL_SEED,
        skip_bad_images: bool = False,
    ) -> None:
        """``masks``: None uses CUB's segmentations when found, True requires them, False ignores them."""
        check_split(split)
        fixed = _fixed_dir(Path(root))
        if cub_root is None:
            guesses = [fixed.parent / "CUB_200_2011", Path(root) / "CUB_200_2011"]
            cub_root = next((g for g in guesses if g.is_dir()), None)
            if cub_root is None:
                raise FileNotFoundError(
                    "TravelingBirds needs CUB-200-2011's index for the official split: pass cub_root= "
                    f"(looked in {', '.join(str(g) for g in guesses)})"
                )
        cub_root = Path(cub_root)
        index = read_cub_index(cub_root)
        folder = "test" if split == "test" else "train"
        images = require_dir(fixed / folder, "TravelingBirds image folder")
        places_file = fixed / f"{folder}_places.json"
        places = read_places(places_file)
        seg = find_segmentations(
            masks, segmentations_dir, [cub_root / "segmentations", cub_root.parent / "segmentations"]
        )
        records, record_places = [], []
        for i in split_positions(index, split, val_fraction, seed):
            path = index.paths[i]
            image = require_file(images / path, "image listed in CUB's images.txt")
            mask = None
            if seg is not None:
                mask = require_file((seg / path).with_suffix(".png"), f"segmentation of {image}")
            records.append(Record(image=image, label=index.labels[i], id=path, mask=mask))
            record_places.append(_place_of(places, path, places_file))
        self.split = split
        super().__init__(
            records, index.classes, transform, has_masks=seg is not None, skip_bad_images=skip_bad_images
        )
        place_by_id = dict(zip((r.id for r in records), record_places, strict=True))
        self.places = [place_by_id[i] for i in self.ids]
