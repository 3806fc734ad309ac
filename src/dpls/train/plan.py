"""The plan of a run: every check before training, and no writes.

`plan_run` takes a `TrainConfig` and returns a frozen `RunPlan`: what the trainer will do.
It works through one concern at a time, each reading its files once:

1. the run directory (``out_dir``): writable, not inside data or another run's checkpoints;
2. the start point (`StartPoint`): a new run, a resume in place, or a fork of a checkpoint;
3. the data: ``meta.json`` and its shards;
4. the model: the preset with the user's keys, or the checkpoint's network, checked against
   the data; then the config is resolved (`dpls.train.config.resolve_config`) and the
   memory estimated;
5. the data streams: the training stream (at the checkpoint's position) and the validation
   batches of this rank;
6. the objective, checked on one token of the vocabulary.

The data streams and the objective are built here, because building them is how they are
checked; the trainer then uses these very objects. A bad input fails here in a second with
one message, and leaves no half run behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpls._io import check_writable_dir
from dpls.data.checks import (
    check_meta_matches,
    check_same_tokenizer,
    check_token_ids,
    tokenizer_fingerprint_of,
)
from dpls.data.counts import token_counts
from dpls.data.loader import TokenLoader, ValidationSet, validation_batches
from dpls.data.meta import META_FILE, DataMeta
from dpls.losses.objective import Objective, build_objective
from dpls.model import ModelConfig, model_config
from dpls.runs import checkpoint as ckpt
from dpls.runs.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TOKENIZER_DIR,
    config_path,
    read_metrics,
    read_toml,
    saved_path,
)
from dpls.train.config import (
    MODEL_OVERRIDE_KEYS,
    ResolvedConfig,
    TrainConfig,
    read_run_config,
    resolve_config,
    same_path,
)
from dpls.train.loggers import check_loggers
from dpls.train.memory import check_memory
from dpls.train.optim import cosine_lr

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Objectives that spread their smoothing mass by a prior over the vocabulary: the trainer
# gives them the training shards' token frequencies.
TOKEN_PRIOR_OBJECTIVES = frozenset({"prior_ls"})
GPT2_PAD_VOCAB_TO = 64  # pad_vocab_to for GPT-2-tokenised data unless set: 50257 -> 50304, as nanoGPT


class InvalidRun(ValueError):
    """A bad input found by `plan_run`, before anything was written (the CLI's exit code 2)."""


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: ``new``, ``resume`` (in place, from its latest checkpoint) or
    ``fork`` (a new run directory from another run's checkpoint)."""

    mode: Literal["new", "resume", "fork"] = "new"
    checkpoint: Path | None = None
    trainer_state: Mapping[str, Any] = field(default_factory=dict)  # the checkpoint's; {} for a new run
    saved_config: TrainConfig | None = None  # the checkpoint's config.toml

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))

    @property
    def tokens(self) -> int:
        return int(self.trainer_state.get("tokens", 0))


