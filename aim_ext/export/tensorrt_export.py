"""TensorRT: an engine (.plan) built from the exported ONNX model with TensorRT's Python API.

TensorRT is optional (`pip install .[gpu]` on a machine with an NVIDIA GPU). The network is built
strongly typed, so precision follows the ONNX model: an fp16 engine comes from an fp16 ONNX
(`aim-export --fp16`); TensorRT 11 has no FP16 builder flag any more. TF32 is switched off so
that an fp32 engine computes in fp32, as the check against PyTorch expects.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aim_ext.export.graph import INPUT_NAME, MAX_BATCH

MISSING = (
    "TensorRT is not installed: `pip install tensorrt` (or this package's `[gpu]` extra) on a "
    "machine with an NVIDIA GPU and driver; TensorRT builds engines only on a GPU"
)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _tensorrt():
    if not tensorrt_available():
        raise RuntimeError(MISSING)
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU, and torch sees none")
    import tensorrt

    return tensorrt


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    image_size: tuple[int, int],
    batch_size: int = 1,
    dynamic_batch: bool = False,
) -> Path:
    """Parse the ONNX model and serialise an engine; a dynamic batch gets the profile
    1 .. max(batch_size, 256) with `batch_size` as the size to optimise for."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    shape = (batch_size, 3, *image_size)
    largest = (min(max(batch_size, 256), MAX_BATCH), 3, *image_size)
    profile.set_shape(
        INPUT_NAME,
        (1, 3, *image_size) if dynamic_batch else shape,
        shape,
        largest if dynamic_batch else shape,
    )
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    return plan_path


class TensorRTRunner:
    """Runs a serialised engine on CUDA tensors, on torch's current stream."""

    def __init__(self, plan_path: str | Path) -> None:
        trt = _tensorrt()
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path} is not a TensorRT engine for this TensorRT and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, image: Tensor) -> list[Tensor]:
        image = image.contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(image.shape))
        self.context.set_tensor_address(INPUT_NAME, image.data_ptr())
        outputs = []
        for name in self.output_names:
            dtype = _torch_dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=image.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(image.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        stream.synchronize()
        return outputs


def _torch_dtype(numpy_type) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=numpy_type)).dtype
