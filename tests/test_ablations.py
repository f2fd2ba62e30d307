"""The paper's architecture ablations: one top-stage mask estimator (appendix D.3) and bottom-up
masking (section 6.1, appendix D.4), against float64 references built from the models' parts, and
end to end through aim-train, aim-eval and aim-export."""

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures_data import waterbirds_training_flags

import aim_ext
from aim_ext.cli import eval as aim_eval
from aim_ext.cli import export as aim_export
from aim_ext.cli import train as aim_train
from aim_ext.engine import TrainConfig
from aim_ext.export import compare_outputs, example_image, output_names, reference_outputs, run_onnxruntime
from aim_ext.losses import aim_loss
from aim_ext.models import create_model, load_model, save_pretrained
from aim_ext.models.checkpoint import architecture


def _one_estimator(name="resnet18", stop_stage=2, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes=5, stop_stage=stop_stage, mask_estimators="top", **kwargs)


def test_one_estimator_has_a_mask_estimator_at_the_top_stage_only():
    every = create_model("resnet18", num_classes=5, stop_stage=2)
    one = _one_estimator()
    assert [s.mask_estimator is None for s in one.stages] == [False, True, True]
    lower = sum(p.numel() for s in every.stages[1:] for p in s.mask_estimator.parameters())
    count = sum(p.numel() for p in one.parameters())
    assert count == sum(p.numel() for p in every.parameters()) - lower
    assert architecture(one) == "resnet18+AIM[2] (mask_estimators top)"
    with pytest.raises(ValueError, match="mask_estimators must be one of"):
        create_model("resnet18", num_classes=5, stop_stage=2, mask_estimators="bottom")


@pytest.mark.parametrize("size", [(64, 96), (75, 57)])  # odd sizes: non-integer upsampling ratios
def test_one_estimator_merges_the_upsampled_top_mask_as_a_float64_reference_does(size):
    model = _one_estimator().double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        logits, masks, merged = model.predict(x, merged_map=True)
        pooled_logits, pooled_masks = model.predict(x)
        inputs = model.stage_inputs(x)
        top = (model.stages[0].mask_estimator(inputs[0]) >= 0).double()
        p = None
        for stage, s in zip(model.stages, inputs, strict=True):
            mask = F.interpolate(top, size=s.shape[-2:], mode="nearest")
            o = stage.features(s) * mask
            p = o if p is None else o + F.interpolate(p, size=s.shape[-2:], mode="nearest")
        reference = model.head(p.mean(dim=(2, 3)))
    torch.testing.assert_close(merged, p)
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(pooled_logits, reference)
    for mask, pooled, s in zip(masks, pooled_masks, inputs, strict=True):
        assert torch.equal(mask, F.interpolate(top, size=s.shape[-2:], mode="nearest").to(mask.dtype))
        assert torch.equal(pooled.to(mask.dtype), mask)


def test_one_estimator_in_training_shares_its_noisy_mask_and_takes_every_stages_gradient():
    model = _one_estimator().train()
    out = model(torch.randn(3, 3, 75, 57))
    top = out.masks[0]
    assert 0 < top.mean() < 1  # the noise and a fresh estimator give a mixed mask
    for mask in out.masks[1:]:
        assert torch.equal(mask, F.interpolate(top, size=mask.shape[-2:], mode="nearest"))
    # The lowest stage's mask alone trains the one estimator (through the upsampled logits); with an
    # estimator per stage it would train only its own.
    out.masks[-1].sum().backward()
    assert model.stages[0].mask_estimator.stem.weight.grad.abs().sum() > 0
    every = create_model("resnet18", num_classes=5, stop_stage=2).train()
    every(torch.randn(3, 3, 75, 57)).masks[-1].sum().backward()
    grad = every.stages[0].mask_estimator.stem.weight.grad
    assert grad is None or not grad.any()


def test_one_estimator_holds_its_one_mask_to_tau_once():
    model = _one_estimator().train()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.estimated == 1 and len(out.masks) == 3
    r = out.masks[0].float().flatten(1).mean(1)  # the top mask's per-image active share
    expected = ((r - 0.25) ** 2).mean()
    torch.testing.assert_close(
        aim_loss(out, torch.tensor([0, 1, 2]), tau=0.25).area, expected.to(torch.float32)
    )
    with pytest.raises(ValueError, match="one active-area target"):
        TrainConfig(stop_stage=2, mask_estimators="top", area_final_stages=[0.25, 0.25, 0.25])


def test_one_estimator_trains_fuses_and_travels(tmp_path):
    model = _one_estimator()
    loss = aim_loss(model.train()(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]), tau=0.25).total
    loss.backward()
    assert all(p.grad is not None for p in model.stages[0].mask_estimator.parameters())
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, masks = model.predict(x)
        fused_logits, fused_masks = aim_ext.fuse_for_inference(model).predict(x)
    torch.testing.assert_close(fused_logits, expected, rtol=1e-4, atol=1e-4)
    save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture_options"] == {"mask_estimators": "top"}
    loaded = load_model(tmp_path / "saved")
    assert loaded.mask_estimators == "top"
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x)[0], expected)


