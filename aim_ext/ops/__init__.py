"""The `aim` ops: the masked merge (Eq. 2-3 and the top-down merge) and the whole top-down
epilogue (LayerNorm, GELU, then the masked merge) of a stage for training, and the pooled head's
dense and sparse ops and the two-launch mask estimator kernel for evaluation; each with compiled CPU and
CUDA kernels and a pure PyTorch reference behind one `torch.ops.aim` op."""

from aim_ext.ops.library import kernels_available
from aim_ext.ops.mask_estimator import ESTIMATOR_ALGORITHMS, mask_estimator, mask_estimator_reference
from aim_ext.ops.masked_merge import (
    logistic_noise,
    masked_merge,
    masked_merge_reference,
    nearest_resize_adjoint,
    nearest_source_indices,
)
from aim_ext.ops.pooled_head import (
    masked_pool,
    pool_weights,
    pooled_epilogue,
    pooled_epilogue_reference,
    sparse_pooled_branch,
    sparse_pooled_branch_graph,
    sparse_pooled_branch_reference,
)
from aim_ext.ops.topdown_epilogue import (
    layer_norm_gelu,
    topdown_epilogue,
    topdown_epilogue_inference,
    topdown_epilogue_reference,
)

__all__ = [
    "ESTIMATOR_ALGORITHMS",
    "kernels_available",
    "layer_norm_gelu",
    "logistic_noise",
    "mask_estimator",
    "mask_estimator_reference",
    "masked_merge",
    "masked_merge_reference",
    "masked_pool",
    "nearest_resize_adjoint",
    "nearest_source_indices",
    "pool_weights",
    "pooled_epilogue",
    "pooled_epilogue_reference",
    "sparse_pooled_branch",
    "sparse_pooled_branch_graph",
    "sparse_pooled_branch_reference",
    "topdown_epilogue",
    "topdown_epilogue_inference",
    "topdown_epilogue_reference",
]
