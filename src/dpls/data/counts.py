"""How often each token id occurs in the training split: the one count every consumer shares
(the prior of prior-weighted label smoothing, the frequency bins of ``dpls eval``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpls.data.meta import DataMeta
from dpls.data.shards import read_shard

COUNT_MAX_TOKENS = 200_000_000  # counted from the start of every shard, in proportion


def token_counts(data_dir: str | Path, vocab_size: int, *, max_tokens: int = COUNT_MAX_TOKENS) -> np.ndarray:
    """Occurrences of each id in ``data_dir``'s training shards, an int64 ``[vocab_size]`` array.

    Counts at most ``max_tokens`` tokens (the same leading share of every shard), so a 10B-token
    corpus costs seconds, not minutes; deterministic, so every rank and every evaluation gets the
    same counts.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    meta = DataMeta.load(data_dir, check_shards=False)
    counts = np.zeros(vocab_size, dtype=np.int64)
    share = min(1.0, max_tokens / max(1, meta.train_tokens))
    for name in meta.train_shards:
        tokens = read_shard(Path(data_dir) / name)
        head = tokens[: math.ceil(len(tokens) * share)]
        counts += np.bincount(head, minlength=vocab_size)[:vocab_size]
    return counts
