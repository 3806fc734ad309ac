"""The training loop: ``train(cfg) -> run_dir``.

Read top to bottom, it is nanoGPT's loop with the pieces this project adds:

1. `dpls.train.plan.plan_run` checks everything (config, data, model fit, checkpoint to
   resume) and writes nothing: a bad input fails in a second with one message. Its
   `RunPlan` holds the resolved config, the model config, the objective and the data streams.
2. `build` makes the model, its DDP / FSDP2 wrapping and AdamW, and restores the checkpoint
   when resuming or forking: the `Parts` a step works with.
3. `dpls.train.step.train_step` is one optimizer step: gradient accumulation
   (``gradient_accumulation_steps`` is the total over ranks), bf16 autocast on CUDA, gradient
   clipping, and skipping of a non-finite step; it returns the step's statistics.
4. `train` runs the steps with warmup + cosine LR. Each component decides when it acts and
   keeps its own state: `MetricsLog` (metrics rows, progress bar), `Validator` (periodic
   validation), `RunWatch` (non-finite steps, loss spikes, divergence) and `Checkpointer`; a SIGTERM /
   SIGINT stops the run cleanly after a checkpoint.

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

import shutil
import signal
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpls.data.meta import META_FILE, DataMeta
from dpls.distributed import DistContext, Faults, StopRequest, init_distributed, wrap_model
from dpls.distributed.parallel import transformer_blocks
from dpls.model import Transformer
from dpls.runs.checkpoint import recover_checkpoints, restore_checkpoint
from dpls.runs.layout import (
    DIVERGED_FILE,
    TOKENIZER_DIR,
    config_path,
    metrics_path,
    read_metrics,
    run_writer,
    truncate_metrics,
)
from dpls.train.checkpointing import Checkpointer
from dpls.train.config import TrainConfig, write_config
from dpls.train.metrics_log import MetricsLog
from dpls.train.optim import build_optimizer, set_hyperparameters
from dpls.train.plan import RUN_CONFIG_HEADER, InvalidRun, RunPlan, plan_run
from dpls.train.step import Parts, StepStats, TrainStep, train_step
from dpls.train.validation import Validator
from dpls.train.watch import Diverged, RunWatch, TrainingError


def train(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says and return the run directory. See the module docstring.

    Bad inputs raise `InvalidRun` (a ``ValueError``) before anything is written. SIGTERM
    saves a checkpoint and returns normally; SIGINT saves and raises ``KeyboardInterrupt``.
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        ctx = init_distributed(None if cfg.device == "auto" else cfg.device)
    except ValueError as err:
        raise InvalidRun(str(err)) from err
    held = ExitStack()  # the run's write lock, from the plan to the last file
    try:
        try:
            held.enter_context(run_writer(cfg.out_dir, ctx))  # a second writer is refused here
            plan = plan_run(cfg, ctx.world_size, ctx.device, rank=ctx.rank)
        except ValueError as err:
            raise InvalidRun(str(err)) from err
        parts = build(plan, ctx)
        step, tokens, run = plan.start.step, plan.start.tokens, plan.cfg
        watch = RunWatch(plan, ctx)
        prepare_run_dir(plan, ctx, step)
        log = MetricsLog(plan, parts, step)
        validator = Validator(plan, parts)
        checkpointer = Checkpointer(plan, parts, log.console)
        log.announce(plan, parts, step)
        stopped_by: signal.Signals | None = None
        with StopRequest() as stop, log:
            if plan.start.mode != "resume":  # validate the starting weights: curves start at the first step
                first = validator.run()
                watch.start(first["val_ce"])
                log.write({"step": step, "tokens": tokens, **first})
            while step < run.max_iters:
                t0 = time.perf_counter()
                lr = plan.lr_at(step)
                log_step = log.should_log(step + 1)
                stats = train_step(parts, step, lr, stop.requested, diagnostics=log_step)
                step, tokens = step + 1, tokens + plan.tokens_per_step
                watch.add(stats.skipped, stats.loss, step)
                save_step = checkpointer.should_save(step, stopping=stats.stopping)
                # The host waits for the device on log and checkpoint steps only.
                values = stats.read() if log_step else None
                skipped = watch.read() if log_step or save_step else 0
                log.step_done(time.perf_counter() - t0)

                # -- log, validate, watch, checkpoint, stop ------------------------------------
                spikes = watch.spikes.count() if log_step else None  # the device is read already
                row = log.training_row(step, tokens, lr, values, skipped, spikes, stats.diagnostics)
                if row:
                    watch.row_written()
                if validator.should_validate(step):
                    row = {"step": step, "tokens": tokens, **row, **validator.run()}
                if row:
                    log.write(row)
                watch.check(step, values["ce"] if values is not None else None)
                if save_step:
                    checkpointer.save(step, tokens, watch.state_dict(), stopping=stats.stopping)
                if stats.stopping:
                    stopped_by = stop.received or signal.SIGTERM
                    if ctx.is_main:
                        log.console.write(
                            f"dpls train: {stopped_by.name} received: saved step {step}, stopping"
                        )
                    break
        if stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
        return plan.run_dir
    finally:
        held.close()
        if owns_group:
            ctx.destroy()


def build(plan: RunPlan, ctx: DistContext) -> Parts:
    """The model, its DDP / FSDP2 wrapping and AdamW; restores the plan's checkpoint, if any.

    Every rank builds the same initial weights (seeded by ``cfg.seed``). A damaged checkpoint
    is bad input (`InvalidRun`): nothing is written yet.
    """
    cfg = plan.cfg
    try:
        faults = Faults.from_env()
    except ValueError as err:
        raise InvalidRun(str(err)) from err
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    with torch.device(ctx.device):
        model = Transformer(plan.model_config)
    model.set_activation_checkpointing(cfg.activation_checkpointing)  # before compile and wrapping
    if cfg.compile:
        for block in transformer_blocks(model):
            block.compile()
    step_module = TrainStep(model, plan.objective, cfg.fused_linear_loss)
    fsdp_dtype = plan.dtype if (cfg.parallel == "fsdp" and plan.dtype != torch.float32) else None
    wrapped = wrap_model(step_module, ctx, cfg.parallel, param_dtype=fsdp_dtype)
    betas = (cfg.beta1, cfg.beta2)
    optimizer = build_optimizer(
        model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=betas, device=ctx.device
    )
    if plan.start.checkpoint is not None:
        load_optimizer = plan.start.mode == "resume" or cfg.fork_optimizer
        try:
            restore_checkpoint(
                plan.start.checkpoint, model=model, optimizer=optimizer if load_optimizer else None, ctx=ctx
            )
        except ValueError as err:
            raise InvalidRun(str(err)) from err
        set_hyperparameters(optimizer, weight_decay=cfg.weight_decay, betas=betas)
    autocast = (
        torch.autocast(ctx.device.type, dtype=plan.dtype) if plan.dtype != torch.float32 else nullcontext()
    )
    return Parts(
        ctx=ctx,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        batches=iter(plan.loader),
        autocast=autocast,
        micro_steps=plan.micro_steps,
        grad_clip=cfg.grad_clip,
        faults=faults,
    )


def prepare_run_dir(plan: RunPlan, ctx: DistContext, step: int) -> None:
    """Rank 0 writes the run's config and tokenizer (nothing existed to clobber, see `plan_run`)."""
    cfg, run_dir = plan.cfg, plan.run_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(run_dir)  # finish or undo a save that was killed
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # this run continues: no longer diverged
        if plan.start.mode == "resume":
            truncate_metrics(run_dir, step)
        else:
            metrics_path(run_dir).unlink(missing_ok=True)  # a crashed run that never checkpointed
        write_config(cfg, config_path(run_dir), header=RUN_CONFIG_HEADER)
        _copy_tokenizer(cfg.data_dir, plan.data, run_dir)
    ctx.barrier()


def _copy_tokenizer(data_dir: str, meta: DataMeta, run_dir: Path) -> None:
    """RUN/tokenizer/: meta.json and the tokenizer file, so ``dpls.load_tokenizer(RUN)`` works."""
    dest = run_dir / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(data_dir) / META_FILE, dest / META_FILE)
    name = meta.tokenizer_file
    if name and (Path(data_dir) / name).is_file():
        shutil.copy2(Path(data_dir) / name, dest / Path(name).name)


def read_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The last metrics row with a training loss and the last with ``val_ce`` (for printing)."""
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_ce" in r]
    return {"train": train_rows[-1] if train_rows else None, "val": val_rows[-1] if val_rows else None}


__all__ = [
    "Diverged",
    "InvalidRun",
    "Parts",
    "StepStats",
    "TrainStep",
    "TrainingError",
    "build",
    "read_run_summary",
    "train",
    "train_step",
]
