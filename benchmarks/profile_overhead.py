"""Where AIM's extra time goes on a GPU: each part of the model timed alone, with its kernels.

    python benchmarks/profile_overhead.py --model convnext_tiny --stop-stages 2,1 --batch 1
    python benchmarks/profile_overhead.py --model convnext_tiny --stop-stages 2 --batch 1 --kernels
    python benchmarks/profile_overhead.py --model convnext_tiny --stop-stages 2,1 --batch 1 --fuse
    python benchmarks/profile_overhead.py --model resnet50 --stop-stages 3 --batch 256 --eager
    python benchmarks/profile_overhead.py --model convnext_tiny --stop-stages 2 --train-batch 64

Inference parts: the backbone, then per top-down stage its mask estimator M_l, the convolutions of
its feature branch T_l and its merge (the epilogue op: LayerNorm, GELU, Eq. 2-3, the top-down
sum), then the head; and the whole model on one stream and with concurrent branches. Each part
runs on the inputs the whole model gives it, timed as a CUDA graph replay (--eager: eager calls,
for large batches), median of many. torch.profiler records one eager call of each part: the
table gives its kernel count and their summed GPU time (kernel ms: at batch 1 the chain's GPU
work, apart from the host's launch gaps that eager calls add), and --kernels lists each part's
kernels in the order they ran with their durations, launch by launch. The sum of the parts is the
one-stream time the top-down pathway costs; the concurrent whole shows how much of it the side
streams hide. --fuse profiles both models fused for inference (BatchNorms folded, the mask
estimator as one op, the feature branch's inference form), as deployed.

--train-batch profiles one training step (autocast, forward, loss, backward, AdamW) of the vanilla
model and each AIM model with torch.profiler and prints the kernels that take the most time.
Writes the tables to --out as markdown.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType

from aim_ext.bench.runtimes import Setting
from aim_ext.bench.train_step import prepare_train_step
from aim_ext.models import create_model, fuse_for_inference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KERNEL_NAME_WIDTH = 80  # --kernels: longer names (templated CUDA kernels) are cut to this

Launch = tuple[str, float]  # a kernel's name and its GPU time in us


def kernels(fn) -> list[Launch]:
    """The CUDA kernels (not copies or memsets) one call of fn launches, with their durations, in
    the order the GPU started them (launch order on one stream)."""
    fn()  # warm: allocator and algorithm choices stay out of the count
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return [(e.name, e.time_range.elapsed_us()) for e in sorted(events, key=lambda e: e.time_range.start)]


def kernel_ms(launches: list[Launch]) -> float:
    """The summed GPU time of ``launches``, in ms."""
    return sum(us for _, us in launches) / 1e3


def short_name(name: str, width: int = KERNEL_NAME_WIDTH) -> str:
    """``name`` cut to ``width`` characters, the cut marked with '...'."""
    return name if len(name) <= width else name[: width - 3] + "..."


def inference_table(rows: list[tuple[str, float, list[Launch]]], base: float) -> list[str]:
    """Markdown: per part (name, ms, its kernels) its time, kernel count, summed kernel time and
    time over the vanilla model's ``base`` ms, then the top-down parts (stages, head) summed."""
    lines = ["| part | ms | kernels | kernel ms | / vanilla ms |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {ms:.4f} | {len(k)} | {kernel_ms(k):.4f} | {ms / base:.3f} |" for p, ms, k in rows]
    topdown = [r for r in rows if r[0].startswith("stage") or r[0] == "head"]
    ms, launches = sum(r[1] for r in topdown), [k for r in topdown for k in r[2]]
    lines.append(
        f"| top-down parts summed (one stream) | {ms:.4f} | {len(launches)} | "
        f"{kernel_ms(launches):.4f} | {ms / base:.3f} |"
    )
    return lines


def launch_lists(rows: list[tuple[str, float, list[Launch]]]) -> list[str]:
    """Markdown (--kernels): per part, its kernels in the order they ran, each with its time in us."""
    lines = []
    for part, _, launches in rows:
        lines += [
            f"#### {part}: {len(launches)} kernels, {kernel_ms(launches):.4f} ms",
            "",
            "| # | kernel | us |",
            "|---|---|---|",
        ]
        lines += [f"| {i} | `{short_name(name)}` | {us:.1f} |" for i, (name, us) in enumerate(launches, 1)]
        lines.append("")
    return lines


