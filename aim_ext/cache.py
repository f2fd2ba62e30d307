"""The one cache folder for everything aim-ext fetches or derives at run time (never the repository)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$AIM_EXT_CACHE`` if set, else ``~/.cache/aim-ext``."""
    base = os.environ.get("AIM_EXT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "aim-ext"
