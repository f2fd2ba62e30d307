"""aim-ext: inherently interpretable CNN classifiers with AIM (self-supervised top-down masking)."""

from aim_ext import losses, ops
from aim_ext.models import AIM, AIMOutput, create_model, fuse_for_inference, load_model, save_pretrained

__version__ = "0.1.0"
__all__ = [
    "AIM",
    "AIMOutput",
    "__version__",
    "create_model",
    "explain_images",
    "fuse_for_inference",
    "load_model",
    "losses",
    "ops",
    "save_pretrained",
]


def __getattr__(name: str):
    """`aim_ext.explain_images`, loaded on first use (it brings matplotlib and captum)."""
    if name == "explain_images":
        from aim_ext.explain.images import explain_images

        return explain_images
    raise AttributeError(f"module 'aim_ext' has no attribute {name!r}")
