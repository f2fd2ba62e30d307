"""The pooled head's ops: a stage's share of mean(P_T), without P_T.

The final head averages P_T, and P_T is a sum of nearest-upsampled masked maps O_l = T_l(S_l) * B_l,
so mean(P_T) = sum over stages l and positions p of w_l(p) O_l(p), with w_l(p) the number of P_T's
positions that position p of stage l reaches through the chain of nearest resizes, over P_T's area
(`pool_weights`). Two evaluation ops compute one stage's term, (N, D), and its mask B_l:

    aim::pooled_epilogue(conv, ...)     from the dense output of T_l's 3x3 convolution: LayerNorm
                                        and GELU only at the active positions
    aim::sparse_pooled_branch(s, ...)   from S_l: T_l's 1x1 align conv only on the active
                                        positions' 3x3 neighbourhoods, its 3x3 refine conv only at
                                        the active positions (both as matrix products on the
                                        gathered positions), then the same

Both have C++ CPU kernels (csrc/pooled_head.cpp), Triton kernels for CUDA whose work follows the
active count kept on the device (aim_ext.ops.pooled_head_triton; `triton_route` says which a call
takes), and the pure PyTorch references below, the dense computation they must equal: the feature
branch on the whole map, the masked map and its weighted sum. During ONNX export they are written
in standard operators:
`pooled_epilogue` as its reference, `sparse_pooled_branch` as `sparse_pooled_branch_graph`, the
same gathers and matrix products as the C++ code (NonZero, Gather, MatMul, ScatterND).

The term is returned in the accumulation type (float32, float64 for float64 input); T_l(S_l) is
rounded to the input's dtype first, as the dense path rounds it.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.ops import pooled_head_triton
from aim_ext.ops.library import impl_library, no_context, refuse_backward, refuse_gradient_inputs
from aim_ext.ops.masked_merge import acc_dtype, memory_format, nearest_resize_adjoint
from aim_ext.ops.topdown_epilogue import LAYER_NORM_EPS, layer_norm_gelu

__all__ = [
    "masked_pool",
    "pool_weights",
    "pooled_epilogue",
    "pooled_epilogue_reference",
    "sparse_pooled_branch",
    "sparse_pooled_branch_graph",
    "sparse_pooled_branch_reference",
    "triton_on_cpu",
    "triton_route",
]


def pool_weights(sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> list[Tensor]:
    """w_l for stages of spatial ``sizes``, top stage first as the merge runs: each (h_l, w_l), in
    float64 on the CPU. The last stage's map is P_T's size; each weight map sums to 1."""
    sizes = [(int(h), int(w)) for h, w in sizes]
    if not sizes:
        raise ValueError("pool_weights: no stage sizes")
    finest = sizes[-1]
    weight = torch.full(finest, 1.0 / (finest[0] * finest[1]), dtype=torch.float64)
    weights = [weight]
    for size in reversed(sizes[:-1]):  # P_{l} = O_l + resize(P_{l+1}): the adjoint walks up the chain
        weight = nearest_resize_adjoint(weight, size)
        weights.append(weight)
    return weights[::-1]


def masked_pool(features: Tensor, mask: Tensor, pool_weight: Tensor) -> Tensor:
    """sum_p w(p) B(p) features(p) per image, (N, C) in the accumulation type."""
    acc = acc_dtype(features)
    return (features.to(acc) * mask.to(acc) * pool_weight.to(acc)).sum(dim=(2, 3))


def pooled_epilogue_reference(
    conv: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    eps: float = LAYER_NORM_EPS,
    conv_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(pooled, mask)``: sum_p w(p) B(p) GELU(LayerNorm_C(conv + conv_bias))(p) per image, and
    B = 1[logits >= 0]."""
    features = layer_norm_gelu(conv, ln_weight, ln_bias, eps, conv_bias)
    mask = (logits >= 0).to(conv.dtype)
    return masked_pool(features, mask, pool_weight), mask.contiguous(memory_format=memory_format(conv))


def sparse_pooled_branch_reference(
    s: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    align_weight: Tensor,
    align_bias: Tensor | None,
    refine_weight: Tensor,
    refine_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float = LAYER_NORM_EPS,
) -> tuple[Tensor, Tensor]:
    """The dense computation: T_l's two convolutions on the whole map, then `pooled_epilogue_reference`."""
    conv = F.conv2d(F.conv2d(s, align_weight, align_bias), refine_weight, refine_bias, padding=1)
    pooled, mask = pooled_epilogue_reference(conv, ln_weight, ln_bias, logits, pool_weight, eps)
    return pooled, mask.contiguous(memory_format=memory_format(s))


