"""Training state: checkpoints written atomically, and every random generator a step draws from.

Loading a trained model's weights is `aim_ext.models.checkpoint`'s job."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aim_ext.cache import atomic_file


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash leaves the old file.
    A write that fails (a full disk) raises its OSError, which torch's writer reports only as a
    position mismatch."""
    with atomic_file(Path(path)) as handle:
        writes = _Writes(handle)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            writes.error.filename = str(path)
            raise writes.error from None


class _Writes:
    """A binary handle that remembers the first OSError of its writes."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (dropout, Gumbel noise, augmentations)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain values and a tensor, so that weights_only loading accepts it
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
