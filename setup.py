"""Builds aim_ext._C: the op schema and CPU kernel always, the CUDA kernel when it can.

CUDA is built when torch is a CUDA build and nvcc is found (or FORCE_CUDA=1); set
AIM_EXT_CPU_ONLY=1 to skip it. AIM_EXT_NVCC_THREADS=N passes --split-compile=N to nvcc, which
runs its optimizer on N threads (0: every CPU); the merge kernels' file takes minutes on one.
AIM_EXT_SANITIZE=address,undefined (either or both) compiles the CPU kernels only, with those
sanitizers (benchmarks/sanitize.sh runs the op tests on such a build).
Build with `pip install --no-build-isolation .` so the extension is compiled against the torch
it will run with.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

# torch.utils.cpp_extension reads CUDA_HOME when imported; /usr/local/cuda is the
# toolkit's home on these machines, while a guess from `which nvcc` can be wrong.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

# Architectures compiled when no GPU is visible: A100, H100/H200, plus PTX for newer cards.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
ROOT = Path(__file__).parent
# The list of sources CMakeLists.txt reads too.
SOURCE_LIST = "csrc/sources.txt"
# The values of AIM_EXT_SANITIZE: gcc's and clang's -fsanitize names.
SANITIZERS = ("address", "undefined")


def kernel_sources() -> dict[str, list[str]]:
    """The sources in SOURCE_LIST by kind: "cpu" (built always) and "cuda"."""
    sources: dict[str, list[str]] = {"cpu": [], "cuda": []}
    for number, line in enumerate((ROOT / SOURCE_LIST).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] not in sources:
            raise RuntimeError(f"{SOURCE_LIST}:{number}: expected 'cpu PATH' or 'cuda PATH', got {line!r}")
        sources[fields[0]].append(fields[1])
    return sources


def nvcc_threads() -> list[str]:
    threads = os.environ.get("AIM_EXT_NVCC_THREADS", "").strip()
    if not threads:
        return []
    if not threads.isdigit():
        raise RuntimeError(f"AIM_EXT_NVCC_THREADS must be a number of threads, got {threads!r}")
    return [f"--split-compile={threads}"]


def sanitizers() -> list[str]:
    """The sanitizers AIM_EXT_SANITIZE names (a comma list of SANITIZERS), or none."""
    value = os.environ.get("AIM_EXT_SANITIZE", "").strip()
    if not value:
        return []
    names = [name.strip() for name in value.split(",")]
    if not set(names) <= set(SANITIZERS):
        raise RuntimeError(f"AIM_EXT_SANITIZE must be a comma list of {', '.join(SANITIZERS)}, got {value!r}")
    return sorted(set(names), key=names.index)


def sanitizer_flags(names: list[str]) -> list[str]:
    """Compile and link flags for the sanitizers; a report halts the process (no recovery)."""
    if not names:
        return []
    # Python's CFLAGS carry -fwrapv, which defines signed overflow and so hides it from UBSan.
    sanitize = f"-fsanitize={','.join(names)}"
    return [sanitize, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-fno-wrapv"]


def log(message: str) -> None:
    """Print the build decision and keep it for `python -m aim_ext info` (pip hides build output)."""
    print(f"aim_ext build: {message}", file=sys.stderr)
    info = {"decision": message, "torch": torch.__version__, "cuda_home": CUDA_HOME}
    (ROOT / "aim_ext" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def nvcc_version(nvcc: str) -> str | None:
    """The toolkit's release ("13.0"), from `nvcc --version`."""
    try:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else None


def cuda_decision() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why."""
    forced = os.environ.get("FORCE_CUDA") == "1"
    if sanitizers():
        # nvcc does not take -fsanitize; compute-sanitizer checks the CUDA kernels instead.
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but AIM_EXT_SANITIZE builds the CPU kernels only")
        return False, f"AIM_EXT_SANITIZE={','.join(sanitizers())} (sanitized builds are CPU-only)"
    if os.environ.get("AIM_EXT_CPU_ONLY") == "1":
        return False, "AIM_EXT_CPU_ONLY=1"
    nvcc = CUDA_HOME and shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin"))
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU build")
        return False, f"torch {torch.__version__} is a CPU build"
    if not nvcc:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but nvcc was not found: set CUDA_HOME")
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    toolkit = nvcc_version(nvcc)
    # torch refuses to compile with a toolkit of another major version than its own.
    if toolkit is None or toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        reason = f"nvcc in {CUDA_HOME} is CUDA {toolkit}, torch was built with CUDA {torch.version.cuda}"
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1 but {reason}")
        return False, reason
    why = "FORCE_CUDA=1" if forced else f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    return True, f"{why} and nvcc {toolkit} in {CUDA_HOME}"


def extension():
    listed = kernel_sources()
    sources = ["csrc/python_module.cpp", *listed["cpu"]]
    # The C++ standard is torch's choice. The string ABI must be torch's: newer torch no longer
    # passes it, and a compiler defaulting to the other ABI breaks c10::Error (a crash on bad input).
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # at::parallel_for is a header template: without OpenMP in our own compile it runs serially.
    cxx = ["-O3", "-fdiagnostics-color=always", "-fopenmp", abi]
    with_cuda, why = cuda_decision()
    if not with_cuda:
        link = ["-fopenmp"]
        sanitize = sanitizer_flags(sanitizers())
        if sanitize:
            # -O1 -g: reports with line numbers and whole stacks, still fast enough for the tests.
            cxx = ["-O1", "-g", *cxx[1:], *sanitize]
            link += sanitize
            why += f"; compiled with {' '.join(sanitize)} -O1 -g"
        log(f"building the CPU kernels only: {why}")
        return CppExtension("aim_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    log(
        f"building the CPU and CUDA kernels: {why}; "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}"
    )
    sources += listed["cuda"]
    return CUDAExtension(
        "aim_ext._C",
        sources,
        define_macros=[("AIM_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", abi, *nvcc_threads()]},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