def sparse_pooled_branch_graph(
    s: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    align_weight: Tensor,
    align_bias: Tensor | None,
    refine_weight: Tensor,
    refine_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float = LAYER_NORM_EPS,
) -> tuple[Tensor, Tensor]:
    """The sparse branch in plain tensor operations that export to standard ONNX operators, as
    csrc/pooled_head.cpp computes it: the active positions and their neighbourhoods by nonzero, the
    align conv on the needed rows (or, when 8 C < 9 D, the two convolutions composed), the refine
    conv on the gathered 3x3 patches, then LayerNorm, GELU and the weighted sum per image."""
    n, c, h, w = s.shape
    d, hw = align_weight.shape[0], h * w
    positions = n * hw
    rows = s.permute(0, 2, 3, 1).reshape(positions, c)
    active = logits.reshape(positions) >= 0
    active_index = torch.nonzero(active).squeeze(1)
    image, p = active_index // hw, active_index % hw
    offsets = torch.arange(-1, 2, device=s.device)
    yy = (p // w)[:, None, None] + offsets[None, :, None]
    xx = (p % w)[:, None, None] + offsets[None, None, :]
    inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).reshape(-1, 9)
    neighbour = torch.where(inside, (image[:, None, None] * hw + yy * w + xx).reshape(-1, 9), positions)
    acc = acc_dtype(s)
    taps = refine_weight.permute(2, 3, 0, 1).reshape(9, d, d)  # [tap, out, in]
    if 8 * c < 9 * d:
        composed = (taps.to(acc) @ align_weight.reshape(d, c).to(acc)).to(s.dtype)  # [tap, out, c]
        padded = torch.cat([rows, rows.new_zeros(1, c)])
        patches = padded.index_select(0, neighbour.reshape(-1)).reshape(-1, 9 * c)
        refined = patches @ composed.permute(0, 2, 1).reshape(9 * c, d)
        if align_bias is not None:
            refined = refined + (inside.to(acc) @ (taps.to(acc) @ align_bias.to(acc))).to(s.dtype)
    else:
        flags = F.max_pool2d(active.to(s.dtype).reshape(n, 1, h, w), 3, 1, 1).reshape(positions) > 0
        needed = torch.nonzero(flags).squeeze(1)
        aligned = rows.index_select(0, needed) @ align_weight.reshape(d, c).t()
        if align_bias is not None:
            aligned = aligned + align_bias
        aligned = torch.cat([aligned, aligned.new_zeros(1, d)])
        count = needed.shape[0]
        row_of = torch.full((positions + 1,), count, dtype=torch.long, device=s.device)
        row_of = row_of.index_put((needed,), torch.arange(count, device=s.device))
        patches = aligned.index_select(0, row_of.index_select(0, neighbour.reshape(-1))).reshape(-1, 9 * d)
        refined = patches @ taps.permute(1, 0, 2).reshape(d, 9 * d).t()
    if refine_bias is not None:
        refined = refined + refine_bias
    features = F.gelu(F.layer_norm(refined.to(acc), (d,), ln_weight.to(acc), ln_bias.to(acc), eps))
    terms = features.to(s.dtype).to(acc) * pool_weight.reshape(hw).to(acc).index_select(0, p)[:, None]
    pooled = torch.zeros(n, d, dtype=acc, device=s.device).index_add(0, image, terms)
    mask = active.to(s.dtype).reshape(n, 1, h, w).contiguous(memory_format=memory_format(s))
    return pooled, mask


# ---------------------------------------------------------------------------------------------
# Which kernels a call runs: the Triton kernels on CUDA (aim_ext.ops.pooled_head_triton), the C++
# kernels on the CPU; on CPU tensors the Triton route only where a test asks for it.