def median_ms(fn, *, graph: bool, reps: int) -> float:
    """Median time of fn: CUDA graph replays (graph=True) or eager calls, timed with events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    call = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    for _ in range(5):
        call()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def merge(stage, logits, branch, coarse):
    return stage.merge(logits, branch, coarse, temperature=1.0, noise=False)


def inference_parts(model, x) -> list[tuple[str, object]]:
    """(name, call) for every part of an AIM model, each on the inputs the whole model gives it."""
    inputs = model.stage_inputs(x)
    parts = [("backbone", lambda: model.backbone(x))]
    coarse = None
    for index, stage, s in zip(model.stage_indices, model.stages, inputs, strict=True):
        logits, branch = stage.mask_estimator(s), stage.feature_branch(s)
        parts += [
            (f"stage {index}: mask estimator M", lambda st=stage, s=s: st.mask_estimator(s)),
            (f"stage {index}: T convolutions", lambda st=stage, s=s: st.feature_branch(s)),
            (f"stage {index}: merge (epilogue op)", partial(merge, stage, logits, branch, coarse)),
        ]
        coarse = merge(stage, logits, branch, coarse).merged
    parts.append(("head", lambda p=coarse: model.forward_head(p)))
    return parts


def whole(model, x, concurrent: bool):
    def call():
        model.concurrent_branches = concurrent
        return model(x)

    return call


def profile_inference(name: str, stop_stage: int, args) -> list[str]:
    dtype = DTYPES[args.dtype]
    vanilla = create_model(name, num_classes=1000).cuda().eval()
    model = create_model(name, num_classes=1000, stop_stage=stop_stage).cuda().eval()
    if args.fuse:  # both sides, as deployed: fused in float32, then cast
        vanilla, model = fuse_for_inference(vanilla), fuse_for_inference(model)
    vanilla = vanilla.to(dtype).to(memory_format=torch.channels_last)
    model = model.to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    graph, reps = not args.eager, args.reps
    rows = []
    with torch.inference_mode():
        base = median_ms(lambda: vanilla(x), graph=graph, reps=reps)
        rows.append(("vanilla " + name, base, kernels(lambda: vanilla(x))))
        for part, fn in inference_parts(model, x):
            rows.append((part, median_ms(fn, graph=graph, reps=reps), kernels(fn)))
        for label, concurrent in (("AIM whole, one stream", False), ("AIM whole, concurrent branches", True)):
            fn = whole(model, x, concurrent)
            rows.append((label, median_ms(fn, graph=graph, reps=reps), kernels(fn)))
    model.concurrent_branches = True
    mode = ("eager calls" if args.eager else "CUDA graph replays") + (", fused" if args.fuse else "")
    lines = [f"### {name}+AIM[{stop_stage}], batch {args.batch}, {args.dtype}, channels_last, {mode}", ""]
    lines += [*inference_table(rows, base), ""]
    if args.kernels:
        lines += launch_lists(rows)
    return lines


def profile_training(name: str, stop_stages: list[int], args) -> list[str]:
    dtype = DTYPES[args.dtype]
    size = (args.image_size, args.image_size)
    s = Setting("cuda", dtype, args.train_batch, size, True, Path("."))
    lines = [f"### Training step, {name}, batch {args.train_batch}, {args.dtype} autocast, eager", ""]
    for stop in [None, *stop_stages]:
        step = prepare_train_step(create_model(name, num_classes=1000, stop_stage=stop), s, "eager")
        ms = median_ms(step, graph=False, reps=max(args.reps // 5, 10))
        launches = kernels(step)
        by_name: dict[str, list[float]] = {}
        for kernel, us in launches:
            by_name.setdefault(kernel, []).append(us / 1e3)
        total = kernel_ms(launches)
        label = "vanilla" if stop is None else f"AIM[{stop}]"
        lines += [
            f"{label}: {ms:.2f} ms per step, {len(launches)} kernels, {total:.2f} ms of kernel time",
            "",
            "| kernel | calls | ms | share |",
            "|---|---|---|---|",
        ]
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]
        lines += [f"| `{k[:90]}` | {len(v)} | {sum(v):.3f} | {sum(v) / total:.1%} |" for k, v in top]
        lines.append("")
        del step
        torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--stop-stages", default="2,1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--eager", action="store_true", help="time eager calls, not graph replays")
    parser.add_argument(
        "--fuse", action="store_true", help="profile aim_ext.fuse_for_inference of both models (inference)"
    )
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--train-batch", type=int, help="profile training steps instead")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per training step")
    parser.add_argument(
        "--kernels", action="store_true", help="also list each part's kernels in order, with their times"
    )
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_overhead.py needs a CUDA device")
    torch.backends.cudnn.benchmark = False
    stops = [int(s) for s in args.stop_stages.split(",") if s]
    lines = [f"## {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    if args.train_batch:
        lines += profile_training(args.model, stops, args)
    else:
        for stop in stops:
            lines += profile_inference(args.model, stop, args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
