"""A stage of the top-down pathway: feature branch T_l, mask estimator M_l, and the merge.

    A_l = M_l(S_l)                                   (Eq. 1)
    B_l = G(A_l)                                     (Eq. 2)  binary Gumbel-softmax
    O_l = T_l(S_l) * B_l                             (Eq. 3)
    P_l = O_l + nearest_resize(P_{l+1}, size of O_l) (top-down merge; P_L = O_L)

Eq. 2, Eq. 3 and the merge are one op, `aim_ext.ops.masked_merge`. By default a stage goes one step
further: the end of T_l (LayerNorm, GELU), Eq. 2, Eq. 3 and the merge run as the single op
`aim_ext.ops.topdown_epilogue`, which reads the convolution output once (set
`TopDownStage.fused_epilogue = False` on a stage, or `use_fused_epilogue(model, False)`, for the
two-op path; both give the same results within the dtype's rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from aim_ext.models.mask_estimator import MaskEstimator
from aim_ext.ops import (
    logistic_noise,
    masked_merge,
    masked_pool,
    pooled_epilogue,
    sparse_pooled_branch,
    topdown_epilogue,
    topdown_epilogue_inference,
)

TOPDOWN_WIDTH = 256


class FeatureBranch(nn.Module):
    """T_l: Conv1x1(C_l -> 256) -> Conv3x3(256 -> 256) -> LayerNorm over channels -> GELU."""

    def __init__(self, in_channels: int, width: int = TOPDOWN_WIDTH) -> None:
        super().__init__()
        self.align = nn.Conv2d(in_channels, width, 1)
        self.refine = nn.Conv2d(width, width, 3, padding=1)
        self.norm = LayerNorm2d(width)
        self.act = nn.GELU()

    def convolutions(self, s: Tensor) -> Tensor:
        return self.refine(self.align(s))

    def forward(self, s: Tensor) -> Tensor:
        return self.act(self.norm(self.convolutions(s)))

    def fusable(self) -> bool:
        """Whether the norm and activation are the ones `topdown_epilogue` computes."""
        return (
            type(self.norm) is LayerNorm2d
            and type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and self.norm.elementwise_affine
        )


class StageOutput(NamedTuple):
    merged: Tensor  # P_l, (N, 256, h, w)
    mask: Tensor  # B_l, (N, 1, h, w), binary
    mask_logits: Tensor  # A_l, (N, 1, h, w)
    features: Tensor | None  # T_l(S_l), before masking; None in evaluation without autograd


class TopDownStage(nn.Module):
    """One top-down stage on backbone stage l."""

    fused_epilogue = True  # run LayerNorm, GELU, Eq. 2-3 and the merge as one op where it applies

    def __init__(self, in_channels: int, width: int = TOPDOWN_WIDTH) -> None:
        super().__init__()
        self.features = FeatureBranch(in_channels, width)
        self.mask_estimator = MaskEstimator(in_channels)

    def forward(self, s: Tensor, coarse: Tensor | None, *, temperature: float, noise: bool) -> StageOutput:
        return self.merge(
            self.mask_estimator(s), self.feature_branch(s), coarse, temperature=temperature, noise=noise
        )

    def uses_fused_epilogue(self) -> bool:
        return self.fused_epilogue and self.features.fusable()

    def feature_branch(self, s: Tensor) -> Tensor:
        """T_l(S_l), or only its convolutions when the epilogue op finishes it in `merge`.

        This and the mask estimator depend on S_l alone, so they can run concurrently (see
        `aim_ext.models.concurrency`); `merge` needs both and the stage above."""
        return self.features.convolutions(s) if self.uses_fused_epilogue() else self.features(s)

    def merge(
        self, logits: Tensor, branch: Tensor, coarse: Tensor | None, *, temperature: float, noise: bool
    ) -> StageOutput:
        """Eq. 2, Eq. 3 and the top-down merge, from A_l = `logits` and `feature_branch`'s output."""
        sample = None  # evaluation: the deterministic mask 1[A >= 0]
        if self.training:  # noise off still trains the estimator through the straight-through gradient
            sample = logistic_noise(logits) if noise else torch.zeros_like(logits, dtype=torch.float32)
        coarse = _same_dtype(coarse, branch)
        if self.uses_fused_epilogue() and not self.training and not torch.is_grad_enabled():
            norm = self.features.norm  # evaluation: only the auxiliary heads would read T_l(S_l)
            merged, mask = topdown_epilogue_inference(
                branch, norm.weight, norm.bias, logits, coarse, eps=norm.eps
            )
            return StageOutput(merged, mask, logits, None)
        if self.uses_fused_epilogue():
            norm = self.features.norm
            merged, mask, feat = topdown_epilogue(
                branch,
                norm.weight,
                norm.bias,
                logits,
                coarse,
                noise=sample,
                temperature=temperature,
                eps=norm.eps,
            )
        else:
            feat = branch
            merged, mask = masked_merge(feat, logits, coarse, noise=sample, temperature=temperature)
        return StageOutput(merged, mask, logits, feat)

    # Evaluation with the pooled head (aim_ext.ops.pooled_head): the stage's share of mean(P_T).

    def pool_input(self, s: Tensor, sparse: bool) -> Tensor:
        """What `pool` reads besides the mask logits: S_l itself for the sparse branch, else the
        dense convolutions of T_l (or all of T_l where the epilogue op does not apply)."""
        if sparse:
            return s
        return self.features.convolutions(s) if self.features.fusable() else self.features(s)

    def pool(self, logits: Tensor, branch: Tensor, sparse: bool, weight: Tensor) -> tuple[Tensor, Tensor]:
        """sum_p w_l(p) O_l(p), (N, 256) in the accumulation type, and B_l, from `pool_input`'s output."""
        f = self.features
        if sparse:
            dtype = branch.dtype  # S_l's: under autocast the convolutions run in it
            return sparse_pooled_branch(
                branch,
                logits,
                weight,
                f.align.weight.to(dtype),
                f.align.bias,
                f.refine.weight.to(dtype),
                f.refine.bias,
                f.norm.weight,
                f.norm.bias,
                eps=f.norm.eps,
            )
        if f.fusable():
            return pooled_epilogue(branch, f.norm.weight, f.norm.bias, logits, weight, eps=f.norm.eps)
        mask = (logits >= 0).to(branch.dtype)
        return masked_pool(branch, mask, weight), mask

    def can_run_sparse(self) -> bool:
        """Whether T_l is the convolutions and epilogue that `sparse_pooled_branch` computes."""
        f = self.features
        return (
            f.fusable()
            and type(f.align) is nn.Conv2d
            and type(f.refine) is nn.Conv2d
            and f.align.kernel_size == (1, 1)
            and f.refine.kernel_size == (3, 3)
            and f.refine.padding == (1, 1)
            and f.align.stride == f.refine.stride == (1, 1)
            and f.align.groups == f.refine.groups == 1
        )


def _same_dtype(coarse: Tensor | None, like: Tensor) -> Tensor | None:
    """Under autocast the stages can differ in dtype; the merge takes the finer stage's."""
    return coarse if coarse is None or coarse.dtype == like.dtype else coarse.to(like.dtype)


def use_fused_epilogue(model: nn.Module, enabled: bool) -> None:
    """Switch every top-down stage of ``model`` between the fused epilogue op and the two-op path."""
    for module in model.modules():
        if isinstance(module, TopDownStage):
            module.fused_epilogue = enabled
