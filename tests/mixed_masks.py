"""Test models whose evaluation masks are mixed: at initialisation each mask estimator's bias makes
its mask all 0 or all 1, and comparing such masks between runtimes would prove little."""

from __future__ import annotations

import torch
from torch import nn

import aim_ext


def mixed_mask_model(
    name="resnet18", stop_stage=3, num_classes=10, image_size=(99, 99), seed=0, prepare=None
):
    """A seeded AIM model in evaluation mode, each mask estimator's logits scaled by 20 and centred
    on a calibration batch (other images than the tests use), so masks are about half active.
    ``prepare(model)``, if given, runs before the calibration."""
    torch.manual_seed(seed)
    model = aim_ext.create_model(name, stop_stage=stop_stage, num_classes=num_classes).eval()
    if prepare is not None:
        prepare(model)
    calibration = torch.randn(4, 3, *image_size, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        for index, stage in enumerate(model.stages):
            to_logits = stage.mask_estimator.to_logits
            to_logits.weight.mul_(20)
            to_logits.bias.mul_(20)
            to_logits.bias.sub_(model.forward_topdown(calibration)[index].mask_logits.median())
    return model


def randomise_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, so that folding them is
    tested (a fresh BatchNorm is the identity in evaluation mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model
