"""Bad input across every command: the table of docs/errors.md, one test per cell.

A cell runs its command in-process on one fault and checks the exit status (2: a usage error or an
input refused before any work, 1: a failure; 0 where the input is fine and simply works), one line
on stderr naming the problem (after argparse's usage for a usage error), no traceback, and that the
files that existed before are byte-identical afterwards.

How the faults are made. No permission: a folder of mode 0555 (or a file of mode 0000); as root,
whom modes do not stop, the command runs with effective uid and gid nobody (os.seteuid). A full
disk: a tmpfs of 16 MiB filled to its last block (as root, where mount is allowed); elsewhere a
file-size limit of 0 bytes (RLIMIT_FSIZE, SIGXFSZ ignored: every write fails with EFBIG). A
non-UTF-8 path: a name with the byte 0xff, as os.fsdecode gives it (a lone surrogate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_data import make_folder, write_image
from PIL import Image

from aim_ext.cli import bench, demo, explain, export, train
from aim_ext.cli import eval as aim_eval
from aim_ext.data.common import load_rgb
from aim_ext.engine.checkpoint import save_atomic
from aim_ext.engine.config import TrainConfig
from aim_ext.models import create_model, save_pretrained
from aim_ext.models.checkpoint import architecture

MAINS: dict[str, Callable[..., int]] = {
    "aim-train": train.main,
    "aim-eval": aim_eval.main,
    "aim-explain": explain.main,
    "aim-export": export.main,
    "aim-bench": bench.main,
    "aim-demo": demo.main,
}
FAULTS = (
    "missing",
    "empty",
    "truncated",
    "wrong kind",
    "other architecture",
    "no permission",
    "full disk",
    "non-UTF-8 path",
    "CMYK / 16-bit image",
    "bad number",
)
NOBODY = 65534
PROGRESS = re.compile(r"\d+/\d+ \[[\d:]+<")  # aim-bench's progress bar (tqdm) on stderr
FULL = re.compile(r"No space left on device \(the disk is full\)|File too large \(the file exceeds")
MODEL = ["--model", "test_resnet", "--stop-stage", "3", "--image-size", "32"]
FAST = ["--num-workers", "0", "--device", "cpu", "--randaugment", "0", "0", "--batch-size", "16"]
FAST += ["--epochs", "1", "--max-steps-per-epoch", "1", "--mask-log-images", "2"]
BENCH = ["--device", "cpu", "--quick", "--runtimes", "eager", "--no-train", "--warmup", "0"]
BENCH += ["--rounds", "1", "--per-round", "1"]


def odd(folder: Path, name: str) -> Path:
    """``folder/name`` with the byte 0xff before the suffix: a name that is not UTF-8."""
    stem, dot, suffix = name.partition(".")
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + stem.encode() + b"\xff" + (dot + suffix).encode()))


@dataclasses.dataclass
class World:
    """The inputs every cell reads: a saved model, a run folder, a dataset, good and bad files."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        return self.root / name


def _train_config(data: Path, model: str = "test_resnet") -> TrainConfig:
    return TrainConfig(
        model=model, stop_stage=3, dataset="folder", data_root=str(data), image_size=32, num_workers=0
    )


def _checkpoint(model: torch.nn.Module, cfg: TrainConfig, path: Path) -> Path:
    """What aim-train writes as best.pt."""
    save_atomic(
        {
            "architecture": architecture(model),
            "model": model.state_dict(),
            "epoch": 0,
            "config": cfg.to_dict(),
        },
        path,
    )
    return path


