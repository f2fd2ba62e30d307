"""``build_dataset``: every dataset by name, with the train or evaluation transform chosen for it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from aim_ext.data.common import MaskedImageDataset
from aim_ext.data.cub import CUBDataset
from aim_ext.data.folder import FolderDataset
from aim_ext.data.hard_imagenet import HardImageNetDataset
from aim_ext.data.transforms import (
    EVAL_CROP_FRACTION,
    EVAL_INTERPOLATION,
    eval_transform,
    generated_train_transform,
    normalise_transform,
    train_transform,
)
from aim_ext.data.travelingbirds import TravelingBirdsDataset
from aim_ext.data.tuxbirds import tuxbirds_variant
from aim_ext.data.waterbirds import WaterbirdsDataset

__all__ = ["DATASETS", "build_dataset", "eval_preprocessing", "list_datasets"]

# Waterbirds-95% and -100% are one format; the folder passed as root picks the variant.
DATASETS: dict[str, type[MaskedImageDataset]] = {
    "cub": CUBDataset,
    "waterbirds": WaterbirdsDataset,
    "travelingbirds": TravelingBirdsDataset,
    "hard_imagenet": HardImageNetDataset,
    "folder": FolderDataset,
    "tuxbirds95": tuxbirds_variant("95"),
    "tuxbirds100": tuxbirds_variant("100"),
}
# Datasets generated at the requested image size: no resize or crop, only flip (+ RandAugment) to train.
GENERATED = frozenset({"tuxbirds95", "tuxbirds100"})


def eval_preprocessing(name: str) -> dict[str, Any]:
    """How dataset `name`'s evaluation images are framed, in timm's data-config keys: the central
    87.5% after a bilinear resize, or the whole frame for a generated dataset (rendered at its size)."""
    crop = 1.0 if name in GENERATED else EVAL_CROP_FRACTION
    return {"crop_pct": crop, "interpolation": EVAL_INTERPOLATION}


def list_datasets() -> list[str]:
    """The names ``build_dataset`` accepts."""
    return sorted(DATASETS)


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    *,
    image_size: int = 224,
    train: bool | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    randaugment: tuple[int, int] | None = (3, 9),
    prerender: bool = True,
    **kwargs: Any,
) -> MaskedImageDataset:
    """Build dataset ``name`` at ``root`` for ``split``, with augmentation when ``train``.

    ``train`` defaults to ``split == "train"``. Extra keyword arguments go to the dataset class
    (e.g. ``cub_root=``, ``imagenet_root=``, ``skip_bad_images=``). Generated datasets (TuxBirds)
    are rendered at ``image_size`` and, with ``prerender``, rendered once into the cache (without
    it they render each item on demand: enough to read the split's labels and groups);
    ``skip_bad_images`` and ``prerender`` mean nothing to the file datasets.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(list_datasets())}")
    if train is None:
        train = split == "train"
    if name in GENERATED:
        kwargs.pop("skip_bad_images", None)
        kwargs.setdefault("prerendered", prerender)
        transform = (
            generated_train_transform(mean, std, randaugment) if train else normalise_transform(mean, std)
        )
        return DATASETS[name](root, split, transform, image_size=image_size, **kwargs)
    transform = (
        train_transform(image_size, mean, std, randaugment)
        if train
        else eval_transform(image_size, mean, std)
    )
    return DATASETS[name](root, split, transform, **kwargs)
