"""Attribution maps with captum: GradCAM, Guided GradCAM and Guided Backprop, for vanilla and AIM models.

GradCAM is taken on the map the classifier actually pools (`gradcam_layer`):
- AIM: `model.merged_map`, the merged top-down map P_T at the stop stage's resolution.
- a vanilla timm CNN: the output of the last `feature_info` stage (ConvNeXt `stages.3`, ResNet
  `layer4`), or of a later module that still produces a map of that size before pooling. The
  second case is MobileNetV2/EfficientNet: their last feature stage `blocks.6` is followed by
  `conv_head` and `bn2` (1x1 conv to 1280 channels, BN, ReLU6), so the classifier sees `bn2`.

Guided backprop (captum) overrides the gradient of `nn.ReLU` modules only. Networks with GELU
(ConvNeXt, the AIM top-down pathway) or ReLU6 (MobileNetV2) keep their plain gradient through
those activations, so for a ConvNeXt "guided backprop" is close to the plain input gradient.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from captum.attr import GuidedBackprop, GuidedGradCam, LayerGradCam
from torch import Tensor, nn

from aim_ext.models.masking import MaskingModel

Method = Literal["gradcam", "guided_gradcam", "guided_backprop"]
METHODS: tuple[str, ...] = ("gradcam", "guided_gradcam", "guided_backprop")
ChannelReduce = Literal["abs", "sum"]


def _top_level_name(name: str) -> str:
    return name.split(".", 1)[0]


def gradcam_layer(model: nn.Module, example: Tensor) -> tuple[str, nn.Module]:
    """The (name, module) whose output is the final feature map the classifier pools.

    `example` is a batch of inputs for one probing forward pass of a vanilla model (one image is
    used); AIM needs none and returns `merged_map`.
    """
    if isinstance(model, MaskingModel):
        return "merged_map", model.merged_map
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info or "module" not in info[-1]:
        raise ValueError(
            f"{type(model).__name__} has no timm feature_info list; pass an AIM model or a timm CNN"
        )
    feature_name = info[-1]["module"]
    # feature_info can stop short of what the head sees (MobileNetV2: blocks.6, then conv_head and
    # bn2 at the same resolution). A probe records which top-level modules run after the last stage
    # and still output a map of its size; the last of them is the map that gets pooled.
    watched = {feature_name: model.get_submodule(feature_name)}
    watched.update(dict(model.named_children()))
    ran: list[tuple[str, tuple[int, ...] | None]] = []

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            ran.append((name, tuple(output.shape) if isinstance(output, Tensor) else None))

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in watched.items()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in ran]
    feature_shape = ran[order.index(feature_name)][1]
    chosen = feature_name
    if feature_shape is not None and len(feature_shape) == 4:
        ancestor = _top_level_name(feature_name)
        start = order.index(ancestor, order.index(feature_name)) + 1 if ancestor in order else len(order)
        for name, shape in ran[start:]:
            same_map = shape is not None and len(shape) == 4 and shape[-2:] == feature_shape[-2:]
            # An Identity (ConvNeXt's norm_pre) passes the same tensor: keep the named stage.
            if same_map and not isinstance(watched[name], nn.Identity):
                chosen = name
    return chosen, model.get_submodule(chosen)


def _reduce_channels(maps: Tensor, reduce: ChannelReduce) -> Tensor:
    """(N, C, H, W) input-space attributions -> (N, H, W)."""
    if reduce == "abs":
        return maps.abs().sum(dim=1)
    if reduce == "sum":
        return maps.sum(dim=1)
    raise ValueError(f"channel reduction must be 'abs' or 'sum', got {reduce!r}")


def attribute(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None,
    method: Method,
    *,
    use_predicted: bool = False,
    reduce: ChannelReduce = "abs",
) -> Tensor:
    """Attribution maps (N, H', W') of `method` for the target classes (ground truth by default).

    - "gradcam": ReLU(GradCAM) at the GradCAM layer's resolution (EPG resizes it bilinearly).
    - "guided_gradcam", "guided_backprop": at input resolution; the colour channels are reduced
      by the sum of absolute values (`reduce="abs"`, non-negative: a signed gradient per channel
      says which way to push the colour, its magnitude says whether the pixel matters) or by the
      plain sum (`reduce="sum"`, signed; EPG clamps the negatives).
    `use_predicted=True` attributes the model's predicted classes and ignores `targets`.
    The model must be in eval mode; no hooks stay registered afterwards.
    """
    if model.training:
        raise RuntimeError("attributions need the evaluation model: call model.eval() first")
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {METHODS}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if use_predicted:
        with torch.no_grad():
            targets = model(images).argmax(dim=1)
    elif targets is None:
        raise ValueError("targets are required unless use_predicted=True")
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.numel() != images.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {images.shape[0]} images")

    # A fresh leaf that requires grad: captum then neither warns nor touches the caller's tensor.
    inputs = images.detach().clone().requires_grad_(True)
    if method == "guided_backprop":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            maps = GuidedBackprop(model).attribute(inputs, target=targets)
        return _reduce_channels(maps.detach(), reduce)

    _, layer = gradcam_layer(model, images)
    if method == "gradcam":
        maps = LayerGradCam(model, layer).attribute(inputs, target=targets, relu_attributions=True)
        return maps.detach()[:, 0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        # Bilinear, not captum's default nearest: the same upsampling EPG applies to GradCAM.
        maps = GuidedGradCam(model, layer).attribute(inputs, target=targets, interpolate_mode="bilinear")
    return _reduce_channels(maps.detach(), reduce)
