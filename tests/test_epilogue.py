"""The top-down epilogue: the reference (the feature branch's LayerNorm and GELU, then the masked
merge) and the op torch.ops.aim.topdown_epilogue, its compiled kernels checked against it."""

import random
from typing import NamedTuple

import pytest
import torch
from conftest import devices
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from aim_ext.models.topdown import TopDownStage
from aim_ext.ops import (
    kernels_available,
    layer_norm_gelu,
    logistic_noise,
    masked_merge,
    topdown_epilogue,
    topdown_epilogue_inference,
    topdown_epilogue_reference,
)
from aim_ext.ops.topdown_epilogue import LAYER_NORM_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_gelu_is_timm_layernorm2d_then_gelu(dtype, channels_last):
    """timm's modules in float32, rounded once to the input's dtype (as the fused op computes)."""
    conv = torch.randn(2, 24, 5, 7, dtype=dtype) * 3 + 1
    if channels_last:
        conv = conv.contiguous(memory_format=torch.channels_last)
    norm = LayerNorm2d(24)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    expected = nn.GELU()(norm(conv.float())).to(dtype)
    torch.testing.assert_close(layer_norm_gelu(conv, norm.weight, norm.bias), expected)


def test_float64_by_hand():
    conv = torch.randn(3, 16, 4, 6, dtype=torch.float64)
    weight, bias = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    mean = conv.mean(1, keepdim=True)
    var = conv.var(1, unbiased=False, keepdim=True)
    y = (conv - mean) / torch.sqrt(var + 1e-6) * weight[:, None, None] + bias[:, None, None]
    gelu = 0.5 * y * (1 + torch.erf(y / 2**0.5))
    torch.testing.assert_close(layer_norm_gelu(conv, weight, bias), gelu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
def test_epilogue_matches_the_stage_it_replaces(training):
    stage = TopDownStage(8, width=32).train(training)
    nn.init.normal_(stage.features.norm.weight)
    s, coarse = torch.randn(2, 8, 9, 7), torch.randn(2, 32, 5, 4)
    branch = stage.features
    conv = branch.refine(branch.align(s))
    logits = stage.mask_estimator(s)
    noise = logistic_noise(logits) if training else None
    out, mask, features = topdown_epilogue_reference(
        conv, branch.norm.weight, branch.norm.bias, logits, coarse, noise=noise, temperature=0.7
    )
    expected_features = branch(s)
    expected_out, expected_mask = masked_merge(
        expected_features, logits, coarse, noise=noise, temperature=0.7
    )
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(out, expected_out)


def test_gradients_in_float64():
    conv = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 1, 3, 5, dtype=torch.float64)

    def f(conv, weight, bias, coarse):
        out, _, features = topdown_epilogue_reference(conv, weight, bias, logits, coarse)
        return out, features

    assert torch.autograd.gradcheck(f, (conv, weight, bias, coarse))


