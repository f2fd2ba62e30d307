"""Compile every launch of the pooled head's Triton kernels for a GPU, without one, and report each
kernel's registers, spills and shared memory.

    python benchmarks/triton_resources.py [--arch 90] [--width 256] [--dtypes bfloat16] [--json out.json]

For each kernel and configuration the host code can launch (aim_ext.ops.pooled_head_triton's
`align_config`, `refine_config`, `reduce_config` and `dot_options`) at width D, in float32,
float16 and bfloat16, Triton's own compiler lowers the kernel to PTX for sm_{arch}, and Triton's
bundled ptxas (-v) reports the registers per thread and the spill stores. Exits non-zero when a
kernel fails to compile, uses more shared memory than an H100 block may (227 KiB), or spills in
half precision (the path the targets are measured on). Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def launches(d: int, dtypes: list[str]):
    """(name, kernel, signature, constexprs, options) of every launch the host code can make."""
    import torch

    from aim_ext.ops import pooled_head_triton as k

    i32, f32 = "i32", "*fp32"
    for dtype_name in dtypes:
        pointer = POINTER[dtype_name]
        dtype = getattr(torch, dtype_name)
        dot = {key: v for key, v in k.dot_options(dtype).items()} | {"WIDEN": False}
        config = k.align_config(d)
        options = {"num_warps": config.pop("num_warps")}
        signature = {
            "s_ptr": pointer, "s_n": i32, "s_c": i32, "s_h": i32, "s_w": i32, "w_ptr": pointer,
            "bias_ptr": pointer, "out_ptr": pointer, "index_ptr": "*i32", "count_ptr": "*i32",
            "HW": i32, "W": i32, "C": i32,
        }  # fmt: skip
        yield (
            f"align {dtype_name}",
            k._align_kernel,
            signature,
            {"D": d, "HAS_BIAS": True, **dot, **config},
            options,
        )
        for hw, size in ((49, "7x7"), (3136, "56x56")):
            signature = {
                "src_ptr": pointer, "src_n": i32, "src_c": i32, "src_h": i32, "src_w": i32, "w_ptr": pointer,
                "tap_bias_ptr": f32, "bias_ptr": pointer, "ln_w_ptr": pointer, "ln_b_ptr": pointer,
                "pool_ptr": f32,
                "index_ptr": "*i32", "start_ptr": "*i32", "end_ptr": "*i32", "partial_ptr": f32,
                "H": i32, "W": i32, "X": i32, "eps": "fp32", "tiles": i32,
            }  # fmt: skip
            for kind, conv, tap_bias in (
                ("refine", True, False),
                ("refine composed", True, True),
                ("epilogue", False, False),
            ):
                config = k.refine_config(hw, dtype, conv)
                options = {"num_warps": config.pop("num_warps")}
                constexprs = {"D": d, "CONV": conv, "HAS_BIAS": True, "TAP_BIAS": tap_bias, **dot, **config}
                yield f"{kind} {dtype_name} {size}", k._refine_pool_kernel, signature, constexprs, options
    config = k.reduce_config(d)
    options = {"num_warps": config.pop("num_warps")}
    signature = {
        "partial_ptr": "*fp32",
        "start_ptr": "*i32",
        "end_ptr": "*i32",
        "out_ptr": "*fp32",
        "tiles": i32,
    }
    yield "reduce", k._reduce_kernel, signature, {"D": d, "BM": 64, **config}, options


def compile_one(kernel, signature: dict, constexprs: dict, options: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    full = dict(signature) | {name: "constexpr" for name in constexprs}
    source = ASTSource(
        fn=kernel,
        signature={name: full[name] for name in kernel.arg_names},
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run(
            [
                get_ptxas(arch).path,
                f"-arch=sm_{arch}{suffix}",
                "-v",
                str(ptx),
                "-o",
                str(Path(tmp, "kernel.cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "registers": registers,
        "spill_bytes": int(spills.group(1)) if spills else 0,
        "shared": compiled.metadata.shared,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument(
        "--dtypes", type=lambda t: t.split(","), default=list(POINTER), help="comma-separated"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_resources: unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    rows, failures = [], []
    print(f"sm_{args.arch}, width {args.width}")
    print("| launch | warps | registers | spill stores (bytes) | shared memory (KiB) |")
    print("|---|---|---|---|---|")
    for name, kernel, signature, constexprs, options in launches(args.width, args.dtypes):
        try:
            row = {"launch": name, "num_warps": options["num_warps"]} | compile_one(
                kernel, signature, constexprs, options, args.arch
            )
        except Exception as error:  # a kernel that does not compile is the finding
            failures.append(
                f"{name}: does not compile: {str(error).splitlines()[0] if str(error) else error!r}"
            )
            continue
        rows.append(row)
        print(
            f"| {name} | {row['num_warps']} | {row['registers']} | {row['spill_bytes']} "
            f"| {row['shared'] / 1024:.1f} |",
            flush=True,
        )
        if row["shared"] > SHARED_LIMIT:
            failures.append(f"{name}: {row['shared']} bytes of shared memory, more than {SHARED_LIMIT}")
        if row["spill_bytes"] and "float32" not in name:
            failures.append(f"{name}: spills {row['spill_bytes']} bytes of registers")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "width": args.width, "rows": rows}, indent=1))
    for failure in failures:
        print(f"triton_resources: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
