"""`aim-export`: the evaluation model (logits, then the masks) to ONNX, AOTInductor or TensorRT.

    aim-export runs/demo/aim/model --onnx model.onnx        # a saved model, run folder or best.pt
    aim-export --model convnext_tiny --stop-stage 2 --num-classes 200 --checkpoint RUN/best.pt \\
        --onnx model.onnx --dynamic-batch
    aim-export --model resnet50 --stop-stage 3 --num-classes 2 --aot model.pt2 --device cuda
    aim-export --model convnext_tiny --stop-stage 2 --num-classes 200 --tensorrt model.plan --fp16

The model is first fused for inference (`aim_ext.fuse_for_inference`: BatchNorm folded into the
convolutions; AIM's logits from the pooled head, without P_T); --no-fuse exports it as it is.
AIM's feature branches are exported dense unless --sparse on: the sparse branch's graph has
data-dependent shapes (ONNX NonZero), which not every runtime optimises (docs/export.md).
After writing each file it runs the exported model on a batch of random images (with a dynamic
batch, a batch size other than the traced one) and prints the largest difference from PyTorch's
unfused model for the logits and the masks; the exit status is 1 when they do not agree.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from aim_ext.cli.errors import one_line_errors, positive_int, say, shown
from aim_ext.export.aoti_export import export_aoti, run_aoti
from aim_ext.export.graph import example_image, image_size_of, output_names, reference_outputs
from aim_ext.export.onnx_export import DEFAULT_OPSET, export_onnx, onnxruntime_providers, run_onnxruntime
from aim_ext.export.tensorrt_export import MISSING, TensorRTRunner, build_engine, tensorrt_available
from aim_ext.export.verify import compare_outputs, format_checks
from aim_ext.models import AIM, architecture, create_model, fuse_for_inference, load_model, load_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        help="a trained model: a saved-model folder (aim_ext.save_pretrained), an aim-train run folder "
        "or checkpoint; it brings its architecture, classes and input size (no --model needed)",
    )
    parser.add_argument("--model", help="without SOURCE: the timm backbone name, e.g. convnext_tiny")
    parser.add_argument("--stop-stage", type=int, help="AIM's stop stage; leave out for the vanilla model")
    parser.add_argument("--num-classes", type=positive_int, help="without SOURCE: the number of classes")
    parser.add_argument(
        "--checkpoint", type=Path, help="with --model: an aim-train checkpoint or a state_dict file"
    )
    parser.add_argument(
        "--image-size", type=positive_int, help="square input size (default: the model's, e.g. 224)"
    )
    parser.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="ONNX file (checked with onnxruntime)")
    parser.add_argument("--aot", type=Path, metavar="OUT.pt2", help="AOTInductor package")
    parser.add_argument("--tensorrt", type=Path, metavar="OUT.plan", help="TensorRT engine (needs tensorrt)")
    parser.add_argument("--fp16", action="store_true", help="export in float16")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size at run time")
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="the traced (or optimised-for) batch"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where the AOTInductor package runs (default: cuda if present)",
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export aim_ext.fuse_for_inference(model) (default); --no-fuse: the model as trained",
    )
    parser.add_argument(
        "--sparse",
        choices=["off", "on"],
        default="off",
        help="AIM's feature branches in the exported graph: dense (default) or sparse (AIM.sparse_inference)",
    )
    parser.add_argument(
        "--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument("--no-check", action="store_true", help="skip running the exported files")
    return parser


@one_line_errors("aim-export")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source is None and (args.model is None or args.num_classes is None):
        parser.error("name a trained model (SOURCE) or --model and --num-classes")
    if args.source is not None and (
        args.model or args.checkpoint or args.num_classes or args.stop_stage is not None
    ):
        parser.error(
            "SOURCE brings its own architecture and weights: leave out --model, --stop-stage, "
            "--num-classes and --checkpoint"
        )
    if not (args.onnx or args.aot or args.tensorrt):
        parser.error("name at least one output: --onnx OUT.onnx, --aot OUT.pt2 or --tensorrt OUT.plan")
    if args.opset < DEFAULT_OPSET:
        parser.error(f"--opset {args.opset} is too old: the export needs opset {DEFAULT_OPSET} or newer")
    if args.tensorrt and not tensorrt_available():
        say("aim-export", MISSING)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    try:
        if args.source is not None:
            model = load_model(args.source)
        else:
            model = create_model(args.model, num_classes=args.num_classes, stop_stage=args.stop_stage)
            if args.checkpoint is not None:
                load_weights(model, args.checkpoint)
        model.eval()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        say("aim-export", error)
        return 1
    size = (args.image_size, args.image_size) if args.image_size else image_size_of(model)
    options = {"image_size": size, "batch_size": args.batch_size, "dynamic_batch": args.dynamic_batch}
    checks = Checks(model, size, args)  # against the unfused model
    exported = fuse_for_inference(model) if args.fuse else copy.deepcopy(model)
    if isinstance(exported, AIM):
        exported.sparse_inference = args.sparse
    print(
        f"aim-export: {architecture(model)}, classes {model.num_classes}, image {size}, "
        f"{'float16' if args.fp16 else 'float32'}, "
        f"{'fused for inference' if args.fuse else 'not fused'}"
        f"{f', sparse branches {args.sparse}' if isinstance(model, AIM) else ''}, "
        f"outputs {', '.join(output_names(model))}"
    )

    onnx_path = args.onnx or (args.tensorrt.with_suffix(".onnx") if args.tensorrt else None)
    if onnx_path:
        export_onnx(exported, onnx_path, fp16=args.fp16, opset=args.opset, **options)
        print(f"wrote {shown(onnx_path)} (ONNX opset {args.opset}, onnx.checker full check passed)")
        providers = onnxruntime_providers()
        checks.run(
            f"onnxruntime ({providers[0]})", "cpu", lambda x: run_onnxruntime(onnx_path, x.numpy(), providers)
        )
    if args.aot:
        export_aoti(
            exported, args.aot, dtype=torch.float16 if args.fp16 else torch.float32, device=device, **options
        )
        print(f"wrote {shown(args.aot)} (AOTInductor package for {device})")
        checks.run(f"AOTInductor ({device})", device, lambda x: run_aoti(args.aot, x))
    if args.tensorrt:
        build_engine(onnx_path, args.tensorrt, **options)
        print(f"wrote {shown(args.tensorrt)} (TensorRT engine from {shown(onnx_path)})")
        runner = TensorRTRunner(args.tensorrt)
        checks.run("TensorRT", "cuda", runner)
    if checks.failed:
        print(
            f"aim-export: the exported model does not match PyTorch: {', '.join(checks.failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


class Checks:
    """Runs each exported file on one random batch and compares it with PyTorch on the same device."""

    def __init__(self, model, image_size: tuple[int, int], args: argparse.Namespace) -> None:
        self.model = model
        self.enabled = not args.no_check
        self.dtype = torch.float16 if args.fp16 else torch.float32
        batch = max(args.batch_size, 2) + 1 if args.dynamic_batch else args.batch_size
        self.image = example_image(batch, image_size, seed=1)
        self.failed: list[str] = []

    def run(self, title: str, device: str, candidate) -> None:
        if not self.enabled:
            return
        model = self.model.to(device)
        reference, mask_logits = reference_outputs(model, self.image.to(device))
        self.model.cpu()
        outputs = candidate(self.image.to(device=device, dtype=self.dtype))
        checks = compare_outputs(
            output_names(model), reference, outputs, mask_logits, dtype=str(self.dtype).removeprefix("torch.")
        )
        print(
            format_checks(
                f"\n{title} against PyTorch (float32, {device}), batch of {len(self.image)}:", checks
            )
        )
        print()
        if not all(c.ok for c in checks):
            self.failed.append(title)


if __name__ == "__main__":
    sys.exit(main())
