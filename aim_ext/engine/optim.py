"""AdamW with separate parameter groups and a cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from aim_ext.engine.config import TrainConfig
from aim_ext.models import MaskingModel


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Backbone, top-down pathway (feature branches and heads) and mask estimators, each with its
    learning rate and weight decay (the mask estimators those of the top-down pathway unless the
    config sets their own); a vanilla model is backbone plus head."""
    if isinstance(model, MaskingModel):
        mask = [p for m in model.mask_estimator_modules() for p in m.parameters()]
        backbone = list(model.backbone.parameters())
        seen = {id(p) for p in mask + backbone}
        topdown = [p for p in model.parameters() if id(p) not in seen]
        groups = [
            {"name": "backbone", "params": backbone, "lr": cfg.lr_backbone, "weight_decay": cfg.weight_decay},
            {"name": "topdown", "params": topdown, "lr": cfg.lr_topdown, "weight_decay": cfg.weight_decay},
            {
                "name": "mask",
                "params": mask,
                "lr": _or(cfg.lr_mask, cfg.lr_topdown),
                "weight_decay": _or(cfg.weight_decay_mask, cfg.weight_decay),
            },
        ]
    else:
        head = set(id(p) for p in model.get_classifier().parameters())
        groups = [
            {
                "name": "backbone",
                "params": [p for p in model.parameters() if id(p) not in head],
                "lr": cfg.lr_backbone,
                "weight_decay": cfg.weight_decay,
            },
            {
                "name": "head",
                "params": [p for p in model.parameters() if id(p) in head],
                "lr": cfg.lr_topdown,
                "weight_decay": cfg.weight_decay,
            },
        ]
    # Frozen parameters (freeze_levels) are left out: AdamW's weight decay would still move them.
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW: one kernel per group and step, and it takes `found_inf` (a device flag) to skip
    a non-finite update without reading anything back (engine/step.py). A step captured into a CUDA
    graph needs `capturable=True`: the step count and learning rate are read on the device."""
    return torch.optim.AdamW(parameter_groups(model, cfg), fused=True, capturable=cfg.step == "cuda-graph")


RUN_OPTIONS = ("fused", "capturable", "foreach")  # how this run steps, not what it learned


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A saved AdamW state (moments, step counts, learning rates) under this run's options: a run
    resumed with another `--step` keeps its own `capturable`, which a CUDA graph needs."""
    options = [{k: g[k] for k in RUN_OPTIONS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, options, strict=True):
        group.update(kept)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A LambdaLR over all groups, stepped once per optimizer step."""
    total = cfg.epochs * steps_per_epoch
    factor = warmup_cosine(total, cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