_route = threading.local()
_warned: set[str] = set()


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Within this block the pooled head's ops take the CUDA route on CPU tensors too: the same
    Triton kernels, run by Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
    For tests: it is how the GPU's route is executed without a GPU, not a fast path."""
    if not (pooled_head_triton.HAVE_TRITON and pooled_head_triton.INTERPRETED):
        raise RuntimeError(
            "triton_on_cpu needs Triton with its interpreter: install triton and set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    _route.cpu = True
    try:
        yield
    finally:
        _route.cpu = False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_route(x: Tensor, width: int) -> bool:
    """Whether a pooled-head op on ``x`` with ``width`` output channels runs the Triton kernels:
    on CUDA wherever Triton is installed and the kernels take the dtype, width and size (else the
    dense reference, with a one-time warning per reason); on the CPU only inside `triton_on_cpu`."""
    if x.device.type == "cpu":
        return bool(getattr(_route, "cpu", False))
    if x.device.type != "cuda":
        return False
    if not pooled_head_triton.HAVE_TRITON:
        _warn_once(
            "triton",
            "aim_ext: Triton is not installed (a CPU-only or source build of torch): the pooled head's "
            "ops run their dense PyTorch references on CUDA; the sparse branch saves no work",
        )
        return False
    reason = pooled_head_triton.unsupported(x, width)
    if reason is not None:
        message = f"aim_ext: {reason}; the pooled head runs its dense PyTorch reference"
        _warn_once(reason.split(" (")[0], message)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The ops' Python kernels: the fallback without the compiled extension, and fake kernels.


def _pooled_epilogue_fallback(conv, ln_weight, ln_bias, logits, pool_weight, eps, conv_bias=None):
    with torch.no_grad():
        return pooled_epilogue_reference(conv, ln_weight, ln_bias, logits, pool_weight, eps, conv_bias)


def _sparse_fallback(s, logits, pool_weight, aw, ab, rw, rb, ln_weight, ln_bias, eps, capacity):
    if capacity is not None:
        active = (logits >= 0).to(torch.float32)
        gathered = int((F.max_pool2d(active, 3, 1, 1) > 0).sum())
        if gathered > capacity:
            raise RuntimeError(
                f"sparse_pooled_branch: the active positions and their 3x3 neighbourhoods are {gathered} "
                f"positions, more than capacity={capacity}"
            )
    with torch.no_grad():
        return sparse_pooled_branch_reference(s, logits, pool_weight, aw, ab, rw, rb, ln_weight, ln_bias, eps)


def _fake_outputs(x: Tensor, width: int) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    pooled = x.new_empty((n, width), dtype=acc_dtype(x))
    mask = torch.empty((n, 1, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return pooled, mask


def _check_map(x: Tensor, name: str, op: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")


def _pooled_epilogue_fake(conv, ln_weight, ln_bias, logits, pool_weight, eps, conv_bias=None):
    _check_map(conv, "conv", "pooled_epilogue")
    return _fake_outputs(conv, conv.shape[1])


def _sparse_fake(s, logits, pool_weight, aw, ab, rw, rb, ln_weight, ln_bias, eps, capacity):
    _check_map(s, "s", "sparse_pooled_branch")
    return _fake_outputs(s, aw.shape[0])


def _register() -> None:
    lib = impl_library()
    # The compiled CPU and CUDA kernels take precedence over this catch-all.
    lib.impl("pooled_epilogue", _pooled_epilogue_fallback, "CompositeExplicitAutograd")
    lib.impl("sparse_pooled_branch", _sparse_fallback, "CompositeExplicitAutograd")
    torch.library.register_fake("aim::pooled_epilogue", _pooled_epilogue_fake, lib=lib)
    torch.library.register_fake("aim::sparse_pooled_branch", _sparse_fake, lib=lib)
    for name in ("pooled_epilogue", "sparse_pooled_branch"):
        torch.library.register_autograd(
            f"aim::{name}", refuse_backward(name), setup_context=no_context, lib=lib
        )


_register()


def pooled_epilogue(
    conv: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    *,
    eps: float = LAYER_NORM_EPS,
    conv_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A stage's share of mean(P_T), (N, C) in the accumulation type, and its mask B_l (N, 1, H, W),
    from the feature branch's convolution output ``conv`` (N, C, H, W), plus ``conv_bias`` (C,), the
    convolution's bias, where given; ``pool_weight`` (H, W) is the stage's `pool_weights` entry.
    Evaluation only (no noise, no gradients)."""
    refuse_gradient_inputs("pooled_epilogue", conv, ln_weight, ln_bias, logits, conv_bias)
    if torch.onnx.is_in_onnx_export():
        return pooled_epilogue_reference(conv, ln_weight, ln_bias, logits, pool_weight, eps, conv_bias)
    if conv.dim() == 4 and triton_route(conv, conv.shape[1]):
        return torch.ops.aim.pooled_epilogue_triton(
            conv, ln_weight, ln_bias, logits, pool_weight, float(eps), conv_bias
        )
    return torch.ops.aim.pooled_epilogue(conv, ln_weight, ln_bias, logits, pool_weight, float(eps), conv_bias)


def sparse_pooled_branch(
    s: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    align_weight: Tensor,
    align_bias: Tensor | None,
    refine_weight: Tensor,
    refine_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    eps: float = LAYER_NORM_EPS,
    capacity: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`pooled_epilogue`'s result from the stage's input S_l, computing the feature branch T_l only
    where the mask needs it. ``capacity`` bounds the positions gathered (the active ones and their
    3x3 neighbourhoods); on CPU more is an error, on CUDA it must be all N*H*W positions."""
    refuse_gradient_inputs("sparse_pooled_branch", s, logits, align_weight, refine_weight, ln_weight, ln_bias)
    args = (s, logits, pool_weight, align_weight, align_bias, refine_weight, refine_bias, ln_weight, ln_bias)
    if torch.onnx.is_in_onnx_export():
        return sparse_pooled_branch_graph(*args, eps)
    if s.dim() == 4 and triton_route(s, align_weight.shape[0]):
        positions = s.shape[0] * s.shape[2] * s.shape[3]
        if capacity is not None and capacity < positions:
            raise ValueError(
                f"sparse_pooled_branch: on {s.device} the capacity is all N*H*W = {positions} positions (a "
                f"smaller one could not be checked without a host synchronisation), got {capacity}"
            )
        return torch.ops.aim.sparse_pooled_branch_triton(*args, float(eps))
    return torch.ops.aim.sparse_pooled_branch(*args, float(eps), None if capacity is None else int(capacity))
