"""CPU kernel of masked_merge against the eager PyTorch reference, from one run, as a ratio.

python benchmarks/bench_merge_cpu.py [--shape 32 256 28 28] [--coarse 14 14] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from aim_ext.ops import kernels_available, logistic_noise, masked_merge, masked_merge_reference


def median_ms(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median and interquartile range of `repeats` timed calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28], metavar=("N", "C", "H", "W"))
    parser.add_argument("--coarse", type=int, nargs=2, default=[14, 14], metavar=("h", "w"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if not kernels_available()["cpu"]:
        raise SystemExit("the compiled CPU kernel is not built: nothing to compare")
    if args.threads:
        torch.set_num_threads(args.threads)

    n, c, h, w = args.shape
    torch.manual_seed(0)
    feat = torch.randn(n, c, h, w)
    logits = torch.randn(n, 1, h, w)
    coarse = torch.randn(n, c, *args.coarse)
    noise = logistic_noise(logits)
    print(
        f"masked_merge on CPU, float32, feat {tuple(feat.shape)}, coarse {tuple(coarse.shape)}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| case | layout | reference ms | kernel ms | speed-up |")
    print("|---|---|---|---|---|")
    for layout, fmt in [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]:
        f, cs = feat.contiguous(memory_format=fmt), coarse.contiguous(memory_format=fmt)
        for case, kw in [("evaluation forward", {}), ("training forward", {"noise": noise})]:
            row(
                case,
                layout,
                args.repeats,
                partial(masked_merge_reference, f, logits, cs, **kw),
                partial(masked_merge, f, logits, cs, **kw),
            )
        leaves = (f.clone().requires_grad_(), logits.clone().requires_grad_(), cs.clone().requires_grad_())
        grads = (torch.randn_like(f), torch.ones_like(logits))
        row(
            "training forward+backward",
            layout,
            args.repeats,
            partial(forward_backward, masked_merge_reference, leaves, noise, grads),
            partial(forward_backward, masked_merge, leaves, noise, grads),
        )


def forward_backward(merge, leaves, noise, grads) -> None:
    """One training step of the merge: forward with noise, then the gradients of all inputs."""
    torch.autograd.grad(merge(*leaves, noise=noise), leaves, grads)


def row(case: str, layout: str, repeats: int, reference, kernel) -> None:
    """Time the reference and the kernel back to back and print one table row with their ratio."""
    ref, ref_iqr = median_ms(reference, repeats)
    ker, ker_iqr = median_ms(kernel, repeats)
    print(f"| {case} | {layout} | {ref:.3f} ± {ref_iqr:.3f} | {ker:.3f} ± {ker_iqr:.3f} | {ref / ker:.2f}x |")


if __name__ == "__main__":
    main()