def _odd_images(folder: Path) -> dict[str, Path]:
    """A CMYK JPEG and a 16-bit greyscale PNG in ``folder``, each beside its plain 8-bit RGB twin."""
    rgb = write_image(folder / "cmyk_rgb.png", (40, 36), seed=7)
    Image.open(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=100)
    with Image.open(folder / "cmyk.jpg") as cmyk:
        cmyk.convert("RGB").save(rgb)  # the twin: the CMYK file's own colours, in RGB
    levels = np.linspace(0, 65535, 40 * 36).reshape(36, 40).astype(np.uint16)
    Image.fromarray(levels).save(folder / "grey16.png")
    eight = np.rint(levels / 257).astype(np.uint8)
    Image.fromarray(eight).convert("RGB").save(folder / "grey16_rgb.png")
    return {"cmyk": folder / "cmyk.jpg", "grey16": folder / "grey16.png"}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="aim-bad-input-"))
    try:
        yield _build_world(root)
    finally:
        for path in root.rglob("*"):
            if path.is_dir() and not path.is_mount():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def _build_world(root: Path) -> World:
    root.chmod(0o755)  # readable as nobody
    data = root / "data"
    make_folder(data)
    odd_images = _odd_images(root)
    for split, name in (("train", "cat"), ("val", "dog")):  # every split holds one of each kind
        for path in odd_images.values():
            shutil.copy(path, data / split / name / path.name)
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=2, stop_stage=3).eval()
    save_pretrained(model, root / "saved", labels=["cat", "dog"], image_size=32)
    run = root / "run"
    cfg = _train_config(data)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_plain(cfg.to_dict())))
    _checkpoint(model, cfg, run / "best.pt")
    other = create_model("mobilenetv2_050", num_classes=2, stop_stage=3).eval()
    _checkpoint(other, _train_config(data, "mobilenetv2_050"), root / "other.pt")
    save_pretrained(other, root / "other_saved", labels=["cat", "dog"], image_size=32)
    mixed = root / "other_weights"  # test_resnet's config, mobilenetv2_050's weights
    mixed.mkdir()
    shutil.copy(root / "saved" / "config.json", mixed)
    shutil.copy(root / "other_saved" / "model.safetensors", mixed)
    write_image(root / "photo.png", (40, 40), seed=1)
    write_image(root / "photo.jpg", (40, 40), seed=1)
    (root / "empty").write_bytes(b"")
    for name, source in (
        ("trunc.pt", run / "best.pt"),
        ("trunc.png", root / "photo.png"),
        ("trunc.jpg", root / "photo.jpg"),
    ):
        data_bytes = source.read_bytes()
        (root / name).write_bytes(data_bytes[: len(data_bytes) // 2])
    (root / "trunc.yaml").write_text("model: test_resnet\nepochs: [1,")
    (root / "empty.yaml").write_text("")
    shutil.copytree(root / "saved", root / "truncsaved")
    weights = (root / "saved" / "model.safetensors").read_bytes()
    (root / "truncsaved" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "emptyrun").mkdir()
    for path in root.rglob("*"):  # atomic writes leave files of mode 0600
        path.chmod(0o755 if path.is_dir() else 0o644)
    return World(root)


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys, command: str, *argv: str | Path) -> Result:
    """The command's main on argv, in this process; SystemExit's code (a message: status 1)."""
    capsys.readouterr()
    try:
        code = MAINS[command]([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits 1
        code, err = 1, err + code + "\n"
    return Result(code or 0, captured.out, err)


def one_line(result: Result, command: str, code: int, *fragments: str | re.Pattern) -> str:
    """The line naming the problem, checked: the exit status, a single line (argparse: its usage,
    then one line), no traceback, each fragment in it."""
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.strip() and not PROGRESS.search(line)]
    if lines and lines[0].startswith("usage:"):
        line = lines[-1]
        assert line.startswith(f"{command}: error: "), result.err
    else:
        assert len(lines) == 1, result.err
        line = lines[0]
        assert line.startswith(f"{command}: "), line
    assert result.code == code, (result.code, line)
    for fragment in fragments:
        assert fragment.search(line) if isinstance(fragment, re.Pattern) else fragment in line, line
    return line


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """Every file under ``paths``, by content."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return {p: p.read_bytes() for p in files if p.is_file()}


def read_only(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block as nobody where this process is root (root ignores file modes)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


class Disk:
    """A folder on a small filesystem that `full()` fills (tmpfs), or a file-size limit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.mounted = (
            os.geteuid() == 0
            and shutil.which("mount") is not None
            and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(folder)],
                capture_output=True,
            ).returncode
            == 0
        )

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        if self.mounted:
            chunk = b"\0" * (1 << 16)
            with open(self.folder / ".filler", "wb", buffering=0) as filler:
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(chunk)
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * 512)
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # every write fails
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


@pytest.fixture
def disk(world) -> Iterator[Disk]:
    folder = Path(tempfile.mkdtemp(dir=world.root)) / "disk"
    made = Disk(folder)
    try:
        yield made
    finally:
        made.close()


