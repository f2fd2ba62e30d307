"""export/aim_runner (C++, no Python) against PyTorch, and the AIMT tensor files it shares with Python.

The runner is built with CMake into a temporary folder (about 35 s on 2 cores); without cmake on
PATH those tests skip. Logits within 1e-4; masks identical except where |A| < 1e-4."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mixed_masks import mixed_mask_model

from aim_ext.export import export_aoti
from aim_ext.export.tensor_file import load_tensor, save_tensor

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (99, 99)  # odd on purpose: no resize ratio in the model is 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MASKS = ["mask_stage4", "mask_stage3"]
MASK_SHAPES = [(1, 4, 4), (1, 7, 7)]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH: aim_runner cannot be built")
    build = tmp_path_factory.mktemp("aim_runner") / "build"
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    python = f"-DPython3_EXECUTABLE={sys.executable}"
    for command in (
        ["cmake", "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release", python],
        ["cmake", "--build", build, "-j2", "--target", "aim_runner"],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            command_line = " ".join(map(str, command))
            pytest.fail(f"{command_line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return build / "aim_runner"


@pytest.fixture(scope="module")
def model():
    return mixed_mask_model("resnet18", stop_stage=3, num_classes=10, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def package(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aoti") / "r18.pt2"
    return export_aoti(model, path, image_size=IMAGE_SIZE, dynamic_batch=True)


def run(runner: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([runner, *map(str, args)], capture_output=True, text=True, timeout=300)


def read_pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert (magic, maxval) == (b"P5", b"255")
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width))


def write_ppm(path: Path, pixels: np.ndarray) -> Path:
    """A binary PPM of (h, w, 3) uint8 pixels, with a comment in the header."""
    height, width, _ = pixels.shape
    path.write_bytes(f"P6\n# written by the test\n{width} {height}\n255\n".encode() + pixels.tobytes())
    return path


def assert_matches_pytorch(model, image: torch.Tensor, out: Path) -> None:
    with torch.no_grad():
        logits, masks = model.predict(image)
        mask_logits = [s.mask_logits for s in model.forward_topdown(image)]
    torch.testing.assert_close(load_tensor(out / "logits.aimt"), logits, atol=1e-4, rtol=0)
    for name, shape, mask, a in zip(MASKS, MASK_SHAPES, masks, mask_logits, strict=True):
        got = load_tensor(out / f"{name}.aimt")
        assert got.shape == (len(image), *shape) == mask.shape
        assert 0 < mask.mean() < 1, f"{name} is not mixed: the comparison would prove little"
        decided = a.abs() >= 1e-4
        assert torch.equal(got[decided], mask[decided]), name
        for i in range(len(image)):
            assert np.array_equal(read_pgm(out / f"{name}_{i}.pgm"), got[i, 0].numpy().astype(np.uint8) * 255)


@pytest.mark.slow
def test_runner_matches_pytorch_on_an_aimt_batch(runner, package, model, tmp_path):
    image = torch.randn(3, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    save_tensor(tmp_path / "batch.aimt", image)
    result = run(runner, package, "--input", tmp_path / "batch.aimt", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_matches_pytorch(model, image, tmp_path / "out")

    lines = result.stdout.splitlines()
    assert lines[0].startswith("model resnet18+AIM[3] (cpu, float32): 10 classes, image 99x99, mean 0.485,")
    assert lines[0].endswith("outputs logits,mask_stage4,mask_stage3")
    with torch.no_grad():
        top5 = model.predict(image)[0].topk(5).indices
    for i in range(3):
        printed = lines[1 + i].removeprefix(f"sample {i}: top-5").split()[::2]
        assert [int(c) for c in printed] == top5[i].tolist()
    assert lines[4].startswith("mask_stage4 (3, 1, 4, 4): active ")
    assert lines[5].startswith("mask_stage3 (3, 1, 7, 7): active ")


@pytest.mark.slow
def test_runner_resizes_and_normalises_ppm_images_as_pytorch(runner, package, model, tmp_path):
    rng = np.random.default_rng(0)
    pixels = [
        rng.integers(0, 256, (80, 120, 3), dtype=np.uint8),
        rng.integers(0, 256, (130, 90, 3), dtype=np.uint8),
    ]
    paths = [write_ppm(tmp_path / f"{i}.ppm", p) for i, p in enumerate(pixels)]
    result = run(runner, package, "--image", paths[0], "--image", paths[1], "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images = []
    for p in pixels:
        x = torch.from_numpy(p).permute(2, 0, 1).float().div(255)[None]
        x = F.interpolate(x, IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=True)
        images.append((x - mean) / std)
    assert_matches_pytorch(model, torch.cat(images), tmp_path / "out")


@pytest.mark.slow
def test_runner_feeds_an_fp16_package_half_precision(runner, model, tmp_path):
    package = export_aoti(
        model, tmp_path / "r18_fp16.pt2", image_size=IMAGE_SIZE, dynamic_batch=True, dtype=torch.float16
    )
    image = torch.randn(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    save_tensor(tmp_path / "batch.aimt", image)
    result = run(runner, package, "--input", tmp_path / "batch.aimt", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "(cpu, float16)" in result.stdout.splitlines()[0]
    with torch.no_grad():
        logits = model.predict(image)[0]
    torch.testing.assert_close(load_tensor(tmp_path / "out" / "logits.aimt"), logits, atol=5e-3, rtol=0)
    for name, shape in zip(MASKS, MASK_SHAPES, strict=True):
        assert load_tensor(tmp_path / "out" / f"{name}.aimt").shape == (2, *shape)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong_shape", "expected shape (N, 3, 99, 99), found (2, 3, 64, 64)"),
        ("trailing_bytes", "trailing bytes: "),
        ("truncated_ppm", "truncated PPM: 4x2 needs 24 bytes of pixels"),
        ("ascii_ppm", "not a binary PPM (P6) image"),
        ("missing_package", "package not found: "),
        ("no_input", "give either --input or --image"),
    ],
    ids=["wrong_shape", "trailing_bytes", "truncated_ppm", "ascii_ppm", "missing_package", "no_input"],
)
def test_runner_errors(runner, package, tmp_path, case, message):
    bad = tmp_path / "bad"
    if case == "wrong_shape":
        save_tensor(bad, torch.zeros(2, 3, 64, 64))
        args = [package, "--input", bad]
    elif case == "trailing_bytes":
        save_tensor(bad, torch.zeros(1, 3, *IMAGE_SIZE))
        bad.write_bytes(bad.read_bytes() + b"\0")
        args = [package, "--input", bad]
    elif case in ("truncated_ppm", "ascii_ppm"):
        bad.write_bytes(
            b"P6\n4 2\n255\n" + bytes(20) if case == "truncated_ppm" else b"P3\n1 1\n255\n0 0 0\n"
        )
        args = [package, "--image", bad]
    elif case == "missing_package":
        args = [tmp_path / "missing.pt2", "--input", bad]
    else:
        args = [package]
    result = run(runner, *args, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.startswith("aim_runner: error: ") and message in result.stderr, result.stderr
    if case in ("wrong_shape", "trailing_bytes", "truncated_ppm", "ascii_ppm"):
        assert str(bad) in result.stderr


@pytest.mark.slow
def test_runner_help(runner):
    result = run(runner, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: aim_runner PACKAGE.pt2")


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5, 4), (1, 0, 3), (1,) * 8])
def test_tensor_file_round_trip(tmp_path, shape):
    tensor = torch.randn(shape, dtype=torch.float64)
    save_tensor(tmp_path / "t.aimt", tensor.transpose(0, -1).contiguous().transpose(0, -1))  # not contiguous
    loaded = load_tensor(tmp_path / "t.aimt")
    assert loaded.dtype == torch.float32 and loaded.shape == shape
    assert torch.equal(loaded, tensor.float())


def test_tensor_file_layout(tmp_path):
    save_tensor(tmp_path / "t.aimt", torch.tensor([[1.0, 2.0, 3.0]]))
    expected = b"AIMT" + struct.pack("<I2Q3f", 2, 1, 3, 1.0, 2.0, 3.0)
    assert (tmp_path / "t.aimt").read_bytes() == expected


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b"AIMX" + b[4:], "not an AIMT file"),
        (lambda b: b[:2], "not an AIMT file"),
        (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "ndim 9 is not in 1..8"),
        (lambda b: b[:12], "truncated header"),
        (lambda b: b[:-1], "truncated: 47 bytes, shape [2, 3] needs 48"),
        (lambda b: b + b"\0\0", "2 trailing bytes after shape [2, 3]"),
    ],
    ids=["bad_magic", "short", "ndim", "truncated_header", "truncated_values", "trailing_bytes"],
)
def test_tensor_file_errors(tmp_path, change, message):
    path = tmp_path / "t.aimt"
    save_tensor(path, torch.ones(2, 3))
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(ValueError, match=r"t\.aimt: ") as error:
        load_tensor(path)
    assert message in str(error.value)


def test_tensor_file_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="float"):
        save_tensor(tmp_path / "t.aimt", torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1..8 dimensions"):
        save_tensor(tmp_path / "t.aimt", torch.tensor(1.0))
