"""The masked_merge op: compiled kernels against the pure PyTorch reference and float64."""

import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import devices

import aim_ext
from aim_ext.ops import (
    kernels_available,
    logistic_noise,
    masked_merge,
    masked_merge_reference,
    nearest_resize_adjoint,
    nearest_source_indices,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Gradient tolerance against float64, per dtype: the kernels sum C products in float.
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Case(NamedTuple):
    """One fuzzed masked_merge call, derived from its seed alone."""

    dtype: torch.dtype
    channels_last: bool
    training: bool
    with_coarse: bool

    @classmethod
    def from_seed(cls, seed: int) -> "Case":
        rng = random.Random(seed)
        return cls(rng.choice(DTYPES), rng.random() < 0.5, rng.random() < 0.6, rng.random() < 0.75)

    def make(self, seed: int, device: str):
        """(feat, logits, coarse, noise, temperature) with random sizes, including odd resize ratios."""
        rng = random.Random(seed)
        n, c = rng.randint(1, 3), rng.randint(1, 17)
        h, w = rng.randint(1, 23), rng.randint(1, 23)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        feat = torch.randn(n, c, h, w, dtype=self.dtype, device=device).contiguous(memory_format=fmt)
        logits = torch.randn(n, 1, h, w, device=device, dtype=rng.choice([self.dtype, torch.float32]))
        coarse = None
        if self.with_coarse:
            # Coarser, finer and equal sizes: upsampling by odd ratios and downsampling both occur.
            ch, cw = rng.randint(1, 2 * h), rng.randint(1, 2 * w)
            coarse = torch.randn(n, c, ch, cw, dtype=self.dtype, device=device).contiguous(memory_format=fmt)
        noise = logistic_noise(logits) if self.training else None
        return feat, logits, coarse, noise, rng.choice([1.0, 0.5, 2.3])


def _case_id(seed: int) -> str:
    case = Case.from_seed(seed)
    layout = "channels_last" if case.channels_last else "nchw"
    mode = "train" if case.training else "eval"
    return f"{seed}-{str(case.dtype)[6:]}-{layout}-{mode}-{'coarse' if case.with_coarse else 'top'}"


FUZZED = pytest.mark.parametrize("seed", [pytest.param(seed, id=_case_id(seed)) for seed in range(40)])


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_forward_matches_reference_exactly(device, seed):
    case = Case.from_seed(seed)
    feat, logits, coarse, noise, t = case.make(seed, device)
    out, mask = masked_merge(feat, logits, coarse, noise=noise, temperature=t)
    ref_out, ref_mask = masked_merge_reference(feat, logits, coarse, noise=noise, temperature=t)
    assert out.dtype == feat.dtype and mask.dtype == feat.dtype
    assert mask.shape == logits.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)


def float64_grads(feat, logits, coarse, noise, t, grad_out, grad_mask):
    """Gradients of the reference computed entirely in float64 on the CPU: the independent check.

    On the CPU, autograd's nearest-resize backward scatters through the forward's own index map;
    PyTorch's CUDA backward inverts that map in float and misses some footprints (e.g. 35 -> 21).
    """
    leaves = [x.detach().double().cpu().requires_grad_() for x in (feat, logits)]
    c64 = coarse.detach().double().cpu().requires_grad_() if coarse is not None else None
    n64 = noise.double().cpu() if noise is not None else None
    grad_out, grad_mask = grad_out.cpu(), grad_mask.cpu()
    out, mask = masked_merge_reference(*leaves, c64, noise=n64, temperature=t)
    loss = (out * grad_out.double()).sum() + (mask * grad_mask.double()).sum()
    inputs = leaves + ([c64] if c64 is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return grads


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_backward_matches_float64_reference(device, seed):
    case = Case.from_seed(seed)
    feat, logits, coarse, noise, t = case.make(seed, device)
    leaves = [feat.requires_grad_(), logits.requires_grad_()] + (
        [coarse.requires_grad_()] if coarse is not None else []
    )
    out, mask = masked_merge(feat, logits, coarse, noise=noise, temperature=t)
    grad_out, grad_mask = torch.randn_like(out), torch.randn_like(mask)
    grads = torch.autograd.grad((out * grad_out).sum() + (mask * grad_mask).sum(), leaves)
    expected = float64_grads(feat, logits, coarse, noise, t, grad_out, grad_mask)
    for name, got, want in zip(["feat", "logits", "coarse"], grads, expected, strict=False):
        assert got.dtype == (logits.dtype if name == "logits" else feat.dtype), name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            got.double().cpu(), want, rtol=0, atol=GRAD_TOL[got.dtype] * scale, msg=name
        )
    if not case.training:
        assert grads[1].abs().max() == 0, "evaluation masks pass no gradient to the logits"


