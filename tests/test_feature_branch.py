"""`InferenceFeatureBranch`: T_l's convolutions in fewer launches, the training branch's outputs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from mixed_masks import mixed_mask_model, randomise_batch_norms
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from aim_ext.models import FeatureBranch, InferenceFeatureBranch, fuse_for_inference
from aim_ext.models.topdown import COMPOSE_BELOW

SIZES = [(n, n) for n in range(1, 8)] + [(1, 5), (5, 1), (3, 7), (7, 2), (28, 28)]
COMPOSED, MATMUL = [3, 40, 192], [COMPOSE_BELOW, 320]


class AtenCalls(TorchDispatchMode):
    """Counts the aten ops called under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _branch(channels: int, dtype=torch.float64, seed: int = 0) -> FeatureBranch:
    """A branch with biases far from their initial ones, so the border bias is really tested."""
    torch.manual_seed(seed)
    branch = FeatureBranch(channels).to(dtype).eval()
    with torch.no_grad():
        branch.align.bias.normal_()
        branch.refine.bias.normal_()
    return branch


def _biased(branch: FeatureBranch, s: torch.Tensor) -> torch.Tensor:
    """refine(align(s)) with every bias: `convolutions` plus the bias left to the epilogue ops."""
    conv, bias = branch.convolutions(s), branch.epilogue_bias()
    return conv if bias is None else conv + bias.to(conv.dtype)[:, None, None]


def _input(n, c, h, w, channels_last, dtype=torch.float64, seed=1):
    s = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return s.contiguous(memory_format=torch.channels_last) if channels_last else s


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", COMPOSED + MATMUL)
def test_inference_branch_gives_the_convolutions_in_float64(channels, channels_last):
    branch = _branch(channels)
    fused = branch.fuse()
    assert isinstance(fused, InferenceFeatureBranch) and fused.composed == (channels < COMPOSE_BELOW)
    for h, w in SIZES:
        for n in (1, 3):
            s = _input(n, channels, h, w, channels_last)
            with torch.no_grad():
                expected, got = branch.convolutions(s), _biased(fused, s)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
                assert (fused.epilogue_bias() is None) == fused.composed
                torch.testing.assert_close(fused(s), branch(s), rtol=0, atol=1e-10)
            if channels_last:
                assert got.is_contiguous(memory_format=torch.channels_last), (h, w, n)


@pytest.mark.parametrize(
    "channels,channels_last,expected",
    [
        (40, False, {"convolution": 1, "add_": 1}),
        (40, True, {"convolution": 1, "add_": 1}),
        (320, True, {"addmm": 1, "convolution": 1}),  # refine's bias: in the epilogue op
        (320, False, {"convolution": 2}),
    ],
)
def test_each_route_launches_what_it_says(channels, channels_last, expected):
    """Below COMPOSE_BELOW one conv and the cached bias map's add; above, on channels_last, one
    addmm (the bias inside) and the refine conv without its bias; an NCHW input keeps both
    convolutions. A convolution's bias would be one more launch on CUDA."""
    fused = _branch(channels).fuse()
    s = _input(2, channels, 9, 6, channels_last)
    assert hasattr(fused, "composed_weight") == (channels < COMPOSE_BELOW)
    with torch.no_grad():
        fused.convolutions(s)  # the bias map is made on the first call
        with AtenCalls() as mode:
            fused.convolutions(s)
    counted = {k: v for k, v in mode.calls.items() if k in ("convolution", "addmm", "mm", "add", "add_")}
    assert counted == expected


def test_composed_weights_are_the_float64_product_rounded_once():
    branch = _branch(40, torch.float32)
    fused = branch.fuse()
    refine, align = branch.refine.weight.double(), branch.align.weight.double()[:, :, 0, 0]
    assert fused.composed_weight.dtype == torch.float32
    assert torch.equal(fused.composed_weight, torch.einsum("omyx,mc->ocyx", refine, align).float())


