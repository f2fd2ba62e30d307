"""AIM architectures through timm's registry and torch.hub (the repository's hubconf.py)."""

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from aim_ext.models import ARCHITECTURES, ModelFileError, architecture, create_model, save_pretrained

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_timm_builds_every_registered_architecture(name):
    backbone, stop = ARCHITECTURES[name]
    assert name in timm.list_models("*_aim*")
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=7)
    assert architecture(model) == f"{backbone}+AIM[{stop}]" and model.num_classes == 7


def test_timm_models_return_logits_in_eval_mode_like_timm():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100_aim3", num_classes=4).eval()
    torch.manual_seed(0)
    same = create_model("mobilenetv2_100", num_classes=4, stop_stage=3).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image), same(image)) and model(image).shape == (2, 4)


def test_hub_loads_a_saved_model_with_the_same_logits_and_its_transform(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenetv2_100", num_classes=3, stop_stage=3).eval()
    folder = save_pretrained(model, tmp_path / "saved", labels=["a", "b", "c"], image_size=64)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    loaded = torch.hub.load(
        str(REPO), "mobilenetv2_100_aim3", source="local", pretrained=str(folder), sha256=digest
    )
    photo = Image.new("RGB", (90, 70), (120, 160, 200))
    batch = loaded.transform(photo).unsqueeze(0)
    assert batch.shape == (1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    fresh = torch.hub.load(str(REPO), "resnet50_aim3", source="local", num_classes=5)
    assert fresh.num_classes == 5 and not fresh.training and fresh.transform is not None


def test_hub_refuses_a_wrong_hash_another_architecture_and_other_classes(tmp_path):
    folder = save_pretrained(create_model("mobilenetv2_100", num_classes=3, stop_stage=3), tmp_path / "m")
    load = lambda name, **kw: torch.hub.load(str(REPO), name, source="local", pretrained=str(folder), **kw)  # noqa: E731
    with pytest.raises(ModelFileError, match="has SHA-256 .* not the expected 00ff"):
        load("mobilenetv2_100_aim3", sha256="00ff")
    with pytest.raises(
        ModelFileError, match="holds a mobilenetv2_100\\+AIM\\[3\\] model, not resnet50\\+AIM\\[3\\]"
    ):
        load("resnet50_aim3")
    with pytest.raises(ModelFileError, match="classifies 3 classes, not num_classes=10"):
        load("mobilenetv2_100_aim3", num_classes=10)
