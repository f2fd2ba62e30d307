"""The pooled head's Triton kernels (aim_ext.ops.pooled_head_triton), the route CUDA takes.

Without a GPU they run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1
before triton is imported), inside `triton_on_cpu()`: the same kernels, indexing, masks, early exits
and epilogue as on the GPU, checked against the float64 dense branch. The interpreter is slow, so
the shapes are small except where a case needs a large map or batch. The CUDA cases skip here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mixed_masks import mixed_mask_model
from test_engine import HostReads
from test_pooled_head import _branch_weights

import aim_ext
from aim_ext.ops import pooled_epilogue, sparse_pooled_branch
from aim_ext.ops import pooled_head as pooled_head_module
from aim_ext.ops import pooled_head_triton as kernels
from aim_ext.ops.pooled_head import triton_on_cpu, triton_route
from aim_ext.ops.topdown_epilogue import layer_norm_gelu

INTERPRETER = kernels.HAVE_TRITON and kernels.INTERPRETED
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER,
    reason="needs triton with TRITON_INTERPRET=1 set before it is imported (conftest does it)",
)
needs_cuda = pytest.mark.skipif(
    not (kernels.HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA device and Triton"
)
TOL = {torch.float32: 2e-4, torch.bfloat16: 8e-2, torch.float16: 1e-2}


def _dense64(s, logits, weight, aw, ab, rw, rb, lw, lb):
    """The dense branch in float64 from the same (rounded) inputs: PyTorch's convolutions on the
    whole map, LayerNorm and GELU, the mask, the weighted sum per image."""
    d = [t if t is None else t.double().cpu() for t in (s, aw, ab, rw, rb, lw, lb)]
    conv = F.conv2d(F.conv2d(d[0], d[1], d[2]), d[3], d[4], padding=1)
    features = layer_norm_gelu(conv, d[5], d[6])
    mask = (logits.cpu() >= 0).double()
    return (features * mask * weight.double().cpu()).sum(dim=(2, 3))


def _mask_logits(n, h, w, pattern, g):
    """Logits of a mask: a fraction of random positions, none, all, one isolated position per
    image, or the full border (every position on the first and last rows and columns)."""
    if pattern == "isolated":
        logits = -torch.ones(n, 1, h, w)
        logits[:, 0, h // 2, w // 2] = 1.0
        return logits
    if pattern == "border":
        logits = -torch.ones(n, 1, h, w)
        logits[..., 0, :] = logits[..., -1, :] = logits[..., :, 0] = logits[..., :, -1] = 1.0
        return logits
    return (
        pattern - torch.rand(n, 1, h, w, generator=g)
        if 0 < pattern < 1
        else torch.full((n, 1, h, w), pattern - 0.5)
    )


CASES = [
    # n, c, d, h, w, dtype, channels_last, mask pattern: the align route (8 C >= 9 D) and the
    # composed one (8 C < 9 D), odd channel counts, 1x1 to 13x11 maps, every density kind
    (1, 40, 16, 1, 1, torch.float32, False, 1.0),
    (2, 33, 16, 5, 7, torch.float32, True, 0.3),
    (3, 3, 16, 6, 5, torch.float32, False, 0.5),
    (2, 17, 32, 7, 7, torch.bfloat16, True, "border"),
    (2, 37, 32, 9, 4, torch.bfloat16, False, "isolated"),
    (1, 19, 16, 13, 11, torch.float16, True, 0.25),
    (2, 64, 32, 4, 9, torch.float16, False, 0.0),
    (3, 150, 16, 3, 3, torch.bfloat16, True, 0.7),
    (2, 9, 16, 8, 8, torch.float32, True, 1.0),
]


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[3]}x{c[4]}-d{c[2]}-{c[5]}-{c[7]}")
def test_sparse_kernels_match_the_float64_dense_branch_weights(case):
    n, c, d, h, w, dtype, channels_last, pattern = case
    g = torch.Generator().manual_seed(CASES.index(case))
    s = torch.randn(n, c, h, w, generator=g).to(dtype)
    if channels_last:
        s = s.contiguous(memory_format=torch.channels_last)
    params = _branch_weights(c, d, dtype, "cpu", g, bias=c % 2 == 1 or pattern == 0.3)
    logits = _mask_logits(n, h, w, pattern, g).to(dtype)
    weight = torch.rand(h, w, generator=g)
    with torch.no_grad(), triton_on_cpu():
        pooled, mask = sparse_pooled_branch(s, logits, weight, *params)
    assert pooled.dtype == torch.float32 and pooled.shape == (n, d)
    assert torch.equal(mask, (logits >= 0).to(dtype))
    assert mask.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = _dense64(s, logits, weight, *params)
    torch.testing.assert_close(pooled.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    if pattern == 0.0:
        assert torch.equal(pooled, torch.zeros_like(pooled))
    with torch.no_grad():  # the C++ CPU kernel computes the same thing
        cpu, _ = sparse_pooled_branch(s, logits, weight, *params)
    torch.testing.assert_close(pooled, cpu, rtol=TOL[dtype], atol=TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("n,side", [(256, 1), (1, 56)])
def test_the_largest_batch_and_map(n, side):
    """Batch 256 (one program per image and tile) and a 56x56 map (49 refine tiles of 64 rows)."""
    g = torch.Generator().manual_seed(n + side)
    s = torch.randn(n, 20, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    params = _branch_weights(20, 16, torch.float32, "cpu", g)
    logits = 0.25 - torch.rand(n, 1, side, side, generator=g)
    weight = torch.rand(side, side, generator=g)
    with torch.no_grad(), triton_on_cpu():
        pooled, _ = sparse_pooled_branch(s, logits, weight, *params)
    torch.testing.assert_close(pooled.double(), _dense64(s, logits, weight, *params), rtol=2e-4, atol=2e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_epilogue_kernel_matches_the_reference(dtype, channels_last):
    """aim::pooled_epilogue's CUDA route, with the convolution's bias added as every path adds it:
    conv + bias.to(conv.dtype), the sum rounded to conv's dtype."""
    g = torch.Generator().manual_seed(11)
    conv = torch.randn(3, 32, 6, 9, generator=g).to(dtype)
    if channels_last:
        conv = conv.contiguous(memory_format=torch.channels_last)
    *_, lw, lb = _branch_weights(4, 32, dtype, "cpu", g)
    conv_bias = torch.randn(32, generator=g)  # float32, as a module's under autocast
    logits = (0.4 - torch.rand(3, 1, 6, 9, generator=g)).to(dtype)
    weight = torch.rand(6, 9, generator=g)
    with torch.no_grad(), triton_on_cpu():
        pooled, mask = pooled_epilogue(conv, lw, lb, logits, weight, conv_bias=conv_bias)
    biased = (conv + conv_bias.to(dtype)[:, None, None]).double()
    expected = (
        layer_norm_gelu(biased, lw.double(), lb.double()) * (logits >= 0).double() * weight.double()
    ).sum(dim=(2, 3))
    assert torch.equal(mask, (logits >= 0).to(dtype))
    torch.testing.assert_close(pooled.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    with torch.no_grad():  # the C++ CPU kernel rounds the same way
        cpu, _ = pooled_epilogue(conv, lw, lb, logits, weight, conv_bias=conv_bias)
    torch.testing.assert_close(pooled, cpu, rtol=TOL[dtype] / 4, atol=TOL[dtype] / 4)


@needs_interpreter
@pytest.mark.parametrize("channels", [12, 40])  # the composed route and the align route
def test_nothing_past_a_count_is_read(channels):
    """Every scratch buffer (the index lists, the aligned rows, the partial sums) starts as NaN or
    a wild index: the result is still exact, so nothing past a count or outside the needed rows
    is read. A control run shows the poison would show if it were read."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, channels, 7, 6, generator=g)
    params = _branch_weights(channels, 16, torch.float32, "cpu", g)
    logits = _mask_logits(2, 7, 6, 0.3, g)
    logits[1] = -1  # an image with no active position
    weight = torch.rand(7, 6, generator=g)
    with torch.no_grad(), triton_on_cpu():
        clean, _ = sparse_pooled_branch(s, logits, weight, *params)
        with kernels.poisoned_scratch():
            poisoned, _ = sparse_pooled_branch(s, logits, weight, *params)
            conv = F.conv2d(F.conv2d(s, params[0], params[1]), params[2], params[3], padding=1)
            epilogue, _ = pooled_epilogue(conv, params[4], params[5], logits, weight)
    assert torch.equal(poisoned, clean) and bool(torch.isfinite(poisoned).all())
    assert torch.equal(poisoned[1], torch.zeros(16))
    torch.testing.assert_close(epilogue, clean, rtol=2e-4, atol=2e-4)
    with kernels.poisoned_scratch():  # the control: a read past the count would see the poison
        index, count = kernels.compact((logits >= 0).reshape(-1))
        assert int(count) < index.shape[0] and int(index[int(count)]) == -(2**30)


@needs_interpreter
def test_compaction_keeps_the_counts_on_the_device():
    flags = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    index, count = kernels.compact(flags)
    assert count.shape == (1,) and count.dtype == torch.int32 and int(count) == 5
    assert index[:5].tolist() == [1, 2, 5, 7, 8]
    start, end = kernels.image_ranges(flags.view(2, 5))
    assert start.tolist() == [0, 2] and end.tolist() == [2, 5]


class FailOnHostReads(HostReads):
    """Fails on the first op that reads a tensor's values back to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            raise AssertionError(f"{func} reads a value back to the host")
        return func(*args, **(kwargs or {}))


@needs_interpreter
@pytest.mark.parametrize("name,stop_stage", [("resnet18", 3), ("convnext_atto", 1)])
def test_the_cuda_route_of_a_fused_model_reads_nothing_back(name, stop_stage):
    """The whole fused model with sparse branches on the route CUDA takes, under a dispatch mode that
    fails on any op reading a value (`_local_scalar_dense`, `nonzero`, ...): the logits equal the
    C++ CPU route's."""
    model = mixed_mask_model(name, stop_stage, image_size=(64, 64))
    fused = aim_ext.fuse_for_inference(model)
    fused.sparse_inference = "on"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected, expected_masks = fused.predict(x)
        with triton_on_cpu(), FailOnHostReads():
            logits, masks = fused.predict(x)
    assert fused.branches_used == ["sparse"] * len(fused.stages)
    assert any(0 < float(m.mean()) < 1 for m in masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected_masks, strict=True))


