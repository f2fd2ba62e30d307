"""The mask estimator M_l of a top-down stage (paper Eq. 1): A_l = M_l(S_l)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aim_ext.models.concurrency import tracing
from aim_ext.models.fusion import fold_conv_bn
from aim_ext.ops import ESTIMATOR_ALGORITHMS, mask_estimator

MASK_WIDTH = 32
# How an inference estimator computes M_l: one of the op's algorithms, or "modules" (layer by
# layer as modules).
ESTIMATOR_MODES = (*ESTIMATOR_ALGORITHMS, "modules")


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


def edge_emphasis(size: int) -> Tensor:
    """The weighting of a size x size kernel's taps for the edge-emphasised initialisation
    (appendix D.5): 0.5 at the centre rising linearly with the distance from it to 1.5 at the
    corners, so the periphery starts three times as strong as the centre."""
    centre = (size - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(size) - centre, torch.arange(size) - centre, indexing="ij")
    distance = torch.sqrt(ys.double() ** 2 + xs.double() ** 2)
    return 0.5 + distance / distance.max().clamp_min(1e-12)


@torch.no_grad()
def emphasise_edges(estimator: MaskEstimator) -> MaskEstimator:
    """Re-weight every 3x3 kernel of a freshly initialised mask estimator by `edge_emphasis`, each
    kernel then rescaled to its former root-mean-square (the layer's activation scale stays)."""
    for conv in estimator.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            w = conv.weight
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            weighted = w * edge_emphasis(3).to(w)
            w.copy_(
                weighted * rms / weighted.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-30)
            )
    return estimator


class InferenceMaskEstimator(nn.Module):
    """M_l for inference: each block's BatchNorm folded into its second convolution, and the logits
    ``to_logits(cat[h, mean(h)])`` computed as ``W_h h + W_c mean(h) + b`` with no concatenated map.

    Without autograd it runs as the one op `aim_ext.ops.mask_estimator` with `algorithm`: "auto"
    takes the two-launch kernel on CUDA for small maps (the top stage) and ATen's convolutions
    otherwise, in one call with no Python between the layers. While a tracer runs (export,
    compile) and when autograd would record, the layers run as modules, as they do with
    algorithm "modules".
    """

    algorithm = "auto"  # one of ESTIMATOR_MODES; set_estimator_algorithm sets it on a whole model

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
        if self.algorithm == "modules" or tracing() or self._records_gradients(s):
            return self.forward_modules(s)
        return self.forward_op(s, self.algorithm)[0]

    def _records_gradients(self, s: Tensor) -> bool:
        """Whether autograd would record this call (a fused model's parameters require none, so it
        runs the op with gradients enabled too)."""
        return torch.is_grad_enabled() and (
            s.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def forward_modules(self, s: Tensor) -> Tensor:
        """A_l layer by layer, as modules."""
        h = self.blocks(self.act(self.stem(s)))
        context = self.to_logits_context(h.mean(dim=(2, 3)))
        return self.to_logits_local(h) + context[:, :, None, None]

    def forward_op(self, s: Tensor, algorithm: str = "auto") -> tuple[Tensor, Tensor]:
        """``(A_l, B_l)`` from the op `aim_ext.ops.mask_estimator` (no gradients)."""
        if type(self.act) is not nn.GELU or self.act.approximate != "none":
            raise ValueError("the mask estimator op computes the exact GELU; this estimator uses another")
        convs = [conv for block in self.blocks for conv in (block.conv1, block.conv2)]
        return mask_estimator(
            s,
            self.stem.weight,
            self.stem.bias,
            [conv.weight for conv in convs],
            [conv.bias for conv in convs],
            self.to_logits_local.weight,
            self.to_logits_local.bias,
            self.to_logits_context.weight,
            algorithm=algorithm,
        )


class _InferenceBlock(nn.Module):
    """A `ResidualBlock` with its BatchNorm folded into conv2."""

    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.conv1 = copy.deepcopy(block.conv1)
        self.act = copy.deepcopy(block.act)
        self.conv2 = fold_conv_bn(block.conv2, block.norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def set_estimator_algorithm(model: nn.Module, algorithm: str) -> None:
    """How every inference mask estimator of ``model`` computes M_l: one of `ESTIMATOR_MODES`
    (`InferenceMaskEstimator`). The op runs folded estimators only: a model with a training
    `MaskEstimator` is refused; fuse it first (`aim_ext.fuse_for_inference`)."""
    if algorithm not in ESTIMATOR_MODES:
        raise ValueError(f"estimator algorithm must be one of {ESTIMATOR_MODES}, got {algorithm!r}")
    folded = [m for m in model.modules() if isinstance(m, InferenceMaskEstimator)]
    if any(isinstance(m, MaskEstimator) for m in model.modules()) or not folded:
        raise ValueError(
            "the mask estimator op runs folded (inference) estimators, and this model has a training "
            "MaskEstimator with its BatchNorms: fuse it first with aim_ext.fuse_for_inference(model)"
        )
    for m in folded:
        m.algorithm = algorithm
