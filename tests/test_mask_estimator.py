"""The one-op mask estimator (aim_ext.ops.mask_estimator) against its float64 definition, the
module it replaces, and itself across routes, devices, replays and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_REASON

import aim_ext
from aim_ext.models import InferenceMaskEstimator, MaskEstimator, set_estimator_algorithm
from aim_ext.models import mask_estimator as estimator_module
from aim_ext.ops import kernels_available, mask_estimator, mask_estimator_reference

# Largest |op - float64 reference| / max |reference| per dtype of the whole estimator.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
NEEDS_KERNELS = pytest.mark.skipif(
    not kernels_available()["cpu"], reason="the compiled extension is not built"
)
NEEDS_CUDA = pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)


def _params(c, dtype=torch.float32, device="cpu", *, width=32, blocks=3, seed=0):
    """A folded estimator's op arguments, scaled so that the activations stay of order one."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, fan_in=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * fan_in**-0.5).to(dtype).to(device)

    convs = [r(width, width, 3, 3, fan_in=9 * width) for _ in range(2 * blocks)]
    return (
        r(width, c, 3, 3, fan_in=9 * c),
        r(width, fan_in=4),
        convs,
        [r(width, fan_in=4) for _ in convs],
        r(1, width, 1, 1, fan_in=width),
        r(1, fan_in=4),
        r(1, width, fan_in=width),
    )


def _input(n, c, h, w, dtype, device="cpu", layout="nchw", seed=1):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a slice: no memory format at all
        return torch.randn(n, c + 2, h, w + 3, generator=g).to(dtype).to(device)[:, 1:-1, :, 2:-1]
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _float64(args):
    return [[t.double() for t in a] if isinstance(a, list) else a.double() for a in args]


def _assert_matches_reference(s, params, logits, mask):
    expected, _ = mask_estimator_reference(s.double(), *_float64(params))
    assert logits.shape == mask.shape == (s.shape[0], 1, *s.shape[2:])
    assert logits.dtype == mask.dtype == s.dtype
    scale = expected.abs().max().item()
    error = (logits.double() - expected).abs().max().item()
    assert error <= TOL[s.dtype] * scale, f"{s.dtype}: error {error:.3g} against scale {scale:.3g}"
    assert torch.equal(mask, (logits >= 0).to(s.dtype))


CASES = [  # (N, C, H, W): odd channel counts across the stem's 16-channel chunks, odd maps
    (1, 1, 1, 1),
    (1, 3, 2, 3),
    (2, 16, 7, 7),
    (3, 17, 5, 9),
    (1, 40, 14, 14),
    (2, 33, 1, 30),
    (1, 768, 7, 7),
]


