"""Reliance on the background, measured with TuxBirds' counterfactual images.

A photo dataset cannot show the same bird in the same pose and place on another background; a
generated one can: a dataset says so with `has_counterfactuals` and serves them from
`counterfactual(index)` (TuxBirds does). Two rates follow directly:

- background-swap flip rate: the share of images whose predicted class changes when only the
  background changes kind (water <-> land). A model that decides from the bird alone scores 0.
- background-only 'waterbird' rate: the share of bird-free backgrounds (the same crops) that the
  model calls 'waterbird', on water and on land. A model free of the spurious cue gives the same
  rate on both; the gap (water minus land) measures the cue.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

WATERBIRD = 1
PLACES = {0: "land", 1: "water"}
IMAGES = ("image", "swapped", "background")  # the item, its background-swapped twin, its background
FIELDS = ("label", "place", "index")


class CounterfactualDataset(Protocol):
    """A dataset with counterfactual images: each item, its background-swapped twin and its
    background alone (``image``, ``swapped``, ``background``), with ``label``, ``place``, ``index``."""

    has_counterfactuals: bool

    def __len__(self) -> int: ...

    def counterfactual(self, index: int) -> dict[str, Any]: ...


class CounterfactualView(Dataset):
    """The items of a counterfactual dataset (or of a subset of it) with their counterfactual images."""

    def __init__(self, dataset: CounterfactualDataset, indices: list[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.dataset.counterfactual(self.indices[position])
        return {k: sample[k] for k in IMAGES + FIELDS}


@torch.no_grad()
def _classes(model: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    return model(images.to(device)).argmax(dim=1).cpu()


def counterfactual_predictions(
    model: nn.Module,
    dataset: CounterfactualDataset,
    device: torch.device,
    *,
    indices: list[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "counterfactuals",
) -> dict[str, Tensor]:
    """Predicted classes of each item, of its background-swapped twin and of its background alone;
    also its ``label``, ``place`` and ``index``. ``model`` must be in evaluation mode."""
    loader = DataLoader(
        CounterfactualView(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    columns: dict[str, list[Tensor]] = {k: [] for k in IMAGES + FIELDS}
    for batch in tqdm(loader, desc=desc, unit="batch", disable=None):
        for key in IMAGES:
            columns[key].append(_classes(model, batch[key], device))
        for key in FIELDS:
            columns[key].append(batch[key])
    return {k: torch.cat(v) for k, v in columns.items()}


def counterfactual_rates(pred: dict[str, Tensor]) -> dict[str, Any]:
    """The flip rate (overall and per group of the original image) and the background-only
    'waterbird' rates on water and land, with their gap; fractions in [0, 1]."""
    flips = pred["swapped"] != pred["image"]
    groups = 2 * pred["label"] + pred["place"]
    waterbird = pred["background"] == WATERBIRD
    by_place = {
        name: waterbird[pred["place"] == place].double().mean().item()
        for place, name in PLACES.items()
        if (pred["place"] == place).any()
    }
    rates: dict[str, Any] = {
        "num_counterfactual_images": len(flips),
        "background_swap_flip_rate": flips.double().mean().item(),
        "background_swap_flip_rate_by_group": {
            str(g): flips[groups == g].double().mean().item() for g in sorted(set(groups.tolist()))
        },
        "background_only_waterbird_rate": by_place,
    }
    if len(by_place) == 2:
        rates["background_only_waterbird_gap"] = by_place["water"] - by_place["land"]
    return rates
