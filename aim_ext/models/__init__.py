"""AIM models: the top-down masking pathway on timm backbones."""

from aim_ext.models.aim import AIM, AIMOutput
from aim_ext.models.factory import create_model
from aim_ext.models.heads import ClassifierHead, masked_avg_pool
from aim_ext.models.mask_estimator import MaskEstimator
from aim_ext.models.topdown import FeatureBranch, StageOutput, TopDownStage, use_fused_epilogue

__all__ = [
    "AIM",
    "AIMOutput",
    "ClassifierHead",
    "FeatureBranch",
    "MaskEstimator",
    "StageOutput",
    "TopDownStage",
    "create_model",
    "masked_avg_pool",
    "use_fused_epilogue",
]
