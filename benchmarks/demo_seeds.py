"""Vanilla vs AIM on TuxBirds-95 test over several seeds: runs aim-demo once per seed, then tables.

    python benchmarks/demo_seeds.py                       # quick configuration, seeds 0 1 2
    python benchmarks/demo_seeds.py --full --out runs/seeds_full
    python benchmarks/demo_seeds.py --summarise-only      # tables from finished runs

Each seed's run folder is OUT/seed_<s> (an interrupted seed continues where it stopped). After
each seed's demo, both models are also evaluated on the shifted-centre test split (aim-eval
--shifted-centre, deviation --shifted-centre, default 0.25) into OUT/seed_<s>/shifted_centre_<dev>/.
Writes OUT/summary.json and OUT/summary.md: mean and sample standard deviation over the seeds, and
every seed's numbers, with AIM's mask precision and recall on the bird per level.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from aim_ext.cli import demo

# (title, key): a dotted key reads nested results ("mask_precision.stage_4"); a model without it
# shows "–".
METRICS = (
    *demo.ROWS,
    ("mask precision, level 4", "mask_precision.stage_4"),
    ("mask precision, level 3", "mask_precision.stage_3"),
    ("mask precision, merged", "mask_precision.merged"),
    ("mask recall, level 4", "mask_recall.stage_4"),
    ("mask recall, level 3", "mask_recall.stage_3"),
    ("mask recall, merged", "mask_recall.merged"),
    ("shifted-centre test average accuracy", "shifted_centre.avg_acc"),
    ("shifted-centre test worst-group accuracy", "shifted_centre.worst_group_acc"),
    ("shifted-centre test EPG (GradCAM)", "shifted_centre.epg.gradcam"),
    ("shifted-centre merged mask precision", "shifted_centre.mask_precision.merged"),
)
SHIFT_OPTIONS = dict(methods=("gradcam",), batch_size=64, num_workers=2, figures=4, counterfactuals=False)


def value(results: dict, key: str) -> float:
    """A dotted key's value in a model's results; NaN where it has none."""
    for part in key.split("."):
        if not isinstance(results, dict) or part not in results:
            return math.nan
        results = results[part]
    return float(results)


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3f}"


def shifted_centre(folder: Path, deviation: float, device: str, *, run: bool = True) -> dict[str, dict]:
    """Both models of one seed's demo on the shifted-centre test split (metrics.json of each),
    evaluated once into FOLDER/shifted_centre_<deviation>/<model>/ (``run=False``: only what exists)."""
    from aim_ext.explain.centre_bias import shifted_run
    from aim_ext.explain.evaluate import evaluate
    from aim_ext.explain.reports import write_report
    from aim_ext.explain.run import EvalOptions, open_run

    found = {}
    for model in ("vanilla", "aim"):
        out = folder / f"shifted_centre_{deviation:g}" / model
        if not (out / "metrics.json").is_file():
            if not run:
                continue
            options = EvalOptions(device=device, **SHIFT_OPTIONS)
            evaluation = evaluate(shifted_run(open_run(folder / model, options), deviation), options)
            write_report(evaluation, out)
        found[model] = {**json.loads((out / "metrics.json").read_text()), "deviation": deviation}
    return found


def summarise(runs: dict[int, dict]) -> tuple[dict, list[str]]:
    summary: dict = {"seeds": sorted(runs), "metrics": {}}
    lines = [
        f"| metric ({len(runs)} seeds: mean ± std) | vanilla MobileNetV2 | MobileNetV2+AIM[3] |",
        "|---|---|---|",
    ]
    for title, key in METRICS:
        cells = []
        for model in ("vanilla", "aim"):
            values = [value(runs[s][model], key) for s in sorted(runs)]
            found = [v for v in values if not math.isnan(v)]  # seeds that measured it
            if not found:
                cells.append("–")
                continue
            mean, std = statistics.fmean(found), statistics.stdev(found) if len(found) > 1 else 0.0
            summary["metrics"].setdefault(key, {})[model] = {"mean": mean, "std": std, "values": values}
            seeds = "" if len(found) == len(values) else f" ({len(found)} seeds)"
            cells.append(f"{mean:.3f} ± {std:.3f}{seeds}")
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    first = runs[min(runs)]
    chances = [f"EPG of a uniform map {first['test_epg_chance_level']:.3f}"]
    bird = value(first["aim"], "mask_precision_chance")
    chances.append(f"mask precision of a random mask (the bird's share) {bird:.3f}")
    shifted = value(first["aim"], "shifted_centre.mask_precision_chance")
    if not math.isnan(shifted):
        chances.append(f"on the shifted-centre split {shifted:.3f}")
    lines += ["", "Chance levels (test split): " + "; ".join(chances) + "."]
    lines += ["", "| seed | model | " + " | ".join(t for t, _ in METRICS) + " | wall time (s) |"]
    lines.append("|---" * (len(METRICS) + 3) + "|")
    for seed in sorted(runs):
        for model in ("vanilla", "aim"):
            values = " | ".join(_fmt(value(runs[seed][model], k)) for _, k in METRICS)
            lines.append(f"| {seed} | {model} | {values} | {runs[seed]['wall_time_s']:.0f} |")
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="aim-demo's larger configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--summarise-only", action="store_true", help="do not train, tabulate what exists")
    parser.add_argument("--shifted-centre", type=float, default=0.25, help="the centre-bias test's deviation")
    args = parser.parse_args(argv)
    runs = {}
    for seed in args.seeds:
        folder = args.out / f"seed_{seed}"
        if not args.summarise_only:
            flags = ["--out", str(folder), "--seed", str(seed), "--device", args.device]
            if demo.main(flags + (["--full"] if args.full else [])) != 0:
                return 1
        if (folder / "results.json").is_file():
            runs[seed] = json.loads((folder / "results.json").read_text())
            shifted = shifted_centre(folder, args.shifted_centre, args.device, run=not args.summarise_only)
            for model, metrics in shifted.items():
                runs[seed][model]["shifted_centre"] = metrics
    if not runs:
        print(f"no finished seeds under {args.out}", file=sys.stderr)
        return 1
    configurations = {r["configuration"] for r in runs.values()}
    if len(configurations) > 1:
        print(
            f"{args.out} mixes configurations {sorted(configurations)}: one table per configuration",
            file=sys.stderr,
        )
        return 1
    summary, lines = summarise(runs)
    summary["configuration"] = configurations.pop()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
