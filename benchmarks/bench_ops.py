"""masked_merge and topdown_epilogue: eager reference, torch.compile of the reference and the
kernel, from one run.

    python benchmarks/bench_ops.py                    # CUDA when present (bf16), else CPU (float32)
    python benchmarks/bench_ops.py --no-compile --shapes 1,256,14,14,7,7 --repeats 5 --ops masked_merge

For every op, shape and case (evaluation forward, training forward, training forward+backward) it
prints the median time of each implementation, the achieved bandwidth from the fewest bytes the
case must move (each input read once, each output written once), that bandwidth as a percentage
of a device-to-device copy measured in the same run, and the kernel's speed-up over the compiled
reference. Inputs rotate among several sets so that small shapes are not timed out of the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aim_ext.ops import (
    kernels_available,
    logistic_noise,
    masked_merge,
    masked_merge_reference,
    topdown_epilogue,
    topdown_epilogue_reference,
)

# (N, C, H, W) of the fine map and (h, w) of the coarse one: the shapes.
SHAPES = (
    (256, 256, 28, 28, 14, 14),
    (256, 256, 14, 14, 7, 7),
    (32, 256, 56, 56, 28, 28),
    (1, 256, 14, 14, 7, 7),
)
CASES = ("eval forward", "train forward", "train forward+backward")
SETS = 4  # input sets rotated between calls


def _shape(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"a shape is N,C,H,W,h,w; got {text!r}")
    return values


def median_ms(fn: Callable[[int], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median of ``repeats`` timed calls ``fn(i)`` (i picks the input set), in milliseconds; device
    events on CUDA, the host clock on the CPU."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """GB/s of a large device-to-device copy, bytes read plus bytes written."""
    numel = (1 << 28 if device.type == "cuda" else 1 << 24) // torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Op:
    """One op under test: its eager reference, its kernel, inputs and the bytes each case moves."""

    name = ""
    reference: Callable
    kernel: Callable

    def inputs(self, shape, device, dtype, layout, requires_grad: bool) -> dict[str, torch.Tensor]:
        n, c, h, w, ch, cw = shape
        feat = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=layout)
        logits = torch.randn(n, 1, h, w, device=device).to(dtype)
        coarse = torch.randn(n, c, ch, cw, device=device).to(dtype).contiguous(memory_format=layout)
        for t in (feat, logits, coarse):
            t.requires_grad_(requires_grad)
        grad = torch.randn_like(feat)
        return {
            "feat": feat,
            "logits": logits,
            "coarse": coarse,
            "noise": logistic_noise(logits),
            "grad": grad,
        }


class MaskedMerge(Op):
    name = "masked_merge"
    reference = staticmethod(masked_merge_reference)
    kernel = staticmethod(masked_merge)

    @staticmethod
    def call(fn, t: dict, case: str):
        noise = None if case == "eval forward" else t["noise"]
        out, _ = fn(t["feat"], t["logits"], t["coarse"], noise=noise)
        if case != "train forward+backward":
            return out
        return torch.autograd.grad(out, (t["feat"], t["logits"], t["coarse"]), t["grad"])

    @staticmethod
    def bytes(case: str, t: dict) -> int:
        """The fewest bytes: every input read once, every output written once."""
        f, lg, c, noise = nbytes(t["feat"]), nbytes(t["logits"]), nbytes(t["coarse"]), nbytes(t["noise"])
        forward = f + lg + c + f + lg  # feat, logits, coarse in; out and the mask out
        if case == "eval forward":
            return forward
        if case == "train forward":
            return forward + noise
        # backward: grad_out, feat, logits, noise in; grad_feat, grad_logits, grad_coarse out
        return forward + noise + (f + f + lg + noise) + (f + lg + c)


class TopdownEpilogue(Op):
    name = "topdown_epilogue"
    reference = staticmethod(topdown_epilogue_reference)
    kernel = staticmethod(topdown_epilogue)

    def inputs(self, shape, device, dtype, layout, requires_grad: bool) -> dict[str, torch.Tensor]:
        t = super().inputs(shape, device, dtype, layout, requires_grad)
        c = shape[1]
        t["weight"] = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_(requires_grad)
        t["bias"] = (0.1 * torch.randn(c, device=device)).requires_grad_(requires_grad)
        t["grad_features"] = torch.randn_like(t["feat"])  # the auxiliary head's gradient
        return t

    @staticmethod
    def call(fn, t: dict, case: str):
        noise = None if case == "eval forward" else t["noise"]
        out, _, features = fn(t["feat"], t["weight"], t["bias"], t["logits"], t["coarse"], noise=noise)
        if case != "train forward+backward":
            return out
        leaves = (t["feat"], t["weight"], t["bias"], t["logits"], t["coarse"])
        return torch.autograd.grad((out, features), leaves, (t["grad"], t["grad_features"]))

    @staticmethod
    def bytes(case: str, t: dict) -> int:
        """The fewest bytes: every input read once, every output written once."""
        f, lg, c, noise = nbytes(t["feat"]), nbytes(t["logits"]), nbytes(t["coarse"]), nbytes(t["noise"])
        forward = f + lg + c + f + lg + f  # conv, logits, coarse in; out, mask, features out
        if case == "eval forward":
            return forward
        if case == "train forward":
            return forward + noise
        # backward: grad_out, grad_features, conv, logits, noise in; grad_conv, grad_logits, grad_coarse out
        return forward + noise + (f + f + f + lg + noise) + (f + lg + c)


OPS = {op.name: op for op in (MaskedMerge(), TopdownEpilogue())}


def runner(op: Op, fn: Callable, case: str, sets: list[dict]) -> Callable[[int], object]:
    def run(i: int) -> object:
        return op.call(fn, sets[i % len(sets)], case)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="default bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--shapes", type=_shape, nargs="+", default=SHAPES, help="N,C,H,W,h,w ...")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--ops", nargs="+", choices=tuple(OPS), default=tuple(OPS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    kernels = kernels_available()["cuda" if device.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    copy = copy_bandwidth(device, dtype, args.repeats)
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"aim ops on {card}, {dtype}, {'channels_last' if args.channels_last else 'NCHW'}; "
        f"device-to-device copy {copy:.0f} GB/s; median of {args.repeats}; kernel compiled: {kernels}"
    )
    rows = []
    for op in (OPS[name] for name in args.ops):
        implementations = {"eager": op.reference}
        if not args.no_compile:
            implementations["compiled"] = torch.compile(op.reference, dynamic=False)
        implementations["kernel"] = op.kernel
        print(f"\n{op.name}\n")
        print("| shape | case | " + " | ".join(f"{k} ms" for k in implementations), end="")
        print(" | kernel GB/s | % of copy | kernel vs compiled |")
        print("|---" * (len(implementations) + 5) + "|")
        for shape in args.shapes:
            for case in CASES:
                sets = [
                    op.inputs(shape, device, dtype, layout, requires_grad=case.endswith("backward"))
                    for _ in range(SETS)
                ]
                times = {
                    name: median_ms(runner(op, fn, case, sets), device, args.repeats)
                    for name, fn in implementations.items()
                }
                moved = op.bytes(case, sets[0])
                gbs = moved / times["kernel"] / 1e6
                versus = times.get("compiled", float("nan")) / times["kernel"]
                rows.append(
                    {
                        "op": op.name,
                        "shape": shape,
                        "case": case,
                        "ms": times,
                        "bytes": moved,
                        "kernel_gbs": gbs,
                        "percent_of_copy": 100 * gbs / copy,
                        "speedup_vs_compiled": versus,
                    }
                )
                cells = " | ".join(f"{t:.3f}" for t in times.values())
                name = f"{'x'.join(map(str, shape[:4]))} <- {shape[4]}x{shape[5]}"
                print(f"| {name} | {case} | {cells} | {gbs:.0f} | {100 * gbs / copy:.0f}% | {versus:.2f}x |")
    if args.json:
        args.json.write_text(
            json.dumps({"card": card, "dtype": str(dtype), "copy_gbs": copy, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