def test_bad_layer_norm_arguments_are_named():
    conv = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(4,\)"):
        layer_norm_gelu(conv, torch.ones(5), torch.zeros(4))
    with pytest.raises(ValueError, match="conv must be 4-D"):
        layer_norm_gelu(conv[0], torch.ones(4), torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# The op: compiled kernels against the reference in the same dtype and against float64.

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Gradient tolerance against float64, relative to the gradient's magnitude, per gradient dtype.
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LEAVES = ("conv", "ln_weight", "ln_bias", "logits", "coarse")


def call(fn, args: dict):
    """``fn`` (topdown_epilogue or its reference) on the arguments of ``Case.make``."""
    return fn(
        args["conv"],
        args["ln_weight"],
        args["ln_bias"],
        args["logits"],
        args["coarse"],
        noise=args["noise"],
        temperature=args["temperature"],
        eps=args["eps"],
    )


class Case(NamedTuple):
    """One fuzzed topdown_epilogue call, derived from its seed alone."""

    dtype: torch.dtype
    weight_dtype: torch.dtype  # float32 with half-precision conv: the LayerNorm under autocast
    channels_last: bool
    training: bool
    with_coarse: bool
    strided: bool  # conv, logits and coarse are views that skip every second channel and column

    @classmethod
    def from_seed(cls, seed: int) -> "Case":
        rng = random.Random(seed)
        dtype = rng.choice(DTYPES)
        weight_dtype = torch.float32 if rng.random() < 0.3 else dtype
        return cls(dtype, weight_dtype, *(rng.random() < p for p in (0.5, 0.6, 0.7, 0.35)))

    def make(self, seed: int, device: str) -> dict:
        """The op's arguments: C = 1, odd and even C; coarse maps smaller, equal and larger than
        H x W; random LayerNorm weights and a conv map with a random scale and offset."""
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        n, h, w = rng.randint(1, 3), rng.randint(1, 17), rng.randint(1, 17)
        c = 1 if rng.random() < 0.15 else rng.randint(2, 70)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        def randn(shape, dtype=self.dtype, scale=1.0, offset=0.0):
            if self.strided:
                shape = (shape[0], 2 * shape[1], shape[2], 2 * shape[3])
            t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
            t = t.to(device, dtype).contiguous(memory_format=fmt)
            return t[:, ::2, :, ::2] if self.strided else t

        scale, offset = rng.choice([0.1, 1.0, 7.0]), rng.uniform(-3, 3)
        conv = randn((n, c, h, w), scale=scale, offset=offset)
        weight, bias = (
            torch.randn(c, generator=gen, dtype=torch.float64).to(device, self.weight_dtype) for _ in "wb"
        )
        logits = randn((n, 1, h, w), dtype=rng.choice([self.dtype, torch.float32]))
        coarse = (
            randn((n, c, rng.randint(1, 2 * h + 1), rng.randint(1, 2 * w + 1))) if self.with_coarse else None
        )
        noise = None
        if self.training:  # Logistic(0, 1), as logistic_noise draws it, from the seed
            u = torch.rand(n, 1, h, w, generator=gen).clamp_(1e-6, 1 - 1e-6)
            noise = (u.log() - (-u).log1p()).to(device)
        return {
            "conv": conv,
            "ln_weight": weight,
            "ln_bias": bias,
            "logits": logits,
            "coarse": coarse,
            "noise": noise,
            "temperature": rng.choice([1.0, 0.5, 2.3]),
            "eps": rng.choice([LAYER_NORM_EPS, 1e-5]),
        }


def _case_id(seed: int) -> str:
    case = Case.from_seed(seed)
    parts = [str(seed), str(case.dtype)[6:]]
    if case.weight_dtype != case.dtype:
        parts.append(f"w{str(case.weight_dtype)[6:]}")
    parts += [
        "channels_last" if case.channels_last else "nchw",
        "train" if case.training else "eval",
        "coarse" if case.with_coarse else "top",
    ]
    return "-".join(parts + (["strided"] if case.strided else []))


FUZZED = pytest.mark.parametrize("seed", [pytest.param(seed, id=_case_id(seed)) for seed in range(30)])


def layer_norm_amplification(conv: Tensor, eps: float) -> Tensor:
    """Per pixel (N, 1, H, W): rstd * max_C |x|, how much LayerNorm magnifies a rounding of the
    mean (one unit in the last place of |x|) in its output x_hat. Pixels whose channels lie far
    from zero and close together (the fuzzed cases have some: std 0.02 around -2.2, or C = 1) are
    ill-conditioned, and two correct float32 computations that sum in another order differ there
    by more than a fixed tolerance."""
    x = conv.detach().double().cpu()
    rstd = (x.var(dim=1, unbiased=False, keepdim=True) + eps).rsqrt()
    return rstd * x.abs().amax(dim=1, keepdim=True)


def rounding_slack(dtype: torch.dtype, scale: Tensor | float) -> Tensor | float:
    """16 units of rounding of ``dtype`` times ``scale``: the part of a float32 (or float64) error
    that the input's conditioning, not the kernel, decides. Zero for half precision, which is
    checked in units in the last place of its own."""
    unit = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}.get(dtype, 0.0)
    return 16 * unit * scale


