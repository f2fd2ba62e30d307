"""`aim-bench`: latency, throughput and memory of AIM models against their vanilla backbones.

    aim-bench                                  # GPU: every family, runtime, batch size and dtype
    aim-bench --device cpu --quick             # a smoke run: under 3 minutes on 2 cores
    aim-bench --families convnext_tiny --runtimes eager,cudagraphs --batch-sizes 1 --dtypes bfloat16
    aim-bench --device cpu --fuse --sparse auto --runtimes eager --batch-sizes 8 --dtypes float32
    aim-bench --model runs/demo/aim/model --device cpu --quick   # a trained model against its backbone

Each comparison (one family, runtime, batch and dtype) prepares the vanilla model and its AIM
variants, then times them in alternating rounds, so every overhead_ratio compares figures of the
same run. AIM's mask estimators are first calibrated to --mask-density active positions (a
fresh model's masks are all on or all off). --fuse times `aim_ext.fuse_for_inference` of every
model, vanilla and AIM alike. --model times a trained model (a saved-model folder, an aim-train run
folder or checkpoint) with its own weights, masks, classes and input size, an AIM model against a
new vanilla model of its backbone (a vanilla one alone). Writes DIR/results.json, results.md and
overhead.png (default DIR: runs/bench).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from aim_ext.bench import report
from aim_ext.bench.cost import gmacs, parameters_m
from aim_ext.bench.runtimes import BATCH_ONE_ONLY, OUTSIDE_TORCH_MEMORY, RUNTIMES, Setting, Unavailable
from aim_ext.bench.timing import peak_memory_mib, time_interleaved
from aim_ext.bench.train_step import TRAIN_STEPS, prepare_train_step
from aim_ext.bench.variants import (
    FAMILIES,
    Variant,
    calibrate_mask_density,
    family_variants,
    trained_variants,
)
from aim_ext.cli.errors import (
    non_negative_int,
    one_line_errors,
    positive_int,
    printable,
    shown,
    writable_folder,
)
from aim_ext.export import example_image
from aim_ext.models import (
    AIM,
    ESTIMATOR_MODES,
    BottomUpAIM,
    InferenceMaskEstimator,
    fuse_for_inference,
    load_model,
)
from aim_ext.models.sparsity import SPARSE_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --quick: small enough for 2 CPU cores in under 3 minutes, every family and kind of row present.
QUICK = {
    "runtimes": ["eager", "onnxruntime"],
    "batch_sizes": [1],
    "dtypes": ["float32"],
    "image_size": 160,
    "train_batch": 8,
    "train_runtimes": ["eager"],
    "warmup": 2,
    "rounds": 3,
    "per_round": 3,
}
FULL = {
    "runtimes": list(RUNTIMES),
    "batch_sizes": [1, 32, 256],
    "dtypes": list(DTYPES),
    "image_size": 224,
    "train_batch": 64,
    "train_runtimes": list(TRAIN_STEPS),
    "warmup": 10,
    "rounds": 5,
    "per_round": 20,
}


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present")
    parser.add_argument("--quick", action="store_true", help="few rows and calls (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="default runs/bench")
    parser.add_argument(
        "--model",
        help="time this trained model (saved-model folder, run folder or checkpoint) against its "
        "backbone instead of the families",
    )
    parser.add_argument(
        "--families", type=_names, help="the backbone families: " + ", ".join(FAMILIES) + " (default all)"
    )
    parser.add_argument(
        "--stop-stages",
        type=_names,
        help="keep these variants of each family, e.g. vanilla,2 (default: all of FAMILIES)",
    )
    parser.add_argument("--runtimes", type=_names, help=", ".join(RUNTIMES))
    parser.add_argument(
        "--batch-sizes",
        type=lambda t: [positive_int(b) for b in _names(t)],
        help="comma-separated inference batch sizes (default 1,32,256; --quick: 1)",
    )
    parser.add_argument("--dtypes", type=_names, help=", ".join(DTYPES))
    parser.add_argument(
        "--image-size",
        type=positive_int,
        help="square input size (default 224, --quick 160; --model: its own)",
    )
    parser.add_argument(
        "--num-classes", type=positive_int, help="classes of the new models (default 1000; --model: its own)"
    )
    parser.add_argument(
        "--train", action=argparse.BooleanOptionalAction, default=True, help="time training steps"
    )
    parser.add_argument("--train-batch", type=positive_int, help="training batch (default 64; --quick: 8)")
    parser.add_argument(
        "--train-runtimes",
        type=_names,
        help="the training step kinds (aim-train --step): " + ", ".join(TRAIN_STEPS),
    )
    parser.add_argument("--warmup", type=non_negative_int, help="untimed calls per model before timing")
    parser.add_argument(
        "--rounds", type=positive_int, help="alternating rounds over the models of a comparison"
    )
    parser.add_argument("--per-round", type=positive_int, help="timed calls per model and round")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last for the eager, compiled and CUDA graph rows (default on)",
    )
    parser.add_argument(
        "--concurrent-branches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run AIM's mask estimators and feature branches on CUDA side streams in the eager and "
        "CUDA graph inference rows (AIM.concurrent_branches); --no-concurrent-branches: one stream",
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="time aim_ext.fuse_for_inference(model) for every model, vanilla and AIM",
    )
    parser.add_argument(
        "--sparse",
        choices=SPARSE_MODES,
        default="auto",
        help="AIM's feature branches in evaluation (AIM.sparse_inference): the measured policy, "
        "sparse wherever possible, or dense",
    )
    parser.add_argument(
        "--estimator",
        choices=ESTIMATOR_MODES,
        default="auto",
        help="how a fused AIM model's mask estimators run (InferenceMaskEstimator.algorithm): the op "
        "aim::mask_estimator's automatic choice, its two-launch kernel, its convolutions, or modules",
    )
    parser.add_argument(
        "--pooled-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="AIM evaluation logits from the pooled head (AIM.pooled_head); --no-pooled-head: from P_T",
    )
    parser.add_argument(
        "--mask-density",
        type=float,
        default=0.25,
        help="calibrate AIM's mask estimators to this active fraction (default 0.25; 0: leave them)",
    )
    return parser


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left open from the quick or the full preset, and check it."""
    args.trained = None
    if args.model is not None:
        for flag, value in (("--families", args.families), ("--stop-stages", args.stop_stages)):
            if value is not None:
                raise SystemExit(f"aim-bench: --model times one trained model; leave out {flag}")
        args.trained = _trained(args)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.families is None:
        args.families = list(FAMILIES)
    if args.num_classes is None:
        args.num_classes = 1000
    for name, known, given in (
        ("runtime", RUNTIMES, args.runtimes),
        ("dtype", DTYPES, args.dtypes),
        ("family", FAMILIES, args.families if args.trained is None else []),
        ("training runtime", TRAIN_STEPS, args.train_runtimes),
    ):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise SystemExit(f"aim-bench: unknown {name} {', '.join(unknown)}; known: {', '.join(known)}")
    if not 0 <= args.mask_density < 1:
        raise SystemExit(f"aim-bench: --mask-density must be in [0, 1), got {args.mask_density}")
    if args.estimator != "auto" and not args.fuse:
        raise SystemExit(
            f"aim-bench: --estimator {args.estimator} sets how fused mask estimators run; add --fuse"
        )
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("aim-bench: --device cuda, but torch sees no CUDA device")
    return args


