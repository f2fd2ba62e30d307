"""AOTInductor export: the evaluation graph compiled ahead of time into a .pt2 package for the CPU
or CUDA, loadable from Python (`torch._inductor.aoti_load_package`) or C++ (`export/aim_runner`).

The AIM ops stay custom ops in the package (AOTInductor calls them through its proxy executor), so
the package runs our fused kernels; a process that loads it needs them registered: `import
aim_ext` in Python, the `aim_ops` library in C++. The package's metadata says how to feed it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from aim_ext.export.graph import image_size_of, prepare_graph, trace_inputs
from aim_ext.models import architecture


def package_metadata(model: nn.Module, image_size: tuple[int, int], names: list[str], dtype: torch.dtype):
    """What a runner needs to know, as the strings AOTInductor stores: `aim_ext.*` keys."""
    data = resolve_model_data_config(model)
    mean, std = data["mean"], data["std"]
    return {
        "aim_ext.model": architecture(model),
        "aim_ext.num_classes": str(model.num_classes),
        "aim_ext.outputs": ",".join(names),
        "aim_ext.image_size": f"{image_size[0]},{image_size[1]}",
        "aim_ext.mean": ",".join(f"{v:g}" for v in mean),
        "aim_ext.std": ",".join(f"{v:g}" for v in std),
        "aim_ext.dtype": str(dtype).removeprefix("torch."),
    }


def export_aoti(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """torch.export the evaluation graph, compile it with AOTInductor and write the .pt2 package
    (weights and input in ``dtype``: float32, float16 or bfloat16)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_size = image_size or image_size_of(model)
    graph = prepare_graph(model, dtype=dtype, device=device)
    args, dynamic_shapes = trace_inputs(
        image_size, batch_size=batch_size, dynamic_batch=dynamic_batch, dtype=dtype, device=device
    )
    with torch.no_grad():
        program = torch.export.export(graph, args, dynamic_shapes=dynamic_shapes)
    metadata = package_metadata(model, image_size, graph.output_names, dtype)
    return Path(
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata}
        )
    )


def run_aoti(path: str | Path, image: Tensor) -> list[Tensor]:
    """Load the package and run it on one batch (on the device the package was compiled for)."""
    runner = torch._inductor.aoti_load_package(str(path))
    return list(runner(image))
