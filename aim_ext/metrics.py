"""Classification metrics (plain, per-group, worst-group, group-reweighted) and AIM mask statistics.

Two different "average accuracies" circulate in the Waterbirds literature and are often confused:
- `avg_acc`: plain accuracy over all test samples, i.e. weighted by the TEST group sizes;
- `reweighted_avg_acc`: per-group test accuracy weighted by the TRAINING group proportions
  (what Sagawa et al. and later papers report as "average accuracy" on Waterbirds).
They differ whenever test and training group proportions differ, as on Waterbirds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _predictions(outputs: Tensor) -> Tensor:
    """Logits (N, K) -> predicted classes (N,); class indices (N,) pass through."""
    return outputs.argmax(dim=1) if outputs.dim() == 2 else outputs.reshape(-1)


def accuracy(outputs: Tensor, labels: Tensor) -> float:
    """Fraction of correct predictions; `outputs` are logits (N, K) or predicted classes (N,)."""
    preds = _predictions(outputs)
    if preds.numel() != labels.numel():
        raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
    if preds.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (preds.cpu() == labels.reshape(-1).cpu()).double().mean().item()


def group_counts(groups: Tensor) -> dict[int, int]:
    """Number of samples per group id."""
    ids, counts = torch.unique(groups.reshape(-1).cpu(), return_counts=True)
    return {int(g): int(c) for g, c in zip(ids, counts, strict=True)}


def group_accuracies(outputs: Tensor, labels: Tensor, groups: Tensor) -> dict[int, float]:
    """Accuracy within each group present in `groups`."""
    preds = _predictions(outputs).cpu()
    labels, groups = labels.reshape(-1).cpu(), groups.reshape(-1).cpu()
    if not preds.numel() == labels.numel() == groups.numel():
        raise ValueError(f"{preds.numel()} predictions, {labels.numel()} labels, {groups.numel()} groups")
    correct = preds == labels
    return {g: correct[groups == g].double().mean().item() for g in group_counts(groups)}


def worst_group_accuracy(group_acc: Mapping[int, float]) -> float:
    """The lowest per-group accuracy."""
    if not group_acc:
        raise ValueError("no groups")
    return min(group_acc.values())


def reweighted_accuracy(group_acc: Mapping[int, float], train_group_counts: Mapping[int, int]) -> float:
    """Per-group accuracy weighted by the training group proportions."""
    missing = sorted(g for g, n in train_group_counts.items() if n > 0 and g not in group_acc)
    if missing:
        # Silently renormalising over the groups present would report a different quantity.
        raise ValueError(f"training groups {missing} have no evaluation samples; cannot reweight")
    total = sum(train_group_counts.values())
    if total <= 0:
        raise ValueError("training group counts sum to zero")
    return sum(group_acc[g] * n / total for g, n in train_group_counts.items() if n > 0)


def classification_metrics(
    outputs: Tensor,
    labels: Tensor,
    groups: Tensor | None = None,
    train_group_counts: Mapping[int, int] | None = None,
) -> dict[str, object]:
    """All accuracies in one dict, each under an unambiguous name.

    Always `avg_acc` (plain accuracy over all samples) and `num_samples`; with `groups`:
    `group_acc` and `group_count` (per group id), `worst_group_acc` and `worst_group`; with
    `train_group_counts` too: `reweighted_avg_acc` (group accuracy weighted by training proportions).
    """
    result: dict[str, object] = {"avg_acc": accuracy(outputs, labels), "num_samples": labels.numel()}
    if groups is None:
        if train_group_counts is not None:
            raise ValueError("train_group_counts needs the evaluation groups")
        return result
    per_group = group_accuracies(outputs, labels, groups)
    result["group_acc"] = per_group
    result["group_count"] = group_counts(groups)
    result["worst_group_acc"] = worst_group_accuracy(per_group)
    result["worst_group"] = min(per_group, key=per_group.__getitem__)
    if train_group_counts is not None:
        result["reweighted_avg_acc"] = reweighted_accuracy(per_group, train_group_counts)
    return result


def mask_areas(masks: Sequence[Tensor]) -> Tensor:
    """Per-image fraction of active positions per stage, (N, stages), stages in the given order."""
    if not masks:
        raise ValueError("no masks")
    return torch.stack([m.reshape(m.shape[0], -1).float().mean(dim=1) for m in masks], dim=1)


def mask_sparsity(masks: Sequence[Tensor]) -> list[float]:
    """Mean fraction of active positions per stage over the batch (every image weighs the same)."""
    return mask_areas(masks).mean(dim=0).tolist()


def merged_mask(masks: Sequence[Tensor]) -> Tensor:
    """Union of the stage masks (top stage first) at the finest stage's resolution, bool (N, 1, h, w).

    The union is upsampled stage by stage with nearest resizing, as the top-down merge carries
    P_{l+1} into P_l: where sizes are not multiples (10 -> 19 -> 38) this differs from resizing the
    top mask straight to the finest size, and only the chained form matches what the classifier sees.
    """
    if not masks:
        raise ValueError("no masks")
    union = masks[0] > 0
    for mask in masks[1:]:
        carried = F.interpolate(union.float(), size=mask.shape[-2:], mode="nearest") > 0
        union = carried | (mask > 0)
    return union


def stage_masks_at_finest(masks: Sequence[Tensor]) -> list[Tensor]:
    """Each stage's mask (top stage first) carried to the finest stage's grid through every grid
    between, by nearest upsampling, as the top-down merge carries P_{l+1} into P_l (where sizes are
    not multiples, 10 -> 19 -> 38, that differs from one resize)."""
    carried = []
    for index, mask in enumerate(masks):
        for finer in masks[index + 1 :]:
            mask = F.interpolate(mask.float(), size=finer.shape[-2:], mode="nearest")
        carried.append(mask)
    return carried


def mask_on_object(mask: Tensor, objects: Tensor) -> tuple[Tensor, Tensor]:
    """How an AIM mask (N, 1, h, w), nearest-upsampled to the image, meets the object masks
    (N, H, W) bool: per image, precision (the share of the active area on the object; NaN where
    nothing is active) and recall (the share of the object under the active area; NaN where the
    image has no object). Chance precision is the object's share of the image."""
    if objects.dim() != 3 or mask.dim() != 4 or mask.shape[0] != objects.shape[0]:
        raise ValueError(
            f"need masks (N, 1, h, w) and objects (N, H, W), got {tuple(mask.shape)}, {tuple(objects.shape)}"
        )
    on = F.interpolate((mask > 0).float(), size=objects.shape[-2:], mode="nearest")[:, 0] > 0
    objects = objects.to(on.device).bool()
    both = (on & objects).flatten(1).sum(1).double()
    active, object_size = on.flatten(1).sum(1).double(), objects.flatten(1).sum(1).double()
    nan = torch.full_like(both, float("nan"))
    precision = torch.where(active > 0, both / active.clamp_min(1), nan)
    recall = torch.where(object_size > 0, both / object_size.clamp_min(1), nan)
    return precision, recall
