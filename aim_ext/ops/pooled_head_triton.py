"""The pooled head's GPU kernels: work that follows the active count, with the count kept on the device.

Two ops, for the CUDA evaluation path (`aim_ext.ops.pooled_head` routes CUDA tensors here):

    aim::sparse_pooled_branch_triton(s, ...)   T_l from S_l at the active positions only, then
                                               LayerNorm, GELU and the weighted sum per image
    aim::pooled_epilogue_triton(conv, ...)     the same from the dense convolution output

How the sparse branch runs, without the host ever reading a count:

1. Compaction (`compact`): a cumulative sum over the flags gives each set position its slot in an
   index list, in ascending order, and the count (the last partial sum) stays in device memory.
   Active positions give the refine rows; their 3x3 neighbourhoods (a 3x3 max-pool of the mask)
   the align rows. The per-image ranges of the active list (`image_ranges`) are prefix sums too.
2. `_align_kernel`: the 1x1 align conv on the neighbourhood rows only, written into a dense
   (N*H*W, D) buffer at each row's own position. Rows outside the neighbourhoods are never
   written and never read, so the buffer is not zeroed.
3. `_refine_pool_kernel`: the 3x3 refine conv as an implicit GEMM over K = 9 x D on the active
   rows of one image per program (a tap outside the image reads zeros, refine's zero padding),
   then, on the output tile: bias, rounding to the input dtype (as the dense convolution writes
   it), LayerNorm over the D channels, exact GELU, rounding, the pool weight w(p), and the tile's
   sum (D,) into its own slot of a partial-sum buffer. When 8 C < 9 D the two convolutions are
   one (`_composed_taps`): the same kernel reads S_l with the product weights, align's bias
   entering through the taps inside the image.
4. `_reduce_kernel`: each image's partial sums in tile order. No float atomics: every run and
   every CUDA-graph replay gives the same bits.

Every grid is sized for the capacity (every position), so a CUDA graph can capture it; each
program loads its live count first and returns before any other load when its rows lie past it.
`aim::pooled_epilogue_triton` is steps 1, 3 (reading the convolution output at the active
positions instead of a GEMM) and 4.

On CUDA the ops are `torch.library.triton_op`s, so torch.compile and AOTInductor see the kernels
themselves. On CPU tensors (tests, with TRITON_INTERPRET=1 set before triton is imported) the
same kernels run under Triton's interpreter, behind an opaque op so that tracing never runs them
on fake tensors. Which route a call takes: `aim_ext.ops.pooled_head.triton_route`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_ext.ops.masked_merge import memory_format

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_LIMIT = 2**31  # the kernels index with int32
MAX_WIDTH = 256  # AIM's top-down width; wider tiles spill registers (benchmarks/triton_resources.py)
REDUCE_BLOCK = 64  # channels per program of the per-image reduction

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        """float32 ``v`` rounded to ``dtype`` (to nearest, ties to even), as float32. bfloat16 by
        its bits, on the GPU as under Triton's interpreter (whose own conversion truncates); a NaN
        passes as it is (a GPU's 0x7FFFFFFF would carry into the sign bit)."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return tl.where(v == v, bits.to(tl.float32, bitcast=True), v)
        else:
            return v.to(dtype).to(tl.float32)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, WIDEN: tl.constexpr):
        """a @ b accumulated in float32; IEEE: float32 products in full precision (not TF32).
        WIDEN (half precision under Triton's interpreter, whose dot does not take bfloat16): the
        operands widened to float32 first, which is exact."""
        if WIDEN:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _align_kernel(
        s_ptr, s_n, s_c, s_h, s_w,  # S_l and its element strides
        w_ptr,  # (C, D) align weight, transposed
        bias_ptr,  # (D,)
        out_ptr,  # (N*H*W, D) aligned rows, written at each needed position
        index_ptr, count_ptr,  # the needed positions, ascending, and their count
        HW, W, C,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
    ):  # fmt: skip
        first = tl.program_id(0) * BM
        count = tl.load(count_ptr)
        if first >= count:
            return
        rows = first + tl.arange(0, BM)
        live = rows < count
        q = tl.load(index_ptr + rows, mask=live, other=0)
        n, p = q // HW, q % HW
        base = n * s_n + (p // W) * s_h + (p % W) * s_w
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            a = tl.load(
                s_ptr + base[:, None] + k[None, :] * s_c, mask=live[:, None] & (k < C)[None, :], other=0.0
            )
            b = tl.load(w_ptr + k[:, None] * D + cols[None, :], mask=(k < C)[:, None], other=0.0)
            acc += _dot(a, b, IEEE, WIDEN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + q[:, None] * D + cols[None, :], _rounded(acc, dtype).to(dtype), mask=live[:, None])

    @triton.jit
    def _refine_pool_kernel(
        src_ptr, src_n, src_c, src_h, src_w,  # what the rows read: S_l, the aligned rows, or conv
        w_ptr,  # (9, X, D) weight per tap (CONV only)
        tap_bias_ptr,  # (9, D) float32: align's bias through each tap (TAP_BIAS only)
        bias_ptr,  # (D,)
        ln_w_ptr, ln_b_ptr,  # (D,)
        pool_ptr,  # (H*W,) float32: w(p)
        index_ptr, start_ptr, end_ptr,  # the active positions; image n's are [start[n], end[n])
        partial_ptr,  # (N, tiles, D) float32: each tile's sum
        H, W, X, eps, tiles,
        D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        CONV: tl.constexpr, HAS_BIAS: tl.constexpr, TAP_BIAS: tl.constexpr, IEEE: tl.constexpr,
        WIDEN: tl.constexpr,
    ):  # fmt: skip
        n, tile = tl.program_id(0) // tiles, tl.program_id(0) % tiles  # a 1-D grid: no 65535 limit
        start = tl.load(start_ptr + n)
        end = tl.load(end_ptr + n)
        first = start + tile * BM
        if first >= end:
            return
        rows = first + tl.arange(0, BM)
        live = rows < end
        p = tl.load(index_ptr + rows, mask=live, other=0) - n * H * W
        y, x = p // W, p % W
        cols = tl.arange(0, D)
        image = src_ptr + n * src_n
        dtype = src_ptr.dtype.element_ty
        if CONV:
            acc = tl.zeros([BM, D], dtype=tl.float32)
            for tap in tl.static_range(9):
                yy, xx = y + tap // 3 - 1, x + tap % 3 - 1
                inside = live & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                base = yy * src_h + xx * src_w
                for k0 in range(0, X, BK):
                    k = k0 + tl.arange(0, BK)
                    a = tl.load(
                        image + base[:, None] + k[None, :] * src_c,
                        mask=inside[:, None] & (k < X)[None, :],
                        other=0.0,
                    )
                    b = tl.load(
                        w_ptr + (tap * X + k[:, None]) * D + cols[None, :], mask=(k < X)[:, None], other=0.0
                    )
                    acc += _dot(a, b, IEEE, WIDEN)
                if TAP_BIAS:
                    acc += tl.where(inside[:, None], tl.load(tap_bias_ptr + tap * D + cols)[None, :], 0.0)
        else:
            acc = tl.load(
                image + (y * src_h + x * src_w)[:, None] + cols[None, :] * src_c,
                mask=live[:, None],
                other=0.0,
            ).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        v = _rounded(acc, dtype)  # the convolution's output, as the dense path stores it
        mean = tl.sum(v, axis=1) / D
        centred = v - mean[:, None]
        var = tl.sum(centred * centred, axis=1) / D
        norm = centred / tl.sqrt(var + eps)[:, None]
        norm = (
            norm * tl.load(ln_w_ptr + cols).to(tl.float32)[None, :]
            + tl.load(ln_b_ptr + cols).to(tl.float32)[None, :]
        )
        features = _rounded(0.5 * norm * (1.0 + tl.math.erf(norm * 0.7071067811865476)), dtype)
        weight = tl.load(pool_ptr + p, mask=live, other=0.0)
        terms = tl.where(live[:, None], features * weight[:, None], 0.0)
        tl.store(partial_ptr + (n * tiles + tile) * D + cols, tl.sum(terms, axis=0))

    @triton.jit
    def _reduce_kernel(partial_ptr, start_ptr, end_ptr, out_ptr, tiles, D: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr):  # fmt: skip
        n = tl.program_id(0)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        used = (tl.load(end_ptr + n) - tl.load(start_ptr + n) + BM - 1) // BM
        acc = tl.zeros([BD], dtype=tl.float32)
        for t in range(0, used):
            acc += tl.load(partial_ptr + (n * tiles + t) * D + cols)
        tl.store(out_ptr + n * D + cols, acc)


# ---------------------------------------------------------------------------------------------
# Scratch buffers. Tests fill them with a poison value to show that nothing past a count is read.

_scratch = threading.local()


@contextlib.contextmanager
def poisoned_scratch() -> Iterator[None]:
    """Within this block every scratch buffer starts as NaN (floats) or -2**30 (indices)."""
    _scratch.poison = True
    try:
        yield
    finally:
        _scratch.poison = False


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if getattr(_scratch, "poison", False):
        out.fill_(float("nan") if dtype.is_floating_point else -(2**30))
    return out


# ---------------------------------------------------------------------------------------------
# Compaction, on the device.


def compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """The positions where ``flags`` (P,) is set, ascending, as int32 (P,), and their count (1,),
    int32, on the device. Slots past the count are left as they are: nothing reads them."""
    total = flags.shape[0]
    prefix = torch.cumsum(flags, 0, dtype=torch.int32)
    slot = torch.where(flags, prefix - 1, total)  # unset positions land in a spare last slot
    index = _empty((total + 1,), torch.int32, flags.device)
    index.scatter_(0, slot.long(), torch.arange(total, dtype=torch.int32, device=flags.device))
    return index[:total], prefix[total - 1 :]


def image_ranges(active: Tensor) -> tuple[Tensor, Tensor]:
    """Where each image's rows lie in `compact`'s list of ``active`` (N, H*W): start and end, (N,) int32."""
    counts = active.sum(1, dtype=torch.int32)
    end = torch.cumsum(counts, 0, dtype=torch.int32)
    return end - counts, end


def needed_flags(active: Tensor, n: int, h: int, w: int) -> Tensor:
    """The active positions' 3x3 neighbourhoods, (P,) bool: the rows the refine conv reads."""
    dilated = F.max_pool2d(active.reshape(n, 1, h, w).to(torch.float16), 3, 1, 1)
    return dilated.reshape(n * h * w) > 0


# ---------------------------------------------------------------------------------------------
# Launch configurations, one place for the host code and for benchmarks/triton_resources.py,
# which compiles every one of them for sm_90 and checks registers, spills and shared memory.

ALIGN_ROWS = 64


def align_config(d: int) -> dict:
    """_align_kernel's tile: 64 rows by up to 128 of the D output channels, K in steps of 32."""
    return {"BM": ALIGN_ROWS, "BN": min(d, 128), "BK": 32, "num_warps": 8}


def refine_config(hw: int, dtype: torch.dtype, conv: bool = True) -> dict:
    """_refine_pool_kernel's tile of one image's active rows (all D channels, for the LayerNorm):
    16 rows for maps under 128 positions (a 7x7 map at 25% holds a dozen), else 64 (a 14x14 map
    at 25%, 49 rows, fills 77% of one tile); 32 where 64 spilled registers for sm_90
    (benchmarks/triton_resources.py): float32's IEEE products, and the epilogue alone (conv
    False), which holds the whole loaded tile and its float32 copy."""
    if hw < 128:
        return {"BM": 16, "BK": 32, "num_warps": 4}
    return {"BM": 64 if conv and dtype != torch.float32 else 32, "BK": 32, "num_warps": 8}


def reduce_config(d: int) -> dict:
    return {"BD": min(REDUCE_BLOCK, d), "num_warps": 2}


def dot_options(dtype: torch.dtype) -> dict:
    """float32 inputs multiply in IEEE float32, not TF32 (float32 results to float32's rounding,
    whatever torch.backends' TF32 switches say); half precision on tensor cores, widened under the
    interpreter (`_dot`)."""
    return {"IEEE": dtype == torch.float32, "WIDEN": INTERPRETED and dtype != torch.float32}


def unsupported(x: Tensor, width: int) -> str | None:
    """Why the kernels cannot take input ``x`` (N, C, H, W) at ``width`` output channels, or None."""
    if x.dtype not in DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype}"
    if not (16 <= width <= MAX_WIDTH) or width & (width - 1):
        return f"the Triton kernels need a power-of-two width from 16 to {MAX_WIDTH}, got {width}"
    n, c, h, w = x.shape
    # The farthest element an index reaches: the input's (its strides, a view's included) and the
    # (N*H*W, max(C, D)) rows of the scratch buffers.
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
    largest = max(span, n * h * w * max(width, c))
    if largest >= INDEX_LIMIT:
        return (
            f"the map is too large for the Triton kernels' 32-bit indexing ({largest} elements >= 2**31): "
            "split the batch"
        )
    return None


