"""The evaluation of a run: predictions, EPG per attribution method (where the dataset has object
masks), AIM mask areas, background counterfactuals (where the dataset has them), and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aim_ext.explain.attributions import attribute
from aim_ext.explain.counterfactual import counterfactual_predictions, counterfactual_rates
from aim_ext.explain.epg import energy_pointing_game
from aim_ext.explain.run import EvalError, EvalOptions, Run
from aim_ext.metrics import (
    classification_metrics,
    mask_areas,
    mask_on_object,
    merged_mask,
    stage_masks_at_finest,
)

# What each accuracy means, written next to the numbers: the two averages are regularly confused.
DEFINITIONS = {
    "avg_acc": "plain accuracy over all evaluated images (weighted by the evaluation group sizes)",
    "worst_group_acc": "lowest per-group accuracy",
    "reweighted_avg_acc": "per-group accuracy weighted by the TRAINING group proportions "
    "(the 'average accuracy' of the Waterbirds literature)",
    "group_acc": "accuracy within each group (Waterbirds: group = 2 * y + place)",
    "epg": "mean Energy Pointing Game: share of positive attribution energy inside the object mask",
    "mask_sparsity": "mean fraction of active mask positions per AIM stage (top stage first)",
    "merged_mask_area": "mean fraction of active positions of the merged (union) mask",
    "mask_precision": "per AIM stage and for the merged mask (upsampled to the image): mean share of "
    "the active area that lies on the object (images with an active area)",
    "mask_precision_chance": "the precision of a mask placed at random: the mean object share of the image",
    "mask_recall": "per AIM stage and for the merged mask: mean share of the object under the active area",
    "background_swap_flip_rate": "share of images whose prediction changes when only the background "
    "changes kind (water <-> land; TuxBirds counterfactuals)",
    "background_only_waterbird_rate": "share of bird-free backgrounds called 'waterbird', per place",
    "background_only_waterbird_gap": "background-only 'waterbird' rate on water minus on land",
}


@dataclass
class Shown:
    """The first few evaluated images, kept for the figures, with their masks and attribution maps."""

    images: Tensor  # (n, 3, H, W), normalised
    targets: Tensor  # the attributed classes
    object_masks: Tensor | None = None  # (n, H, W) bool
    stage_masks: list[Tensor] | None = None  # AIM masks (n, 1, h, w), top stage first
    maps: dict[str, Tensor] = field(default_factory=dict)  # method -> (n, h, w)


@dataclass
class Evaluation:
    """Per-image results of one run on one split, and the images the figures show."""

    run: Run
    options: EvalOptions
    ids: list[str]
    labels: Tensor
    preds: Tensor
    groups: Tensor | None
    epg: dict[str, Tensor]  # method -> (N,); empty when the dataset has no masks
    stage_areas: Tensor | None  # (N, stages), AIM only
    merged_areas: Tensor | None  # (N,), AIM only
    shown: Shown
    counterfactual: dict[str, Any] | None = None  # TuxBirds' background-reliance rates
    # AIM on a dataset with object masks: (N, stages + 1), each stage then the merged mask; NaN
    # where a mask is empty (precision) or an image has no object (recall).
    mask_precision: Tensor | None = None
    mask_recall: Tensor | None = None
    object_share: Tensor | None = None  # (N,): the object's share of each image
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return bool(getattr(self.run.dataset, "has_masks", False))


def _attribute(model: nn.Module, images: Tensor, targets: Tensor, method: str) -> Tensor:
    # The targets are already the labels or the predictions: no second forward pass for the latter.
    return attribute(model, images, targets, method).cpu()


def _predict(run: Run, images: Tensor) -> tuple[Tensor, list[Tensor] | None]:
    """Predicted classes (on the CPU) and, for AIM, the stage masks (top stage first, on the CPU)."""
    with torch.no_grad():
        logits, masks = run.model.predict(images) if run.is_aim else (run.model(images), None)
    return logits.argmax(dim=1).cpu(), [m.cpu() for m in masks] if masks is not None else None


def figure_methods(options: EvalOptions) -> tuple[str, str]:
    """GradCAM and a second method for the run's attribution figure (the first other one asked for)."""
    return "gradcam", next((m for m in options.methods if m != "gradcam"), "guided_gradcam")


def _shown(run: Run, data: Dataset, options: EvalOptions) -> Shown:
    """The first `options.figures` images with their AIM masks and the figure's attribution maps."""
    samples = [data[i] for i in range(min(options.figures, len(data)))]
    if not samples:
        return Shown(images=torch.empty(0, 3, 1, 1), targets=torch.empty(0, dtype=torch.long))
    images = torch.stack([s["image"] for s in samples])
    preds, masks = _predict(run, images.to(run.device))
    labels = torch.tensor([s["label"] for s in samples])
    shown = Shown(
        images=images,
        targets=labels if options.target == "label" else preds,
        object_masks=torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None,
        stage_masks=masks,
    )
    for method in figure_methods(options):
        shown.maps[method] = _attribute(run.model, images.to(run.device), shown.targets, method)
    return shown


