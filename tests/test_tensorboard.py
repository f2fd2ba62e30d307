"""`aim-train --log tensorboard`: the epoch records as TensorBoard scalars and the fixed batch's
masks as images, read back with TensorBoard's own event reader; a resumed run's curves."""

import json

import pytest
import torch
from test_engine import Blobs, make_model, tiny_config

import aim_ext.engine.train as train_module
from aim_ext.engine import fit
from aim_ext.engine.tensorboard import mask_images, scalar_tags

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(run):
    reader = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scalar_tags_name_every_number():
    record = {
        "epoch": 3,
        "loss": 1.5,
        "train_acc": 0.8,
        "mask_area": [0.5, 0.25],
        "lr": {"backbone": 1e-5},
        "tau": 0.75,
        "val_acc": 0.9,
        "val_group_acc": [1.0, 0.5],
        "collapsed_to_class": 1,
        "note": "text",
        "val_flag": True,
    }
    assert scalar_tags(record) == {
        "train/loss": 1.5,
        "train/acc": 0.8,
        "train/mask_area/0": 0.5,
        "train/mask_area/1": 0.25,
        "lr/backbone": 1e-5,
        "schedule/tau": 0.75,
        "val/acc": 0.9,
        "val/group_acc/0": 1.0,
        "val/group_acc/1": 0.5,
    }


def test_mask_images_keep_the_image_where_the_mask_is_on():
    images = torch.randn(2, 3, 8, 8) * 5 + 3
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 1] = 1  # the top-right 4x4 quarter of the first image
    out = mask_images(images, [mask])
    shown = out["masks/image"]
    assert shown.amin() == 0 and torch.allclose(shown.flatten(1).amax(1), torch.ones(2))
    expected = torch.zeros_like(shown)
    expected[0, :, :4, 4:] = shown[0, :, :4, 4:]
    assert torch.equal(out["masks/level_0"], expected)


def test_training_writes_the_epoch_records_and_masks(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, log="tensorboard")
    fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    run = tmp_path / "run"
    events, records = _events(run), _records(run)
    for tag, value in scalar_tags(records[1]).items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [0, 1], tag
        assert logged[1].value == pytest.approx(value, rel=1e-6), tag
    assert {"train/loss", "train/mask_area/1", "val/worst_group_acc", "lr/topdown", "schedule/tau"} <= set(
        events.Tags()["scalars"]
    )
    images = events.Tags()["images"]
    assert {"masks/image", "masks/level_0", "masks/level_1"} <= {
        tag.rsplit("/image/", 1)[0] for tag in images
    }
    first = events.Images(images[0])[0]  # the fixed batch's four 32 x 32 images, tiled
    assert first.width * first.height == 4 * 32 * 32 and first.height % 32 == 0


def test_a_resumed_run_purges_the_epochs_it_replays(tmp_path, monkeypatch):
    """A stop after epoch 1's records but before its checkpoint: the resumed run trains epoch 1
    again, and TensorBoard keeps only its second record of it."""
    cfg = tiny_config(tmp_path, epochs=3, log="tensorboard")
    train, val = Blobs(32, 0), Blobs(16, 1)
    original = train_module.save_atomic

    def stop_at_epoch_1(state, path):
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt
        return original(state, path)

    monkeypatch.setattr(train_module, "save_atomic", stop_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, train, val, make_model(cfg), log=lambda *_: None)
    stopped = _events(tmp_path / "run").Scalars("train/loss")
    assert [e.step for e in stopped] == [0, 1]
    monkeypatch.setattr(train_module, "save_atomic", original)
    fit(cfg, train, val, make_model(cfg), resume=True, log=lambda *_: None)
    records = _records(tmp_path / "run")
    logged = _events(tmp_path / "run").Scalars("train/loss")
    assert [e.step for e in logged] == [r["epoch"] for r in records] == [0, 1, 2]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_a_fresh_run_starts_a_fresh_log(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1, log="tensorboard")
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
    assert [e.step for e in _events(tmp_path / "run").Scalars("train/loss")] == [0]