@dataclass(frozen=True)
class RunPlan:
    """A run, fully resolved and checked: what `dpls.train.trainer.train` does."""

    cfg: ResolvedConfig
    run_dir: Path
    start: StartPoint
    model_config: ModelConfig
    data: DataMeta  # the data directory's meta.json, with its tokenizer fingerprint filled in
    dtype: torch.dtype
    micro_steps: int  # per rank, per optimizer step
    objective: Objective
    loader: TokenLoader  # this rank's training stream, at the start point's position
    val_set: ValidationSet  # this rank's share of the fixed validation batches
    notes: tuple[str, ...]  # things the user should know (printed at the start)

    @property
    def lr_schedule(self) -> dict[str, Any]:
        """The arguments of `cosine_lr` (also recorded in every checkpoint)."""
        cfg = self.cfg
        return {
            "learning_rate": cfg.learning_rate,
            "min_lr": cfg.min_lr,
            "warmup_iters": cfg.warmup_iters,
            "lr_decay_iters": cfg.resolved_lr_decay_iters,
        }

    def lr_at(self, step: int) -> float:
        """The learning rate of the step with 0-based index ``step``."""
        return cosine_lr(step, **self.lr_schedule)

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def plan_run(
    cfg: TrainConfig, world_size: int = 1, device: torch.device | None = None, *, rank: int = 0
) -> RunPlan:
    """Check ``cfg`` against the run directory, any checkpoint to start from, and the data.

    Raises ``ValueError`` with a one-line message for every bad input; writes nothing.
    ``rank`` and ``world_size`` say whose data streams to build.
    """
    check_loggers(cfg)  # a logger's package missing: said now, not after the data checks
    device = device or torch.device("cpu")
    run_dir = check_run_dir(cfg)
    start = plan_start(cfg, run_dir)
    data = read_data(cfg)
    mc = plan_model(cfg, start, data)
    resolved = resolve_config(cfg, mc)
    # the memory estimate before the data streams: a run that cannot fit never starts
    notes = check_memory(resolved, mc, device, world_size)
    loader, val_set, stream_notes = plan_data_streams(resolved, start, rank, world_size)
    notes += stream_notes
    if resolved.gradient_accumulation_steps % world_size:
        raise ValueError(
            f"gradient_accumulation_steps={resolved.gradient_accumulation_steps} is the total over all ranks "
            f"and must be divisible by the number of ranks ({world_size})"
        )
    objective = plan_objective(resolved, mc, start.step)
    if start.mode != "resume":
        notes += _check_no_earlier_run(run_dir, resolved)
    notes += _warmup_note(resolved)
    return RunPlan(
        cfg=resolved,
        run_dir=run_dir,
        start=start,
        model_config=mc,
        data=data,
        dtype=_resolve_dtype(resolved.dtype, device),
        micro_steps=resolved.gradient_accumulation_steps // world_size,
        objective=objective,
        loader=loader,
        val_set=val_set,
        notes=tuple(notes),
    )


# -- 1. the run directory ---------------------------------------------------------------------


