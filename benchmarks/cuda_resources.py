"""Registers, stack frame, spills and static shared memory of every CUDA kernel in the built
extension, for each architecture it was compiled for, checked against what each kernel may have.

    python benchmarks/cuda_resources.py [--library aim_ext/_C*.so] [--no-spills] [--all] [--json out.json]

No GPU and no compile: `cuobjdump --dump-resource-usage` reads the registers per thread, the stack
frame, the local memory and the static shared memory of each kernel from the extension's cubins.
It does not print ptxas' spill counts, so for each kernel with a frame the SASS is disassembled
and its local stores and loads (STL, LDL) are summed in bytes: what `ptxas -v` counts as spill
stores and loads when, as here, no kernel keeps an array in local memory. A kernel without a
frame has no local memory to spill to.

Exits non-zero, one line per violation, when a kernel matches no entry of KERNELS (a new kernel
gets reviewed), has a stack frame it is not meant to have (FRAMES), uses more registers per
thread than its launch bounds allow at its block size, or more static shared memory than a block
may have. The tables: docs/ops.md ("Resources of the CUDA kernels").
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536  # sm_70 to sm_120
REGISTER_GRANULE = 8  # registers per thread are allocated in steps of 8 (256 per warp)
MAX_REGISTERS = 255
STATIC_SHARED_LIMIT = 48 * 1024  # beyond it a block's shared memory must be dynamic


@dataclass(frozen=True)
class Kernel:
    """What every instantiation of one kernel is meant to have."""

    source: str  # the .cu file that compiles it (a glob)
    name: str  # the function's name without namespaces and template arguments
    threads: int  # threads per block, in its __launch_bounds__ and in every launch
    min_blocks: int = 1  # __launch_bounds__' second argument
    bounded: bool = True  # declared with __launch_bounds__ (tests/test_cuda_resources.py checks)

    def register_limit(self) -> int:
        """The most registers per thread that let `min_blocks` blocks of `threads` fit an SM."""
        return register_limit(self.threads, self.min_blocks)


KERNELS = (
    Kernel("masked_merge_kernels_*.cu", "forward_cl", 256),
    Kernel("masked_merge_kernels_*.cu", "forward_nchw", 256),
    Kernel("masked_merge_kernels_*.cu", "backward_cl", 256),
    Kernel("masked_merge_kernels_*.cu", "backward_nchw", 256),
    Kernel("masked_merge_kernels_*.cu", "adjoint_cl", 256),
    Kernel("masked_merge_kernels_*.cu", "adjoint_nchw", 256),
    Kernel("mask_estimator_kernel.cu", "stem_partials", 256),
    Kernel("mask_estimator_kernel.cu", "tail", 512),
    Kernel("topdown_epilogue_kernel.cu", "forward_cl", 256),
    Kernel("topdown_epilogue_kernel.cu", "forward_strided", 256),
    Kernel("topdown_epilogue_kernel.cu", "backward_cl", 256),
    Kernel("topdown_epilogue_kernel.cu", "backward_strided", 256),
    # Launched with kThreads; without bounds ptxas may use 255 registers, which 256 threads fit.
    Kernel("topdown_epilogue_kernel.cu", "sum_partials", 256, bounded=False),
)

# Instantiations allowed a stack frame, with its largest size in bytes; every other kernel must
# have none. A defect, listed so that CI refuses any new or larger frame until it is fixed: these
# kernels call ptxas' out-of-line slow paths of IEEE division (float32: nearest_scale's in / out
# and the mask's (logits + noise) / temperature in device_utils.cuh; float64 also the epilogue's
# divisions) and of 64-bit integer division (backward_nchw's i / runs, the int64-index kernels'
# index arithmetic), and save live registers to the stack around the calls: 12 to 52 bytes of
# spill stores each (ptxas -v agrees on masked_merge_kernels_float.cu: 32/44 and 12/16 bytes).
# Removing the float divisions alone moves the frames to other kernels (8 -> 14, RESULTS.md).
FRAMES = {
    ("masked_merge_kernels_bfloat16.cu", "backward_nchw<__nv_bfloat16, 8>"): 40,
    ("masked_merge_kernels_double.cu", "backward_nchw<double, 4>"): 40,
    ("masked_merge_kernels_float.cu", "backward_nchw<float, 4>"): 16,
    ("masked_merge_kernels_float.cu", "forward_nchw<float, 2, int>"): 16,
    ("masked_merge_kernels_half.cu", "forward_nchw<__half, 2, int>"): 16,
    ("masked_merge_kernels_half.cu", "forward_nchw<__half, 8, long>"): 16,
    ("topdown_epilogue_kernel.cu", "backward_cl<double, 2, 1>"): 40,
    ("topdown_epilogue_kernel.cu", "backward_strided<double>"): 24,
}


def register_limit(threads: int, min_blocks: int = 1) -> int:
    """Registers per thread allowed by __launch_bounds__(threads, min_blocks), as ptxas caps them."""
    per_thread = REGISTERS_PER_SM // (min_blocks * math.ceil(threads / 32) * 32)
    return min(MAX_REGISTERS, per_thread // REGISTER_GRANULE * REGISTER_GRANULE)


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool: from CUDA_HOME, then PATH, then the copy Triton bundles (cuobjdump)."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in filter(None, homes):
        if (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    if found := shutil.which(name):
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return None


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled name -> readable name (`c++filt`, or the CUDA toolkit's `cu++filt`)."""
    tool = shutil.which("c++filt") or cuda_tool("cu++filt")
    if tool is None:
        raise RuntimeError("cuda_resources: needs c++filt (binutils) or cu++filt to name the kernels")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def short_name(demangled: str) -> str:
    """`void aim::cuda::merge_detail::forward_cl<float, 4, int>(...)` -> `forward_cl<float, 4, int>`."""
    text = demangled.replace("(anonymous namespace)::", "")
    text = text.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(text):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            text = text[:i]
            break
    depth, start = 0, 0
    for i, ch in enumerate(text):  # the last `::` outside template arguments
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth == 0 and text.startswith("::", i):
            start = i + 2
    return text[start:]


