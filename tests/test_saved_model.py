"""A trained model travels: save_pretrained writes safetensors and config.json; load_model reads
them, an aim-train run folder or its checkpoints, without the dataset, and refuses bad files."""

import json
import pickle

import pytest
import torch
from test_engine import Blobs, make_model, tiny_config

import aim_ext
from aim_ext.engine import fit
from aim_ext.models import ModelFileError, create_model, fuse_for_inference, load_model, save_pretrained


def _same_logits(a, b, size=32):
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = a.eval()(image), b.eval()(image)
    return torch.equal(first, second)


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_a_saved_model_loads_with_its_weights_labels_and_transform(tmp_path, stop_stage):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, stop_stage=stop_stage, width=32 if stop_stage else None)
    if stop_stage:
        model.set_gumbel(temperature=0.5, noise=False)
    folder = save_pretrained(
        model, tmp_path / "m", labels=["heron", "gull", "duck"], metrics={"val_acc": 0.9}
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 3 and config["stop_stage"] == stop_stage
    assert config["aim_ext_version"] == aim_ext.__version__ and config["metrics"] == {"val_acc": 0.9}
    loaded = aim_ext.load_model(folder)
    assert not loaded.training and _same_logits(model, loaded)
    cfg = loaded.pretrained_cfg
    assert cfg["label_names"] == ["heron", "gull", "duck"] and cfg["input_size"] == (3, 224, 224)
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    if stop_stage:
        assert loaded.width == 32 and (loaded.temperature, loaded.gumbel_noise) == (0.5, False)
    # A save's name is its content's: the same model saved again gives the same bytes; other
    # metrics, another name.
    again = save_pretrained(
        model, tmp_path / "again", labels=["heron", "gull", "duck"], metrics={"val_acc": 0.9}
    )
    other = save_pretrained(
        model, tmp_path / "other", labels=["heron", "gull", "duck"], metrics={"val_acc": 0.8}
    )
    for name in ("config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert json.loads((other / "config.json").read_text())["weights_id"] != config["weights_id"]


def test_a_run_folder_and_its_checkpoints_load_without_the_dataset(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    model = make_model(cfg)
    fit(cfg, Blobs(32, 0), Blobs(16, 1), model, log=lambda *_: None)
    run = tmp_path / "run"
    for source in (run / "best.pt", run / "last.pt", run):
        loaded = load_model(source)
        assert loaded.num_classes == 2 and loaded.stop_stage == 3, source
        assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
        assert _same_logits(model, loaded), source  # one epoch: the best is the last


def test_bad_files_are_refused_in_one_line_and_nothing_runs(tmp_path):
    model = create_model("resnet18", num_classes=2, stop_stage=3)
    folder = save_pretrained(model, tmp_path / "m")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(folder)

    other = save_pretrained(create_model("resnet18", num_classes=2, stop_stage=2), tmp_path / "other")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="model.safetensors does not fit resnet18\\+AIM\\[3\\]: missing"):
        load_model(folder)  # the weights of another architecture than config.json's

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    payload = tmp_path / "evil.pt"
    payload.write_bytes(pickle.dumps({"model": Boom(), "config": {}}))
    with pytest.raises(ModelFileError, match="not a checkpoint aim-ext can load safely"):
        load_model(payload)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="garbage.pt is not a checkpoint"):
        load_model(tmp_path / "garbage.pt")
    with pytest.raises(ModelFileError, match="model not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="holds no model") as error:
        load_model(tmp_path / "empty")
    assert "\n" not in str(error.value)


def test_save_pretrained_refuses_a_fused_model_and_wrong_labels(tmp_path):
    model = create_model("resnet18", num_classes=2, stop_stage=3).eval()
    with pytest.raises(ValueError, match="3 labels for a model of 2 classes"):
        save_pretrained(model, tmp_path / "m", labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="before aim_ext.fuse_for_inference"):
        save_pretrained(fuse_for_inference(model), tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("dataset", ["cub", "tuxbirds95"])
def test_the_saved_transform_frames_images_as_the_evaluation_did(tmp_path, dataset):
    """timm's transform from a saved model's config (aim-explain's, torch.hub's) against the
    evaluation transform of the dataset it was trained on: a file dataset's resized central 87.5%,
    a generated dataset's whole frame (its images are rendered at the model's size)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from torchvision.tv_tensors import Image as Image_

    from aim_ext.data import eval_preprocessing
    from aim_ext.data.transforms import eval_transform, normalise_transform

    folder = save_pretrained(
        create_model("resnet18", num_classes=2, stop_stage=3),
        tmp_path,
        image_size=64,
        **eval_preprocessing(dataset),
    )
    model = load_model(folder)
    transform = create_transform(**resolve_data_config({}, model=model))
    pixels = torch.randint(0, 256, (3, 8, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    if dataset == "cub":  # a smooth photo larger than the model's input, of another aspect ratio
        photo = torch.nn.functional.interpolate(pixels[None].float(), size=(90, 120), mode="bilinear")[0]
        photo = photo.round().to(torch.uint8)
        expected = eval_transform(64, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])(
            Image_(photo)
        )
        tolerance = 0.03  # PIL and torch antialias a little differently (bicubic: 0.05 off)
    else:
        photo = torch.nn.functional.interpolate(pixels[None].float(), size=(64, 64), mode="nearest")[0]
        photo = photo.to(torch.uint8)
        expected = normalise_transform(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])(
            Image_(photo)
        )
        tolerance = 1e-6
    got = transform(Image.fromarray(photo.permute(1, 2, 0).numpy()))
    assert got.shape == expected.shape == (3, 64, 64)
    assert (got - expected).abs().max() < tolerance


def test_a_tensor_shared_between_modules_is_saved_once_and_given_back_to_each():
    """safetensors stores a tensor once: a model that shares a module between places (timm's CoaT
    shares its position encodings) is saved under the first name and loaded into every one."""
    from aim_ext.models.saved import _tied, _untied

    shared = torch.nn.Linear(3, 3)
    model = torch.nn.ModuleDict({"b": shared, "a": shared, "c": torch.nn.Linear(3, 3)})
    state = model.state_dict()
    saved = _untied(state)
    assert sorted(saved) == ["a.bias", "a.weight", "c.bias", "c.weight"]
    fresh = torch.nn.ModuleDict({"b": (s := torch.nn.Linear(3, 3)), "a": s, "c": torch.nn.Linear(3, 3)})
    fresh.load_state_dict(_tied(fresh, saved), strict=True)
    for name, tensor in state.items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0)
