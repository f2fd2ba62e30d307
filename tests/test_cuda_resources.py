"""The resource check of the CUDA kernels (benchmarks/cuda_resources.py): the built extension's
kernels stay within their table, the table matches the sources' launch bounds and launches, and
the check refuses a kernel that spills, keeps a stack frame or needs more registers than its
bounds allow (a tiny kernel compiled with nvcc, no GPU)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aim_ext.ops import kernels_available

ROOT = Path(__file__).parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
_spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "benchmarks" / "cuda_resources.py")
resources = importlib.util.module_from_spec(_spec)
sys.modules["cuda_resources"] = resources  # dataclasses look their module up by name
_spec.loader.exec_module(resources)

CUOBJDUMP = resources.cuda_tool("cuobjdump")
NVCC = resources.cuda_tool("nvcc")
DEMANGLER = shutil.which("c++filt") or resources.cuda_tool("cu++filt")
needs_tools = pytest.mark.skipif(
    CUOBJDUMP is None or DEMANGLER is None,
    reason="needs cuobjdump (CUDA_HOME/bin, PATH or Triton's copy) and c++filt or cu++filt",
)
needs_cuda_build = pytest.mark.skipif(
    not kernels_available()["cuda_compiled"],
    reason="the extension was built without CUDA kernels (aim_ext.ops.kernels_available()['cuda_compiled'])",
)

USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
identifier = /src/csrc/cuda/masked_merge_kernels_float.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN3aim4cuda12merge_detail12adjoint_nchwIfEEvNS0_10MergeShapeEPKT_PS4_:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:936 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z4tailv:
  REG:300 STACK:24 SHARED:65536 LOCAL:8 CONSTANT[0]:928 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
arch = sm_90
\t\tFunction : _Z4tailv
        /*0010*/                   STL [R1+0x8], R0 ;                     /* 0x0000080001007387 */
        /*0020*/              @!P0 STL.64 [R1], R2 ;                      /* 0x0000000201007387 */
        /*0030*/                   LDL.LU.128 R4, [R1] ;                  /* 0x0000000001047983 */
        /*0040*/                   LDL.S16 R8, [R1+0x8] ;                 /* 0x0000080001087983 */
\t\tFunction : _Z3onev
        /*0010*/                   STG.E [R2.64], R0 ;                    /* 0x0000000002007986 */
"""


def test_register_limit_follows_the_launch_bounds():
    assert resources.register_limit(256) == 255  # 256 registers fit, ptxas caps at 255
    assert resources.register_limit(512) == 128
    assert resources.register_limit(1024, 2) == 32
    assert resources.register_limit(384, 2) == 80  # 85 rounded down to the allocation granule
    assert resources.register_limit(100) == 255  # a block rounds up to whole warps: 128 threads


def test_cuobjdump_output_and_names_are_parsed():
    rows = resources.parse_resource_usage(USAGE)
    assert [(r["arch"], r["source"], r["registers"], r["stack"], r["local"], r["shared"]) for r in rows] == [
        ("sm_90", "masked_merge_kernels_float.cu", 32, 0, 0, 1024),
        ("sm_90", "masked_merge_kernels_float.cu", 300, 24, 8, 65536),
    ]
    assert resources.parse_local_traffic(SASS) == {
        ("sm_90", "_Z4tailv"): (12, 18),
        ("sm_90", "_Z3onev"): (0, 0),
    }
    assert (
        resources.short_name(
            "void aim::cuda::(anonymous namespace)::forward_cl<float, 4, 1>(aim::cuda::MergeShape, "
            "std::conditional<std::is_same_v<float, double>, double, float>::type const*)"
        )
        == "forward_cl<float, 4, 1>"
    )
    assert (
        resources.short_name("void aim::cuda::merge_detail::adjoint_nchw<double>(double*)")
        == "adjoint_nchw<double>"
    )


