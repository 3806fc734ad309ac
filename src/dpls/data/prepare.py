"""Corpora → tokenizer → token shards (uint16, or uint32 for a vocabulary over 65,536) + ``meta.json``.

Three sources share one pipeline:

- ``prepare_stdlib``: the running Python's standard-library ``.py`` files (no site-packages,
  no test suites, no machine-specific build files), so the same Python version gives the same
  corpus anywhere; a byte-level BPE is trained on a bounded sample of the training files.
- ``prepare_files``: the user's ``.txt`` / ``.jsonl`` / ``.parquet`` files.
- ``prepare_fineweb_edu``: FineWeb-Edu streamed through ``datasets``, GPT-2 BPE (tiktoken).

Both of the last two also take any Hugging Face tokenizer (a ``tokenizer.json``, a folder
holding one, or a Hub name); it is copied into the data directory.

Every document is preceded by ``<|endoftext|>`` (as in llm.c). The validation split is held
out by *document* (a hash of its key and the seed), so no file leaks into both splits.
Encoding runs in batches on the tokenizers' native threads. Shards are cut at exactly
``shard_tokens``; the tokens after the last cut wait in a staging file, so an interrupted run
resumes where its last checkpoint left it (``progress.json``) and writes the same shards as
an uninterrupted one. ``meta.json`` is written last: its presence means "finished".
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpls._io import LOCK_FILE, check_writable_dir, one_writer, write_json_atomic
from dpls.data.meta import META_FILE, DataError, DataMeta, corpus_fingerprint
from dpls.data.shards import MAX_VOCAB, token_dtype, write_shard
from dpls.data.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    TiktokenTokenizer,
    Tokenizer,
    hf_tokenizer,
    train_bpe,
)

PROGRESS_FILE = "progress.json"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
ENCODE_BATCH_CHARS = 4_000_000  # text per encode_batch call: big enough to keep every thread busy
CHECKPOINT_SECONDS = 60.0


@dataclass(frozen=True)
class Document:
    key: str  # stable name, hashed for the train/val split
    text: str


# -- validation and the output directory --------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


# Training windows do not cross shards: a shard shorter than a window is useless, and tiny
# shards only make thousands of files (--shard-tokens 1: one file per token).
MIN_SHARD_TOKENS = 512


def _check_split(val_fraction: Any, shard_tokens: Any, seed: Any) -> None:
    """The arguments every source takes: how documents are split and shards cut."""
    if not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    _check_int("shard_tokens", shard_tokens, MIN_SHARD_TOKENS)
    _check_int("seed", seed, 0)


def _normalize(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings))  # tuples -> lists, as they come back from JSON


def _out_dir_state(out_dir: Path, settings: dict[str, Any]) -> str:
    """``"fresh"``, ``"resume"`` (our interrupted run, same settings) or ``"done"`` (finished,
    same settings); anything else is refused before a byte is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} exists and is not a directory")
    check_writable_dir(out_dir, "out")  # another user's folder: said now, not as a traceback later
    if not out_dir.exists():
        return "fresh"
    if not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} exists and is not a directory")
    if not any(p.name != LOCK_FILE for p in out_dir.iterdir()):  # the lock is our own, held now
        return "fresh"
    for name, state in ((META_FILE, "done"), (PROGRESS_FILE, "resume")):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = {}
        theirs = raw.get("settings") if isinstance(raw, dict) else None
        if theirs == settings:
            if state == "done":
                DataMeta.load(out_dir)  # finished and intact, or a clear error naming what is not
            return state
        if isinstance(theirs, dict):
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
            raise ValueError(
                f"output directory {str(out_dir)!r} holds data prepared with other settings "
                f"(differing: {', '.join(diff)}); choose an empty directory or remove it"
            )
    raise ValueError(
        f"output directory {str(out_dir)!r} is not empty and is not a dpls data directory; "
        "choose an empty (or new) directory"
    )


# -- the train/val split ------------------------------------------------------------------------


