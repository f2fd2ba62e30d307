"""`fuse_for_inference`: an evaluation-only copy of a model, AIM or vanilla timm, with the same outputs."""

from __future__ import annotations

import copy

from torch import nn

from aim_ext.models.aim import AIM
from aim_ext.models.bottom_up import BottomUpAIM
from aim_ext.models.fusion import fold_for_inference, make_inference_only


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` prepared for inference; ``model`` is left as it is.

    - timm's own re-parameterisations run (``reparameterize_model``), then every BatchNorm that
      follows a convolution is folded into it (ResNet's conv/BN pairs, timm's BatchNormAct2d), in
      float64 and rounded once to the model's dtype: fuse before casting to half precision.
    - An AIM model's mask estimators lose their BatchNorms the same way and compute their logits
      as ``W_h h + W_c mean(h) + b`` instead of a convolution over ``cat[h, mean(h)]``; its feature
      branches become `InferenceFeatureBranch` (the two convolutions composed into one below 288
      input channels, the align conv a matrix product above); evaluation uses the pooled head
      (`AIM.forward_pooled`).
    - The copy is evaluation-only: its parameters require no gradients, ``.train()`` raises, and
      a forward pass asked to record gradients raises.

    Vanilla models get the same treatment, so that AIM/vanilla ratios compare like with like.
    """
    model = copy.deepcopy(model).eval()
    if isinstance(model, AIM | BottomUpAIM):
        return model.fuse()
    return make_inference_only(fold_for_inference(model))
