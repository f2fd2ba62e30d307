"""Parameters and multiply-accumulates, the two columns of the paper's Table 6 (its "GFLOPs" count
one multiply-add as one operation: ConvNeXt-T 4.5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parameters_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@torch.no_grad()
def gmacs(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Giga multiply-accumulates of one image through the evaluation model (convolutions and
    matrix products, as torch's flop counter counts them: 2 operations per multiply-add)."""
    model = model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *image_size, device=device))
    return counter.get_total_flops() / 2 / 1e9