def _unit_hash(key: str, seed: int, purpose: str = "val") -> float:
    """A uniform number in [0, 1) from ``key``; ``purpose`` keeps the draws for different
    decisions (validation split, file sample, BPE sample) independent of one another."""
    digest = hashlib.blake2b(f"{purpose}\0{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_validation(keys: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The keys held out for validation: those whose hash falls below ``val_fraction``, and
    never none or all of them (the lowest hash is always held out, the highest never)."""
    if len(keys) < 2:
        raise ValueError(f"need at least 2 documents to hold one out for validation, got {len(keys)}")
    ranked = sorted(keys, key=lambda k: _unit_hash(k, seed))
    held = {k for k in ranked if _unit_hash(k, seed) < val_fraction}
    held.add(ranked[0])
    held.discard(ranked[-1])
    return held


# -- shard writing with resume ------------------------------------------------------------------


class _SplitWriter:
    """One split's shards: exact ``shard_tokens`` cuts, remainder staged on disk at checkpoints.
    Tokens are kept, staged and written as ``dtype`` (the vocabulary's `token_dtype`)."""

    def __init__(
        self, out_dir: Path, split: str, shard_tokens: int, state: dict[str, Any] | None, dtype: str
    ) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype, self._stored = dtype, np.dtype(dtype).newbyteorder("<")
        self.shards: list[str] = list(state["shards"]) if state else []
        self.shard_tokens_total = int(state["tokens"]) if state else 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._unstaged: list[np.ndarray] = []  # added since the last checkpoint
        self._staged_for = len(self.shards)  # staging file index the disk copy belongs to
        staged = int(state["staged"]) if state else 0
        path = self._staging_path(len(self.shards))
        if staged:
            have = path.stat().st_size // self._stored.itemsize if path.is_file() else 0
            if have < staged:
                raise DataError(
                    f"cannot resume {str(out_dir)!r}: staging file {path.name} is missing or short"
                )
            self._buffer, self._buffered = [np.fromfile(path, dtype=self._stored, count=staged)], staged
        if path.is_file():  # drop anything an interrupted run appended after its last checkpoint
            with open(path, "r+b") as f:
                f.truncate(self._stored.itemsize * staged)

    @property
    def tokens(self) -> int:
        return self.shard_tokens_total + self._buffered

    def _staging_path(self, index: int) -> Path:
        return self.out_dir / f".{self.split}.staging-{index:06d}"

    def add(self, ids: np.ndarray) -> None:
        self._buffer.append(ids)
        self._unstaged.append(ids)
        self._buffered += len(ids)
        while self._buffered >= self.shard_tokens:
            flat = np.concatenate(self._buffer)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self._buffer, self._buffered = [rest], len(rest)

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, tokens, self.dtype)
        self.shards.append(name)
        self.shard_tokens_total += len(tokens)

    def checkpoint(self) -> dict[str, Any]:
        """Make the staged remainder durable; returns this split's part of ``progress.json``."""
        path = self._staging_path(len(self.shards))
        if self._staged_for != len(self.shards):  # a cut since the last checkpoint: new file
            flat = np.concatenate(self._buffer) if self._buffer else np.zeros(0, self._stored)
            flat.astype(self._stored).tofile(path)
            self._staged_for = len(self.shards)
        elif self._unstaged:
            with open(path, "ab") as f:
                np.concatenate(self._unstaged).astype(self._stored).tofile(f)
        self._unstaged = []
        return {"shards": self.shards, "tokens": self.shard_tokens_total, "staged": self._buffered}

    def finish(self) -> None:
        if self._buffered:
            self._write(np.concatenate(self._buffer))
        self._buffer, self._buffered, self._unstaged = [], 0, []

    def remove_staging(self, keep_current: bool = False) -> None:
        """Delete staging files; ``keep_current`` keeps the one the last checkpoint points to."""
        current = self._staging_path(len(self.shards)).name
        for path in self.out_dir.glob(f".{self.split}.staging-*"):
            if not (keep_current and path.name == current):
                path.unlink(missing_ok=True)


class _Progress:
    """Both splits' writers and how many documents of the stream they hold: the state
    ``progress.json`` commits (`checkpoint`), so an interrupted run resumes where it left off."""

    def __init__(self, out_dir: Path, settings: dict[str, Any], dtype: str) -> None:
        saved: dict[str, Any] = {}
        if (out_dir / PROGRESS_FILE).is_file():
            saved = json.loads((out_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
        self.out_dir, self.settings, self.dtype = out_dir, settings, dtype  # dtype: the shards' tokens
        shard_tokens = settings["shard_tokens"]
        self.writers = {
            s: _SplitWriter(out_dir, s, shard_tokens, saved.get(s), dtype) for s in ("train", "val")
        }
        self.consumed = int(saved.get("documents", 0))

    @property
    def tokens(self) -> int:
        return self.writers["train"].tokens + self.writers["val"].tokens

    @property
    def shards(self) -> int:
        return sum(len(w.shards) for w in self.writers.values())

    def reached(self, max_tokens: int | None, max_train_tokens: int | None) -> bool:
        return (max_tokens is not None and self.tokens >= max_tokens) or (
            max_train_tokens is not None and self.writers["train"].tokens >= max_train_tokens
        )

    def checkpoint(self) -> None:
        state = {"settings": self.settings, "documents": self.consumed}
        state.update({s: w.checkpoint() for s, w in self.writers.items()})
        write_json_atomic(self.out_dir / PROGRESS_FILE, state)  # the commit point
        for writer in self.writers.values():
            writer.remove_staging(keep_current=True)  # older ones are now in shards


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=None if enabled else True,  # None: no bar when stderr is not a terminal
        dynamic_ncols=True,
    )


def _batched(docs: Iterator[Document], max_chars: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _build(
    out_dir: Path,
    documents: Callable[[int], Iterator[Document]],
    is_val: Callable[[int, Document], bool],
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    *,
    progress: bool,
    max_tokens: int | None = None,
    max_train_tokens: int | None = None,
    num_threads: int | None = None,
    desc: str | None = None,
) -> DataMeta:
    """Encode ``documents(start)`` (the stream from document ``start`` on) into both splits.

    ``max_train_tokens`` cuts the training split there and stops: the caller puts every
    validation document first, so the validation split is whole.

    The source and shard size come from ``settings`` (what ``meta.json`` records), and a BPE
    tokenizer is the one saved as ``TOKENIZER_FILE``, so the three sources cannot disagree
    with their own metadata.
    """
    dtype = token_dtype(tokenizer.vocab_size)  # uint16 where it fits (llm.c's GPT-2 layout)
    state = _Progress(out_dir, settings, dtype)
    bar = _progress_bar(max_tokens, state.tokens, desc or settings["source"], progress)
    try:
        if not state.reached(max_tokens, max_train_tokens):
            _encode(state, documents, is_val, tokenizer, bar, max_tokens, max_train_tokens, num_threads)
    finally:
        bar.close()
    return _finish(state, tokenizer)


def _encode(
    state: _Progress,
    documents: Callable[[int], Iterator[Document]],
    is_val: Callable[[int, Document], bool],
    tokenizer: Tokenizer,
    bar: tqdm,
    max_tokens: int | None,
    max_train_tokens: int | None,
    num_threads: int | None,
) -> None:
    """Encode and write documents until the stream or a limit ends; a checkpoint after every
    shard cut and at least every `CHECKPOINT_SECONDS`."""
    eot = np.array([tokenizer.eot], dtype=state.dtype)
    writers = state.writers
    last_checkpoint = time.monotonic()
    for batch in _batched(documents(state.consumed), ENCODE_BATCH_CHARS):
        encoded = tokenizer.encode_batch([d.text for d in batch], num_threads=num_threads)
        shards_before = state.shards
        for doc, ids in zip(batch, encoded):
            tokens = np.concatenate([eot, np.asarray(ids, dtype=state.dtype)])
            if max_tokens is not None:
                tokens = tokens[: max_tokens - state.tokens]
            split = "val" if is_val(state.consumed, doc) else "train"
            if split == "train" and max_train_tokens is not None:
                tokens = tokens[: max_train_tokens - writers["train"].tokens]
            writers[split].add(tokens)
            state.consumed += 1
            bar.update(len(tokens))
            if state.reached(max_tokens, max_train_tokens):
                return
        if state.shards != shards_before or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
            state.checkpoint()
            last_checkpoint = time.monotonic()


def _finish(state: _Progress, tokenizer: Tokenizer) -> DataMeta:
    """Write the last shards and ``meta.json`` (its presence means "finished"), then tidy up."""
    out_dir, writers, settings = state.out_dir, state.writers, state.settings
    for split, writer in writers.items():
        if writer.tokens == 0:
            raise DataError(
                f"no document went to the {split} split of {str(out_dir)!r}; "
                "use more data (max_tokens) or another val_fraction"
            )
        writer.finish()
    meta = DataMeta(
        tokenizer=tokenizer.kind,
        tokenizer_file=TOKENIZER_FILE if tokenizer.kind == "bpe" else None,
        vocab_size=tokenizer.vocab_size,
        eot_token=tokenizer.eot,
        train_shards=writers["train"].shards,
        val_shards=writers["val"].shards,
        train_tokens=writers["train"].tokens,
        val_tokens=writers["val"].tokens,
        source=settings["source"],
        settings=settings,
        tokenizer_fingerprint=(fingerprint := tokenizer.fingerprint()),
        token_dtype=state.dtype,
    )
    meta.corpus_fingerprint = corpus_fingerprint(out_dir, meta, fingerprint)
    meta.save(out_dir)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    for writer in writers.values():
        writer.remove_staging()
    for tmp in out_dir.glob(".*.tmp-*"):  # temporaries of a run killed mid-write
        tmp.unlink(missing_ok=True)
    return meta


def _begin(out_dir: Path, state: str, settings: dict[str, Any]) -> None:
    """Create the output directory and mark it as ours at once, so even a run interrupted
    before its first checkpoint is recognised (and resumed) rather than refused."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state == "fresh":
            write_json_atomic(out_dir / PROGRESS_FILE, {"settings": settings, "documents": 0})
    except OSError as err:  # read-only, a file in the path, no such mount: nothing written yet
        raise DataError(f"cannot write the output directory {str(out_dir)!r}: {err.strerror}") from None


def _bpe_tokenizer(
    out_dir: Path, state: str, train_texts: Callable[[], Iterable[str]], vocab_size: int, progress: bool
) -> Tokenizer:
    """Train the BPE (or, resuming, reuse the one the interrupted run saved)."""
    path = out_dir / TOKENIZER_FILE
    if state == "resume" and path.is_file():
        return BPETokenizer.from_file(path)
    start = time.perf_counter()
    tok = train_bpe(train_texts(), vocab_size)
    if progress:
        print(f"trained a {tok.vocab_size}-token byte-level BPE in {time.perf_counter() - start:.1f} s")
    tok.save(path)
    return tok


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Texts until ``max_chars`` characters have been given (the last one cut): BPE training
    time grows with its input, and a few MB already fix the frequent merges."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def _given_tokenizer(name: str, encoding: Any) -> tuple[Tokenizer, dict[str, Any]]:
    """``"gpt2"`` (tiktoken; ``encoding`` replaces it offline) or any Hugging Face tokenizer by
    path or Hub name, and what ``settings`` records of it (a path resolved; a Hugging Face
    one's fingerprint, so that resuming with another file behind the same name is refused)."""
    if name == "gpt2":
        gpt2 = TiktokenTokenizer(encoding)
        return gpt2, {"encoding": getattr(gpt2.encoding, "name", "gpt2")}
    if not isinstance(name, str | Path) or not str(name):
        raise ValueError(
            f"tokenizer must be 'bpe', 'gpt2' or a Hugging Face tokenizer name or path, got {name!r}"
        )
    given = str(Path(name).resolve()) if Path(name).exists() else str(name)
    tok = hf_tokenizer(given)
    return tok, {"tokenizer": given, "encoding": None, "tokenizer_fingerprint": tok.fingerprint()}


def _save_tokenizer(out_dir: Path, tok: Tokenizer) -> None:
    """A given Hugging Face tokenizer goes into the data directory, as a trained one does."""
    if isinstance(tok, BPETokenizer):
        tok.save(out_dir / TOKENIZER_FILE)


def _finished(out_dir: Path, progress: bool) -> DataMeta:
    if progress:
        print(f"{out_dir} is already prepared with these settings; nothing to do")
    return DataMeta.load(out_dir)


# -- the standard library -----------------------------------------------------------------------


def stdlib_files(*, include_tests: bool = False, root: str | Path | None = None) -> tuple[Path, list[str]]:
    """The standard library's root and its ``.py`` files (relative POSIX paths, sorted).

    Left out: third-party packages (site-/dist-packages), byte-code caches, the
    build-specific ``_sysconfigdata*`` and ``config-*`` files (they differ per machine), and
    unless ``include_tests`` the test suites (some distributions do not ship them).
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"the standard library directory {str(base)!r} does not exist")
    skip_dirs = STDLIB_EXCLUDED_DIRS | (frozenset() if include_tests else STDLIB_TEST_DIRS)
    files = []
    for path in base.rglob("*.py"):
        parts = path.relative_to(base).parts
        if skip_dirs.intersection(parts[:-1]) or any(p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata") or not path.is_file():
            continue
        files.append(path.relative_to(base).as_posix())
    return base, sorted(files)


@one_writer("out_dir", "data directory")  # two would interleave their shards and meta.json
def prepare_stdlib(
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    shard_tokens: int = 1_000_000,
    seed: int = 0,
    max_files: int | None = None,
    max_train_tokens: int | None = None,
    include_tests: bool = False,
    max_bpe_chars: int = 4_000_000,
    progress: bool = True,
) -> DataMeta:
    """The embedded default corpus: this Python's standard library, tokenized.

    ``max_files`` keeps a fixed sample of that many files (the lowest hashes: spread over the
    whole library), for tests and quick trials; it shrinks both splits. ``max_train_tokens``
    shrinks only the training split, for data-limited studies: training files are taken in
    hash order (spread over the library) until that many tokens, while the tokenizer and the
    validation split stay exactly those of the corpus without the limit. The BPE is trained
    on at most ``max_bpe_chars`` characters of training files (about 2 s for 4 MB on two cores).
    """
    _check_int("vocab_size", vocab_size, 257, MAX_VOCAB)
    _check_split(val_fraction, shard_tokens, seed)
    _check_int("max_bpe_chars", max_bpe_chars, 1)
    if max_files is not None:
        _check_int("max_files", max_files, 2)
    if max_train_tokens is not None:
        _check_int("max_train_tokens", max_train_tokens, 1)
    out_dir = Path(out_dir)
    root, files = stdlib_files(include_tests=include_tests)
    if max_files is not None:
        files = sorted(sorted(files, key=lambda f: _unit_hash(f, seed, "sample"))[:max_files])
    settings = _normalize(
        {
            "source": "stdlib",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "files": len(files),
            "include_tests": include_tests,
            "tokenizer": "bpe",
            "vocab_size": vocab_size,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "seed": seed,
            "max_bpe_chars": max_bpe_chars,
            "max_train_tokens": max_train_tokens,
        }
    )
    state = _out_dir_state(out_dir, settings)
    if state == "done":
        return _finished(out_dir, progress)
    held = assign_validation(files, val_fraction, seed)
    order = files
    if max_train_tokens is not None:  # validation whole and first, then a spread-out training slice
        train = sorted((f for f in files if f not in held), key=lambda f: _unit_hash(f, seed, "train"))
        order = [f for f in files if f in held] + train

    def read(rel: str) -> str:
        return (root / rel).read_text(encoding="utf-8", errors="replace")

    def train_texts() -> Iterator[str]:  # a spread-out sample: training files in hash order
        ordered = sorted((f for f in files if f not in held), key=lambda f: _unit_hash(f, seed, "bpe"))
        return _take_chars(map(read, ordered), max_bpe_chars)

    def documents(start: int) -> Iterator[Document]:
        return (Document(rel, read(rel)) for rel in order[start:])

    _begin(out_dir, state, settings)
    tokenizer = _bpe_tokenizer(out_dir, state, train_texts, vocab_size, progress)
    return _build(
        out_dir,
        documents,
        lambda _i, doc: doc.key in held,
        tokenizer,
        settings,
        progress=progress,
        max_train_tokens=max_train_tokens,
    )


# -- the user's files ---------------------------------------------------------------------------


def _expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise ValueError("give at least one input file or directory")
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inner = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
            if not inner:
                raise ValueError(f"directory {str(path)!r} has no {'/'.join(FILE_SUFFIXES)} files")
            found.extend(inner)
        elif path.is_file():
            if path.suffix not in FILE_SUFFIXES:
                raise ValueError(f"{str(path)!r}: unsupported file type; use {', '.join(FILE_SUFFIXES)}")
            found.append(path)
        else:
            raise ValueError(f"input {str(path)!r} does not exist")
    seen: dict[Path, Path] = {}
    for path in found:  # the same text twice could land in both splits: validation on training data
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            raise ValueError(
                f"input {str(path)!r} is given twice (also as {str(first)!r}); give each file once"
            )
    return found


def _read_file(path: Path, text_field: str, text_encoding: str = "utf-8") -> Iterator[str]:
    """The documents of one file, a decoding error naming the file (a bare codec or Arrow
    message would not say which of many inputs is bad)."""
    import pyarrow as pa

    try:
        for doc in _file_documents(path, text_field, text_encoding):
            _check_is_text(path, doc)
            yield doc
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not {'UTF-8' if text_encoding.lower() in ('utf-8', 'utf8') else text_encoding} text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "if it is text in another encoding, pass it with --encoding (e.g. --encoding latin-1)"
        ) from None
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


BINARY_SHARE = 0.01  # control characters (other than whitespace) above this share: not text


def _check_is_text(path: Path, doc: str) -> None:
    """A document of random bytes decodes under a single-byte encoding but is no text."""
    sample = doc[:65536]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f\v") + sample.count("\x7f")
    if "\x00" in sample or controls > BINARY_SHARE * len(sample):
        raise DataError(
            f"{path}: looks like binary data, not text ({controls} control characters in its first "
            f"{len(sample)}); remove it from the inputs"
        )


def _file_documents(path: Path, text_field: str, text_encoding: str = "utf-8") -> Iterator[str]:
    """A ``.txt`` is one document, or several separated by ``<|endoftext|>`` (the TinyStories
    convention); ``.jsonl`` one per line; ``.parquet`` one per row."""
    if path.suffix == ".txt":
        raw = path.read_bytes()
        try:
            text = raw.decode(text_encoding)  # strict: a wrong encoding is an error, not U+FFFD
        except UnicodeDecodeError:
            _check_is_text(path, raw[:65536].decode("latin-1"))  # random bytes: say so, not "encoding"
            raise
        parts = [p.strip("\n") for p in text.split("<|endoftext|>")]
        yield from (p for p in parts if p.strip())
    elif path.suffix == ".jsonl":
        with open(path, encoding=text_encoding) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DataError(f"{path}:{lineno}: no string field {text_field!r}")
                yield row[text_field]
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)


@one_writer("out_dir", "data directory")  # two would interleave their shards and meta.json
def prepare_files(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    text_field: str = "text",
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    max_bpe_chars: int = 50_000_000,
    encoding: Any = None,
    progress: bool = True,
    text_encoding: str = "utf-8",
) -> DataMeta:
    """Shards from ``.txt``, ``.jsonl`` (field ``text_field``) and ``.parquet`` (column
    ``text_field``) files, or directories of them. ``tokenizer``: ``"bpe"`` (trained here on
    the training documents), ``"gpt2"`` (tiktoken; ``encoding`` replaces it offline), or any
    Hugging Face tokenizer: a ``tokenizer.json``, a directory holding one, or a Hub name.
    ``text_encoding``: of the text and JSONL files; a file that does not decode, or that is
    binary data, is an error naming it (never text with replacement characters)."""
    try:
        codecs.lookup(text_encoding)
    except (LookupError, TypeError):
        raise ValueError(
            f"text_encoding {text_encoding!r} is not a known text encoding (e.g. utf-8, latin-1)"
        ) from None
    _check_int("vocab_size", vocab_size, 257, MAX_VOCAB)
    _check_split(val_fraction, shard_tokens, seed)
    _check_int("max_bpe_chars", max_bpe_chars, 1)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    files = _expand_paths(paths)
    given, described = (None, {}) if tokenizer == "bpe" else _given_tokenizer(tokenizer, encoding)
    out_dir = Path(out_dir)
    resolved_out = out_dir.resolve()
    if any(resolved_out in f.resolve().parents for f in files):
        raise ValueError(f"the output directory {str(out_dir)!r} must not contain the input files")
    settings = _normalize(
        {
            "source": "files",
            "files": [[str(f.resolve()), f.stat().st_size] for f in files],
            "text_field": text_field,
            "tokenizer": tokenizer,
            "encoding": None,
            **described,
            "vocab_size": vocab_size if tokenizer == "bpe" else None,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "seed": seed,
            "max_bpe_chars": max_bpe_chars if tokenizer == "bpe" else None,
            **({"text_encoding": text_encoding} if text_encoding != "utf-8" else {}),
        }
    )
    state = _out_dir_state(out_dir, settings)
    if state == "done":
        return _finished(out_dir, progress)
    names = [f"{i}:{f.name}" for i, f in enumerate(files)]

    def documents(start: int) -> Iterator[Document]:
        docs = (
            Document(f"{name}#{j}", text)
            for name, path in zip(names, files)
            for j, text in enumerate(_read_file(path, text_field, text_encoding))
        )
        return itertools.islice(docs, start, None)

    keys = [d.key for d in documents(0)]  # one reading pass: the split needs every key
    held = assign_validation(keys, val_fraction, seed)
    _begin(out_dir, state, settings)
    if given is None:
        train = (d.text for d in documents(0) if d.key not in held)
        tok: Tokenizer = _bpe_tokenizer(
            out_dir, state, lambda: _take_chars(train, max_bpe_chars), vocab_size, progress
        )
    else:
        tok = given
        _save_tokenizer(out_dir, tok)
    return _build(out_dir, documents, lambda _i, doc: doc.key in held, tok, settings, progress=progress)


# -- FineWeb-Edu --------------------------------------------------------------------------------


def _open_fineweb(name: str, data_files: list[str] | None) -> Any:
    """The streaming dataset (Hub or local Parquet), with a ``text`` column checked."""
    from datasets import load_dataset

    try:
        if data_files is not None:
            ds = load_dataset("parquet", data_files=data_files, split="train", streaming=True)
        else:
            ds = load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
    except Exception as err:  # network, unknown config, unreadable files: all mean "cannot start"
        where = "the local files" if data_files is not None else f"HuggingFaceFW/fineweb-edu ({name!r})"
        raise DataError(f"cannot open {where}: {type(err).__name__}: {err}") from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and "text" not in columns:
        raise DataError(f"the dataset has no 'text' column (columns: {columns})")
    return ds


@one_writer("out_dir", "data directory")  # two would interleave their shards and meta.json
def prepare_fineweb_edu(
    out_dir: str | Path,
    *,
    name: str = "sample-10BT",
    max_tokens: int | None = None,
    num_proc: int | None = None,
    data_files: str | Sequence[str] | None = None,
    encoding: Any = None,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    progress: bool = True,
) -> DataMeta:
    """FineWeb-Edu (``HuggingFaceFW/fineweb-edu``, config ``name``) streamed, GPT-2 BPE.

    ``tokenizer``: ``"gpt2"`` (tiktoken; ``encoding`` replaces it offline) or any Hugging Face
    tokenizer by path or Hub name, as in `prepare_files`.
    ``data_files``: local Parquet files to read instead of the Hub (same columns). The first
    document always goes to validation, then about ``val_fraction`` of them by a hash of their
    ``id``. ``max_tokens`` stops after that many tokens (both splits together). ``num_proc``
    encoding threads (default: all cores). Interrupted runs resume from their last shard.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a FineWeb-Edu config such as 'sample-10BT', got {name!r}")
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 2)
    if num_proc is not None:
        _check_int("num_proc", num_proc, 1)
    _check_split(val_fraction, shard_tokens, seed)
    if isinstance(data_files, str | Path):
        data_files = [str(data_files)]
    if data_files is not None:
        data_files = [str(Path(f).resolve()) for f in data_files]
        missing = [f for f in data_files if not Path(f).is_file()]
        if not data_files or missing:
            raise ValueError(f"data_files: {missing[0] if missing else 'empty list'} is not a file")
    out_dir = Path(out_dir)
    if tokenizer == "bpe":
        raise ValueError("fineweb-edu takes a given tokenizer (gpt2 or a Hugging Face one), not 'bpe'")
    tok, described = _given_tokenizer(tokenizer, encoding)
    settings = _normalize(
        {
            "source": "fineweb-edu",
            "name": name,
            "data_files": data_files,
            **described,
            "max_tokens": max_tokens,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "seed": seed,
        }
    )
    state = _out_dir_state(out_dir, settings)
    if state == "done":
        return _finished(out_dir, progress)

    dataset = _open_fineweb(name, data_files)  # before anything is written: a bad name fails here

    def documents(start: int) -> Iterator[Document]:
        ds = dataset.skip(start) if start else dataset
        for i, row in enumerate(ds, start):
            yield Document(str(row.get("id") or i), row["text"])

    _begin(out_dir, state, settings)
    _save_tokenizer(out_dir, tok)
    return _build(
        out_dir,
        documents,
        lambda i, doc: i == 0 or _unit_hash(doc.key, seed) < val_fraction,
        tok,
        settings,
        progress=progress,
        max_tokens=max_tokens,
        num_threads=num_proc or os.cpu_count() or 1,
        desc=f"fineweb-edu {name}",
    )
