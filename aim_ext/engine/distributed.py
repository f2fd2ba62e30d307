"""Distributed data parallel training under torchrun: NCCL on GPUs, gloo on CPUs.

`torchrun --nproc_per_node N aim-train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is a
world of one. The configured batch size is the global batch, split evenly over the processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place in the run."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    started_here: bool = False  # whether this code initialised the process group (and closes it)

    @classmethod
    def from_env(cls, device_type: str) -> World:
        """Join the process group that torchrun describes, or run alone."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(size, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), started)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_over_batch(self):
        """A differentiable sum over the processes (for the global active area r_l), or None."""
        if self.size == 1:
            return None
        from torch.distributed.nn.functional import all_reduce

        return all_reduce

    def sum(self, values: list[float]) -> list[float]:
        """Per-process sums of training statistics, added over the processes."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
