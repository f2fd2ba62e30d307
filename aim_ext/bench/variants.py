"""The models aim-bench compares: each vanilla backbone with its AIM variants (paper Table 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aim_ext.models import AIM, create_model, load_model


@dataclass(frozen=True)
class Variant:
    backbone: str
    stop_stage: int | None = None  # None: the vanilla timm model
    source: str | None = None  # a trained model (load_model's source) instead of a new one

    @property
    def name(self) -> str:
        name = self.backbone if self.stop_stage is None else f"{self.backbone}+AIM[{self.stop_stage}]"
        return f"{name} (trained)" if self.source else name

    @property
    def is_vanilla(self) -> bool:
        return self.stop_stage is None

    @property
    def is_trained(self) -> bool:
        return self.source is not None

    def build(self, num_classes: int) -> nn.Module:
        """A new model of `num_classes` classes, or the trained model with its own."""
        if self.source:
            return load_model(self.source)
        return create_model(self.backbone, num_classes=num_classes, stop_stage=self.stop_stage).eval()


# Vanilla first: every AIM row's overhead_ratio divides by its family's vanilla row.
FAMILIES: dict[str, list[int | None]] = {
    "convnext_tiny": [None, 2, 1],
    "resnet50": [None, 3, 2],
    "mobilenetv2_100": [None, 3, 2],
}


def family_variants(backbone: str, quick: bool = False) -> list[Variant]:
    """The vanilla model and its AIM variants; `quick` keeps the vanilla model and the first one."""
    if backbone not in FAMILIES:
        raise ValueError(f"unknown backbone family {backbone!r}; aim-bench knows {', '.join(FAMILIES)}")
    stops = FAMILIES[backbone][:2] if quick else FAMILIES[backbone]
    return [Variant(backbone, stop) for stop in stops]


def trained_variants(source: str, model: nn.Module) -> list[Variant]:
    """A trained model (`load_model(source)` is `model`) and, for an AIM model, its vanilla backbone
    before it: the new vanilla model of the same classes is the baseline of its overhead."""
    if isinstance(model, AIM):
        return [Variant(model.backbone_name), Variant(model.backbone_name, model.stop_stage, str(source))]
    return [Variant(model.pretrained_cfg["architecture"], None, str(source))]


@torch.no_grad()
def calibrate_mask_density(model: AIM, density: float, image: torch.Tensor) -> AIM:
    """Shift each mask estimator's output bias so that ``density`` of ``image``'s positions are
    active at every stage, as a trained model's masks are (20-35%); a freshly initialised
    estimator's masks are all on or all off, which would say nothing about sparse inference."""
    if not 0 < density < 1:
        raise ValueError(f"mask density must be in (0, 1), got {density}")
    for stage, out in zip(model.stages, model.eval().forward_topdown(image), strict=True):
        if stage.mask_estimator is None:  # one estimator (appendix D.3): the top stage's mask
            continue
        stage.mask_estimator.to_logits.bias -= torch.quantile(
            out.mask_logits.flatten().double(), 1 - density
        ).to(stage.mask_estimator.to_logits.bias)
    return model
