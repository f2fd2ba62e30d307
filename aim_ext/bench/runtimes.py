"""The runtimes aim-bench times a model in. Each `prepare_<runtime>` returns a call that runs the
evaluation model once on a fixed batch, or raises `Unavailable` with the reason, which the row
records (a runtime that is not installed, a dtype it lacks, a device it needs).

Inference runs the model in the row's dtype (weights and input cast, as deployment does; the
training step uses autocast instead). Eager, torch.compile and CUDA graphs take channels_last
input when asked; the exported formats take the contiguous batch and choose their own layouts.
torch.compile rows, and the compiled training step, compile through `compile_static`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aim_ext.export import INPUT_NAME, EvalGraph, example_image, export_aoti, export_onnx, tensorrt_available
from aim_ext.export.onnx_export import onnxruntime_providers


class Unavailable(Exception):
    """This runtime cannot run this row here; the message says why."""


@dataclass(frozen=True)
class Setting:
    device: str
    dtype: torch.dtype
    batch: int
    image_size: tuple[int, int]
    channels_last: bool
    workdir: Path  # exported files go here

    def image(self, channels_last: bool | None = None) -> torch.Tensor:
        image = example_image(self.batch, self.image_size).to(device=self.device, dtype=self.dtype)
        use = self.channels_last if channels_last is None else channels_last
        return image.contiguous(memory_format=torch.channels_last) if use else image

    def tag(self, name: str) -> str:
        """A file name for `name` (e.g. resnet50+AIM[3]) in this setting."""
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return f"{safe}_{str(self.dtype).removeprefix('torch.')}_b{self.batch}"


def _module(model: nn.Module, s: Setting) -> nn.Module:
    module = EvalGraph(copy.deepcopy(model)).to(device=s.device, dtype=s.dtype)
    return module.to(memory_format=torch.channels_last) if s.channels_last else module


def compile_static(module: nn.Module, **options) -> Callable:
    """`torch.compile` with `dynamic=False`: one specialisation per row, as a deployment at a fixed
    size would. Otherwise a later row's new batch or size makes the sizes symbolic, and torch
    2.14.1's inductor fails on timm's ConvNeXt with symbolic sizes and gradients on."""
    return torch.compile(module, dynamic=False, **options)


def _inference(fn: Callable, *args) -> Callable[[], object]:
    def call():
        with torch.inference_mode():
            return fn(*args)

    return call


def _needs_cuda(s: Setting, what: str) -> None:
    if s.device != "cuda":
        raise Unavailable(f"needs a CUDA device ({what})")


def prepare_eager(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    return _inference(_module(model, s), s.image())


def prepare_compile(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    return _inference(compile_static(_module(model, s)), s.image())


def prepare_compile_cudagraphs(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    _needs_cuda(s, "torch.compile(mode='reduce-overhead')")
    return _inference(compile_static(_module(model, s), mode="reduce-overhead"), s.image())


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """fn, an inference call on CUDA with fixed inputs, captured once into a CUDA graph after a
    warm-up on a side stream (cuDNN and cuBLAS pick their algorithms outside the graph); returns
    the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        fn()
    return graph.replay


def prepare_cudagraphs(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    """The eager model captured once into a CUDA graph; each call replays it."""
    _needs_cuda(s, "CUDA graphs")
    module, image = _module(model, s), s.image()
    return captured(lambda: module(image))


def prepare_aoti(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    path = export_aoti(
        model,
        s.workdir / f"{s.tag(name)}_{s.device}.pt2",
        image_size=s.image_size,
        batch_size=s.batch,
        dtype=s.dtype,
        device=s.device,
    )
    return _inference(torch._inductor.aoti_load_package(str(path)), s.image(channels_last=False))


def _onnx_file(model: nn.Module, name: str, s: Setting) -> Path:
    if s.dtype == torch.bfloat16:
        raise Unavailable("the ONNX runtimes here have no bfloat16 convolution; float32 and float16 run")
    return export_onnx(
        model,
        s.workdir / f"{s.tag(name)}.onnx",
        image_size=s.image_size,
        batch_size=s.batch,
        fp16=s.dtype == torch.float16,
    )


def prepare_onnxruntime(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    """CPU: the CPU provider on numpy arrays. CUDA: the CUDA provider with the input and outputs
    bound to device memory (no host copies in the timed call)."""
    import onnxruntime

    providers = onnxruntime_providers()
    if s.device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise Unavailable("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
    session = onnxruntime.InferenceSession(
        str(_onnx_file(model, name, s)),
        providers=providers if s.device == "cuda" else ["CPUExecutionProvider"],
    )
    image = s.image(channels_last=False)
    if s.device != "cuda":
        feed = {INPUT_NAME: image.numpy()}
        return lambda: session.run(None, feed)
    binding = session.io_binding()
    element = np.float16 if s.dtype == torch.float16 else np.float32
    binding.bind_input(INPUT_NAME, "cuda", 0, element, tuple(image.shape), image.data_ptr())
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def prepare_tensorrt(model: nn.Module, name: str, s: Setting) -> Callable[[], object]:
    from aim_ext.export import TensorRTRunner, build_engine

    if not tensorrt_available():
        raise Unavailable("tensorrt is not installed")
    _needs_cuda(s, "TensorRT")
    onnx_path = _onnx_file(model, name, s)
    plan = build_engine(
        onnx_path, onnx_path.with_suffix(".plan"), image_size=s.image_size, batch_size=s.batch
    )
    runner, image = TensorRTRunner(plan), s.image(channels_last=False)
    return lambda: runner(image)


RUNTIMES: dict[str, Callable[[nn.Module, str, Setting], Callable[[], object]]] = {
    "eager": prepare_eager,
    "compile": prepare_compile,
    "cudagraphs": prepare_cudagraphs,
    "compile-cudagraphs": prepare_compile_cudagraphs,
    "aoti": prepare_aoti,
    "onnxruntime": prepare_onnxruntime,
    "tensorrt": prepare_tensorrt,
}
BATCH_ONE_ONLY = {"cudagraphs", "compile-cudagraphs"}  # graphs serve small-batch latency
# Runtimes whose memory lives outside torch's allocator: no peak-memory figure for them.
OUTSIDE_TORCH_MEMORY = {"onnxruntime", "tensorrt"}
