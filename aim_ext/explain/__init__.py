"""Evaluation and explanation: EPG, attributions (captum), figures, and the evaluation of a run.

Accuracy and mask metrics, which training reports too, are `aim_ext.metrics`.

`attribute`, `gradcam_layer` and `METHODS` load captum on first use, and the figures live in
`aim_ext.explain.figures` (matplotlib): importing this package stays light for training.
"""

from __future__ import annotations

import importlib
from typing import Any

from aim_ext.explain.epg import energy_pointing_game, resize_maps

_LAZY = {
    "attribute": "attributions",
    "gradcam_layer": "attributions",
    "METHODS": "attributions",
    "explain_images": "images",
    "Explanation": "images",
}

__all__ = [
    "METHODS",
    "Explanation",
    "explain_images",
    "attribute",
    "energy_pointing_game",
    "gradcam_layer",
    "resize_maps",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"aim_ext.explain.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'aim_ext.explain' has no attribute {name!r}")
