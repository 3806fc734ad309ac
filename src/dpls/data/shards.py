"""Token shards in the llm.c / nanoGPT layout.

A shard is a 256 × int32 header (magic 20240520, version 1, token count, the rest zero)
followed by the tokens as little-endian uint16. Reading memory-maps the tokens, so a loader
touches only the windows it samples; every check that can fail is made on open, with the
file's name in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 2**16  # tokens are stored as uint16


class ShardError(ValueError):
    """A shard file that is missing, truncated or not in the expected layout."""


def write_shard(path: str | Path, tokens: np.ndarray | list[int]) -> Path:
    """Write ``tokens`` as a shard at ``path``, atomically: a temporary file renamed into place,
    so a crash never leaves a half-written shard under its real name."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        if arr.size and (arr.min() < 0 or arr.max() >= MAX_VOCAB):
            raise ValueError(f"token ids must lie in [0, {MAX_VOCAB}) to be stored as uint16")
        arr = arr.astype(np.uint16)
    if arr.size >= 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {arr.size}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, arr.size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def shard_token_count(path: str | Path) -> int:
    """The token count from the header, after checking the header and the file size."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"shard {str(path)!r} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"shard {str(path)!r} has magic {header[0]}, expected {MAGIC}: not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"shard {str(path)!r} has version {header[1]}, expected {VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(
            f"shard {str(path)!r} is corrupt: header says {count} tokens ({expected} bytes), file has {size} bytes"
        )
    return count


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 ``np.memmap`` (validated first)."""
    count = shard_token_count(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