def assert_matches_reference(
    got: Tensor, want: Tensor, rounded_from: Tensor | None = None, slack: Tensor | float = 0.0
) -> None:
    """float32 and float64 to rounding, plus ``slack`` (broadcast to the shape) where the input
    is ill-conditioned; half precision to one unit in the last place of ``want``, or of
    ``rounded_from``, a term that was rounded before ``want`` was summed from it."""
    if got.dtype in (torch.float32, torch.float64):
        tol = 1e-5 if got.dtype == torch.float32 else 1e-12
        got, want = got.double().cpu(), want.double().cpu()
        excess = (got - want).abs() - (tol + tol * want.abs() + slack)
        worst = int(excess.argmax())
        assert excess.max() <= 0, (
            f"{int((excess > 0).sum())} of {got.numel()} elements differ by more than the tolerance, "
            f"e.g. {got.flatten()[worst].item()} != {want.flatten()[worst].item()}"
        )
        return
    eps = torch.finfo(got.dtype).eps
    got, want = got.double().cpu(), want.double().cpu()
    size = want.abs() + 1 + (0 if rounded_from is None else rounded_from.double().cpu().abs())
    excess = (got - want).abs() - eps * size
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{int((excess > 0).sum())} of {got.numel()} elements differ by more than one unit in the "
        f"last place, e.g. {got.flatten()[worst].item()} != {want.flatten()[worst].item()}"
    )


def forward_slack(args: dict) -> Tensor | float:
    """The features' and the output's rounding slack: the amplified mean times the LN weight."""
    weight = args["ln_weight"].detach().abs().max().item()
    amplification = layer_norm_amplification(args["conv"], args["eps"])
    return rounding_slack(args["conv"].dtype, amplification * weight)


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_forward_matches_reference(device, seed):
    case = Case.from_seed(seed)
    args = case.make(seed, device)
    conv = args["conv"]
    out, mask, features = call(topdown_epilogue, args)
    ref_out, ref_mask, ref_features = call(topdown_epilogue_reference, args)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    for name, t in (("out", out), ("mask", mask), ("features", features)):
        assert t.dtype == conv.dtype and t.device == conv.device, name
        assert t.is_contiguous(memory_format=fmt), name
    assert out.shape == features.shape == conv.shape and mask.shape == args["logits"].shape
    assert torch.equal(mask, ref_mask)
    slack = forward_slack(args)
    assert_matches_reference(features, ref_features, slack=slack)
    assert_matches_reference(out, ref_out, rounded_from=ref_features * ref_mask, slack=slack)


@pytest.mark.parametrize("device", devices())
def test_mask_at_zero(device):
    """mask = 1[z >= 0]: zero and negative zero give 1, a tiny negative z gives 0."""
    conv = torch.randn(1, 3, 1, 5, device=device)
    weight, bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    logits = torch.tensor([-1.0, -0.0, 0.0, 1e-30, -1e-30], device=device).reshape(1, 1, 1, 5)
    _, mask, _ = topdown_epilogue(conv, weight, bias, logits)
    assert mask.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    noise = torch.tensor([1.0, 0.0, -0.0, -2e-30, 0.0], device=device).reshape(1, 1, 1, 5)
    _, mask, _ = topdown_epilogue(conv, weight, bias, logits, noise=noise, temperature=0.3)
    assert mask.flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def float64_grads(args: dict, names: list[str], grad_out, grad_mask, grad_features) -> tuple:
    """Gradients of the reference with respect to ``names``, all in float64 on the CPU; a ``None``
    upstream gradient leaves its output out of the loss."""
    a64 = {k: v.detach().double().cpu() if isinstance(v, Tensor) else v for k, v in args.items()}
    for name in names:
        a64[name].requires_grad_()
    outputs = call(topdown_epilogue_reference, a64)
    loss = sum(
        (t * g.double().cpu()).sum()
        for t, g in zip(outputs, (grad_out, grad_mask, grad_features), strict=True)
        if g is not None
    )
    return torch.autograd.grad(loss, [a64[k] for k in names], allow_unused=True, materialize_grads=True)


