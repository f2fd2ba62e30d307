"""aim-bench's results: `results.json` ({"rows": [...], "env": {...}}), `results.md` and
`overhead.png` (AIM latency / vanilla latency per runtime, batch and dtype)."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import aim_ext
from aim_ext.cache import write_atomic

KEY = ("kind", "family", "runtime", "batch", "dtype")  # rows compared with each other


def add_ratios(rows: list[dict]) -> None:
    """`overhead_ratio` = AIM median / vanilla median of the same family, runtime, batch and dtype;
    training rows also get `ratio_to_fastest_vanilla` (over the vanilla steps of every kind: eager,
    compiled, captured)."""
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(aim_ext.__file__).parent,
        ).stdout.strip()
    except OSError:
        return ""


def environment(device: str, argv: list[str]) -> dict:
    """The card (or CPU), versions and the commit, so that figures can be traced."""
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU: {_cpu_name()}"
    # A copy of the tree on another machine names its commit in AIM_EXT_COMMIT: its .git, if it
    # has one, may be a stale copy.
    commit = os.environ.get("AIM_EXT_COMMIT", "") or _git_commit()
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


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _memory(row: dict) -> str:
    return "" if row["peak_mem_mib"] is None else f"{row['peak_mem_mib']:.0f}"


# The columns after model, runtime, batch and dtype: (header, cell of an "ok" row).
INFERENCE_COLUMNS = [
    ("ms", _ms),
    ("img/s", lambda r: f"{r['throughput_img_s']:.1f}"),
    ("peak MiB", _memory),
    ("params M", lambda r: f"{r['params_m']:.1f}"),
    ("GMACs", lambda r: f"{r['gmacs']:.2f}"),
    ("overhead", lambda r: _ratio(r["overhead_ratio"])),
    ("evaluation", lambda r: r.get("evaluation_path") or ""),
]
TRAIN_COLUMNS = [
    ("ms", _ms),
    ("peak MiB", _memory),
    ("overhead", lambda r: _ratio(r["overhead_ratio"])),
    ("/ fastest vanilla", lambda r: _ratio(r["ratio_to_fastest_vanilla"])),
]


def _table(rows: list[dict], columns, dtype_header: str = "dtype") -> list[str]:
    headers = ["model", "runtime", "batch", dtype_header, *(h for h, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = (
            [cell(r) for _, cell in columns]
            if r["status"] == "ok"
            else [r["status"]] + [""] * (len(columns) - 1)
        )
        lines.append(
            "| " + " | ".join([r["model"], r["runtime"], str(r["batch"]), r["dtype"], *cells]) + " |"
        )
    return lines


def _branches_note(env: dict) -> list[str]:
    if env.get("concurrent_branches") is None or env["device"] != "cuda":
        return []
    if env["concurrent_branches"]:
        return ["AIM's branches run on concurrent CUDA streams in the eager and CUDA graph inference rows."]
    return ["AIM's branches run on one CUDA stream (--no-concurrent-branches)."]


def _inference_note(env: dict) -> list[str]:
    if "fused" not in env:
        return []
    fused = "fused for inference (aim_ext.fuse_for_inference)" if env["fused"] else "not fused"
    density = f"{env['mask_density']:.0%} active" if env["mask_density"] else "as initialised"
    head = "the pooled head" if env["pooled_head"] else "P_T"
    return [
        f"Inference models {fused}; AIM masks calibrated to {density}; AIM logits from {head}, "
        f"feature branches --sparse {env['sparse']} (the evaluation column: eager, one image), "
        f"fused mask estimators --estimator {env.get('estimator', 'auto')}.",
    ]


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
        *_branches_note(env),
        *_inference_note(env),
    ]
    inference = [r for r in rows if r["kind"] == "inference"]
    if inference:
        lines += ["", "## Inference", "", *_table(inference, INFERENCE_COLUMNS)]
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        lines += [
            "",
            "## Training step (forward, loss, backward, AdamW)",
            "",
            *_table(train, TRAIN_COLUMNS, "dtype (autocast)"),
        ]
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
    png = io.BytesIO()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def write(rows: list[dict], env: dict, out: Path) -> None:
    """results.json, results.md and overhead.png in ``out``, each written whole or not at all."""
    write_atomic(out / "results.json", json.dumps({"rows": rows, "env": env}, indent=1).encode())
    write_atomic(out / "results.md", markdown(rows, env).encode("utf-8", "surrogateescape"))
    plot(rows, out / "overhead.png")