def parse_resource_usage(text: str) -> list[dict]:
    """The kernels in `cuobjdump --dump-resource-usage` output: arch, source, mangled, counts."""
    rows, arch, source, mangled = [], "?", "?", None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*identifier = (.+)", line):
            source = Path(m.group(1).strip()).name
        elif m := re.match(r"\s*Function (\S+):\s*$", line):
            mangled = m.group(1)
        elif mangled and (fields := dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))):
            rows.append(
                {
                    "arch": arch,
                    "source": source,
                    "mangled": mangled,
                    "registers": int(fields["REG"]),
                    "stack": int(fields["STACK"]),
                    "local": int(fields.get("LOCAL", 0)),
                    "shared": int(fields["SHARED"]),
                }
            )
            mangled = None
    return rows


ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def parse_local_traffic(sass: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(arch, mangled) -> bytes of local stores and loads in `cuobjdump -sass` output."""
    counts: dict[tuple[str, str], list[int]] = {}
    arch, key = "?", None
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            key = (arch, m.group(1))
            counts[key] = [0, 0]
        elif key and (m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?(STL|LDL)((?:\.\w+)*)\s", line)):
            width = next((ACCESS_BYTES[s] for s in m.group(2).split(".") if s in ACCESS_BYTES), 4)
            counts[key][0 if m.group(1) == "STL" else 1] += width
    return {k: (v[0], v[1]) for k, v in counts.items()}


def resources(binary: Path, spills: bool = True) -> list[dict]:
    """Every kernel of `binary` (a library, object or fatbin) with its resources and readable name;
    with `spills`, the local stores and loads of those with a frame (None where not counted)."""
    cuobjdump = cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuda_resources: cuobjdump not found (CUDA_HOME/bin, PATH or Triton's copy)")
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    rows = parse_resource_usage(usage)
    names = demangle(sorted({r["mangled"] for r in rows}))
    framed = sorted({r["mangled"] for r in rows if r["stack"] or r["local"]})
    traffic = {}
    if spills and framed:
        sass = subprocess.run(
            [cuobjdump, "-sass", "-fun", ",".join(framed), str(binary)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        traffic = parse_local_traffic(sass)
    for r in rows:
        r["name"] = short_name(names[r["mangled"]])
        if not (r["stack"] or r["local"]):
            r["spill_stores"], r["spill_loads"] = 0, 0
        else:
            r["spill_stores"], r["spill_loads"] = traffic.get((r["arch"], r["mangled"]), (None, None))
    return sorted(rows, key=lambda r: (r["arch"], r["source"], natural(r["name"])))


def natural(text: str) -> list:
    """Sort key that orders `<float, 8>` after `<float, 2>`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def entry(row: dict, kernels=KERNELS) -> Kernel | None:
    """The table's entry for a kernel, or None."""
    base = row["name"].split("<", 1)[0]
    return next((k for k in kernels if k.name == base and fnmatch.fnmatch(row["source"], k.source)), None)


def violations(rows: list[dict], kernels=KERNELS, frames=FRAMES) -> list[str]:
    """One line per kernel that breaks its entry (or has none)."""
    out = []
    for r in rows:
        where = f"{r['arch']} {r['source']} {r['name']}"
        k = entry(r, kernels)
        if k is None:
            out.append(f"{where}: no entry in KERNELS: review its resources and add one")
            continue
        frame = r["stack"] + r["local"]
        allowed = frames.get((r["source"], r["name"]), 0)
        if frame > allowed:
            spilled = f" (spills {spill_cell(r)} bytes)" if r.get("spill_stores") is not None else ""
            meant = f"at most {allowed}" if allowed else "none"
            out.append(f"{where}: {frame}-byte stack frame{spilled}, meant to have {meant}")
        if r["registers"] > k.register_limit():
            out.append(
                f"{where}: {r['registers']} registers per thread, over the {k.register_limit()} "
                f"of {k.min_blocks} x {k.threads} threads"
            )
        if r["shared"] > STATIC_SHARED_LIMIT:
            out.append(
                f"{where}: {r['shared']} bytes of static shared memory, more than {STATIC_SHARED_LIMIT}"
            )
    return out


def spill_cell(r: dict) -> str:
    return "?" if r["spill_stores"] is None else f"{r['spill_stores']} / {r['spill_loads']}"


def summary_table(rows: list[dict], kernels=KERNELS) -> list[str]:
    """One line per architecture, source and kernel: the range over its instantiations."""
    lines = [
        "| arch | source | kernel | instantiations | threads | registers | limit | with a stack frame "
        "| spill stores / loads (bytes) | static shared (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["source"], r["name"].split("<", 1)[0]), []).append(r)
    for (arch, source, name), group in groups.items():
        k = entry(group[0], kernels)
        regs = sorted(r["registers"] for r in group)
        framed = [r for r in group if r["stack"] or r["local"]]
        known = all(r["spill_stores"] is not None for r in group)
        spill = (
            f"{sum(r['spill_stores'] for r in group)} / {sum(r['spill_loads'] for r in group)}"
            if known
            else "?"
        )
        frames = ", ".join(f"`{r['name']}` ({r['stack'] + r['local']} B)" for r in framed) or "none"
        shared = sorted({r["shared"] for r in group})
        lines.append(
            f"| {arch} | {source} | {name} | {len(group)} | {k.threads if k else '?'} | "
            f"{regs[0]}-{regs[-1]} | {k.register_limit() if k else '?'} | {frames} | {spill} | "
            f"{'/'.join(map(str, shared))} |"
        )
    return lines


def full_table(rows: list[dict], kernels=KERNELS) -> list[str]:
    """One line per kernel instantiation."""
    lines = [
        "| arch | source | kernel | registers | limit | stack frame (bytes) | spill stores / loads (bytes) "
        "| static shared (bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = entry(r, kernels)
        lines.append(
            f"| {r['arch']} | {r['source']} | `{r['name']}` | {r['registers']} | "
            f"{k.register_limit() if k else '?'} | {r['stack'] + r['local']} | {spill_cell(r)} | "
            f"{r['shared']} |"
        )
    return lines


def built_library() -> Path:
    """The compiled extension in the source tree (built in place)."""
    found = sorted((ROOT / "aim_ext").glob("_C*.so"))
    if not found:
        raise FileNotFoundError(f"no aim_ext/_C*.so under {ROOT}: build the extension first")
    return found[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, help="default: aim_ext/_C*.so in this checkout")
    parser.add_argument("--no-spills", action="store_true", help="skip disassembling kernels with a frame")
    parser.add_argument("--all", action="store_true", help="also one line per kernel instantiation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    library = args.library or built_library()
    rows = resources(library, spills=not args.no_spills)
    if not rows:
        print(f"cuda_resources: {library} holds no CUDA kernels (built without CUDA?)", file=sys.stderr)
        return 2
    archs = sorted({r["arch"] for r in rows})
    print(f"{library.name}: {len(rows)} kernels, {', '.join(archs)}\n")
    print("\n".join(summary_table(rows)))
    if args.all:
        print()
        print("\n".join(full_table(rows)))
    if args.json:
        table = [asdict(k) | {"register_limit": k.register_limit()} for k in KERNELS]
        args.json.write_text(json.dumps({"kernels": table, "rows": rows}, indent=1))
    failures = violations(rows)
    for failure in failures:
        print(f"cuda_resources: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
