"""Corpora → tokenizer → token shards (uint16, uint32 past 65,536 entries) → deterministic loaders (the shard layout of docs/reference.md).

``tokenizers``, ``tiktoken``, ``datasets`` and ``pyarrow`` are imported only by the functions
that need them, so the loaders stay light.
"""

from __future__ import annotations

from dpls.data.counts import token_counts
from dpls.data.loader import TokenLoader, ValidationSet, val_token_count, validation_batches
from dpls.data.meta import META_FILE, DataError, DataMeta
from dpls.data.prepare import prepare_files, prepare_fineweb_edu, prepare_stdlib, stdlib_files
from dpls.data.shards import ShardError, read_shard, shard_token_count, write_shard
from dpls.data.tokenizer import (
    BPETokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "META_FILE",
    "BPETokenizer",
    "DataError",
    "DataMeta",
    "ShardError",
    "TiktokenTokenizer",
    "TokenLoader",
    "Tokenizer",
    "ValidationSet",
    "load_tokenizer",
    "prepare_files",
    "prepare_fineweb_edu",
    "prepare_stdlib",
    "read_shard",
    "shard_token_count",
    "stdlib_files",
    "token_counts",
    "train_bpe",
    "val_token_count",
    "validation_batches",
    "write_shard",
]
