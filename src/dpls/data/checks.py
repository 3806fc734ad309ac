"""Checks that data fits a model: the tokenizer's identity and the range of the token ids.

The vocabulary size alone cannot tell two tokenizers apart (a model trained on one BPE
accepts the ids of another smaller one without complaint, and learns or reports nonsense),
and a shard from another tokenizer, or a ``meta.json`` that understates the vocabulary,
holds ids the model's embedding does not have. Both are caught here, before a run or an
evaluation starts, and so is a ``meta.json`` that does not describe its own directory
(`check_meta_matches`: an edited vocabulary size or corpus fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpls.data.meta import META_FILE, DataError, DataMeta, corpus_fingerprint
from dpls.data.shards import read_shard
from dpls.data.tokenizer import TOKENIZER_BUILDERS, load_tokenizer

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


def check_meta_matches(directory: str | Path, meta: DataMeta) -> None:
    """``meta.json`` describes its own directory, else `DataError` (one line, before any work):
    its ``vocab_size`` and ``tokenizer_fingerprint`` are those of its tokenizer file, and its
    ``corpus_fingerprint`` is that of its shards (recomputed for corpora of up to
    `FULL_SCAN_TOKENS` tokens, about a second; larger ones are trusted). A model sized by an
    edited ``vocab_size`` trains without complaint and samples ids its tokenizer cannot
    decode; an edited fingerprint puts another corpus's name on a report."""
    directory = Path(directory)
    where, again = directory / META_FILE, "meta.json was edited or the files changed: prepare the data again"
    found_fingerprint = meta.tokenizer_fingerprint
    tokenizer = None
    if meta.tokenizer_file and (directory / meta.tokenizer_file).is_file():
        try:  # the file alone, not yet compared with meta.json
            tokenizer = TOKENIZER_BUILDERS[meta.tokenizer](meta, directory, None)
        except DataError:  # unreadable: training never reads it (and `dpls sample` says so)
            tokenizer = None
    if tokenizer is not None:
        if (tokenizer.vocab_size, tokenizer.eot) != (meta.vocab_size, meta.eot_token):
            raise DataError(
                f"{where} says vocab_size {meta.vocab_size} and eot_token {meta.eot_token}, but its tokenizer "
                f"{meta.tokenizer_file} has {tokenizer.vocab_size} tokens and eot {tokenizer.eot}; {again}"
            )
        found_fingerprint = tokenizer.fingerprint()
        if meta.tokenizer_fingerprint and found_fingerprint != meta.tokenizer_fingerprint:
            raise DataError(
                f"{where} records tokenizer_fingerprint {meta.tokenizer_fingerprint}, but "
                f"{meta.tokenizer_file} has {found_fingerprint}; {again}"
            )
    small = meta.train_tokens + meta.val_tokens <= FULL_SCAN_TOKENS
    if meta.corpus_fingerprint and found_fingerprint and small:
        actual = corpus_fingerprint(directory, meta, found_fingerprint)
        if actual != meta.corpus_fingerprint:
            raise DataError(
                f"{where} records corpus_fingerprint {meta.corpus_fingerprint}, but its shards have {actual}; {again}"
            )
