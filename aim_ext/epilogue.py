"""The epilogue of a top-down stage: everything after the feature branch's 3x3 convolution.

    T_l(S_l) = GELU(LayerNorm_C(conv))                  the end of the feature branch
    B_l      = G(A_l)                                   (Eq. 2) binary Gumbel-softmax
    P_l      = T_l(S_l) * B_l + nearest_resize(P_{l+1}) (Eq. 3 and the top-down merge)

`topdown_epilogue_reference` composes PyTorch's own LayerNorm and exact (erf) GELU with the masked
merge reference; it is the independent check for a fused epilogue kernel, which reads the
convolution output once and writes P_l once (a fused kernel is not built yet: see issue 5).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from aim_ext.ops import masked_merge_reference

# timm's LayerNorm2d default, which the feature branch uses.
LAYER_NORM_EPS = 1e-6


def check_epilogue_inputs(conv: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Raise a ValueError/TypeError naming the problem if the LayerNorm arguments do not fit ``conv``."""
    if conv.dim() != 4:
        raise ValueError(f"topdown_epilogue: conv must be 4-D (N, C, H, W), got shape {tuple(conv.shape)}")
    channels = conv.shape[1]
    for name, t in (("ln_weight", weight), ("ln_bias", bias)):
        if t.shape != (channels,):
            raise ValueError(
                f"topdown_epilogue: {name} must have shape ({channels},) (one value per channel of conv), "
                f"got {tuple(t.shape)}"
            )
        if t.device != conv.device:
            raise ValueError(f"topdown_epilogue: {name} is on {t.device} but conv is on {conv.device}")


def layer_norm_gelu(conv: Tensor, weight: Tensor, bias: Tensor, eps: float = LAYER_NORM_EPS) -> Tensor:
    """GELU(LayerNorm over channels): the feature branch after its convolutions, as timm computes it."""
    check_epilogue_inputs(conv, weight, bias)
    normed = F.layer_norm(conv.permute(0, 2, 3, 1), (conv.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)
    return F.gelu(normed)


def topdown_epilogue_reference(
    conv: Tensor,
    weight: Tensor,
    bias: Tensor,
    logits: Tensor,
    coarse: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    temperature: float = 1.0,
    eps: float = LAYER_NORM_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, mask, features)``: the merged map P_l, the binary mask B_l and T_l(S_l) before masking
    (the auxiliary heads pool it). Differentiable by autograd, straight-through in training."""
    features = layer_norm_gelu(conv, weight, bias, eps)
    out, mask = masked_merge_reference(features, logits, coarse, noise=noise, temperature=temperature)
    return out, mask, features