def test_straight_through_gradient_formula():
    feat = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    logits = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    noise = logistic_noise(logits).double()
    t = 0.7
    out, mask = masked_merge(feat, logits, noise=noise, temperature=t)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), logits)
    soft = torch.sigmoid((logits + noise) / t)
    expected = (g * feat).sum(1, keepdim=True) * soft * (1 - soft) / t
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    base = torch.randn(2, 12, 20, 30, device=device)
    feat = base[:, ::2, :, ::2]  # strided in C and W
    logits = torch.randn(2, 3, 20, 15, device=device)[:, 1:2]
    coarse = torch.randn(2, 6, 22, 9, device=device).transpose(2, 3)[:, :, :, ::2]  # (2, 6, 9, 11)
    noise = logistic_noise(torch.empty(2, 1, 15, 20, device=device)).transpose(2, 3)
    for n in (None, noise):
        out, mask = masked_merge(feat, logits, coarse, noise=n)
        ref_out, ref_mask = masked_merge_reference(feat, logits, coarse, noise=n)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "src,dst",
    [
        ((10, 10), (19, 19)),
        ((18, 18), (37, 37)),
        ((7, 5), (14, 11)),
        ((14, 14), (7, 7)),
        ((3, 2), (100, 61)),
        ((37, 19), (38, 38)),
        ((26, 35), (14, 21)),
        ((14, 28), (46, 4)),
    ],
)
def test_nearest_resize_is_torch_nearest(device, src, dst):
    coarse = torch.arange(src[0] * src[1], dtype=torch.float32, device=device).reshape(1, 1, *src)
    feat = torch.zeros(1, 1, *dst, device=device)
    logits = torch.ones(1, 1, *dst, device=device)
    out, _ = masked_merge(feat, logits, coarse)
    assert torch.equal(out, F.interpolate(coarse, size=dst, mode="nearest"))
    # The adjoint against autograd of the CPU forward (exact sums of small integers).
    grad = torch.randint(-8, 8, (1, 1, *dst), dtype=torch.float32)
    leaf = coarse.cpu().requires_grad_()
    (expected,) = torch.autograd.grad(F.interpolate(leaf, size=dst, mode="nearest"), leaf, grad)
    assert torch.equal(nearest_resize_adjoint(grad.to(device), src).cpu(), expected)
    feat.requires_grad_()
    leaf = coarse.clone().requires_grad_()
    (got,) = torch.autograd.grad(masked_merge(feat, logits, leaf)[0], leaf, grad.to(device))
    assert torch.equal(got.cpu(), expected)


def test_nearest_source_indices_match_interpolate_for_all_small_sizes():
    for in_size in range(1, 48):
        for out_size in range(1, 48):
            x = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, 1, in_size)
            expected = F.interpolate(x, size=(1, out_size), mode="nearest").flatten().long()
            assert torch.equal(nearest_source_indices(in_size, out_size), expected), (in_size, out_size)


@pytest.mark.parametrize("device", devices())
def test_backward_is_deterministic(device):
    feat = torch.randn(3, 16, 19, 19, device=device, requires_grad=True)
    logits = torch.randn(3, 1, 19, 19, device=device, requires_grad=True)
    coarse = torch.randn(3, 16, 10, 10, device=device, requires_grad=True)
    noise = logistic_noise(logits)

    def grads():
        out, mask = masked_merge(feat, logits, coarse, noise=noise)
        return torch.autograd.grad(out.square().sum() + mask.sum(), [feat, logits, coarse])

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


def test_training_mask_frequency_matches_sigmoid():
    logits = torch.linspace(-4, 4, 81).reshape(1, 1, 9, 9)
    feat = torch.ones(1, 1, 9, 9)
    draws = torch.stack([masked_merge(feat, logits, noise=logistic_noise(logits))[1] for _ in range(2000)])
    assert (draws.mean(0) - torch.sigmoid(logits)).abs().max() < 0.03


