"""Checks that data fits a model: the tokenizer's identity and the range of the token ids.

The vocabulary size alone cannot tell two tokenizers apart (a model trained on one BPE
accepts the ids of another smaller one without complaint, and learns or reports nonsense),
and a shard from another tokenizer, or a ``meta.json`` that understates the vocabulary,
holds ids the model's embedding does not have. Both are caught here, before a run or an
evaluation starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpls.data.meta import META_FILE, DataError, DataMeta
from dpls.data.shards import read_shard
from dpls.data.tokenizer import load_tokenizer

FULL_SCAN_TOKENS = 256 << 20  # a split up to this size is scanned whole (a fraction of a second)
SAMPLE_CHUNKS = 64  # larger splits: this many evenly spread chunks per shard ...
CHUNK_TOKENS = 1 << 20  # ... of this many tokens each


def tokenizer_fingerprint_of(directory: str | Path) -> str | None:
    """The tokenizer fingerprint of a data directory or a run's ``tokenizer/`` copy: the one
    ``meta.json`` records, else computed from its tokenizer file; None when there is none
    (no meta.json, an unreadable tokenizer file, or a GPT-2 one without a recorded
    fingerprint: GPT-2 is one tokenizer)."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        return None
    meta = DataMeta.load(directory, check_shards=False)
    if meta.tokenizer_fingerprint:
        return meta.tokenizer_fingerprint
    if meta.tokenizer != "bpe" or not meta.tokenizer_file or not (directory / meta.tokenizer_file).is_file():
        return None
    try:
        return load_tokenizer(directory).fingerprint()
    except DataError:  # unreadable: nothing to compare (training itself never reads it)
        return None


def check_same_tokenizer(expected: str | None, data_dir: str | Path, what: str) -> None:
    """``ValueError`` when ``data_dir``'s tokenizer is not the one ``what`` (a checkpoint) was
    trained with; a side without a known fingerprint is not compared."""
    found = tokenizer_fingerprint_of(data_dir)
    if expected and found and expected != found:
        raise ValueError(
            f"data_dir {data_dir} was tokenized with another tokenizer than {what} (tokenizer "
            f"fingerprint {found[:12]} vs {expected[:12]}): its token ids mean other text to this model. "
            "Use data prepared with the run's tokenizer"
        )


def max_token_id(directory: str | Path, shards: list[str]) -> tuple[int, str]:
    """The largest token id in ``shards`` (and the shard holding it). Exact for splits up to
    `FULL_SCAN_TOKENS` tokens; larger ones are sampled in evenly spread chunks, so a shard
    from another tokenizer is found without reading billions of tokens."""
    arrays = [(name, read_shard(Path(directory) / name)) for name in shards]
    total = sum(len(a) for _, a in arrays)
    best, where = -1, ""
    for name, tokens in arrays:
        if len(tokens) == 0:
            continue
        if total <= FULL_SCAN_TOKENS or len(tokens) <= SAMPLE_CHUNKS * CHUNK_TOKENS:
            starts = range(0, len(tokens), CHUNK_TOKENS * 16)
            size = CHUNK_TOKENS * 16
        else:
            starts = np.linspace(0, len(tokens) - CHUNK_TOKENS, SAMPLE_CHUNKS).astype(np.int64).tolist()
            size = CHUNK_TOKENS
        for start in starts:
            top = int(tokens[start : start + size].max())
            if top > best:
                best, where = top, name
    return best, where


def check_token_ids(directory: str | Path, meta: DataMeta, vocab_size: int) -> None:
    """Every token id of both splits lies below ``meta.vocab_size`` and the model's ``vocab_size``."""
    for split in ("train", "val"):
        top, shard = max_token_id(directory, meta.shards(split))
        if top >= meta.vocab_size:
            raise DataError(
                f"{Path(directory) / shard} holds token id {top}, but {Path(directory) / META_FILE} says "
                f"vocab_size {meta.vocab_size}: meta.json is wrong or the shards come from another "
                "tokenizer; prepare the data again"
            )
        if top >= vocab_size:
            raise DataError(
                f"{Path(directory) / shard} holds token id {top}, outside the model's vocabulary of "
                f"{vocab_size}: data from another tokenizer"
            )
