"""setup.py's AIM_EXT_SANITIZE switch refuses what it cannot build, before compiling anything.

The sanitized build itself and the op tests under it: benchmarks/sanitize.sh (docs/building.md).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AIM_EXT_SANITIZE": "address,thread"},
            "RuntimeError: AIM_EXT_SANITIZE must be a comma list of address, undefined, got 'address,thread'",
        ),
        (
            {"AIM_EXT_SANITIZE": "address", "FORCE_CUDA": "1"},
            "RuntimeError: FORCE_CUDA=1 but AIM_EXT_SANITIZE builds the CPU kernels only",
        ),
    ],
)
def test_setup_refuses_what_it_cannot_build(env: dict[str, str], message: str) -> None:
    # --name: setup.py decides the extension at import, then would only print the name.
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == message
