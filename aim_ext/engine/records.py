"""An epoch's record (a line of metrics.jsonl) flattened: summary.csv's columns, TensorBoard's tags."""

from __future__ import annotations

from typing import Any


def flatten(record: dict[str, Any], separator: str = "_", prefix: str = "") -> dict[str, Any]:
    """One name per value, mappings and lists spread out: {"lr": {"topdown": x}, "mask_area": [a, b]}
    -> {"lr_topdown": x, "mask_area_0": a, "mask_area_1": b} (with separator "_")."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, list | tuple):
            value = {str(i): item for i, item in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flatten(value, separator, name + separator))
        else:
            flat[name] = value
    return flat
