"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNN/`` (N = optimizer steps done)::

    .metadata, __*.distcp    model + optimizer state (torch.distributed.checkpoint)
    trainer_state.json       step, tokens seen, data-loader position, LR schedule, ...
    rng_rank{r}.pt           RNG states of rank r: torch CPU / CUDA, numpy, python
    model_config.json        the network's ModelConfig (vocabulary size included)
    config.toml              the resolved training config

Tensors go through ``torch.distributed.checkpoint`` (DCP) with the plain parameter names
of ``get_state_dict``: every rank writes its own shard, and loading reads each tensor into
whatever layout the loading job has, so N ranks (DDP or FSDP2) can resume with M ranks,
and one process without any process group can read it (``load_model``).

**Save protocol.** A checkpoint only ever appears under its real name complete, and a
complete checkpoint is never deleted before a newer complete one is in place. Folder
names carry the state of a save (``N`` is the step):

* ``step_N.tmp-<pid>``   being written. Every rank writes its files into it and fsyncs
  them; the ranks agree that all succeeded; rank 0 fsyncs the folder.
* ``step_N.old-<pid>``   the committed copy of step N, moved aside because the same step is
  saved again (e.g. a run stopped right after resuming). It is complete.
* ``step_N.trash-<pid>`` an older checkpoint being pruned: renamed out of the real names
  first, so a half-deleted checkpoint never looks complete.

Rank 0 then commits, each step one atomic rename:

1. ``step_N`` → ``step_N.old-<pid>``   (only if ``step_N`` exists)
2. ``step_N.tmp-<pid>`` → ``step_N``, fsync the folder
3. delete ``step_N.old-<pid>``
4. for each checkpoint beyond ``keep``: rename it to ``.trash-<pid>``, then delete it.

**Recovery** (`recover_checkpoints`, run before a run continues in place) after a crash
at any point: a ``.tmp-`` folder is deleted (it was never agreed complete: the previous
checkpoint is still the latest); a ``.old-`` folder is renamed back to ``step_N`` when
``step_N`` is missing (a crash between renames 1 and 2) and deleted otherwise (a crash
after 2); ``.trash-`` folders are deleted. Readers that write nothing (`list_checkpoints`,
so `latest_checkpoint`, `load_model`, evaluation) count a complete ``.old-`` copy whose
``step_N`` is missing as step N, so they see the same newest checkpoint the recovery will.
``tests/runs/test_checkpoint_protocol.py`` crashes a save after every step and checks this.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from dpls._io import fsync_path as _fsync_path
from dpls.data.checks import tokenizer_fingerprint_of
from dpls.distributed.context import DistContext
from dpls.distributed.faults import Faults
from dpls.model import ModelConfig, Transformer
from dpls.runs.layout import CHECKPOINTS_DIR as CHECKPOINTS
from dpls.runs.layout import CONFIG_FILE as CONFIG
from dpls.runs.layout import TOKENIZER_DIR, dumps_toml, run_dir_of

T = TypeVar("T")
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
_STEP_DIR = re.compile(r"step_(\d{7,})")
_DISPLACED = re.compile(r"(step_\d{7,})\.old-\d+")  # a committed copy moved aside (see above)
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
_TRASH_MARK = ".trash-"


def _event(name: str, path: Path) -> None:
    """Called after each filesystem step of a save (a no-op; tests simulate crashes here)."""


class RunConfig(Protocol):
    """What a checkpoint needs of the training config (``dpls.train.TrainConfig``): its keys."""

    def to_dict(self) -> dict[str, Any]: ...


class CheckpointError(RuntimeError):
    """Saving failed; the message says which earlier checkpoint is still intact."""


# -- finding checkpoints ----------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory, from its name."""
    name = Path(path).name
    displaced = _DISPLACED.fullmatch(name)
    m = _STEP_DIR.fullmatch(displaced.group(1) if displaced else name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_0000100)")
    return int(m.group(1))


