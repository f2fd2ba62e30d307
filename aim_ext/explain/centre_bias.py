"""The centre-bias test (paper appendix A.6): a run evaluated on its split and on the same split
cropped off each object's centre (`aim_ext.data.ShiftedCentre`), side by side, with a figure of
the candidate crops (the paper's Figure 10)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aim_ext.cache import write_atomic
from aim_ext.data import ShiftedCentre, eval_preprocessing
from aim_ext.explain.evaluate import Evaluation, evaluate
from aim_ext.explain.figures import shifted_crops_figure
from aim_ext.explain.reports import write_report
from aim_ext.explain.run import EvalError, Run

SEED = 0  # the draw of each image's direction: the same crops for every model and run
# The columns of the side-by-side table: (title, how to read it from metrics.json).
COLUMNS = (
    ("average accuracy", lambda m: m.get("avg_acc")),
    ("worst-group accuracy", lambda m: m.get("worst_group_acc")),
    ("EPG (GradCAM)", lambda m: m.get("epg", {}).get("gradcam")),
    ("merged mask precision", lambda m: m.get("mask_precision", {}).get("merged")),
    ("merged mask recall", lambda m: m.get("mask_recall", {}).get("merged")),
    ("object share (chance)", lambda m: m.get("mask_precision_chance")),
)


def shifted_run(run: Run, deviation: float) -> Run:
    """``run`` with its split cropped off-centre by ``deviation`` (a share of the crop's side),
    framed as the run's evaluation frames it."""
    framing = eval_preprocessing(run.cfg.dataset)
    try:
        shifted = ShiftedCentre(
            run.dataset,
            image_size=run.cfg.image_size,
            deviation=deviation,
            crop_pct=framing["crop_pct"],
            interpolation=framing["interpolation"],
            mean=run.mean,
            std=run.std,
            seed=SEED,
        )
    except ValueError as error:
        raise EvalError(f"--shifted-centre on {run.cfg.dataset}: {error}") from None
    return dataclasses.replace(run, dataset=shifted)


def centre_bias_rows(centred: Mapping[str, Any], shifted: Mapping[float, Mapping[str, Any]]) -> list[list]:
    """The table's rows: the centred split, then each deviation (metrics.json dicts)."""
    settings = [("centred", centred), *((f"shifted {d:g}", m) for d, m in sorted(shifted.items()))]
    return [[name, *(read(metrics) for _, read in COLUMNS)] for name, metrics in settings]


def write_centre_bias(
    centred: Evaluation, shifted: Mapping[float, Evaluation], reports: Mapping[float, Path], out: Path
) -> Path:
    """centre_bias.md, centre_bias.json and shifted_centre_crops.png in ``out``; returns the .md."""
    rows = centre_bias_rows(centred.metrics, {d: e.metrics for d, e in shifted.items()})
    header = ["split", *(title for title, _ in COLUMNS)]
    write_atomic(
        out / "centre_bias.json",
        (json.dumps({"columns": header, "rows": rows, "seed": SEED}, indent=2) + "\n").encode(),
    )
    largest = max(shifted)
    dataset = shifted[largest].run.dataset
    figure = shifted_crops_figure(dataset, range(min(4, len(dataset))), out / "shifted_centre_crops.png")
    run = centred.run
    lines = [
        f"# Centre bias of `{run.name}`",
        "",
        f"The {run.split} split of `{run.cfg.dataset}` ({centred.metrics['num_images']} images) centred, "
        "and cropped so that the object's centre is moved from the crop's centre by the deviation "
        "times the crop's side, to the right, left, bottom or top (one per image, a seeded draw; "
        "outside the frame: the mean colour). Reports: "
        + ", ".join(f"[shifted {d:g}]({p.relative_to(out).as_posix()})" for d, p in sorted(reports.items())),
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(r[0:1] + ["–" if v is None else f"{v:.3f}" for v in r[1:]]) + " |" for r in rows),
        "",
        f"![candidate crops]({figure.name})",
        "",
    ]
    return write_atomic(out / "centre_bias.md", "\n".join(lines).encode("utf-8", "surrogateescape"))


def evaluate_centre_bias(centred: Evaluation, deviations: Sequence[float], out: Path) -> Path:
    """Evaluate the run of ``centred`` on each shifted-centre split with the same options, report
    each in OUT/shifted_centre_DEV/, and write OUT/centre_bias.md beside the centred report."""
    shifted, reports = {}, {}
    for deviation in dict.fromkeys(deviations):
        shifted[deviation] = evaluate(shifted_run(centred.run, deviation), centred.options)
        reports[deviation] = write_report(shifted[deviation], out / f"shifted_centre_{deviation:g}")
    return write_centre_bias(centred, shifted, reports, out)
