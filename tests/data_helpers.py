"""Test data made without running `prepare`: data directories from token arrays, and a tiny
offline tiktoken encoding (GPT-2's own downloads its merges)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpls.data import DataMeta, write_shard
from dpls.data.tokenizer import EOT

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def write_data_dir(
    root: Path,
    train: Sequence[np.ndarray],
    val: Sequence[np.ndarray],
    *,
    vocab_size: int,
    tokenizer: str = "bpe",
    source: str = "test",
) -> DataMeta:
    """A prepared data directory: one ``{split}_{i:06d}.bin`` shard per array, and meta.json
    (a "bpe" one names tokenizer.json, which callers write only if their test reads it)."""
    root.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {"train": [], "val": []}
    for split, arrays in (("train", train), ("val", val)):
        for i, tokens in enumerate(arrays):
            shards[split].append(f"{split}_{i:06d}.bin")
            write_shard(root / shards[split][-1], tokens)
    meta = DataMeta(
        tokenizer=tokenizer,
        tokenizer_file="tokenizer.json" if tokenizer == "bpe" else None,
        vocab_size=vocab_size,
        eot_token=0,
        train_shards=shards["train"],
        val_shards=shards["val"],
        train_tokens=sum(len(t) for t in train),
        val_tokens=sum(len(t) for t in val),
        source=source,
    )
    meta.save(root)
    return meta


def fake_gpt2():
    """A real tiktoken Encoding with GPT-2's split pattern: the 256 bytes, the merges "th", "he",
    "the" (258) and "in", then ``<|endoftext|>`` (260; vocabulary 261)."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"th": 256, b"he": 257, b"the": 258, b"in": 259})
    return tiktoken.Encoding(
        name="fake-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 260}
    )


# -- a tiny run of real text, trained by `dpls train` in a few seconds -------------------------------

DOCS = [
    "the cat sat on the mat and looked at the dog.",
    "a dog ran in the park; the cat did not.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "héllo wörld: naïve café, ünïcode bytes ✓",
]


def make_text_data(root: Path) -> Path:
    """A data directory of real text: a byte-level BPE (vocabulary ~300) and its shards."""
    from dpls.data.tokenizer import train_bpe

    tok = train_bpe(DOCS * 20, vocab_size=300)
    rng = np.random.default_rng(0)
    stream = [t for i in rng.integers(0, len(DOCS), 600) for t in [tok.eot, *tok.encode(DOCS[i])]]
    tokens = np.array(stream, dtype=np.int64)
    split = len(tokens) * 9 // 10
    write_data_dir(root, [tokens[:split]], [tokens[split:]], vocab_size=tok.vocab_size)
    assert tok.eot == 0  # write_data_dir's meta says so
    tok.save(root / "tokenizer.json")
    return root


def train_tiny_run(data: Path, out: Path, steps: int = 8, **extra: object) -> Path:
    """A few steps of `dpls train` on ``data``: a run directory with a checkpoint and tokenizer."""
    values: dict[str, object] = {
        "data_dir": data,
        "out_dir": out,
        "model": "tiny",
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "block_size": 64,
        "batch_size": 4,
        "max_iters": steps,
        "learning_rate": 1e-2,
        "warmup_iters": 1,
        "eval_interval": steps,
        "eval_tokens": 256,
        "log_interval": steps,
        "checkpoint_interval": steps,
        "device": "cpu",
        "dtype": "float32",
        "progress": False,
        **extra,
    }
    from dpls.cli import main

    assert main(["train", *(f"--{k}={v}" for k, v in values.items())]) == 0
    return out