@pytest.mark.parametrize("channels", [40, 320])
def test_bfloat16_autocast_keeps_channels_last(channels):
    branch = _branch(channels, torch.float32)
    fused = branch.fuse()
    s = _input(2, channels, 7, 5, True, torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = _biased(fused, s), branch.convolutions(s)
        fused.convolutions(s)  # the cached bias map, in bfloat16
    assert got.dtype == expected.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = branch.convolutions(s)
    torch.testing.assert_close(got.float(), exact, rtol=0.05, atol=0.1)
    torch.testing.assert_close(expected.float(), exact, rtol=0.05, atol=0.1)


def test_fused_branch_shares_nothing_and_follows_to_and_load_state_dict():
    branch = _branch(40, torch.float32)
    fused = branch.fuse()
    assert not {id(t) for t in fused.parameters()} & {id(t) for t in branch.parameters()}
    assert fused.fuse() is fused
    s = _input(1, 40, 6, 6, False)
    fused.double()  # the buffers move with the parameters
    assert fused.composed_weight.dtype == fused.border_bias.dtype == torch.float64
    with torch.no_grad():
        before = fused.convolutions(s)  # caches the float64 bias map
        other = _branch(40, seed=3).fuse()
        fused.load_state_dict(other.state_dict())
        torch.testing.assert_close(fused.convolutions(s), other.convolutions(s), rtol=0, atol=0)
    assert not torch.allclose(before, fused.convolutions(s))


def test_other_convolutions_are_refused_and_left_unfused_in_a_model():
    branch = _branch(40)
    branch.refine = nn.Conv2d(256, 256, 3, padding=2, dilation=2).double()
    assert not branch.standard_convolutions()
    with pytest.raises(ValueError, match="cannot fuse a feature branch"):
        branch.fuse()
    model = mixed_mask_model("convnext_atto", 2, num_classes=5, image_size=(64, 64)).double()
    model.stages[-1].features.refine = branch.refine
    fused = fuse_for_inference(model)
    assert [type(s.features) for s in fused.stages] == [InferenceFeatureBranch, FeatureBranch]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,stop_stage", [("convnext_atto", 0), ("resnet18", 1)])
def test_fused_model_in_channels_last_gives_the_unfused_outputs_in_float64(name, stop_stage):
    """Both routes in one model (convnext_atto: 40, 80, 160 channels composed, 320 a matrix product;
    resnet18: 128, 256 composed, 512 a matrix product), on channels_last maps."""
    size = 64
    model = mixed_mask_model(
        name, stop_stage, num_classes=5, image_size=(size, size), prepare=randomise_batch_norms
    )
    model = model.double().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits, masks, merged = model.predict(x, merged_map=True)
    fused = fuse_for_inference(model)
    assert [s.features.composed for s in fused.stages] == [False] + [True] * (len(fused.stages) - 1)
    for mode in ("off", "on"):
        fused.sparse_inference = mode
        with torch.no_grad():
            got, _ = fused.predict(x)
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-10)
    with torch.no_grad():
        got_logits, _, got_merged = fused.predict(x, merged_map=True)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_merged, merged, rtol=0, atol=1e-10)
    assert got_merged.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels", [40, 320])
def test_on_cuda_eager_in_a_cuda_graph_and_under_bfloat16_autocast(channels):
    """A graph captured with no bias map kept for its size makes the map in the graph and does not
    keep it (its values exist only once replayed); the next eager call makes and keeps one."""
    branch = _branch(channels).cuda()  # float64: no TF32
    fused = branch.fuse()
    s = _input(2, channels, 7, 5, True).cuda()
    with torch.no_grad():
        expected = branch.convolutions(s)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fused.convolutions(s)
        torch.cuda.current_stream().wait_stream(side)
        fused._bias_maps.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused.convolutions(s)
        assert not fused._bias_maps
        graph.replay()
        bias = fused.epilogue_bias()
        captured = captured if bias is None else captured + bias[:, None, None]
        torch.testing.assert_close(captured, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(_biased(fused, s), expected, rtol=0, atol=1e-10)
        assert len(fused._bias_maps) == (channels < COMPOSE_BELOW)
    branch32 = _branch(channels, torch.float32).cuda()
    fused32, s32 = branch32.fuse(), s.float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = _biased(fused32, s32)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(got.float(), branch32.convolutions(s32), rtol=0.05, atol=0.1)
