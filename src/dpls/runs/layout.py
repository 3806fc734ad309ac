"""The run directory: the one place that names its files and reads them back.

A run directory, as ``dpls train`` leaves it::

    RUN/
      config.toml          the resolved training configuration (flat TOML)
      metrics.jsonl        one JSON object per logged step
      tokenizer/           meta.json and the tokenizer file, copied from the data directory
      checkpoints/         step_NNNNNNN/, see `dpls.runs.checkpoint`
      eval/metrics.json    the final evaluation (written by studies; ``dpls eval --out``)
      diverged.json        only if training diverged: where and why (``read_diverged``)

Training writes these files; evaluation, studies and the command line only read them, so
the names and the readers live here, below all of them. One process writes a run at a time
(`run_writer`); readers need no lock.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpls._io import FolderInUse, exclusive_lock

if TYPE_CHECKING:
    from dpls.data.tokenizer import Tokenizer

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
EVAL_FILE = "metrics.json"  # what `dpls eval` writes by default; RUN/eval/metrics.json in a study
DIVERGED_FILE = "diverged.json"  # {"step", "detected_at", "reason", "initial_val_ce"}: the run diverged

Scalar = bool | int | float | str


# -- one writer per run ------------------------------------------------------------------------


@contextmanager
def run_writer(run_dir: str | Path, ctx: Any = None) -> Iterator[None]:
    """Hold the run's write lock (`dpls._io.exclusive_lock`) for the ``with`` block: a second
    ``dpls train`` on the same run is refused at once, naming the holder's PID.

    ``ctx`` (a `dpls.distributed.DistContext`): under torchrun only rank 0 takes the lock, and
    every rank learns the outcome, so all ranks raise the same error before any work."""
    if ctx is None or ctx.world_size == 1:
        with exclusive_lock(run_dir, "run"):
            yield
        return
    refusal: tuple[str, str] | None = None
    lock = exclusive_lock(run_dir, "run")
    if ctx.is_main:
        try:
            lock.__enter__()
        except ValueError as err:
            refusal = (type(err).__name__, str(err))
    refusal = ctx.broadcast_object(refusal)
    if refusal is not None:
        kind, message = refusal
        raise FolderInUse(message) if kind == FolderInUse.__name__ else ValueError(message)
    try:
        yield
    finally:
        if ctx.is_main:
            lock.__exit__(None, None, None)


# -- TOML: the run's config.toml (a flat table of scalars) -----------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a `ValueError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: not UTF-8 text ({err})") from None


def toml_value(value: Scalar) -> str:
    """One scalar in TOML syntax (``nan`` and ``inf`` included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes, \uXXXX included), except that
        # TOML also forbids a raw DEL character.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"cannot write {type(value).__name__} to a flat TOML table")


def dumps_toml(values: Mapping[str, Scalar | None], header: str = "") -> str:
    """A flat table of scalars as TOML. ``None`` has no TOML form: it is written as a comment
    (reading the file back leaves the key at its default, which is None for those keys)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for k, v in values.items():
        if not k.isidentifier():
            raise ValueError(f"config key {k!r} is not a bare TOML key")
        lines.append(f"# {k} = (unset)" if v is None else f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


# -- where things are -------------------------------------------------------------------------


def run_dir_of(path: str | Path) -> Path:
    """A run dir → itself; a checkpoint dir ``RUN/checkpoints/step_N`` → RUN."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS_DIR and path.name.startswith("step_"):
        return path.parent.parent
    return path


def config_path(path: str | Path) -> Path:
    """``path/config.toml``: where a run (or a checkpoint) keeps its configuration."""
    return Path(path) / CONFIG_FILE


def metrics_path(path: str | Path) -> Path:
    return Path(path) / METRICS_FILE


