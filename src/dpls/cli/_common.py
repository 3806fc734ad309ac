"""Pieces several subcommands share: the ValueError → UsageError rule and repeated options."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dpls._io import check_replaceable
from dpls.cli import UsageError

DTYPES = ("float32", "bfloat16", "float16")


@contextmanager
def usage_errors() -> Iterator[None]:
    """The library raises ValueError for bad input before any work starts; on the command
    line that is a usage error (one line, exit code 2)."""
    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from err


def doc_parser(subparsers: Any, name: str, help_text: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand parser described by its module docstring after the first paragraph
    (the first is the one-line usage), with the docstring's line breaks kept."""
    return subparsers.add_parser(
        name,
        help=help_text,
        description=doc.split("\n\n", 1)[1] if doc else help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """``--device`` and ``--dtype``, as the commands that run a model spell them."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help=dtype_help)


def check_output_file(path: str | None, flag: str) -> None:
    """An output file named on the command line can be written, and writing it destroys
    nothing the user owns (checked before the work it records; see `dpls._io.check_replaceable`)."""
    if not path:
        return
    try:
        check_replaceable(path, flag)
    except ValueError as err:
        raise UsageError(str(err)) from None
