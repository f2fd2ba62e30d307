"""What every command does with a failure of the system under it (a folder it may not write, a full
disk, a file that cannot be read): one line on stderr naming the file and the problem, exit status
1, no traceback; and how a path that is not UTF-8 is shown."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

# The errors a full disk or a file-size limit gives, with what to do about them.
NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
TOO_LARGE = {errno.EFBIG: "the file exceeds the size limit"}


def shown(path: str | os.PathLike | bytes) -> str:
    """A path as text any terminal or file can take: bytes that are not UTF-8 become \\xNN."""
    return printable(os.fsdecode(path))


def printable(text: str) -> str:
    """``text`` with the surrogates that a non-UTF-8 file name decodes to shown as \\xNN: printing
    them as they are fails (UnicodeEncodeError) on a UTF-8 terminal."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def say(prog: str, message: object) -> None:
    """``prog: message`` on stderr as one line (the message's first), non-UTF-8 names as \\xNN."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in str(message):
        lines = lines[-1:]  # a DataLoader worker's error: the original one is its last line
    line = lines[0] if lines else type(message).__name__
    print(f"{prog}: {printable(line)}", file=sys.stderr)


def describe(error: OSError) -> str:
    """'PATH: Permission denied', 'PATH: No space left on device (the disk is full)'."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = {**NO_SPACE, **TOO_LARGE}.get(error.errno)
    if hint:
        reason = f"{reason} ({hint})"
    name = error.filename
    return f"{shown(name)}: {reason}" if name is not None else reason


def one_line_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's main: an OSError that reaches it is printed as one line, exit status 1."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except OSError as error:
                say(prog, describe(error))
                return 1

        return guarded

    return wrap


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def writable_folder(path: Path, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) and check that a file can be made in it, before any long
    work; an OSError names the folder."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write to this {what}", str(path))
    return path
