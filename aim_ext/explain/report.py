"""Evaluate a training run and write its report: per-image CSV, metrics.json, PNG figures, report.md.

`evaluate_run` is what `aim-eval RUN` does and `compare_runs` what `aim-eval --compare A B` does;
the pieces (`open_run`, `evaluate`, `evaluation_metrics`, `write_report`, `write_comparison`) are
public for notebooks. A run folder is what `aim_ext.engine.fit` writes: config.yaml, best.pt/last.pt,
metrics.jsonl and, for AIM runs, masks/epoch_XXXX.pt snapshots of a fixed validation batch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aim_ext.data.tuxbirds import TuxBirds
from aim_ext.engine import TrainConfig, load_checkpoint, load_config, load_model_state
from aim_ext.engine.train import resolve_device
from aim_ext.explain.attributions import METHODS, attribute
from aim_ext.explain.counterfactual import counterfactual_predictions, counterfactual_rates
from aim_ext.explain.epg import energy_pointing_game
from aim_ext.explain.metrics import classification_metrics, mask_areas, merged_mask
from aim_ext.models import AIM

METHOD_TITLES = {
    "gradcam": "GradCAM",
    "guided_gradcam": "Guided GradCAM",
    "guided_backprop": "Guided Backprop",
}
# What each accuracy means, written next to the numbers: the two averages are regularly confused.
DEFINITIONS = {
    "avg_acc": "plain accuracy over all evaluated images (weighted by the evaluation group sizes)",
    "worst_group_acc": "lowest per-group accuracy",
    "reweighted_avg_acc": "per-group accuracy weighted by the TRAINING group proportions "
    "(the 'average accuracy' of the Waterbirds literature)",
    "group_acc": "accuracy within each group (Waterbirds: group = 2 * y + place)",
    "epg": "mean Energy Pointing Game: share of positive attribution energy inside the object mask",
    "mask_sparsity": "mean fraction of active mask positions per AIM stage (top stage first)",
    "merged_mask_area": "mean fraction of active positions of the merged (union) mask",
    "background_swap_flip_rate": "share of images whose prediction changes when only the background "
    "changes kind (water <-> land; TuxBirds counterfactuals)",
    "background_only_waterbird_rate": "share of bird-free backgrounds called 'waterbird', per place",
    "background_only_waterbird_gap": "background-only 'waterbird' rate on water minus on land",
}


class EvalError(RuntimeError):
    """A run cannot be evaluated as asked (missing folder, config or checkpoint; mismatched runs)."""


@dataclass
class EvalOptions:
    """How to evaluate: which checkpoint and split, attribution methods and targets, limits."""

    checkpoint: str = "best"
    split: str = "test"
    methods: Sequence[str] = METHODS
    target: str = "label"
    batch_size: int = 32  # attributions need a backward pass: not the (large) training batch
    max_images: int | None = None
    figures: int = 4
    device: str = "auto"
    num_workers: int | None = None  # None: the run's setting
    counterfactuals: bool = True  # TuxBirds: background-swap and background-only rates
    counterfactual_images: int | None = None  # None: every evaluated image

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise EvalError(f"unknown attribution methods {unknown}; choose from {', '.join(METHODS)}")
        if self.target not in ("label", "pred"):
            raise EvalError(f"target must be 'label' or 'pred', got {self.target!r}")
        if self.counterfactual_images is not None and self.counterfactual_images < 1:
            raise EvalError(f"counterfactual_images must be at least 1, got {self.counterfactual_images}")
        if self.split not in ("test", "val"):
            raise EvalError(f"split must be 'test' or 'val', got {self.split!r}")
        self.methods = tuple(dict.fromkeys(self.methods))


@dataclass
class Run:
    """A training run ready to evaluate: its config, model with the checkpoint loaded, and dataset."""

    folder: Path
    cfg: TrainConfig
    checkpoint: Path
    epoch: int | None
    model: nn.Module
    dataset: Dataset
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    train_group_counts: dict[int, int] | None

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def is_aim(self) -> bool:
        return isinstance(self.model, AIM)

    @property
    def stage_names(self) -> list[str]:
        """AIM stage names, top stage first, after the backbone feature stages they mask."""
        return [f"stage_{i}" for i in self.model.stage_indices] if self.is_aim else []


@dataclass
class Shown:
    """The first few evaluated images, kept for the figures, with their masks and attribution maps."""

    images: Tensor  # (n, 3, H, W), normalised
    targets: Tensor  # the attributed classes
    object_masks: Tensor | None = None  # (n, H, W) bool
    stage_masks: list[Tensor] | None = None  # AIM masks (n, 1, h, w), top stage first
    maps: dict[str, Tensor] = field(default_factory=dict)  # method -> (n, h, w)


@dataclass
class Evaluation:
    """Per-image results of one run on one split, and the images the figures show."""

    run: Run
    options: EvalOptions
    ids: list[str]
    labels: Tensor
    preds: Tensor
    groups: Tensor | None
    epg: dict[str, Tensor]  # method -> (N,); empty when the dataset has no masks
    stage_areas: Tensor | None  # (N, stages), AIM only
    merged_areas: Tensor | None  # (N,), AIM only
    shown: Shown
    counterfactual: dict[str, Any] | None = None  # TuxBirds' background-reliance rates
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return bool(getattr(self.run.dataset, "has_masks", False))


def _checkpoint_path(folder: Path, checkpoint: str) -> Path:
    path = folder / f"{checkpoint}.pt" if checkpoint in ("best", "last") else Path(checkpoint)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.pt"))
        raise EvalError(
            f"checkpoint not found: {path} (checkpoints in {folder}: {', '.join(found) or 'none'})"
        )
    return path


def open_run(folder: str | Path, options: EvalOptions) -> Run:
    """Load a run's config and checkpoint, build its model and the dataset split to evaluate."""
    from aim_ext.cli.train import build_model, build_split

    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"run folder not found: {folder}")
    config = folder / "config.yaml"
    if not config.is_file():
        raise EvalError(f"no config.yaml in {folder}: not a run folder written by aim-train")
    try:
        cfg = load_config(config)
    except ValueError as error:
        raise EvalError(f"{config}: {error}") from error
    path = _checkpoint_path(folder, options.checkpoint)
    # The checkpoint replaces every weight: never fetch or read the pretrained ones again.
    cfg = dataclasses.replace(cfg, pretrained=False, pretrained_file=None)
    with torch.device("meta"):
        normalisation = build_model(cfg, num_classes=1).pretrained_cfg
    mean, std = tuple(normalisation["mean"]), tuple(normalisation["std"])
    dataset = build_split(cfg, options.split, {"mean": mean, "std": std})
    model = build_model(cfg, num_classes=dataset.num_classes)
    state = load_checkpoint(path)
    try:
        load_model_state(model, state, source=str(path))
    except (ValueError, RuntimeError) as error:  # RuntimeError: tensor sizes (e.g. number of classes)
        raise EvalError(f"cannot load {path}: {error}") from error
    device = resolve_device(options.device)
    # Attributions need gradients of activations and inputs only, never of the weights: skipping
    # the weight gradients saves a third of the backward pass.
    model.to(device).eval().requires_grad_(False)
    train_groups = None
    if isinstance(dataset, TuxBirds):  # the plan alone: no need to render the training split
        train_groups = TuxBirds.group_plan("train", dataset.variant, dataset.seed)
    elif getattr(dataset, "groups", None) is not None:
        train_groups = build_split(cfg, "train", {"mean": mean, "std": std}).groups
    train_counts = (
        None if train_groups is None else {g: train_groups.count(g) for g in sorted(set(train_groups))}
    )
    return Run(
        folder, cfg, path, state.get("epoch"), model, dataset, options.split, mean, std, device, train_counts
    )


