"""AIM on one small model of every timm family (tests/families.py; docs/models.md#timm-families):
a training step with the loss, evaluation, `fuse_for_inference`, ONNX export run by onnxruntime,
and `save_pretrained`/`load_model`. The ``core`` families run by default; all of them with
``AIM_EXT_FAMILIES=all``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import timm
import torch
from families import FAMILIES, Family

import aim_ext
from aim_ext.export.onnx_export import export_onnx, run_onnxruntime
from aim_ext.losses import aim_loss
from aim_ext.models import AIM
from aim_ext.models.mask_estimator import MASK_WIDTH
from aim_ext.models.masking import as_nchw, feature_info
from aim_ext.models.topdown import TOPDOWN_WIDTH

ALL = os.environ.get("AIM_EXT_FAMILIES") == "all"
ALL_REASON = (
    "not a core family: the whole table runs with AIM_EXT_FAMILIES=all (docs/models.md#timm-families)"
)


def _params():
    return [
        pytest.param(f, id=f.family, marks=() if f.core or ALL else pytest.mark.skip(reason=ALL_REASON))
        for f in FAMILIES
    ]


def _build(family: Family, stop_stage: int | None = None) -> tuple[AIM, torch.Tensor]:
    """The family's AIM model with two masked levels (the top two), and a batch of two images."""
    levels = len(feature_info(family.model, dict(family.kwargs)).channels())
    stop = max(levels - 2, 0) if stop_stage is None else stop_stage
    model = aim_ext.create_model(family.model, num_classes=3, stop_stage=stop, **family.kwargs)
    return model, torch.randn(2, 3, family.size, family.size)


def test_every_family_has_one_row():
    names = [f.family for f in FAMILIES]
    assert len(names) == len(set(names))
    assert len({f.model for f in FAMILIES}) == len(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", _params())
def test_family(family: Family, tmp_path):
    model, x = _build(family)
    info = feature_info(family.model, dict(family.kwargs))
    channels, reductions = info.channels(), info.reduction()

    # The widths rule: every stage's branch maps the level's channels to 256, its estimator to 32.
    for stage, level in zip(model.stages, model.stage_indices, strict=True):
        assert stage.features.align.in_channels == channels[level]
        assert stage.features.align.out_channels == TOPDOWN_WIDTH
        assert stage.mask_estimator.stem.in_channels == channels[level]
        assert stage.mask_estimator.stem.out_channels == MASK_WIDTH

    # S_l are (N, C_l, H, W) maps at the level's reduction, whatever layout timm hands over.
    model.eval()
    with torch.no_grad():
        inputs = model.stage_inputs(x)
    for s, level in zip(inputs, model.stage_indices, strict=True):
        assert s.shape[:2] == (2, channels[level])
        assert abs(s.shape[-1] - family.size / reductions[level]) <= 1 + family.size / reductions[level] / 4

    # One training step: every mask estimator and feature branch gets a finite, non-zero gradient.
    model.train()
    out = model(x)
    assert [m.shape[-2:] for m in out.masks] == [s.shape[-2:] for s in inputs]
    aim_loss(out, torch.tensor([0, 2]), tau=0.5).total.backward()
    for stage in model.stages:
        grads = [p.grad for p in (*stage.mask_estimator.parameters(), *stage.features.parameters())]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

    # Evaluation: the pooled head and P_T give the same logits; masks are binary.
    model.eval()
    with torch.no_grad():
        logits = model(x)
        merged_logits, masks, _ = model.predict(x, merged_map=True)
    torch.testing.assert_close(logits, merged_logits, rtol=1e-4, atol=1e-5)
    assert all(((m == 0) | (m == 1)).all() for m in masks)

    # Fused for inference: the same outputs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # BatchNorms an untraceable module keeps
        fused = aim_ext.fuse_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), logits, rtol=1e-4, atol=1e-5)

    # Saved and loaded: the same logits, the timm keywords that shrank the backbone kept.
    aim_ext.save_pretrained(model, tmp_path / "model")
    loaded = aim_ext.load_model(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=0)

    # ONNX, run by onnxruntime; where torch.onnx cannot export the family, it says so.
    if family.onnx:
        with pytest.raises(Exception):  # noqa: B017, PT011 - torch.onnx raises its own kinds
            export_onnx(model, tmp_path / "m.onnx", image_size=(family.size,) * 2, batch_size=2)
        return
    export_onnx(model, tmp_path / "m.onnx", image_size=(family.size,) * 2, batch_size=2)
    (got,) = run_onnxruntime(tmp_path / "m.onnx", x.numpy())[:1]
    torch.testing.assert_close(torch.from_numpy(got), logits, rtol=1e-3, atol=1e-4)


NHWC = [pytest.param(f, id=f.family) for f in FAMILIES if f.family in ("Swin", "MambaOut")]


