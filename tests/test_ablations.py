"""The paper's architecture ablations: one top-stage mask estimator (appendix D.3) and bottom-up
masking (section 6.1, appendix D.4), against float64 references built from the models' parts, and
end to end through aim-train, aim-eval and aim-export."""

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures_data import make_cub, make_waterbirds

import aim_ext
from aim_ext.cli import eval as aim_eval
from aim_ext.cli import export as aim_export
from aim_ext.cli import train as aim_train
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
