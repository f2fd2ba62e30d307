"""`create_model`: the one entry point for vanilla timm models and their AIM variants; and the data
config (input size, normalisation) a model expects, in timm's convention."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from aim_ext.models.aim import AIM
from aim_ext.models.bottom_up import BottomUpAIM

# Where the masks act: AIM's top-down pathway (the paper's method), or inside the backbone
# (bottom-up masking, the ablation of section 6.1 and appendix D.4).
MASKINGS = ("top-down", "bottom-up")


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    stop_stage: int | None = None,
    *,
    masking: str = "top-down",
    **kwargs,
) -> nn.Module:
    """`stop_stage=None`: the vanilla timm model; an integer: `name+AIM[stop_stage]`, or with
    `masking="bottom-up"` the bottom-up masking model `BottomUpAIM` of levels stop_stage..top.

    Keyword arguments go to timm (e.g. `drop_path_rate`, `pretrained_cfg_overlay`); AIM also takes
    `drop_rate` (its heads' dropout, default 0.3), `width`, `temperature`, `gumbel_noise` and
    `mask_estimators` ("top": one estimator at the top stage, appendix D.3).
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if stop_stage is None:
        if masking != "top-down":
            raise ValueError(f"masking={masking!r} needs a stop_stage (the lowest masked level)")
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if masking == "bottom-up":
        return BottomUpAIM(name, stop_stage, num_classes, pretrained=pretrained, **kwargs)
    return AIM(name, stop_stage, num_classes, pretrained=pretrained, **kwargs)


def model_data_config(name: str, stop_stage: int | None = None) -> dict[str, Any]:
    """timm's data config of model ``name`` (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode``), read from a model built on the meta device: no weights are made,
    fetched or read, and no random number is drawn."""
    with torch.device("meta"):
        return resolve_model_data_config(create_model(name, num_classes=1, stop_stage=stop_stage))