def _trained(args: argparse.Namespace) -> list[Variant]:
    """--model: the trained model's variants; its backbone becomes the one family, and its classes
    and input size (unless --image-size is given) those of the run."""
    try:
        model = load_model(args.model)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"aim-bench: {error}") from None
    if isinstance(model, BottomUpAIM):
        raise SystemExit(f"aim-bench: {args.model} is bottom-up masking (an ablation); it times AIM models")
    variants = trained_variants(args.model, model)
    args.families = [variants[0].backbone]
    if args.num_classes is not None and args.num_classes != model.num_classes:
        raise SystemExit(f"aim-bench: {args.model} has {model.num_classes} classes; leave out --num-classes")
    args.num_classes = model.num_classes
    args.image_size = args.image_size or model.pretrained_cfg["input_size"][-1]
    return variants


def _selected(variants: list[Variant], stop_stages: list[str] | None) -> list[Variant]:
    """The variants named by --stop-stages ("vanilla" or a stage number), all when not given."""
    if stop_stages is None:
        return variants
    return [v for v in variants if ("vanilla" if v.is_vanilla else str(v.stop_stage)) in stop_stages]


def _row(kind, variant, runtime, setting: Setting, cost: dict, **measured) -> dict:
    return {
        "fused": False,
        "evaluation_path": None,
        "kind": kind,
        "family": variant.backbone,
        "model": variant.name,
        "variant": "vanilla" if variant.is_vanilla else f"AIM[{variant.stop_stage}]",
        "runtime": runtime,
        "batch": setting.batch,
        "dtype": str(setting.dtype).removeprefix("torch."),
        "device": setting.device,
        "channels_last": setting.channels_last,
        "image_size": list(setting.image_size),
        **cost,
        **measured,
    }


def _measure(calls: list, setting: Setting, args, memory: bool) -> list[dict]:
    timings = time_interleaved(
        calls, setting.device, warmup=args.warmup, rounds=args.rounds, per_round=args.per_round
    )
    rows = []
    for call, t in zip(calls, timings, strict=True):
        rows.append(
            {
                "status": "ok",
                "median_ms": t.median_ms,
                "p25_ms": t.p25_ms,
                "p75_ms": t.p75_ms,
                "calls": t.calls,
                "throughput_img_s": setting.batch / (t.median_ms / 1e3),
                "peak_mem_mib": peak_memory_mib(call, setting.device) if memory else None,
            }
        )
    return rows


