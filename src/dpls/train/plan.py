"""The plan of a run: every check before training, and no writes.

`plan_run` reads the config, the data, the run directory and any checkpoint to resume or
fork, and returns a `RunPlan`: what the trainer will do. A bad input fails here in a
second with one message, and leaves no half run behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpls._io import check_writable_dir
from dpls.data.checks import check_same_tokenizer, check_token_ids, tokenizer_fingerprint_of
from dpls.runs import checkpoint as ckpt
from dpls.runs.layout import CHECKPOINTS_DIR, CONFIG_FILE, TOKENIZER_DIR, config_path
from dpls.train.config import MODEL_KEYS, TrainConfig, read_run_config, same_path, saved_path
from dpls.train.loggers import check_loggers
from dpls.train.memory import check_memory

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RunPlan:
    cfg: TrainConfig  # resolved: model keys, block_size and data_seed filled in
    run_dir: Path
    mode: str  # "new" | "resume" | "fork"
    checkpoint: Path | None
    start_step: int
    model_config: Any  # dpls.model.ModelConfig
    meta: dict[str, Any]  # the data directory's meta.json
    micro_steps: int  # per rank, per optimizer step
    dtype: torch.dtype
    loader_state: dict[str, Any] | None  # the data position to continue from
    notes: list[str]  # things the user should know (printed at the start)
    token_prior: torch.Tensor | None  # [V] training-token frequencies, for objectives that use them


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


# Objectives that spread their smoothing mass by a prior over the vocabulary: the trainer
# gives them the training shards' token frequencies.
TOKEN_PRIOR_OBJECTIVES = frozenset({"prior_ls"})
GPT2_PAD_VOCAB_TO = 64  # pad_vocab_to for GPT-2-tokenised data unless set: 50257 -> 50304, as nanoGPT
PRIOR_MAX_TOKENS = 200_000_000  # counted from the start of every shard, in proportion


def token_prior(cfg: TrainConfig, vocab_size: int) -> torch.Tensor:
    """Token frequencies of the training split as a ``[vocab_size]`` float64 tensor.

    Counts at most `PRIOR_MAX_TOKENS` tokens (the same leading share of every shard), so a
    10B-token corpus costs seconds, not minutes; deterministic, so every rank gets the same.
    """
    import numpy as np

    from dpls.data import DataMeta, read_shard

    meta = DataMeta.load(cfg.data_dir, check_shards=False)
    counts = np.zeros(vocab_size, dtype=np.int64)
    share = min(1.0, PRIOR_MAX_TOKENS / max(1, meta.train_tokens))
    for name in meta.train_shards:
        tokens = read_shard(Path(cfg.data_dir) / name)
        head = tokens[: math.ceil(len(tokens) * share)]
        counts += np.bincount(head, minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts.astype(np.float64))


def _check_not_data_or_checkpoint(run_dir: Path, data_dir: str) -> None:
    """A run writes its files (config, metrics, checkpoints) into out_dir: inside another
    run's checkpoints or into a data directory it would overwrite or mix with files that
    are not its own."""
    from dpls.data.meta import META_FILE

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
_RUN_CONFIG_HEADER = "# resolved configuration written by dpls train"


def _check_no_earlier_run(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """A new run never replaces an earlier run's files. A run without checkpoints (its
    config.toml, metrics.jsonl) is started over only when it is this very run (same config,
    written by dpls train: it stopped before its first checkpoint); else ``ValueError``."""
    from dpls.runs.layout import METRICS_FILE, read_toml

    found = [n for n in (CONFIG_FILE, METRICS_FILE, TOKENIZER_DIR) if (run_dir / n).exists()]
    if not found:
        return []
    cfg_file = config_path(run_dir)
    same = False
    if cfg_file.is_file() and cfg_file.read_text(encoding="utf-8", errors="replace").startswith(
        _RUN_CONFIG_HEADER
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


def plan_run(cfg: TrainConfig, world_size: int = 1, device: torch.device | None = None) -> RunPlan:
    """Check ``cfg`` against the data, the run directory and any checkpoint to resume.

    Raises ``ValueError`` with a one-line message for every bad input; writes nothing.
    """
    from dpls.data.loader import TokenLoader, validation_batches
    from dpls.data.meta import DataMeta
    from dpls.losses.objective import build_objective
    from dpls.model import ModelConfig, model_config

    cfg = dataclasses.replace(cfg).validate()
    check_loggers(cfg)  # a logger's package missing: said now, not after the data checks
    device = device or torch.device("cpu")
    notes: list[str] = []
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir {run_dir} exists and is not a directory")
    check_writable_dir(run_dir, "out_dir")
    if Path(cfg.data_dir).is_dir() and not os.access(cfg.data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"data_dir {cfg.data_dir}: no permission to read it")
    _check_not_data_or_checkpoint(run_dir, cfg.data_dir)

    # Where the run starts: fresh, in place from its latest checkpoint, or forked.
    checkpoint: Path | None = None
    mode = "new"
    start_step = 0
    if cfg.resume_dir:
        checkpoint = ckpt.resolve_checkpoint(cfg.resume_dir)
        source_run = source_dir = checkpoint.parent.parent
        if same_path(source_run, run_dir):
            mode = "resume"
            latest = ckpt.latest_checkpoint(run_dir)
            if latest is not None and not same_path(latest, checkpoint):
                raise ValueError(
                    f"{checkpoint} is not the latest checkpoint of {run_dir} ({latest.name} is); "
                    "resuming it in place would discard the later ones: fork it with another --out_dir"
                )
        else:
            mode = "fork"
        start_step = int(ckpt.read_trainer_state(checkpoint)["step"])
    if mode != "resume" and ckpt.list_checkpoints(run_dir):
        raise ValueError(
            f"out_dir {run_dir} already holds a run with checkpoints; continue it with "
            f"--resume_dir={run_dir}, or choose another --out_dir"
        )
    if start_step >= cfg.max_iters:
        raise ValueError(
            f"nothing to train: the checkpoint is at step {start_step} and max_iters is {cfg.max_iters}; "
            "pass a larger --max_iters"
        )

    # The data (every shard checked), and a model it fits.
    if not (Path(cfg.data_dir) / "meta.json").is_file():
        raise ValueError(
            f"data_dir {cfg.data_dir} is not a prepared data directory (no meta.json)"
            + (
                f" (a relative data_dir is read from the current folder, {Path.cwd()})"
                if not Path(cfg.data_dir).is_absolute()
                else ""
            )
            + f"; pass the right one with --data_dir, or make one with `dpls prepare stdlib --out {cfg.data_dir}` (or prepare files / fineweb-edu)"
        )
    data_meta = DataMeta.load(cfg.data_dir)
    meta = data_meta.to_dict()
    meta["tokenizer_fingerprint"] = meta["tokenizer_fingerprint"] or tokenizer_fingerprint_of(cfg.data_dir)
    data_vocab = int(meta["vocab_size"])
    if checkpoint is None:
        overrides = cfg.model_overrides()
        if cfg.pad_vocab_to is None and meta.get("tokenizer") == "gpt2":
            overrides["pad_vocab_to"] = GPT2_PAD_VOCAB_TO
        mc = model_config(cfg.model, vocab_size=data_vocab, **overrides)
    else:
        mc = ModelConfig.from_dict(ckpt.read_model_config(checkpoint))
        saved_cfg = read_run_config(checkpoint)
        for k in MODEL_KEYS[1:]:
            mine = getattr(cfg, k)
            if mine is not None and mine != getattr(mc, k):
                raise ValueError(
                    f"{k}={mine} differs from the checkpoint's {getattr(mc, k)}: the model cannot change "
                    "when resuming or forking"
                )
        if cfg.model != saved_cfg.model:  # it would be silently replaced by the checkpoint's
            raise ValueError(
                f"model={cfg.model} differs from the checkpoint's {saved_cfg.model}: the model cannot change "
                "when resuming or forking"
            )
        if cfg.block_size is not None and cfg.block_size > mc.block_size:
            raise ValueError(f"block_size={cfg.block_size} exceeds the checkpoint model's {mc.block_size}")
    if data_vocab > mc.vocab_size:
        raise ValueError(
            f"the data's vocabulary ({data_vocab} tokens, {cfg.data_dir}) is larger than the model's "
            f"embedding ({mc.vocab_size}{', from the checkpoint' if checkpoint else ''})"
        )
    if checkpoint is not None:  # the same vocabulary size is not the same tokenizer
        check_same_tokenizer(
            ckpt.trained_tokenizer(checkpoint), cfg.data_dir, f"the checkpoint {checkpoint} was trained with"
        )
    check_token_ids(cfg.data_dir, data_meta, mc.vocab_size)
    for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "attention", "pad_vocab_to", "qk_norm"):
        setattr(cfg, k, getattr(mc, k))
    cfg.block_size = cfg.block_size or mc.block_size
    cfg.data_seed = cfg.resolved_data_seed
    notes += check_memory(cfg, mc, device, world_size)  # before the data: a run that cannot fit never starts

    # Enough data for one global batch and a validation set; a resumed data position that fits.
    loader = TokenLoader(cfg.data_dir, "train", cfg.batch_size, cfg.block_size, cfg.data_seed, 0, world_size)
    validation_batches(cfg.data_dir, cfg.block_size, cfg.batch_size, cfg.resolved_eval_tokens)
    loader_state = None
    if checkpoint is not None:
        saved = ckpt.read_trainer_state(checkpoint)
        loader_state = saved.get("loader")
        try:
            made_in = saved_path(
                source_dir, read_run_config(checkpoint).out_dir, saved.get("data_dir", cfg.data_dir)
            )
            if not same_path(made_in, cfg.data_dir):
                raise ValueError(f"it was saved for data_dir={saved.get('data_dir')}")
            if loader_state is not None:
                loader.load_state_dict(loader_state)
        except ValueError as err:
            if mode == "resume":
                raise ValueError(f"cannot continue the data stream of {checkpoint}: {err}") from None
            loader_state = None
            notes.append(
                f"the fork starts a fresh data order (the checkpoint's data position does not apply: {err})"
            )

    if cfg.gradient_accumulation_steps % world_size:
        raise ValueError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the total over all ranks "
            f"and must be divisible by the number of ranks ({world_size})"
        )
    # Every loss key is checked by building the objective and evaluating it once on one token
    # (ranges that depend on the vocabulary, such as dpls_top_k <= V, are only known here).
    prior = token_prior(cfg, mc.vocab_size) if cfg.loss in TOKEN_PRIOR_OBJECTIVES else None
    objective = build_objective(cfg.to_loss_config(), token_prior=prior)
    objective(torch.zeros(1, mc.vocab_size), torch.zeros(1, dtype=torch.long), step=start_step)
    if mode != "resume":
        notes += _check_no_earlier_run(run_dir, cfg)
    if cfg.warmup_iters > cfg.max_iters:
        notes.append(
            f"warmup_iters={cfg.warmup_iters} exceeds max_iters={cfg.max_iters}: the learning rate "
            f"never reaches learning_rate={cfg.learning_rate} (it stops at "
            f"{cfg.learning_rate * cfg.max_iters / max(cfg.warmup_iters, 1):.3g})"
        )
    return RunPlan(
        cfg=cfg,
        run_dir=run_dir,
        mode=mode,
        checkpoint=checkpoint,
        start_step=start_step,
        model_config=mc,
        meta=meta,
        micro_steps=cfg.gradient_accumulation_steps // world_size,
        dtype=_resolve_dtype(cfg.dtype, device),
        loader_state=loader_state,
        notes=notes,
        token_prior=prior,
    )
