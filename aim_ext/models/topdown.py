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

For inference, `FeatureBranch.fuse()` gives `InferenceFeatureBranch`: T_l's convolutions in fewer
launches, the same outputs.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from aim_ext.models.concurrency import tracing
from aim_ext.models.mask_estimator import MaskEstimator
from aim_ext.models.masking import gumbel_sample
from aim_ext.ops import (
    masked_merge,
    masked_pool,
    pooled_epilogue,
    sparse_pooled_branch,
    topdown_epilogue,
    topdown_epilogue_inference,
)
from aim_ext.ops.masked_merge import memory_format

TOPDOWN_WIDTH = 256
# Inference composes T_l's two convolutions below this many input channels: one 3x3 conv with the
# product weights costs 9 C multiply-adds per output channel and position, the two C + 2304 (9 * 256).
COMPOSE_BELOW = 288
# Which of a 3x3 conv's three taps along an axis fall inside the image, by a position's class
# (`_tap_classes`: 1 if tap 0 is inside, + 2 if tap 2 is): the only position on the axis (tap 1),
# the last (taps 0, 1), the first (taps 1, 2), an inner one (all three).
_TAPS_INSIDE = ((0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0), (1.0, 1.0, 1.0))


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

    def epilogue_bias(self) -> Tensor | None:
        """A bias (256,) that `convolutions` leaves out and the epilogue ops add; None: none left out."""
        return None

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

    def standard_convolutions(self) -> bool:
        """Whether align and refine are a plain Conv1x1 and Conv3x3 (stride 1, padding 1, zero
        padding), the convolutions `sparse_pooled_branch` and `InferenceFeatureBranch` compute."""
        a, r = self.align, self.refine
        return (
            type(a) is nn.Conv2d
            and type(r) is nn.Conv2d
            and a.kernel_size == (1, 1)
            and r.kernel_size == (3, 3)
            and a.padding == (0, 0)
            and r.padding == (1, 1)
            and r.padding_mode == "zeros"
            and a.stride == r.stride == a.dilation == r.dilation == (1, 1)
            and a.groups == r.groups == 1
        )

    def fuse(self) -> InferenceFeatureBranch:
        """The same branch for inference, sharing no module with this one (timm's
        ``reparameterize_model`` calls this)."""
        return InferenceFeatureBranch(self)


class InferenceFeatureBranch(FeatureBranch):
    """T_l for inference: the same outputs as the `FeatureBranch` it was made from, in fewer launches.

    - Below `COMPOSE_BELOW` input channels the two convolutions are one 3x3 conv with the composed
      weights W'[o, c] = sum_m refine.weight[o, m] align.weight[m, c] (no bias), plus a bias map
      that is exact at the borders: through refine's zero padding, align's bias reaches a position
      only through the taps inside the image. Both come from float64, rounded once to the dtype.
    - From `COMPOSE_BELOW` up, on a channels_last input, the 1x1 align conv is one matrix product
      with its bias on the NHWC rows (no separate bias kernel), viewed back without a copy, then
      the refine conv without its bias: the epilogue ops add it (`epilogue_bias`), so T_l's
      convolutions are two launches.

    The weights are computed once, from the branch's: this module is for evaluation, not training.
    """

    def __init__(self, branch: FeatureBranch) -> None:
        nn.Module.__init__(self)  # the modules are copies of branch's, not new ones
        if not branch.standard_convolutions():
            raise ValueError(f"cannot fuse a feature branch with other convolutions: {branch}")
        self.align, self.refine = copy.deepcopy(branch.align), copy.deepcopy(branch.refine)
        self.norm, self.act = copy.deepcopy(branch.norm), copy.deepcopy(branch.act)
        self.composed = self.align.in_channels < COMPOSE_BELOW
        self._bias_maps: dict[tuple, Tensor] = {}
        if not self.composed:
            return
        f64, like = torch.float64, self.refine.weight
        refine, align = like.detach().to(f64), self.align.weight.detach().to(f64)[:, :, 0, 0]
        weight = torch.einsum("omyx,mc->ocyx", refine, align).to(like.dtype)
        self.register_buffer("composed_weight", weight.contiguous(memory_format=memory_format(like)))
        taps = torch.einsum("omyx,m->oyx", refine, _bias64(self.align))  # align's bias through each tap
        inside = torch.tensor(_TAPS_INSIDE, dtype=f64, device=like.device)
        table = _bias64(self.refine)[:, None, None] + torch.einsum("oyx,ay,bx->oab", taps, inside, inside)
        self.register_buffer("border_bias", table.to(like.dtype))  # (256, row class, column class)

    def convolutions(self, s: Tensor) -> Tensor:
        if self.composed:
            out = F.conv2d(s, self.composed_weight, None, padding=1)
            return out.add_(self._bias_map(out))
        if s.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = s.shape
            rows = s.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels_last is NHWC in memory
            aligned = F.linear(rows, self.align.weight.view(-1, c), self.align.bias)  # one addmm
            s = aligned.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels_last, no copy
        else:
            s = self.align(s)
        return F.conv2d(s, self.refine.weight, None, padding=1)

    def epilogue_bias(self) -> Tensor | None:
        return None if self.composed else self.refine.bias

    def forward(self, s: Tensor) -> Tensor:
        conv, bias = self.convolutions(s), self.epilogue_bias()
        if bias is not None:
            conv = conv + bias.to(conv.dtype)[:, None, None]
        return self.act(self.norm(conv))

    def fuse(self) -> InferenceFeatureBranch:
        """Already the inference form."""
        return self

    def _bias_map(self, out: Tensor) -> Tensor:
        """The composed convolution's bias, (1, 256, H, W) in ``out``'s dtype and layout: each
        position's entry of `border_bias`. Kept per size, device, dtype and layout (on CUDA once
        its stream has computed it: every thread's stream then reads it); while a tracer runs,
        made in the graph; made during a CUDA graph capture (device ops only), not kept."""
        h, w = out.shape[-2:]
        fmt = memory_format(out)
        key = (h, w, out.device, out.dtype, fmt == torch.channels_last)  # torch.save takes no formats
        traced = tracing() or isinstance(out, torch._subclasses.FakeTensor)
        bias = None if traced else self._bias_maps.get(key)
        if bias is None:
            rows, cols = _tap_classes(h, out.device), _tap_classes(w, out.device)
            table = self.border_bias.to(out.dtype)
            bias = table.index_select(1, rows).index_select(2, cols)[None].contiguous(memory_format=fmt)
            if not traced and not (out.is_cuda and torch.cuda.is_current_stream_capturing()):
                if out.is_cuda:  # complete before a call on another stream (another thread's) reads it
                    torch.cuda.current_stream(out.device).synchronize()
                self._bias_maps[key] = bias  # one made in a capture holds values only after a replay
        return bias

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._bias_maps.clear()  # they are made from border_bias
        super()._load_from_state_dict(*args, **kwargs)


