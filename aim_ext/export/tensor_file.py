"""AIMT: the raw tensor file format shared by Python and the C++ runner (export/aim_runner.cpp).

Layout, all little-endian, no padding:

    4 bytes        magic b"AIMT"
    uint32         ndim, 1..8
    ndim x uint64  sizes
    float32 x prod(sizes)  the values in C (row-major) order

Only float32 is stored: `save_tensor` converts any floating tensor to contiguous float32 on the CPU.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

MAGIC = b"AIMT"
MAX_NDIM = 8


def save_tensor(path: str | Path, tensor: torch.Tensor) -> None:
    """Write `tensor` (floating point, 1..8 dimensions) to `path` as AIMT float32."""
    if not tensor.is_floating_point():
        raise ValueError(f"AIMT stores float tensors, got {tensor.dtype}")
    if not 1 <= tensor.dim() <= MAX_NDIM:
        raise ValueError(f"AIMT stores 1..{MAX_NDIM} dimensions, got {tensor.dim()}")
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    header = MAGIC + struct.pack(f"<I{tensor.dim()}Q", tensor.dim(), *tensor.shape)
    Path(path).write_bytes(header + values.tobytes())


def load_tensor(path: str | Path) -> torch.Tensor:
    """Read an AIMT file; ValueError naming the file on a bad magic, ndim or length."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not an AIMT file (magic {data[:4]!r}, expected {MAGIC!r})")
    if len(data) < 8:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes)")
    (ndim,) = struct.unpack_from("<I", data, 4)
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"{path}: ndim {ndim} is not in 1..{MAX_NDIM}")
    offset = 8 + 8 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes, {ndim} sizes need {offset})")
    sizes = struct.unpack_from(f"<{ndim}Q", data, 8)
    expected = offset + 4 * math.prod(sizes)
    if len(data) < expected:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shape {list(sizes)} needs {expected}")
    if len(data) > expected:
        raise ValueError(f"{path}: {len(data) - expected} trailing bytes after shape {list(sizes)}")
    values = np.frombuffer(data, dtype="<f4", offset=offset).astype(np.float32)
    return torch.from_numpy(values).reshape(sizes)
