"""The checks a study makes before any work: its folder, its data, and every run it will train.

Each raises ``ValueError`` with one line that says what is wrong and what to do, so the
command line turns it into exit status 2 before anything is written. `plan_study` runs them
all (and so does ``--dry-run``); the runner repeats the run checks once the data a study
prepares itself exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dpls._io import LOCK_FILE, OWNED_FILE, is_owned
from dpls.data.meta import DataMeta
from dpls.data.prepare import prepare_fineweb_edu, prepare_stdlib
from dpls.runs.checkpoint import is_complete, read_trainer_state
from dpls.runs.layout import config_path, read_toml
from dpls.study.spec import NEUTRAL_KEYS, closest_hint
from dpls.study.state import is_study_dir, read_state
from dpls.train.config import TrainConfig
from dpls.train.plan import plan_run

# Training keys NOT compared between the plan and a run already on disk: where files go
# and how progress is shown. Any other difference would make the run answer another question.
NOT_COMPARED = frozenset(
    {
        "out_dir",
        "data_dir",
        "resume_dir",
        "run_name",
        "device",
        "compile",
        "loss_impl",
        "progress",
        "tensorboard",
        "swanlab",
        "swanlab_project",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "max_skipped_steps",
        *NEUTRAL_KEYS,
    }
)

# Keys the study sets itself, and what the user sets that they follow from.
DERIVED = {
    "lr_decay_iters": "fork_step + the arms' budget (iters_per_arm or tokens_per_arm), unless [train] sets it",
    "max_iters": "fork_step (the trunk) and fork_step + the arms' budget (the arms)",
}

PREPARERS: dict[str, Callable[..., Any]] = {"stdlib": prepare_stdlib, "fineweb-edu": prepare_fineweb_edu}


# -- the study folder -------------------------------------------------------------------------


def check_study_folder(study_dir: Path, name: str, keep: Iterable[Path] = ()) -> None:
    """A study writes only into a new folder, an empty one, or its own (one whose study state
    names this study). ``keep``: paths that may already be there (the data the study reads)."""
    if not study_dir.exists():
        return
    if not study_dir.is_dir():
        raise ValueError(f"out_dir {study_dir} exists and is not a folder; give the study a folder (--out)")
    if is_study_dir(study_dir):
        other = read_state(study_dir).name
        if other != name:
            raise ValueError(
                f"out_dir {study_dir} holds the study {other!r}, not {name!r}: a study folder belongs to "
                "one study; choose another out_dir (--out)"
            )
        return
    allowed = {Path(p).resolve() for p in keep}
    theirs = sorted(
        p.name
        for p in study_dir.iterdir()
        if p.name not in (LOCK_FILE, OWNED_FILE) and p.resolve() not in allowed
    )
    if theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise ValueError(
            f"out_dir {study_dir} is not empty ({shown}) and holds no study: a study writes only into a "
            "new folder, an empty one or its own; choose another out_dir (--out)"
        )


def check_study_copy(target: Path, source: Path | None) -> None:
    """The study file's copy in the folder replaces only a copy dpls wrote: recorded as its own,
    the same text, or (a folder from before ownership was recorded) what the study state
    says the study last ran."""
    if source is None or not target.exists() or target.resolve() == source.resolve():
        return
    if target.is_file() and (is_owned(target) or target.read_bytes() == source.read_bytes()):
        return
    folder = target.parent
    if target.is_file() and is_study_dir(folder) and _parsed(target) == read_state(folder).spec:
        return
    raise ValueError(
        f"{target} exists and was not written by dpls (or was changed since); dpls never overwrites "
        f"it: move it away, or run that file itself (dpls study {target})"
    )


def _parsed(path: Path) -> dict[str, Any] | None:
    try:
        return read_toml(path)
    except ValueError:
        return None


# -- the data ---------------------------------------------------------------------------------


def check_prepared(data_dir: Path, source: str, options: dict[str, Any]) -> None:
    """Data already there must be what the study asks for (the keys it names, at least)."""
    meta = DataMeta.load(data_dir)
    settings = meta.settings or {}
    if settings.get("source", meta.source) != source:
        raise ValueError(f"{data_dir} holds {meta.source!r} data, but the study asks to prepare {source!r}")
    for key, value in options.items():
        if key in settings and settings[key] != value:
            raise ValueError(
                f"{data_dir} was prepared with {key}={settings[key]!r}, but the study asks for "
                f"{key}={value!r}; use another data_dir (or --out) or remove that directory"
            )


def check_prepare_options(source: str, options: dict[str, Any]) -> None:
    """The ``[prepare]`` keys must be keywords of the preparer (named in the error if not)."""
    params = inspect.signature(PREPARERS[source]).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "progress"]
    for key in options:
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} in [prepare] for source {source!r}; {closest_hint(key, valid)}"
            )


# -- the runs ---------------------------------------------------------------------------------


def check_train_config(cfg: TrainConfig, what: str) -> None:
    """Plan ``cfg`` exactly as ``dpls train`` does (model, data, loss keys, memory, the run folder),
    on the device it would train on; writes nothing."""
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    try:
        plan_run(cfg, 1, device)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def check_run_on_disk(
    run_dir: Path, values: dict[str, Any], seed: int | None, seed_offset: int, fork_point: Path | None
) -> None:
    """A run already in the study directory must be the one planned (else stop before any work)."""
    if seed is not None and fork_point is not None and is_complete(fork_point):
        had = read_trainer_state(fork_point).get("study_seed_offset")
        if had != seed_offset:
            raise ValueError(
                f"{fork_point} is the fork point of seed {seed} at offset {had}, but the study state "
                f"gives offset {seed_offset}; use another out_dir (--out) or remove {fork_point.parent.parent}"
            )
    cfg_file = config_path(run_dir)
    if not cfg_file.is_file():
        return
    saved = read_toml(cfg_file)
    for key, value in values.items():
        if key in NOT_COMPARED or key not in saved or saved[key] == value:
            continue
        if key in DERIVED:
            raise ValueError(
                f"{run_dir} was trained to {key}={saved[key]!r}, which the study derives from "
                f"{DERIVED[key]}; the study file now gives {value!r}: those settings changed since. "
                "Restore them, or use another out_dir (--out) for the new study"
            )
        raise ValueError(
            f"{run_dir} was trained with {key}={saved[key]!r} but the study now says "
            f"{key}={value!r}; use another out_dir (--out) or remove that run"
        )