def check_supported(x: Tensor, width: int, op: str) -> None:
    """Refuse, in one line naming the problem, what the kernels cannot take."""
    reason = unsupported(x, width)
    if reason is not None:
        raise ValueError(f"{op}: {reason}")


def _check_like(t: Tensor | None, shape: tuple[int, ...], name: str, x: Tensor, op: str) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}")


def check_inputs(x: Tensor, logits: Tensor, pool_weight: Tensor, width: int, op: str, **vectors) -> None:
    """The shapes, dtypes and devices the kernels read, each refused in one line naming it."""
    if x.dim() != 4:
        raise ValueError(f"{op}: the input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    _check_like(logits, (n, 1, h, w), "logits (N, 1, H, W)", x, op)
    _check_like(pool_weight, (h, w), "pool_weight (H, W)", x, op)
    for name, vector in vectors.items():
        _check_like(vector, (width,), name, x, op)
    check_supported(x, width, op)


# ---------------------------------------------------------------------------------------------
# The host side, one function per op; ``launch`` is wrap_triton on CUDA, identity when interpreted.


def _composed_taps(
    align_weight: Tensor, align_bias: Tensor | None, refine_weight: Tensor, dtype: torch.dtype
):
    """refine(align(.)) as one 3x3 conv: the weight per tap (9, C, D) in ``dtype`` and align's
    bias through each tap (9, D) in float32, both from float64 products (no autocast, no TF32),
    rounded once."""
    d, c = align_weight.shape[:2]
    with torch.autocast(align_weight.device.type, enabled=False):
        taps = refine_weight.double().permute(2, 3, 0, 1).reshape(9, d, d)  # [tap, out, in]
        weight = (taps @ align_weight.double().reshape(d, c)).transpose(1, 2).to(dtype).contiguous()
        tap_bias = None if align_bias is None else (taps @ align_bias.double()).float().contiguous()
    return weight, tap_bias


def _pool_active(
    launch: Callable,
    source: Tensor,
    strides: tuple[int, ...],
    taps: Tensor | None,
    tap_bias: Tensor | None,
    bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    pool_weight: Tensor,
    active: Tensor,
) -> Tensor:
    """Steps 3 and 4: each image's sum over its ``active`` (N, 1, H, W) positions of w(p)
    GELU(LayerNorm(row)), (N, D) float32, the rows computed from ``source`` by the 3x3 ``taps``
    (or read from it, taps None)."""
    n, _, h, w = active.shape
    d, device, hw = ln_weight.shape[0], source.device, h * w
    index, _ = compact(active.reshape(n * hw))
    start, end = image_ranges(active.reshape(n, hw))
    config = refine_config(hw, source.dtype, conv=taps is not None)
    bm = config["BM"]
    tiles = triton.cdiv(hw, bm)
    partial = _empty((n, tiles, d), torch.float32, device)
    dummy = ln_weight
    x = taps.shape[1] if taps is not None else d
    launch(_refine_pool_kernel)[(n * tiles,)](
        source, *strides,
        dummy if taps is None else taps,
        dummy if tap_bias is None else tap_bias,
        dummy if bias is None else bias.to(source.dtype).contiguous(),
        ln_weight.contiguous(), ln_bias.contiguous(),
        pool_weight.reshape(hw).to(torch.float32).contiguous(),
        index, start, end, partial,
        h, w, x, float(eps), tiles,
        D=d, CONV=taps is not None, HAS_BIAS=bias is not None, TAP_BIAS=tap_bias is not None,
        **dot_options(source.dtype), **config,
    )  # fmt: skip
    pooled = torch.empty((n, d), dtype=torch.float32, device=device)
    reduce = reduce_config(d)
    launch(_reduce_kernel)[(n, d // reduce["BD"])](partial, start, end, pooled, tiles, D=d, BM=bm, **reduce)
    return pooled


def _mask(logits: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    active = logits >= 0
    mask = active.to(like.dtype).contiguous(memory_format=memory_format(like))
    return active, mask


def sparse_branch(
    launch: Callable,
    s: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    align_weight: Tensor,
    align_bias: Tensor | None,
    refine_weight: Tensor,
    refine_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """aim::sparse_pooled_branch_triton's body."""
    op = "sparse_pooled_branch"
    d = align_weight.shape[0]
    check_inputs(s, logits, pool_weight, d, op, align_bias=align_bias, refine_bias=refine_bias,
                 ln_weight=ln_weight, ln_bias=ln_bias)  # fmt: skip
    n, c, h, w = s.shape
    if tuple(align_weight.shape) != (d, c, 1, 1) or tuple(refine_weight.shape) != (d, d, 3, 3):
        raise ValueError(
            f"{op}: align_weight must have shape (D, {c}, 1, 1) and refine_weight (D, D, 3, 3), got "
            f"{tuple(align_weight.shape)} and {tuple(refine_weight.shape)}"
        )
    for t in (align_weight, refine_weight):
        if t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"{op}: the conv weights must be {s.dtype} on {s.device} like s, got {t.dtype} on {t.device}"
            )
    active, mask = _mask(logits, s)
    if n * h * w == 0:
        return torch.zeros((n, d), dtype=torch.float32, device=s.device), mask
    s_strides = tuple(s.stride())
    if 8 * c < 9 * d:
        taps, tap_bias = _composed_taps(align_weight, align_bias, refine_weight, s.dtype)
        source, strides = s, s_strides
    else:
        needed, count = compact(needed_flags(active, n, h, w))
        aligned = _empty((n * h * w, d), s.dtype, s.device)
        config = align_config(d)
        launch(_align_kernel)[(triton.cdiv(n * h * w, config["BM"]), d // config["BN"])](
            s, *s_strides,
            align_weight.reshape(d, c).t().contiguous(),
            ln_weight if align_bias is None else align_bias.to(s.dtype).contiguous(),
            aligned, needed, count,
            h * w, w, c,
            D=d, HAS_BIAS=align_bias is not None, **dot_options(s.dtype), **config,
        )  # fmt: skip
        taps = refine_weight.permute(2, 3, 1, 0).reshape(9, d, d).contiguous()  # [tap, in, out]
        tap_bias, source, strides = None, aligned, (h * w * d, 1, w * d, d)
    norm = (ln_weight, ln_bias, eps)
    pooled = _pool_active(launch, source, strides, taps, tap_bias, refine_bias, *norm, pool_weight, active)
    return pooled, mask


def dense_epilogue(
    launch: Callable,
    conv: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    logits: Tensor,
    pool_weight: Tensor,
    eps: float,
    conv_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """aim::pooled_epilogue_triton's body."""
    check_inputs(conv, logits, pool_weight, conv.shape[1] if conv.dim() == 4 else 0, "pooled_epilogue",
                 conv_bias=conv_bias, ln_weight=ln_weight, ln_bias=ln_bias)  # fmt: skip
    n, d, h, w = conv.shape
    active, mask = _mask(logits, conv)
    if n * h * w == 0:
        return torch.zeros((n, d), dtype=torch.float32, device=conv.device), mask
    norm = (ln_weight, ln_bias, eps)
    strides = tuple(conv.stride())
    pooled = _pool_active(launch, conv, strides, None, None, conv_bias, *norm, pool_weight, active)
    return pooled, mask


def _fake_outputs(x: Tensor, logits: Tensor, width: int) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    pooled = x.new_empty((n, width), dtype=torch.float32)
    mask = torch.empty((n, 1, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return pooled, mask


def _direct(kernel):
    return kernel


SPARSE_SCHEMA = (
    "(Tensor s, Tensor logits, Tensor pool_weight, Tensor align_weight, Tensor? align_bias, "
    "Tensor refine_weight, Tensor? refine_bias, Tensor ln_weight, Tensor ln_bias, float eps) "
    "-> (Tensor, Tensor)"
)
EPILOGUE_SCHEMA = (
    "(Tensor conv, Tensor ln_weight, Tensor ln_bias, Tensor logits, Tensor pool_weight, float eps, "
    "Tensor? conv_bias) -> (Tensor, Tensor)"
)


def _sparse_fake(s, logits, pool_weight, align_weight, *rest):
    return _fake_outputs(s, logits, align_weight.shape[0])


def _epilogue_fake(conv, *rest):
    return _fake_outputs(conv, None, conv.shape[1])


def _define() -> None:
    """The ops: triton_ops (CUDA: the kernels visible to torch.compile and AOTInductor), whose CPU
    route is an opaque op running the same kernels under Triton's interpreter."""
    for name, schema, body, fake in (
        ("sparse_pooled_branch", SPARSE_SCHEMA, sparse_branch, _sparse_fake),
        ("pooled_epilogue", EPILOGUE_SCHEMA, dense_epilogue, _epilogue_fake),
    ):
        interpreted = torch.library.custom_op(
            f"aim::{name}_interpreted", partial(body, _direct), mutates_args=(), schema=schema
        )
        interpreted.register_fake(fake)
        on_device = partial(_on_device, body, interpreted)
        triton_op(f"aim::{name}_triton", on_device, mutates_args=(), schema=schema)
        # torch finds a triton_op's kernels by reading its body's source for wrap_triton(kernel)
        # calls; these are launched through a parameter, so name them, or compile caches would not
        # key on the kernels' source.
        kernels = [_align_kernel, _refine_pool_kernel, _reduce_kernel][name == "pooled_epilogue" :]
        torch._library.triton.triton_ops_to_kernels[f"aim::{name}_triton"] = kernels


def _on_device(body: Callable, interpreted, x: Tensor, *args):
    """A triton_op's body: on CUDA the kernels through wrap_triton (so that tracing records
    them), on CPU tensors the opaque op that runs them under the interpreter."""
    if x.device.type == "cpu":
        return interpreted(x, *args)
    if torch._library.triton.is_wrap_triton_enabled():
        # Traced (the body is also the fake kernel): the compiled code sets the device itself.
        return body(wrap_triton, x, *args)
    # Run on real tensors: Triton launches on the thread's current device, not x's.
    with torch.cuda.device(x.device):
        return body(wrap_triton, x, *args)


if HAVE_TRITON:
    _define()


__all__ = ["HAVE_TRITON", "compact", "image_ranges", "poisoned_scratch", "unsupported"]
