"""`create_model`: the one entry point for vanilla timm models and their AIM variants."""

from __future__ import annotations

import timm
from torch import nn

from aim_ext.models.aim import AIM


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    stop_stage: int | None = None,
    **kwargs,
) -> nn.Module:
    """`stop_stage=None`: the vanilla timm model; an integer: `name+AIM[stop_stage]`.

    Keyword arguments go to timm (e.g. `drop_path_rate`, `pretrained_cfg_overlay`); AIM also takes
    `drop_rate` (its heads' dropout, default 0.3), `width`, `temperature` and `gumbel_noise`.
    """
    if stop_stage is None:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    return AIM(name, stop_stage, num_classes, pretrained=pretrained, **kwargs)
