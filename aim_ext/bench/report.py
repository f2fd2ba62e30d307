"""aim-bench's results: `results.json` ({"rows": [...], "env": {...}}), `results.md` and
`overhead.png` (AIM latency / vanilla latency per runtime, batch and dtype)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import aim_ext

KEY = ("kind", "family", "runtime", "batch", "dtype")  # rows compared with each other


def add_ratios(rows: list[dict]) -> None:
    """`overhead_ratio` = AIM median / vanilla median of the same family, runtime, batch and dtype;
    training rows also get `ratio_to_fastest_vanilla` (over the vanilla steps, eager or compiled)."""
    ok = [r for r in rows if r["status"] == "ok"]
    vanilla = {tuple(r[k] for k in KEY): r for r in ok if r["variant"] == "vanilla"}
    for row in rows:
        row["overhead_ratio"] = None
        base = vanilla.get(tuple(row[k] for k in KEY))
        if row["variant"] != "vanilla" and row["status"] == "ok" and base:
            row["overhead_ratio"] = row["median_ms"] / base["median_ms"]
        if row["kind"] == "train":
            steps = [
                r["median_ms"]
                for r in ok
                if r["kind"] == "train"
                and r["variant"] == "vanilla"
                and (r["family"], r["batch"], r["dtype"]) == (row["family"], row["batch"], row["dtype"])
            ]
            fastest = min(steps, default=None)
            row["ratio_to_fastest_vanilla"] = (
                row["median_ms"] / fastest if fastest and row["status"] == "ok" else None
            )


def environment(device: str, argv: list[str]) -> dict:
    """The card (or CPU), versions and the commit, so that figures can be traced."""
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU: {platform.processor() or 'unknown'}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(aim_ext.__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    versions = {
        "torch": torch.__version__,
        "aim_ext": aim_ext.__version__,
        "python": platform.python_version(),
    }
    for name in ("timm", "onnxruntime", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "card": card,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": commit or None,
        "versions": versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["aim-bench", *argv]),
    }


def _ms(row: dict) -> str:
    return f"{row['median_ms']:.2f} ({row['p25_ms']:.2f}-{row['p75_ms']:.2f})"


def _head(row: dict) -> str:
    return f"| {row['model']} | {row['runtime']} | {row['batch']} | {row['dtype']} |"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# aim-bench",
        "",
        f"{env['card']}, torch {env['versions']['torch']}, commit {env['commit']}, {env['date']}",
        f"`{env['command']}`",
        "",
        "Latency: median (25th-75th percentile) over all timed calls; overhead = AIM / vanilla of the",
        "same runtime, batch and dtype, timed in alternating rounds of the same run. GMACs: Table 6's",
        '"GFLOPs" (multiply-adds) for one image.',
        "",
        "## Inference",
        "",
        "| model | runtime | batch | dtype | ms | img/s | peak MiB | params M | GMACs | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "inference"):
        if r["status"] != "ok":
            lines.append(
                f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['dtype']} | {r['status']} ||||||"
            )
            continue
        memory = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"{_head(r)} {_ms(r)} | {r['throughput_img_s']:.1f} | {memory} | {r['params_m']:.1f} | "
            f"{r['gmacs']:.2f} | {_ratio(r['overhead_ratio'])} |"
        )
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        lines += [
            "",
            "## Training step (forward, loss, backward, AdamW)",
            "",
            "| model | runtime | batch | dtype (autocast) | ms | peak MiB | overhead | / fastest vanilla |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            if r["status"] != "ok":
                lines.append(
                    f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['dtype']} | {r['status']} ||||"
                )
                continue
            memory = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
            lines.append(
                f"{_head(r)} {_ms(r)} | {memory} | "
                f"{_ratio(r['overhead_ratio'])} | {_ratio(r['ratio_to_fastest_vanilla'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group per (kind, runtime, batch, dtype), one bar per AIM model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aim = [r for r in rows if r["overhead_ratio"] is not None]
    group_of = lambda r: (r["kind"], r["runtime"], r["batch"], r["dtype"])  # noqa: E731
    groups = list(dict.fromkeys(group_of(r) for r in aim))
    models = list(dict.fromkeys(r["model"] for r in aim))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2))
    for i, model in enumerate(models):
        xs, ys = [], []
        for g, key in enumerate(groups):
            match = [
                r
                for r in aim
                if r["model"] == model and (r["kind"], r["runtime"], r["batch"], r["dtype"]) == key
            ]
            if match:
                xs.append(g + (i - (len(models) - 1) / 2) * width)
                ys.append(match[0]["overhead_ratio"])
        ax.bar(xs, ys, width, label=model)
    ax.axhline(1.0, color="black", linewidth=0.8)
    labels = [f"{'train ' if k == 'train' else ''}{rt}\nb{b} {dt}" for k, rt, b, dt in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel("latency, AIM / vanilla")
    ax.set_title("AIM overhead, same runtime and run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "env": env}, indent=1))
    (out / "results.md").write_text(markdown(rows, env))
    plot(rows, out / "overhead.png")
