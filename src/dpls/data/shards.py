"""Token shards in the llm.c / nanoGPT layout.

A shard is a 256 × int32 header (magic, version, token count, the rest zero) followed by the
tokens, little-endian. The header's (magic, version) pair names the token type, so a reader
never guesses it from the file size or the vocabulary:

* magic 20240520, version 1: uint16 tokens (llm.c's GPT-2 layout; every vocabulary up to
  65,536 entries, and the default);
* magic 20240801, version 7: uint32 tokens (llm.c's LLaMA-3 layout; larger vocabularies).

Reading memory-maps the tokens, so a loader touches only the windows it samples; every check
that can fail is made on open, with the file's name in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# token dtype name -> (magic, version) in the header; the dtype is stored little-endian
LAYOUTS: dict[str, tuple[int, int]] = {"uint16": (20240520, 1), "uint32": (20240801, 7)}
MAGIC, VERSION = LAYOUTS["uint16"]
UINT16_VOCAB = 2**16  # vocabularies up to this size fit uint16 shards
MAX_VOCAB = 2**32  # and up to this size uint32 shards


class ShardError(ValueError):
    """A shard file that is missing, truncated or not in the expected layout."""


def token_dtype(vocab_size: int) -> str:
    """The shard token type of a vocabulary: ``"uint16"`` where it fits, else ``"uint32"``."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB}], got {vocab_size}")
    return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"


def _check_dtype(dtype: str) -> str:
    if dtype not in LAYOUTS:
        raise ValueError(f"shard dtype must be one of {', '.join(LAYOUTS)}, got {dtype!r}")
    return dtype


def write_shard(path: str | Path, tokens: np.ndarray | list[int], dtype: str = "uint16") -> Path:
    """Write ``tokens`` as a shard of ``dtype`` (``"uint16"`` or ``"uint32"``) at ``path``,
    atomically: a temporary file renamed into place, so a crash never leaves a half-written
    shard under its real name."""
    path = Path(path)
    _check_dtype(dtype)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != np.dtype(dtype):
        limit = np.iinfo(dtype).max + 1
        if arr.size and (arr.min() < 0 or arr.max() >= limit):
            raise ValueError(f"token ids must lie in [0, {limit}) to be stored as {dtype}")
    if arr.size >= 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {arr.size}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (*LAYOUTS[dtype], arr.size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def shard_header(path: str | Path) -> tuple[str, int]:
    """(token dtype, token count) from the header, after checking it and the file size."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"shard {str(path)!r} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version = int(header[0]), int(header[1])
    found = [name for name, (m, _v) in LAYOUTS.items() if m == magic]
    if not found:
        known = ", ".join(str(m) for m, _v in LAYOUTS.values())
        raise ShardError(f"shard {str(path)!r} has magic {magic}, expected one of {known}: not a token shard")
    dtype = found[0]
    if version != LAYOUTS[dtype][1]:
        raise ShardError(
            f"shard {str(path)!r} has version {version}, expected {LAYOUTS[dtype][1]} for magic {magic}"
        )
    count = int(header[2])
    expected = HEADER_BYTES + np.dtype(dtype).itemsize * count
    if count < 0 or size != expected:
        raise ShardError(
            f"shard {str(path)!r} is corrupt: header says {count} {dtype} tokens ({expected} bytes), "
            f"file has {size} bytes"
        )
    return dtype, count


def shard_token_count(path: str | Path) -> int:
    """The token count from the header, after checking the header and the file size."""
    return shard_header(path)[1]


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only ``np.memmap`` of the header's dtype (validated first)."""
    dtype, count = shard_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    stored = np.dtype(dtype).newbyteorder("<")
    return np.memmap(path, dtype=stored, mode="r", offset=HEADER_BYTES, shape=(count,))