def test_evaluation_mask_is_sign_of_logits():
    logits = torch.tensor([-1.0, -0.0, 0.0, 1e-30, -1e-30]).reshape(1, 1, 1, 5)
    _, mask = masked_merge(torch.ones(1, 2, 1, 5), logits)
    assert mask.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_reference_gradcheck_float64():
    feat = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    coarse = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, c: masked_merge_reference(f, logits, c)[0], (feat, coarse))
    # The op's own backward: exact in feat and coarse (the mask is piecewise constant in the logits).
    assert torch.autograd.gradcheck(lambda f, c: masked_merge(f, logits, c)[0], (feat, coarse))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    samples = [
        (
            torch.randn(2, 5, 9, 7, device=device),
            torch.randn(2, 1, 9, 7, device=device),
            torch.randn(2, 5, 5, 4, device=device),
            None,
            1.0,
        ),
        (
            torch.randn(2, 5, 9, 7, device=device).to(memory_format=torch.channels_last),
            torch.randn(2, 1, 9, 7, device=device),
            None,
            torch.randn(2, 1, 9, 7, device=device),
            0.5,
        ),
        (
            torch.randn(1, 3, 6, 6, device=device, dtype=torch.bfloat16),
            torch.randn(1, 1, 6, 6, device=device),
            torch.randn(1, 3, 3, 3, device=device, dtype=torch.bfloat16),
            torch.randn(1, 1, 6, 6, device=device),
            2.0,
        ),
    ]
    samples += [
        (
            torch.randn(2, 4, 7, 9, device=device, dtype=torch.float16).to(memory_format=torch.channels_last),
            torch.randn(2, 1, 7, 9, device=device, dtype=torch.float16),
            torch.randn(2, 4, 4, 5, device=device, dtype=torch.float16).to(memory_format=torch.channels_last),
            torch.randn(2, 1, 7, 9, device=device),
            1.0,
        ),
        (
            torch.randn(0, 3, 5, 5, device=device),
            torch.randn(0, 1, 5, 5, device=device),
            torch.randn(0, 3, 2, 2, device=device),
            None,
            1.0,
        ),
    ]
    for feat, logits, coarse, noise, t in samples:
        args = [x.requires_grad_() if x is not None and x is not noise else x for x in (feat, logits, coarse)]
        torch.library.opcheck(torch.ops.aim.masked_merge.default, (*args, noise, t))


def test_bad_inputs_name_the_problem():
    feat, logits = torch.randn(2, 4, 6, 6), torch.randn(2, 1, 6, 6)
    cases_ = [
        ((torch.randn(4, 6, 6), logits), {}, ValueError, "feat must be 4-D"),
        ((feat, torch.randn(2, 6, 6)), {}, ValueError, "logits must be 4-D"),
        ((feat, torch.randn(2, 2, 6, 6)), {}, ValueError, "exactly 1 channel"),
        ((feat, torch.randn(3, 1, 6, 6)), {}, ValueError, "logits shape .* does not match feat"),
        ((feat, torch.randn(2, 1, 5, 6)), {}, ValueError, "does not match feat"),
        ((feat, logits, torch.randn(3, 4, 3, 3)), {}, ValueError, r"coarse \(N, C\)"),
        ((feat, logits, torch.randn(2, 5, 3, 3)), {}, ValueError, r"coarse \(N, C\)"),
        ((feat, logits, torch.randn(2, 4, 3)), {}, ValueError, "coarse must be 4-D"),
        ((feat.long(), logits), {}, TypeError, "feat must be a floating-point"),
        ((feat, logits.int()), {}, TypeError, "logits must be a floating-point"),
        ((feat, logits, torch.randn(2, 4, 3, 3).double()), {}, TypeError, "coarse dtype"),
        ((feat, logits.to("meta")), {}, ValueError, "logits is on meta but feat is on cpu"),
        ((feat, logits, torch.randn(2, 4, 3, 3, device="meta")), {}, ValueError, "coarse is on meta"),
        ((feat, logits), {"noise": torch.randn(2, 1, 6, 5)}, ValueError, "noise shape"),
        ((torch.randn(2, 0, 6, 6), logits), {}, ValueError, "at least one channel"),
        ((feat, logits, torch.randn(2, 4, 0, 3)), {}, ValueError, "non-empty spatial size"),
        (
            (feat, logits),
            {"noise": torch.randn(2, 1, 6, 6), "temperature": 0.0},
            ValueError,
            "temperature must be > 0",
        ),
    ]
    for args, kwargs, error, message in cases_:
        with pytest.raises(error, match=message):
            masked_merge(*args, **kwargs)