def no_partials(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.part")], "a failed write left a partial file"


# ---------------------------------------------------------------------------------------------- #
# aim-train


def train_missing(w, capsys, disk):
    one_line(
        run(capsys, "aim-train", "--config", w.root / "none.yaml"),
        "aim-train",
        2,
        "training config not found",
    )


def resume_with(w, capsys, last: Path, *fragments: str) -> None:
    """aim-train --resume of a run whose last.pt is ``last``: refused in one line, the run untouched."""
    folder = w.root / f"resume_{last.name}"
    shutil.copytree(w.run, folder)
    shutil.copy(last, folder / "last.pt")
    before = snapshot(folder)
    result = run(capsys, "aim-train", "--resume", "--out", folder, "--device", "cpu")
    one_line(result, "aim-train", 2, f"--resume: {folder / 'last.pt'} ", *fragments)
    assert snapshot(folder) == before


def train_empty(w, capsys, disk):
    one_line(run(capsys, "aim-train", "--config", w.root / "empty.yaml"), "aim-train", 2, "is empty")
    resume_with(w, capsys, w.empty, "is empty, not a checkpoint")


def train_truncated(w, capsys, disk):
    line = one_line(
        run(capsys, "aim-train", "--config", w.root / "trunc.yaml"), "aim-train", 2, "is not valid YAML"
    )
    assert "(line 2, column" in line
    resume_with(w, capsys, w.root / "trunc.pt", "is a truncated or damaged checkpoint")
    argv = ["--dataset", "folder", "--data-root", w.data, *MODEL, "--pretrained-file", w.root / "trunc.pt"]
    one_line(
        run(capsys, "aim-train", *argv, *FAST, "--out", w.root / "t"),
        "aim-train",
        2,
        "truncated or damaged checkpoint",
    )
    data = w.root / "data_bad"  # a truncated JPEG among the training images
    shutil.copytree(w.data, data)
    shutil.copy(w.root / "trunc.jpg", data / "train" / "cat" / "cut.jpg")
    argv = ["--dataset", "folder", "--data-root", data, *MODEL, *FAST, "--out", w.root / "t_bad"]
    one_line(run(capsys, "aim-train", *argv), "aim-train", 1, "cannot read image", "cut.jpg")
    assert not (w.root / "t").exists()


def train_wrong_kind(w, capsys, disk):
    one_line(
        run(capsys, "aim-train", "--config", w.root / "photo.png"), "aim-train", 2, "not a YAML text file"
    )
    argv = ["--dataset", "folder", "--data-root", w.data, *MODEL, "--pretrained-file", w.root / "photo.png"]
    one_line(
        run(capsys, "aim-train", *argv, *FAST, "--out", w.root / "t"),
        "aim-train",
        2,
        "is a PNG image, not a checkpoint",
    )
    assert not (w.root / "t").exists()
    resume_with(w, capsys, w.root / "photo.png", "is a PNG image, not a checkpoint")


def train_other_architecture(w, capsys, disk):
    argv = ["--dataset", "folder", "--data-root", w.data, *MODEL, "--pretrained-file", w.root / "other.pt"]
    one_line(
        run(capsys, "aim-train", *argv, *FAST, "--out", w.root / "t"),
        "aim-train",
        2,
        "does not fit the backbone of test_resnet",
    )


def train_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_train")
    argv = ["--dataset", "folder", "--data-root", w.data, *MODEL, *FAST, "--out", locked / "run"]
    with unprivileged():
        result = run(capsys, "aim-train", *argv)
    one_line(result, "aim-train", 1, str(locked / "run"), "Permission denied")
    secret = w.root / "secret.yaml"
    secret.write_text("epochs: 1\n")
    secret.chmod(0)
    with unprivileged():
        result = run(capsys, "aim-train", "--config", secret)
    one_line(result, "aim-train", 1, str(secret), "Permission denied")


def train_full_disk(w, capsys, disk):
    shutil.copytree(w.run, disk.folder / "previous")
    before = snapshot(disk.folder / "previous")
    argv = ["--dataset", "folder", "--data-root", w.data, *MODEL, *FAST, "--out", disk.folder / "run"]
    with disk.full():
        result = run(capsys, "aim-train", *argv)
    one_line(result, "aim-train", 1, FULL)
    assert snapshot(disk.folder / "previous") == before
    no_partials(disk.folder)


@pytest.fixture(scope="module")
def trained(world) -> tuple[Result, Path]:
    """One short run from a data folder and into a run folder whose names are not UTF-8, as are a
    class's name and an image's; the data holds a CMYK JPEG and a 16-bit PNG in every split."""
    data = odd(world.root, "data")
    shutil.copytree(world.data, data)
    for split in ("train", "val"):
        (data / split / "dog").rename(odd(data / split, "dog"))
        shutil.copy(world.root / "photo.jpg", odd(data / split / "cat", "photo.jpg"))
    out = odd(world.root, "run_out")
    capture = _Capture()
    with capture:
        code = train.main(
            [str(a) for a in ["--dataset", "folder", "--data-root", data, *MODEL, *FAST, "--out", out]]
        )
    return Result(code, _Capture.text(capture.out), _Capture.text(capture.err)), out


class _Capture(contextlib.ExitStack):
    """stdout and stderr as a terminal with a UTF-8 locale has them (errors='strict' on stdout)."""

    def __enter__(self):
        import io

        self.out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
        self.err = io.TextIOWrapper(
            io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True
        )
        super().__enter__()
        self.enter_context(contextlib.redirect_stdout(self.out))
        self.enter_context(contextlib.redirect_stderr(self.err))
        return self

    @staticmethod
    def text(stream) -> str:
        return stream.buffer.getvalue().decode("utf-8", "surrogateescape")


def train_non_utf8(w, capsys, disk, trained):
    result, out = trained
    assert result.code == 0, result.err
    assert (out / "best.pt").is_file() and (out / "model" / "model.safetensors").is_file()
    missing = odd(w.root, "none.yaml")
    line = one_line(
        run(capsys, "aim-train", "--config", missing), "aim-train", 2, "training config not found"
    )
    assert line.endswith("none\\xff.yaml")


def train_cmyk(w, capsys, disk, trained):
    result, _ = trained
    assert result.code == 0, result.err
    for name in ("cmyk", "grey16"):
        decoded = np.asarray(load_rgb(w.root / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"))
        assert np.array_equal(decoded, np.asarray(Image.open(w.root / f"{name}_rgb.png").convert("RGB")))


def train_bad_number(w, capsys, disk):
    out = w.root / "t_numbers"
    base = ["--dataset", "tuxbirds95", "--out", out]
    for flags, message in (
        (["--epochs", "-3"], "epochs must be >= 1, got -3"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--lr-backbone=-1e-3"], "lr_backbone must be >= 0, got -0.001"),
        (["--image-size", "0"], "image_size must be >= 1, got 0"),
        (["--temperature", "0"], "temperature must be > 0, got 0.0"),
        (["--area-final", "1.5"], "area_final must be >= 0 and <= 1, got 1.5"),
        (["--randaugment", "-1", "9"], "randaugment must be two integers >= 0"),
    ):
        one_line(run(capsys, "aim-train", *base, *flags), "aim-train", 2, message)
    config = w.root / "negative.yaml"
    config.write_text("epochs: -3\n")
    one_line(
        run(capsys, "aim-train", "--config", config, "--out", out),
        "aim-train",
        2,
        "epochs must be >= 1, got -3",
    )
    one_line(
        run(capsys, "aim-train", "--epochs", "three"), "aim-train", 2, "argument --epochs: invalid int value"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- #
# aim-eval

EVAL = ["--device", "cpu", "--figures", "1"]


def eval_missing(w, capsys, disk):
    one_line(run(capsys, "aim-eval", w.root / "none", *EVAL), "aim-eval", 1, "run folder not found")
    argv = [w.run, "--checkpoint", w.root / "none.pt", *EVAL, "--out", w.root / "e"]
    one_line(run(capsys, "aim-eval", *argv), "aim-eval", 1, "checkpoint not found")


def eval_empty(w, capsys, disk):
    one_line(run(capsys, "aim-eval", w.emptyrun, *EVAL), "aim-eval", 1, "no config.yaml in")
    argv = [w.run, "--checkpoint", w.empty, *EVAL, "--out", w.root / "e"]
    one_line(run(capsys, "aim-eval", *argv), "aim-eval", 1, "is empty, not a checkpoint")
    folder = w.root / "run_empty_config"
    shutil.copytree(w.run, folder)
    (folder / "config.yaml").write_text("")
    line = one_line(run(capsys, "aim-eval", folder, *EVAL), "aim-eval", 1, "config.yaml is empty")
    assert line.count("config.yaml") == 1


def eval_truncated(w, capsys, disk):
    argv = [w.run, "--checkpoint", w.root / "trunc.pt", *EVAL, "--out", w.root / "e"]
    one_line(run(capsys, "aim-eval", *argv), "aim-eval", 1, "is a truncated or damaged checkpoint")
    argv = [w.truncsaved, "--dataset", "folder", "--data-root", w.data, *EVAL, "--out", w.root / "e"]
    one_line(run(capsys, "aim-eval", *argv), "aim-eval", 1, "is not a readable safetensors file")


def eval_wrong_kind(w, capsys, disk):
    argv = [w.run, "--checkpoint", w.root / "photo.png", *EVAL, "--out", w.root / "e"]
    one_line(run(capsys, "aim-eval", *argv), "aim-eval", 1, "is a PNG image, not a checkpoint")
    one_line(
        run(capsys, "aim-eval", w.run / "best.pt", *EVAL), "aim-eval", 1, "is a file: give the run folder"
    )


def eval_other_architecture(w, capsys, disk):
    argv = [w.run, "--checkpoint", w.root / "other.pt", *EVAL, "--out", w.root / "e"]
    one_line(
        run(capsys, "aim-eval", *argv),
        "aim-eval",
        1,
        "holds a mobilenetv2_050+AIM[3] model, not test_resnet+AIM[3]",
    )


def eval_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_eval")
    with unprivileged():
        result = run(capsys, "aim-eval", w.run, *EVAL, "--out", locked / "eval")
    one_line(result, "aim-eval", 1, str(locked / "eval"), "Permission denied")


def eval_full_disk(w, capsys, disk):
    previous = disk.folder / "eval"
    previous.mkdir()
    for name in ("report.md", "metrics.json", "per_image.csv"):
        (previous / name).write_text(f"the previous {name}\n")
    before = snapshot(previous)
    with disk.full():
        result = run(capsys, "aim-eval", w.run, *EVAL, "--out", previous)
    one_line(result, "aim-eval", 1, FULL)
    assert snapshot(previous) == before
    no_partials(disk.folder)


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[Result, Path]:
    """`trained`'s run evaluated (its figures drawn with the class name that is not UTF-8)."""
    folder = trained[1]
    capture = _Capture()
    with capture:
        code = aim_eval.main([str(folder), *EVAL])
    return Result(code, _Capture.text(capture.out), _Capture.text(capture.err)), folder


def eval_non_utf8(w, capsys, disk, evaluated):
    result, folder = evaluated
    assert result.code == 0, result.err
    assert (folder / "eval_test" / "report.md").is_file()
    assert "run_out\\xff/eval_test/report.md" in result.out
    assert list((folder / "eval_test").glob("*.png"))


def eval_cmyk(w, capsys, disk, evaluated):
    result, folder = evaluated
    assert result.code == 0, result.err
    rows = (folder / "eval_test" / "per_image.csv").read_bytes()
    assert b"cmyk.jpg" in rows and b"grey16.png" in rows and b"photo\xff.jpg" in rows


def eval_bad_number(w, capsys, disk):
    for flag, value in (
        ("--batch-size", "0"),
        ("--figures", "-1"),
        ("--max-images", "0"),
        ("--num-workers", "-2"),
    ):
        one_line(
            run(capsys, "aim-eval", w.run, flag, value), "aim-eval", 2, f"argument {flag}: must be at least"
        )


# ---------------------------------------------------------------------------------------------- #
# aim-explain


def explain_(capsys, model, *images, out) -> Result:
    return run(capsys, "aim-explain", model, *images, "--device", "cpu", "--out", out)


def explain_missing(w, capsys, disk):
    one_line(
        explain_(capsys, w.root / "none", w.root / "photo.png", out=w.root / "x"),
        "aim-explain",
        2,
        "model not found",
    )
    line = one_line(explain_(capsys, w.saved, w.root / "none.png", out=w.root / "x"), "aim-explain", 1)
    assert line.endswith("none.png: not found")


def explain_empty(w, capsys, disk):
    one_line(
        explain_(capsys, w.empty, w.root / "photo.png", out=w.root / "x"),
        "aim-explain",
        2,
        "is empty, not a checkpoint",
    )
    one_line(
        explain_(capsys, w.saved, w.empty, out=w.root / "x"), "aim-explain", 1, "an empty file, not an image"
    )


def explain_truncated(w, capsys, disk):
    result = explain_(capsys, w.truncsaved, w.root / "photo.png", out=w.root / "x")
    one_line(result, "aim-explain", 2, "is not a readable safetensors file")
    for name in ("trunc.png", "trunc.jpg"):
        one_line(
            explain_(capsys, w.saved, w.root / name, out=w.root / "x"),
            "aim-explain",
            1,
            f"{name}: not a readable image",
        )


def explain_wrong_kind(w, capsys, disk):
    result = explain_(capsys, w.root / "photo.png", w.root / "photo.png", out=w.root / "x")
    one_line(result, "aim-explain", 2, "is a PNG image, not a checkpoint")
    one_line(
        explain_(capsys, w.saved, w.run / "best.pt", out=w.root / "x"),
        "aim-explain",
        1,
        "not a readable image",
    )


def explain_other_architecture(w, capsys, disk):
    result = explain_(capsys, w.other_weights, w.root / "photo.png", out=w.root / "x")
    one_line(result, "aim-explain", 2, "does not fit test_resnet+AIM[3]")


def explain_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_explain")
    with unprivileged():
        result = explain_(capsys, w.saved, w.root / "photo.png", out=locked / "x")
    one_line(result, "aim-explain", 1, str(locked / "x"), "Permission denied")
    secret = w.root / "secret.png"
    shutil.copy(w.root / "photo.png", secret)
    secret.chmod(0)
    out = w.root / "x_secret"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    with unprivileged():
        result = explain_(capsys, w.saved, secret, out=out)
    one_line(result, "aim-explain", 1, "secret.png: cannot be read (Permission denied)")


def explain_full_disk(w, capsys, disk):
    out = disk.folder / "explanations"
    assert explain_(capsys, w.saved, w.root / "photo.png", out=out).code == 0
    before = snapshot(out)
    assert sorted(p.name for p in before) == ["000_photo.png", "index.html"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in before} == {0o666 & ~umask}  # as open() makes them
    with disk.full():
        result = explain_(capsys, w.saved, w.root / "photo.png", out=out)
    one_line(result, "aim-explain", 1, FULL)
    assert snapshot(out) == before
    no_partials(disk.folder)


def _explain_tops(capsys, w, *images: Path) -> list[str]:
    result = explain_(capsys, w.saved, *images, out=w.root / "x_twins")
    assert result.code == 0, result.err
    return [
        line.split()[-1] + " " + line.split()[0]
        for line in result.out.splitlines()
        if "%" in line and "active" not in line
    ]


def explain_non_utf8(w, capsys, disk, trained):
    image = odd(w.root, "photo.png")
    shutil.copy(w.root / "photo.png", image)
    out = odd(w.root, "x_out")
    capture = _Capture()
    with capture:
        code = explain.main([str(trained[1]), str(image), "--device", "cpu", "--out", str(out)])
    printed = _Capture.text(capture.out)
    assert code == 0, _Capture.text(capture.err)
    assert printed.splitlines()[0].endswith("photo\\xff.png") and "% dog\\xff" in printed.replace("  ", " ")
    index = (out / "index.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "photo\\xff.png" in index and "000_photo\ufffd.png" in index
    assert (out / "000_photo\ufffd.png").is_file()


def explain_cmyk(w, capsys, disk):
    """The odd modes predict what their 8-bit RGB twins predict (top classes and probabilities)."""
    for name, suffix in (("cmyk", "jpg"), ("grey16", "png")):
        odd_mode, twin = (
            _explain_tops(capsys, w, w.root / f"{name}.{suffix}"),
            _explain_tops(capsys, w, w.root / f"{name}_rgb.png"),
        )
        assert odd_mode == twin and odd_mode


def explain_bad_number(w, capsys, disk):
    result = run(capsys, "aim-explain", w.saved, w.root / "photo.png", "--top-k", "0")
    one_line(result, "aim-explain", 2, "argument --top-k: must be at least 1, got 0")


# ---------------------------------------------------------------------------------------------- #
# aim-export


def _export_checkpoint_argv(checkpoint) -> list:
    """aim-export of a test_resnet+AIM[3] checkpoint with two classes."""
    return ["--model", "test_resnet", "--stop-stage", "3", "--num-classes", "2", "--checkpoint", checkpoint]


def export_missing(w, capsys, disk):
    one_line(
        run(capsys, "aim-export", w.root / "none", "--onnx", w.root / "m.onnx"),
        "aim-export",
        1,
        "model not found",
    )
    argv = _export_checkpoint_argv(w.root / "none.pt")
    one_line(
        run(capsys, "aim-export", *argv, "--onnx", w.root / "m.onnx"), "aim-export", 1, "checkpoint not found"
    )


def export_empty(w, capsys, disk):
    one_line(
        run(capsys, "aim-export", w.empty, "--onnx", w.root / "m.onnx"),
        "aim-export",
        1,
        "is empty, not a checkpoint",
    )


def export_truncated(w, capsys, disk):
    argv = _export_checkpoint_argv(w.root / "trunc.pt")
    one_line(
        run(capsys, "aim-export", *argv, "--onnx", w.root / "m.onnx"), "aim-export", 1, "truncated or damaged"
    )
    one_line(
        run(capsys, "aim-export", w.truncsaved, "--onnx", w.root / "m.onnx"),
        "aim-export",
        1,
        "not a readable safetensors",
    )


def export_wrong_kind(w, capsys, disk):
    result = run(capsys, "aim-export", w.root / "photo.png", "--onnx", w.root / "m.onnx")
    one_line(result, "aim-export", 1, "is a PNG image, not a checkpoint")


def export_other_architecture(w, capsys, disk):
    argv = _export_checkpoint_argv(w.root / "other.pt")
    result = run(capsys, "aim-export", *argv, "--onnx", w.root / "m.onnx")
    one_line(result, "aim-export", 1, "holds a mobilenetv2_050+AIM[3] model, not test_resnet+AIM[3]")
    assert not (w.root / "m.onnx").exists()


def export_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_export")
    with unprivileged():
        result = run(capsys, "aim-export", w.saved, "--onnx", locked / "m.onnx", "--no-check")
    one_line(result, "aim-export", 1, str(locked), "Permission denied")


def export_full_disk(w, capsys, disk):
    previous = disk.folder / "m.onnx"
    previous.write_bytes(b"the previous export")
    with disk.full():
        result = run(capsys, "aim-export", w.saved, "--onnx", previous, "--no-check")
    one_line(result, "aim-export", 1, f"{previous}: ", FULL)
    assert previous.read_bytes() == b"the previous export"
    no_partials(disk.folder)


def export_non_utf8(w, capsys, disk):
    target = odd(w.root, "m.onnx")
    capture = _Capture()
    with capture:
        code = export.main([str(w.saved), "--onnx", str(target), "--no-check"])
    assert code == 0, _Capture.text(capture.err)
    assert target.is_file() and "m\\xff.onnx (ONNX opset" in _Capture.text(capture.out)


def export_bad_number(w, capsys, disk):
    for flags, message in (
        (["--image-size", "0"], "argument --image-size: must be at least 1, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
        (["--opset", "9"], "--opset 9 is too old"),
    ):
        one_line(
            run(capsys, "aim-export", w.saved, "--onnx", w.root / "m.onnx", *flags), "aim-export", 2, message
        )


# ---------------------------------------------------------------------------------------------- #
# aim-bench


def bench_missing(w, capsys, disk):
    one_line(run(capsys, "aim-bench", "--model", w.root / "none", *BENCH), "aim-bench", 1, "model not found")


def bench_empty(w, capsys, disk):
    one_line(
        run(capsys, "aim-bench", "--model", w.empty, *BENCH), "aim-bench", 1, "is empty, not a checkpoint"
    )


def bench_truncated(w, capsys, disk):
    one_line(
        run(capsys, "aim-bench", "--model", w.root / "trunc.pt", *BENCH),
        "aim-bench",
        1,
        "truncated or damaged",
    )


def bench_wrong_kind(w, capsys, disk):
    one_line(
        run(capsys, "aim-bench", "--model", w.root / "photo.jpg", *BENCH),
        "aim-bench",
        1,
        "is a JPEG image, not a checkpoint",
    )


def bench_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_bench")
    with unprivileged():
        result = run(capsys, "aim-bench", "--model", w.saved, *BENCH, "--out", locked / "b")
    one_line(result, "aim-bench", 1, str(locked / "b"), "Permission denied")


def bench_full_disk(w, capsys, disk):
    previous = disk.folder / "bench"
    previous.mkdir()
    (previous / "results.json").write_text('{"rows": []}')
    before = snapshot(previous)
    with disk.full():
        result = run(capsys, "aim-bench", "--model", w.saved, *BENCH, "--out", previous)
    one_line(result, "aim-bench", 1, FULL)
    assert snapshot(previous) == before
    no_partials(disk.folder)


def bench_non_utf8(w, capsys, disk):
    out = odd(w.root, "bench")
    capture = _Capture()
    with capture:
        code = bench.main(["--model", str(w.saved), *BENCH, "--out", str(out)])
    assert code == 0, _Capture.text(capture.err)
    assert "bench\\xff/results.json" in _Capture.text(capture.out)
    assert (out / "results.md").is_file() and (out / "overhead.png").is_file()


def bench_bad_number(w, capsys, disk):
    for flags, message in (
        (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        (["--batch-sizes", "1,0"], "argument --batch-sizes: must be at least 1, got 0"),
        (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    ):
        one_line(run(capsys, "aim-bench", *flags), "aim-bench", 2, message)
    one_line(
        run(capsys, "aim-bench", "--mask-density", "2"), "aim-bench", 1, "--mask-density must be in [0, 1)"
    )


# ---------------------------------------------------------------------------------------------- #
# aim-demo


def demo_no_permission(w, capsys, disk):
    locked = read_only(w.root / "locked_demo")
    with unprivileged():
        result = run(capsys, "aim-demo", "--out", locked / "demo")
    one_line(result, "aim-demo", 1, str(locked / "demo"), "Permission denied")


def demo_non_utf8(w, capsys, disk):
    """The demo's own writes (the training and evaluation are aim-train's and aim-eval's cells)."""
    out = odd(w.root, "demo")
    out.mkdir()
    (out / demo.COMPARISON).mkdir()
    metrics = {"avg_acc": 0.5, "worst_group_acc": 0.4, "epg": {"gradcam": 0.3}, "num_images": 2}
    results = {
        "vanilla": demo._summary(metrics), "aim": demo._summary(metrics), "test_epg_chance_level": 0.2,
        "configuration": "quick", "seed": 0, "wall_time_s": 1.0,
    }  # fmt: skip
    report = demo.write_results(out, results, out / demo.COMPARISON, f"aim-demo --out {out}")
    assert "--out " + demo.shown(out) in report.read_bytes().decode("utf-8")


def demo_bad_number(w, capsys, disk):
    one_line(run(capsys, "aim-demo", "--epochs", "1"), "aim-demo", 2, "argument --epochs: at least 2 epochs")
    one_line(
        run(capsys, "aim-demo", "--seed", "-1"), "aim-demo", 2, "argument --seed: must be at least 0, got -1"
    )


# ---------------------------------------------------------------------------------------------- #
# The table: every command x fault, a test or the reason it does not apply (docs/errors.md).

INPUTS_FETCHED = (
    "n/a: reads no file of the user's; its downloads are SHA-256 checked "
    "(test_offline_weights, test_tuxbirds)"
)
NO_IMAGES = "n/a: reads no images"
CELLS: dict[tuple[str, str], Callable | str] = {}
for _command, _prefix in (
    ("aim-train", "train"), ("aim-eval", "eval"), ("aim-explain", "explain"),
    ("aim-export", "export"), ("aim-bench", "bench"), ("aim-demo", "demo"),
):  # fmt: skip
    for _fault in FAULTS:
        _key = {"non-UTF-8 path": "non_utf8", "CMYK / 16-bit image": "cmyk"}.get(
            _fault, _fault.replace(" ", "_").replace("-", "_")
        )
        CELLS[(_command, _fault)] = globals().get(f"{_prefix}_{_key}", "")
for _fault in ("missing", "empty", "truncated", "wrong kind", "other architecture"):
    CELLS[("aim-demo", _fault)] = INPUTS_FETCHED
CELLS[("aim-demo", "full disk")] = "n/a: writes through aim-train's and aim-eval's code (their cells)"
CELLS[("aim-demo", "CMYK / 16-bit image")] = "n/a: its images are TuxBirds', rendered by the package"
CELLS[("aim-bench", "other architecture")] = "n/a: the model brings its own architecture"
CELLS[("aim-bench", "CMYK / 16-bit image")] = NO_IMAGES
CELLS[("aim-export", "CMYK / 16-bit image")] = NO_IMAGES
SHARED = ("trained", "evaluated")  # module fixtures that several cells read


def _runnable():
    for (command, fault), cell in CELLS.items():
        if callable(cell):
            yield pytest.param(command, fault, id=f"{command}|{fault}")


def test_every_cell_is_a_test_or_a_reason():
    assert all(callable(c) or c.startswith("n/a: ") for c in CELLS.values()), [
        k for k, c in CELLS.items() if not c
    ]
    assert len(CELLS) == len(MAINS) * len(FAULTS)


@pytest.mark.parametrize(("command", "fault"), list(_runnable()))
def test_cell(command, fault, world, capsys, disk, request):
    cell = CELLS[(command, fault)]
    shared = [request.getfixturevalue(name) for name in SHARED if name in cell.__code__.co_varnames]
    before = snapshot(world.saved, world.run)
    cell(world, capsys, disk, *shared)
    assert snapshot(world.saved, world.run) == before  # the inputs are never touched


def test_the_docs_table_lists_every_cell():
    table = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in table.splitlines()
        if line.startswith("| `aim-")
    }
    assert sorted(rows) == sorted(MAINS)
    header = next(line for line in table.splitlines() if line.startswith("| command"))
    assert [c.strip() for c in header.split("|")[2:-1]] == list(FAULTS)
    for (command, fault), cell in CELLS.items():
        text = rows[command].split("|")[2 + FAULTS.index(fault)].strip()
        assert text.startswith("n/a") == (not callable(cell)), (command, fault, text)


def test_info_refuses_a_bad_argument(capsys):
    from aim_ext.__main__ import main as info

    with pytest.raises(SystemExit) as exit_:
        info(["nope"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("python -m aim_ext: error: argument command")


def test_an_error_line_shows_a_non_utf8_name_and_a_worker_error_names_the_file(capsys):
    from aim_ext.cli.errors import describe, say

    say("aim-x", "cannot read " + os.fsdecode(b"/tmp/a\xffb.png"))
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(b"/tmp/\xff"))
    assert describe(error) == "/tmp/\\xff: No space left on device (the disk is full)"
    say(
        "aim-x",
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File x\nCorruptImageError: cannot read image /d/cut.jpg: truncated",
    )
    assert capsys.readouterr().err.splitlines() == [
        "aim-x: cannot read /tmp/a\\xffb.png",
        "aim-x: CorruptImageError: cannot read image /d/cut.jpg: truncated",
    ]
