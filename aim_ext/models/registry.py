"""AIM architectures in timm's model registry: `timm.create_model("convnext_tiny_aim2", ...)` after
`import aim_ext`, so that timm's tooling (its train, validate and benchmark scripts,
`pretrained_cfg`, `list_models`) can use them. In eval mode they return logits, as timm models do.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models import register_model
from torch import nn

from aim_ext.models.aim import AIM

# The architectures of the paper's tables and the demo: name -> (timm backbone, stop stage).
ARCHITECTURES = {
    "convnext_tiny_aim2": ("convnext_tiny", 2),
    "convnext_tiny_aim1": ("convnext_tiny", 1),
    "resnet50_aim3": ("resnet50", 3),
    "resnet50_aim2": ("resnet50", 2),
    "mobilenetv2_100_aim3": ("mobilenetv2_100", 3),
}


def _entry_point(name: str, backbone: str, stop_stage: int) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> AIM:
        """`backbone`+AIM[stop_stage]; `pretrained` loads the backbone's timm weights."""
        kwargs.pop("features_only", None)
        return AIM(backbone, stop_stage, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{backbone}+AIM[{stop_stage}]; `pretrained` loads the backbone's timm weights."
    return create


for _name, (_backbone, _stop) in ARCHITECTURES.items():
    globals()[_name] = register_model(_entry_point(_name, _backbone, _stop))
