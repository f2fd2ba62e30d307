"""Concurrent top-down branches: each stage's M_l(S_l) and T_l(S_l) on their own CUDA stream.

Once the backbone has run, the mask estimator M_l and the feature branch T_l of every stage depend
on S_l alone; only the merges (Eq. 2-3 and the top-down sum) must run in order, top stage first.
At small batches each of those convolutions fills a small part of the GPU, so running the branches
one after another leaves most of it idle. Here every branch runs on its own side stream, forked
from the current stream after the backbone and joined back just before its stage's merge: the time the
top-down pathway adds becomes its longest branch plus the merges, not the sum of all branches.

The same ops run on the same data, so the results are the same bits; only the launch order
differs. It applies to inference on CUDA (autograd off), eager or under CUDA graph capture (the
fork and join become graph edges). It steps aside while torch.compile, torch.export, tracing or
ONNX export runs, since those want one stream, and while autograd records: the eager training
step is bound by the host's launches rather than the GPU (benchmarks/RESULTS.md), and DDP's
gradient hooks, made on one stream, would have to synchronise with every side stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_SIDE_STREAMS: dict[int, list[torch.cuda.Stream]] = {}  # per CUDA device index, created once


def side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    """`count` side streams of `device`, the same ones on every call (a graph capture sees them)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _SIDE_STREAMS.setdefault(index, [])
    while len(pool) < count:
        pool.append(torch.cuda.Stream(device=index))
    return pool[:count]


def tracing() -> bool:
    """Whether torch.compile, torch.export, TorchScript tracing or ONNX export is running."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def can_run_concurrently(x: Tensor) -> bool:
    """Whether `x` is a real CUDA tensor in eager inference: autograd off, and not traced,
    compiled or exported."""
    if not x.is_cuda or torch.is_grad_enabled() or isinstance(x, torch._subclasses.FakeTensor):
        return False
    return not tracing()


def fork(jobs: Sequence[Callable[[], Tensor]]) -> list[tuple[Tensor, torch.cuda.Stream]]:
    """Start each job on its own side stream, after the work queued so far on the current one."""
    main = torch.cuda.current_stream()
    launched = []
    for stream, job in zip(side_streams(main.device, len(jobs)), jobs, strict=True):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            launched.append((job(), stream))
    return launched


def join(result: Tensor, stream: torch.cuda.Stream) -> Tensor:
    """Make the current stream wait for `stream`'s job before it reads `result`.

    The result is also marked as used by the current stream, so that the caching allocator does
    not hand its memory to a later job on the side stream before the current stream has read it."""
    main = torch.cuda.current_stream()
    main.wait_stream(stream)
    result.record_stream(main)
    return result
