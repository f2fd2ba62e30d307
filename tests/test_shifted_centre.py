"""The shifted-centre test of centre bias (appendix A.6): the crops against an independent
computation from the evaluation frame, and `aim-eval --shifted-centre` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures_data import make_cub, waterbirds_training_flags
from PIL import Image

from aim_ext.cli import eval as aim_eval
from aim_ext.cli import train as aim_train
from aim_ext.data import ShiftedCentre, build_dataset
from aim_ext.data.shifted_centre import DIRECTIONS, crop_padded, object_centre

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_object_centre_is_the_bounding_boxs_centre():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:10] = True
    mask[7, 4] = True
    assert object_centre(mask) == ((2 + 8) / 2, (3 + 10) / 2)
    assert object_centre(torch.zeros(6, 8, dtype=torch.bool)) == (3.0, 4.0)


@pytest.mark.parametrize("top,left", [(0, 0), (-3, 2), (4, -5), (-9, -9), (7, 8), (20, 1)])
def test_crop_padded_is_the_window_of_the_zero_padded_tensor(top, left):
    t = torch.arange(2 * 9 * 11, dtype=torch.float64).reshape(2, 9, 11) + 1
    pad = 25  # padded enough that every window lies inside
    padded = F.pad(t, (pad, pad, pad, pad))
    expected = padded[:, top + pad : top + pad + 6, left + pad : left + pad + 6]
    assert torch.equal(crop_padded(t, top, left, 6), expected)


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    make_cub(root, per_class=8, train_per_class=2)
    return root


@pytest.mark.parametrize("deviation", [0.1, 0.25, 0.5])
def test_each_crop_moves_the_objects_centre_by_the_deviation(cub, deviation):
    data = build_dataset("cub", cub, "test", image_size=32, mean=MEAN, std=STD)
    shifted = ShiftedCentre(
        data, image_size=32, deviation=deviation, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD
    )
    assert len(shifted) == len(data) and shifted.labels == data.labels and shifted.frame_side == 36
    assert sorted(set(shifted.directions)) == [0, 1, 2, 3]  # all four candidates are drawn
    whole = 0
    for i in range(len(shifted)):
        frame, crop = shifted.frame(i), shifted[i]
        assert min(frame["image"].shape[-2:]) == 36 and crop["image"].shape == (3, 32, 32)
        # The frame is the dataset's evaluation framing before its centre crop.
        centred = data[i]["image"]
        h, w = frame["image"].shape[-2:]
        y, x = round((h - 32) / 2), round((w - 32) / 2)  # torchvision's CenterCrop
        torch.testing.assert_close(frame["image"][:, y : y + 32, x : x + 32], centred)
        row, col = object_centre(frame["mask"])
        dy, dx = DIRECTIONS[shifted.directions[i]]
        top, left = round(row + dy * deviation * 32 - 16), round(col + dx * deviation * 32 - 16)
        padded = F.pad(frame["image"], (40, 40, 40, 40))
        assert torch.equal(crop["image"], padded[:, top + 40 : top + 72, left + 40 : left + 72])
        assert crop["mask"].sum() <= frame["mask"].sum()
        if crop["mask"].sum() == frame["mask"].sum():  # the object is whole: it sits off the crop's centre
            shift = deviation * 32
            found = object_centre(crop["mask"])
            assert abs(found[0] - (16 - dy * shift)) <= 0.5 and abs(found[1] - (16 - dx * shift)) <= 0.5
            whole += 1
        assert crop["label"] == data[i]["label"] and crop["index"] == i
    assert whole > 0 or deviation == 0.5  # the check ran
    again = ShiftedCentre(
        data, image_size=32, deviation=deviation, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD
    )
    assert again.directions == shifted.directions  # seeded


def test_the_shifted_centre_split_needs_masks_and_a_deviation_in_range(cub, tmp_path):
    data = build_dataset("cub", cub, "test", image_size=32)
    options = dict(image_size=32, crop_pct=0.875, interpolation="bilinear", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\(0, 0.5\]"):
        ShiftedCentre(data, deviation=0.6, **options)
    data.has_masks = False
    with pytest.raises(ValueError, match="needs object masks"):
        ShiftedCentre(data, deviation=0.2, **options)


@pytest.mark.slow
def test_aim_eval_reports_the_centred_and_shifted_splits_side_by_side(tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*waterbirds_training_flags(tmp_path), "--stop-stage", "3", "--out", str(run)]
    assert aim_train.main(flags) == 0
    argv = [str(run), "--device", "cpu", "--attribution", "gradcam", "--shifted-centre", "0.2", "0.4"]
    assert aim_eval.main(argv) == 0
    assert "centre bias:" in capsys.readouterr().out
    out = run / "eval_test"
    table = json.loads((out / "centre_bias.json").read_text())
    assert [r[0] for r in table["rows"]] == ["centred", "shifted 0.2", "shifted 0.4"]
    centred = json.loads((out / "metrics.json").read_text())
    expected = [centred["avg_acc"], centred["worst_group_acc"], centred["epg"]["gradcam"]]
    assert table["rows"][0][1:4] == expected
    for deviation in ("0.2", "0.4"):
        metrics = json.loads((out / f"shifted_centre_{deviation}" / "metrics.json").read_text())
        assert metrics["num_images"] == centred["num_images"]
        assert "background_swap_flip_rate" not in metrics
    assert "| shifted 0.4 |" in (out / "centre_bias.md").read_text()
    with Image.open(out / "shifted_centre_crops.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100

    with pytest.raises(SystemExit):
        aim_eval.main([str(run), "--shifted-centre", "0.7"])
    assert "(0, 0.5]" in capsys.readouterr().err
