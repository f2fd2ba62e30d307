"""`aim-train --log tensorboard`: each epoch's metrics as TensorBoard scalars and the fixed
validation batch's masks as images, in `RUN/tensorboard` beside metrics.jsonl.

TensorBoard is optional (`pip install "aim-ext[tensorboard]"`); `require_tensorboard` says so in
one line before a run starts. The writer is torch's `torch.utils.tensorboard.SummaryWriter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.engine.records import flatten

TENSORBOARD_FOLDER = "tensorboard"


class TensorBoardUnavailable(ImportError):
    """`--log tensorboard` without a working tensorboard package; the message says how to install it."""


def require_tensorboard() -> None:
    """Raise TensorBoardUnavailable, with the install command, unless torch's TensorBoard writer
    can be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as error:
        raise TensorBoardUnavailable(
            f'--log tensorboard needs the tensorboard package ({error}): pip install "aim-ext[tensorboard]"'
        ) from None


def scalar_tags(metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch's record (metrics.jsonl's) as TensorBoard tags: `train/loss`, `train/acc`,
    `train/mask_area/0`, `val/acc`, `val/group_acc/3`, `lr/backbone`, `schedule/tau`; text, the
    epoch and a collapsed classifier's class index are left out."""
    tags: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("epoch", "collapsed_to_class"):
            continue
        if key.startswith("val_"):
            name = "val/" + key[len("val_") :]
        elif key.startswith("train_"):
            name = "train/" + key[len("train_") :]
        elif key == "lr":
            name = "lr"
        elif key == "tau":
            name = "schedule/tau"
        else:
            name = "train/" + key
        numbers = flatten({name: value}, "/")
        tags.update(
            {
                t: float(v)
                for t, v in numbers.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    return tags


def mask_images(images: Tensor, masks: list[Tensor]) -> dict[str, Tensor]:
    """The fixed batch as TensorBoard images (N, 3, H, W) in [0, 1]: the images themselves (each
    stretched to its own range), and per stage the image where the mask is on, black elsewhere
    (the mask nearest-upsampled to the image, as AIM merges it)."""
    images = images.float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    shown = (images - low) / (high - low).clamp_min(1e-6)
    out = {"masks/image": shown}
    for level, mask in enumerate(masks):
        on = F.interpolate(mask.float().cpu(), size=shown.shape[-2:], mode="nearest")
        out[f"masks/level_{level}"] = shown * on
    return out


class TensorBoardLog:
    """The run's TensorBoard writer. A resumed run starting at epoch `start` purges the events of
    that epoch and later ones, so the curves continue without a doubled stretch."""

    def __init__(self, out: Path, start: int) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TENSORBOARD_FOLDER), purge_step=start if start else None)

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        for tag, value in scalar_tags(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    @torch.no_grad()
    def masks(self, epoch: int, images: Tensor, masks: list[Tensor]) -> None:
        for tag, batch in mask_images(images, masks).items():
            self.writer.add_images(tag, batch, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
