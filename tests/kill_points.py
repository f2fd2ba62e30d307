"""Kill `aim-train` at chosen moments, for tests/test_faults.py and benchmarks/kill_soak.py.

    python tests/kill_points.py POINT N AIM-TRAIN-ARGS...

runs aim-train in this process with POINT armed: at its N-th occurrence the process sends itself
SIGKILL (or, for `sigterm` and `sigint`, that signal, and training goes on to its next safe point).
The points:

- `step`: inside the N-th training step, after its backward pass, before its update;
- `last.pt`: halfway through writing the N-th `last.pt` (its temporary file);
- `records`: after the N-th epoch's records (metrics.jsonl, summary.csv), before its checkpoints;
- `model`: before the N-th rename into the run's `model/` folder (N=2: between its two files);
- `sigterm`, `sigint`: that signal inside the N-th training step.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

POINTS = ("step", "last.pt", "records", "model", "sigterm", "sigint")


def _counter(n: int):
    seen = 0

    def hit() -> bool:
        nonlocal seen
        seen += 1
        return seen == n

    return hit


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    """Patch this process so that it is killed (or signalled) at the `n`-th occurrence of `point`."""
    import torch

    from aim_ext.engine import step as step_module

    hit = _counter(n)
    if point in ("step", "sigterm", "sigint"):
        original_step = step_module.EagerStep.forward_backward

        def forward_backward(self, *args, **kwargs):
            stats = original_step(self, *args, **kwargs)
            if hit():
                if point == "step":
                    _die()
                os.kill(os.getpid(), signal.SIGTERM if point == "sigterm" else signal.SIGINT)
            return stats

        step_module.EagerStep.forward_backward = forward_backward
    elif point == "last.pt":
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "optimizer" in obj and hit():  # last.pt's training state
                data = io.BytesIO()
                original_save(obj, data, *args, **kwargs)
                f.write(data.getvalue()[: len(data.getvalue()) // 2])
                f.flush()
                _die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point in ("records", "model"):
        original_replace, original_rename = os.replace, os.rename

        def replaced(rename):
            def move(src, dst, *args, **kwargs):
                target = Path(dst)
                if point == "model" and "model" in (target.name, target.parent.name) and hit():
                    _die()
                rename(src, dst, *args, **kwargs)
                if point == "records" and target.name == "summary.csv" and hit():
                    _die()

            return move

        os.replace, os.rename = replaced(original_replace), replaced(original_rename)
    else:
        raise ValueError(f"unknown kill point {point!r}; expected one of {', '.join(POINTS)}")


def main(argv: list[str]) -> int:
    from aim_ext.cli.train import main as aim_train

    arm(argv[0], int(argv[1]))
    return aim_train(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
