"""`--pretrained-file`: strict loading of backbone weights, torchvision's MobileNetV2 included."""

import pytest
import timm
import torch
import torchvision

from aim_ext import create_model
from aim_ext.models.pretrained import load_backbone_weights

X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2().eval()
    path = tmp_path_factory.mktemp("w") / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    return net, path


@torch.no_grad()
def test_torchvision_mobilenet_v2_maps_onto_timm(torchvision_file):
    net, path = torchvision_file
    vanilla = create_model("mobilenetv2_100", num_classes=3).eval()
    load_backbone_weights(vanilla, path)
    torch.testing.assert_close(vanilla.forward_features(X), net.features(X))
    aim = create_model("mobilenetv2_100", num_classes=3, stop_stage=3).eval()
    load_backbone_weights(aim, path)
    # timm's level 4 is the last inverted-residual block, before torchvision's final 1x1 conv.
    torch.testing.assert_close(aim.backbone(X)[-1], net.features[:-1](X))


@torch.no_grad()
@pytest.mark.parametrize("name", ["convnext_atto", "resnet18"])
def test_timm_layout_loads_into_vanilla_and_aim(tmp_path, name):
    source = timm.create_model(name).eval()
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    vanilla = create_model(name, num_classes=3).eval()
    load_backbone_weights(vanilla, path)
    torch.testing.assert_close(vanilla.forward_features(X), source.forward_features(X))
    aim = create_model(name, num_classes=3, stop_stage=2).eval()
    load_backbone_weights(aim, path)
    torch.testing.assert_close(aim.backbone(X)[-1], source.forward_features(X))


def test_a_file_that_does_not_fit_names_the_keys(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state.pop("layer4.1.bn2.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    for stop_stage in (None, 3):
        model = create_model("resnet18", num_classes=3, stop_stage=stop_stage)
        with pytest.raises(
            ValueError, match=r"missing keys \['layer4.1.bn2.weight'\].*unexpected keys \['extra"
        ):
            load_backbone_weights(model, path)
    with pytest.raises(ValueError, match="not a torchvision MobileNetV2"):
        torch.save({"features.0.0.weight": torch.zeros(1)}, path)
        load_backbone_weights(create_model("mobilenetv2_100", num_classes=3), path)


@pytest.mark.parametrize(
    ("model", "stop_stage", "tag"), [("convnext_tiny", 2, "fb_in1k"), ("resnet50", None, "tv_in1k")]
)
def test_the_configs_weight_tag_reaches_timm(monkeypatch, model, stop_stage, tag):
    """--pretrained-tag picks timm's weights by name (the paper's ImageNet-1k ones, not timm's
    default tag); nothing is downloaded here: timm's loader is replaced by a recorder."""
    import timm.models._builder as builder

    from aim_ext.engine import TrainConfig
    from aim_ext.engine.build import build_model, pretrained_weights

    loaded = []
    monkeypatch.setattr(
        builder, "load_pretrained", lambda model, pretrained_cfg=None, **_: loaded.append(pretrained_cfg)
    )
    cfg = TrainConfig(model=model, stop_stage=stop_stage, pretrained=True, pretrained_tag=tag)
    with torch.device("meta"):
        build_model(cfg, 2)
    assert [(c["architecture"], c["tag"], c["hf_hub_id"]) for c in loaded] == [
        (model, tag, f"timm/{model}.{tag}")
    ]
    loaded.clear()
    with torch.device("meta"):  # no tag: timm's default, which for ConvNeXt-T is ImageNet-12k fine-tuned
        build_model(TrainConfig(model=model, stop_stage=stop_stage, pretrained=True), 2)
    assert loaded[0]["tag"] == timm.models.get_pretrained_cfg(model).tag
    # What a run's saved model records as its starting weights.
    assert pretrained_weights(cfg) == f"timm:{model}.{tag}"
    default = timm.models.get_pretrained_cfg(model).tag
    assert pretrained_weights(TrainConfig(model=model, pretrained=True)) == f"timm:{model}.{default}"
    assert (
        pretrained_weights(TrainConfig(model=model, pretrained=True, pretrained_file="w.pth")) == "file:w.pth"
    )
    assert pretrained_weights(TrainConfig(model=model)) is None
    assert (
        pretrained_weights(TrainConfig(model=f"{model}.a1_in1k", pretrained=True)) == f"timm:{model}.a1_in1k"
    )
    for bad in (dict(), dict(pretrained=True, pretrained_file="w.pth")):  # a tag for no timm weights
        with pytest.raises(ValueError, match="pretrained_tag names timm's weights"):
            TrainConfig(model=model, pretrained_tag=tag, **bad)
