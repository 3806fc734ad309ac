"""The training loop: ``train(cfg) -> run_dir``.

Read top to bottom, it is nanoGPT's loop with the pieces this project adds:

1. `plan_run` checks everything (config, data, model fit, checkpoint to resume) and writes
   nothing: a bad input fails in a second with one message, and leaves no half run behind.
2. `train` builds the model, the objective (`dpls.losses.objective`), AdamW and the data
   loader, restores a checkpoint when resuming or forking, and runs the steps:
   gradient accumulation (``gradient_accumulation_steps`` is the total over ranks), bf16
   autocast on CUDA, gradient clipping, warmup + cosine LR, skipping of non-finite steps,
   periodic validation, metrics rows, checkpoints, and a clean stop on SIGTERM / SIGINT.

Step numbering: ``step`` is the number of optimizer steps done. The checkpoint
``step_0000100`` holds the state after 100 steps; the metrics row with ``step = 100``
describes the 100th step; the objective's schedules see the 0-based index of the step
being taken (99 for that row), so ``dpls_schedule=step, dpls_start_step=100`` trains the
101st step onward with DPLS — exactly what a fork from ``step_0000100`` does.

Resume and fork (``resume_dir``): continuing a run in place restores everything (model,
optimizer, data position, RNG) and reproduces the uninterrupted run bit for bit on CPU.
A fork starts a new run directory from another run's checkpoint: weights (and, unless
``fork_optimizer=false``, the AdamW state), the step and token counters and the data
position carry over, so the LR schedule and ε schedules continue and paired arms forked
from one checkpoint see the same tokens; only the keys given on the command line change.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpls.train import checkpoint as ckpt
from dpls.train.config import MODEL_KEYS, TrainConfig, same_path, write_config
from dpls.train.loggers import METRICS_FILE, open_loggers, truncate_metrics
from dpls.train.optim import build_optimizer, cosine_lr, set_hyperparameters
from dpls.train.perf import mfu, peak_flops
from dpls.train.progress import ProgressBar

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_DIR = "tokenizer"
# The validation metrics logged as val_<key> (MetricAccumulator's names; loss is CE).
VAL_KEYS: dict[str, str] = {
    "loss": "val_ce",
    "ppl": "val_ppl",
    "entropy": "val_entropy",
    "top1_acc": "val_top1_acc",
    "ece": "val_ece",
    "tokens": "val_tokens",
}


class TrainingError(RuntimeError):
    """The run stopped on its own (e.g. too many non-finite steps); the message says why."""


class InvalidRun(ValueError):
    """A bad input found by `plan_run`, before anything was written (the CLI's exit code 2)."""


# -- 1. the plan: every check, no writes ------------------------------------------------------


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
    """A run writes config.toml, metrics.jsonl and checkpoints/ into out_dir: inside another
    run's checkpoints (a checkpoint's own config.toml) or into a data directory it would
    overwrite or mix with files that are not its own."""
    from dpls.data.meta import META_FILE

    here = run_dir.resolve()
    if same_path(here, data_dir) or (here / META_FILE).is_file():
        raise ValueError(
            f"out_dir {run_dir} is a data directory (it holds {META_FILE}); choose another --out_dir"
        )
    for folder in (here, *here.parents):
        if folder.name == ckpt.CHECKPOINTS and (folder.parent / "config.toml").is_file():
            inside = f"the checkpoints of the run {folder.parent}"
        elif ckpt.is_complete(folder):
            inside = f"the checkpoint {folder}"
        else:
            continue
        raise ValueError(
            f"out_dir {run_dir} lies inside {inside}; choose a directory outside it (a fork is a new run directory)"
        )


def plan_run(cfg: TrainConfig, world_size: int = 1, device: torch.device | None = None) -> RunPlan:
    """Check ``cfg`` against the data, the run directory and any checkpoint to resume.

    Raises ``ValueError`` with a one-line message for every bad input; writes nothing.
    """
    from dpls.data.loader import TokenLoader, validation_batches
    from dpls.data.meta import DataMeta
    from dpls.losses.objective import build_objective
    from dpls.model import ModelConfig, model_config

    cfg = dataclasses.replace(cfg).validate()
    device = device or torch.device("cpu")
    notes: list[str] = []
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir {run_dir} exists and is not a directory")
    _check_not_data_or_checkpoint(run_dir, cfg.data_dir)

    # Where the run starts: fresh, in place from its latest checkpoint, or forked.
    checkpoint: Path | None = None
    mode = "new"
    start_step = 0
    if cfg.resume_dir:
        checkpoint = ckpt.resolve_checkpoint(cfg.resume_dir)
        source_run = checkpoint.parent.parent
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
            f"data_dir {cfg.data_dir} is not a prepared data directory (no meta.json); "
            f"make one with `dpls prepare stdlib --out {cfg.data_dir}` (or prepare files / fineweb-edu)"
        )
    meta = DataMeta.load(cfg.data_dir).to_dict()
    data_vocab = int(meta["vocab_size"])
    if checkpoint is None:
        mc = model_config(cfg.model, vocab_size=data_vocab, **cfg.model_overrides())
    else:
        mc = ModelConfig.from_dict(ckpt.read_model_config(checkpoint))
        saved_cfg = ckpt.read_config(checkpoint)
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
    for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "attention"):
        setattr(cfg, k, getattr(mc, k))
    cfg.block_size = cfg.block_size or mc.block_size
    cfg.data_seed = cfg.resolved_data_seed

    # Enough data for one global batch and a validation set; a resumed data position that fits.
    loader = TokenLoader(cfg.data_dir, "train", cfg.batch_size, cfg.block_size, cfg.data_seed, 0, world_size)
    validation_batches(cfg.data_dir, cfg.block_size, cfg.batch_size, cfg.resolved_eval_tokens)
    loader_state = None
    if checkpoint is not None:
        saved = ckpt.read_trainer_state(checkpoint)
        loader_state = saved.get("loader")
        try:
            if not same_path(saved.get("data_dir", cfg.data_dir), cfg.data_dir):
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


