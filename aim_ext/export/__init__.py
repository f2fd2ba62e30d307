"""Export of the evaluation model (logits, then each stage's mask) to ONNX, AOTInductor and
TensorRT, with checks against PyTorch; `aim-export` is the command line."""

from aim_ext.export.aoti_export import export_aoti, package_metadata, run_aoti
from aim_ext.export.graph import (
    INPUT_NAME,
    EvalGraph,
    example_image,
    output_names,
    reference_outputs,
)
from aim_ext.export.onnx_export import check_onnx, export_onnx, run_onnx_reference, run_onnxruntime
from aim_ext.export.tensor_file import load_tensor, save_tensor
from aim_ext.export.tensorrt_export import TensorRTRunner, build_engine, tensorrt_available
from aim_ext.export.verify import OutputCheck, compare_outputs, format_checks

__all__ = [
    "INPUT_NAME",
    "EvalGraph",
    "OutputCheck",
    "TensorRTRunner",
    "build_engine",
    "check_onnx",
    "compare_outputs",
    "example_image",
    "export_aoti",
    "export_onnx",
    "format_checks",
    "load_tensor",
    "output_names",
    "package_metadata",
    "reference_outputs",
    "run_aoti",
    "run_onnx_reference",
    "run_onnxruntime",
    "save_tensor",
    "tensorrt_available",
]
