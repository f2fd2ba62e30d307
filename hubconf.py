"""torch.hub entry points of aim-ext, one per AIM architecture:

    model = torch.hub.load("path/to/aim-ext", "mobilenetv2_100_aim3", source="local",
                           pretrained="runs/demo/aim/model")
    logits = model(model.transform(pil_image).unsqueeze(0))

Each takes `num_classes`, `pretrained` (a saved-model folder or an aim-train checkpoint) and
`sha256` (of the weights file, checked when given); see `aim_ext.models.hub.hub_model`.
"""

dependencies = ["torch", "timm", "safetensors"]

from aim_ext.models.hub import hub_model  # noqa: E402


def convnext_tiny_aim2(**kwargs):
    """ConvNeXt-T+AIM[2]: masks at feature levels 3 and 2."""
    return hub_model("convnext_tiny_aim2", **kwargs)


def convnext_tiny_aim1(**kwargs):
    """ConvNeXt-T+AIM[1]: masks at feature levels 3, 2 and 1."""
    return hub_model("convnext_tiny_aim1", **kwargs)


def resnet50_aim3(**kwargs):
    """ResNet-50+AIM[3]: masks at feature levels 4 and 3."""
    return hub_model("resnet50_aim3", **kwargs)


def resnet50_aim2(**kwargs):
    """ResNet-50+AIM[2]: masks at feature levels 4, 3 and 2."""
    return hub_model("resnet50_aim2", **kwargs)


def mobilenetv2_100_aim3(**kwargs):
    """MobileNetV2+AIM[3], the demo's model: masks at feature levels 4 and 3."""
    return hub_model("mobilenetv2_100_aim3", **kwargs)
