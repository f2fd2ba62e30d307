"""The pooled head's ops against the dense computation they replace (aim_ext.ops.pooled_head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_REASON, devices

from aim_ext.ops import (
    kernels_available,
    masked_merge_reference,
    pool_weights,
    pooled_epilogue,
    pooled_epilogue_reference,
    sparse_pooled_branch,
    sparse_pooled_branch_graph,
    sparse_pooled_branch_reference,
)
from aim_ext.ops.topdown_epilogue import layer_norm_gelu

TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 6e-2}


def _logits(n, h, w, fraction, dtype, device, generator):
    """Mask logits with about ``fraction`` of the positions active (exactly none or all at 0 and 1)."""
    u = torch.rand(n, 1, h, w, generator=generator)
    return (
        (fraction - u).to(dtype).to(device)
        if 0 < fraction < 1
        else torch.full((n, 1, h, w), fraction - 0.5).to(dtype).to(device)
    )


def _branch_weights(c, d, dtype, device, generator, bias=True):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    return (
        r(d, c, 1, 1, scale=c**-0.5),
        r(d) if bias else None,
        r(d, d, 3, 3, scale=(9 * d) ** -0.5),
        r(d) if bias else None,
        1 + 0.1 * r(d),
        0.1 * r(d),
    )


def test_pool_weights_are_the_adjoint_of_the_merge_chain():
    """sum_l <w_l, O_l> is mean(P_T) for P_T built by nearest resizes, at 224, 200 and 299 px sizes."""
    g = torch.Generator().manual_seed(0)
    for sizes in [
        [(7, 7), (14, 14), (28, 28)],
        [(7, 7), (13, 13), (25, 25)],
        [(10, 10), (19, 19), (38, 38), (75, 75)],
        [(1, 1), (3, 2)],
        [(5, 3)],
    ]:
        maps = [torch.randn(2, 4, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
        merged = None
        for o in maps:
            merged = o if merged is None else o + F.interpolate(merged, size=o.shape[-2:], mode="nearest")
        pooled = sum((o * w).sum(dim=(2, 3)) for o, w in zip(maps, pool_weights(sizes), strict=True))
        torch.testing.assert_close(pooled, merged.mean(dim=(2, 3)), rtol=0, atol=1e-12)
        assert all(abs(float(w.sum()) - 1) < 1e-12 for w in pool_weights(sizes))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_epilogue_matches_the_dense_masked_pool(device, dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        n, c = 1 + trial % 3, [1, 8, 33][trial % 3]
        h, w = int(torch.randint(1, 32, (1,), generator=g)), int(torch.randint(1, 32, (1,), generator=g))
        fraction = [0.0, 1.0, 0.3, 0.7][trial % 4]
        conv = torch.randn(n, c, h, w, generator=g).to(dtype).to(device)
        if channels_last:
            conv = conv.contiguous(memory_format=torch.channels_last)
        _, _, _, _, lw, lb = _branch_weights(c, c, dtype, device, g)
        logits = _logits(n, h, w, fraction, dtype, device, g)
        weight = torch.rand(h, w, generator=g, dtype=torch.float64).to(device)
        pooled, mask = pooled_epilogue(conv, lw, lb, logits, weight)
        # Independent of the reference: the masked merge's own masked map, pooled.
        features = layer_norm_gelu(conv, lw, lb)
        masked, expected_mask = masked_merge_reference(features, logits)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        expected = (masked.to(acc) * weight.to(acc)).sum(dim=(2, 3))
        assert pooled.dtype == acc and pooled.shape == (n, c)
        assert torch.equal(mask, expected_mask)
        assert mask.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        torch.testing.assert_close(pooled, expected, rtol=TOL[dtype], atol=TOL[dtype])
        ref_pooled, _ = pooled_epilogue_reference(conv, lw, lb, logits, weight)
        torch.testing.assert_close(pooled, ref_pooled, rtol=TOL[dtype], atol=TOL[dtype])


def _dense_branch(s, logits, weight, aw, ab, rw, rb, lw, lb):
    """T_l by PyTorch's own convolutions on the whole map, masked and pooled in float64."""
    conv = F.conv2d(F.conv2d(s, aw, ab), rw, rb, padding=1)
    features = layer_norm_gelu(conv, lw, lb)
    mask = (logits >= 0).to(s.dtype)
    return (features.double() * mask.double() * weight.double()).sum(dim=(2, 3)), mask


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_branch_matches_the_dense_branch(device, dtype, channels_last):
    """Fuzzed: sizes 1..31, odd sizes, active fractions 0, 1 and between, with and without biases."""
    g = torch.Generator().manual_seed(2)
    for trial in range(14):
        n, c, d = 1 + trial % 3, [3, 16, 40][trial % 3], [8, 24][trial % 2]
        h, w = int(torch.randint(1, 32, (1,), generator=g)), int(torch.randint(1, 32, (1,), generator=g))
        fraction = [0.0, 1.0, 0.2, 0.5, 0.8][trial % 5]
        s = torch.randn(n, c, h, w, generator=g).to(dtype).to(device)
        if channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        aw, ab, rw, rb, lw, lb = _branch_weights(c, d, dtype, device, g, bias=trial % 4 != 3)
        logits = _logits(n, h, w, fraction, dtype, device, g)
        weight = torch.rand(h, w, generator=g, dtype=torch.float64).to(device)
        pooled, mask = sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
        expected, expected_mask = _dense_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
        assert pooled.shape == (n, d) and torch.equal(mask, expected_mask)
        tol = TOL[dtype] * (4 if dtype == torch.bfloat16 else 1)
        torch.testing.assert_close(pooled.double(), expected, rtol=tol, atol=tol)
        if fraction == 0.0:
            assert torch.equal(pooled, torch.zeros_like(pooled))
        ref, _ = sparse_pooled_branch_reference(s, logits, weight, aw, ab, rw, rb, lw, lb)
        torch.testing.assert_close(pooled.double(), ref.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("channels", [6, 20])  # the composed convolutions (8 C < 9 D), and align then refine
def test_sparse_branch_reads_only_the_active_neighbourhoods(channels):
    """Changing S_l outside the active positions' 3x3 neighbourhoods changes nothing."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, channels, 9, 11, generator=g, dtype=torch.float64)
    logits = torch.full((2, 1, 9, 11), -1.0, dtype=torch.float64)
    logits[0, 0, 2, 3] = logits[1, 0, 8, 10] = 1.0
    aw, ab, rw, rb, lw, lb = _branch_weights(channels, 8, torch.float64, "cpu", g)
    weight = torch.rand(9, 11, generator=g, dtype=torch.float64)
    pooled, _ = sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
    far = s.clone()
    far[0, :, 5:, :] = 1e6
    far[1, :, :6, :] = -1e6
    again, _ = sparse_pooled_branch(far, logits, weight, aw, ab, rw, rb, lw, lb)
    assert torch.equal(pooled, again)
    near = s.clone()
    near[0, :, 3, 4] += 1
    assert not torch.equal(pooled, sparse_pooled_branch(near, logits, weight, aw, ab, rw, rb, lw, lb)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pooled_epilogue_adds_the_convolution_bias(dtype):
    """conv_bias, the convolution's bias, is added to conv inside pooled_epilogue (at the active
    positions) as every path adds it: the dense computation on conv + conv_bias.to(conv.dtype),
    the sum rounded to conv's dtype."""
    g = torch.Generator().manual_seed(9)
    conv = torch.randn(2, 24, 5, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    _, _, _, _, lw, lb = _branch_weights(4, 24, dtype, "cpu", g)
    conv_bias = torch.randn(24, generator=g)  # float32, as a module's under autocast
    logits, weight = _logits(2, 5, 6, 0.4, dtype, "cpu", g), torch.rand(5, 6, generator=g)
    pooled, mask = pooled_epilogue(conv, lw, lb, logits, weight, conv_bias=conv_bias)
    exact = (conv + conv_bias.to(dtype)[:, None, None]).double()
    expected, expected_mask = pooled_epilogue_reference(
        exact, lw.double(), lb.double(), logits, weight.double()
    )
    assert torch.equal(mask, expected_mask.to(dtype))
    torch.testing.assert_close(pooled.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    reference, _ = pooled_epilogue_reference(conv, lw, lb, logits, weight, conv_bias=conv_bias)
    torch.testing.assert_close(pooled, reference, rtol=TOL[dtype], atol=TOL[dtype])
    with pytest.raises(RuntimeError, match=r"conv_bias must have shape \(24,\)"):
        pooled_epilogue(conv, lw, lb, logits, weight, conv_bias=conv_bias[:5])


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 6, 7, generator=g)
    aw, ab, rw, rb, lw, lb = _branch_weights(5, 8, torch.float32, "cpu", g)
    logits = torch.randn(2, 1, 6, 7, generator=g)
    weight = torch.rand(6, 7, generator=g)
    torch.library.opcheck(
        torch.ops.aim.sparse_pooled_branch.default, (s, logits, weight, aw, ab, rw, rb, lw, lb, 1e-6, None)
    )
    torch.library.opcheck(
        torch.ops.aim.sparse_pooled_branch.default, (s, logits, weight, aw, None, rw, None, lw, lb, 1e-6, 84)
    )
    conv = torch.randn(2, 8, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.aim.pooled_epilogue.default, (conv, lw, lb, logits, weight, 1e-6))
    torch.library.opcheck(torch.ops.aim.pooled_epilogue.default, (conv, lw, lb, logits, weight, 1e-6, lb * 3))


def test_torch_compile_fullgraph_sees_the_ops():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 5, 6, 7, generator=g)
    aw, ab, rw, rb, lw, lb = _branch_weights(5, 8, torch.float32, "cpu", g)
    logits, weight = torch.randn(2, 1, 6, 7, generator=g), torch.rand(6, 7, generator=g)

    def both(s, logits):
        sparse, _ = sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
        dense, mask = pooled_epilogue(
            F.conv2d(F.conv2d(s, aw, ab), rw, rb, padding=1), lw, lb, logits, weight
        )
        return sparse, dense, mask

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(s, logits), both(s, logits), strict=True):
        torch.testing.assert_close(got, want)


