"""Check an exported model against PyTorch: the logits within a tolerance, the masks identical
except where the mask logit is within `mask_margin` of the threshold 0 (there, rounding
differences between runtimes may legitimately flip the binary decision)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

# fp32: the acceptance bounds. fp16: logits relative to their scale, and a margin that
# covers the half-precision rounding of the mask logits.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 5e-2)}


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    mask_mismatches: int = 0  # binary decisions that differ where |A| >= margin: failures
    near_threshold: int = 0  # decisions that differ where |A| < margin: allowed

    @property
    def ok(self) -> bool:
        if self.name == "logits":
            return self.max_abs_diff <= self.tolerance
        return self.mask_mismatches == 0


def _numpy(t) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def compare_outputs(
    names: Sequence[str],
    reference: Sequence,
    candidate: Sequence,
    mask_logits: Sequence,
    *,
    dtype: str = "float32",
) -> list[OutputCheck]:
    """One `OutputCheck` per output; `reference` and `mask_logits` from `reference_outputs`."""
    if len(candidate) != len(names) or len(reference) != len(names):
        raise ValueError(
            f"expected {len(names)} outputs ({', '.join(names)}), got {len(candidate)} from the "
            f"exported model and {len(reference)} from PyTorch"
        )
    logit_tol, margin = TOLERANCES[dtype]
    checks = []
    for index, (name, ref, got) in enumerate(zip(names, reference, candidate, strict=True)):
        ref, got = _numpy(ref), _numpy(got)
        if ref.shape != got.shape:
            raise ValueError(
                f"output {name}: shape {got.shape} from the exported model, {ref.shape} expected"
            )
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        if index == 0:  # logits
            scale = max(1.0, float(np.abs(ref).max())) if dtype != "float32" and ref.size else 1.0
            checks.append(OutputCheck(name, ref.shape, diff, logit_tol * scale))
            continue
        differs = ref != got
        near = np.abs(_numpy(mask_logits[index - 1])) < margin
        checks.append(
            OutputCheck(
                name,
                ref.shape,
                diff,
                margin,
                mask_mismatches=int((differs & ~near).sum()),
                near_threshold=int((differs & near).sum()),
            )
        )
    return checks


def format_checks(title: str, checks: Sequence[OutputCheck]) -> str:
    """A small markdown table of the checks, headed by `title`."""
    lines = [
        title,
        "",
        "| output | shape | max abs diff | mask flips, abs(A) >= margin | flips, abs(A) < margin | ok |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        flips = ("-", "-") if c.name == "logits" else (str(c.mask_mismatches), str(c.near_threshold))
        lines.append(
            f"| {c.name} | {tuple(c.shape)} | {c.max_abs_diff:.3g} | {flips[0]} | {flips[1]} | "
            f"{'yes' if c.ok else 'NO'} |"
        )
    return "\n".join(lines)