def check_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir``, which the run may write; the data directory must be readable."""
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir {run_dir} exists and is not a directory")
    check_writable_dir(run_dir, "out_dir")
    if Path(cfg.data_dir).is_dir() and not os.access(cfg.data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"data_dir {cfg.data_dir}: no permission to read it")
    _check_not_data_or_checkpoint(run_dir, cfg.data_dir)
    return run_dir


def _check_not_data_or_checkpoint(run_dir: Path, data_dir: str) -> None:
    """A run writes its files (config, metrics, checkpoints) into out_dir: inside another
    run's checkpoints or into a data directory it would overwrite or mix with files that
    are not its own."""
    here = run_dir.resolve()
    if same_path(here, data_dir) or (here / META_FILE).is_file():
        raise ValueError(
            f"out_dir {run_dir} is a data directory (it holds {META_FILE}); choose another --out_dir"
        )
    for folder in (here, *here.parents):
        if folder.name == CHECKPOINTS_DIR and config_path(folder.parent).is_file():
            inside = f"the checkpoints of the run {folder.parent}"
        elif ckpt.is_complete(folder):
            inside = f"the checkpoint {folder}"
        else:
            continue
        raise ValueError(
            f"out_dir {run_dir} lies inside {inside}; choose a directory outside it (a fork is a new run directory)"
        )


# Keys that change how a run is watched, not what it computes: a restart may differ in them.
_WATCHING_KEYS = frozenset(
    {
        "progress",
        "device",
        "compile",
        "run_name",
        "log_interval",
        "keep_checkpoints",
        "activation_checkpointing",
    }
    | {"wandb", "wandb_project", "mlflow", "mlflow_experiment"}
)
RUN_CONFIG_HEADER = "resolved configuration written by dpls train"  # RUN/config.toml's first line


def _check_no_earlier_run(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """A new run never replaces an earlier run's files. A run without checkpoints (its
    config.toml, metrics.jsonl) is started over only when it is this very run (same config,
    written by dpls train: it stopped before its first checkpoint); else ``ValueError``."""
    found = [n for n in (CONFIG_FILE, METRICS_FILE, TOKENIZER_DIR) if (run_dir / n).exists()]
    if not found:
        return []
    cfg_file = config_path(run_dir)
    same = False
    if cfg_file.is_file() and cfg_file.read_text(encoding="utf-8", errors="replace").startswith(
        f"# {RUN_CONFIG_HEADER}"
    ):
        try:
            saved = read_toml(cfg_file)
        except ValueError:
            saved = None
        mine = {k: v for k, v in cfg.to_dict().items() if v is not None}
        if saved is not None:
            same = all(saved.get(k) == v for k, v in mine.items() if k not in _WATCHING_KEYS) and not (
                set(saved) - set(mine) - _WATCHING_KEYS
            )
    if not same:
        raise ValueError(
            f"out_dir {run_dir} already holds {', '.join(found)} of another run (without checkpoints); "
            "a new run never replaces them: choose another --out_dir, or move them away"
        )
    return [f"{run_dir} held this same run, stopped before its first checkpoint: starting it over"]


def _warmup_note(cfg: TrainConfig) -> list[str]:
    if cfg.warmup_iters <= cfg.max_iters:
        return []
    return [
        f"warmup_iters={cfg.warmup_iters} exceeds max_iters={cfg.max_iters}: the learning rate "
        f"never reaches learning_rate={cfg.learning_rate} (it stops at "
        f"{cfg.learning_rate * cfg.max_iters / max(cfg.warmup_iters, 1):.3g})"
    ]


# -- 2. the start point -----------------------------------------------------------------------


def plan_start(cfg: TrainConfig, run_dir: Path) -> StartPoint:
    """Fresh, in place from the run's latest checkpoint, or forked from ``resume_dir``'s."""
    start = StartPoint()
    if cfg.resume_dir:
        checkpoint = ckpt.resolve_checkpoint(cfg.resume_dir)
        mode: Literal["resume", "fork"] = "resume" if same_path(checkpoint.parent.parent, run_dir) else "fork"
        if mode == "resume":
            latest = ckpt.latest_checkpoint(run_dir)
            if latest is not None and not same_path(latest, checkpoint):
                raise ValueError(
                    f"{checkpoint} is not the latest checkpoint of {run_dir} ({latest.name} is); "
                    "resuming it in place would discard the later ones: fork it with another --out_dir"
                )
        state = ckpt.read_trainer_state(checkpoint)
        start = StartPoint(mode, checkpoint, state, read_run_config(checkpoint))
    if (
        start.mode == "resume"
    ):  # a damaged metrics.jsonl is named now, before any work (a torn last row is cut)
        read_metrics(run_dir, allow_torn_tail=True)
    if start.mode != "resume" and ckpt.list_checkpoints(run_dir):
        raise ValueError(
            f"out_dir {run_dir} already holds a run with checkpoints; continue it with "
            f"--resume_dir={run_dir}, or choose another --out_dir"
        )
    if start.step >= cfg.max_iters:
        raise ValueError(
            f"nothing to train: the checkpoint is at step {start.step} and max_iters is {cfg.max_iters}; "
            "pass a larger --max_iters"
        )
    return start


# -- 3. the data ------------------------------------------------------------------------------


def read_data(cfg: TrainConfig) -> DataMeta:
    """The data directory's ``meta.json`` (every shard checked), with its tokenizer fingerprint."""
    if not (Path(cfg.data_dir) / META_FILE).is_file():
        relative = not Path(cfg.data_dir).is_absolute()
        raise ValueError(
            f"data_dir {cfg.data_dir} is not a prepared data directory (no meta.json)"
            + (f" (a relative data_dir is read from the current folder, {Path.cwd()})" if relative else "")
            + f"; pass the right one with --data_dir, or make one with `dpls prepare stdlib --out {cfg.data_dir}` (or prepare files / fineweb-edu)"
        )
    meta = DataMeta.load(cfg.data_dir)
    check_meta_matches(cfg.data_dir, meta)  # an edited vocab_size or fingerprint, before it is used
    return replace(
        meta, tokenizer_fingerprint=meta.tokenizer_fingerprint or tokenizer_fingerprint_of(cfg.data_dir)
    )


# -- 4. the model -----------------------------------------------------------------------------


def plan_model(cfg: TrainConfig, start: StartPoint, data: DataMeta) -> ModelConfig:
    """The network: the preset with the user's model keys (a new run), or the checkpoint's,
    which the config may not change; either must hold every token id of the data."""
    if start.checkpoint is None:
        overrides = cfg.model_overrides()
        if cfg.pad_vocab_to is None and data.tokenizer == "gpt2":
            overrides["pad_vocab_to"] = GPT2_PAD_VOCAB_TO
        mc = model_config(cfg.model, vocab_size=data.vocab_size, **overrides)
    else:
        mc = ModelConfig.from_dict(ckpt.read_model_config(start.checkpoint))
        _check_same_model(cfg, mc, start)
    if data.vocab_size > mc.vocab_size:
        raise ValueError(
            f"the data's vocabulary ({data.vocab_size} tokens, {cfg.data_dir}) is larger than the model's "
            f"embedding ({mc.vocab_size}{', from the checkpoint' if start.checkpoint else ''})"
        )
    if start.checkpoint is not None:  # the same vocabulary size is not the same tokenizer
        check_same_tokenizer(
            ckpt.trained_tokenizer(start.checkpoint, start.trainer_state),
            cfg.data_dir,
            f"the checkpoint {start.checkpoint} was trained with",
        )
    check_token_ids(cfg.data_dir, data, mc.vocab_size)
    return mc