def is_complete(path: str | Path) -> bool:
    """A checkpoint directory with every file a resume needs."""
    path = Path(path)
    return all((path / name).is_file() for name in (".metadata", TRAINER_STATE, MODEL_CONFIG, CONFIG))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary folders never count)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = {p.name: p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and is_complete(p)}
    for p in sorted(folder.iterdir()):  # a crash mid-commit moved the only copy aside
        m = _DISPLACED.fullmatch(p.name)
        if m and m.group(1) not in found and is_complete(p):
            found[m.group(1)] = p
    return sorted(found.values(), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory → itself; a run directory → its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        newest = latest_checkpoint(path.parent.parent) if path.parent.name == CHECKPOINTS else None
        hint = (
            f" (its run's newest checkpoint is {newest.name}: a run still training prunes older ones; "
            f"give the run directory {path.parent.parent} to read its newest)"
            if newest is not None
            else ""
        )
        raise ValueError(f"checkpoint or run directory not found: {path}{hint}")
    if _STEP_DIR.fullmatch(path.name) or _DISPLACED.fullmatch(path.name):
        if not is_complete(path):
            raise ValueError(f"{path} is not a complete checkpoint (missing .metadata, {TRAINER_STATE}, ...)")
        return path
    latest = latest_checkpoint(path)
    skipped = _incomplete_after(path, latest)
    if latest is None:
        why = f" ({_incomplete_text(skipped)})" if skipped else ""
        raise ValueError(f"{path} has no complete checkpoint under {CHECKPOINTS}/{why}")
    if skipped:
        warnings.warn(
            f"{_incomplete_text(skipped)}: using {latest.name}, the newest complete one", stacklevel=2
        )
    return latest


def _incomplete_after(run_dir: Path, latest: Path | None) -> list[Path]:
    """Checkpoint folders under real names, newer than ``latest``, that lack a file."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    newest = -1 if latest is None else checkpoint_step(latest)
    return sorted(
        (p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and checkpoint_step(p) > newest),
        key=checkpoint_step,
    )


def _incomplete_text(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        missing = [n for n in (".metadata", TRAINER_STATE, MODEL_CONFIG, CONFIG) if not (p / n).is_file()]
        parts.append(f"{p} is incomplete (missing {', '.join(missing)})")
    return "; ".join(parts)


def recover_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finish or undo a save that was killed (see the module docstring); returns the folders
    deleted. Rank 0 calls it before a run continues in place."""
    folder = Path(run_dir) / CHECKPOINTS
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _DISPLACED.fullmatch(p.name)
        if m is None:
            continue
        final = folder / m.group(1)
        if not final.exists() and is_complete(p):
            os.replace(p, final)  # crash between the two renames: the committed copy comes back
            _fsync_path(folder)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in sorted(folder.iterdir()):
        if _TMP_MARK in p.name or _TRASH_MARK in p.name:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


remove_stale_tmp = recover_checkpoints  # the earlier name


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep=0``: keep all).

    Each is renamed out of the real names before it is deleted, so a crash mid-delete
    never leaves a half checkpoint that looks complete. One that a reader holds
    (`reading_checkpoint`: ``dpls eval``, ``sample``, ``export-hf`` of this run) is left for
    the next save to prune."""
    if keep <= 0:
        return []
    pruned = []
    for p in list_checkpoints(run_dir)[:-keep]:
        held = _hold(p, exclusive=True)
        if held is None:  # being read: pruned at a later save
            continue
        try:
            trash = p.with_name(f"{p.name.split('.')[0]}{_TRASH_MARK}{os.getpid()}")
            os.replace(p, trash)
            _event("trashed", trash)
            shutil.rmtree(trash, ignore_errors=True)
            _event("pruned", trash)
            pruned.append(p)
        finally:
            if held >= 0:
                os.close(held)
    return pruned


# -- readers hold the checkpoint they read ------------------------------------------------------

_PIN_ATTEMPTS = 20  # a run saving and pruning every step can outrun a reader a few times


def _hold(folder: Path, *, exclusive: bool) -> int | None:
    """A descriptor of ``folder`` holding its ``flock`` (shared: a reader; exclusive: the
    pruner), or None when the other side holds it or the folder is gone. -1 where the file
    system has no locks (nothing to hold: proceed as before)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        if os.stat(folder).st_ino == os.fstat(fd).st_ino:  # still the folder under that name
            return fd
    except BlockingIOError:
        pass
    except FileNotFoundError:  # renamed away between open and stat
        pass
    except OSError:  # no flock here (some network file systems)
        os.close(fd)
        return -1
    os.close(fd)
    return None


