"""The AIM training loss (paper Eq. 6-7) and the active-area schedule tau(epoch).

    L = CE(final) + sum_l CE(aux_l) + lambda * sum_l (r_l - tau)^2

r_l is the fraction of ones in the binary mask B_l over the batch; its gradient reaches the mask
logits through the straight-through estimator of the masked merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.models.aim import AIMOutput

AREA_WEIGHT = 6.0  # lambda of Eq. 7
LABEL_SMOOTHING = 0.05


@dataclass(frozen=True)
class AreaSchedule:
    """The annealed active-area target (section 3, appendix A.3): tau = 1.0 up to and including
    epoch `start`, then it falls linearly by (1 - final) / duration each epoch, reaching `final` at
    epoch start + duration, and holds it for the rest of training. duration 0: `final` from
    `start` on."""

    final: float | tuple[float, ...]  # one value, or one per stage (tau_l, top stage first)
    start: int = 0
    duration: int = 1

    def __post_init__(self) -> None:
        finals = self.final if isinstance(self.final, tuple) else (self.final,)
        if not finals or not all(0.0 <= f <= 1.0 for f in finals):
            raise ValueError(f"final tau must lie in [0, 1], got {self.final}")
        if self.start < 0 or self.duration < 0:
            raise ValueError(f"start and duration must be >= 0, got {self.start}, {self.duration}")

    def __call__(self, epoch: int) -> float | tuple[float, ...]:
        if self.duration == 0:
            progress = 0.0 if epoch < self.start else 1.0
        else:
            progress = min(max((epoch - self.start) / self.duration, 0.0), 1.0)
        if isinstance(self.final, tuple):
            return tuple(1.0 - (1.0 - f) * progress for f in self.final)
        return 1.0 - (1.0 - self.final) * progress


def area_target(schedule: AreaSchedule | None, epoch: int) -> float | tuple[float, ...] | None:
    """tau(epoch), or None when there is no annealing (and so no area loss)."""
    return None if schedule is None else schedule(epoch)


def _counted(mask: Tensor) -> Tensor:
    """A mask in a type to count in: float32 at least (bf16 and fp16 masks), float64 kept."""
    return mask if mask.dtype == torch.float64 else mask.float()


def active_area(mask: Tensor, sum_over_batch: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """r_l (Eq. 6): the fraction of active positions of a binary mask over the batch.

    `sum_over_batch` sums a tensor over every part of the batch (the processes of a distributed
    run; differentiable), so that r_l is the fraction over the global batch."""
    mask = _counted(mask)
    if sum_over_batch is None:
        return mask.mean()
    counts = torch.stack([mask.sum(), mask.new_tensor(mask.numel())])
    total = sum_over_batch(counts)
    return total[0] / total[1]


def image_areas(mask: Tensor) -> Tensor:
    """r_l of Eq. 6 for each image: the fraction of active positions of each image's mask, (N,)."""
    return _counted(mask).flatten(1).mean(dim=1)


def _batch_mean(values: Tensor, sum_over_batch: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The mean of per-image values over the (global) batch."""
    if sum_over_batch is None:
        return values.mean()
    total = sum_over_batch(torch.stack([values.sum(), values.new_tensor(values.numel())]))
    return total[0] / total[1]


def area_loss(
    masks: list[Tensor],
    tau: float | Tensor,
    sum_over_batch: Callable[[Tensor], Tensor] | None = None,
    *,
    per_image: bool = True,
) -> Tensor:
    """The active-area loss of Eq. 6-7 before its weight, summed over the stages' masks.

    per_image (Eq. 6 as written, r_l of one image's mask): the mean over the batch of
    (r_l(image) - tau)^2, which holds every image near tau. Otherwise r_l pools the batch:
    (r_l(batch) - tau)^2, which holds only the batch's average near tau, so one image may open
    more of its mask than another. `tau` is one target, or a tensor of one per stage (tau_l)."""
    if isinstance(tau, tuple | list):  # area_target's per-stage values
        tau = torch.tensor(tau, dtype=torch.float64)
    taus = list(tau) if isinstance(tau, Tensor) and tau.dim() == 1 else [tau] * len(masks)
    if len(taus) != len(masks):
        raise ValueError(f"{len(taus)} area targets for {len(masks)} masks")
    if per_image:
        return torch.stack(
            [_batch_mean((image_areas(m) - t) ** 2, sum_over_batch) for m, t in zip(masks, taus, strict=True)]
        ).sum()
    return torch.stack(
        [(active_area(m, sum_over_batch) - t) ** 2 for m, t in zip(masks, taus, strict=True)]
    ).sum()


class LossTerms(NamedTuple):
    total: Tensor
    final_ce: Tensor
    aux_ce: Tensor  # summed over stages; 0 for a vanilla model
    area: Tensor  # sum_l (r_l - tau)^2 before the weight; 0 without annealing


def aim_loss(
    output: AIMOutput | Tensor,
    target: Tensor,
    tau: float | Tensor | None,
    *,
    area_weight: float = AREA_WEIGHT,
    label_smoothing: float = LABEL_SMOOTHING,
    sum_over_batch: Callable[[Tensor], Tensor] | None = None,
    aux_weight: float = 1.0,
    area_per_image: bool = True,
) -> LossTerms:
    """Eq. 7 for an AIM output; plain (smoothed) cross-entropy for a vanilla model's logits."""
    if isinstance(output, Tensor):
        ce = F.cross_entropy(output, target, label_smoothing=label_smoothing)
        zero = ce.new_zeros(())
        return LossTerms(ce, ce, zero, zero)
    final_ce = F.cross_entropy(output.logits, target, label_smoothing=label_smoothing)
    aux_ce = (
        torch.stack(
            [F.cross_entropy(a, target, label_smoothing=label_smoothing) for a in output.aux_logits]
        ).sum()
        if output.aux_logits
        else final_ce.new_zeros(())  # the aux heads are off (AIM.set_aux_heads)
    )
    area = (
        area_loss(output.masks[: output.estimated], tau, sum_over_batch, per_image=area_per_image)
        if tau is not None
        else final_ce.new_zeros(())
    )
    # aux_weight 0 is the paper's "no auxiliary losses" ablation.
    return LossTerms(final_ce + aux_weight * aux_ce + area_weight * area, final_ce, aux_ce, area)
