"""Where the one-op mask estimator beats the module path: M_l of a fused model, three ways.

    python benchmarks/estimator_crossover.py [--device cpu] [--batches 1,8] [--rounds 30]
    python benchmarks/estimator_crossover.py --device cuda --dtype bfloat16

For the top-down stages of ConvNeXt-T, ResNet-50 and MobileNetV2 at 224 px, times in alternating
rounds an `InferenceMaskEstimator` (the folded estimator of `fuse_for_inference`) run as
    modules        layer by layer as PyTorch modules (algorithm "modules")
    convolutions   the op aim::mask_estimator, ATen's convolutions inside one call
    kernel         the op's two-launch kernel (CUDA only; on the CPU its emulation is a test tool)
and prints each time with its interquartile range and its ratio to the modules. On CUDA every
call is a captured CUDA graph replay (the deployment's runtime; --no-graph for eager calls), so
the figures are kernel chains, not Python. The op's "auto" route takes the kernel where
csrc/mask_estimator_op.h says it wins (kAutoMaxPositions, kAutoMaxBatch): this table is the
measurement behind those two numbers.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from aim_ext.bench.runtimes import captured
from aim_ext.bench.timing import time_interleaved
from aim_ext.models import InferenceMaskEstimator, MaskEstimator

# (name, C_l, map side at 224 px) of the stages the paper's variants and MobileNetV2+AIM[3] mask.
STAGES = [
    ("convnext_tiny s3", 768, 7),
    ("convnext_tiny s2", 384, 14),
    ("convnext_tiny s1", 192, 28),
    ("resnet50 s4", 2048, 7),
    ("resnet50 s3", 1024, 14),
    ("mobilenetv2_100 s4", 320, 7),
    ("mobilenetv2_100 s3", 96, 14),
]


def folded_estimator(channels: int, generator: torch.Generator) -> InferenceMaskEstimator:
    """A fused estimator whose BatchNorms are not the identity and whose masks are mixed."""
    estimator = MaskEstimator(channels).eval()
    for block in estimator.blocks:
        block.norm.running_mean.normal_(generator=generator)
        block.norm.running_var.uniform_(0.5, 2.0, generator=generator)
    return estimator.fuse()


def run(estimator: InferenceMaskEstimator, s: torch.Tensor, algorithm: str) -> torch.Tensor:
    if algorithm == "modules":
        return estimator.forward_modules(s)
    return estimator.forward_op(s, algorithm)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True, help="CUDA only")
    parser.add_argument("--stages", default="", help="comma-separated prefixes of STAGES names")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    cuda = device.startswith("cuda")
    algorithms = ["modules", "convolutions", *(["kernel"] if cuda else [])]
    g = torch.Generator().manual_seed(0)
    graphs = cuda and args.graph
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, {args.dtype}, channels_last, "
        f"{'CUDA graph replays' if graphs else 'eager calls'}, threads {torch.get_num_threads()}"
    )
    header = " | ".join(f"{a} ms (IQR)" for a in algorithms)
    ratios = " | ".join(f"{a}/modules" for a in algorithms[1:])
    print(f"| stage | batch | {header} | {ratios} |")
    print("|---|---|" + "---|" * (2 * len(algorithms) - 1))
    rows = []
    wanted = [p for p in args.stages.split(",") if p]
    for name, channels, side in STAGES:
        if wanted and not any(name.startswith(p) for p in wanted):
            continue
        estimator = folded_estimator(channels, g).to(device, dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            s = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
            s = s.contiguous(memory_format=torch.channels_last)
            calls = [partial(run, estimator, s, a) for a in algorithms]
            with torch.inference_mode():
                expected = calls[0]()
                scale = float(expected.abs().max())
                for call in calls[1:]:
                    tol = (1e-4 if dtype == torch.float32 else 5e-2) * scale
                    torch.testing.assert_close(call(), expected, rtol=0, atol=tol)
                timed = [captured(c) for c in calls] if graphs else calls
                times = time_interleaved(
                    timed, device, warmup=3, rounds=args.rounds, per_round=args.per_round
                )
            base = times[0].median_ms
            row = {"stage": name, "batch": batch, "side": side, "channels": channels}
            for a, t in zip(algorithms, times, strict=True):
                row[f"{a}_ms"], row[f"{a}_iqr"] = t.median_ms, [t.p25_ms, t.p75_ms]
            rows.append(row)
            cells = " | ".join(f"{t.median_ms:.3f} ({t.p25_ms:.3f}-{t.p75_ms:.3f})" for t in times)
            ratio = " | ".join(f"{t.median_ms / base:.2f}" for t in times[1:])
            print(f"| {name} | {batch} | {cells} | {ratio} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
