"""The timm families table of docs/models.md: for the full-size model of each family in
tests/families.py, its feature levels (reductions, channels, layout), the stop stage that masks the
levels at strides 32 and 16 (or, on a single-scale backbone, its last two levels), and what AIM adds
there: parameters and multiply-adds against the vanilla timm model, 200 classes, at the model's
own input size. Everything is built on the meta device (no weights, seconds in all).

    .venv/bin/python benchmarks/families.py > /tmp/families.md
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from timm.models import FeatureListNet
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, Family  # noqa: E402

import aim_ext  # noqa: E402
from aim_ext.bench.cost import parameters_m  # noqa: E402
from aim_ext.models import AIM  # noqa: E402
from aim_ext.models.masking import feature_info  # noqa: E402

# The paper's Table 6: ConvNeXt-T+AIM[2] and +AIM[1], ResNet-50+AIM[3] and +AIM[2].
PAPER_PARAMS = (29.9 / 28.0 - 1, 27.6 / 23.9 - 1)  # +6.8% .. +15.5%
PAPER_MACS = (4.6 / 4.5 - 1, 5.1 / 4.1 - 1)  # +2.2% .. +24.4%


# Where tests/families.py names one of timm's tiny test models, the table shows a full-size one.
FULL_SIZE = {
    "test_resnet": "resnet50",
    "test_nfnet": "dm_nfnet_f0",
    "test_byobnet": "gernet_s",
    "test_efficientnet": "efficientnet_b0",
    "test_convnext": "convnext_tiny",
    "test_mambaout": "mambaout_femto",
    "test_maxvit": "maxvit_tiny_tf_224",
    "test_coatnet": "coatnet_0_rw_224",
    "test_vit": "vit_small_patch16_224",
    "test_vit_relpos": "vit_relpos_small_patch16_224",
}


def masked_levels(reductions: list[int]) -> int:
    """The stop stage of the table: the lowest level at stride 16 or coarser, so that AIM masks the
    strides 32 and 16 as the paper's ConvNeXt AIM[2] and ResNet AIM[3] do (at least the top two
    levels); on a single-scale backbone, its last two levels."""
    top = len(reductions) - 1
    if len(set(reductions)) == 1:
        return max(top - 1, 0)
    coarse = [i for i, r in enumerate(reductions) if r >= 16]
    return min(coarse[0] if coarse else 0, max(top - 1, 0))


def macs(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Giga multiply-adds of one image, as `aim_ext.bench.cost.gmacs` counts them but with autograd
    on: under no_grad, torch's flop counter fails on meta tensors for PiT and CaiT."""
    image = torch.zeros(1, 3, *size)
    with FlopCounterMode(display=False) as counter:
        model.predict(image, merged_map=True) if isinstance(model, AIM) else model(image)
    return counter.get_total_flops() / 2 / 1e9


def row(family: Family) -> str:
    name = FULL_SIZE.get(family.model, family.model)
    info = feature_info(name, {})
    channels, reductions = info.channels(), info.reduction()
    stop = masked_levels(reductions)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vanilla = aim_ext.create_model(name, num_classes=200).eval()
        model = aim_ext.create_model(name, num_classes=200, stop_stage=stop).eval()
        size = tuple(model.pretrained_cfg["input_size"][-2:])
        p0, p1 = parameters_m(vanilla), parameters_m(model)
        try:
            m0, m1 = macs(vanilla, size), macs(model, size)
            mac = f"{m0:.2f} / {(m1 / m0 - 1) * 100:+.0f}%"
        except Exception:  # noqa: BLE001 - a backbone whose forward does not run on meta tensors
            mac = "n/a"
    levels = ", ".join(f"{r}:{c}" for r, c in zip(reductions, channels, strict=True))
    layout = model.feature_layout
    return (
        f"| {family.family} | `{name}` | {levels} | {layout} | {stop} | "
        f"{p0:.1f}M / {(p1 / p0 - 1) * 100:+.0f}% | {mac} | {status(family, model, reductions)} |"
    )


def status(family: Family, model: torch.nn.Module, reductions: list[int]) -> str:
    """works, or works with its limits: one resolution, no bottom-up masking, no ONNX."""
    notes = []
    if len(set(reductions)) == 1:
        notes.append("single scale")
    if not isinstance(model.backbone, FeatureListNet):
        notes.append("no bottom-up masking")
    if family.onnx:
        notes.append(f"no ONNX: {family.onnx}")
    return "works" if not notes else "works; " + "; ".join(notes)


def main() -> None:
    print(
        "| family | timm model | levels (stride:channels) | layout | stop stage | "
        "parameters / AIM adds | GMACs / AIM adds | status |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        try:
            print(row(family), flush=True)
        except Exception as error:  # noqa: BLE001 - report the family and go on
            print(f"| {family.family} | `{family.model}` | error: {type(error).__name__}: {error} |")


if __name__ == "__main__":
    main()
