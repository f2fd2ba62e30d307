"""aim_ext.explain and aim_ext.metrics: EPG, accuracy and mask metrics, captum attributions, figures."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aim_ext.explain import energy_pointing_game
from aim_ext.explain.attributions import METHODS, attribute, gradcam_layer
from aim_ext.explain.figures import (
    PANEL_INCHES,
    epg_scatter,
    gradcam_beside_masks,
    gradcam_comparison,
    mask_evolution,
    mask_figure,
)
from aim_ext.metrics import (
    accuracy,
    classification_metrics,
    mask_areas,
    mask_sparsity,
    merged_mask,
    reweighted_accuracy,
)
from aim_ext.models import AIM, create_model

# ---------------------------------------------------------------- EPG


def random_masks(n: int, h: int, w: int) -> torch.Tensor:
    masks = torch.rand(n, h, w) < 0.3
    masks[:, 0, 0] = True  # never empty
    masks[:, -1, -1] = False  # never full
    return masks


def test_uniform_map_scores_the_mask_fraction():
    masks = random_masks(3, 6, 9)
    epg = energy_pointing_game(torch.full((3, 6, 9), 0.7), masks)
    torch.testing.assert_close(epg, masks.float().mean(dim=(1, 2)))


def test_all_energy_inside_scores_one():
    masks = random_masks(2, 8, 8)
    maps = torch.rand(2, 8, 8) * masks
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.ones(2))


def test_negatives_are_ignored():
    masks = random_masks(2, 8, 8)
    positive = torch.rand(2, 8, 8)
    with_negatives = torch.where(torch.rand(2, 8, 8) < 0.5, positive, -5 * positive)
    expected = energy_pointing_game(with_negatives.clamp_min(0), masks)
    torch.testing.assert_close(energy_pointing_game(with_negatives, masks), expected)
    # Strong negative energy outside the object does not lower a perfect score.
    inside_only = torch.where(masks, 1.0, -10.0)
    torch.testing.assert_close(energy_pointing_game(inside_only, masks), torch.ones(2))


def test_a_map_without_positive_energy_scores_zero_and_counts():
    masks = random_masks(3, 5, 5)
    maps = torch.stack([-torch.rand(5, 5), torch.zeros(5, 5), torch.ones(5, 5)])
    epg = energy_pointing_game(maps, masks)
    assert epg.shape == (3,) and torch.isfinite(epg).all()
    assert epg[0] == 0 and epg[1] == 0
    assert epg[2] == pytest.approx(masks[2].float().mean().item())


def test_non_square_indexing_is_y_x():
    h, w = 3, 5
    maps = torch.zeros(1, h, w)
    maps[0, 0, :] = 1.0  # energy along the top row, y = 0
    top_row = torch.zeros(1, h, w, dtype=torch.bool)
    top_row[0, 0, :] = True
    left_column = torch.zeros(1, h, w, dtype=torch.bool)
    left_column[0, :, 0] = True
    assert energy_pointing_game(maps, top_row).item() == pytest.approx(1.0)
    assert energy_pointing_game(maps, left_column).item() == pytest.approx(1 / w)
    one_cell = torch.zeros(1, h, w, dtype=torch.bool)
    one_cell[0, 1, 4] = True  # (y=1, x=4) exists only in [y, x] order
    point = torch.zeros(1, h, w)
    point[0, 1, 4] = 2.0
    assert energy_pointing_game(point, one_cell).item() == pytest.approx(1.0)


def test_low_resolution_map_is_resized_bilinearly():
    maps = torch.rand(2, 1, 3, 5) - 0.2
    masks = random_masks(2, 12, 20)
    # Negatives clamped first, then the bilinear resize.
    up = F.interpolate(maps.clamp_min(0), size=(12, 20), mode="bilinear", align_corners=False)[:, 0]
    expected = (up * masks).sum(dim=(1, 2)) / up.sum(dim=(1, 2))
    epg = energy_pointing_game(maps, masks)
    torch.testing.assert_close(epg, expected)
    nearest = F.interpolate(maps.clamp_min(0), size=(12, 20), mode="nearest")[:, 0]
    assert not torch.allclose(epg, (nearest * masks).sum(dim=(1, 2)) / nearest.sum(dim=(1, 2)))
    # (N, H, W) and (N, 1, H, W) are the same maps; half precision is scored in float32.
    torch.testing.assert_close(energy_pointing_game(maps[:, 0], masks), epg)
    assert energy_pointing_game(maps.bfloat16(), masks).dtype == torch.float32


def test_epg_rejects_non_bool_masks_and_count_mismatch():
    with pytest.raises(TypeError, match="bool"):
        energy_pointing_game(torch.rand(1, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="masks"):
        energy_pointing_game(torch.rand(2, 4, 4), random_masks(3, 4, 4))


# ---------------------------------------------------------------- metrics

# Hand-made: groups 0..3 with 4, 2, 1, 1 test samples; correct 3/4, 1/2, 1/1, 0/1.
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1])
PREDS = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
TRAIN_COUNTS = {0: 70, 1: 10, 2: 10, 3: 10}


def test_accuracy_from_predictions_and_logits():
    assert accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    logits = F.one_hot(PREDS, 2).float() * 3 - 1
    assert accuracy(logits, LABELS) == pytest.approx(5 / 8)


def test_group_metrics_against_hand_computed_values():
    m = classification_metrics(PREDS, LABELS, GROUPS, TRAIN_COUNTS)
    assert m["avg_acc"] == pytest.approx(5 / 8)
    assert m["group_acc"] == pytest.approx({0: 0.75, 1: 0.5, 2: 1.0, 3: 0.0})
    assert m["group_count"] == {0: 4, 1: 2, 2: 1, 3: 1}
    assert m["worst_group_acc"] == 0.0 and m["worst_group"] == 3
    # 0.7 * 0.75 + 0.1 * 0.5 + 0.1 * 1.0 + 0.1 * 0.0: not the plain average 0.625.
    assert m["reweighted_avg_acc"] == pytest.approx(0.675)
    assert m["reweighted_avg_acc"] != pytest.approx(m["avg_acc"])
    assert m["num_samples"] == 8


def test_reweighted_equals_plain_average_when_proportions_match():
    same = {0: 40, 1: 20, 2: 10, 3: 10}  # proportional to the test groups
    m = classification_metrics(PREDS, LABELS, GROUPS, same)
    assert m["reweighted_avg_acc"] == pytest.approx(m["avg_acc"])


def test_reweighting_refuses_a_training_group_missing_from_evaluation():
    with pytest.raises(ValueError, match=r"\[5\]"):
        reweighted_accuracy({0: 1.0}, {0: 10, 5: 3})
    assert set(classification_metrics(PREDS, LABELS)) == {"avg_acc", "num_samples"}


def test_mask_areas_sparsity_and_merged_mask():
    top = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    fine = torch.zeros(2, 1, 2, 4)
    fine[1, 0, 1, 3] = 1.0
    torch.testing.assert_close(mask_areas([top, fine]), torch.tensor([[0.5, 0.0], [0.0, 1 / 8]]))
    assert mask_sparsity([top, fine]) == pytest.approx([0.25, 1 / 16])
    merged = merged_mask([top, fine])
    assert merged.dtype == torch.bool and merged.shape == (2, 1, 2, 4)
    assert merged[0, 0].tolist() == [[True, True, False, False]] * 2
    assert merged[1, 0].tolist() == [[False] * 4, [False, False, False, True]]


def test_merged_mask_upsamples_stage_by_stage():
    # Widths 2 -> 3 -> 4: chained nearest resizing (as the top-down merge does) maps the top cell
    # to three of the four finest cells, a direct 2 -> 4 resize to two.
    top = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    mid, fine = torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 4)
    assert merged_mask([top, mid, fine])[0, 0, 0].tolist() == [True, True, True, False]


# ---------------------------------------------------------------- attributions

IMAGE_SIZE = 64
MODEL_SPECS = [("convnext_atto", None), ("convnext_atto", 1), ("resnet18", None), ("resnet18", 3)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {spec: create_model(spec[0], num_classes=3, stop_stage=spec[1]).eval() for spec in MODEL_SPECS}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.tensor([0, 2])


def hook_count(model: torch.nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, name)) for m in model.modules() for name in names)


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_attributions_shapes_determinism_and_no_lingering_hooks(models, batch, spec):
    model = models[spec]
    images, labels = batch
    original = images.clone()
    hooks_before = hook_count(model)
    for method in METHODS:
        first = attribute(model, images, labels, method)
        second = attribute(model, images, labels, method)
        assert hook_count(model) == hooks_before, method
        assert torch.equal(first, second), method
        assert torch.isfinite(first).all() and first.min() >= 0, method
        assert first.abs().sum() > 0, method
        if method == "gradcam":
            assert first.dim() == 3 and first.shape[0] == 2
        else:
            assert first.shape == (2, IMAGE_SIZE, IMAGE_SIZE), method
    assert torch.equal(images, original) and not images.requires_grad
    assert not model.training


@pytest.mark.parametrize("spec", [("convnext_atto", 1), ("resnet18", 3)], ids=str)
def test_aim_gradcam_is_computed_on_the_merged_map(models, batch, spec):
    model = models[spec]
    images, labels = batch
    assert gradcam_layer(model, images)[0] == "merged_map"
    with torch.no_grad():
        _, masks = model.predict(images)
        backbone_top = model.backbone(images)[-1]
    cam = attribute(model, images, labels, "gradcam")
    assert cam.shape[-2:] == masks[-1].shape[-2:]  # the finest top-down stage, P_T
    assert cam.shape[-2:] != backbone_top.shape[-2:]
    # GradCAM by hand on P_T: channel weights = spatial mean of d logit / d P_T.
    captured = {}
    handle = model.merged_map.register_forward_hook(lambda _m, _i, out: captured.setdefault("p", out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    p = captured["p"]
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), p)[0]
    expected = (grads.mean(dim=(2, 3), keepdim=True) * p).sum(dim=1).clamp_min(0).detach()
    torch.testing.assert_close(cam, expected)


def test_gradcam_layer_of_vanilla_backbones(models, batch):
    images, _ = batch
    assert gradcam_layer(models[("convnext_atto", None)], images)[0] == "stages.3"
    assert gradcam_layer(models[("resnet18", None)], images)[0] == "layer4"
    # MobileNetV2's classifier pools bn2 (after conv_head), not timm's last feature stage blocks.6.
    mobilenet = create_model("mobilenetv2_100", num_classes=3).eval()
    assert mobilenet.feature_info[-1]["module"] == "blocks.6"
    assert gradcam_layer(mobilenet, images)[0] == "bn2"


def input_gradient(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, labels[:, None]).sum(), x)
    return grad.abs().sum(dim=1)


def test_guided_backprop_guides_relu_networks_and_is_the_gradient_through_gelu(models, batch):
    images, labels = batch
    convnext = models[("convnext_atto", None)]
    torch.testing.assert_close(
        attribute(convnext, images, labels, "guided_backprop"), input_gradient(convnext, images, labels)
    )
    resnet = models[("resnet18", None)]
    guided = attribute(resnet, images, labels, "guided_backprop")
    assert not torch.allclose(guided, input_gradient(resnet, images, labels))


def test_predicted_target_and_signed_channel_sum(models, batch):
    model = models[("resnet18", 3)]
    images, labels = batch
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    torch.testing.assert_close(
        attribute(model, images, None, "gradcam", use_predicted=True),
        attribute(model, images, predicted, "gradcam"),
    )
    signed = attribute(model, images, labels, "guided_backprop", reduce="sum")
    assert (signed < 0).any()
    with pytest.raises(ValueError, match="targets"):
        attribute(model, images, None, "gradcam")
    with pytest.raises(ValueError, match="method"):
        attribute(model, images, labels, "saliency")


def test_attribution_refuses_training_mode():
    model = create_model("resnet18", num_classes=3, stop_stage=3)
    assert isinstance(model, AIM) and model.training
    with pytest.raises(RuntimeError, match="eval"):
        attribute(model, torch.randn(1, 3, 64, 64), torch.tensor([0]), "gradcam")


# ---------------------------------------------------------------- figures


def assert_png(path, size: tuple[int, int]) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 50  # not a blank canvas


def panels(cols: int, rows: int) -> tuple[int, int]:
    return round(PANEL_INCHES * cols * 100), round(PANEL_INCHES * rows * 100)


def test_figures_write_pngs(tmp_path):
    images = torch.randn(3, 3, 48, 64)
    masks = [(torch.rand(3, 1, h, w) > 0.5).float() for h, w in ((2, 2), (3, 4), (6, 8))]
    assert_png(
        mask_figure(images, masks, tmp_path / "masks.png", stage_names=["S3", "S2", "S1"]), panels(5, 3)
    )

    maps_a, maps_b = torch.rand(3, 3, 4), torch.rand(3, 48, 64)
    fg = torch.zeros(3, 48, 64, dtype=torch.bool)
    fg[:, 10:30, 20:50] = True
    epg_a, epg_b = energy_pointing_game(maps_a, fg), energy_pointing_game(maps_b, fg)
    path = gradcam_comparison(
        images, maps_a, maps_b, epg_a, epg_b, tmp_path / "cmp.png", masks=fg, max_images=2
    )
    assert_png(path, panels(3, 2))
    path = gradcam_beside_masks(
        images, maps_a, epg_a, masks[:2], tmp_path / "beside.png", masks=fg, max_images=2
    )
    assert_png(path, panels(5, 2))  # image, GradCAM, two stage masks, the merged mask

    assert_png(epg_scatter(torch.rand(50), torch.rand(50), tmp_path / "scatter.png"), (450, 450))

    by_epoch = {10: masks[-1][0], 0: torch.ones(6, 8), 5: [m[:1] for m in masks]}
    assert_png(mask_evolution(by_epoch, images[0], tmp_path / "evolution.png"), panels(4, 1))


@pytest.mark.parametrize(
    ("mask_size", "image_size"), [((4, 4), (16, 16)), ((5, 7), (32, 30)), ((3, 3), (3, 3))]
)
def test_mask_precision_and_recall_against_a_pixel_loop(mask_size, image_size):
    """mask_on_object against a float64 loop: each image pixel takes the mask cell nearest
    upsampling gives it (row floor(y * h / H), column floor(x * w / W))."""
    from aim_ext.metrics import mask_on_object

    g = torch.Generator().manual_seed(sum(mask_size + image_size))
    masks = (torch.rand(4, 1, *mask_size, generator=g) > 0.5).float()
    objects = torch.rand(4, *image_size, generator=g) > 0.6
    masks[2] = 0  # nothing active: precision NaN
    objects[3] = False  # no object: recall NaN
    precision, recall = mask_on_object(masks, objects)
    (h, w), (big_h, big_w) = mask_size, image_size
    for n in range(4):
        on = [[bool(masks[n, 0, y * h // big_h, x * w // big_w]) for x in range(big_w)] for y in range(big_h)]
        both = sum(on[y][x] and bool(objects[n, y, x]) for y in range(big_h) for x in range(big_w))
        active = sum(map(sum, on))
        size = int(objects[n].sum())
        assert (
            math.isnan(precision[n]) if active == 0 else precision[n].item() == pytest.approx(both / active)
        )
        assert math.isnan(recall[n]) if size == 0 else recall[n].item() == pytest.approx(both / size)
    assert precision.dtype == recall.dtype == torch.float64
    with pytest.raises(ValueError, match="need masks"):
        mask_on_object(masks[:, 0], objects)


def test_stage_masks_are_carried_through_the_grids_between():
    """10 -> 19 -> 299, as a 299 px ConvNeXt's top-down merge carries a mask: the chained
    row/column mapping, not one resize; the merged mask is their union on the finest grid."""
    from aim_ext.metrics import stage_masks_at_finest

    g = torch.Generator().manual_seed(3)
    top, fine = (
        (torch.rand(2, 1, 10, 10, generator=g) > 0.5).float(),
        (torch.rand(2, 1, 19, 19, generator=g) > 0.7).float(),
    )
    carried_top, carried_fine = stage_masks_at_finest([top, fine])
    assert torch.equal(carried_fine, fine)
    rows = [r * 10 // 19 for r in range(19)]
    assert torch.equal(carried_top, top[:, :, rows][:, :, :, rows])
    assert torch.equal((carried_top + carried_fine > 0), merged_mask([top, fine]))
    direct = torch.nn.functional.interpolate(top, size=(299, 299), mode="nearest")
    chained = torch.nn.functional.interpolate(carried_top, size=(299, 299), mode="nearest")
    assert not torch.equal(direct, chained)  # the two differ at 299 px