def _attribute(model: nn.Module, images: Tensor, targets: Tensor, method: str) -> Tensor:
    # The targets are already the labels or the predictions: no second forward pass for the latter.
    return attribute(model, images, targets, method).cpu()


def _predict(run: Run, images: Tensor) -> tuple[Tensor, list[Tensor] | None]:
    """Predicted classes (on the CPU) and, for AIM, the stage masks (top stage first, on the CPU)."""
    with torch.no_grad():
        logits, masks = run.model.predict(images) if run.is_aim else (run.model(images), None)
    return logits.argmax(dim=1).cpu(), [m.cpu() for m in masks] if masks is not None else None


def _figure_methods(options: EvalOptions) -> tuple[str, str]:
    """GradCAM and a second method for the run's attribution figure (the first other one asked for)."""
    return "gradcam", next((m for m in options.methods if m != "gradcam"), "guided_gradcam")


def _shown(run: Run, data: Dataset, options: EvalOptions) -> Shown:
    """The first `options.figures` images with their AIM masks and the figure's attribution maps."""
    samples = [data[i] for i in range(min(options.figures, len(data)))]
    if not samples:
        return Shown(images=torch.empty(0, 3, 1, 1), targets=torch.empty(0, dtype=torch.long))
    images = torch.stack([s["image"] for s in samples])
    preds, masks = _predict(run, images.to(run.device))
    labels = torch.tensor([s["label"] for s in samples])
    shown = Shown(
        images=images,
        targets=labels if options.target == "label" else preds,
        object_masks=torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None,
        stage_masks=masks,
    )
    for method in _figure_methods(options):
        shown.maps[method] = _attribute(run.model, images.to(run.device), shown.targets, method)
    return shown


