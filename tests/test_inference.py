"""`fuse_for_inference` and the pooled head: evaluation-only models with the unfused model's outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_REASON
from mixed_masks import mixed_mask_model, randomise_batch_norms
from timm.utils.model import reparameterize_model
from torch import nn

import aim_ext
from aim_ext.models import (
    AIM,
    FeatureBranch,
    InferenceFeatureBranch,
    InferenceMaskEstimator,
    MaskEstimator,
    architecture,
    create_model,
    fold_batch_norms,
    fuse_for_inference,
    load_model_state,
)
from aim_ext.ops import kernels_available


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _aim(name: str, stop_stage: int, size: int) -> AIM:
    return mixed_mask_model(name, stop_stage, image_size=(size, size), prepare=randomise_batch_norms).double()


@pytest.mark.parametrize(
    "name,stop_stage,size",
    [
        ("resnet18", 1, 96),
        ("resnet18", 3, 131),
        ("convnext_atto", 0, 64),
        ("convnext_atto", 1, 96),
        ("efficientnet_b0", 2, 96),
    ],
)
def test_fused_aim_gives_the_unfused_outputs_in_float64(name, stop_stage, size):
    model = _aim(name, stop_stage, size)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        logits, masks, _ = model.predict(x, merged_map=True)
        mask_logits = [s.mask_logits for s in model.forward_topdown(x)]
    fused = fuse_for_inference(model)
    assert _batch_norms(fused) == 0 < _batch_norms(model)
    assert all(isinstance(s.mask_estimator, InferenceMaskEstimator) for s in fused.stages)
    assert all(isinstance(s.mask_estimator, MaskEstimator) for s in model.stages)  # the original stays
    assert all(isinstance(s.features, InferenceFeatureBranch) for s in fused.stages)
    assert all(type(s.features) is FeatureBranch for s in model.stages)
    for mode in ("off", "on"):
        fused.sparse_inference = mode
        with torch.no_grad():
            got, got_masks = fused.predict(x)
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-10)
        for a, b, z in zip(got_masks, masks, mask_logits, strict=True):
            assert 0 < float(b.mean()) < 1
            assert torch.equal(a[z.abs() >= 1e-6], b[z.abs() >= 1e-6])
        torch.testing.assert_close(fused(x), logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_atto", "densenet121"])
def test_fused_vanilla_gives_the_unfused_outputs_in_float64(name):
    model = randomise_batch_norms(create_model(name, num_classes=7)).eval().double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fused = fuse_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-10)
    if name in ("resnet50", "efficientnet_b0"):  # every BatchNorm follows a convolution
        assert _batch_norms(fused) == 0 < _batch_norms(model)
    if name == "densenet121":  # pre-activation: the norms before a convolution stay
        assert 0 < _batch_norms(fused) < _batch_norms(model)


def test_fold_rounds_once_from_float64():
    """Folded in float32, then cast to bfloat16: the folded weight is the float64 product rounded."""
    model = randomise_batch_norms(create_model("resnet18", num_classes=3)).eval()
    fused = fuse_for_inference(model)
    bn, conv = model.bn1, model.conv1
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (conv.weight.double() * scale.view(-1, 1, 1, 1)).float()
    assert torch.equal(fused.conv1.weight, expected)


@pytest.mark.parametrize("size", [224, 200, 299])
def test_pooled_head_equals_the_dense_head_at_odd_sizes(size):
    """At 299 px the merge resizes 10 -> 19 -> 38 -> 75: the footprints are uneven."""
    model = _aim("resnet18", 1, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        dense, masks, merged = model.predict(x, merged_map=True)
        torch.testing.assert_close(model.head(merged.mean(dim=(2, 3))), dense, rtol=0, atol=0)
        for mode in ("off", "on"):
            model.sparse_inference = mode
            pooled, pooled_masks = model.predict(x)
            torch.testing.assert_close(pooled, dense, rtol=0, atol=1e-10)
            assert all(torch.equal(a, b) for a, b in zip(pooled_masks, masks, strict=True))
    assert [tuple(m.shape[-2:]) for m in masks] == (
        [(7, 7), (14, 14), (28, 28), (56, 56)]
        if size == 224
        else [(7, 7), (13, 13), (25, 25), (50, 50)]
        if size == 200
        else [(10, 10), (19, 19), (38, 38), (75, 75)]
    )


def test_evaluation_builds_p_t_only_when_asked(monkeypatch):
    model = _aim("resnet18", 2, 64).float()
    x = torch.randn(2, 3, 64, 64)
    built = []
    dense_head = AIM.forward_head
    monkeypatch.setattr(AIM, "forward_head", lambda self, merged: built.append(1) or dense_head(self, merged))
    with torch.no_grad():
        model(x)
        model.predict(x)
        assert built == []
        model.predict(x, merged_map=True)
        assert built == [1]
        seen = []
        handle = model.merged_map.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        model(x)
        handle.remove()
        assert built == [1, 1] and seen == [(2, 256, 8, 8)]
    model(x)  # autograd recording: the differentiable dense path
    assert built == [1, 1, 1]


def test_gradcam_still_sees_p_t():
    from aim_ext.explain.attributions import attribute

    model = _aim("resnet18", 2, 64).float()
    x = torch.randn(2, 3, 64, 64)
    heat = attribute(model, x, torch.tensor([0, 1]), "gradcam")
    assert heat.shape[0] == 2 and torch.isfinite(heat).all() and heat.abs().sum() > 0


def test_fused_model_refuses_training_and_gradients():
    model = _aim("resnet18", 3, 64).float()
    fused = fuse_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="fused for inference .* cannot train"):
        fused.train()
    assert fused.eval() is fused and not fused.training
    with pytest.raises(RuntimeError, match="fused for inference and computes no gradients"):
        fused(x.requires_grad_())
    fused.head.fc.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="fused for inference and computes no gradients"):
        fused(torch.randn(1, 3, 64, 64))
    vanilla = fuse_for_inference(create_model("resnet18", num_classes=3).eval())
    with pytest.raises(RuntimeError, match="ResNet is fused for inference"):
        vanilla.train()


def test_a_fused_checkpoint_does_not_load_into_a_training_model():
    model = _aim("resnet18", 3, 64).float()
    fused = fuse_for_inference(model)
    assert architecture(fused) == "resnet18+AIM[3] (fused for inference)"
    state = {"architecture": architecture(fused), "model": fused.state_dict()}
    with pytest.raises(ValueError, match=r"holds a resnet18\+AIM\[3\] \(fused for inference\) model"):
        load_model_state(create_model("resnet18", num_classes=10, stop_stage=3), state)


def test_timm_reparameterize_model_finds_the_fuse_methods():
    model = _aim("resnet18", 2, 64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model.predict(x, merged_map=True)[0]
    alone = reparameterize_model(model)  # the estimators and feature branches (children with fuse())
    assert all(isinstance(s.mask_estimator, InferenceMaskEstimator) for s in alone.stages)
    assert all(isinstance(s.features, InferenceFeatureBranch) for s in alone.stages)
    nested = reparameterize_model(nn.Sequential(model))  # AIM.fuse() itself: everything
    assert _batch_norms(nested) == 0
    assert all(isinstance(s.features, InferenceFeatureBranch) for s in nested[0].stages)
    with torch.no_grad():
        torch.testing.assert_close(alone(x), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(nested(x), expected, rtol=0, atol=1e-10)


def test_sparse_mode_is_checked():
    model = _aim("resnet18", 3, 64).float()
    model.sparse_inference = "sometimes"
    with pytest.raises(ValueError, match="sparse inference must be one of auto, on, off"):
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))


def test_top_level_entry_point():
    assert aim_ext.fuse_for_inference is fuse_for_inference


@pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)
@pytest.mark.parametrize("sparse", ["on", "off"])
def test_fused_model_on_cuda_in_a_cuda_graph_and_compiled(sparse):
    """Concurrent branches, the pooled head and the sparse branch captured in one CUDA graph, and
    under torch.compile, against the unfused model's dense path in float32."""
    model = mixed_mask_model("resnet18", 2, image_size=(96, 96), prepare=randomise_batch_norms).cuda()
    fused = fuse_for_inference(model)
    fused.sparse_inference = sparse
    x = torch.randn(2, 3, 96, 96, device="cuda")
    with torch.no_grad():
        expected, masks, _ = model.predict(x, merged_map=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fused(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused(x)
        graph.replay()
        torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(fused, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparse", ["on", "off"])
def test_fused_model_compiles_in_one_graph(sparse):
    model = _aim("resnet18", 2, 64).float()
    fused = fuse_for_inference(model)
    fused.sparse_inference = sparse
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.predict(x, merged_map=True)[0]
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fused_model_pickles_and_still_refuses_training(tmp_path):
    fused = fuse_for_inference(_aim("resnet18", 3, 64).float())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = fused(x)  # after a call: what the model keeps between calls pickles too
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)  # our own file
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot train"):
        loaded.train()


def test_only_batch_norms_with_one_call_site_and_their_own_conv_fold():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.other = (
                nn.Conv2d(3, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.Conv2d(3, 4, 1),
            )
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):  # conv feeds bn and is called again; bn2 follows a conv read twice
            y = self.other(x)
            return self.bn(self.conv(x)) + self.conv(x) + self.bn2(y) + y

    model = randomise_batch_norms(Shared()).eval().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert fold_batch_norms(model) == 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_evaluation_without_autograd_writes_no_features():
    """P_T in evaluation comes from topdown_epilogue_inference: T_l(S_l) is not written."""
    model = _aim("resnet18", 2, 64).float()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = model.forward_topdown(x)
        assert all(s.features is None for s in stages)
        logits, _, merged = model.predict(x, merged_map=True)
    recorded = model.forward_topdown(x)  # autograd on: the training op, features kept
    assert all(s.features is not None for s in recorded)
    torch.testing.assert_close(merged, recorded[-1].merged.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_convolution_bias_is_rounded_the_same_on_every_path(dtype):
    """A fused model whose feature branches leave refine's bias to the epilogue (512 input channels,
    `epilogue_bias`): P_T and the pooled logits are the same bits with and without torch.no_grad
    (the evaluation op against the training op fed conv + bias.to(dtype)), and the pooled head's
    op given the bias equals it given conv + bias.to(dtype)."""
    model = _aim("resnet18", 3, 64).float()
    fused = fuse_for_inference(model).to(dtype)
    assert any(s.features.epilogue_bias() is not None for s in fused.stages)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(21)).to(dtype)
    with torch.no_grad():
        _, _, without_grad = fused.predict(x, merged_map=True)
    _, _, with_grad = fused.predict(x, merged_map=True)  # nothing requires grad: nothing records
    assert torch.equal(without_grad, with_grad)
    stage = fused.stages[0]
    f, s = stage.features, fused.stage_inputs(x)[0]
    with torch.no_grad():
        conv, logits = f.convolutions(s), stage.mask_estimator(s)
        weight = torch.rand(conv.shape[-2:], generator=torch.Generator().manual_seed(22))
        given = aim_ext.ops.pooled_epilogue(
            conv, f.norm.weight, f.norm.bias, logits, weight, conv_bias=f.refine.bias
        )
        added = conv + f.refine.bias.to(dtype)[:, None, None]
        expected = aim_ext.ops.pooled_epilogue(added, f.norm.weight, f.norm.bias, logits, weight)
    assert torch.equal(given[0], expected[0])
