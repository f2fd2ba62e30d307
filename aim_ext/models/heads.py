"""Classifier heads f_l and f_final (paper Eq. 4-5): global average pool -> dropout -> Linear."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_avg_pool(feat: Tensor, mask: Tensor) -> Tensor:
    """Global average pool of feat * mask, (N, C), without materialising the product.

    This is GAP(O_l) for the auxiliary head of Eq. 4; the gradient reaches the mask (and through
    the straight-through estimator, the mask logits).
    """
    n, c, h, w = feat.shape
    pooled = torch.bmm(feat.reshape(n, c, h * w), mask.reshape(n, h * w, 1).to(feat.dtype))
    return pooled.reshape(n, c) / (h * w)


class ClassifierHead(nn.Module):
    """Dropout and a linear classifier over pooled (N, C) features."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(self.drop(pooled))
