"""Tokenizers: a Hugging Face ``tokenizer.json`` (a byte-level BPE trained here, or any given one
by name or path) or GPT-2's (tiktoken).

Both sit behind one small interface (``encode``, ``encode_batch``, ``decode``, ``eot``,
``vocab_size``), and ``load_tokenizer(path)`` finds the right one from a data, run or
checkpoint directory through its ``meta.json``. Byte-level BPE never fails to encode and
round-trips every string exactly; the end-of-text token (``eot``: ``<|endoftext|>``, or the
given tokenizer's own, see `EOT_CANDIDATES`) separates documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dpls.data.meta import META_FILE, DataError, DataMeta
from dpls.data.shards import MAX_VOCAB

EOT = "<|endoftext|>"
# The document separator of a tokenizer.json: the first of these it has. GPT-2, Qwen and the
# BPEs trained here have <|endoftext|>; LLaMA-3 <|end_of_text|>; Gemma <eos>; LLaMA-2, Mistral </s>.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "<eos>", "</s>")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Text ↔ token ids. ``kind`` is what ``meta.json`` calls it (``"bpe"`` or ``"gpt2"``)."""

    kind: str
    eot: int
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without adding any special token."""

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """``encode`` of each text; implementations run it in parallel native threads."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens written out)."""

    @abstractmethod
    def _identity(self) -> Any:
        """JSON-able data that decides which ids a text gets (vocabulary, merges, specials)."""

    def byte_lengths(self) -> tuple[list[int], bool]:
        """How many bytes of text each id stands for (0 for ``<|endoftext|>``, which is no text), and
        whether that is exact: the UTF-8 bytes of any text are then the sum over its tokens (the
        denominator of bits per byte). Byte-level BPEs are exact; this default, the UTF-8 length of
        each id decoded alone, is not where a decoder drops, adds or merges characters (a
        SentencePiece word-start marker, a character split over byte-fallback tokens)."""
        lengths = [len(self.decode([i]).encode("utf-8")) for i in range(self.vocab_size)]
        lengths[self.eot] = 0
        return lengths, False

    def fingerprint(self) -> str:
        """A hash of the vocabulary and merge rules: two tokenizers with the same fingerprint
        give every text the same ids. The vocabulary size alone cannot tell two BPEs apart."""
        return tokenizer_fingerprint(self)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """``tokenizer.fingerprint()``: 32 hex digits of BLAKE2b over its canonical JSON identity
    (not over ``tokenizer.json``'s bytes, whose layout changes between library versions)."""
    canon = json.dumps([tokenizer.kind, tokenizer._identity()], ensure_ascii=True, separators=(",", ":"))
    return hashlib.blake2b(canon.encode("ascii"), digest_size=16).hexdigest()


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``): the byte-level BPE trained
    here, or any other (``kind`` stays ``"bpe"``: what ``meta.json`` calls a tokenizer.json)."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        # ordinary encoding, as tiktoken's encode_ordinary: a literal "<|endoftext|>" inside a
        # document is text, never the separator (a runtime switch, not saved in tokenizer.json)
        tokenizer.encode_special_tokens = True
        eot = next((i for name in EOT_CANDIDATES if (i := tokenizer.token_to_id(name)) is not None), None)
        if eot is None:
            raise DataError(
                f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_CANDIDATES)}; "
                "dpls separates documents with one"
            )
        self.eot = int(eot)
        # ids may have gaps (added tokens placed past the base vocabulary): the largest id + 1
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"tokenizer file {str(path)!r} cannot be read: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            self._tok.save(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        # Rust threads (rayon, sized by RAYON_NUM_THREADS); the fast path skips offsets.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def byte_lengths(self) -> tuple[list[int], bool]:
        """Exact for a byte-level BPE (ByteLevel decoder): each vocabulary string spells its bytes,
        one character of the byte alphabet per byte. Other tokenizers (SentencePiece-style ones):
        each id decoded alone, not exact. Special tokens have none either way."""
        byte_level = (json.loads(self._tok.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        if byte_level:
            from tokenizers.pre_tokenizers import ByteLevel

            alphabet = frozenset(ByteLevel.alphabet())  # 256 characters, one per byte
            lengths = [0] * self.vocab_size
            for token, i in self._tok.get_vocab(with_added_tokens=False).items():
                spelt = all(c in alphabet for c in token)
                lengths[i] = len(token) if spelt else len(token.encode("utf-8"))
        else:
            lengths = super().byte_lengths()[0]
        for i, added in self._tok.get_added_tokens_decoder().items():
            lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
        return lengths, byte_level

    def _identity(self) -> Any:
        model = json.loads(self._tok.to_str())
        added = sorted((t["id"], t["content"]) for t in model.get("added_tokens") or [])
        if "merges" not in model["model"]:  # WordLevel, WordPiece, Unigram: the whole model section
            return {"model": model["model"], "added": added}
        vocab = sorted(model["model"]["vocab"].items(), key=lambda kv: kv[1])
        # merges are ["a", "b"] pairs in tokenizers >= 0.20, "a b" strings before
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
        return {"vocab": vocab, "merges": merges, "added": added}


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken. ``encoding`` may be any ``tiktoken.Encoding`` (tests pass
    a small local one: ``tiktoken.get_encoding("gpt2")`` downloads its merges on first use)."""

    kind = "gpt2"

    def __init__(self, encoding: Any = None) -> None:
        if encoding is None:
            import tiktoken

            try:
                encoding = tiktoken.get_encoding("gpt2")
            except Exception as err:  # tiktoken downloads the merges on first use
                raise DataError(
                    f"cannot load GPT-2's BPE through tiktoken (it is downloaded on first use, then cached): "
                    f"{type(err).__name__}: {err}"
                ) from None
        self.encoding = encoding
        self.eot = int(encoding.eot_token)
        self.vocab_size = int(encoding.n_vocab)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(
            list(texts), num_threads=num_threads or os.cpu_count() or 1
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def byte_lengths(self) -> tuple[list[int], bool]:
        """Exact: tiktoken keeps each id's bytes; special tokens (``<|endoftext|>``) have none."""
        enc = self.encoding
        special = {enc.encode_single_token(name) for name in enc.special_tokens_set}
        lengths = [0 if i in special else len(_token_hex(enc, i) or "") // 2 for i in range(self.vocab_size)]
        return lengths, True

    def _identity(self) -> Any:
        enc = self.encoding
        tokens = [_token_hex(enc, i) for i in range(self.vocab_size)]
        return {"pattern": getattr(enc, "_pat_str", ""), "tokens": tokens, "eot": self.eot}


def _token_hex(encoding: Any, token: int) -> str | None:
    try:
        return encoding.decode_single_token_bytes(token).hex()
    except KeyError:  # an id the encoding leaves unused
        return None


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, length: int | None = None) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation, all 256 bytes in the base alphabet,
    ``<|endoftext|>`` special) on ``texts``. The vocabulary may come out smaller than asked on
    a small corpus; ``vocab_size`` of the result is the real one."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [257, {MAX_VOCAB}] (256 bytes + {EOT}), got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return BPETokenizer(tok)


def hf_tokenizer(name_or_path: str | Path) -> BPETokenizer:
    """Any Hugging Face tokenizer: a ``tokenizer.json`` file, a directory holding one, or a
    Hub repository name (``meta-llama/Meta-Llama-3-8B``; downloaded once into the Hugging
    Face cache, which ``HF_HUB_OFFLINE=1`` keeps to)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(name_or_path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer directory {str(path.parent)!r} has no {TOKENIZER_FILE}")
    if path.is_file():
        return BPETokenizer.from_file(path)
    if path.suffix == ".json" or path.is_absolute() or str(name_or_path).startswith("."):
        raise DataError(f"tokenizer file {str(name_or_path)!r} does not exist")
    try:
        return BPETokenizer(HFTokenizer.from_pretrained(str(name_or_path)))
    except Exception as err:  # network, unknown or gated repository, no tokenizer.json in it
        raise DataError(
            f"cannot load the tokenizer {str(name_or_path)!r} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); give a local tokenizer.json or a directory holding one"
        ) from None


# meta.json "tokenizer" -> how to build it from (meta, the directory holding meta.json, encoding)
TOKENIZER_BUILDERS: dict[str, Callable[[DataMeta, Path, Any], Tokenizer]] = {
    "bpe": lambda meta, root, _enc: BPETokenizer.from_file(root / str(meta.tokenizer_file)),
    "gpt2": lambda _meta, _root, enc: TiktokenTokenizer(enc),
}


def tokenizer_from_meta(meta: DataMeta, root: str | Path, *, encoding: Any = None) -> Tokenizer:
    """The tokenizer ``meta`` (read from directory ``root``) names, checked against it."""
    tok = TOKENIZER_BUILDERS[meta.tokenizer](meta, Path(root), encoding)
    if tok.eot != meta.eot_token or tok.vocab_size != meta.vocab_size:
        raise DataError(
            f"the tokenizer in {str(root)!r} does not match its {META_FILE}: eot {tok.eot} / vocab {tok.vocab_size}, "
            f"expected eot {meta.eot_token} / vocab {meta.vocab_size}"
        )
    return tok


def find_meta_dir(path: str | Path, levels: int = 3) -> Path:
    """The directory whose ``meta.json`` describes ``path``'s tokens: ``path`` itself, its
    ``tokenizer/`` folder (where the trainer copies it into a run), then the same for up to
    ``levels`` parents (a checkpoint sits in ``RUN/checkpoints/``)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    places = [path, *list(path.resolve().parents)[:levels]]
    for place in places:
        for candidate in (place, place / "tokenizer"):
            if (candidate / META_FILE).is_file():
                return candidate
    raise DataError(
        f"no {META_FILE} found for {str(path)!r} (looked in it, its tokenizer/ folder and {levels} parents): "
        "pass a data directory, a run directory or a checkpoint"
    )


def load_tokenizer(path: str | Path, *, encoding: Any = None) -> Tokenizer:
    """The tokenizer of a data directory, run directory or checkpoint (or a ``tokenizer.json``);
    `dpls.runs.load_tokenizer` also follows a run's config.toml to its data directory.

    ``encoding`` replaces tiktoken's GPT-2 encoding for ``"gpt2"`` data (offline use, tests).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".json" and path.name != META_FILE:
        return BPETokenizer.from_file(path)
    root = find_meta_dir(path)
    return tokenizer_from_meta(DataMeta.load(root, check_shards=False), root, encoding=encoding)