@contextmanager
def reading_checkpoint(path: str | Path) -> Iterator[Path]:
    """The checkpoint of ``path`` (itself, or a run directory's newest complete one), held for
    the ``with`` block so that a run still training does not prune it mid-read.

    A run directory whose newest checkpoint is pruned between finding and holding it is read
    at its next newest; a checkpoint named explicitly that is gone is a one-line
    ``ValueError`` saying so (the run directory gives its newest)."""
    given_run = not (_STEP_DIR.fullmatch(Path(path).name) or _DISPLACED.fullmatch(Path(path).name))
    for _ in range(_PIN_ATTEMPTS):
        ckpt = resolve_checkpoint(path)
        held = _hold(ckpt, exclusive=False)
        if held is not None and is_complete(ckpt):
            try:
                yield ckpt
            finally:
                if held >= 0:
                    os.close(held)
            return
        if held is not None and held >= 0:
            os.close(held)
        if not given_run:
            raise ValueError(
                f"the checkpoint {ckpt} was removed while it was being read (a run still training prunes "
                f"its older checkpoints: keep_checkpoints); give the run directory {ckpt.parent.parent} to "
                "read its newest checkpoint"
            )
    raise ValueError(
        f"{path}: its newest checkpoint was replaced {_PIN_ATTEMPTS} times while being read; try again"
    )