def _bias64(conv: nn.Conv2d) -> Tensor:
    """``conv``'s bias in float64, zeros where it has none."""
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    return conv.bias.detach().to(torch.float64)


def _tap_classes(n: int, device: torch.device) -> Tensor:
    """The row of `_TAPS_INSIDE` for each of the ``n`` positions along an axis, made on ``device``
    (no copy from the host, which a CUDA graph capture refuses)."""
    i = torch.arange(n, device=device)
    return (i > 0).long() + 2 * (i < n - 1).long()


class StageOutput(NamedTuple):
    merged: Tensor  # P_l, (N, 256, h, w)
    mask: Tensor  # B_l, (N, 1, h, w), binary
    mask_logits: Tensor  # A_l, (N, 1, h, w)
    features: Tensor | None  # T_l(S_l), before masking; None in evaluation without autograd


class TopDownStage(nn.Module):
    """One top-down stage on backbone stage l."""

    fused_epilogue = True  # run LayerNorm, GELU, Eq. 2-3 and the merge as one op where it applies

    def __init__(self, in_channels: int, width: int = TOPDOWN_WIDTH, *, mask_estimator: bool = True) -> None:
        super().__init__()
        self.features = FeatureBranch(in_channels, width)
        # None: the stage takes the top stage's mask, nearest-upsampled (appendix D.3; AIM does it)
        self.mask_estimator = MaskEstimator(in_channels) if mask_estimator else None

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
        self,
        logits: Tensor,
        branch: Tensor,
        coarse: Tensor | None,
        *,
        temperature: float,
        noise: bool,
        sample: Tensor | None = None,
    ) -> StageOutput:
        """Eq. 2, Eq. 3 and the top-down merge, from A_l = `logits` and `feature_branch`'s output.
        In training with ``noise``, ``sample`` is the logistic noise to add (drawn here if None)."""
        if not self.training or not noise or sample is None:  # a given sample is kept in noisy training
            sample = gumbel_sample(logits, training=self.training, noise=noise)
        coarse = _same_dtype(coarse, branch)
        conv_bias = self.features.epilogue_bias() if self.uses_fused_epilogue() else None
        if self.uses_fused_epilogue() and not self.training and not torch.is_grad_enabled():
            norm = self.features.norm  # evaluation: only the auxiliary heads would read T_l(S_l)
            merged, mask = topdown_epilogue_inference(
                branch, norm.weight, norm.bias, logits, coarse, eps=norm.eps, conv_bias=conv_bias
            )
            return StageOutput(merged, mask, logits, None)
        if conv_bias is not None:  # the training op takes the convolution's output with its bias
            branch = branch + conv_bias.to(branch.dtype)[:, None, None]
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
            return pooled_epilogue(
                branch,
                f.norm.weight,
                f.norm.bias,
                logits,
                weight,
                eps=f.norm.eps,
                conv_bias=f.epilogue_bias(),
            )
        mask = (logits >= 0).to(branch.dtype)
        return masked_pool(branch, mask, weight), mask

    def can_run_sparse(self) -> bool:
        """Whether T_l is the convolutions and epilogue that `sparse_pooled_branch` computes."""
        return self.features.fusable() and self.features.standard_convolutions()


def _same_dtype(coarse: Tensor | None, like: Tensor) -> Tensor | None:
    """Under autocast the stages can differ in dtype; the merge takes the finer stage's."""
    return coarse if coarse is None or coarse.dtype == like.dtype else coarse.to(like.dtype)


def use_fused_epilogue(model: nn.Module, enabled: bool) -> None:
    """Switch every top-down stage of ``model`` between the fused epilogue op and the two-op path."""
    for module in model.modules():
        if isinstance(module, TopDownStage):
            module.fused_epilogue = enabled
