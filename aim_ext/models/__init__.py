"""AIM models: the top-down masking pathway on timm backbones."""

from aim_ext.models.aim import AIM
from aim_ext.models.bottom_up import BottomUpAIM
from aim_ext.models.checkpoint import architecture, load_checkpoint, load_model_state, load_weights
from aim_ext.models.factory import MASKINGS, create_model, model_data_config
from aim_ext.models.fusion import fold_batch_norms, is_inference_only
from aim_ext.models.heads import ClassifierHead, masked_avg_pool
from aim_ext.models.inference import fuse_for_inference
from aim_ext.models.mask_estimator import (
    ESTIMATOR_MODES,
    InferenceMaskEstimator,
    MaskEstimator,
    set_estimator_algorithm,
)
from aim_ext.models.masking import AIMOutput, MaskingModel
from aim_ext.models.registry import ARCHITECTURES
from aim_ext.models.saved import ModelFileError, load_model, save_pretrained
from aim_ext.models.topdown import (
    FeatureBranch,
    InferenceFeatureBranch,
    StageOutput,
    TopDownStage,
    use_fused_epilogue,
)

__all__ = [
    "ARCHITECTURES",
    "ESTIMATOR_MODES",
    "MASKINGS",
    "AIM",
    "AIMOutput",
    "BottomUpAIM",
    "MaskingModel",
    "ClassifierHead",
    "FeatureBranch",
    "MaskEstimator",
    "ModelFileError",
    "StageOutput",
    "TopDownStage",
    "InferenceFeatureBranch",
    "InferenceMaskEstimator",
    "architecture",
    "create_model",
    "fold_batch_norms",
    "fuse_for_inference",
    "is_inference_only",
    "load_checkpoint",
    "load_model",
    "load_model_state",
    "load_weights",
    "masked_avg_pool",
    "model_data_config",
    "save_pretrained",
    "set_estimator_algorithm",
    "use_fused_epilogue",
]