def assert_grads_match(args: dict, names: list[str], grads, expected, upstream=None) -> None:
    """Each gradient in its input's dtype and shape, and within GRAD_TOL of float64 relative to its
    magnitude; the logits' one at conv's precision, as it sums the features rounded to conv's dtype.
    conv's float gradient may also differ by its rounding slack (``upstream``: the gradients of
    out, mask and features): rstd * (1 + amplification) * the largest gradient reaching x_hat."""
    for name, got, want in zip(names, grads, expected, strict=True):
        assert got.dtype == args[name].dtype and got.shape == args[name].shape, name
        tol = GRAD_TOL[got.dtype]
        if name == "logits":
            tol = max(tol, GRAD_TOL[args["conv"].dtype])
        atol = tol * max(1.0, want.abs().max().item())
        if name == "conv" and upstream is not None:
            x = args["conv"].detach().double().cpu()
            rstd = (x.var(dim=1, unbiased=False, keepdim=True) + args["eps"]).rsqrt()
            reaching = sum(g.detach().double().abs().max().item() for g in upstream if g is not None)
            g = reaching * args["ln_weight"].detach().abs().max().item()
            amplification = layer_norm_amplification(args["conv"], args["eps"])
            atol = atol + rounding_slack(got.dtype, rstd * (1 + amplification) * g)
        excess = (got.double().cpu() - want).abs() - atol
        assert excess.max() <= 0, (
            f"{name}: {int((excess > 0).sum())} of {got.numel()} elements differ from float64 by "
            f"more than the tolerance, at most by {float((got.double().cpu() - want).abs().max()):.3g}"
        )


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_backward_matches_float64_reference(device, seed):
    case = Case.from_seed(seed)
    args = case.make(seed, device)
    names = [k for k in LEAVES if args[k] is not None]
    for name in names:
        args[name].requires_grad_()
    outputs = call(topdown_epilogue, args)
    # Upstream gradients for out, mask and features; some left out (None reaches the backward).
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    used = [rng.random() < 0.8, rng.random() < 0.7]
    used.append(not used[0] or rng.random() < 0.6)
    upstream = [
        torch.randn(t.shape, generator=gen).to(device, t.dtype) if u else None
        for t, u in zip(outputs, used, strict=True)
    ]
    loss = sum((t * g).sum() for t, g in zip(outputs, upstream, strict=True) if g is not None)
    grads = torch.autograd.grad(loss, [args[k] for k in names])
    assert_grads_match(args, names, grads, float64_grads(args, names, *upstream), upstream)
    if not case.training:
        assert torch.count_nonzero(grads[names.index("logits")]) == 0, "evaluation masks pass no gradient"