# -- 2. pieces of the loop --------------------------------------------------------------------


class TrainStep(nn.Module):
    """Model + objective in one module, so DDP / FSDP2 wrap (and sync) the whole computation.

    ``forward(idx)`` returns logits (validation); ``forward(idx, target, step)`` returns the
    objective's ``ObjectiveOutput``, from the logits or, with ``fused``, from the hidden
    states and the output weight (the ``[N, V]`` logits never exist).
    """

    def __init__(self, model: nn.Module, objective: Any, fused: bool) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.fused = fused

    def forward(self, idx: torch.Tensor, target: torch.Tensor | None = None, step: int = 0) -> Any:
        if target is None:
            return self.model(idx)
        if self.fused:
            hidden = self.model.hidden_states(idx)
            return self.objective.from_hidden(hidden, self.model.output_weight, target, step=step)
        return self.objective(self.model(idx), target, step=step)


@torch.no_grad()
def evaluate(
    step_module: nn.Module, val_set: Any, ctx: Any, autocast: Any, block_size: int
) -> dict[str, float]:
    """Validation metrics over this rank's share of the fixed set, summed over the ranks.

    Every rank runs the same number of forwards (FSDP2 gathers parameters collectively): a
    rank with fewer batches runs extra ones on a dummy batch and does not count them.
    """
    from dpls.eval.metrics import MetricAccumulator

    acc = MetricAccumulator(temperatures=(), topk_entropies=False)  # the cheap setting: no grid, no top-k
    rounds = int(ctx.all_reduce_max(torch.tensor([len(val_set)])).item())
    was_training = step_module.training
    step_module.eval()
    batches = iter(val_set)
    vocab = None
    for _ in range(rounds):
        x, y = next(batches, (None, None))
        real = x is not None
        if not real:
            x = torch.zeros(1, block_size, dtype=torch.long)
        with autocast:
            logits = step_module(x.to(ctx.device, non_blocking=True))
        vocab = logits.shape[-1]
        if real:
            acc.update(logits, y.to(ctx.device, non_blocking=True))
    if acc.tokens == 0 and vocab is not None:  # no batch of its own: an empty state to sum
        acc.update(
            torch.empty(0, vocab, device=ctx.device), torch.empty(0, dtype=torch.long, device=ctx.device)
        )
    acc.reduce_(ctx.all_reduce_sum)
    step_module.train(was_training)
    metrics = acc.compute()
    return {name: metrics[k] for k, name in VAL_KEYS.items()}