def test_bad_input_names_the_problem():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 6, 7, generator=g)
    aw, ab, rw, rb, lw, lb = _branch_weights(5, 8, torch.float32, "cpu", g)
    logits, weight = torch.randn(2, 1, 6, 7, generator=g), torch.rand(6, 7, generator=g)
    cases = [
        ((s, torch.randn(2, 1, 6, 6), weight), "logits must have shape (N, 1, H, W) = (2, 1, 6, 7)"),
        ((s, torch.randn(2, 2, 6, 7), weight), "logits must have shape"),
        ((s, (logits > 0), weight), "logits must be a floating-point tensor"),
        ((s, logits, torch.rand(7, 6)), "pool_weight must have shape (H, W) = (6, 7)"),
        ((s[0], logits, weight), "s must be 4-D"),
    ]
    for (a, b, c), message in cases:
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sparse_pooled_branch(a, b, c, aw, ab, rw, rb, lw, lb)
    with pytest.raises(RuntimeError, match=r"align_weight must have shape \(D, 5, 1, 1\)"):
        sparse_pooled_branch(s, logits, weight, rw, ab, rw, rb, lw, lb)
    with pytest.raises(RuntimeError, match="the conv weights must be Float"):
        sparse_pooled_branch(s, logits, weight, aw.double(), ab, rw, rb, lw, lb)
    logits = torch.ones(2, 1, 6, 7)
    with pytest.raises(RuntimeError, match="84 positions, more than capacity=50"):
        sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb, capacity=50)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        sparse_pooled_branch(s.requires_grad_(), logits, weight, aw, ab, rw, rb, lw, lb)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        pooled_epilogue(torch.randn(2, 8, 6, 7, requires_grad=True), lw, lb, logits, weight)


@pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)
def test_cuda_capacity_is_the_map_size():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(1, 4, 5, 5, generator=g).cuda()
    aw, ab, rw, rb, lw, lb = _branch_weights(4, 8, torch.float32, "cuda", g)
    logits, weight = torch.randn(1, 1, 5, 5, device="cuda"), torch.rand(5, 5, device="cuda")
    with pytest.raises(ValueError, match=r"on cuda:0 the capacity is all N\*H\*W = 25 positions"):
        sparse_pooled_branch(s, logits, weight, aw, ab, rw, rb, lw, lb, capacity=10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_onnx_form_of_the_sparse_branch_matches_the_dense_branch(dtype):
    """sparse_pooled_branch_graph (what ONNX export writes) in both forms, fuzzed like the op."""
    g = torch.Generator().manual_seed(9)
    for trial in range(10):
        n, c, d = 1 + trial % 3, [3, 40][trial % 2], 16
        h, w = int(torch.randint(1, 20, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        s = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        aw, ab, rw, rb, lw, lb = _branch_weights(c, d, dtype, "cpu", g, bias=trial % 3 != 2)
        logits = _logits(n, h, w, [0.0, 0.3, 1.0, 0.6][trial % 4], dtype, "cpu", g)
        weight = torch.rand(h, w, generator=g, dtype=torch.float64)
        pooled, mask = sparse_pooled_branch_graph(s, logits, weight, aw, ab, rw, rb, lw, lb)
        expected, expected_mask = _dense_branch(s, logits, weight, aw, ab, rw, rb, lw, lb)
        assert torch.equal(mask, expected_mask)
        torch.testing.assert_close(pooled.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
