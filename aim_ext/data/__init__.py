"""Datasets in the formats users have on disk, and transforms that move masks with their images."""

from aim_ext.data.common import BadImageWarning, CorruptImageError, MaskedImageDataset, Record, holdout_split
from aim_ext.data.cub import CUBDataset
from aim_ext.data.factory import DATASETS, build_dataset, eval_preprocessing, list_datasets
from aim_ext.data.folder import FolderDataset
from aim_ext.data.hard_imagenet import HardImageNetDataset
from aim_ext.data.shifted_centre import ShiftedCentre
from aim_ext.data.transforms import PairedRandAugment, eval_transform, train_transform
from aim_ext.data.travelingbirds import TravelingBirdsDataset
from aim_ext.data.tuxbirds import TuxBirds
from aim_ext.data.waterbirds import WaterbirdsDataset

__all__ = [
    "DATASETS",
    "BadImageWarning",
    "CUBDataset",
    "CorruptImageError",
    "FolderDataset",
    "HardImageNetDataset",
    "MaskedImageDataset",
    "PairedRandAugment",
    "Record",
    "ShiftedCentre",
    "TravelingBirdsDataset",
    "TuxBirds",
    "WaterbirdsDataset",
    "build_dataset",
    "eval_preprocessing",
    "eval_transform",
    "holdout_split",
    "list_datasets",
    "train_transform",
]