@pytest.mark.parametrize("device", devices())
def test_bfloat16_conv_with_float32_layer_norm(device):
    """As under autocast: float32 LayerNorm parameters keep float32 gradients."""
    conv = (torch.randn(2, 24, 9, 7, device=device) * 2 + 1).bfloat16().requires_grad_()
    weight = torch.randn(24, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    logits = torch.randn(2, 1, 9, 7, device=device, requires_grad=True)
    coarse = torch.randn(2, 24, 5, 4, device=device, dtype=torch.bfloat16, requires_grad=True)
    args = {
        "conv": conv,
        "ln_weight": weight,
        "ln_bias": bias,
        "logits": logits,
        "coarse": coarse,
        "noise": logistic_noise(logits),
        "temperature": 0.5,
        "eps": LAYER_NORM_EPS,
    }
    out, mask, features = call(topdown_epilogue, args)
    ref_out, ref_mask, ref_features = call(topdown_epilogue_reference, args)
    assert out.dtype == mask.dtype == features.dtype == torch.bfloat16
    assert torch.equal(mask, ref_mask)
    assert_matches_reference(features, ref_features)
    assert_matches_reference(out, ref_out, rounded_from=ref_features * ref_mask)
    upstream = [torch.randn_like(t) for t in (out, mask, features)]
    loss = sum((t * g).sum() for t, g in zip((out, mask, features), upstream, strict=True))
    grads = torch.autograd.grad(loss, [conv, weight, bias, logits, coarse])
    bf16, f32 = torch.bfloat16, torch.float32
    assert [g.dtype for g in grads] == [bf16, f32, f32, f32, bf16]
    assert_grads_match(args, list(LEAVES), grads, float64_grads(args, list(LEAVES), *upstream))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last):
    """The op's own backward (the CPU kernel) against finite differences."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = (torch.randn(2, 5, 4, 3, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=fmt)
    weight, bias = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    coarse = torch.randn(2, 5, 3, 7, dtype=torch.float64).contiguous(memory_format=fmt)
    inputs = [t.requires_grad_() for t in (conv, weight, bias, coarse)]
    logits = torch.randn(2, 1, 4, 3, dtype=torch.float64)

    def epilogue(noise):
        def f(conv, weight, bias, coarse):
            return topdown_epilogue(
                conv, weight, bias, logits, coarse, noise=noise, temperature=0.7, eps=1e-3
            )

        return f

    # Evaluation: the logits' gradient is zero by design (the mask is a constant).
    assert torch.autograd.gradcheck(epilogue(None), inputs)
    # Training: the straight-through logits gradient is not the derivative of the binary mask,
    # so the logits stay out of the check (the backward tests compare it with the reference).
    assert torch.autograd.gradcheck(epilogue(logistic_noise(logits).double()), inputs)


def _opcheck_samples(device: str) -> list[tuple]:
    def randn(*shape, dtype=torch.float32, fmt=torch.contiguous_format):
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    cl = torch.channels_last
    return [
        # training, every tensor input requiring grad, a coarse map finer in W
        (
            randn(2, 6, 9, 7) * 3 + 1,
            randn(6),
            randn(6),
            randn(2, 1, 9, 7),
            randn(2, 6, 5, 11),
            randn(2, 1, 9, 7),
            0.5,
            1e-5,
        ),
        # evaluation: bfloat16 channels_last conv, float32 LayerNorm, no coarse map
        (
            randn(2, 5, 7, 9, dtype=torch.bfloat16, fmt=cl),
            randn(5),
            randn(5),
            randn(2, 1, 7, 9),
            None,
            None,
            1.0,
            LAYER_NORM_EPS,
        ),
        # evaluation: float16 channels_last with a coarse map, C = 1
        (
            randn(1, 1, 6, 5, dtype=torch.float16, fmt=cl),
            randn(1, dtype=torch.float16),
            randn(1, dtype=torch.float16),
            randn(1, 1, 6, 5, dtype=torch.float16),
            randn(1, 1, 3, 3, dtype=torch.float16, fmt=cl),
            None,
            1.0,
            LAYER_NORM_EPS,
        ),
    ]


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_inference_op_is_the_evaluation_epilogue_without_features(device, seed):
    """topdown_epilogue_inference: the same kernels, the same bits as topdown_epilogue's out and
    mask with no noise, and no features tensor; no gradients."""
    args = Case.from_seed(seed).make(seed, device)
    args["noise"] = None
    conv, weight, bias, logits, coarse = (
        args[k] for k in ("conv", "ln_weight", "ln_bias", "logits", "coarse")
    )
    with torch.no_grad():
        out, mask, _ = topdown_epilogue(conv, weight, bias, logits, coarse, eps=args["eps"])
        got_out, got_mask = topdown_epilogue_inference(conv, weight, bias, logits, coarse, eps=args["eps"])
    assert torch.equal(got_out, out) and torch.equal(got_mask, mask)
    assert got_out.stride() == out.stride()
    torch.library.opcheck(
        torch.ops.aim.topdown_epilogue_inference.default, (conv, weight, bias, logits, coarse, args["eps"])
    )
    with pytest.raises(RuntimeError, match="computes no gradients"):
        topdown_epilogue_inference(conv.requires_grad_(), weight, bias, logits, coarse)


@pytest.mark.parametrize("device", devices())
@FUZZED
def test_inference_op_adds_the_convolution_bias(device, seed):
    """conv_bias, the convolution's bias, is added to conv inside topdown_epilogue_inference: the
    reference on conv + conv_bias (in the accumulation type) to rounding, the same mask."""
    args = Case.from_seed(seed).make(seed, device)
    args["noise"], eps = None, args["eps"]
    conv, weight, bias, logits, coarse = (
        args[k] for k in ("conv", "ln_weight", "ln_bias", "logits", "coarse")
    )
    gen = torch.Generator().manual_seed(seed)
    conv_bias = (torch.randn(conv.shape[1], generator=gen) * 2).to(device, args["ln_weight"].dtype)
    with torch.no_grad():
        out, mask = topdown_epilogue_inference(
            conv, weight, bias, logits, coarse, eps=eps, conv_bias=conv_bias
        )
        ref_out, ref_mask, ref_features = topdown_epilogue_reference(
            conv, weight, bias, logits, coarse, eps=eps, conv_bias=conv_bias
        )
        without, _ = topdown_epilogue_inference(conv, weight, bias, logits, coarse, eps=eps)
    assert torch.equal(mask, ref_mask)
    shifted = {**args, "conv": (conv.to(torch.float64) + conv_bias.double()[:, None, None]).to(conv.dtype)}
    assert_matches_reference(
        out, ref_out, rounded_from=ref_features * ref_mask, slack=2 * forward_slack(shifted)
    )
    assert conv.shape[1] == 1 or not torch.equal(out, without)  # the bias changes the features
    torch.library.opcheck(
        torch.ops.aim.topdown_epilogue_inference.default, (conv, weight, bias, logits, coarse, eps, conv_bias)
    )
    with pytest.raises(RuntimeError, match=r"conv_bias must have shape \("):
        topdown_epilogue_inference(conv, weight, bias, logits, coarse, conv_bias=conv_bias[:0])


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for conv, weight, bias, logits, coarse, noise, t, eps in _opcheck_samples(device):
        tensors = [x.requires_grad_() if x is not None else x for x in (conv, weight, bias, logits, coarse)]
        torch.library.opcheck(torch.ops.aim.topdown_epilogue.default, (*tensors, noise, t, eps))


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward(device):
    for conv, weight, bias, logits, coarse, noise, t, eps in _opcheck_samples(device):
        grads = [torch.randn_like(conv), torch.randn_like(logits), torch.randn_like(conv)]
        coarse_size = [] if coarse is None else list(coarse.shape[-2:])
        for grad_mask, grad_features in ((grads[1], grads[2]), (None, None)):
            upstream = (grads[0], grad_mask, grad_features)
            args = (*upstream, conv, weight, bias, logits, noise, t, eps, coarse_size)
            torch.library.opcheck(torch.ops.aim.topdown_epilogue_backward.default, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic(device, channels_last):
    """The same bits from run to run and, on the CPU, whatever the number of threads."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = (torch.randn(4, 64, 33, 31, device=device) * 2 + 1).contiguous(memory_format=fmt)
    weight, bias = torch.randn(64, device=device), torch.randn(64, device=device)
    logits = torch.randn(4, 1, 33, 31, device=device)
    coarse = torch.randn(4, 64, 17, 16, device=device).contiguous(memory_format=fmt)
    leaves = [t.requires_grad_() for t in (conv, weight, bias, logits, coarse)]
    noise = logistic_noise(logits)
    upstream = [torch.randn(s, device=device) for s in (conv.shape, logits.shape, conv.shape)]

    def run():
        outputs = topdown_epilogue(*leaves, noise=noise, temperature=0.7)
        loss = sum((t * g).sum() for t, g in zip(outputs, upstream, strict=True))
        return [*outputs, *torch.autograd.grad(loss, leaves)]

    runs = [run(), run()]
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            for n in sorted({1, 3, threads}):
                torch.set_num_threads(n)
                runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other, strict=True)):
            assert torch.equal(a, b), f"output {i} differs"


