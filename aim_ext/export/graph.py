"""The evaluation model as an export graph: image -> (logits, the mask of each stage, top first).

Every exporter (ONNX, AOTInductor, TensorRT) traces `EvalGraph`, so all formats share one set of
outputs and names: ``logits`` (N, classes), then ``mask_stage<l>`` (N, 1, h_l, w_l) float 0/1 for
each backbone feature level l the top-down pathway masks, top stage first. Evaluation masks are
deterministic, ``1[A_l >= 0]`` (no Gumbel noise).
"""

from __future__ import annotations

import copy

import torch
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from aim_ext.models import AIM, BottomUpAIM, MaskingModel

INPUT_NAME = "image"
MAX_BATCH = 4096  # the largest batch a dynamic-batch export accepts


class EvalGraph(nn.Module):
    """Wraps a vanilla timm model or an AIM model in evaluation mode; returns a tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()

    @property
    def output_names(self) -> list[str]:
        return output_names(self.model)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        if isinstance(self.model, MaskingModel):
            logits, masks = self.model.predict(image)
            return (logits, *masks)
        return (self.model(image),)


def output_names(model: nn.Module) -> list[str]:
    stages = model.stage_indices if isinstance(model, MaskingModel) else []
    return ["logits", *(f"mask_stage{index}" for index in stages)]


@torch.no_grad()
def reference_outputs(model: nn.Module, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """PyTorch's outputs of the export graph, and each mask's logits A_l (to tell which mask
    positions sit so close to the threshold that rounding may flip them)."""
    model = model.eval()
    if isinstance(model, BottomUpAIM):
        top, masks, mask_logits = model.forward_masked(image)
        return [model.forward_head(top), *masks], mask_logits
    if not isinstance(model, AIM):
        return [model(image)], []
    stages = model.forward_topdown(image)
    logits = model.forward_head(stages[-1].merged)
    return [logits, *(s.mask for s in stages)], [s.mask_logits for s in stages]


def image_size_of(model: nn.Module) -> tuple[int, int]:
    """The (height, width) the model was configured for, from timm's data config (e.g. (224, 224))."""
    _, height, width = resolve_model_data_config(model)["input_size"]
    return int(height), int(width)


def example_image(batch: int, image_size: tuple[int, int], *, seed: int = 0, dtype=torch.float32) -> Tensor:
    """A reproducible normalised-looking batch (standard normal) for tracing and checks."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *image_size, generator=generator).to(dtype)


def prepare_graph(model: nn.Module, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> EvalGraph:
    """An `EvalGraph` of a copy of ``model`` in ``dtype`` on ``device`` (the model is untouched)."""
    return EvalGraph(copy.deepcopy(model).to(device=device, dtype=dtype))


def trace_inputs(
    image_size: tuple[int, int],
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[tuple[Tensor], tuple[dict[int, object]] | None]:
    """The example input and `dynamic_shapes` for torch.export. With a dynamic batch the example
    has at least 2 images: a batch of 1 would be specialised into the graph."""
    batch = max(batch_size, 2) if dynamic_batch else batch_size
    image = example_image(batch, image_size).to(device=device, dtype=dtype)
    if not dynamic_batch:
        return (image,), None
    return (image,), ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