def _compare(kind, runtime, variants, models, costs, setting, args, prepare) -> list[dict]:
    """Prepare every variant's call; time those that could be prepared, in alternating rounds."""
    calls, statuses = {}, {}
    for v in variants:
        try:
            calls[v] = prepare(models[v], v, setting)
        except Unavailable as reason:
            statuses[v] = f"unavailable: {reason}"
        except Exception as error:  # noqa: BLE001 - a failed row must not end a long run
            traceback.print_exc()
            statuses[v] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    memory = setting.device == "cuda" and runtime not in OUTSIDE_TORCH_MEMORY
    measured = (
        dict(zip(calls, _measure(list(calls.values()), setting, args, memory), strict=True)) if calls else {}
    )
    rows = [
        _row(kind, v, runtime, setting, costs[v], **(measured.get(v) or {"status": statuses[v]}))
        for v in variants
    ]
    if setting.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _inference_model(v: Variant, args: argparse.Namespace, size: tuple[int, int]) -> tuple:
    """The model the inference rows time (seeded, calibrated, fused if asked) and its cost columns."""
    torch.manual_seed(0)  # the same weights, and so the same masks, in every run
    model = v.build(args.num_classes)
    if isinstance(model, AIM) and args.mask_density and not v.is_trained:  # a trained model's own masks
        calibrate_mask_density(model, args.mask_density, example_image(4, size, seed=1))
    cost = {"params_m": parameters_m(model), "gmacs": gmacs(model, size), "fused": args.fuse}
    if args.fuse:
        model = fuse_for_inference(model)
    if isinstance(model, AIM):
        cost.update(_evaluation_path(model, size, args.device))
    return model, cost


@torch.no_grad()
def _evaluation_path(model: AIM, size: tuple[int, int], device: str) -> dict:
    """How eager float32 evaluation of one image on ``device`` computes the logits ("P_T", or the
    pooled head and each stage's feature branch; traced runtimes take the dense branch under
    "auto"), and each stage's active fraction."""
    model = copy.deepcopy(model).to(device)
    image = example_image(1, size).to(device)
    with torch.inference_mode():
        masks = model.predict(image)[1]
        path = (
            "P_T"
            if model.builds_merged_map()
            else "pooled: "
            + ", ".join(f"s{i} {b}" for i, b in zip(model.stage_indices, model.branches_used, strict=True))
        )
    return {"evaluation_path": path, "mask_active": [round(float(m.mean()), 3) for m in masks]}


def run(args: argparse.Namespace) -> list[dict]:
    size = (args.image_size, args.image_size)
    jobs = []
    for family in args.families:
        for dtype in args.dtypes:
            for batch in args.batch_sizes:
                jobs += [
                    ("inference", family, dtype, batch, r)
                    for r in args.runtimes
                    if batch == 1 or r not in BATCH_ONE_ONLY
                ]
            if args.train:
                jobs += [("train", family, dtype, args.train_batch, r) for r in args.train_runtimes]
    rows: list[dict] = []
    models, costs = {}, {}
    with tempfile.TemporaryDirectory(prefix="aim-bench-") as workdir:
        for kind, family, dtype, batch, runtime in tqdm(jobs, desc="aim-bench", unit="comparison"):
            variants = args.trained or family_variants(family, quick=args.quick)
            variants = _selected(variants, args.stop_stages)
            for v in variants:
                if v not in models:
                    models[v], costs[v] = _inference_model(v, args, size)
            setting = Setting(args.device, DTYPES[dtype], batch, size, args.channels_last, Path(workdir))
            if kind == "inference":

                def prepare(model, variant, s, runtime=runtime):
                    return RUNTIMES[runtime](model, variant.name, s)
            else:

                def prepare(model, variant, s, kind=runtime):
                    return prepare_train_step(variant.build(args.num_classes), s, kind)

            rows += _compare(kind, runtime, variants, models, costs, setting, args, prepare)
    return rows


@one_line_errors("aim-bench")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _settings(build_parser().parse_args(argv))
    writable_folder(args.out)  # before the long run, not after it
    switches = {  # class attributes every model of the run reads
        (AIM, "concurrent_branches"): args.concurrent_branches,
        (AIM, "sparse_inference"): args.sparse,
        (AIM, "pooled_head"): args.pooled_head,
        (InferenceMaskEstimator, "algorithm"): args.estimator,
    }
    previous = {key: getattr(*key) for key in switches}
    try:
        for (cls, name), value in switches.items():
            setattr(cls, name, value)
        rows = run(args)
    finally:
        for (cls, name), value in previous.items():
            setattr(cls, name, value)
    report.add_ratios(rows)
    env = report.environment(args.device, argv)
    env.update(
        concurrent_branches=args.concurrent_branches,
        fused=args.fuse,
        sparse=args.sparse,
        estimator=args.estimator,
        pooled_head=args.pooled_head,
        mask_density=args.mask_density,
    )
    report.write(rows, env, args.out)
    print(printable(report.markdown(rows, env)))
    written = ", ".join(shown(args.out / name) for name in ("results.json", "results.md", "overhead.png"))
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
