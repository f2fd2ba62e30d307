"""Test models whose evaluation masks are mixed: at initialisation each mask estimator's bias makes
its mask all 0 or all 1, and comparing such masks between runtimes would prove little."""

from __future__ import annotations

import torch

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