def saved_path(run_dir: str | Path, saved_out_dir: str | None, path: str) -> Path:
    """A relative path saved in a run's config, as the run meant it. The run was made in the
    folder its (relative) ``out_dir`` was relative to; when ``path`` does not exist from here
    but does from there, that one is meant (``--resume_dir`` given from another folder)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not saved_out_dir or Path(saved_out_dir).is_absolute():
        return p
    run, out = Path(run_dir).resolve().parts, Path(saved_out_dir).parts
    if len(run) > len(out) and run[-len(out) :] == out:
        there = Path(*run[: -len(out)]) / p
        if there.exists():
            return there
    return p


def is_run_dir(path: str | Path) -> bool:
    """A directory with a config.toml or a metrics.jsonl."""
    path = Path(path)
    return config_path(path).is_file() or metrics_path(path).is_file()


def find_run_config(path: str | Path) -> Path:
    """The config.toml of a run (``RUN``) or of a checkpoint (``RUN/checkpoints/step_N``)."""
    path = Path(path)
    for candidate in (config_path(path), config_path(path.parent.parent)):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{path} is not a run or checkpoint directory (no {CONFIG_FILE})")


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The saved configuration of a run or checkpoint directory, as TOML gives it."""
    return read_toml(find_run_config(path))


# -- metrics.jsonl ----------------------------------------------------------------------------


def jsonl_line(row: Mapping[str, Any]) -> str:
    """One line of standard JSON: a non-finite number (the loss of a skipped step) becomes null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def read_metrics(path: str | Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, or of a run's (none if it has no such file).

    A result that cannot be read whole is never read in part: a line that is not a JSON object
    is a ``ValueError`` naming the file and the line. ``allow_torn_tail`` (resuming a run in
    place) accepts one exception: a last line without its newline, cut by a crash mid-write,
    is dropped with a warning naming the file (the resumed run writes that step again)."""
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
            continue
        torn = number == len(lines) and not text.endswith("\n")
        if torn and allow_torn_tail:
            warnings.warn(
                f"{path}: the last line was cut off (a crash while writing it): dropped", stacklevel=2
            )
            continue
        what = "is cut off (a crash while writing it?)" if torn else "is not a JSON object"
        raise ValueError(
            f"{path}: line {number} of {len(lines)} {what}: {_excerpt(line)}; the run's results cannot be read "
            "whole: restore the file, or remove that line and accept that its values are lost"
        )
    return rows


def _excerpt(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:60] + "…")


def read_json(path: str | Path) -> Any:
    """A JSON file a run or evaluation wrote; a damaged one is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"cannot read {path}: {err}; the file is damaged: restore it or write it again"
        ) from None


def read_diverged(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's divergence record (RUN/diverged.json), or None if it did not diverge."""
    path = Path(run_dir) / DIVERGED_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    return record if isinstance(record, dict) else {}


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop rows after ``step`` (written by a run that died past its last checkpoint).

    A run resumed from the checkpoint of ``step`` writes those steps again; keeping the
    old rows would show every such step twice.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path, allow_torn_tail=True) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(jsonl_line(r) + "\n" for r in kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- the tokenizer ----------------------------------------------------------------------------


def load_tokenizer(path: str | Path, *, encoding: Any = None) -> Tokenizer:
    """The tokenizer of a run, a checkpoint or a data directory (or a ``tokenizer.json``).

    A run keeps a copy in ``RUN/tokenizer/``; a run without one (copied elsewhere, or older)
    falls back on the ``data_dir`` of its config.toml. This is ``dpls.load_tokenizer``.
    """
    from dpls.data.meta import DataError
    from dpls.data.tokenizer import load_tokenizer as load_data_tokenizer

    try:
        return load_data_tokenizer(path, encoding=encoding)
    except DataError:
        data_dir = _saved_data_dir(path) if Path(path).exists() else None
        if data_dir is None:
            raise
        return load_data_tokenizer(data_dir, encoding=encoding)


def _saved_data_dir(path: str | Path) -> Path | None:
    """The data_dir named by the config.toml of ``path`` or one of its 3 parents, if it holds a meta.json."""
    from dpls.data.meta import META_FILE

    path = Path(path)
    if path.is_file():
        path = path.parent
    for place in [path, *list(path.resolve().parents)[:3]]:
        if not config_path(place).is_file():
            continue
        try:
            saved = read_toml(config_path(place))
        except ValueError:
            continue
        if not saved.get("data_dir"):
            continue
        data_dir = saved_path(place, saved.get("out_dir"), saved["data_dir"])
        if (data_dir / META_FILE).is_file():
            return data_dir
    return None