def test_every_violation_is_reported_once():
    table = (resources.Kernel("k.cu", "tail", 512), resources.Kernel("k.cu", "framed", 256))
    row = {"arch": "sm_90", "source": "k.cu", "registers": 32, "stack": 0, "local": 0, "shared": 0}
    rows = [
        row | {"name": "tail<float>", "registers": 136, "stack": 16, "spill_stores": 8, "spill_loads": 8},
        row | {"name": "tail<double>", "shared": 64 * 1024},
        row | {"name": "framed<float>", "stack": 24, "spill_stores": None},
        row | {"name": "framed<double>", "stack": 16},
        row | {"name": "other<float>"},
        row | {"name": "tail<float>", "source": "other.cu"},
    ]
    found = resources.violations(rows, table, {("k.cu", "framed<float>"): 16, ("k.cu", "framed<double>"): 16})
    assert found == [
        "sm_90 k.cu tail<float>: 16-byte stack frame (spills 8 / 8 bytes), meant to have none",
        "sm_90 k.cu tail<float>: 136 registers per thread, over the 128 of 1 x 512 threads",
        "sm_90 k.cu tail<double>: 65536 bytes of static shared memory, more than 49152",
        "sm_90 k.cu framed<float>: 24-byte stack frame, meant to have at most 16",
        "sm_90 k.cu other<float>: no entry in KERNELS: review its resources and add one",
        "sm_90 other.cu tail<float>: no entry in KERNELS: review its resources and add one",
    ]


