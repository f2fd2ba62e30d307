"""Latency and memory measurement: warm-up, then rounds that alternate between the models of one
comparison, so that a drift of the machine (clocks, other load) touches all of them alike.

CUDA times come from CUDA events around each call, CPU times from the host clock. A row reports
the median over all timed calls and the 25th and 75th percentiles as its spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    calls: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        ordered = sorted(samples_ms)
        quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
        return cls(statistics.median(ordered), quartiles[0], quartiles[2], len(ordered))


def _time_call(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_interleaved(
    calls: Sequence[Callable[[], object]], device: str, *, warmup: int, rounds: int, per_round: int
) -> list[Timing]:
    """Warm each call up, then `rounds` times run each `per_round` times in turn."""
    for fn in calls:
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for fn, out in zip(calls, samples, strict=True):
            out.extend(_time_call(fn, device) for _ in range(per_round))
    return [Timing.of(s) for s in samples]


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated by torch during one call (MiB), above what was allocated before;
    None on the CPU (no per-call allocator statistics there) and for runtimes that allocate
    outside torch's allocator (their figure would be misleading)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