def evaluate(run: Run, options: EvalOptions) -> Evaluation:
    """Predictions, EPG per method (when the dataset has masks) and AIM mask areas of every image."""
    data = run.dataset
    if options.max_images is not None:
        data = Subset(data, range(min(options.max_images, len(data))))
    loader = DataLoader(
        data,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=run.cfg.num_workers if options.num_workers is None else options.num_workers,
    )
    methods = options.methods if run.dataset.has_masks else ()
    columns: dict[str, list[Tensor]] = {k: [] for k in ("index", "label", "pred", "group", "areas", "merged")}
    epg: dict[str, list[Tensor]] = {m: [] for m in methods}
    for batch in tqdm(loader, desc=f"aim-eval {run.name} ({run.split})", unit="batch", disable=None):
        images = batch["image"].to(run.device)
        preds, masks = _predict(run, images)
        targets = batch["label"] if options.target == "label" else preds
        for method in methods:
            maps = _attribute(run.model, images, targets.to(run.device), method)
            epg[method].append(energy_pointing_game(maps, batch["mask"]))
        columns["index"].append(batch["index"])
        columns["label"].append(batch["label"])
        columns["pred"].append(preds)
        if "group" in batch:
            columns["group"].append(batch["group"])
        if masks is not None:
            columns["areas"].append(mask_areas(masks))
            columns["merged"].append(merged_mask(masks).float().mean(dim=(1, 2, 3)))
    if not columns["label"]:
        raise EvalError(
            f"no images to evaluate in the {run.split} split of {run.cfg.dataset} at {run.cfg.data_root}"
        )
    cat = {k: torch.cat(v) if v else None for k, v in columns.items()}
    counterfactual = None
    if options.counterfactuals and isinstance(run.dataset, TuxBirds):
        indices = cat["index"].tolist()[: options.counterfactual_images]
        workers = run.cfg.num_workers if options.num_workers is None else options.num_workers
        pred = counterfactual_predictions(
            run.model,
            run.dataset,
            run.device,
            indices=indices,
            batch_size=options.batch_size,
            num_workers=workers,
            desc=f"aim-eval {run.name} (counterfactuals)",
        )
        counterfactual = counterfactual_rates(pred)
    ids = getattr(run.dataset, "ids", None)
    evaluation = Evaluation(
        run=run,
        options=options,
        ids=[str(ids[i]) if ids is not None else str(i) for i in cat["index"].tolist()],
        labels=cat["label"],
        preds=cat["pred"],
        groups=cat["group"],
        epg={m: torch.cat(v) for m, v in epg.items()},
        stage_areas=cat["areas"],
        merged_areas=cat["merged"],
        shown=_shown(run, data, options),
        counterfactual=counterfactual,
    )
    evaluation.metrics = evaluation_metrics(evaluation)
    return evaluation


