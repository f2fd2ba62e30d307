"""Each op on a CUDA device that is not the calling thread's current one: its kernels must run on
the inputs' device (a CUDA guard in each C++ entry point, torch.cuda.device around the Triton
launches), giving the bits that the same call gives with that device current."""

from __future__ import annotations

import pytest
import torch
from test_threads import OP_CASES, same

from aim_ext.ops import kernels_available

pytestmark = pytest.mark.skipif(
    not (kernels_available()["cuda"] and torch.cuda.device_count() > 1), reason="needs two CUDA devices"
)


@pytest.mark.parametrize("op", OP_CASES)
def test_an_op_runs_on_its_inputs_device_not_the_current_one(op):
    args, call = OP_CASES[op]("cuda:1", 0)
    with torch.cuda.device(1):
        expected = call(args)
    torch.cuda.synchronize(1)
    with torch.cuda.device(0):
        got = call(args)
    torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert same(got, expected)
