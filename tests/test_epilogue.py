"""The top-down epilogue reference: the feature branch's LayerNorm and GELU, then the masked merge."""

import pytest
import torch
from timm.layers import LayerNorm2d
from torch import nn

from aim_ext.models.topdown import TopDownStage
from aim_ext.ops import layer_norm_gelu, logistic_noise, masked_merge, topdown_epilogue_reference


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