def evaluate(run: Run, options: EvalOptions) -> Evaluation:
    """Predictions, EPG per method (when the dataset has masks) and AIM mask areas of every image."""
    data = run.dataset
    if options.max_images is not None:
        data = Subset(data, range(min(options.max_images, len(data))))
    loader = DataLoader(
        data,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=run.cfg.num_workers if options.num_workers is None else options.num_workers,
    )
    methods = options.methods if run.dataset.has_masks else ()
    names = ("index", "label", "pred", "group", "areas", "merged", "precision", "recall", "object")
    columns: dict[str, list[Tensor]] = {k: [] for k in names}
    epg: dict[str, list[Tensor]] = {m: [] for m in methods}
    for batch in tqdm(loader, desc=f"aim-eval {run.name} ({run.split})", unit="batch", disable=None):
        images = batch["image"].to(run.device)
        preds, masks = _predict(run, images)
        targets = batch["label"] if options.target == "label" else preds
        for method in methods:
            maps = _attribute(run.model, images, targets.to(run.device), method)
            epg[method].append(energy_pointing_game(maps, batch["mask"]))
        columns["index"].append(batch["index"])
        columns["label"].append(batch["label"])
        columns["pred"].append(preds)
        if "group" in batch:
            columns["group"].append(batch["group"])
        if masks is not None:
            columns["areas"].append(mask_areas(masks))
            merged = merged_mask(masks)
            columns["merged"].append(merged.float().mean(dim=(1, 2, 3)))
            if run.dataset.has_masks:
                carried = [*stage_masks_at_finest(masks), merged]  # all on the finest stage's grid
                overlaps = [mask_on_object(m, batch["mask"]) for m in carried]
                columns["precision"].append(torch.stack([p for p, _ in overlaps], dim=1).cpu())
                columns["recall"].append(torch.stack([r for _, r in overlaps], dim=1).cpu())
                columns["object"].append(batch["mask"].flatten(1).double().mean(1))
    if not columns["label"]:
        raise EvalError(
            f"no images to evaluate in the {run.split} split of {run.cfg.dataset} at {run.cfg.data_root}"
        )
    cat = {k: torch.cat(v) if v else None for k, v in columns.items()}
    counterfactual = None
    if options.counterfactuals and getattr(run.dataset, "has_counterfactuals", False):
        indices = cat["index"].tolist()[: options.counterfactual_images]
        workers = run.cfg.num_workers if options.num_workers is None else options.num_workers
        pred = counterfactual_predictions(
            run.model,
            run.dataset,
            run.device,
            indices=indices,
            batch_size=options.batch_size,
            num_workers=workers,
            desc=f"aim-eval {run.name} (counterfactuals)",
        )
        counterfactual = counterfactual_rates(pred)
    ids = getattr(run.dataset, "ids", None)
    evaluation = Evaluation(
        run=run,
        options=options,
        ids=[str(ids[i]) if ids is not None else str(i) for i in cat["index"].tolist()],
        labels=cat["label"],
        preds=cat["pred"],
        groups=cat["group"],
        epg={m: torch.cat(v) for m, v in epg.items()},
        stage_areas=cat["areas"],
        merged_areas=cat["merged"],
        mask_precision=cat["precision"],
        mask_recall=cat["recall"],
        object_share=cat["object"],
        shown=_shown(run, data, options),
        counterfactual=counterfactual,
    )
    evaluation.metrics = evaluation_metrics(evaluation)
    return evaluation


def evaluation_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """metrics.json: the run, the accuracies under unambiguous names, mean EPG, mask sparsity."""
    run = evaluation.run
    notes: list[str] = []
    counts = run.train_group_counts
    try:
        found = classification_metrics(evaluation.preds, evaluation.labels, evaluation.groups, counts)
    except ValueError as error:  # e.g. --max-images left a training group without evaluation images
        notes.append(f"reweighted_avg_acc not computed: {error}")
        found = classification_metrics(evaluation.preds, evaluation.labels, evaluation.groups)
    metrics: dict[str, Any] = {
        "run": str(run.folder),
        "checkpoint": str(run.checkpoint),
        "checkpoint_epoch": run.epoch,
        "model": run.cfg.model,
        "stop_stage": run.cfg.stop_stage,
        "dataset": run.cfg.dataset,
        "split": run.split,
        "num_images": found.pop("num_samples"),
        "attribution_target": evaluation.options.target,
        **found,
    }
    if counts is not None:
        metrics["train_group_count"] = counts
    if evaluation.epg:
        metrics["epg"] = {m: v.double().mean().item() for m, v in evaluation.epg.items()}
    elif not evaluation.has_masks:
        notes.append(f"{run.cfg.dataset} has no object masks: EPG not computed")
    if evaluation.stage_areas is not None:
        sparsity = evaluation.stage_areas.double().mean(dim=0).tolist()
        metrics["mask_sparsity"] = dict(zip(run.stage_names, sparsity, strict=True))
        metrics["merged_mask_area"] = evaluation.merged_areas.double().mean().item()
    if evaluation.mask_precision is not None:
        names = [*run.stage_names, "merged"]
        metrics["mask_precision"] = dict(
            zip(names, evaluation.mask_precision.nanmean(dim=0).tolist(), strict=True)
        )
        metrics["mask_precision_chance"] = evaluation.object_share.mean().item()
        metrics["mask_recall"] = dict(zip(names, evaluation.mask_recall.nanmean(dim=0).tolist(), strict=True))
    if evaluation.counterfactual is not None:
        metrics.update(evaluation.counterfactual)
    metrics["definitions"] = {k: v for k, v in DEFINITIONS.items() if k in metrics}
    metrics["notes"] = notes
    return metrics
