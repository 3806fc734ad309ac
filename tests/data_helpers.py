"""Test data made without running `prepare`: data directories from token arrays, and a tiny
offline tiktoken encoding (GPT-2's own downloads its merges)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpls.data import DataMeta, write_shard
from dpls.data.shards import token_dtype
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
    """A prepared data directory: one ``{split}_{i:06d}.bin`` shard per array (uint16, or uint32
    for a vocabulary over 65,536), and meta.json (a "bpe" one names tokenizer.json, which
    callers write only if their test reads it)."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    shards: dict[str, list[str]] = {"train": [], "val": []}
    for split, arrays in (("train", train), ("val", val)):
        for i, tokens in enumerate(arrays):
            shards[split].append(f"{split}_{i:06d}.bin")
            write_shard(root / shards[split][-1], tokens, dtype)
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
        token_dtype=dtype,
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


def large_vocab_tokenizer(path: Path, size: int = 70_000) -> Path:
    """A Hugging Face ``tokenizer.json`` of ``size`` > 65,536 entries, built offline: a WordLevel
    model over the words ``w1 ... w{size-2}`` (whitespace-split; ``[UNK]`` is 0) with
    ``<|endoftext|>`` as its last id, so the separator itself needs uint32."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size - 1)}, EOT: size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    tok.save(str(path))
    return path


def large_vocab_documents(count: int, seed: int = 0, size: int = 70_000) -> list[str]:
    """Documents of the `large_vocab_tokenizer` words, most of them past id 65,535: each word is
    a noisy function of the previous one, so a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        word, words = int(rng.integers(65_000, size - 1)), []
        for _ in range(int(rng.integers(20, 60))):
            words.append(f"w{word}")
            word = int(rng.integers(1, size - 1)) if rng.random() < 0.2 else 65_000 + (word * 7 + 3) % 4_000
        docs.append(" ".join(words))
    return docs


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