def constants() -> dict[str, int]:
    """`constexpr int kName = 256;` in the CUDA sources."""
    found = {}
    for path in CUDA_SOURCES.iterdir():
        found |= {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", path.read_text())}
    return found


def value(expression: str, known: dict[str, int]) -> int:
    return int(expression) if expression.isdigit() else known[expression]


def bounds_in(text: str, known: dict[str, int]) -> dict[str, tuple]:
    """name -> (threads, min_blocks, bounded) of each __global__ function in `text`."""
    found = {}
    for bounds, name in re.findall(
        r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(", text
    ):
        args = [value(a.strip(), known) for a in bounds.split(",")] if bounds else [None]
        found[name] = (args[0], args[1] if len(args) > 1 else 1, bool(bounds))
    return found


def block_sizes_in(text: str, known: dict[str, int]) -> dict[str, set[int]]:
    """name -> the block sizes of its launches (`kernel<...><<<grid, block, ...>>>`) in `text`."""
    found: dict[str, set[int]] = {}
    for name, config in re.findall(r"(\w+)\s*(?:<[^<>;]*>)?\s*<<<(.*?)>>>", text, re.DOTALL):
        depth, args = 0, [""]
        for ch in config:  # split at the commas outside parentheses
            depth += {"(": 1, ")": -1}.get(ch, 0)
            args[-1:] = [args[-1], ""] if ch == "," and depth == 0 else [args[-1] + ch]
        found.setdefault(name, set()).add(value(args[1].strip(), known))
    return found


def test_the_table_matches_the_launch_bounds_and_launches_in_the_sources():
    """Each __global__ in csrc/cuda has one KERNELS entry with its __launch_bounds__, and every
    launch of it uses the entry's block size."""
    known = constants()
    defined, launched = {}, {}
    for path in sorted(CUDA_SOURCES.glob("*.cu*")):
        # The masked_merge kernels are compiled once per dtype, by masked_merge_kernels_<dtype>.cu.
        source = "masked_merge_kernels_*.cu" if path.name == "masked_merge_kernels_impl.cuh" else path.name
        text = path.read_text()
        defined |= {(source, name): b for name, b in bounds_in(text, known).items()}
        launched |= {(source, name): sizes for name, sizes in block_sizes_in(text, known).items()}
    table = {(k.source, k.name): k for k in resources.KERNELS}
    assert set(table) == set(defined)
    assert set(launched) == set(defined), "every kernel is launched in the file that defines it"
    for key, k in table.items():
        threads, min_blocks, bounded = defined[key]
        assert (k.bounded, k.min_blocks) == (bounded, min_blocks), key
        if bounded:
            assert k.threads == threads, key
        assert launched[key] == {k.threads}, key


@needs_tools
@needs_cuda_build
def test_the_built_kernels_are_within_their_table():
    """The CI check: no kernel without an entry, no stack frame beyond FRAMES, no more registers than
    the launch bounds allow, for each architecture the extension was built for."""
    rows = resources.resources(resources.built_library(), spills=False)
    assert rows, "the CUDA build holds no kernels"
    assert resources.violations(rows) == []
    matched = {(k.source, k.name) for r in rows if (k := resources.entry(r))}
    assert matched == {(k.source, k.name) for k in resources.KERNELS}, "an entry names no built kernel"
    framed = {(r["source"], r["name"]) for r in rows if r["stack"] or r["local"]}
    assert set(resources.FRAMES) <= framed, "a kernel in FRAMES lost its frame: remove its entry"


TINY = r"""
__device__ __forceinline__ float dot_of_live_values(const float* in, int n) {
  float v[48];
#pragma unroll
  for (int i = 0; i < 48; ++i) v[i] = in[i * n + threadIdx.x];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 48; ++i) s += v[i] * v[(i * 7 + 3) % 48];
  return s;
}

__global__ void __launch_bounds__(128) many_live(const float* in, float* out, int n) {
  out[threadIdx.x] = dot_of_live_values(in, n);
}

__global__ void __maxnreg__(16) spilling(const float* in, float* out, int n) {
  out[threadIdx.x] = dot_of_live_values(in, n);
}

__global__ void __launch_bounds__(128) local_array(const int* index, float* out) {
  float a[64];
#pragma unroll 1
  for (int i = 0; i < 64; ++i) a[i] = out[i * 128 + threadIdx.x];
  a[index[threadIdx.x] & 63] = 0.f;
  out[threadIdx.x] = a[index[threadIdx.x + 128] & 63];
}
"""


@needs_tools
@pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA_HOME/bin or PATH)")
def test_the_check_refuses_spills_frames_and_registers_beyond_the_bounds(tmp_path):
    """Compiled for sm_90: many_live keeps 48 values in registers (within 128 threads' bounds, not
    within those of 2 blocks of 1024), spilling is capped at 16 registers by __maxnreg__ and
    spills, local_array keeps an array indexed at run time in local memory."""
    (tmp_path / "tiny.cu").write_text(TINY)
    subprocess.run(
        [NVCC, "-arch=sm_90", "-fatbin", "tiny.cu", "-o", "tiny.fatbin"],
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    rows = {r["name"]: r for r in resources.resources(tmp_path / "tiny.fatbin")}
    assert set(rows) == {"many_live", "spilling", "local_array"}
    spilled = rows["spilling"]
    assert spilled["stack"] > 0 and spilled["spill_stores"] > 0 and spilled["spill_loads"] > 0
    assert rows["many_live"]["stack"] == 0 and rows["many_live"]["spill_stores"] == 0
    assert rows["many_live"]["registers"] > 32

    fitting = tuple(resources.Kernel("*", name, 128, bounded=name != "spilling") for name in rows)
    found = resources.violations(list(rows.values()), fitting, frames={})
    assert [line.split(":")[0] for line in found] == ["sm_90 ? local_array", "sm_90 ? spilling"]
    assert "stack frame" in found[0] and f"spills {spilled['spill_stores']} / " in found[1]

    too_small = (resources.Kernel("*", "many_live", 1024, min_blocks=2),)
    registers = rows["many_live"]["registers"]
    assert resources.violations([rows["many_live"]], too_small, frames={}) == [
        f"sm_90 ? many_live: {registers} registers per thread, over the 32 of 2 x 1024 threads"
    ]
    assert (
        resources.violations([rows["spilling"]], fitting, frames={("?", "spilling"): spilled["stack"]}) == []
    )
