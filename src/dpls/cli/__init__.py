"""The `dpls` command line: one entry point, one module per subcommand.

Each subcommand module defines ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed namespace, returns an exit code).
Modules are imported only when their command runs, so ``dpls --help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import import_module
from typing import Any, TextIO

from dpls import __version__
from dpls._io import path_error, write_failure

# command name -> (module under dpls.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "tokenize a corpus into token shards (stdlib, files, fineweb-edu)"),
    "train": ("train", "pretrain a model (CE, LS, DPLS, ...); torchrun for several GPUs"),
    "eval": ("evaluate", "loss, perplexity, entropy and calibration of a checkpoint"),
    "sample": ("sample", "text sampled from a trained model (temperature, top-k, top-p; KV cache)"),
    "export-hf": ("export_hf", "export a checkpoint as a Hugging Face model directory"),
    "lm-eval": ("lm_eval", "downstream tasks through EleutherAI's lm-evaluation-harness"),
    "study": ("study", "a paired comparison of loss arms forked from one checkpoint"),
    "compare": ("compare", "tables and plots from finished runs"),
    "bench": ("bench", "performance comparisons, as ratios measured in one run"),
    "demo": ("demo", "the end-to-end tiny study on the embedded corpus"),
}


class UsageError(Exception):
    """Bad input found before any work started: printed as one line, exit code 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpls", description="Dynamic Partial Label Smoothing for language-model pretraining."
    )
    parser.add_argument("--version", action="version", version=f"dpls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name != command:
            sub.add_parser(name, help=help_text)
            continue
        import_module(f"dpls.cli.{module}").register(sub, name, help_text)
    return parser


def _one_line_warnings(command: str) -> None:
    """dpls's own warnings (``warnings.warn`` in the library) print as one line, like its errors."""
    default = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if "/dpls/" in str(filename).replace("\\", "/") and category is UserWarning:
            print(f"dpls {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class _Output:
    """``sys.stdout`` / ``sys.stderr`` while a command runs. When the reader goes away
    (``dpls train ... | head -1``) the rest of the output is dropped instead of raising
    ``BrokenPipeError`` wherever the command happens to print: training goes on and logs to
    its files, a study or an evaluation finishes and writes its results, and a command whose
    only product is its output asks `output_lost` and stops early. Text the stream's encoding
    cannot hold (a path with undecodable bytes) is written with backslash escapes."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self._stream, "encoding", None) or "utf-8"
                self._guarded(self._stream.write, text.encode(encoding, "backslashreplace").decode(encoding))
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def _guarded(self, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except BrokenPipeError:
            self._reader_gone()

    def flush(self) -> None:
        if not self.lost:
            self._guarded(self._stream.flush)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _reader_gone(self) -> None:
        self.lost = True
        try:  # what the stream still buffers goes nowhere, so exiting raises nothing either
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (captured in tests)
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def output_lost() -> bool:
    """The reader of stdout went away (a closed pipe): output from here on is dropped."""
    return isinstance(sys.stdout, _Output) and sys.stdout.lost


def _os_error(command: str, err: OSError) -> int | None:
    """A one-line message (and exit code) for a path the file system cannot hold, or for a
    file that could not be written (disk full, quota, ``ulimit -f``); None for other errors."""
    bad_path = path_error(err)
    if bad_path is not None:
        print(f"dpls {command}: error: {bad_path}", file=sys.stderr)
        return 2
    failed = write_failure(err)
    if failed is not None:
        print(
            f"dpls {command}: error: {failed}; make room (or raise the limit) and run it again",
            file=sys.stderr,
        )
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Output(sys.stdout), _Output(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not hasattr(args, "func"):  # a registered-but-unloaded command; cannot happen
        parser.error(f"unknown command {args.command!r}")
    _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"dpls {args.command}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # a folder or file of another user, found on the way
        where = f" {err.filename}" if err.filename else ""
        print(
            f"dpls {args.command}: error: no permission to access{where} ({err.strerror or err}); "
            "choose files and folders this user can read and write",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's code for SIGINT, not a traceback
        print(f"dpls {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        code = _os_error(args.command, err)
        if code is None:
            raise
        return code
