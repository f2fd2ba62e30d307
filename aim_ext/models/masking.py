"""What every masking model offers, whichever way it masks: AIM's top-down pathway
(`aim_ext.models.aim`) or bottom-up masking inside the backbone (`aim_ext.models.bottom_up`).

Training, evaluation, export and the figures use this interface alone:

- ``backbone`` (timm's ``features_only`` model), ``backbone_name``, ``stop_stage`` (the lowest
  masked feature level), ``stage_indices`` (the masked levels, top first), ``num_classes``;
- ``forward``: an `AIMOutput` in training mode, the logits in evaluation mode;
- ``predict(x)``: the evaluation logits and the binary masks (N, 1, h_l, w_l), top first;
  ``predict(x, merged_map=True)`` also the map the classifier pools;
- ``merged_map``: the identity module that map passes through (GradCAM hooks it);
- ``set_gumbel``, ``set_aux_heads``, ``mask_estimator_modules``, ``architecture_options``.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from aim_ext.ops import logistic_noise


class AIMOutput(NamedTuple):
    """What a masking model returns in training mode; every list is ordered top stage first."""

    logits: Tensor  # f_final(P_T), (N, classes)
    aux_logits: list[Tensor]  # f_l(O_l) per stage (none where the model has no auxiliary heads)
    masks: list[Tensor]  # B_l, (N, 1, h_l, w_l), binary, straight-through differentiable
    mask_logits: list[Tensor]  # A_l, (N, 1, h_l, w_l)
    # How many of the masks (top first) a mask estimator made, the ones the active-area loss
    # holds to tau; None: all. With one estimator (appendix D.3) the lower stages' masks are the
    # top stage's, upsampled: counting each copy would weigh the one mask once per stage.
    estimated: int | None = None


class MaskingModel(nn.Module):
    """The base of AIM and BottomUpAIM: the timm backbone, the Gumbel settings and the interface above."""

    temperature: float = 1.0
    gumbel_noise: bool = True

    def set_gumbel(self, *, temperature: float | None = None, noise: bool | None = None) -> None:
        """Set the Gumbel temperature and whether training draws noise (evaluation never does)."""
        if temperature is not None:
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            self.temperature = float(temperature)
        if noise is not None:
            self.gumbel_noise = bool(noise)

    def attach_backbone(
        self,
        backbone: str,
        stop_stage: object,
        *,
        pretrained: bool,
        drop_path_rate: float | None,
        kwargs: dict,
    ) -> list[int]:
        """Build timm's ``features_only`` model of ``backbone`` (`feature_backbone`) as
        ``self.backbone`` and record what the model needs of it: its name, the layout of its maps,
        the timm keywords that shape it (a saved model records them) and its ``pretrained_cfg``.
        Returns every level's channels."""
        self.backbone, channels = feature_backbone(
            backbone, stop_stage, pretrained=pretrained, drop_path_rate=drop_path_rate, kwargs=kwargs
        )
        self.backbone_name = backbone
        self.feature_layout = feature_layout(self.backbone)
        self.backbone_kwargs = backbone_architecture(backbone, kwargs)
        self.pretrained_cfg = backbone_cfg(self.backbone, kwargs)
        self.default_cfg = self.pretrained_cfg
        return channels

    def backbone_options(self) -> dict:
        """The timm keywords of the backbone, as `architecture_options` reports them (none: {})."""
        return {"backbone_kwargs": self.backbone_kwargs} if self.backbone_kwargs else {}

    def nchw(self, feature: Tensor) -> Tensor:
        """A map the backbone handed over, as (N, C, H, W) (`as_nchw`)."""
        return as_nchw(feature, self.feature_layout, self.backbone_name)

    def set_aux_heads(self, on: bool) -> None:
        """Whether training computes the auxiliary heads f_l (a model without them ignores this)."""

    def mask_estimator_modules(self) -> list[nn.Module]:
        """The mask estimators M_l, top stage first (one per estimator, not per masked stage)."""
        raise NotImplementedError

    def architecture_options(self) -> dict:
        """The constructor options that change the architecture away from the paper's AIM, for
        saved models and checkpoints to rebuild it (empty for the paper's)."""
        raise NotImplementedError


def gumbel_sample(logits: Tensor, *, training: bool, noise: bool) -> Tensor | None:
    """What the binary Gumbel (Eq. 2) adds to the mask logits: nothing in evaluation (the
    deterministic mask 1[A >= 0]); in training, float32 logistic noise, or zeros with the noise
    off (the estimator still trains through the straight-through gradient)."""
    if not training:
        return None
    return logistic_noise(logits) if noise else torch.zeros_like(logits, dtype=torch.float32)


