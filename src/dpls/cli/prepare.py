"""`dpls prepare {stdlib,files,fineweb-edu} --out DIR`: a corpus → tokenizer, token shards, meta.json."""

from __future__ import annotations

import argparse
from typing import Any

from dpls.cli import UsageError

EPILOG = (
    "An output directory must be new or empty, or hold an earlier prepare run with the same settings "
    "(finished: nothing is redone; interrupted: it resumes)."
)


def _common(parser: argparse.ArgumentParser, shard_tokens: int, val_fraction: float) -> None:
    parser.add_argument("--out", required=True, help="output data directory")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=val_fraction,
        help="share of documents held out for validation (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=shard_tokens, help="tokens per shard (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Tokenize a corpus into llm.c-layout uint16 shards plus meta.json (and tokenizer.json).",
        epilog=EPILOG,
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")

    p = sources.add_parser(
        "stdlib",
        help="the running Python's standard library (no download)",
        description="The embedded corpus: this Python's standard-library .py files and a byte-level BPE "
        "trained on them. The same Python version gives the same corpus everywhere.",
        epilog=EPILOG,
    )
    _common(p, shard_tokens=1_000_000, val_fraction=0.05)
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--max-files", type=int, default=None, help="use a fixed sample of N files")
    p.add_argument("--include-tests", action="store_true", help="include the test suites")
    p.set_defaults(func=run_stdlib)

    p = sources.add_parser(
        "files",
        help="your .txt, .jsonl or .parquet files",
        description="Your own text: .txt (one document, or several separated by <|endoftext|>), .jsonl "
        "(one document per line) and .parquet (one per row) files, or directories of them.",
        epilog=EPILOG,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="input files or directories")
    _common(p, shard_tokens=100_000_000, val_fraction=0.05)
    p.add_argument("--tokenizer", choices=["bpe", "gpt2"], default="bpe", help="train a BPE, or GPT-2's")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default: %(default)s)")
    p.set_defaults(func=run_files)

    p = sources.add_parser(
        "fineweb-edu",
        help="FineWeb-Edu through Hugging Face datasets, GPT-2 BPE",
        description="FineWeb-Edu (HuggingFaceFW/fineweb-edu) streamed and tokenized with GPT-2's BPE "
        "(tiktoken). Resumable: run the same command again after an interruption.",
        epilog=EPILOG,
    )
    _common(p, shard_tokens=100_000_000, val_fraction=0.01)
    p.add_argument("--name", default="sample-10BT", help="dataset config (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    p.add_argument("--num-proc", type=int, default=None, help="encoding threads (default: all cores)")
    p.add_argument("--data-files", nargs="+", default=None, help="local Parquet files instead of the Hub")
    p.set_defaults(func=run_fineweb)

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


def run_stdlib(args: argparse.Namespace) -> int:
    from dpls.data.prepare import prepare_stdlib

    try:
        meta = prepare_stdlib(
            args.out,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            max_files=args.max_files,
            include_tests=args.include_tests,
            progress=not args.quiet,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    return _report(meta, args.out)


def run_files(args: argparse.Namespace) -> int:
    from dpls.data.prepare import prepare_files

    try:
        meta = prepare_files(
            args.paths,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    return _report(meta, args.out)


def run_fineweb(args: argparse.Namespace) -> int:
    from dpls.data.prepare import prepare_fineweb_edu

    try:
        meta = prepare_fineweb_edu(
            args.out,
            name=args.name,
            max_tokens=args.max_tokens,
            num_proc=args.num_proc,
            data_files=args.data_files,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    return _report(meta, args.out)
