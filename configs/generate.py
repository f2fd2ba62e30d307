"""Write every training config in configs/ from the paper's recipe and its table rows.

    python configs/generate.py           # (re)write configs/<dataset>/<variant>.yaml
    python configs/generate.py --check   # exit 1 if a written config differs (tests/test_cli_train.py)

The recipe is Tables 4-5 and appendix A.3: 200 epochs, batch 512, AdamW with a cosine schedule and
no warm-up, the top-down pathway (mask estimators included) at 0.01 with weight decay 1e-3,
RandAugment(3, 9), label smoothing 0.05, dropout and drop path 0.3, the active-area weight 6 with
tau annealed from 1.0 over the first 100 epochs, and the ImageNet-1k weights of each backbone.
Every key is written out, so a config does not change when a TrainConfig default does.
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
# Datasets: (aim-train's dataset, the backbones of its rows, what to pass on the command line).
BIRDS = ("convnext_tiny", "resnet50", "resnet101")
DATASETS = {
    "cub": ("cub", BIRDS, "--data-root CUB_200_2011"),
    "waterbirds95": (
        "waterbirds",
        BIRDS,
        "--data-root waterbird_complete95_forest2water2 --cub-root CUB_200_2011",
    ),
    "waterbirds100": ("waterbirds", BIRDS, "--data-root waterbird_1.0_forest2water2 --cub-root CUB_200_2011"),
    "travelingbirds": ("travelingbirds", BIRDS, "--data-root TRAVELINGBIRDS --cub-root CUB_200_2011"),
    "hard_imagenet": (
        "hard_imagenet",
        ("convnext_tiny",),
        "--data-root hardImageNet --imagenet-root IMAGENET",
    ),
    "imagenet100": ("folder", ("convnext_tiny",), "--data-root IMAGENET100 (a class-per-folder tree)"),
    "imagewoof": ("folder", ("convnext_tiny",), "--data-root imagewoof2 (a class-per-folder tree)"),
}


def variant_name(backbone: str, stop: int | None, tau: float | None) -> str:
    if stop is None:
        return backbone
    return f"{backbone}_aim{stop}_" + ("noanneal" if tau is None else f"{round(tau * 100)}")


def recipe(backbone: str, stop: int | None, tau: float | None, dataset: str, folder: str) -> dict:
    """One config: the paper's recipe for this backbone, variant and dataset."""
    tag, lr_backbone = BACKBONES[backbone]
    config = {
        "model": backbone,
        "pretrained": True,
        "pretrained_tag": tag,
        "dataset": dataset,
        "image_size": 224,
        "epochs": EPOCHS,
        "batch_size": 512,
        "lr_backbone": lr_backbone,
        "lr_topdown": 0.01,
        "weight_decay": 0.001,
        "warmup_epochs": 0,
        "label_smoothing": 0.05,
        "randaugment": [3, 9],
        "drop_rate": 0.3,
        "drop_path_rate": 0.3,
    }
    if stop is not None:
        config["stop_stage"] = stop
        config["area_weight"] = 6.0
        config["area_final"] = tau
        if tau is not None:  # r_l per image (Eq. 6); select only once tau holds its final value
            config.update(area_per_image=True, area_start=0, area_duration=ANNEALING, select_from=ANNEALING)
    config["out"] = f"runs/{folder}/{variant_name(backbone, stop, tau)}"
    return config


def header(backbone: str, stop: int | None, tau: float | None, folder: str, flags: str) -> str:
    if stop is None:
        row = backbone
    else:
        row = f"{backbone}+AIM[{stop}, " + ("no annealing" if tau is None else f"{round(tau * 100)}%") + "]"
    return f"# {folder}: {row}, the paper's recipe (configs/generate.py writes this file). Pass {flags}.\n"


def configs() -> dict[Path, str]:
    """Every config file's path and text."""
    out = {}
    for folder, (dataset, backbones, flags) in DATASETS.items():
        for backbone in backbones:
            for stop, tau in VARIANTS[backbone]:
                text = header(backbone, stop, tau, folder, flags) + yaml.safe_dump(
                    recipe(backbone, stop, tau, dataset, folder), sort_keys=False
                )
                out[HERE / folder / f"{variant_name(backbone, stop, tau)}.yaml"] = text
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
