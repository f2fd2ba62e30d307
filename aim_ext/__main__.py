"""`python -m aim_ext info`: versions and which compiled kernels are available."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def info() -> dict:
    """Versions of the package, torch and CUDA, and the kernels available."""
    import aim_ext
    from aim_ext.ops import kernels_available

    return {
        "aim_ext": aim_ext.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "kernels": kernels_available(),
        "triton": triton_version(),
        "build": build_decision(),
    }


def triton_version() -> str | None:
    """Triton's version (the pooled head's CUDA kernels; it comes with torch's CUDA wheels), or None."""
    from aim_ext.ops import pooled_head_triton

    if not pooled_head_triton.HAVE_TRITON:
        return None
    import triton

    return triton.__version__ + (
        " (interpreter: TRITON_INTERPRET=1)" if pooled_head_triton.INTERPRETED else ""
    )


def build_decision() -> str:
    """What setup.py decided to compile, and why (recorded at build time)."""
    path = Path(__file__).with_name("_build_info.json")
    if not path.exists():
        return "unknown (no build record: the package was not built by setup.py)"
    return json.loads(path.read_text())["decision"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aim_ext")
    parser.add_argument("command", choices=["info"], help="info: versions and available kernels")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
