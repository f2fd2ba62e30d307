"""Image and mask transforms: the geometry applied to an image is applied to its foreground mask too.

EPG scores an attribution map against the object mask, so the mask must follow every crop, resize,
flip, shear, translation and rotation the image goes through. All transforms here are
torchvision.transforms.v2 transforms called as ``transform(image, mask)`` (or ``transform(image)``)
with a ``tv_tensors.Image`` (uint8) and a ``tv_tensors.Mask`` (uint8, H x W); v2 resamples masks with
nearest interpolation and leaves them untouched by colour operations and normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "EVAL_CROP_FRACTION",
    "PairedRandAugment",
    "EVAL_INTERPOLATION",
    "eval_transform",
    "frame_transform",
    "generated_train_transform",
    "normalise_transform",
    "train_transform",
]

# The usual ImageNet evaluation convention: resize the shorter side to image_size / 0.875, then
# take the central image_size crop (224 -> 256 -> 224).
EVAL_CROP_FRACTION = 0.875
EVAL_INTERPOLATION = "bilinear"  # of that resize (a saved model's config records it for timm's transform)

# RandAugment's magnitude scale: magnitude m in [0, MAX_MAGNITUDE] maps linearly onto each op's range.
# torchvision's scale (31 bins, 9 -> 9/30 of each range): the paper writes RandAugment(ops=3,
# magnitude=9), torchvision's parameter names. timm's "rand-m9" is stronger (9/10 of each range).
MAX_MAGNITUDE = 30

GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR_OPS = (
    "Identity",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
# Ops whose strength goes both ways (a random sign is drawn per application).
SIGNED_OPS = frozenset(GEOMETRIC_OPS + ("Brightness", "Color", "Contrast", "Sharpness"))


class PairedRandAugment(v2.Transform):
    """RandAugment (Cubuk et al., 2020) that applies its geometric ops to masks as well as images.

    torchvision's v2.RandAugment refuses masks; here the same ops, magnitudes and signs drawn for the
    image are applied to every ``tv_tensors.Mask`` in the call (geometric ops only, nearest
    interpolation, areas shifted in from outside the image filled with 0: background). Colour ops
    touch images only. Images must be uint8.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9) -> None:
        super().__init__()
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(
                f"need num_ops >= 0 and 0 <= magnitude <= {MAX_MAGNITUDE}, got {num_ops}, {magnitude}"
            )
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = GEOMETRIC_OPS + COLOUR_OPS

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the ops and their signs once per call, shared by the image and its mask."""
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        signs = (torch.randint(2, (self.num_ops,)) * 2 - 1).tolist()
        return {
            "ops": [
                (self.ops[i], s if self.ops[i] in SIGNED_OPS else 1)
                for i, s in zip(picks, signs, strict=True)
            ]
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn ops to one image, or their geometric part to one mask."""
        is_mask = isinstance(inpt, tv_tensors.Mask)
        level = self.magnitude / MAX_MAGNITUDE
        for name, sign in params["ops"]:
            if is_mask and name not in GEOMETRIC_OPS:
                continue
            inpt = self._apply(inpt, name, sign * level, is_mask)
        return inpt

    @staticmethod
    def _apply(inpt: Any, name: str, level: float, is_mask: bool) -> Any:
        interpolation = v2.InterpolationMode.NEAREST if is_mask else v2.InterpolationMode.BILINEAR
        height, width = F.get_size(inpt)
        if name in ("ShearX", "ShearY"):
            # The paper's shear of 0.3 is a slope; torchvision takes the angle in degrees.
            angle = math.degrees(math.atan(0.3 * level))
            shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
            return F.affine(
                inpt, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=interpolation, fill=0
            )
        if name in ("TranslateX", "TranslateY"):
            # Up to 150 pixels of a 331-pixel image in the paper: a fraction of the size here.
            dx = round(150 / 331 * width * level) if name == "TranslateX" else 0
            dy = round(150 / 331 * height * level) if name == "TranslateY" else 0
            return F.affine(
                inpt,
                angle=0.0,
                translate=[dx, dy],
                scale=1.0,
                shear=[0.0, 0.0],
                interpolation=interpolation,
                fill=0,
            )
        if name == "Rotate":
            return F.rotate(inpt, angle=30.0 * level, interpolation=interpolation, fill=0)
        if name == "Brightness":
            return F.adjust_brightness(inpt, 1.0 + 0.9 * level)
        if name == "Color":
            return F.adjust_saturation(inpt, 1.0 + 0.9 * level)
        if name == "Contrast":
            return F.adjust_contrast(inpt, 1.0 + 0.9 * level)
        if name == "Sharpness":
            return F.adjust_sharpness(inpt, 1.0 + 0.9 * level)
        if name == "Posterize":
            return F.posterize(inpt, bits=8 - int(4 * level))
        if name == "Solarize":
            return F.solarize(inpt, threshold=255.0 * (1.0 - level))
        if name == "AutoContrast":
            return F.autocontrast(inpt)
        if name == "Equalize":
            return F.equalize(inpt)
        return inpt


def _to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # Masks stay uint8 through the dtype conversion; the dataset turns them into bool at the end.
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    randaugment: tuple[int, int] | None = (3, 9),
) -> v2.Compose:
    """RandomResizedCrop, horizontal flip, RandAugment(num_ops, magnitude), normalise; masks follow."""
    ops: list[v2.Transform] = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    if randaugment is not None:
        ops.append(PairedRandAugment(*randaugment))
    return v2.Compose(ops + _to_normalised_float(mean, std))


def normalise_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> v2.Compose:
    """uint8 to normalised float32 only: for images that are already at their size."""
    return v2.Compose(_to_normalised_float(mean, std))


def generated_train_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    randaugment: tuple[int, int] | None = None,
) -> v2.Compose:
    """For images generated at the training size (TuxBirds): horizontal flip, RandAugment when
    given, normalise. No random crop: the object is placed at random already, and a crop could cut
    it out of the image (its label would then be noise)."""
    ops: list[v2.Transform] = [v2.RandomHorizontalFlip()]
    if randaugment is not None:
        ops.append(PairedRandAugment(*randaugment))
    return v2.Compose(ops + _to_normalised_float(mean, std))


def frame_transform(
    shorter_side: int,
    interpolation: str = EVAL_INTERPOLATION,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Resize the shorter side to ``shorter_side`` and normalise, no crop: the frame an evaluation
    crop is taken from (an image already that size is left as it is); masks follow."""
    ops = [v2.Resize(shorter_side, interpolation=v2.InterpolationMode(interpolation), antialias=True)]
    return v2.Compose(ops + _to_normalised_float(mean, std))


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Resize the shorter side to image_size / 0.875, centre-crop image_size, normalise; masks follow.

    This is the usual ImageNet evaluation convention (224 -> 256 -> 224).
    """
    resize = math.floor(image_size / EVAL_CROP_FRACTION)
    ops = [
        v2.Resize(resize, interpolation=v2.InterpolationMode(EVAL_INTERPOLATION), antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(ops + _to_normalised_float(mean, std))
