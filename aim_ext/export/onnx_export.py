"""ONNX export: standard operators only, opset 18+, an optional dynamic batch, fp32 or fp16.

The AIM ops export through their pure PyTorch reference (`masked_merge` and `topdown_epilogue`
switch to it under `torch.onnx.is_in_onnx_export()`), so the mask becomes GreaterOrEqual and Cast,
Eq. 3 a Mul, the top-down merge `Resize(nearest, asymmetric, floor)` and Add, and the end of the
feature branch LayerNormalization and Erf-based GELU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from aim_ext.cache import atomic_path
from aim_ext.export.graph import INPUT_NAME, prepare_graph, trace_inputs

DEFAULT_OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    batch_size: int = 1,
    dynamic_batch: bool = False,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the evaluation graph of ``model`` to ``path`` as one self-contained .onnx file, and
    check it with `onnx.checker` (full check, shape inference included)."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is too old: the export needs opset {DEFAULT_OPSET} or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:  # a failed export leaves the old file
        _export_onnx(model, partial, image_size, batch_size, dynamic_batch, fp16, opset)
    return path


def _export_onnx(model, path: Path, image_size, batch_size, dynamic_batch, fp16, opset) -> None:
    dtype = torch.float16 if fp16 else torch.float32
    graph = prepare_graph(model, dtype=dtype)
    args, dynamic_shapes = trace_inputs(
        image_size, batch_size=batch_size, dynamic_batch=dynamic_batch, dtype=dtype
    )
    torch.onnx.export(
        graph,
        args,
        str(path),
        input_names=[INPUT_NAME],
        output_names=graph.output_names,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        verbose=False,
    )
    check_onnx(path)


def check_onnx(path: str | Path) -> onnx.ModelProto:
    """`onnx.checker` full check, and every node a standard ONNX operator. The file is read by
    Python (the checker's own reader refuses a path that is not UTF-8); an export is self-contained
    and under protobuf's 2 GiB."""
    proto = onnx.load(Path(path))
    onnx.checker.check_model(proto, full_check=True)
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS}
    )
    if custom or proto.functions:
        raise RuntimeError(
            f"{path} is not plain ONNX: custom operators {custom}, "
            f"functions {[f.name for f in proto.functions]}"
        )
    return proto


def onnxruntime_providers() -> list[str]:
    """onnxruntime's providers, best first: CUDA when onnxruntime-gpu has it, then the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


def run_onnxruntime(
    path: str | Path, image: np.ndarray, providers: list[str] | None = None
) -> list[np.ndarray]:
    """Run the exported model on one batch with onnxruntime; returns the outputs in order."""
    import onnxruntime

    model = Path(path).read_bytes()  # onnxruntime refuses a path that is not UTF-8
    session = onnxruntime.InferenceSession(model, providers=providers or onnxruntime_providers())
    return session.run(None, {INPUT_NAME: image})


def run_onnx_reference(path: str | Path, image: np.ndarray) -> list[np.ndarray]:
    """Run the exported model with ONNX's own reference evaluator (slow; an independent check)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(Path(path))).run(None, {INPUT_NAME: image})
