"""The mask estimator M_l of a top-down stage (paper Eq. 1): A_l = M_l(S_l)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

MASK_WIDTH = 32


class ResidualBlock(nn.Module):
    """Conv3x3 -> GELU -> Conv3x3 -> BatchNorm, plus the skip."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MaskEstimator(nn.Module):
    """Conv3x3 -> GELU -> 3 residual blocks -> [h, global mean of h] -> Conv1x1 to 1-channel logits."""

    def __init__(self, in_channels: int, width: int = MASK_WIDTH, num_blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.GELU()
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(num_blocks)))
        self.to_logits = nn.Conv2d(2 * width, 1, 1)

    def forward(self, s: Tensor) -> Tensor:
        h = self.blocks(self.act(self.stem(s)))
        context = h.mean(dim=(2, 3), keepdim=True).expand_as(h)
        return self.to_logits(torch.cat([h, context], dim=1))
