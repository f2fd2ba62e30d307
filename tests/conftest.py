import pytest
import torch

from aim_ext.ops import kernels_available

CUDA_REASON = "needs a CUDA device and the compiled CUDA kernels (aim_ext.ops.kernels_available()['cuda'])"


def devices() -> list:
    """CPU always; CUDA as a parameter that skips, with the reason, where it cannot run."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)),
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
