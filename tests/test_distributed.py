"""DistributedDataParallel on CPU (gloo): two processes train exactly like one with the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_engine import Blobs, make_model, tiny_config

from aim_ext.engine import TrainConfig, fit
from aim_ext.models import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, values: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = TrainConfig(**values)
    fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path):
    # ConvNeXt has no BatchNorm, whose batch statistics would differ per process; no dropout either.
    common = dict(model="test_convnext", stop_stage=None, drop_rate=0.0, epochs=2, batch_size=8)
    single = tiny_config(tmp_path / "single", **common)
    torch.set_num_threads(1)
    fit(single, Blobs(32, 0), Blobs(16, 1), make_model(single), log=lambda *_: None)

    double = tiny_config(tmp_path / "double", **common)
    mp.spawn(_worker, args=(2, _free_port(), double.to_dict()), nprocs=2, join=True)

    torch.testing.assert_close(
        _losses(tmp_path / "double" / "run"), _losses(tmp_path / "single" / "run"), rtol=1e-5, atol=1e-6
    )
    a = load_checkpoint(tmp_path / "single" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "double" / "run" / "last.pt")
    assert len(b["rng"]) == 2, "each process's RNG state is kept for resume"
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # Only rank 0 writes: one metrics line per epoch.
    assert len(_losses(tmp_path / "double" / "run")) == 2


@pytest.mark.parametrize("step", ["eager", pytest.param("compile", marks=pytest.mark.slow)])
def test_aim_trains_under_ddp(tmp_path, step):
    """AIM's outputs and its global active area (a differentiable all_reduce) work across
    processes, with the eager and the compiled step."""
    # timm's test_convnext: ConvNeXt's code in a few small blocks, which compile faster.
    cfg = tiny_config(tmp_path, model="test_convnext", stop_stage=2, epochs=1, batch_size=8, step=step)
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["area_loss"] > 0 and len(metrics["mask_area"]) == 2