def _bad_input_cases() -> list:
    conv, logits = torch.randn(2, 4, 6, 6), torch.randn(2, 1, 6, 6)
    good = {
        "conv": conv,
        "ln_weight": torch.ones(4),
        "ln_bias": torch.zeros(4),
        "logits": logits,
        "coarse": None,
        "noise": None,
        "temperature": 1.0,
        "eps": LAYER_NORM_EPS,
    }
    noise = torch.randn(2, 1, 6, 6)
    cases = [
        ("weight-shape", {"ln_weight": torch.ones(5)}, ValueError, r"ln_weight must have shape \(4,\)"),
        ("bias-2d", {"ln_bias": torch.zeros(1, 4)}, ValueError, r"ln_bias must have shape \(4,\)"),
        (
            "weight-int",
            {"ln_weight": torch.ones(4, dtype=torch.int64)},
            TypeError,
            "ln_weight must be a floating-point tensor",
        ),
        (
            "bias-bool",
            {"ln_bias": torch.zeros(4, dtype=torch.bool)},
            TypeError,
            "ln_bias must be a floating-point tensor",
        ),
        (
            "logits-2-channels",
            {"logits": torch.randn(2, 2, 6, 6)},
            ValueError,
            "logits must have exactly 1 channel",
        ),
        ("coarse-n", {"coarse": torch.randn(3, 4, 3, 3)}, ValueError, r"coarse \(N, C\)"),
        ("coarse-c", {"coarse": torch.randn(2, 5, 3, 3)}, ValueError, r"coarse \(N, C\)"),
        ("coarse-dtype", {"coarse": torch.randn(2, 4, 3, 3).double()}, TypeError, "coarse dtype"),
        ("eps-zero", {"eps": 0.0}, ValueError, "eps must be > 0"),
        ("eps-negative", {"eps": -1e-6}, ValueError, "eps must be > 0"),
        ("temperature-zero", {"noise": noise, "temperature": 0.0}, ValueError, "temperature must be > 0"),
        (
            "temperature-negative",
            {"noise": noise, "temperature": -1.0},
            ValueError,
            "temperature must be > 0",
        ),
        ("conv-3d", {"conv": conv[0]}, ValueError, "conv must be 4-D"),
    ]
    return [
        pytest.param({**good, **change}, error, message, id=name) for name, change, error, message in cases
    ]