def _bottom_up(name="convnext_tiny", stop_stage=1, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes=5, stop_stage=stop_stage, masking="bottom-up", **kwargs)


@pytest.mark.parametrize("stop_stage,masked", [(1, [3, 2, 1]), (2, [3, 2]), (3, [3])])
def test_bottom_up_masks_the_papers_stage_choices(stop_stage, masked):
    model = _bottom_up(stop_stage=stop_stage)
    assert model.stage_indices == masked and len(model.estimators) == len(masked)
    assert architecture(model) == f"convnext_tiny+AIM[{stop_stage}] (masking bottom-up)"
    out = model.train()(torch.randn(2, 3, 64, 96))
    assert out.aux_logits == [] and len(out.masks) == len(out.mask_logits) == len(masked)
    assert [m.shape[-1] for m in out.masks] == [96 // 2 ** (i + 2) for i in masked]


@pytest.mark.parametrize("name,stop_stage", [("convnext_tiny", 1), ("resnet18", 3)])
@pytest.mark.parametrize("size", [(64, 96), (75, 57)])
def test_bottom_up_masks_each_level_before_the_next_stage_as_a_float64_reference_does(name, stop_stage, size):
    model = _bottom_up(name, stop_stage).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        logits, masks, top = model.predict(x, merged_map=True)
        # The reference: timm's own forward of the backbone, each masked level's module followed by
        # a hook that multiplies its output by 1[M_l(output) >= 0] before the next module reads it.
        expected, hooks = [], []
        ends = [model.backbone[name] for name in model.backbone.return_layers]  # level order
        for module, estimator in zip(ends, reversed(model.estimators), strict=True):

            def mask_output(_module, _inputs, output, estimator=estimator):
                mask = (estimator(output) >= 0).double()
                expected.insert(0, mask)
                return output * mask

            hooks.append(module.register_forward_hook(mask_output))
        h = model.backbone(x)[-1]
        for hook in hooks:
            hook.remove()
        reference = model.head(h.mean(dim=(2, 3)))
    torch.testing.assert_close(top, h)
    torch.testing.assert_close(logits, reference)
    for mask, ref in zip(masks, expected, strict=True):
        assert torch.equal(mask, ref)


def test_bottom_up_fuses_for_inference_with_the_same_outputs():
    model = _bottom_up("resnet18", 2).eval()
    x = torch.randn(2, 3, 75, 57)
    with torch.no_grad():
        logits, masks = model.predict(x)
        fused = aim_ext.fuse_for_inference(model)
        fused_logits, fused_masks = fused.predict(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused_logits, logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(fused_masks, masks, strict=True))


def test_bottom_up_trains_its_estimators_through_the_later_stages():
    model = _bottom_up(stop_stage=2).train()
    out = model(torch.randn(3, 3, 64, 64))
    assert 0 < out.masks[1].mean() < 1
    out.logits.sum().backward()  # the lower level's mask acts only through the top stage
    for estimator in model.estimators:
        assert estimator.stem.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="FeatureListNet"):
        create_model("mobilenetv2_100", num_classes=5, stop_stage=3, masking="bottom-up")
    with pytest.raises(ValueError, match="needs a stop_stage"):
        create_model("resnet18", num_classes=5, masking="bottom-up")


def _train_run(tmp_path, flags: list[str]):
    out = tmp_path / "run"
    assert aim_train.main([*waterbirds_training_flags(tmp_path), "--out", str(out), *flags]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,masked,options",
    [
        (["--stop-stage", "3", "--mask-estimators", "top"], 2, {"mask_estimators": "top"}),
        (["--stop-stage", "2", "--masking", "bottom-up"], 3, {"masking": "bottom-up"}),
        (["--stop-stage", "4", "--masking", "bottom-up"], 1, {"masking": "bottom-up"}),
    ],
    ids=["one-estimator", "bottom-up-2", "bottom-up-4"],
)
def test_an_ablation_trains_evaluates_and_exports(tmp_path, capsys, flags, masked, options):
    run = _train_run(tmp_path, flags)
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architecture_options"] == options
    assert len(torch.load(run / "masks" / "epoch_0001.pt", weights_only=True)["masks"]) == masked

    assert aim_eval.main([str(run), "--device", "cpu", "--figures", "2"]) == 0
    metrics = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert len(metrics["mask_sparsity"]) == masked and len(metrics["mask_precision"]) == masked + 1
    assert 0 <= metrics["epg"]["gradcam"] <= 1

    capsys.readouterr()
    assert aim_export.main([str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    model = load_model(run)
    assert f"aim-export: {architecture(model)}, classes 2" in printed
    assert architecture(model).endswith(f" ({' '.join(*options.items())})")
    from_checkpoint = load_model(run / "best.pt")  # the run's config rebuilds the ablation too
    assert architecture(from_checkpoint) == architecture(model)
    pairs = zip(from_checkpoint.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    image = example_image(1, (64, 64), seed=3)
    reference, mask_logits = reference_outputs(model, image)
    exported = run_onnxruntime(tmp_path / "m.onnx", image.numpy())
    checks = compare_outputs(output_names(model), reference, exported, mask_logits)
    assert len(checks) == masked + 1 and all(c.ok for c in checks), checks
