# Sourced by the GPU scripts: the repository root, $OUT for logs, the Python and the compiler.
# $1: the default $OUT folder (the device tool sets OUT itself).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
# nvcc optimizes the merge kernels on every CPU (setup.py: --split-compile).
export AIM_EXT_NVCC_THREADS=${AIM_EXT_NVCC_THREADS:-0}
# The GPU image's /opt/gcc/bin/g++ (first on PATH) is a wrapper that links its own libstdc++ into
# the extension; that copy clashes with torch's and crashes formatting a c10::Error message.
# The system compiler links libstdc++ dynamically, as torch does.
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