def _check_same_model(cfg: TrainConfig, mc: ModelConfig, start: StartPoint) -> None:
    """A resume or fork keeps the checkpoint's network: a model key given must match it."""
    for k in MODEL_OVERRIDE_KEYS:
        mine = getattr(cfg, k)
        if mine is not None and mine != getattr(mc, k):
            raise ValueError(
                f"{k}={mine} differs from the checkpoint's {getattr(mc, k)}: the model cannot change "
                "when resuming or forking"
            )
    saved_model = start.saved_config.model if start.saved_config is not None else cfg.model
    if cfg.model != saved_model:  # it would be silently replaced by the checkpoint's
        raise ValueError(
            f"model={cfg.model} differs from the checkpoint's {saved_model}: the model cannot change "
            "when resuming or forking"
        )
    if cfg.block_size is not None and cfg.block_size > mc.block_size:
        raise ValueError(f"block_size={cfg.block_size} exceeds the checkpoint model's {mc.block_size}")


# -- 5. the data streams ----------------------------------------------------------------------


def plan_data_streams(
    cfg: ResolvedConfig, start: StartPoint, rank: int, world_size: int
) -> tuple[TokenLoader, ValidationSet, list[str]]:
    """This rank's training stream (at the checkpoint's data position, when it applies) and
    validation batches: enough data for one global batch and a validation set."""
    loader = TokenLoader(
        cfg.data_dir, "train", cfg.batch_size, cfg.block_size, cfg.data_seed, rank, world_size
    )
    val_set = validation_batches(
        cfg.data_dir,
        cfg.block_size,
        cfg.batch_size,
        cfg.resolved_eval_tokens,
        rank=rank,
        world_size=world_size,
    )
    notes: list[str] = []
    if start.checkpoint is None:
        return loader, val_set, notes
    state = start.trainer_state
    try:
        saved_out_dir = start.saved_config.out_dir if start.saved_config is not None else None
        made_in = saved_path(
            start.checkpoint.parent.parent, saved_out_dir, state.get("data_dir", cfg.data_dir)
        )
        if not same_path(made_in, cfg.data_dir):
            raise ValueError(f"it was saved for data_dir={state.get('data_dir')}")
        if state.get("loader") is not None:
            loader.load_state_dict(state["loader"])
    except ValueError as err:
        if start.mode == "resume":
            raise ValueError(f"cannot continue the data stream of {start.checkpoint}: {err}") from None
        notes.append(
            f"the fork starts a fresh data order (the checkpoint's data position does not apply: {err})"
        )
    return loader, val_set, notes


# -- 6. the objective -------------------------------------------------------------------------


def plan_objective(cfg: TrainConfig, mc: ModelConfig, start_step: int) -> Objective:
    """The objective of the loss keys, checked by evaluating it once on one token (ranges that
    depend on the vocabulary, such as ``dpls_top_k <= V``, are only known here)."""
    prior = token_prior(cfg, mc.vocab_size) if cfg.loss in TOKEN_PRIOR_OBJECTIVES else None
    objective = build_objective(cfg.to_loss_config(), token_prior=prior)
    objective(torch.zeros(1, mc.vocab_size), torch.zeros(1, dtype=torch.long), step=start_step)
    return objective


def token_prior(cfg: TrainConfig, vocab_size: int) -> torch.Tensor:
    """Token frequencies of the training split as a ``[vocab_size]`` float64 tensor
    (`dpls.data.token_counts`: deterministic, so every rank gets the same)."""
    return torch.from_numpy(token_counts(cfg.data_dir, vocab_size).astype(np.float64))


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(
            f"dtype={name!r} is not supported for training (float16 needs loss scaling); "
            f"use one of auto, {', '.join(DTYPES)}"
        )
    return DTYPES[name]