def feature_backbone(
    backbone: str, stop_stage: object, *, pretrained: bool, drop_path_rate: float | None, kwargs: dict
) -> tuple[nn.Module, list[int]]:
    """timm's ``features_only`` backbone returning the levels stop_stage..top (the finer ones are
    not kept alive through the forward pass), and every level's channels. The levels come from a
    weightless copy; a stop stage that is not a level, or out_indices in ``kwargs``, is a clear
    error, and so is a model timm cannot build as a feature extractor."""
    kwargs = dict(kwargs)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if "out_indices" in kwargs:
        raise ValueError("AIM chooses the backbone's out_indices (stop_stage..top); do not pass out_indices")
    info = feature_info(backbone, kwargs)
    channels, levels = info.channels(), info.out_indices
    check_stop_stage(backbone, stop_stage, channels)
    model = timm.create_model(
        backbone, pretrained=pretrained, features_only=True, out_indices=tuple(levels[stop_stage:]), **kwargs
    )
    return model, channels


def feature_info(backbone: str, kwargs: dict):
    """timm's feature_info of ``backbone``'s features_only model, from a weightless copy on the meta
    device (one on the CPU for a model that cannot be built there)."""
    try:
        try:
            with torch.device("meta"):
                return timm.create_model(backbone, features_only=True, **kwargs).feature_info
        except (RuntimeError, NotImplementedError):
            return timm.create_model(backbone, features_only=True, **kwargs).feature_info
    except RuntimeError as error:
        if "features_only" in str(error):  # timm: "features_only not implemented for ..."
            raise ValueError(
                f"{backbone} cannot be an AIM backbone: timm builds no features_only model of it"
            ) from None
        raise


# timm keywords that say where weights come from or how training regularises, not what the
# architecture is: a saved model does not record them.
NOT_ARCHITECTURE = (
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_strict",
    "checkpoint_path",
    "cache_dir",
    "drop_rate",
    "drop_path_rate",
    "drop_block_rate",
    "attn_drop_rate",
    "proj_drop_rate",
)


def backbone_architecture(backbone: str, kwargs: dict) -> dict:
    """The timm keywords of ``kwargs`` that shape the backbone (``img_size``, ``depths``, ...),
    which a saved model records to be built again; tuples become lists, as JSON keeps them. A
    value JSON cannot hold is refused in one line."""

    def plain(key: str, value):
        if isinstance(value, (tuple, list)):
            return [plain(key, v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(key, v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(
            f"{backbone}: the timm keyword {key}={value!r} cannot be saved with the model "
            "(numbers, strings, lists and dicts of them can)"
        )

    return {k: plain(k, v) for k, v in sorted(kwargs.items()) if k not in NOT_ARCHITECTURE}


def backbone_cfg(backbone: nn.Module, kwargs: dict) -> dict:
    """The backbone's timm ``pretrained_cfg``, with the input size ``img_size`` in ``kwargs`` sets
    (timm keeps the pretrained weights' size there)."""
    cfg = dict(backbone.pretrained_cfg)
    size = kwargs.get("img_size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (3, int(height), int(width))
    return cfg


def timm_keywords(saved: dict) -> dict:
    """`backbone_architecture` read back: lists become tuples, as timm's own configs write them."""

    def tupled(value):
        if isinstance(value, list):
            return tuple(tupled(v) for v in value)
        if isinstance(value, dict):
            return {k: tupled(v) for k, v in value.items()}
        return value

    return {k: tupled(v) for k, v in saved.items()}


def feature_layout(backbone: nn.Module) -> str:
    """How timm's features_only model hands over its feature maps: "NCHW", or "NHWC" (Swin,
    MambaOut, Sequencer: timm's ``output_fmt``)."""
    fmt = getattr(backbone, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


def as_nchw(feature: Tensor, layout: str, backbone: str) -> Tensor:
    """A feature map (N, C, H, W) from the backbone's ``layout``: an NHWC map becomes a permuted
    view (channels_last strides, no copy). A map that is not spatial is refused in one line."""
    if feature.dim() != 4:
        raise ValueError(
            f"{backbone} cannot be an AIM backbone: its features are not spatial maps "
            f"(a feature of shape {tuple(feature.shape)}, where AIM masks (N, C, H, W) maps)"
        )
    return feature.permute(0, 3, 1, 2) if layout == "NHWC" else feature


def from_nchw(feature: Tensor, layout: str) -> Tensor:
    """`as_nchw` undone: the map back in the backbone's layout, for its next module."""
    return feature.permute(0, 2, 3, 1) if layout == "NHWC" else feature


def check_stop_stage(backbone: str, stop_stage: object, channels: list[int]) -> None:
    """A clear error for a stop stage that is not one of the backbone's feature levels."""
    top = len(channels) - 1
    if isinstance(stop_stage, bool) or not isinstance(stop_stage, int) or not 0 <= stop_stage <= top:
        raise ValueError(
            f"{backbone} has feature stages 0..{top} (channels {channels}); "
            f"stop_stage={stop_stage!r} is not one of them"
        )
