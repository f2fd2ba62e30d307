"""The mask estimator M_l of a top-down stage (paper Eq. 1): A_l = M_l(S_l)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aim_ext.models.fusion import fold_conv_bn

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

    def fuse(self) -> InferenceMaskEstimator:
        """The same estimator for inference, sharing no module with this one (timm's
        ``reparameterize_model`` calls this)."""
        return InferenceMaskEstimator(self)


class InferenceMaskEstimator(nn.Module):
    """M_l for inference: each block's BatchNorm folded into its second convolution, and the logits
    ``to_logits(cat[h, mean(h)])`` computed as ``W_h h + W_c mean(h) + b`` with no concatenated map."""

    def __init__(self, estimator: MaskEstimator) -> None:
        super().__init__()
        if estimator.training:
            raise RuntimeError(
                "fuse the mask estimator in evaluation mode (its BatchNorms' running statistics)"
            )
        self.stem = copy.deepcopy(estimator.stem)
        self.act = copy.deepcopy(estimator.act)
        self.blocks = nn.Sequential(*(_InferenceBlock(b) for b in estimator.blocks))
        width = self.stem.out_channels
        to_logits = estimator.to_logits
        self.to_logits_local = nn.Conv2d(width, 1, 1).to(to_logits.weight)
        self.to_logits_context = nn.Linear(width, 1, bias=False).to(to_logits.weight)
        with torch.no_grad():
            self.to_logits_local.weight.copy_(to_logits.weight[:, :width])
            self.to_logits_local.bias.copy_(to_logits.bias)
            self.to_logits_context.weight.copy_(to_logits.weight[:, width:, 0, 0])
        self.eval()

    def forward(self, s: Tensor) -> Tensor:
        h = self.blocks(self.act(self.stem(s)))
        context = self.to_logits_context(h.mean(dim=(2, 3)))
        return self.to_logits_local(h) + context[:, :, None, None]


class _InferenceBlock(nn.Module):
    """A `ResidualBlock` with its BatchNorm folded into conv2."""

    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.conv1 = copy.deepcopy(block.conv1)
        self.act = copy.deepcopy(block.act)
        self.conv2 = fold_conv_bn(block.conv2, block.norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))