def reads_checkpoint(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: ``fn(path, ...)`` runs on the checkpoint `reading_checkpoint` holds for it."""

    @functools.wraps(fn)
    def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> T:
        with reading_checkpoint(path) as ckpt:
            return fn(ckpt, *args, **kwargs)

    return wrapper


# -- RNG states -------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (only tensors, ints and tuples: loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        for i in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[i], i)


# -- saving -----------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in {TRAINER_STATE}")


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def _world(ctx: DistContext | None) -> DistContext:
    return ctx if ctx is not None else DistContext()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config: RunConfig,
    model_config: Any,
    ctx: DistContext | None = None,
    keep: int = 0,
    faults: Faults | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_NNNNNNN`` atomically; every rank calls it.

    ``model`` is the unwrapped module (FSDP2-sharded is fine); ``trainer_state`` must be
    JSON-serialisable (step, tokens, loader position, ...). ``keep`` > 0 prunes older
    checkpoints once this one is in place. Raises `CheckpointError` (on every rank) when
    any rank failed; the previous checkpoint is then untouched and still the latest.
    ``faults``: the run's injected faults (tests); by default read from the environment.

    The phases of the save protocol (module docstring): rank 0 makes the temporary folder,
    every rank writes its files into it, rank 0 commits it; after each phase the ranks agree
    whether all succeeded, and a failure is undone before the error is raised.
    """
    faults = faults if faults is not None else Faults.from_env()
    ctx = _world(ctx)
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINTS / checkpoint_name(step)
    # Every rank writes into rank 0's temporary folder.
    tmp = final.with_name(f"{final.name}{_TMP_MARK}{ctx.broadcast_object(os.getpid())}")

    error: BaseException | None = None
    try:
        if ctx.is_main:
            tmp.mkdir(parents=True, exist_ok=False)
    except OSError as err:
        error = err
    if not ctx.any_rank(error is not None):
        try:
            _write_shard(tmp, model, optimizer, ctx)
            faults.enospc(step, ctx.rank)
            _write_rng(tmp, ctx)
            if ctx.is_main:
                _write_documents(tmp, {**trainer_state, "step": step}, config, model_config, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # DCP's CheckpointException is a BaseException, not an Exception
            error = err
    if not ctx.any_rank(error is not None) and ctx.is_main:
        try:
            _commit(tmp, final)
        except OSError as err:
            error = err
    if ctx.any_rank(error is not None):
        if ctx.is_main:
            _undo(tmp, final)
        raise _save_failed(run_dir, step, error, ctx) from error
    if ctx.is_main and keep > 0:
        prune_checkpoints(run_dir, keep)
    ctx.barrier()
    return final


def _write_shard(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: DistContext
) -> None:
    """This rank's share of the tensors (model and optimizer state), through DCP."""
    # DCP imports DTensor (a second or more): only saving and loading pay for it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp)


def _write_rng(tmp: Path, ctx: DistContext) -> None:
    buf = io.BytesIO()
    torch.save(capture_rng(), buf)
    _write_file(tmp / f"rng_rank{ctx.rank}.pt", buf.getvalue())


def _write_documents(
    tmp: Path, trainer_state: dict[str, Any], config: RunConfig, model_config: Any, ctx: DistContext
) -> None:
    """Rank 0: the trainer state, the model config and the run config."""
    state_doc = {**trainer_state, "world_size": ctx.world_size, "time": time.time()}
    _write_file(tmp / TRAINER_STATE, json.dumps(state_doc, indent=1, default=_jsonable).encode())
    is_instance = is_dataclass(model_config) and not isinstance(model_config, type)
    mc = asdict(model_config) if is_instance else dict(model_config)
    _write_file(tmp / MODEL_CONFIG, json.dumps(mc, indent=1, default=_jsonable).encode())
    _write_file(tmp / CONFIG, dumps_toml(config.to_dict()).encode())


def _commit(tmp: Path, final: Path) -> None:
    """Rank 0 puts the written folder under its real name: see "Save protocol" in the module docstring."""
    folder = final.parent
    _fsync_path(tmp)
    _event("written", tmp)
    old = None
    if final.exists():  # the same step saved again (e.g. stopped right after resuming)
        old = folder / f"{final.name}{_OLD_MARK}{os.getpid()}"
        os.replace(final, old)
        _event("displaced", old)
    os.replace(tmp, final)
    _fsync_path(folder)
    _event("renamed", final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _event("cleaned", old)


def _undo(tmp: Path, final: Path) -> None:
    """Rank 0, after a failed save: the temporary folder goes, a committed copy comes back."""
    shutil.rmtree(tmp, ignore_errors=True)
    for moved in final.parent.glob(f"{final.name}{_OLD_MARK}*"):  # a rename failed after step 1
        if not final.exists() and is_complete(moved):
            os.replace(moved, final)


def _save_failed(run_dir: Path, step: int, error: BaseException | None, ctx: DistContext) -> CheckpointError:
    """The error every rank raises: the same message (the first failing rank's error), so a
    decision taken on it (e.g. "out of disk: keep training") is the same on every rank."""
    previous = latest_checkpoint(run_dir)
    intact = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    cause = None if error is None else _first_failure(error)  # DCP's text is every rank's traceback
    reasons = ctx.all_gather_object(None if cause is None else f"{type(cause).__name__}: {_one_line(cause)}")
    reason = next(
        (f"{msg}" if ctx.world_size == 1 else f"rank {r}: {msg}" for r, msg in enumerate(reasons) if msg),
        "unknown error",
    )
    return CheckpointError(f"saving the checkpoint of step {step} failed ({reason}); {intact}")


# -- loading ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file; a damaged one is a `ValueError` naming the file (a bare
    decoder message would not say which file of which checkpoint is bad)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged or unreadable ({err}); this checkpoint cannot be used. {_what_to_do(path.parent)}"
        ) from None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path) / TRAINER_STATE)


def read_model_config(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path) / MODEL_CONFIG)


def trained_tokenizer(path: str | Path, trainer_state: Mapping[str, Any] | None = None) -> str | None:
    """The fingerprint of the tokenizer a checkpoint was trained with (`dpls.data.checks`):
    recorded in its trainer state (read from ``path`` unless given), else that of the run's
    ``tokenizer/`` copy; None if unknown."""
    state = trainer_state if trainer_state is not None else read_trainer_state(path)
    recorded = state.get("tokenizer_fingerprint")
    return recorded or tokenizer_fingerprint_of(run_dir_of(path) / TOKENIZER_DIR)