def evaluation_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """metrics.json: the run, the accuracies under unambiguous names, mean EPG, mask sparsity."""
    run = evaluation.run
    notes: list[str] = []
    counts = run.train_group_counts
    try:
        found = classification_metrics(evaluation.preds, evaluation.labels, evaluation.groups, counts)
    except ValueError as error:  # e.g. --max-images left a training group without evaluation images
        notes.append(f"reweighted_avg_acc not computed: {error}")
        found = classification_metrics(evaluation.preds, evaluation.labels, evaluation.groups)
    metrics: dict[str, Any] = {
        "run": str(run.folder),
        "checkpoint": str(run.checkpoint),
        "checkpoint_epoch": run.epoch,
        "model": run.cfg.model,
        "stop_stage": run.cfg.stop_stage,
        "dataset": run.cfg.dataset,
        "split": run.split,
        "num_images": found.pop("num_samples"),
        "attribution_target": evaluation.options.target,
        **found,
    }
    if counts is not None:
        metrics["train_group_count"] = counts
    if evaluation.epg:
        metrics["epg"] = {m: v.double().mean().item() for m, v in evaluation.epg.items()}
    elif not evaluation.has_masks:
        notes.append(f"{run.cfg.dataset} has no object masks: EPG not computed")
    if evaluation.stage_areas is not None:
        sparsity = evaluation.stage_areas.double().mean(dim=0).tolist()
        metrics["mask_sparsity"] = dict(zip(run.stage_names, sparsity, strict=True))
        metrics["merged_mask_area"] = evaluation.merged_areas.double().mean().item()
    if evaluation.counterfactual is not None:
        metrics.update(evaluation.counterfactual)
    metrics["definitions"] = {k: v for k, v in DEFINITIONS.items() if k in metrics}
    metrics["notes"] = notes
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json as one flat, ordered name -> value mapping (for tables)."""
    flat: dict[str, float] = {}
    for key in ("avg_acc", "worst_group_acc", "reweighted_avg_acc"):
        if key in metrics:
            flat[key] = metrics[key]
    for group, value in sorted(metrics.get("group_acc", {}).items(), key=lambda kv: int(kv[0])):
        flat[f"group_acc[{group}]"] = value
    for method, value in metrics.get("epg", {}).items():
        flat[f"epg[{method}]"] = value
    for stage, value in metrics.get("mask_sparsity", {}).items():
        flat[f"mask_sparsity[{stage}]"] = value
    if "merged_mask_area" in metrics:
        flat["merged_mask_area"] = metrics["merged_mask_area"]
    if "background_swap_flip_rate" in metrics:
        flat["background_swap_flip_rate"] = metrics["background_swap_flip_rate"]
    for place, value in metrics.get("background_only_waterbird_rate", {}).items():
        flat[f"background_only_waterbird_rate[{place}]"] = value
    if "background_only_waterbird_gap" in metrics:
        flat["background_only_waterbird_gap"] = metrics["background_only_waterbird_gap"]
    return flat


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _meaning(name: str) -> str:
    return DEFINITIONS.get(name.split("[")[0], "")


def write_csv(evaluation: Evaluation, path: Path) -> Path:
    """per_image.csv: id, label, prediction, group, EPG per method, mask areas per stage."""
    columns: dict[str, list[Any]] = {
        "id": evaluation.ids,
        "label": evaluation.labels.tolist(),
        "prediction": evaluation.preds.tolist(),
    }
    if evaluation.groups is not None:
        columns["group"] = evaluation.groups.tolist()
    for method, values in evaluation.epg.items():
        columns[f"epg_{method}"] = values.tolist()
    if evaluation.stage_areas is not None:
        for name, values in zip(evaluation.run.stage_names, evaluation.stage_areas.T, strict=True):
            columns[f"mask_area_{name}"] = values.tolist()
        columns["mask_area_merged"] = evaluation.merged_areas.tolist()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))
    return path


def _figure_epg(shown: Shown, method: str) -> Tensor:
    """EPG of the shown images' maps; NaN (printed 'nan') where the dataset has no masks."""
    if shown.object_masks is None:
        return torch.full((len(shown.images),), math.nan)
    return energy_pointing_game(shown.maps[method], shown.object_masks)


def mask_evolution_figure(run: Run, path: Path) -> Path | None:
    """The first fixed validation image's AIM mask at each saved epoch (from the run's masks/)."""
    from aim_ext.explain.figures import mask_evolution

    snapshots = sorted((run.folder / "masks").glob("epoch_*.pt"))
    if not run.is_aim or not snapshots:
        return None
    by_epoch = {}
    for snapshot in snapshots:
        state = load_checkpoint(snapshot)
        by_epoch[int(state["epoch"])] = [m[:1] for m in state["masks"]]
    from aim_ext.cli.train import build_split

    val = (
        run.dataset if run.split == "val" else build_split(run.cfg, "val", {"mean": run.mean, "std": run.std})
    )
    return mask_evolution(by_epoch, val[0]["image"], path, mean=run.mean, std=run.std)


