"""When a stage's feature branch runs sparse: the policy behind `AIM.sparse_inference = "auto"`.

The sparse branch (aim_ext.ops.sparse_pooled_branch) computes T_l's 1x1 align conv on the active
positions' 3x3 neighbourhoods and its 3x3 refine conv at the active positions, as matrix products
on gathered rows; the dense branch runs both convolutions on the whole map. Which one is faster
depends on the active fraction, the map size and the device. The crossovers below were measured
with `benchmarks/sparse_crossover.py` (figures in benchmarks/RESULTS.md):

- CPU (2 cores, float32, batch 1 and 8, ConvNeXt-T's and ResNet-50's stages at 7x7 to 28x28):
  sparse costs 0.2-0.6x of dense at 10-25% active (0.5-0.8x at batch 1) and stays faster up to
  55-80% active. "auto" picks sparse below `CPU_CROSSOVER`, under the lowest crossover measured.
- CUDA: dense, until `benchmarks/sparse_crossover.py --device cuda` has measured a crossover table
  on a GPU. The sparse branch's CUDA kernels (aim_ext.ops.pooled_head_triton) do work that follows
  the active count without reading it on the host, and `sparse_inference = "on"` runs them; whether
  and where they beat cuDNN's dense convolutions is not measured yet, so "auto" does not guess.

The policy reads the active fraction, which on CPU costs nothing; under torch.compile, torch.export
or ONNX export it picks dense, which needs no data-dependent decision.
"""

from __future__ import annotations

from torch import Tensor

from aim_ext.models.concurrency import tracing

SPARSE_MODES = ("auto", "on", "off")
CPU_CROSSOVER = 0.5


def check_sparse_mode(mode: str) -> str:
    if mode not in SPARSE_MODES:
        raise ValueError(f"sparse inference must be one of {', '.join(SPARSE_MODES)}, got {mode!r}")
    return mode


def prefer_sparse(s: Tensor, logits: Tensor) -> bool:
    """The "auto" choice for a stage with input ``s`` and mask logits ``logits``."""
    if s.device.type != "cpu" or tracing():
        return False
    return float((logits >= 0).float().mean()) < CPU_CROSSOVER