def _small_case(seed: int):
    """S_l (2, 20, 5, 4), the branch's weights at width 16, mask logits and pool weights."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 20, 5, 4, generator=g)
    params = _branch_weights(20, 16, torch.float32, "cpu", g)
    return s, params, torch.randn(2, 1, 5, 4, generator=g), torch.rand(5, 4, generator=g)


@needs_interpreter
def test_opcheck_of_the_triton_ops():
    s, (aw, ab, rw, rb, lw, lb), logits, weight = _small_case(14)
    g = torch.Generator().manual_seed(15)
    torch.library.opcheck(
        torch.ops.aim.sparse_pooled_branch_triton.default, (s, logits, weight, aw, ab, rw, rb, lw, lb, 1e-6)
    )
    torch.library.opcheck(
        torch.ops.aim.sparse_pooled_branch_triton.default,
        (s[:, :5], logits, weight, aw[:, :5], None, rw, None, lw, lb, 1e-6),
    )
    conv = torch.randn(2, 16, 5, 4, generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.aim.pooled_epilogue_triton.default, (conv, lw, lb, logits, weight, 1e-6, rb)
    )


@needs_interpreter
def test_compile_and_export_of_the_fused_sparse_model():
    """torch.compile(fullgraph=True) and torch.export of a fused model on the CUDA route: one graph
    that holds the sparse op, the same logits."""
    model = mixed_mask_model("resnet18", 3, image_size=(64, 64))
    fused = aim_ext.fuse_for_inference(model)
    fused.sparse_inference = "on"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(15))
    graphs = []

    def recording_backend(gm, inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    with torch.no_grad(), triton_on_cpu():
        expected = fused(x)
        got = torch.compile(fused, fullgraph=True, backend=recording_backend)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert len(graphs) == 1 and graphs[0].count("torch.ops.aim.sparse_pooled_branch_triton(") == len(
            fused.stages
        )
        exported = torch.export.export(fused, (x,))
        graph = str(exported.graph)
        assert graph.count("aim.sparse_pooled_branch_triton") == len(fused.stages)
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_bad_input_gets_one_line():
    s, (aw, ab, rw, rb, lw, lb), logits, weight = _small_case(16)
    op = torch.ops.aim.sparse_pooled_branch_triton
    cases = [
        (
            (s, logits[:, :, :4], weight, aw, ab, rw, rb, lw, lb, 1e-6),
            r"logits \(N, 1, H, W\) must have shape \(2, 1, 5, 4\)",
        ),
        (
            (s, (logits > 0), weight, aw, ab, rw, rb, lw, lb, 1e-6),
            "logits .* must be a floating-point tensor",
        ),
        (
            (s, logits, weight.t(), aw, ab, rw, rb, lw, lb, 1e-6),
            r"pool_weight \(H, W\) must have shape \(5, 4\)",
        ),
        ((s.double(), logits, weight, aw, ab, rw, rb, lw, lb, 1e-6), "take float32, float16 or bfloat16"),
        ((s, logits, weight, aw, ab, rw, rb, lw, lb[:8], 1e-6), r"ln_bias must have shape \(16,\)"),
        (
            (s, logits, weight, aw.bfloat16(), ab, rw, rb, lw, lb, 1e-6),
            "the conv weights must be torch.float32",
        ),
        (
            (s, logits, weight, aw[:, :7], ab, rw, rb, lw, lb, 1e-6),
            r"align_weight must have shape \(D, 20, 1, 1\)",
        ),
        (
            (s, logits, weight, aw[:12], ab[:12], rw[:12, :12], rb[:12], lw[:12], lb[:12], 1e-6),
            "power-of-two width",
        ),
        ((s[0], logits, weight, aw, ab, rw, rb, lw, lb, 1e-6), "must be 4-D"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)
    huge = torch.zeros(1, 20, 1, 1).expand(2**17, 20, 64, 64)  # no memory: a view
    with pytest.raises(ValueError, match=r"too large for the Triton kernels' 32-bit indexing"):
        kernels.check_supported(huge, 256, "sparse_pooled_branch")
    with triton_on_cpu(), pytest.raises(ValueError, match=r"the capacity is all N\*H\*W = 40 positions"):
        sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb, capacity=39)


def _on_cuda(dtype=torch.bfloat16, shape=(2, 384, 14, 14), stride=None):
    """What triton_route reads of a CUDA tensor, without one."""
    like = torch.empty(shape, device="meta")
    strides = like.stride() if stride is None else stride
    return types.SimpleNamespace(
        device=torch.device("cuda"), dtype=dtype, shape=like.shape, stride=lambda: strides
    )


def test_route_on_cuda_without_triton_or_for_other_dtypes_warns_once(monkeypatch):
    """Where Triton is missing (a CPU-only or source build of torch), or the kernels do not take the
    dtype, width or size, CUDA calls run the dense references, with one warning each."""
    cuda = _on_cuda()
    monkeypatch.setattr(pooled_head_module, "_warned", set())
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert not triton_route(cuda, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not triton_route(cuda, 256)
    assert caught == []  # once
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    assert triton_route(cuda, 256)
    with pytest.warns(
        RuntimeWarning, match="take float32, float16 or bfloat16, got torch.float64; the pooled"
    ):
        assert not triton_route(_on_cuda(torch.float64), 256)
    with pytest.warns(RuntimeWarning, match="power-of-two width from 16 to 256, got 512"):
        assert not triton_route(cuda, 512)
    huge = _on_cuda(shape=(2**11, 384, 56, 56), stride=(0, 1, 0, 0))  # an expanded view: small span
    with pytest.warns(
        RuntimeWarning, match=r"too large for the Triton kernels' 32-bit indexing \(2466250752"
    ):
        assert not triton_route(huge, 256)
    sliced = _on_cuda(shape=(2, 384, 14, 14), stride=(2**31, 1, 14 * 384, 384))  # a view reaching past 2**31
    assert not triton_route(sliced, 256)  # the same reason: warned once already
    assert not triton_route(torch.zeros(1), 256)  # the CPU takes the C++ kernels unless asked


@needs_interpreter
def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan_and_inf():
    """`_rounded` against torch's own bfloat16 conversion, on random values, ties, and the NaN bit
    pattern a GPU's arithmetic makes (0x7FFFFFFF), which a plain carry would turn into -0."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, kernels._rounded(tl.load(x_ptr + i), tl.bfloat16))

    g = torch.Generator().manual_seed(23)
    special = torch.tensor(
        [0x7FFFFFFF, 0x7FC00000, 0xFFFFFFFF - 2**32, 0x7F800001, 0x3F808000, 0x3F818000], dtype=torch.int32
    )
    x = torch.cat([special.view(torch.float32), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    x = torch.cat([x, torch.randn(64 - x.numel(), generator=g) * 100])
    out = torch.empty_like(x)
    round_kernel[(1,)](x, out, BLOCK=64)
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(out.isnan(), x.isnan())
    assert torch.equal(out[~x.isnan()], expected[~x.isnan()])


@needs_interpreter
def test_strided_parameters_and_views():
    """Parameters that are strided views, and an input that is a channel slice of a wider map, give
    the contiguous copies' result (the kernels read vectors as contiguous: the host makes them so)."""
    g = torch.Generator().manual_seed(24)
    wide = torch.randn(2, 40, 6, 5, generator=g)
    s = wide[:, 4:24]  # a view: strides of the 40-channel map
    aw, ab, rw, rb, lw, lb = _branch_weights(20, 16, torch.float32, "cpu", g)
    strided = [torch.stack([t, t], 1)[:, 0] for t in (ab, rb, lw, lb)]  # stride 2
    logits, weight = 0.4 - torch.rand(2, 1, 6, 5, generator=g), torch.rand(6, 5, generator=g)
    with torch.no_grad(), triton_on_cpu():
        got, _ = sparse_pooled_branch(
            s, logits, weight, aw, strided[0], rw, strided[1], strided[2], strided[3]
        )
        want, _ = sparse_pooled_branch(s.contiguous(), logits, weight, aw, ab, rw, rb, lw, lb)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_ops_name_their_kernels_for_compile_caches():
    """torch keys its compile caches of a triton_op on the kernels it finds for it."""
    from torch._library.triton import get_triton_kernels_for_op

    assert get_triton_kernels_for_op("aim::sparse_pooled_branch_triton") == [
        kernels._align_kernel,
        kernels._refine_pool_kernel,
        kernels._reduce_kernel,
    ]
    assert get_triton_kernels_for_op("aim::pooled_epilogue_triton") == [
        kernels._refine_pool_kernel,
        kernels._reduce_kernel,
    ]


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs triton")
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU the CUDA tests compile the kernels for the card itself"
)
def test_every_launch_compiles_for_sm90_within_its_registers_and_shared_memory(tmp_path):
    """Triton's own compiler and ptxas, without a GPU: every bfloat16 launch the host code makes
    (benchmarks/triton_resources.py) compiles for sm_90, spills no register, and fits a block's
    shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    script = Path(__file__).parents[1] / "benchmarks" / "triton_resources.py"
    result = subprocess.run(
        [sys.executable, str(script), "--dtypes", "bfloat16", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 255 and r["shared"] <= 227 * 1024 for r in rows)


# ---------------------------------------------------------------------------------------------
# On a GPU.


def _cuda_case(dtype=torch.bfloat16, n=4, c=384, side=14, d=256):
    g = torch.Generator().manual_seed(17)
    s = (
        torch.randn(n, c, side, side, generator=g)
        .to("cuda", dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    params = _branch_weights(c, d, dtype, "cuda", g)
    logits = (0.25 - torch.rand(n, 1, side, side, generator=g)).to("cuda", dtype)
    weight = torch.rand(side, side, generator=g).cuda()
    return s, logits, weight, params


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [192, 384])
def test_cuda_kernels_match_the_float64_dense_branch_weights(dtype, c):
    s, logits, weight, params = _cuda_case(dtype, c=c)
    with torch.no_grad():
        pooled, mask = sparse_pooled_branch(s, logits, weight, *params)
    torch.testing.assert_close(
        pooled.double().cpu(), _dense64(s, logits, weight, *params), rtol=TOL[dtype], atol=TOL[dtype]
    )
    assert torch.equal(mask, (logits >= 0).to(dtype))


@needs_cuda
def test_cuda_route_never_waits_for_the_host_and_replays_with_new_masks_bit_for_bit():
    s, logits, weight, params = _cuda_case()
    conv = F.conv2d(F.conv2d(s, params[0], params[1]), params[2], params[3], padding=1)

    def both():
        return sparse_pooled_branch(s, logits, weight, *params), pooled_epilogue(
            conv, *params[4:], logits, weight
        )

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            both()  # compiles the kernels outside the capture
            torch.cuda.set_sync_debug_mode("error")
            try:
                both()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            (sparse, _), (dense, _) = both()
        g = torch.Generator().manual_seed(18)
        for fraction in (0.0, 0.1, 0.5, 1.0):
            logits.copy_((fraction - torch.rand(logits.shape, generator=g)).to(logits))
            graph.replay()
            first = sparse.clone()
            graph.replay()
            assert torch.equal(sparse, first)  # no atomics: the same bits on every replay
            expected = _dense64(s, logits, weight, *params)
            torch.testing.assert_close(sparse.double().cpu(), expected, rtol=8e-2, atol=8e-2)
            torch.testing.assert_close(dense.double().cpu(), expected, rtol=8e-2, atol=8e-2)


@needs_cuda
def test_cuda_policy_auto_is_dense_and_on_runs_the_kernels():
    model = mixed_mask_model("resnet18", 3, image_size=(96, 96))
    fused = aim_ext.fuse_for_inference(model).cuda()
    x = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(19)).cuda()
    with torch.no_grad():
        fused.sparse_inference = "auto"  # dense on CUDA until a crossover is measured there
        fused(x)
        assert fused.branches_used == ["dense", "dense"]
        fused.sparse_inference = "off"
        dense = fused(x)
        fused.sparse_inference = "on"
        sparse = fused(x)
    assert fused.branches_used == ["sparse", "sparse"]
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_aoti_package_carries_the_sparse_kernels(tmp_path):
    """An AOTInductor package of a fused model with sparse branches on CUDA (Inductor compiles the
    triton_op's kernels into it) gives the eager model's logits."""
    from aim_ext.export.aoti_export import export_aoti, run_aoti

    model = mixed_mask_model("resnet18", 3, image_size=(96, 96))
    fused = aim_ext.fuse_for_inference(model).cuda()
    fused.sparse_inference = "on"
    package = export_aoti(fused, tmp_path / "sparse.pt2", image_size=(96, 96), batch_size=2, device="cuda")
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(20)).cuda()
    with torch.no_grad():
        expected = fused(x)
    torch.testing.assert_close(run_aoti(package, x)[0], expected, rtol=1e-4, atol=1e-4)


def test_without_triton_the_package_imports_and_the_cpu_ops_run():
    """A CPU-only or source build of torch has no Triton: the package imports, `info` says so, the
    Triton ops are not defined, and the pooled head runs its C++ CPU kernels."""
    script = """
import importlib.util
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "triton" else find_spec(name, *a)
import torch, aim_ext
from aim_ext.__main__ import info
from aim_ext.ops import pooled_epilogue
assert info()["triton"] is None
assert not hasattr(torch.ops.aim, "sparse_pooled_branch_triton")
conv, logits = torch.randn(1, 16, 3, 3), torch.randn(1, 1, 3, 3)
pooled, mask = pooled_epilogue(conv, torch.ones(16), torch.zeros(16), logits, torch.rand(3, 3))
assert pooled.shape == (1, 16) and mask.shape == (1, 1, 3, 3)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