def saved_ranks(path: str | Path) -> int:
    return len(list(Path(path).glob("rng_rank*.pt")))


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ctx: DistContext | None = None,
    restore_rng_state: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint (or a run's latest) into ``model`` (and ``optimizer``); return the trainer state.

    Every rank calls it. ``restore_rng_state`` gives rank r the RNG states saved by rank
    ``r mod N`` (N ranks saved it). Works in one process without a process group.
    """
    path = restore_checkpoint(
        path, model=model, optimizer=optimizer, ctx=ctx, restore_rng_state=restore_rng_state
    )
    return read_trainer_state(path)


def restore_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ctx: DistContext | None = None,
    restore_rng_state: bool = True,
) -> Path:
    """`load_checkpoint` without reading the trainer state (for a caller that has it); returns
    the checkpoint directory. A damaged or incomplete checkpoint is a ``ValueError`` naming the file."""
    import torch.distributed.checkpoint as dcp  # DTensor: see _write_shard

    ctx = _world(ctx)
    path = resolve_checkpoint(path)
    reading = path / ".metadata"  # the file being read when a damaged one fails
    try:
        # read first: when .metadata is unreadable, dcp.load logs tracebacks to the root logger
        dcp.FileSystemReader(path).read_metadata()
        reading = path / "__*.distcp"
        _read_shard(path, model, optimizer)
        n = saved_ranks(path) if restore_rng_state else 0
        if n:
            reading = path / f"rng_rank{ctx.rank % n}.pt"
            restore_rng(torch.load(reading, weights_only=True))
    except torch.OutOfMemoryError:
        raise
    except (Exception, dcp.CheckpointException) as err:  # truncated or missing files: EOF, assert, ...
        cause = _first_failure(err)
        if isinstance(cause, torch.OutOfMemoryError):
            raise
        raise _damaged(path, reading, cause) from err
    return path


def _read_shard(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The tensors, into whatever layout ``model`` (and ``optimizer``) have on this rank."""
    import torch.distributed.checkpoint as dcp  # DTensor: see _write_shard
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _quiet_single_process():
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        model_sd = get_model_state_dict(model)
        with _quiet_single_process():
            dcp.load({"model": model_sd}, checkpoint_id=path)
        set_model_state_dict(model, model_sd)


def _damaged(path: Path, reading: Path, cause: BaseException) -> ValueError:
    """The one-line error for a checkpoint whose file ``reading`` could not be read."""
    detail = _one_line(cause)
    if isinstance(cause, KeyError | EOFError) or not detail:  # "174812789", "": unreadable data
        detail = f"{detail}: truncated or overwritten data".lstrip(": ")
    named = sorted(path.glob(reading.name)) if "*" in reading.name else [reading]
    missing = next((f for f in named if not f.is_file()), None)
    where = f"{missing} is missing" if missing else f"{reading} is damaged or incomplete"
    return ValueError(
        f"cannot load the checkpoint {path}: {where} ({type(cause).__name__}: {detail}); "
        f"its files are damaged or incomplete. {_what_to_do(path)}"
    )


def _what_to_do(path: Path) -> str:
    """The way out of a damaged checkpoint: its run's previous one, with the command."""
    run = path.parent.parent
    earlier = [p for p in list_checkpoints(run) if checkpoint_step(p) < checkpoint_step(path)]
    if not earlier:
        return "There is no earlier checkpoint of this run to fall back on."
    return (
        f"To resume from the previous checkpoint {earlier[-1].name}, move this one aside "
        f"(mv {path} {path}.damaged) and run: dpls train --resume_dir={run}"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _first_failure(err: BaseException) -> BaseException:
    """The error behind a `CheckpointException` (whose text is every rank's traceback)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]
    return err


def build_model_from_config(model_config: dict[str, Any]) -> Transformer:
    """A fresh (randomly initialised) model from a saved ``model_config.json``."""
    return Transformer(ModelConfig(**model_config))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint directory or run directory (its latest checkpoint), in eval mode.

    ``forward(idx [B, T] int64) -> logits [B, T, V]``. Built from the saved model config,
    so no other file is needed; this is ``dpls.load_model``.
    """
    with reading_checkpoint(path) as path:
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
            model = build_model_from_config(read_model_config(path))
        model = model.to(device)
        load_checkpoint(path, model=model, restore_rng_state=False)
    return model.eval()
