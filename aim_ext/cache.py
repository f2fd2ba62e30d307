"""The one cache folder for everything aim-ext fetches or derives at run time (never the repository),
and the file helpers every fetch and every run folder use: a SHA-256 digest, atomic writes, and the
removal of what a killed write left behind."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Every atomic write goes to ``.NAME.<random>.part`` beside NAME, then is renamed onto NAME.
PARTIAL_SUFFIX = ".part"


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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (an empty file, with the mode open() would give it),
    renamed onto ``path`` when the block ends without an error: ``path`` is the old file or the
    whole new one, never a part, whatever interrupts the write (a SIGKILL leaves at most a
    ``.part`` file, see `remove_partials`). An OSError names ``path``, never the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    except OSError as error:
        error.filename = str(path)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file
        os.close(fd)
        yield Path(partial)
        os.replace(partial, path)
    except BaseException as error:
        Path(partial).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, partial):  # a full disk's
            error.filename = str(path)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on `atomic_path`'s temporary file, synced to disk before the rename."""
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` beside ``path`` and rename it into place (`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def remove_partials(folder: Path, name: str = "*", recursive: bool = False) -> list[Path]:
    """Delete the ``.part`` files that killed atomic writes of ``name`` (a glob; every file by
    default) left in ``folder``; returns them. Call it only where no other process is writing those
    files (under `cache_lock`, or in a run folder that one run owns)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{PARTIAL_SUFFIX}"
    found = [p for p in (folder.rglob(pattern) if recursive else folder.glob(pattern)) if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (``.NAME.lock`` beside ``path``) while fetching or deriving ``path``:
    several processes may start together, and only the holder may repair what a killed one left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
