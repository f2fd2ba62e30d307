"""Where the sparse feature branch beats the dense one: both from S_l to the stage's pooled term.

    python benchmarks/sparse_crossover.py [--device cpu] [--batch 8] [--rounds 15]

For the stages of ConvNeXt-T and ResNet-50 at 224 px that AIM variants mask (maps 7x7 to 56x56),
and masks of several active fractions, times in alternating rounds
    dense:  align and refine convolutions on the whole map, then aim::pooled_epilogue
    sparse: aim::sparse_pooled_branch
and prints sparse/dense with both sides' interquartile ranges. On CUDA both ops run their Triton
kernels (aim_ext.ops.pooled_head_triton) and the convolutions cuDNN's. The masks are blobs (a
smoothed random field thresholded at the fraction's quantile), as trained masks are, not
scattered pixels.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from aim_ext.bench.timing import time_interleaved
from aim_ext.ops import pooled_epilogue, sparse_pooled_branch

# (name, C_l, map side at 224 px) of every stage the paper's variants mask.
STAGES = [
    ("convnext_tiny s3", 768, 7),
    ("convnext_tiny s2", 384, 14),
    ("convnext_tiny s1", 192, 28),
    ("resnet50 s4", 2048, 7),
    ("resnet50 s3", 1024, 14),
    ("resnet50 s2", 512, 28),
    ("convnext_tiny s0", 96, 56),
    ("resnet50 s1", 256, 56),
]
FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
WIDTH = 256


def blob_logits(n: int, side: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Logits whose mask covers ``fraction`` of each image in smooth blobs."""
    field = torch.randn(n, 1, side, side, generator=generator)
    kernel = torch.ones(1, 1, 3, 3) / 9
    for _ in range(2):
        field = F.conv2d(field, kernel, padding=1)
    threshold = torch.quantile(field.view(n, -1), 1 - fraction, dim=1).view(n, 1, 1, 1)
    return field - threshold


def dense_branch(s, logits, aw, ab, rw, rb, lw, lb, weight):
    conv = F.conv2d(F.conv2d(s, aw, ab), rw, rb, padding=1)
    return pooled_epilogue(conv, lw, lb, logits, weight)


def sparse_branch(s, logits, aw, ab, rw, rb, lw, lb, weight):
    return sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--stages", default="", help="comma-separated prefixes of STAGES names")
    parser.add_argument("--fractions", type=lambda t: [float(f) for f in t.split(",")], default=FRACTIONS)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(
        f"device {args.device}, batch {args.batch}, threads {torch.get_num_threads()}, "
        f"channels_last {args.channels_last}"
    )
    print("| stage | active | needed | dense ms (IQR) | sparse ms (IQR) | sparse/dense |")
    print("|---|---|---|---|---|---|")
    wanted = [p for p in args.stages.split(",") if p]
    for name, channels, side in STAGES:
        if wanted and not any(name.startswith(p) for p in wanted):
            continue
        dtype = getattr(torch, args.dtype)
        s = torch.randn(args.batch, channels, side, side, generator=g).to(args.device, dtype)
        if args.channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        aw = (torch.randn(WIDTH, channels, 1, 1, generator=g) * channels**-0.5).to(args.device, dtype)
        rw = (torch.randn(WIDTH, WIDTH, 3, 3, generator=g) * (9 * WIDTH) ** -0.5).to(args.device, dtype)
        ab, rb, lb = (torch.zeros(WIDTH, device=args.device, dtype=dtype) for _ in range(3))
        lw = torch.ones(WIDTH, device=args.device, dtype=dtype)
        weight = torch.full((side, side), 1 / side**2, device=args.device)
        for fraction in args.fractions:
            logits = blob_logits(args.batch, side, fraction, g).to(args.device, dtype)
            active = logits >= 0
            needed = F.max_pool2d(active.float(), 3, 1, 1) > 0

            branch = (aw, ab, rw, rb, lw, lb, weight)
            dense = partial(dense_branch, s, logits, *branch)
            sparse = partial(sparse_branch, s, logits, *branch)

            with torch.inference_mode():
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(sparse()[0], dense()[0], rtol=10 * tol, atol=tol)
                t_dense, t_sparse = time_interleaved(
                    [dense, sparse], args.device, warmup=3, rounds=args.rounds, per_round=args.per_round
                )
            row = {
                "stage": name,
                "active": float(active.float().mean()),
                "needed": float(needed.float().mean()),
                "dense_ms": t_dense.median_ms,
                "dense_iqr": [t_dense.p25_ms, t_dense.p75_ms],
                "sparse_ms": t_sparse.median_ms,
                "sparse_iqr": [t_sparse.p25_ms, t_sparse.p75_ms],
                "ratio": t_sparse.median_ms / t_dense.median_ms,
            }
            rows.append(row)
            print(
                f"| {name} | {row['active']:.2f} | {row['needed']:.2f} | {t_dense.median_ms:.2f} "
                f"({t_dense.p25_ms:.2f}-{t_dense.p75_ms:.2f}) | {t_sparse.median_ms:.2f} "
                f"({t_sparse.p25_ms:.2f}-{t_sparse.p75_ms:.2f}) | {row['ratio']:.2f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
