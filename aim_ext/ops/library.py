"""The `aim` operator library: the compiled extension, or Python schemas where it is missing.

Two training ops, each with a forward and a backward op, and three evaluation ops:

    aim::masked_merge            Eq. 2-3 and the top-down merge        (aim_ext.ops.masked_merge)
    aim::topdown_epilogue        LayerNorm, GELU, then the same merge   (aim_ext.ops.topdown_epilogue)
                                 (and topdown_epilogue_inference: evaluation, no features written)
    aim::pooled_epilogue         a stage's share of mean(P_T), dense    (aim_ext.ops.pooled_head)
    aim::sparse_pooled_branch    the same from S_l, sparse              (aim_ext.ops.pooled_head)
    aim::mask_estimator          a folded mask estimator end to end     (aim_ext.ops.mask_estimator)

The pooled head's two ops have CPU kernels here; on CUDA the Python functions route to Triton
kernels registered as their own ops (aim_ext.ops.pooled_head_triton).

csrc/masked_merge.cpp, csrc/topdown_epilogue.cpp, csrc/pooled_head.cpp and csrc/mask_estimator.cpp
define the schemas; the
strings below repeat them only for a process without the compiled extension (a test checks that
both agree). The Python
modules next to this one register the reference kernels, fake kernels and autograd formulas on top.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

SCHEMAS = (
    "masked_merge(Tensor feat, Tensor logits, Tensor? coarse, Tensor? noise, "
    "float temperature) -> (Tensor, Tensor)",
    "masked_merge_backward(Tensor grad_out, Tensor? grad_mask, Tensor feat, Tensor logits, "
    "Tensor? noise, float temperature, SymInt[] coarse_size) -> (Tensor, Tensor, Tensor)",
    "topdown_epilogue(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, Tensor? coarse, "
    "Tensor? noise, float temperature, float eps) -> (Tensor, Tensor, Tensor)",
    "topdown_epilogue_inference(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
    "Tensor? coarse, float eps, Tensor? conv_bias=None) -> (Tensor, Tensor)",
    "topdown_epilogue_backward(Tensor grad_out, Tensor? grad_mask, Tensor? grad_features, "
    "Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, Tensor? noise, float temperature, "
    "float eps, SymInt[] coarse_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "pooled_epilogue(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, "
    "Tensor pool_weight, float eps, Tensor? conv_bias=None) -> (Tensor, Tensor)",
    "sparse_pooled_branch(Tensor s, Tensor logits, Tensor pool_weight, Tensor align_weight, "
    "Tensor? align_bias, Tensor refine_weight, Tensor? refine_bias, Tensor ln_weight, "
    "Tensor ln_bias, float eps, int? capacity) -> (Tensor, Tensor)",
    "mask_estimator(Tensor s, Tensor stem_weight, Tensor stem_bias, Tensor[] block_weights, "
    "Tensor[] block_biases, Tensor local_weight, Tensor local_bias, Tensor context_weight, "
    'str algorithm="auto") -> (Tensor, Tensor)',
)


def _load_kernels() -> tuple[ModuleType | None, str]:
    if os.environ.get("AIM_EXT_NO_KERNELS") == "1":
        return None, "disabled by AIM_EXT_NO_KERNELS=1"
    try:
        from aim_ext import _C
    except ImportError as error:
        return None, f"aim_ext._C failed to import: {error}"
    return _C, ""


_C, _LOAD_ERROR = _load_kernels()
# Keeps the Python registrations alive for the life of the process.
PYTHON_LIBRARIES: list[torch.library.Library] = []

if _C is None:
    warnings.warn(
        f"aim_ext: compiled kernels unavailable ({_LOAD_ERROR}); the aim ops run their pure "
        "PyTorch references. Rebuild with `pip install --no-build-isolation .` for the fast kernels.",
        RuntimeWarning,
        stacklevel=2,
    )
    _schema_lib = torch.library.Library("aim", "DEF")
    for schema in SCHEMAS:
        _schema_lib.define(schema)
    PYTHON_LIBRARIES.append(_schema_lib)


def kernels_available() -> dict[str, bool]:
    """Which compiled kernels exist: CPU, CUDA compiled, and CUDA usable right now."""
    cuda_compiled = bool(getattr(_C, "cuda_compiled", 0))
    return {
        "cpu": _C is not None,
        "cuda_compiled": cuda_compiled,
        "cuda": cuda_compiled and torch.cuda.is_available(),
    }


def impl_library() -> torch.library.Library:
    """A fresh IMPL library for `aim`, kept alive with the others."""
    lib = torch.library.Library("aim", "IMPL")
    PYTHON_LIBRARIES.append(lib)
    return lib


def no_context(ctx, inputs, output) -> None:
    pass


def refuse_gradient_inputs(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise, naming ``op``, if autograd would record through an evaluation op's inputs."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is an evaluation op and computes no gradients: run it under torch.no_grad(), or use "
            "the training ops (topdown_epilogue, masked_merge) for gradients"
        )


def refuse_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} is an evaluation op and computes no gradients; the training ops "
            "(masked_merge, topdown_epilogue) do"
        )

    return backward


def refuse_double_backward(name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(f"{name}: double backward (create_graph=True) is not supported")

    return backward
