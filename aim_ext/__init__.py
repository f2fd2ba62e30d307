"""aim-ext: inherently interpretable CNN classifiers with AIM (self-supervised top-down masking)."""

from aim_ext import losses, ops
from aim_ext.models import AIM, AIMOutput, create_model, fuse_for_inference, load_model, save_pretrained

__version__ = "0.1.0"
__all__ = [
    "AIM",
    "AIMOutput",
    "__version__",
    "create_model",
    "fuse_for_inference",
    "load_model",
    "losses",
    "ops",
    "save_pretrained",
]