def write_figures(evaluation: Evaluation, out: Path) -> dict[str, Path]:
    """The run's PNGs: AIM masks (Fig. 6), GradCAM and a second attribution, mask evolution (Fig. 7)."""
    from aim_ext.explain.figures import gradcam_comparison, mask_figure

    run, shown = evaluation.run, evaluation.shown
    figures: dict[str, Path] = {}
    n = len(shown.images)
    if n and shown.stage_masks is not None:
        figures["AIM masks: image | stage masks (top stage first) | merged mask"] = mask_figure(
            shown.images,
            shown.stage_masks,
            out / "masks.png",
            stage_names=run.stage_names,
            max_images=n,
            mean=run.mean,
            std=run.std,
        )
    if n:
        first, second = _figure_methods(evaluation.options)
        figures[f"{METHOD_TITLES[first]} and {METHOD_TITLES[second]} ({evaluation.options.target} class)"] = (
            gradcam_comparison(
                shown.images,
                shown.maps[first],
                shown.maps[second],
                _figure_epg(shown, first),
                _figure_epg(shown, second),
                out / "attributions.png",
                labels=(METHOD_TITLES[first], METHOD_TITLES[second]),
                masks=shown.object_masks,
                max_images=n,
                mean=run.mean,
                std=run.std,
            )
        )
        evolution = mask_evolution_figure(run, out / "mask_evolution.png")
        if evolution is not None:
            figures["Mask evolution over training (first fixed validation image)"] = evolution
    return figures


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _write_markdown(lines: list[str], figures: dict[str, Path], out: Path) -> Path:
    """`out/report.md`: the given lines, then a section showing each figure under its title."""
    if figures:
        lines = [*lines, "", "## Figures"]
        for title, path in figures.items():
            lines += ["", f"### {title}", "", f"![{title}]({_link(path, out)})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def write_report(evaluation: Evaluation, out: str | Path) -> Path:
    """Write per_image.csv, metrics.json, the figures and report.md into `out`; returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics
    write_csv(evaluation, out / "per_image.csv")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figures = write_figures(evaluation, out) if evaluation.options.figures > 0 else {}
    run = evaluation.run
    lines = [
        f"# Evaluation of `{run.name}`",
        "",
        f"- run: `{run.folder}`; checkpoint `{run.checkpoint.name}` (epoch {run.epoch})",
        f"- model: `{run.cfg.model}`"
        + (f" + AIM from stage {run.cfg.stop_stage}" if run.is_aim else " (vanilla)"),
        f"- data: `{run.cfg.dataset}`, {run.split} split, {metrics['num_images']} images",
        f"- attributions target the {'ground-truth' if evaluation.options.target == 'label' else 'predicted'}"
        " class",
        "- files: [per_image.csv](per_image.csv), [metrics.json](metrics.json)",
        "",
        "## Metrics",
        "",
    ]
    lines += _table(
        ("metric", "value", "meaning"),
        [(name, _fmt(value), _meaning(name)) for name, value in scalar_metrics(metrics).items()],
    )
    if "worst_group" in metrics:
        lines += ["", f"Worst group: {metrics['worst_group']}.", "", "### Groups", ""]
        train = metrics.get("train_group_count", {})
        lines += _table(
            ("group", "images", "training images", "accuracy"),
            [
                (g, metrics["group_count"][g], train.get(g, "–"), _fmt(a))
                for g, a in metrics["group_acc"].items()
            ],
        )
    if metrics["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in metrics["notes"]]
    return _write_markdown(lines, figures, out)


def default_out(run_folder: str | Path, split: str) -> Path:
    """Where `aim-eval RUN` writes by default: RUN/eval_<split>."""
    return Path(run_folder) / f"eval_{split}"


def evaluate_run(
    folder: str | Path, options: EvalOptions, out: str | Path | None = None
) -> tuple[Evaluation, Path]:
    """Open, evaluate and report one run (into `out`, default RUN/eval_<split>); returns report.md too."""
    evaluation = evaluate(open_run(folder, options), options)
    return evaluation, write_report(
        evaluation, out if out is not None else default_out(folder, options.split)
    )


def _labels(a: Evaluation, b: Evaluation) -> tuple[str, str]:
    if a.run.name != b.run.name:
        return a.run.name, b.run.name
    return f"A: {a.run.name}", f"B: {b.run.name}"


def difference_rows(a: Evaluation, b: Evaluation) -> list[tuple[str, str, str, str]]:
    """(metric, A, B, B-A) for every number either run reports."""
    flat_a, flat_b = scalar_metrics(a.metrics), scalar_metrics(b.metrics)
    rows = []
    for name in dict.fromkeys([*flat_a, *flat_b]):
        va, vb = flat_a.get(name), flat_b.get(name)
        diff = f"{vb - va:+.4f}" if va is not None and vb is not None else "–"
        rows.append((name, _fmt(va), _fmt(vb), diff))
    return rows


def write_comparison(
    a: Evaluation, b: Evaluation, out: str | Path, reports: tuple[Path, Path] | None = None
) -> Path:
    """Side-by-side GradCAM (Fig. 3), EPG scatter per method (Fig. 5), difference table, report.md;
    `reports` are the two runs' own report.md files, linked when given."""
    from aim_ext.explain.figures import epg_scatter, gradcam_comparison

    if a.ids != b.ids:
        raise EvalError(
            f"{a.run.name} and {b.run.name} were evaluated on different images "
            f"({a.run.cfg.dataset} {a.run.split}, {len(a.ids)} images vs {b.run.cfg.dataset} {b.run.split}, "
            f"{len(b.ids)} images): compare runs on the same dataset and split"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(a, b)
    table = _table(("metric", labels[0], labels[1], "B-A"), difference_rows(a, b))
    (out / "differences.md").write_text("\n".join(table) + "\n")
    figures: dict[str, Path] = {}
    n = min(len(a.shown.images), len(b.shown.images))
    if n:
        figures["GradCAM side by side, EPG on each"] = gradcam_comparison(
            a.shown.images,
            a.shown.maps["gradcam"],
            b.shown.maps["gradcam"],
            _figure_epg(a.shown, "gradcam")[:n],
            _figure_epg(b.shown, "gradcam")[:n],
            out / "gradcam_compare.png",
            labels=labels,
            masks=a.shown.object_masks,
            max_images=n,
            mean=a.run.mean,
            std=a.run.std,
        )
    for method in [m for m in a.epg if m in b.epg]:
        figures[f"Per-image EPG, {METHOD_TITLES[method]}"] = epg_scatter(
            a.epg[method], b.epg[method], out / f"epg_scatter_{method}.png", labels=labels
        )
    lines = [
        f"# {labels[1]} compared with {labels[0]}",
        "",
        *(
            f"- {side}: `{e.run.folder}` ({e.run.cfg.model}{' + AIM' if e.run.is_aim else ''})"
            + (f", [its report]({_link(reports[i], out)})" if reports else "")
            for i, (side, e) in enumerate((("A", a), ("B", b)))
        ),
        f"- data: `{a.run.cfg.dataset}`, {a.run.split} split, {len(a.ids)} images",
        "",
        "## Differences",
        "",
        *table,
    ]
    if not a.has_masks:
        lines += ["", f"{a.run.cfg.dataset} has no object masks: no EPG, no EPG scatter."]
    return _write_markdown(lines, figures, out)


def compare_runs(
    folder_a: str | Path, folder_b: str | Path, options: EvalOptions, out: str | Path | None = None
) -> tuple[Evaluation, Evaluation, Path]:
    """Evaluate both runs and compare them into `out` (default RUN_B/compare_<name of A>).

    Each run's own report goes into `out`/A_<name> and `out`/B_<name>: a comparison never overwrites
    an evaluation the user ran with other options in RUN/eval_<split>.
    """
    run_a, run_b = open_run(folder_a, options), open_run(folder_b, options)
    ids_a, ids_b = (list(getattr(r.dataset, "ids", []))[: options.max_images] for r in (run_a, run_b))
    if ids_a != ids_b:  # checked before the long evaluations, which write files
        raise EvalError(
            f"{run_a.name} ({run_a.cfg.dataset} at {run_a.cfg.data_root}, {len(ids_a)} images) and "
            f"{run_b.name} ({run_b.cfg.dataset} at {run_b.cfg.data_root}, {len(ids_b)} images) "
            f"evaluate different images: compare runs on the same dataset and split"
        )
    out = Path(out) if out is not None else Path(folder_b) / f"compare_{run_a.name}"
    a, b = evaluate(run_a, options), evaluate(run_b, options)
    reports = (write_report(a, out / f"A_{run_a.name}"), write_report(b, out / f"B_{run_b.name}"))
    return a, b, write_comparison(a, b, out, reports)