@NEEDS_KERNELS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_the_kernel_route_matches_the_float64_definition(dtype, layout):
    """On the CPU the "kernel" route is the CUDA kernels' arithmetic, emulated."""
    for n, c, h, w in CASES:
        if dtype == torch.float64 and (c == 768 or h * w > 121):
            continue  # float64 maps fit the kernel up to 11x11
        s, params = _input(n, c, h, w, dtype, layout=layout), _params(c, dtype, seed=c)
        _assert_matches_reference(s, params, *mask_estimator(s, *params, algorithm="kernel"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_convolution_route_is_the_reference_layer_by_layer(dtype):
    for n, c, h, w in CASES[:5]:
        s, params = _input(n, c, h, w, dtype, layout="channels_last"), _params(c, dtype, seed=c)
        logits, mask = mask_estimator(s, *params, algorithm="convolutions")
        expected, expected_mask = mask_estimator_reference(s, *params)
        assert torch.equal(logits, expected) and torch.equal(mask, expected_mask)
        _assert_matches_reference(s, params, *mask_estimator(s, *params))  # auto: the same on the CPU


@NEEDS_KERNELS
def test_the_routes_take_any_number_of_blocks_and_the_convolutions_any_width():
    s = _input(2, 5, 6, 4, torch.float64)
    for blocks in (0, 1, 5):
        params = _params(5, torch.float64, blocks=blocks)
        _assert_matches_reference(s, params, *mask_estimator(s, *params, algorithm="kernel"))
    params = _params(5, torch.float64, width=8)
    _assert_matches_reference(s, params, *mask_estimator(s, *params))


def _folded_estimator(c, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    estimator = MaskEstimator(c).to(dtype).eval()
    for block in estimator.blocks:  # BatchNorms that are not the identity
        block.norm.running_mean.normal_()
        block.norm.running_var.uniform_(0.5, 2.0)
        block.norm.weight.data.normal_()
        block.norm.bias.data.normal_()
    return estimator, estimator.fuse()


@pytest.mark.parametrize("algorithm", ["auto", "kernel", "convolutions"])
def test_the_inference_estimator_runs_the_op_and_equals_the_training_module(algorithm, monkeypatch):
    if algorithm == "kernel" and not kernels_available()["cpu"]:
        pytest.skip("the compiled extension is not built")
    estimator, folded = _folded_estimator(24)
    folded.algorithm = algorithm
    calls = []
    monkeypatch.setattr(
        estimator_module, "mask_estimator", lambda *a, **k: calls.append(k) or mask_estimator(*a, **k)
    )
    s = _input(2, 24, 7, 5, torch.float64, layout="channels_last")
    with torch.no_grad():
        expected = estimator(s)
        logits = folded(s)
        modules = folded.forward_modules(s)
    assert calls == [{"algorithm": algorithm}]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(modules, expected, rtol=0, atol=1e-10)


def test_gradients_and_tracers_take_the_modules(monkeypatch):
    _, folded = _folded_estimator(6)
    monkeypatch.setattr(estimator_module, "mask_estimator", None)  # any call would fail
    s = _input(1, 6, 4, 4, torch.float64)
    folded(s).sum().backward()  # autograd: the modules
    assert folded.stem.weight.grad is not None
    folded.algorithm = "modules"
    with torch.no_grad():
        folded(s)


@NEEDS_KERNELS
def test_a_fused_model_uses_the_op_and_set_estimator_algorithm_switches_it(monkeypatch):
    model = aim_ext.create_model("resnet18", num_classes=3, stop_stage=2).eval()
    with pytest.raises(ValueError, match="fuse it first with aim_ext.fuse_for_inference"):
        set_estimator_algorithm(model, "kernel")
    fused = aim_ext.fuse_for_inference(model)
    calls = []
    monkeypatch.setattr(
        estimator_module, "mask_estimator", lambda *a, **k: calls.append(k) or mask_estimator(*a, **k)
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    set_estimator_algorithm(fused, "kernel")
    got = fused(x)  # gradients enabled: a fused model's parameters require none, so the op runs
    assert calls == [{"algorithm": "kernel"}] * len(fused.stages)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert {m.algorithm for m in fused.modules() if isinstance(m, InferenceMaskEstimator)} == {"kernel"}
    with pytest.raises(ValueError, match="estimator algorithm must be one of"):
        set_estimator_algorithm(fused, "fast")


@NEEDS_KERNELS
def test_opcheck():
    s = _input(2, 17, 5, 6, torch.float32, layout="channels_last")
    params = _params(17)
    for algorithm in ("auto", "kernel", "convolutions"):
        torch.library.opcheck(torch.ops.aim.mask_estimator.default, (s, *params, algorithm))


def test_bad_input_names_the_problem():
    s = _input(1, 8, 6, 6, torch.float32)
    stem_w, stem_b, convs, biases, local_w, local_b, context_w = _params(8)
    good = (stem_w, stem_b, convs, biases, local_w, local_b, context_w)
    cases = [
        ((_params(9)[0], *good[1:]), r"stem_weight must have shape \[32, 8, 3, 3\], got \[32, 9, 3, 3\]"),
        ((stem_w, stem_b[:5], *good[2:]), r"stem_bias must have shape \[32\]"),
        ((stem_w, stem_b, convs[:5], biases[:5], *good[4:]), "two convolutions per residual block"),
        ((stem_w, stem_b, [convs[0][:, :16], *convs[1:]], *good[3:]), r"block_weights\[0\] must have shape"),
        ((*good[:4], local_w.view(1, 32), *good[5:]), r"local_weight must have shape \[1, 32, 1, 1\]"),
        ((*good[:6], context_w.view(32)), r"context_weight must have shape \[1, 32\]"),
    ]
    for params, message in cases:
        with pytest.raises(RuntimeError, match=message):
            mask_estimator(s, *params)
    with pytest.raises(RuntimeError, match="s must be 4-D"):
        mask_estimator(s[0], *good)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        mask_estimator(s, *good, algorithm="fastest")
    with pytest.raises(RuntimeError, match="computes no gradients"):
        mask_estimator(s.clone().requires_grad_(), *good)


@NEEDS_KERNELS
@pytest.mark.parametrize("dtype,side", [(torch.float32, 20), (torch.bfloat16, 20), (torch.float64, 11)])
def test_the_largest_map_the_kernel_takes_and_the_smallest_it_refuses(dtype, side):
    params = _params(4, dtype)
    s = _input(1, 4, side, side, dtype)
    _assert_matches_reference(s, params, *mask_estimator(s, *params, algorithm="kernel"))
    big = _input(1, 4, side + 1, side + 1, dtype)
    name = {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float64: "Double"}[dtype]
    message = rf"a {side + 1}x{side + 1} {name} map is larger than the kernel's limit \(160 KiB"
    message += rf".* square maps up to {side}x{side}\)"
    with pytest.raises(RuntimeError, match=message):
        mask_estimator(big, *params, algorithm="kernel")
    _assert_matches_reference(big, params, *mask_estimator(big, *params))  # auto: the convolutions


@NEEDS_KERNELS
def test_a_forced_kernel_refuses_what_it_cannot_run_and_auto_takes_the_convolutions():
    narrow, params = _input(1, 4, 5, 5, torch.float64), _params(4, torch.float64, width=16)
    with pytest.raises(RuntimeError, match="the kernel is written for width 32, this estimator has 16"):
        mask_estimator(narrow, *params, algorithm="kernel")
    _assert_matches_reference(narrow, params, *mask_estimator(narrow, *params))
    empty, params = _input(0, 4, 5, 5, torch.float32), _params(4)
    for algorithm in ("kernel", "auto"):
        logits, mask = mask_estimator(empty, *params, algorithm=algorithm)
        assert logits.shape == mask.shape == (0, 1, 5, 5)


@NEEDS_KERNELS
def test_a_batch_whose_stem_launch_exceeds_the_grid_limit_is_refused():
    """The stem launches one block per 16 input channels and image: past grid.x's 2^31 - 1 blocks
    the kernel route refuses in one line (an expanded view: no memory behind it)."""
    s = torch.zeros(1, 2048, 1, 1).expand(2**24 + 1, 2048, 1, 1)
    with pytest.raises(
        RuntimeError, match=r"the stem's launch would need 2147483776 blocks \(128 channel chunks"
    ):
        mask_estimator(s, *_params(2048), algorithm="kernel")


# --------------------------------------------------------------------------------------------
# CUDA: the kernels against their CPU emulation, determinism, graphs, no host synchronisation.


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_cuda_kernel_matches_the_reference_and_its_emulation(dtype, layout):
    for n, c, h, w in [*CASES, (8, 2048, 7, 7), (4, 384, 14, 14), (2, 9, 20, 20), (0, 5, 3, 3)]:
        if dtype == torch.float64 and h * w > 121:
            continue  # float64 maps fit the kernel up to 11x11
        s, params = _input(n, c, h, w, dtype, layout=layout), _params(c, dtype, seed=c)
        cuda_s, cuda_params = (
            s.cuda(),
            [[t.cuda() for t in p] if isinstance(p, list) else p.cuda() for p in params],
        )
        logits, mask = mask_estimator(cuda_s, *cuda_params, algorithm="kernel")
        _assert_matches_reference(s, params, logits.cpu(), mask.cpu())
        emulated, _ = mask_estimator(s, *params, algorithm="kernel")
        # Every sum is the same fma chain on both sides; only erf (CUDA's libdevice against libm)
        # may differ in the last bit, and then a low-precision rounding may move one step.
        if dtype in (torch.float32, torch.float64):
            scale = emulated.abs().max().item()
            torch.testing.assert_close(
                logits.cpu(), emulated, rtol=0, atol=64 * torch.finfo(dtype).eps * scale
            )
        same = (logits.cpu() == emulated).double().mean().item()
        assert same > 0.5, f"only {same:.0%} of the logits are bit for bit the emulation's"


@NEEDS_CUDA
def test_cuda_kernel_is_deterministic_sync_free_and_replays_in_a_graph():
    s = _input(2, 768, 7, 7, torch.bfloat16, "cuda", layout="channels_last")
    params = [
        [t.cuda() for t in p] if isinstance(p, list) else p.cuda() for p in _params(768, torch.bfloat16)
    ]
    first, _ = mask_estimator(s, *params, algorithm="kernel")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert torch.equal(mask_estimator(s, *params, algorithm="kernel")[0], first)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mask_estimator(s, *params, algorithm="kernel")
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        replayed, replayed_mask = mask_estimator(s, *params, algorithm="kernel")
    for seed in (3, 4):
        s.copy_(_input(2, 768, 7, 7, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        expected, expected_mask = mask_estimator(s, *params, algorithm="kernel")
        assert torch.equal(replayed, expected) and torch.equal(replayed_mask, expected_mask)


@NEEDS_CUDA
def test_cuda_kernel_from_two_host_threads_with_different_maps():
    """Two threads on one device, each with its own map size (its own shared-memory need), many
    calls interleaved: every result equals the single-threaded one (the kernels' shared-memory
    limit is set once per device to the largest any call can ask for)."""
    import threading

    params = [[t.cuda() for t in p] if isinstance(p, list) else p.cuda() for p in _params(64)]
    inputs = [_input(2, 64, side, side, torch.float32, "cuda", seed=side) for side in (3, 17)]
    expected = [mask_estimator(s, *params, algorithm="kernel")[0] for s in inputs]
    failures = []

    def worker(k):
        try:
            for _ in range(50):
                if not torch.equal(mask_estimator(inputs[k], *params, algorithm="kernel")[0], expected[k]):
                    failures.append(k)
        except Exception as error:  # a launch with too little shared memory allowed
            failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@NEEDS_CUDA
def test_cuda_auto_takes_the_kernel_for_the_top_stage_only():
    def kernel_names(s, params):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            mask_estimator(s, *params)
            torch.cuda.synchronize()
        return " ".join(e.name for e in prof.events())

    params = [[t.cuda() for t in p] if isinstance(p, list) else p.cuda() for p in _params(64)]
    assert "stem_partials" in kernel_names(torch.randn(1, 64, 7, 7, device="cuda"), params)
    assert "stem_partials" not in kernel_names(torch.randn(1, 64, 14, 14, device="cuda"), params)
    assert "stem_partials" not in kernel_names(torch.randn(16, 64, 7, 7, device="cuda"), params)


def test_without_the_compiled_kernels_the_op_is_its_reference():
    """AIM_EXT_NO_KERNELS=1: the op runs mask_estimator_reference (parameters cast to s's dtype);
    the kernel route, which needs the extension, says so."""
    script = """
import warnings, torch
warnings.simplefilter("ignore")
from aim_ext.ops import mask_estimator, mask_estimator_reference
g = torch.Generator().manual_seed(0)
def r(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2
s = r(2, 5, 4, 6)
convs = [r(32, 32, 3, 3) for _ in range(6)]
params = [r(32, 5, 3, 3), r(32), convs, [r(32) for _ in convs], r(1, 32, 1, 1), r(1), r(1, 32)]
def to(p, dtype):
    return [t.to(dtype) for t in p] if isinstance(p, list) else p.to(dtype)
floats = [to(p, torch.float32) for p in params]  # cast back to s's float64 exactly
logits, mask = mask_estimator(s, *floats)
expected, expected_mask = mask_estimator_reference(s, *[to(p, torch.float64) for p in floats])
print(torch.equal(logits, expected), torch.equal(mask, expected_mask), logits.dtype)
try:
    mask_estimator(s, *params, algorithm="kernel")
except RuntimeError as error:
    print(error)
"""
    env = {**os.environ, "AIM_EXT_NO_KERNELS": "1"}
    lines = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert lines[0] == "True True torch.float64"
    assert lines[1] == "mask_estimator: algorithm='kernel' needs the compiled aim_ext kernels"