def _copy_tokenizer(data_dir: str, meta: dict[str, Any], run_dir: Path) -> None:
    """RUN/tokenizer/: meta.json and the tokenizer file, so ``dpls.load_tokenizer(RUN)`` works."""
    dest = run_dir / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(data_dir) / "meta.json", dest / "meta.json")
    name = meta.get("tokenizer_file")
    if name and (Path(data_dir) / name).is_file():
        shutil.copy2(Path(data_dir) / name, dest / Path(name).name)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _fmt_row(row: dict[str, Any], max_iters: int) -> str:
    parts = [f"step {row['step']}/{max_iters}"]
    for k, fmt in (
        ("loss", ".4f"),
        ("ce", ".4f"),
        ("val_ce", ".4f"),
        ("lr", ".2e"),
        ("tokens_per_s", ",.0f"),
    ):
        if isinstance(row.get(k), float) and math.isfinite(row[k]):
            parts.append(f"{k} {row[k]:{fmt}}")
    if row.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradient)")
    return " | ".join(parts)


# -- 3. the run -------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says and return the run directory. See the module docstring.

    Bad inputs raise ``ValueError`` before anything is written. SIGTERM saves a checkpoint
    and returns normally; SIGINT saves and raises ``KeyboardInterrupt``.
    """
    import torch.distributed as dist

    from dpls.data.loader import TokenLoader, validation_batches
    from dpls.distributed import StopRequest, init_distributed, maybe_inject_nan, no_sync, wrap_model
    from dpls.distributed.faults import is_out_of_space
    from dpls.distributed.parallel import transformer_blocks
    from dpls.losses.objective import build_objective
    from dpls.model import Transformer

    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        ctx = init_distributed(None if cfg.device == "auto" else cfg.device)
    except ValueError as err:
        raise InvalidRun(str(err)) from err
    try:
        try:
            plan = plan_run(cfg, ctx.world_size, ctx.device)
        except ValueError as err:
            raise InvalidRun(str(err)) from err
        cfg, run_dir = plan.cfg, plan.run_dir

        # -- model, objective, optimizer (the same initial weights on every rank) -----------
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)
        with torch.device(ctx.device):
            model = Transformer(plan.model_config)
        if cfg.compile:
            for block in transformer_blocks(model):
                block.compile()
        objective = build_objective(cfg.to_loss_config(), token_prior=plan.token_prior)
        step_module = TrainStep(model, objective, cfg.fused_linear_loss)
        fsdp_dtype = plan.dtype if (cfg.parallel == "fsdp" and plan.dtype != torch.float32) else None
        wrapped = wrap_model(step_module, ctx, cfg.parallel, param_dtype=fsdp_dtype)
        betas = (cfg.beta1, cfg.beta2)
        optimizer = build_optimizer(
            model,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            betas=betas,
            device=ctx.device,
        )
        params = [p for p in model.parameters() if p.requires_grad]

        # -- restore ----------------------------------------------------------------------
        state: dict[str, Any] = {}
        if plan.checkpoint is not None:
            load_optim = plan.mode == "resume" or cfg.fork_optimizer
            try:  # a damaged checkpoint is bad input: nothing is written yet
                state = ckpt.load_checkpoint(
                    plan.checkpoint, model=model, optimizer=optimizer if load_optim else None, ctx=ctx
                )
            except ValueError as err:
                raise InvalidRun(str(err)) from err
            set_hyperparameters(optimizer, weight_decay=cfg.weight_decay, betas=betas)
        step, tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
        skipped_in_a_row = int(state.get("skipped_in_a_row", 0)) if plan.mode == "resume" else 0

        loader = TokenLoader(
            cfg.data_dir,
            "train",
            batch_size=cfg.batch_size,
            block_size=cfg.block_size,
            seed=cfg.data_seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        if plan.loader_state is not None:
            loader.load_state_dict(plan.loader_state)
        batches = iter(loader)
        val_set = validation_batches(
            cfg.data_dir,
            cfg.block_size,
            cfg.batch_size,
            cfg.resolved_eval_tokens,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )

        # -- the run directory (rank 0 writes; nothing existed to clobber, see plan_run) -----
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(run_dir)  # left by a save that was killed
            if plan.mode == "resume":
                truncate_metrics(run_dir, step)
            else:
                (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a crashed run that never checkpointed
            write_config(cfg, run_dir / "config.toml", header="resolved configuration written by dpls train")
            _copy_tokenizer(cfg.data_dir, plan.meta, run_dir)
        ctx.barrier()
        try:
            logger = open_loggers(cfg, run_dir) if ctx.is_main else None
        except ValueError as err:  # a logger that cannot start (SwanLab without a login): no step run yet
            raise InvalidRun(str(err)) from err

        autocast = (
            torch.autocast(ctx.device.type, dtype=plan.dtype)
            if plan.dtype != torch.float32
            else nullcontext()
        )
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        flops_per_token = model.flops_per_token(cfg.block_size)
        peak = peak_flops(ctx.device, plan.dtype)

        lr_args = {
            "learning_rate": cfg.learning_rate,
            "min_lr": cfg.min_lr,
            "warmup_iters": cfg.warmup_iters,
            "lr_decay_iters": cfg.resolved_lr_decay_iters,
        }

        def save(at_step: int) -> None:
            trainer_state = {
                "tokens": tokens,
                "loader": loader.state_dict(),
                "data_dir": cfg.data_dir,
                "skipped_in_a_row": skipped_in_a_row,
                "lr": cosine_lr(at_step, **lr_args),
                "lr_schedule": lr_args,
            }
            ckpt.save_checkpoint(
                run_dir,
                at_step,
                model=model,
                optimizer=optimizer,
                trainer_state=trainer_state,
                config=cfg,
                model_config=plan.model_config,
                ctx=ctx,
                keep=cfg.keep_checkpoints,
            )

        def forward_backward(step: int) -> torch.Tensor:
            """This rank's micro-steps of one optimizer step; returns the sums of (loss, ce, ε)."""
            sums = torch.zeros(3, device=ctx.device)
            for micro in range(plan.micro_steps):
                x, y = next(batches)
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                # gradients are all-reduced once, in the backward of the last micro-step
                with no_sync(wrapped, enabled=micro < plan.micro_steps - 1), autocast:
                    out = wrapped(x, y, step)
                loss = maybe_inject_nan(out.loss, step + 1, ctx.rank)
                (loss / plan.micro_steps).backward()
                eps = torch.tensor(float(out.epsilon), device=ctx.device)
                sums += torch.stack([loss.detach().float(), out.ce.float(), eps])
            return sums

        def log(row: dict[str, Any]) -> None:
            if logger is not None:
                logger.log(row)
                bar.write(_fmt_row(row, cfg.max_iters))

        bar = ProgressBar(cfg.max_iters, step, enabled=cfg.progress and ctx.is_main, echo=ctx.is_main)
        if ctx.is_main:
            bar.write(
                f"dpls train: {plan.mode} run {run_dir} from step {step} | model {cfg.model} "
                f"({model.num_params() / 1e6:.2f}M params) | loss {cfg.loss} | "
                f"{tokens_per_step:,} tokens/step | {ctx.world_size} rank(s) on {ctx.device.type}"
            )
            for note in plan.notes:
                bar.write(f"dpls train: note: {note}")
        stopped_by: signal.Signals | None = None
        meter = _Throughput()
        started = time.perf_counter()
        try:
            with StopRequest() as stop, bar:
                if plan.mode != "resume":  # validate the starting weights: curves start at the first step
                    log(
                        {
                            "step": step,
                            "tokens": tokens,
                            **evaluate(wrapped, val_set, ctx, autocast, cfg.block_size),
                        }
                    )
                while step < cfg.max_iters:
                    t0 = time.perf_counter()
                    lr = cosine_lr(step, **lr_args)
                    set_hyperparameters(optimizer, lr=lr)
                    sums = forward_backward(step)
                    grad_norm = _clip_grad_norm(params, cfg.grad_clip)
                    # the logged loss and ce: means over the whole global batch (all micro-steps, all ranks)
                    mean_loss, mean_ce, mean_eps = (
                        ctx.all_reduce_sum(sums) / cfg.gradient_accumulation_steps
                    ).tolist()
                    nonfinite = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
                    # one collective decides for every rank: skip this update? stop after it (a signal)?
                    flags = ctx.all_reduce_max(torch.tensor([float(nonfinite), float(stop.requested)]))
                    skip, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
                    if not skip:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    skipped_in_a_row = skipped_in_a_row + 1 if skip else 0
                    step += 1
                    tokens += tokens_per_step
                    meter.add(tokens_per_step, time.perf_counter() - t0)
                    bar.update(1, loss=f"{mean_loss:.4f}", tok_s=f"{meter.last:,.0f}")

                    # -- log, evaluate, checkpoint, stop -----------------------------------------
                    last = step == cfg.max_iters
                    row: dict[str, Any] = {}
                    if step % cfg.log_interval == 0 or skip or last:
                        tps = meter.rate()
                        row = {
                            "step": step,
                            "tokens": tokens,
                            "loss": mean_loss,
                            "ce": mean_ce,
                            "epsilon": mean_eps,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tps,
                            "mfu": mfu(flops_per_token, tps, peak, ctx.world_size),
                            "skipped": int(skip),
                            "elapsed_s": time.perf_counter() - started,
                        }
                    if step % cfg.eval_interval == 0 or last:
                        row = {"step": step, "tokens": tokens, **row}
                        row.update(evaluate(wrapped, val_set, ctx, autocast, cfg.block_size))
                    if row:
                        log(row)
                    if skipped_in_a_row >= cfg.max_skipped_steps:
                        raise TrainingError(
                            f"stopped at step {step}: {skipped_in_a_row} non-finite steps in a row "
                            f"(max_skipped_steps={cfg.max_skipped_steps}); they did not change the weights; "
                            f"last checkpoint: {ckpt.latest_checkpoint(run_dir) or 'none'}"
                        )
                    if step % cfg.checkpoint_interval == 0 or last or stopping:
                        try:
                            save(step)
                        except ckpt.CheckpointError as err:
                            if last or stopping or not is_out_of_space(err):
                                raise
                            bar.write(f"dpls train: warning: {err}; training continues")
                    if stopping:
                        stopped_by = stop.received or signal.SIGTERM
                        if ctx.is_main:
                            bar.write(f"dpls train: {stopped_by.name} received: saved step {step}, stopping")
                        break
        finally:
            if logger is not None:
                logger.close()
        if stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
        return run_dir
    finally:
        if owns_group:
            ctx.destroy()


class _Throughput:
    """Tokens per second of training alone (validation and checkpoint time left out)."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.last = 0, 0.0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.last = tokens / max(seconds, 1e-9)

    def rate(self) -> float:
        """Since the previous call."""
        value = self.tokens / max(self.seconds, 1e-9)
        self.tokens, self.seconds = 0, 0.0
        return value


def read_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The last metrics row with a training loss and the last with ``val_ce`` (for printing)."""
    from dpls.train.loggers import read_metrics

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_ce" in r]
    return {"train": train_rows[-1] if train_rows else None, "val": val_rows[-1] if val_rows else None}


__all__ = [
    "InvalidRun",
    "RunPlan",
    "TrainStep",
    "TrainingError",
    "evaluate",
    "plan_run",
    "read_run_summary",
    "train",
]
