"""Writers of what an evaluation found: per_image.csv, metrics.json, PNG figures and report.md for
one run (`evaluate_run`, what `aim-eval RUN` does), and the comparison of two runs
(`compare_runs`, what `aim-eval --compare A B` does)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aim_ext.cache import write_atomic
from aim_ext.data import ShiftedCentre
from aim_ext.engine import build_split
from aim_ext.explain.epg import energy_pointing_game
from aim_ext.explain.evaluate import DEFINITIONS, Evaluation, Shown, evaluate, figure_methods
from aim_ext.explain.run import EvalError, EvalOptions, Run, open_run
from aim_ext.models import load_checkpoint

# The comparison's figure of run A's GradCAM beside run B's AIM masks (the README shows aim-demo's).
GRADCAM_AND_MASKS_PNG = "gradcam_and_masks.png"
METHOD_TITLES = {
    "gradcam": "GradCAM",
    "guided_gradcam": "Guided GradCAM",
    "guided_backprop": "Guided Backprop",
}


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
    for kind in ("mask_precision", "mask_recall"):
        for stage, value in metrics.get(kind, {}).items():
            flat[f"{kind}[{stage}]"] = value
    if "mask_precision_chance" in metrics:
        flat["mask_precision_chance"] = metrics["mask_precision_chance"]
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
    if evaluation.mask_precision is not None:
        names = [*evaluation.run.stage_names, "merged"]
        for kind, table in (("precision", evaluation.mask_precision), ("recall", evaluation.mask_recall)):
            for name, values in zip(names, table.T, strict=True):
                columns[f"mask_{kind}_{name}"] = values.tolist()
        columns["object_share"] = evaluation.object_share.tolist()
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))
    return write_atomic(path, text.getvalue().encode("utf-8", "surrogateescape"))


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
    centred_val = run.split == "val" and not isinstance(run.dataset, ShiftedCentre)  # the image logged
    val = run.dataset if centred_val else build_split(run.cfg, "val", {"mean": run.mean, "std": run.std})
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
        first, second = figure_methods(evaluation.options)
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
    return write_atomic(report, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def write_report(evaluation: Evaluation, out: str | Path) -> Path:
    """Write per_image.csv, metrics.json, the figures and report.md into `out`; returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics
    write_csv(evaluation, out / "per_image.csv")
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
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
    from aim_ext.explain.figures import epg_scatter, gradcam_beside_masks, gradcam_comparison

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
    write_atomic(out / "differences.md", ("\n".join(table) + "\n").encode("utf-8", "surrogateescape"))
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
    if n and b.shown.stage_masks is not None and a.shown.stage_masks is None:
        figures[f"{labels[0]}'s GradCAM beside {labels[1]}'s masks"] = gradcam_beside_masks(
            a.shown.images,
            a.shown.maps["gradcam"],
            _figure_epg(a.shown, "gradcam")[:n],
            b.shown.stage_masks,
            out / GRADCAM_AND_MASKS_PNG,
            labels=labels,
            stage_names=b.run.stage_names,
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