@pytest.mark.parametrize("args,error,message", _bad_input_cases())
def test_bad_inputs_name_the_problem(args, error, message):
    with pytest.raises(error, match=message):
        call(topdown_epilogue, args)


@pytest.mark.skipif(not kernels_available()["cpu"], reason="the compiled extension is not built")
@pytest.mark.parametrize("args,error,message", _bad_input_cases())
def test_compiled_kernel_names_the_same_problem(args, error, message):
    """The op called directly, past the Python checks: the C++ checks say the same."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aim.topdown_epilogue(*args.values())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)])
def test_empty_maps(device, training, shape):
    n, c, h, w = shape
    conv = torch.randn(shape, device=device, requires_grad=True)
    weight = torch.randn(c, device=device, requires_grad=True)
    bias = torch.randn(c, device=device, requires_grad=True)
    logits = torch.randn(n, 1, h, w, device=device, requires_grad=True)
    coarse = torch.randn(n, c, 3, 2, device=device, requires_grad=True)
    noise = torch.zeros(n, 1, h, w, device=device) if training else None
    out, mask, features = topdown_epilogue(conv, weight, bias, logits, coarse, noise=noise)
    assert out.shape == features.shape == shape and mask.shape == (n, 1, h, w)
    leaves = [conv, weight, bias, logits, coarse]
    grads = torch.autograd.grad(out.sum() + mask.sum() + features.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def _epilogue(conv, weight, bias, logits, coarse, noise):
    return topdown_epilogue(conv, weight, bias, logits, coarse, noise=noise, temperature=0.5)


def test_torch_compile_fullgraph():
    compiled = torch.compile(_epilogue, fullgraph=True, backend="aot_eager")
    conv = torch.randn(2, 8, 11, 9) * 2 + 1
    weight, bias = torch.randn(8), torch.randn(8)
    logits = torch.randn(2, 1, 11, 9)
    coarse = torch.randn(2, 8, 6, 5)
    leaves = [t.requires_grad_() for t in (conv, weight, bias, logits, coarse)]
    noise = logistic_noise(logits)
    upstream = [torch.randn(s) for s in (conv.shape, logits.shape, conv.shape)]
    results = []
    for fn in (compiled, _epilogue):
        outputs = fn(*leaves, noise)
        loss = sum((t * g).sum() for t, g in zip(outputs, upstream, strict=True))
        results.append([*outputs, *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert all(torch.count_nonzero(g) > 0 for g in results[0][3:])


class _Epilogue(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, conv, logits, coarse):
        return topdown_epilogue(conv, self.weight, self.bias, logits, coarse)


def test_export_keeps_one_op():
    module = _Epilogue(8)
    args = (torch.randn(2, 8, 19, 13), torch.randn(2, 1, 19, 13), torch.randn(2, 8, 10, 7))
    exported = torch.export.export(module, args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("aim.topdown_epilogue.default") == 1
    assert set(targets) == {"aim.topdown_epilogue.default", "<built-in function getitem>"}
    for got, want in zip(exported.module()(*args), module(*args), strict=True):
        assert torch.equal(got, want)


CUDA_ONLY = pytest.mark.skipif(
    not kernels_available()["cuda"], reason="needs CUDA and the compiled CUDA kernels"
)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [256, 512, 600])  # register kernel K=1 / K=2 (bf16), strided kernel
def test_cuda_model_sizes_match_the_cpu_kernel(dtype, channels_last, channels):
    """Model-sized maps on CUDA against the CPU kernel (itself checked against the reference)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = (torch.randn(3, channels, 28, 28) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    weight, bias = torch.randn(channels), torch.randn(channels)
    logits = torch.randn(3, 1, 28, 28).to(dtype)
    coarse = torch.randn(3, channels, 14, 14).to(dtype).contiguous(memory_format=fmt)
    noise = logistic_noise(logits)
    upstream = [torch.randn(s).to(dtype) for s in (conv.shape, logits.shape, conv.shape)]

    def run(device):
        leaves = [t.to(device).detach().requires_grad_() for t in (conv, weight, bias, logits, coarse)]
        outputs = topdown_epilogue(*leaves, noise=noise.to(device), temperature=0.5)
        loss = sum((t.float() * g.to(device).float()).sum() for t, g in zip(outputs, upstream, strict=True))
        return [t.cpu() for t in (*outputs, *torch.autograd.grad(loss, leaves))]

    names = ("out", "mask", "features", "grad_conv", "grad_weight", "grad_bias", "grad_logits", "grad_coarse")
    for name, a, b in zip(names, run("cuda"), run("cpu"), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "mask":
            assert torch.equal(a, b)
        elif name == "grad_weight" or name == "grad_bias":  # sums over 2352 pixels
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item(), msg=name)
        else:
            scale = b.float().abs().max().item() + 1
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=name)
