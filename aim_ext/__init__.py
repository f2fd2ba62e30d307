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


def _explain(self: AIM, images, *, top_k: int = 5, gradcam: bool = False):
    """`aim_ext.explain_images(self, images, ...)`: the logits, the top classes with their names,
    every stage's mask, the merged mask at image resolution and optionally GradCAM on P_T."""
    from aim_ext.explain.images import explain_images

    return explain_images(self, images, top_k=top_k, gradcam=gradcam)


# `model.explain(images)`: the method is attached here, in the facade, because the explain layer
# sits above the models (docs/architecture.md); every AIM model is made after this runs.
AIM.explain = _explain


def __getattr__(name: str):
    """`aim_ext.explain_images`, loaded on first use (it brings matplotlib and captum)."""
    if name == "explain_images":
        from aim_ext.explain.images import explain_images

        return explain_images
    raise AttributeError(f"module 'aim_ext' has no attribute {name!r}")
