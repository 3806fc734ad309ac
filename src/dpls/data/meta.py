"""``meta.json``: what a data directory holds and how its tokens are to be read.

Written last by every ``prepare_*`` (atomically), so its presence means the directory is
complete. The trainer copies it, with the tokenizer file, into ``RUN/tokenizer/``, which is
how a run or checkpoint finds its tokenizer without the data directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpls._io import write_json_atomic
from dpls.data.shards import LAYOUTS, UINT16_VOCAB, read_shard, shard_header

META_FILE = "meta.json"
FORMAT_VERSION = 1
TOKENIZER_KINDS = ("bpe", "gpt2")
SPLITS = ("train", "val")


class DataError(ValueError):
    """A data directory that is missing, incomplete or inconsistent."""


@dataclass
class DataMeta:
    tokenizer: str  # "bpe" (tokenizer_file is a Hugging Face tokenizer.json) | "gpt2" (tiktoken)
    tokenizer_file: str | None  # relative to the directory holding meta.json
    vocab_size: int  # the tokenizer's; a model may pad it (50257 -> 50304)
    eot_token: int  # <|endoftext|>, placed before every document
    train_shards: list[str]
    val_shards: list[str]
    train_tokens: int
    val_tokens: int
    source: str  # "stdlib" | "files" | "fineweb-edu"
    settings: dict[str, Any] = field(default_factory=dict)  # the prepare call that made it
    format_version: int = FORMAT_VERSION
    # Hashes that say "same data" (absent in directories made before they were recorded):
    # the tokenizer's (Tokenizer.fingerprint) and the corpus's (corpus_fingerprint).
    tokenizer_fingerprint: str | None = None
    corpus_fingerprint: str | None = None
    # The shards' token type (`dpls.data.shards.token_dtype`); directories made before it was
    # recorded hold uint16 shards. Every shard's header must say the same.
    token_dtype: str = "uint16"

    def shards(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return self.train_shards if split == "train" else self.val_shards

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/meta.json`` atomically."""
        return write_json_atomic(Path(directory) / META_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, where: str = "meta.json") -> DataMeta:
        if not isinstance(raw, dict):
            raise DataError(f"{where} must hold a JSON object")
        types: dict[str, type | tuple[type, ...]] = {
            "tokenizer": str,
            "tokenizer_file": (str, type(None)),
            "vocab_size": int,
            "eot_token": int,
            "train_shards": list,
            "val_shards": list,
            "train_tokens": int,
            "val_tokens": int,
            "source": str,
        }
        for key, kind in types.items():
            if key not in raw:
                raise DataError(f"{where} lacks the key {key!r}")
            if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
                raise DataError(f"{where}: {key!r} has the wrong type ({type(raw[key]).__name__})")
        meta = cls(
            **{k: raw[k] for k in types},
            settings=dict(raw.get("settings") or {}),
            format_version=int(raw.get("format_version", FORMAT_VERSION)),
            tokenizer_fingerprint=raw.get("tokenizer_fingerprint"),
            corpus_fingerprint=raw.get("corpus_fingerprint"),
            token_dtype=raw.get("token_dtype", "uint16"),
        )
        for key in ("tokenizer_fingerprint", "corpus_fingerprint"):
            value = getattr(meta, key)
            if value is not None and not (isinstance(value, str) and value):
                raise DataError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        if meta.format_version > FORMAT_VERSION:
            raise DataError(
                f"{where} has format_version {meta.format_version}; this dpls reads up to {FORMAT_VERSION}"
            )
        if meta.tokenizer not in TOKENIZER_KINDS:
            raise DataError(
                f"{where}: tokenizer must be one of {list(TOKENIZER_KINDS)}, got {meta.tokenizer!r}"
            )
        if meta.tokenizer == "bpe" and not meta.tokenizer_file:
            raise DataError(f"{where}: a 'bpe' tokenizer needs tokenizer_file")
        if meta.token_dtype not in LAYOUTS:
            raise DataError(f"{where}: token_dtype must be one of {list(LAYOUTS)}, got {meta.token_dtype!r}")
        max_vocab = int(np.iinfo(meta.token_dtype).max) + 1
        if not 0 < meta.vocab_size <= max_vocab:
            hint = (
                " (a larger vocabulary needs uint32 shards: prepare the data again)"
                if max_vocab == UINT16_VOCAB
                else ""
            )
            raise DataError(
                f"{where}: vocab_size must be in [1, {max_vocab}] for {meta.token_dtype} shards, "
                f"got {meta.vocab_size}{hint}"
            )
        if not 0 <= meta.eot_token < meta.vocab_size:
            raise DataError(
                f"{where}: eot_token {meta.eot_token} is outside the vocabulary [0, {meta.vocab_size})"
            )
        for split in SPLITS:
            for name in meta.shards(split):
                if not isinstance(name, str) or not name or Path(name).name != name:
                    raise DataError(f"{where}: {split}_shards must be plain file names, got {name!r}")
        return meta

    @classmethod
    def load(cls, directory: str | Path, *, check_shards: bool = True) -> DataMeta:
        """Read and validate ``directory/meta.json``; with ``check_shards`` also every shard's
        header, size and the token totals (a missing or corrupt shard is named)."""
        directory = Path(directory)
        path = directory / META_FILE
        if not path.is_file():
            raise DataError(f"{str(directory)!r} is not a prepared data directory: no {META_FILE}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{str(path)!r} is not valid JSON: {err}") from None
        meta = cls.from_dict(raw, where=str(path))
        if check_shards:
            for split in SPLITS:
                names = meta.shards(split)
                if not names:
                    raise DataError(f"{str(path)!r} lists no {split} shards")
                total = 0
                for name in names:
                    dtype, count = shard_header(directory / name)
                    if dtype != meta.token_dtype:  # readers never guess: both must say the same
                        raise DataError(
                            f"{str(directory / name)!r} holds {dtype} tokens, but {META_FILE} says "
                            f"token_dtype {meta.token_dtype}: the shards and meta.json do not belong together"
                        )
                    total += count
                expected = meta.train_tokens if split == "train" else meta.val_tokens
                if total != expected:
                    raise DataError(
                        f"{str(directory)!r}: the {split} shards hold {total} tokens, {META_FILE} says {expected}"
                    )
        return meta


def corpus_fingerprint(directory: str | Path, meta: DataMeta, tokenizer_fingerprint: str) -> str:
    """A hash of a data directory's corpus: the tokenizer's fingerprint and every token of both
    splits, in order. The tokenizer is byte-level and lossless, so this is a hash of the
    documents as the model sees them: equal fingerprints mean the same training and
    validation data, whatever machine prepared it. The stdlib corpus differs between Python
    builds, and so does this hash (and every number measured on the corpus)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tokenizer_fingerprint}\0{meta.vocab_size}\0{meta.eot_token}".encode())
    stored = np.dtype(meta.token_dtype).newbyteorder("<")  # the bytes of the shards' own layout
    for split in SPLITS:
        h.update(f"\0{split}".encode())
        for name in meta.shards(split):
            tokens = read_shard(Path(directory) / name)
            h.update(len(tokens).to_bytes(8, "little"))
            for start in range(0, len(tokens), 1 << 24):  # 32 MB at a time
                h.update(np.ascontiguousarray(tokens[start : start + (1 << 24)], dtype=stored).tobytes())
    return h.hexdigest()
