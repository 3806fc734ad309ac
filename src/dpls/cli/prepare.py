"""`dpls prepare {stdlib,files,fineweb-edu} --out DIR`: a corpus → tokenizer, token shards, meta.json."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dpls.cli import UsageError
from dpls.cli._common import usage_errors

EPILOG = (
    "An output directory must be new or empty, or hold an earlier prepare run with the same settings "
    "(finished: nothing is redone; interrupted: it resumes)."
)

HF_TOKENIZER_HELP = (
    "a tokenizer.json, a folder holding one, or a Hub name such as meta-llama/Meta-Llama-3-8B "
    "(downloaded once into the Hugging Face cache); copied into --out"
)

# source -> (function in dpls.data.prepare, the options only that source has)
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "stdlib": ("prepare_stdlib", ("vocab_size", "max_files", "max_train_tokens", "include_tests")),
    "files": ("prepare_files", ("paths", "tokenizer", "vocab_size", "text_field", "text_encoding")),
    "fineweb-edu": ("prepare_fineweb_edu", ("name", "max_tokens", "num_proc", "data_files", "tokenizer")),
}


def _source(
    sources: Any, name: str, help_text: str, description: str, *, shard_tokens: int, val_fraction: float
) -> argparse.ArgumentParser:
    """One source's parser with the options every source has (defaults differ by corpus size)."""
    parser = sources.add_parser(name, help=help_text, description=description, epilog=EPILOG)
    parser.add_argument("--out", required=True, help="output data directory")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=val_fraction,
        help="share of documents held out for validation (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=shard_tokens,
        help="tokens per shard, at least 512; training windows do not cross shards (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Tokenize a corpus into llm.c-layout token shards (uint16; uint32 for a vocabulary "
        "over 65,536) plus meta.json (and tokenizer.json).",
        epilog=EPILOG,
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")

    p = _source(
        sources,
        "stdlib",
        "the running Python's standard library (no download)",
        "The embedded corpus: this Python's standard-library .py files and a byte-level BPE "
        "trained on them. Its content differs between Python builds, so meta.json records its "
        "fingerprint (corpus_fingerprint).",
        shard_tokens=1_000_000,
        val_fraction=0.05,
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--max-files", type=int, default=None, help="use a fixed sample of N files")
    p.add_argument(
        "--max-train-tokens",
        type=int,
        default=None,
        help="keep only N training tokens (files spread over the library); validation is unchanged",
    )
    p.add_argument("--include-tests", action="store_true", help="include the test suites")

    p = _source(
        sources,
        "files",
        "your .txt, .jsonl or .parquet files",
        "Your own text: .txt (one document, or several separated by <|endoftext|>), .jsonl "
        "(one document per line) and .parquet (one per row) files, or directories of them.",
        shard_tokens=100_000_000,
        val_fraction=0.05,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="input files or directories")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="NAME_OR_PATH",
        help="bpe (train a byte-level BPE here, the default), gpt2 (GPT-2's, through tiktoken), or any "
        f"Hugging Face tokenizer: {HF_TOKENIZER_HELP}",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default: %(default)s)")
    p.add_argument(
        "--encoding",
        dest="text_encoding",
        default="utf-8",
        help="encoding of the .txt and .jsonl files (default: %(default)s); a file that does not decode "
        "or is binary data is an error naming it",
    )

    p = _source(
        sources,
        "fineweb-edu",
        "FineWeb-Edu through Hugging Face datasets, GPT-2 BPE",
        "FineWeb-Edu (HuggingFaceFW/fineweb-edu) streamed and tokenized with GPT-2's BPE "
        "(tiktoken) or the --tokenizer given. Resumable: run the same command again after an interruption.",
        shard_tokens=100_000_000,
        val_fraction=0.01,
    )
    p.add_argument("--name", default="sample-10BT", help="dataset config (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    p.add_argument("--num-proc", type=int, default=None, help="encoding threads (default: all cores)")
    p.add_argument("--data-files", nargs="+", default=None, help="local Parquet files instead of the Hub")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="NAME_OR_PATH",
        help=f"gpt2 (GPT-2's, through tiktoken; the default) or any Hugging Face tokenizer: {HF_TOKENIZER_HELP}",
    )

    parser.set_defaults(func=lambda _args: _missing_source(parser))
    return parser


def _missing_source(parser: argparse.ArgumentParser) -> int:
    parser.print_usage()
    raise UsageError("choose a source: stdlib, files or fineweb-edu")


def _report(meta: Any, out: str) -> int:
    print(
        f"{out}: {meta.train_tokens:,} train / {meta.val_tokens:,} val tokens in "
        f"{len(meta.train_shards)} + {len(meta.val_shards)} shards, tokenizer {meta.tokenizer} "
        f"(vocab {meta.vocab_size})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from dpls.data import prepare

    function, keys = SOURCES[args.source]
    try:
        with usage_errors():
            meta = getattr(prepare, function)(
                out_dir=args.out,
                val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens,
                seed=args.seed,
                progress=not args.quiet,
                **{key: getattr(args, key) for key in keys},
            )
    except KeyboardInterrupt:  # the shards up to the last checkpoint are kept: say how to go on
        print(
            f"dpls prepare: interrupted; run the same command again to resume into {args.out}",
            file=sys.stderr,
        )
        return 130
    return _report(meta, args.out)
