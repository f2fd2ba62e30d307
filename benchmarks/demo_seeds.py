"""Vanilla vs AIM on TuxBirds-95 test over several seeds: runs aim-demo once per seed, then tables.

    python benchmarks/demo_seeds.py                       # quick configuration, seeds 0 1 2
    python benchmarks/demo_seeds.py --full --out runs/seeds_full
    python benchmarks/demo_seeds.py --summarise-only      # tables from finished runs

Each seed's run folder is OUT/seed_<s> (an interrupted seed continues where it stopped). Writes
OUT/summary.json and OUT/summary.md: mean and sample standard deviation over the seeds, and every
seed's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from aim_ext.cli import demo

METRICS = demo.ROWS


def summarise(runs: dict[int, dict]) -> tuple[dict, list[str]]:
    summary: dict = {"seeds": sorted(runs), "metrics": {}}
    lines = [
        f"| metric ({len(runs)} seeds: mean ± std) | vanilla MobileNetV2 | MobileNetV2+AIM[3] |",
        "|---|---|---|",
    ]
    for title, key in METRICS:
        cells = []
        for model in ("vanilla", "aim"):
            values = [runs[s][model].get(key, math.nan) for s in sorted(runs)]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary["metrics"].setdefault(key, {})[model] = {
                "mean": statistics.fmean(values),
                "std": std,
                "values": values,
            }
            cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += ["", "| seed | model | " + " | ".join(t for t, _ in METRICS) + " | wall time (s) |"]
    lines.append("|---" * (len(METRICS) + 3) + "|")
    for seed in sorted(runs):
        for model in ("vanilla", "aim"):
            values = " | ".join(f"{runs[seed][model].get(k, math.nan):.3f}" for _, k in METRICS)
            lines.append(f"| {seed} | {model} | {values} | {runs[seed]['wall_time_s']:.0f} |")
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="aim-demo's larger configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--summarise-only", action="store_true", help="do not train, tabulate what exists")
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