@pytest.mark.parametrize("family", NHWC)
def test_channels_last_features_are_views(family: Family):
    """An NHWC backbone's maps reach the stages as NCHW views of timm's own tensors: same values,
    same storage, channels_last strides (no copy)."""
    model, x = _build(family)
    assert model.feature_layout == "NHWC"
    model.eval()
    with torch.no_grad():
        raw = model.backbone(x)
        views = [as_nchw(f, "NHWC", family.model) for f in raw]
    for f, v in zip(raw, views, strict=True):
        assert f.shape[-1] == v.shape[1]
        assert v.data_ptr() == f.data_ptr()
        assert v.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(v, f.permute(0, 3, 1, 2).contiguous(), rtol=0, atol=0)


@pytest.mark.parametrize("family", NHWC)
def test_channels_last_backbone_runs_the_sparse_branches(family: Family):
    """The sparse feature branches on NHWC-viewed maps, unfused and fused: the dense logits."""
    model, x = _build(family, stop_stage=1)
    model.eval()
    fused = aim_ext.fuse_for_inference(model)
    with torch.no_grad():
        dense = model(x)
        for m in (model, fused):
            m.sparse_inference = "on"
            torch.testing.assert_close(m(x), dense, rtol=1e-4, atol=1e-5)
            assert m.branches_used == ["sparse"] * len(m.stages)


def test_channels_last_backbone_masks_bottom_up():
    """Bottom-up masking on Swin: each masked level goes back to timm's NHWC for the next stage."""
    family = next(f for f in FAMILIES if f.family == "Swin")
    model = aim_ext.create_model(
        family.model, num_classes=3, stop_stage=2, masking="bottom-up", **family.kwargs
    )
    x = torch.randn(2, 3, family.size, family.size)
    out = model.train()(x)
    aim_loss(out, torch.tensor([0, 1]), tau=0.5).total.backward()
    assert all(e.stem.weight.grad is not None for e in model.estimators)
    model.eval()
    with torch.no_grad():
        logits, masks = model.predict(x)
        for estimator in model.estimators:  # every mask on: the masked backbone is the plain one
            estimator.to_logits.bias.fill_(1e4)
        _, on = model.predict(x)
        top = as_nchw(model.backbone(x)[-1], "NHWC", family.model)
    assert all(bool(m.all()) for m in on)
    torch.testing.assert_close(model(x), model.head(top.mean(dim=(2, 3))), rtol=1e-5, atol=1e-6)


def test_single_scale_levels_merge_at_one_resolution():
    """A plain ViT's levels are blocks at one resolution: the merge adds the masked maps as they
    are (an upsampling by 1), so P_T is the sum of the stages' O_l."""
    family = next(f for f in FAMILIES if f.family == "ViT")
    model, x = _build(family, stop_stage=0)
    model.eval()
    with torch.no_grad():
        stages = model.forward_topdown(x)
    assert len({s.merged.shape for s in stages}) == 1
    with torch.enable_grad():
        recorded = model.forward_topdown(x)
    total = sum(s.features * s.mask for s in recorded)
    torch.testing.assert_close(recorded[-1].merged, total, rtol=1e-5, atol=1e-6)


def test_features_that_are_not_maps_are_refused():
    with pytest.raises(
        ValueError, match=r"^vit_x cannot be an AIM backbone: its features are not spatial maps"
    ):
        as_nchw(torch.zeros(2, 197, 64), "NCHW", "vit_x")


def test_a_model_without_features_only_is_refused(monkeypatch):
    def no_features(name, **kwargs):
        raise RuntimeError(f"features_only not implemented for {name}")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(ValueError, match=r"^mymodel cannot be an AIM backbone: timm builds no features_only"):
        aim_ext.create_model("mymodel", num_classes=3, stop_stage=1)


def test_unfolded_batch_norms_are_reported_once_in_one_line():
    """EfficientNetV2's feature wrapper does not trace with torch.fx: its blocks are folded one by
    one, the BatchNorms of the modules that do not trace stay, and one warning says how many."""
    family = next(f for f in FAMILIES if f.family == "EfficientNetV2")
    model, x = _build(family)
    model.eval()
    with pytest.warns(RuntimeWarning) as caught:
        fused = aim_ext.fuse_for_inference(model)
    messages = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert (
        messages[0].startswith("fuse_for_inference: ") and f"of {family.model} stay unfolded" in messages[0]
    )
    kept = int(messages[0].split()[1])
    norms = lambda m: sum(isinstance(c, torch.nn.modules.batchnorm._BatchNorm) for c in m.modules())  # noqa: E731
    assert 0 < kept < norms(model.backbone)
    assert norms(fused.backbone) == kept  # every other BatchNorm of the backbone was folded
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_docs_table_has_a_row_for_every_family():
    """docs/models.md's table (benchmarks/families.py) names every tested family, and says "no
    ONNX" exactly where the family's export is expected to fail."""
    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for family in FAMILIES:
        assert family.family in rows, f"docs/models.md has no row for {family.family}"
        assert ("no ONNX" in rows[family.family]) == bool(family.onnx), family.family
