"""Evaluation and explanation: EPG, attributions (captum), accuracy and mask metrics, figures.

`attribute`, `gradcam_layer` and `METHODS` load captum on first use, and the figures live in
`aim_ext.explain.figures` (matplotlib): importing this package stays light for training.
"""

from __future__ import annotations

import importlib
from typing import Any

from aim_ext.explain.epg import energy_pointing_game, resize_maps
from aim_ext.explain.metrics import (
    accuracy,
    classification_metrics,
    group_accuracies,
    group_counts,
    mask_areas,
    mask_sparsity,
    merged_mask,
    reweighted_accuracy,
    worst_group_accuracy,
)

_LAZY = {"attribute": "attributions", "gradcam_layer": "attributions", "METHODS": "attributions"}

__all__ = [
    "METHODS",
    "accuracy",
    "attribute",
    "classification_metrics",
    "energy_pointing_game",
    "gradcam_layer",
    "group_accuracies",
    "group_counts",
    "mask_areas",
    "mask_sparsity",
    "merged_mask",
    "resize_maps",
    "reweighted_accuracy",
    "worst_group_accuracy",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"aim_ext.explain.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'aim_ext.explain' has no attribute {name!r}")
