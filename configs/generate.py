"""Write every training config in configs/ from the paper's recipe and its table rows.

    python configs/generate.py           # (re)write configs/<dataset>/<variant>.yaml
    python configs/generate.py --check   # exit 1 if a written config differs (tests/test_cli_train.py)

The recipe is Tables 4-5 and appendix A.3: 200 epochs, batch 512, AdamW with a cosine schedule and
no warm-up, the top-down pathway (mask estimators included) at 0.01 with weight decay 1e-3,
RandAugment(3, 9), label smoothing 0.05, dropout and drop path 0.3, the active-area weight 6 with
tau annealed from 1.0 over the first 100 epochs, and the ImageNet-1k weights of each backbone.
Every key of the recipe is written out, so a config does not change when a TrainConfig default
does; the data paths, the device and the like come from the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
EPOCHS = 200
ANNEALING = EPOCHS // 2  # tau reaches its final value at epoch 100, the first one selected

# The backbones: timm's name, the ImageNet-1k weights (timm's tag) and the backbone learning rate
# (Table 5). The paper names no weights; these are the ImageNet-1k ones closest to its setting:
# ConvNeXt's own release (timm's default is ImageNet-12k fine-tuned on 1k) and torchvision's
# original ResNets.
BACKBONES = {
    "convnext_tiny": ("fb_in1k", 7e-6),
    "resnet50": ("tv_in1k", 1e-3),
    "resnet101": ("tv_in1k", 1e-3),
}
# Variants: (stop stage, final tau); stop None is the vanilla backbone, tau None is "no annealing"
# (no active-area loss), the rows of appendix D.
VARIANTS = {
    "convnext_tiny": [(None, None), (1, 0.25), (1, 0.35), (2, 0.25), (2, 0.35), (1, None), (2, None)],
    "resnet50": [(None, None), (3, 0.25), (2, 0.25), (3, None), (2, None)],
    "resnet101": [(None, None), (3, 0.25), (2, 0.25)],
}
# Datasets: (aim-train's dataset, the backbones of its rows, what to pass on the command line, the
# image size: 299 for TravelingBirds, as the paper has it after its authors (appendix A.4.3), else 224).
BIRDS = ("convnext_tiny", "resnet50", "resnet101")
CUB = "--cub-root CUB_200_2011"
DATASETS = {
    "cub": ("cub", BIRDS, "--data-root CUB_200_2011", 224),
    "waterbirds95": ("waterbirds", BIRDS, f"--data-root waterbird_complete95_forest2water2 {CUB}", 224),
    "waterbirds100": ("waterbirds", BIRDS, f"--data-root waterbird_1.0_forest2water2 {CUB}", 224),
    "travelingbirds": ("travelingbirds", BIRDS, f"--data-root TRAVELINGBIRDS {CUB}", 299),
    "hard_imagenet": (
        "hard_imagenet",
        ("convnext_tiny",),
        "--data-root hardImageNet --imagenet-root IMAGENET",
        224,
    ),
    "imagenet100": ("folder", ("convnext_tiny",), "--data-root IMAGENET100 (a class-per-folder tree)", 224),
    "imagewoof": ("folder", ("convnext_tiny",), "--data-root imagewoof2 (a class-per-folder tree)", 224),
}
# The architecture ablations, as the paper ran them with ConvNeXt-T: (dataset folder, stop stage,
# final tau, ablation). "one_estimator": one mask estimator at the top stage, its mask upsampled to
# the lower stages (appendix D.3, Table 13); "bottomup": masks inside the backbone on levels
# stop..3, the stage choices [1, 2, 3], [2, 3] and [3] (appendix D.4, Tables 14-15).
ABLATIONS = [
    *(("cub", stop, tau, "one_estimator") for stop in (1, 2) for tau in (0.25, 0.35, None)),
    *(("cub", stop, tau, "bottomup") for stop in (1, 2, 3) for tau in (0.25, 0.35)),
    *(("waterbirds95", 1, tau, "bottomup") for tau in (0.25, None)),
]
ARCHITECTURE = {  # an ablation's architecture keys
    None: {"masking": "top-down", "mask_estimators": "every"},
    "one_estimator": {"masking": "top-down", "mask_estimators": "top"},
    "bottomup": {"masking": "bottom-up", "mask_estimators": "every"},
}


def variant_name(backbone: str, stop: int | None, tau: float | None, ablation: str | None = None) -> str:
    if stop is None:
        return backbone
    area = "noanneal" if tau is None else f"{round(tau * 100)}"
    if ablation == "bottomup":
        return f"{backbone}_bottomup{stop}_{area}"
    return f"{backbone}_aim{stop}_{area}" + ("_one_estimator" if ablation == "one_estimator" else "")


def recipe(
    backbone: str,
    stop: int | None,
    tau: float | None,
    dataset: str,
    folder: str,
    size: int,
    ablation: str | None = None,
) -> dict:
    """One config: the paper's recipe for this backbone, variant and dataset, every key of the
    recipe written out (the data paths and the machine's settings are left to the command line)."""
    tag, lr_backbone = BACKBONES[backbone]
    annealed = stop is not None and tau is not None
    return {
        "model": backbone,
        "stop_stage": stop,
        **ARCHITECTURE[ablation],
        "pretrained": True,
        "pretrained_tag": tag,
        "mask_init": "random",
        "drop_rate": 0.3,
        "drop_path_rate": 0.3,
        "freeze_levels": 0,
        "dataset": dataset,
        "image_size": size,
        "randaugment": [3, 9],
        "batch_size": 512,
        "epochs": EPOCHS,
        "lr_backbone": lr_backbone,
        "lr_topdown": 0.01,
        "lr_mask": None,  # the top-down pathway's rate: the estimators are part of it
        "weight_decay": 0.001,
        "weight_decay_mask": None,  # the top-down pathway's
        "warmup_epochs": 0,
        "label_smoothing": 0.05,
        "accum_steps": 1,
        "grad_clip": None,
        "area_final": tau if stop is not None else None,
        "area_final_stages": None,
        "area_start": 0,
        "area_duration": ANNEALING if annealed else None,
        "area_weight": 6.0,
        "area_per_image": True,  # r_l of one image's mask (Eq. 6)
        "aux_weight": 1.0,
        "temperature": 1.0,
        "noise_off_epoch": None,
        "seed": 0,
        "select_from": ANNEALING if annealed else None,  # once tau holds its final value
        "out": f"runs/{folder}/{variant_name(backbone, stop, tau, ablation)}",
    }


def header(
    backbone: str, stop: int | None, tau: float | None, folder: str, flags: str, ablation: str | None = None
) -> str:
    area = "no annealing" if tau is None else f"{round(tau * 100)}%"
    if stop is None:
        row = backbone
    elif ablation == "bottomup":
        row = f"bottom-up {backbone}+AIM (levels {list(range(stop, 4))}, {area}; appendix D.4)"
    else:
        row = f"{backbone}+AIM[{stop}, {area}]"
        row += " with one mask estimator (appendix D.3)" if ablation == "one_estimator" else ""
    return f"# {folder}: {row}, the paper's recipe (configs/generate.py writes this file). Pass {flags}.\n"


def configs() -> dict[Path, str]:
    """Every config file's path and text."""
    out = {}
    for folder, (dataset, backbones, flags, size) in DATASETS.items():
        for backbone in backbones:
            for stop, tau in VARIANTS[backbone]:
                text = header(backbone, stop, tau, folder, flags) + yaml.safe_dump(
                    recipe(backbone, stop, tau, dataset, folder, size), sort_keys=False
                )
                out[HERE / folder / f"{variant_name(backbone, stop, tau)}.yaml"] = text
    for folder, stop, tau, ablation in ABLATIONS:
        dataset, _, flags, size = DATASETS[folder]
        text = header("convnext_tiny", stop, tau, folder, flags, ablation) + yaml.safe_dump(
            recipe("convnext_tiny", stop, tau, dataset, folder, size, ablation), sort_keys=False
        )
        out[HERE / folder / f"{variant_name('convnext_tiny', stop, tau, ablation)}.yaml"] = text
    return out


def main(argv: list[str]) -> int:
    expected = configs()
    if "--check" in argv:
        written = set(HERE.glob("*/*.yaml"))
        stale = sorted(
            str(p.relative_to(HERE))
            for p in written | set(expected)
            if not p.exists() or p not in expected or p.read_text() != expected[p]
        )
        if stale:
            print("configs/generate.py: out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    for path in HERE.glob("*/*.yaml"):
        if path not in expected:
            path.unlink()
    for path, text in expected.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(expected)} configs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