@pytest.mark.skipif(not kernels_available()["cpu"], reason="the compiled extension is not built")
def test_compiled_kernel_checks_inputs_too():
    with pytest.raises(RuntimeError, match="exactly 1 channel"):
        torch.ops.aim.masked_merge(torch.randn(2, 4, 6, 6), torch.randn(2, 2, 6, 6), None, None, 1.0)


def test_kernels_available_reports_the_build():
    info = kernels_available()
    assert set(info) == {"cpu", "cuda_compiled", "cuda"}
    assert info["cuda"] == (info["cuda_compiled"] and torch.cuda.is_available())


def test_the_kernels_that_were_built_are_loaded():
    """A package built by setup.py must run its compiled kernels: a broken build fails here."""
    record = Path(aim_ext.__file__).with_name("_build_info.json")
    if not record.exists():
        pytest.skip("no build record: the package was not built by setup.py")
    decision = json.loads(record.read_text())["decision"]
    info = kernels_available()
    assert info["cpu"], f"setup.py built the extension ({decision}) but aim_ext._C does not load"
    assert info["cuda_compiled"] == ("CUDA kernels" in decision), decision


def test_info_command_prints_versions_and_kernels():
    result = subprocess.run(
        [sys.executable, "-m", "aim_ext", "info", "--json"], capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout)
    assert report["torch"] == torch.__version__
    assert report["kernels"] == kernels_available()
    spec = importlib.util.find_spec("triton")
    assert (report["triton"] is None) == (spec is None)  # the subprocess inherits TRITON_INTERPRET
    assert spec is None or report["triton"].startswith(importlib.import_module("triton").__version__)


SCHEMA_OPS = (
    "masked_merge",
    "masked_merge_backward",
    "topdown_epilogue",
    "topdown_epilogue_inference",
    "topdown_epilogue_backward",
    "pooled_epilogue",
    "sparse_pooled_branch",
    "mask_estimator",
)


@pytest.mark.skipif(not kernels_available()["cpu"], reason="the compiled extension is not built")
def test_reference_fallback_without_kernels():
    """With the extension disabled: one warning, the same schema, the same results."""
    script = (
        f"OPS = {SCHEMA_OPS!r}"
        + """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import aim_ext
    from aim_ext.ops import kernels_available, masked_merge, masked_merge_reference
print(sum("compiled kernels unavailable" in str(w.message) for w in caught))
print(kernels_available())
for op in OPS:
    print(getattr(torch.ops.aim, op).default._schema)
f = torch.randn(2, 3, 7, 5, requires_grad=True); l = torch.randn(2, 1, 7, 5); c = torch.randn(2, 3, 4, 3)
out, mask = masked_merge(f, l, c)
print(torch.equal(out, masked_merge_reference(f, l, c)[0]))
noise = torch.randn(2, 1, 7, 5)
torch.library.opcheck(torch.ops.aim.masked_merge.default, (f, l.requires_grad_(), c, noise, 1.0))
"""
    )
    env = {**os.environ, "AIM_EXT_NO_KERNELS": "1"}
    lines = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert lines[0] == "1"
    assert lines[1] == str({"cpu": False, "cuda_compiled": False, "cuda": False})
    n = len(SCHEMA_OPS)
    assert lines[2 : 2 + n] == [str(getattr(torch.ops.aim, op).default._schema) for op in SCHEMA_OPS]
    assert lines[2 + n] == "True"


def test_torch_compile_fullgraph_sees_one_op():
    def merge(feat, logits, coarse, noise):
        return masked_merge(feat, logits, coarse, noise=noise, temperature=0.5)

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    feat = torch.randn(2, 8, 11, 9, requires_grad=True)
    logits = torch.randn(2, 1, 11, 9, requires_grad=True)
    coarse, noise = torch.randn(2, 8, 6, 5), logistic_noise(logits)
    out, mask = compiled(feat, logits, coarse, noise)
    ref_out, ref_mask = merge(feat, logits, coarse, noise)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    (out.sum() + mask.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


class _Merge(torch.nn.Module):
    def forward(self, feat, logits, coarse):
        return masked_merge(feat, logits, coarse)


def test_aot_inductor_package_runs_the_op(tmp_path):
    args = (torch.randn(2, 8, 19, 13), torch.randn(2, 1, 19, 13), torch.randn(2, 8, 10, 7))
    exported = torch.export.export(_Merge(), args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == ["aim.masked_merge.default"] + ["<built-in function getitem>"] * 2
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "merge.pt2"))
    out, mask = torch._inductor.aoti_load_package(path)(*args)
    ref_out, ref_mask = masked_merge(*args)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)


