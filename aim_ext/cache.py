"""The one cache folder for everything aim-ext fetches or derives at run time (never the repository),
and the two file helpers every fetch uses: a SHA-256 digest and an atomic write."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """``$AIM_EXT_CACHE`` if set, else ``~/.cache/aim-ext``."""
    base = os.environ.get("AIM_EXT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "aim-ext"


def sha256_file(path: Path) -> str:
    """The file's SHA-256 hex digest, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` beside ``path`` and rename it into place: never a truncated file under the
    final name, whatever interrupts the write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path
