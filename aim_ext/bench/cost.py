"""Parameters and multiply-accumulates, the two columns of the paper's Table 6 (its "GFLOPs" count
one multiply-add as one operation: ConvNeXt-T 4.5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aim_ext.models import AIM


def parameters_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@torch.no_grad()
def gmacs(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Giga multiply-accumulates of one image through the evaluation model (convolutions and
    matrix products, as torch's flop counter counts them: 2 operations per multiply-add)."""
    model = model.eval()
    image = torch.zeros(1, 3, *image_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        # AIM's dense evaluation path (P_T): the count the paper's Table 6 gives.
        model.predict(image, merged_map=True) if isinstance(model, AIM) else model(image)
    return counter.get_total_flops() / 2 / 1e9