def assert_float32_grads_match_float64(feat, logits, coarse, noise) -> None:
    """The op's float32 gradients of all three inputs against the float64 reference."""
    out, mask = masked_merge(feat, logits, coarse, noise=noise)
    grad_out, grad_mask = torch.randn_like(out), torch.randn_like(mask)
    grads = torch.autograd.grad((out * grad_out).sum() + (mask * grad_mask).sum(), [feat, logits, coarse])
    expected = float64_grads(feat, logits, coarse, noise, 1.0, grad_out, grad_mask)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(
            got.double().cpu(), want, rtol=0, atol=GRAD_TOL[torch.float32] * max(1.0, want.abs().max().item())
        )


@pytest.mark.parametrize("device", devices())
def test_backward_with_non_contiguous_inputs(device):
    feat = torch.randn(2, 12, 20, 30, device=device)[:, ::2, :, ::2].requires_grad_()
    logits = torch.randn(2, 3, 20, 15, device=device)[:, 1:2].requires_grad_()
    coarse = torch.randn(2, 6, 22, 9, device=device).transpose(2, 3)[:, :, :, ::2].requires_grad_()
    noise = logistic_noise(torch.empty(2, 1, 15, 20, device=device)).transpose(2, 3)
    assert_float32_grads_match_float64(feat, logits, coarse, noise)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_maps_split_across_threads(device, channels_last):
    """Sizes well above the kernels' grain, so the work is divided between threads."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feat = torch.randn(4, 40, 61, 59, device=device).contiguous(memory_format=fmt).requires_grad_()
    logits = torch.randn(4, 1, 61, 59, device=device, requires_grad=True)
    coarse = torch.randn(4, 40, 31, 30, device=device).contiguous(memory_format=fmt).requires_grad_()
    noise = logistic_noise(logits)
    out, mask = masked_merge(feat, logits, coarse, noise=noise)
    ref_out, ref_mask = masked_merge_reference(feat, logits, coarse, noise=noise)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    assert_float32_grads_match_float64(feat, logits, coarse, noise)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)])
def test_empty_maps(device, shape):
    n, c, h, w = shape
    feat = torch.randn(shape, device=device, requires_grad=True)
    logits = torch.randn(n, 1, h, w, device=device, requires_grad=True)
    coarse = torch.randn(n, c, 3, 2, device=device, requires_grad=True)
    out, mask = masked_merge(feat, logits, coarse, noise=torch.zeros(n, 1, h, w, device=device))
    assert out.shape == shape and mask.shape == (n, 1, h, w)
    grads = torch.autograd.grad((out.sum() + mask.sum()), [feat, logits, coarse])
    assert [g.shape for g in grads] == [feat.shape, logits.shape, coarse.shape]
    assert all(g.abs().sum() == 0 for g in grads)


@pytest.mark.skipif(not kernels_available()["cpu"], reason="the check is the compiled kernels'")
@pytest.mark.parametrize("coarse_size", [[3, 0], [0, 2]])
def test_backward_refuses_an_empty_coarse_size(coarse_size):
    feat, logits = torch.randn(1, 2, 4, 4), torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"coarse_size must be \[\] or \[h, w\] with h, w > 0"):
        torch.ops.aim.masked_merge_backward(torch.ones_like(feat), None, feat, logits, None, 1.0, coarse_size)


def test_double_backward_is_refused():
    feat = torch.randn(1, 2, 4, 4, requires_grad=True)
    out, _ = masked_merge(feat, torch.randn(1, 1, 4, 4), noise=torch.zeros(1, 1, 4, 4))
    (grad,) = torch.autograd.grad(out.square().sum(), feat, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


def test_dynamo_graph_holds_the_op_once():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    merge = torch.compile(lambda f, lg, c: masked_merge(f, lg, c), fullgraph=True, backend=record)
    merge(torch.randn(1, 3, 9, 7), torch.randn(1, 1, 9, 7), torch.randn(1, 3, 5, 4))
    (graph,) = graphs
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.aim.masked_merge) == 1
    assert all(str(c).startswith(("aim.masked_merge", "<built-in function getitem>")) for c in calls)
