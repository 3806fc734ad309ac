"""The training loop: ``train(cfg) -> run_dir``.

Read top to bottom, it is nanoGPT's loop with the pieces this project adds:

1. `dpls.train.plan.plan_run` checks everything (config, data, model fit, checkpoint to
   resume) and writes nothing: a bad input fails in a second with one message.
2. `build` makes the model, the objective (`dpls.losses.objective`), AdamW and the data
   loader, and restores a checkpoint when resuming or forking.
3. `train_step` is one optimizer step: gradient accumulation (``gradient_accumulation_steps``
   is the total over ranks), bf16 autocast on CUDA, gradient clipping, and skipping of a
   non-finite step; it returns the step's statistics.
4. `train` runs the steps with warmup + cosine LR, periodic validation, metrics rows,
   checkpoints, and a clean stop on SIGTERM / SIGINT.

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

import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpls._io import write_json_atomic
from dpls.runs import checkpoint as ckpt
from dpls.runs.layout import (
    DIVERGED_FILE,
    TOKENIZER_DIR,
    config_path,
    metrics_path,
    read_metrics,
    truncate_metrics,
)
from dpls.train.config import TrainConfig, write_config
from dpls.train.diagnostics import DivergenceWatch
from dpls.train.loggers import open_loggers
from dpls.train.optim import build_optimizer, cosine_lr, set_hyperparameters
from dpls.train.perf import mfu, peak_flops
from dpls.train.plan import RunPlan, plan_run
from dpls.train.progress import ProgressBar

if TYPE_CHECKING:
    from dpls.distributed import Faults

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


class Diverged(TrainingError):
    """The run diverged (see `dpls.train.diagnostics`); RUN/diverged.json says where and why."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class InvalidRun(ValueError):
    """A bad input found by `plan_run`, before anything was written (the CLI's exit code 2)."""


# -- pieces of the loop -----------------------------------------------------------------------


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
        # The logits are this module's own temporaries (forward(idx, target) never returns them),
        # so the loss may overwrite them with their gradient. On a CPU that saves allocating and
        # page-faulting a fresh [N, V] gradient every step (measured: 0–7% of a step at nanoGPT's
        # CPU shape); on GPUs it is left off until measured there.
        objective.inplace_backward = next(model.parameters()).device.type == "cpu"
        self.diagnostics: Any = None  # a train.diagnostics.Diagnostics on log steps: record the logits

    def forward(self, idx: torch.Tensor, target: torch.Tensor | None = None, step: int = 0) -> Any:
        if target is None:
            return self.model(idx)
        if self.fused:
            hidden = self.model.hidden_states(idx)
            if self.diagnostics is not None:
                self.diagnostics.add_hidden(hidden, self.model.output_weight)
            return self.objective.from_hidden(hidden, self.model.output_weight, target, step=step)
        logits = self.model(idx)
        vocab = self.model.config.vocab_size
        if logits.shape[-1] > vocab:  # pad_vocab_to: the padded (-inf) columns are no tokens
            logits = logits[..., :vocab]
        out = self.objective(logits, target, step=step)
        if self.diagnostics is not None:
            self.diagnostics.add_logits(logits, target, out.ce)
        return out


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
    from dpls.data.meta import META_FILE

    dest = run_dir / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(data_dir) / META_FILE, dest / META_FILE)
    name = meta.get("tokenizer_file")
    if name and (Path(data_dir) / name).is_file():
        shutil.copy2(Path(data_dir) / name, dest / Path(name).name)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping, left on the device (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


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


# -- the model, optimizer and data of a run --------------------------------------------------


@dataclass
class Parts:
    """What the loop works with, built once by `build`."""

    ctx: Any  # dpls.distributed.DistContext
    model: nn.Module  # the bare Transformer (checkpoints, FLOPs)
    wrapped: nn.Module  # TrainStep under DDP / FSDP2: what the loop calls
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    loader: Any  # dpls.data.TokenLoader: its position goes into checkpoints
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    val_set: Any  # this rank's share of the fixed validation batches
    autocast: Any  # torch.autocast, or a null context in float32
    state: dict[str, Any]  # the restored trainer state ({} for a new run)
    faults: Faults  # faults injected by tests (none in a real run)
    stop_flag: torch.Tensor | None = None  # several ranks: the stop request reduced with the last step


def build(plan: RunPlan, ctx: Any) -> Parts:
    """Model, objective, optimizer and data loader; restores the plan's checkpoint, if any.

    Every rank builds the same initial weights (seeded by ``cfg.seed``). A damaged checkpoint
    is bad input (`InvalidRun`): nothing is written yet.
    """
    from dpls.data.loader import TokenLoader, validation_batches
    from dpls.distributed import Faults, wrap_model
    from dpls.distributed.parallel import transformer_blocks
    from dpls.losses.objective import build_objective
    from dpls.model import Transformer

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

    state: dict[str, Any] = {}
    if plan.checkpoint is not None:
        load_optim = plan.mode == "resume" or cfg.fork_optimizer
        try:
            state = ckpt.load_checkpoint(
                plan.checkpoint, model=model, optimizer=optimizer if load_optim else None, ctx=ctx
            )
        except ValueError as err:
            raise InvalidRun(str(err)) from err
        set_hyperparameters(optimizer, weight_decay=cfg.weight_decay, betas=betas)

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
    autocast = (
        torch.autocast(ctx.device.type, dtype=plan.dtype) if plan.dtype != torch.float32 else nullcontext()
    )
    return Parts(ctx, model, wrapped, optimizer, params, loader, batches, val_set, autocast, state, faults)


def prepare_run_dir(plan: RunPlan, ctx: Any, step: int) -> None:
    """Rank 0 writes the run's config and tokenizer (nothing existed to clobber, see `plan_run`)."""
    cfg, run_dir = plan.cfg, plan.run_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(run_dir)  # left by a save that was killed
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # this run continues: no longer diverged
        if plan.mode == "resume":
            truncate_metrics(run_dir, step)
        else:
            metrics_path(run_dir).unlink(missing_ok=True)  # a crashed run that never checkpointed
        write_config(cfg, config_path(run_dir), header="resolved configuration written by dpls train")
        _copy_tokenizer(cfg.data_dir, plan.meta, run_dir)
    ctx.barrier()


# -- one optimizer step -----------------------------------------------------------------------


# What `StepStats.values` holds, in order:
# loss: the objective, mean over the whole global batch (all micro-steps, all ranks);
# ce: plain cross-entropy of the same tokens; epsilon: the ε in force; grad_norm: before clipping;
# skipped: 1.0 when the loss or gradient was non-finite on some rank (the weights did not change).
STEP_VALUES = ("loss", "ce", "epsilon", "grad_norm", "skipped")


@dataclass
class StepStats:
    """One optimizer step, as every rank agrees on it.

    The values stay on the device: reading them waits for the device to finish the step, so
    the loop reads them (`read`) on log steps only and the host runs ahead on the others.
    """

    values: torch.Tensor  # float32 [len(STEP_VALUES)], on the device
    stopping: bool  # some rank received SIGTERM / SIGINT: stop after this step
    diagnostics: dict[str, float] | None = None  # logit_max, lse_mean, attn_logit_max (log steps)

    @property
    def skipped(self) -> torch.Tensor:
        """1.0 if the step was skipped, else 0.0 (on the device)."""
        return self.values[STEP_VALUES.index("skipped")]

    def read(self) -> dict[str, float]:
        """The values on the host: one small copy, which waits for the step to finish."""
        return dict(zip(STEP_VALUES, self.values.tolist(), strict=True))


def _step_module(parts: Parts) -> TrainStep:
    return getattr(parts.wrapped, "module", parts.wrapped)  # DDP wraps it; FSDP2 shards it in place


def _record_diagnostics(parts: Parts, diag: Any) -> None:
    """Switch the recording of `dpls.train.diagnostics` on (``diag``) or off (None)."""
    _step_module(parts).diagnostics = diag
    parts.model.record_attention_logits(diag is not None)


def train_step(
    parts: Parts, cfg: TrainConfig, step: int, lr: float, stop_requested: bool, diagnostics: bool = False
) -> StepStats:
    """One optimizer step at learning rate ``lr``: this rank's micro-steps, clipping, and the update.

    ``step`` is the 0-based index of the step being taken (the objective's schedules see it).
    Gradients are all-reduced once, in the backward of the last micro-step. Nothing here
    waits for the device: whether to skip a non-finite update is decided on the device (the
    fused AdamW's ``found_inf``, as ``GradScaler`` uses it), and with several ranks the
    stop request is agreed one step late (the flag reduced with this step is read in the
    next one, when this step's work is already queued).
    ``diagnostics`` (log steps): also measure the instability diagnostics of this step's
    forward (`dpls.train.diagnostics`); the gradients and the update are the same either way.
    """
    from dpls.distributed import no_sync
    from dpls.losses.validation import values_checked

    ctx, wrapped = parts.ctx, parts.wrapped
    micro_steps = cfg.gradient_accumulation_steps // ctx.world_size
    set_hyperparameters(parts.optimizer, lr=lr)
    sums = torch.zeros(3, device=ctx.device)  # this rank's sums of (loss, ce, ε)
    diag = None
    if diagnostics:
        from dpls.train.diagnostics import Diagnostics

        diag = Diagnostics(ctx.device)
        _record_diagnostics(parts, diag)
    for micro in range(micro_steps):
        x, y = next(parts.batches)
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        # values_checked: plan_run checked every token id against V (no scan on the device)
        with no_sync(wrapped, enabled=micro < micro_steps - 1), parts.autocast, values_checked():
            out = wrapped(x, y, step)
        if diag is not None:
            diag.add_attention(parts.model.attention_logit_max())
        loss = parts.faults.nan(out.loss, step + 1, ctx.rank)
        (loss / micro_steps).backward()
        sums += torch.stack([loss.detach().float(), out.ce.float(), _as_float32(out.epsilon, sums)])
    grad_norm = _clip_grad_norm(parts.params, cfg.grad_clip).float().reshape(1)
    means = ctx.all_reduce_sum(sums) / cfg.gradient_accumulation_steps
    nonfinite = (~torch.isfinite(means[0]) | ~torch.isfinite(grad_norm[0])).float()
    if ctx.world_size == 1:
        skip, stopping = nonfinite, stop_requested
    else:
        flags = ctx.all_reduce_max(
            torch.stack([nonfinite, torch.full_like(nonfinite, float(stop_requested))])
        )
        skip, pending = flags[0], parts.stop_flag
        parts.stop_flag = flags[1]
        stopping = pending is not None and bool(pending > 0)  # last step's flag: done by now
    _step_unless(parts.optimizer, skip)
    parts.optimizer.zero_grad(set_to_none=True)
    values = None
    if diag is not None:
        _record_diagnostics(parts, None)
        values = diag.reduce(ctx)
    return StepStats(torch.cat([means, grad_norm, skip.reshape(1)]), stopping, values)


def _as_float32(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on ``like``'s device; a Python float is filled in, never copied
    from the host (and a tensor is never read back)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return like.new_full((), value, dtype=torch.float32)


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a 0-d float tensor, 1.0: skip).

    A fused optimizer takes the decision on the device: its ``found_inf`` input (set the way
    ``GradScaler`` sets it) leaves parameters, moments and the step count untouched, exactly
    as if ``step()`` had not been called. Any other optimizer reads the flag on the host.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        optimizer.found_inf = skip  # type: ignore[attr-defined]
        optimizer.step()
    elif not bool(skip > 0):
        optimizer.step()


# -- the run ----------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says and return the run directory. See the module docstring.

    Bad inputs raise ``ValueError`` before anything is written. SIGTERM saves a checkpoint
    and returns normally; SIGINT saves and raises ``KeyboardInterrupt``.
    """
    import torch.distributed as dist

    from dpls.distributed import StopRequest, init_distributed
    from dpls.distributed.faults import is_out_of_space

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
        parts = build(plan, ctx)
        step, tokens = int(parts.state.get("step", 0)), int(parts.state.get("tokens", 0))
        skipped_in_a_row = int(parts.state.get("skipped_in_a_row", 0)) if plan.mode == "resume" else 0
        watch = DivergenceWatch(cfg.divergence_window)
        if plan.mode == "resume":
            watch.load_state_dict(parts.state)
        prepare_run_dir(plan, ctx, step)
        try:
            logger = open_loggers(cfg, run_dir) if ctx.is_main else None
        except ValueError as err:  # a logger that cannot start (SwanLab without a login): no step run yet
            raise InvalidRun(str(err)) from err

        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        flops_per_token = parts.model.flops_per_token(cfg.block_size)
        peak = peak_flops(ctx.device, plan.dtype)
        lr_args = {
            "learning_rate": cfg.learning_rate,
            "min_lr": cfg.min_lr,
            "warmup_iters": cfg.warmup_iters,
            "lr_decay_iters": cfg.resolved_lr_decay_iters,
        }

        def validate() -> dict[str, float]:
            return evaluate(parts.wrapped, parts.val_set, ctx, parts.autocast, cfg.block_size)

        def log(row: dict[str, Any]) -> None:
            if logger is not None:
                logger.log(row)
                bar.write(_fmt_row(row, cfg.max_iters))

        def save(at_step: int) -> None:
            trainer_state = {
                "tokens": tokens,
                "loader": parts.loader.state_dict(),
                "data_dir": cfg.data_dir,
                "tokenizer_fingerprint": plan.meta.get("tokenizer_fingerprint"),  # what the ids mean
                "skipped_in_a_row": skipped_in_a_row,
                **watch.state_dict(),
                "lr": cosine_lr(at_step, **lr_args),
                "lr_schedule": lr_args,
            }
            ckpt.save_checkpoint(
                run_dir,
                at_step,
                model=parts.model,
                optimizer=parts.optimizer,
                trainer_state=trainer_state,
                config=cfg,
                model_config=plan.model_config,
                ctx=ctx,
                keep=cfg.keep_checkpoints,
                faults=parts.faults,
            )

        def diverged(began: int, reason: str) -> Diverged:
            """Record the divergence in RUN/diverged.json (rank 0) and the error every rank raises."""
            if ctx.is_main:
                record = {
                    "step": began,
                    "detected_at": step,
                    "reason": reason,
                    "initial_val_ce": watch.initial,
                }
                write_json_atomic(run_dir / DIVERGED_FILE, record)
            return Diverged(
                f"stopped at step {step}: {reason}: diverged from step {began}; "
                f"last checkpoint: {ckpt.latest_checkpoint(run_dir) or 'none'}",
                began,
            )

        bar = ProgressBar(cfg.max_iters, step, enabled=cfg.progress and ctx.is_main, echo=ctx.is_main)
        if ctx.is_main:
            bar.write(
                f"dpls train: {plan.mode} run {run_dir} from step {step} | model {cfg.model} "
                f"({parts.model.num_params() / 1e6:.2f}M params) | loss {cfg.loss} | "
                f"{tokens_per_step:,} tokens/step | {ctx.world_size} rank(s) on {ctx.device.type}"
            )
            for note in plan.notes:
                bar.write(f"dpls train: note: {note}")
        stopped_by: signal.Signals | None = None
        meter = _Throughput()
        skips = _Skips(ctx.device, skipped_in_a_row, cfg.max_skipped_steps)
        tripped = 0  # the step at which max_skipped_steps in a row were reached (0: never)
        started = time.perf_counter()
        try:
            with StopRequest() as stop, bar:
                if plan.mode != "resume":  # validate the starting weights: curves start at the first step
                    first = validate()
                    watch.initial = first["val_ce"]
                    log({"step": step, "tokens": tokens, **first})
                while step < cfg.max_iters:
                    t0 = time.perf_counter()
                    lr = cosine_lr(step, **lr_args)
                    log_step = (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters
                    stats = train_step(parts, cfg, step, lr, stop.requested, diagnostics=log_step)
                    step += 1
                    tokens += tokens_per_step
                    skips.add(stats.skipped, step)
                    last = step == cfg.max_iters
                    save_step = step % cfg.checkpoint_interval == 0 or last or stats.stopping
                    # The host waits for the device on log and checkpoint steps only.
                    values = stats.read() if log_step else None
                    skipped_since_row = 0
                    if log_step or save_step:
                        skipped_since_row, skipped_in_a_row, tripped = skips.read()
                    meter.add(tokens_per_step, time.perf_counter() - t0)

                    # -- log, evaluate, checkpoint, stop ---------------------------------------
                    row: dict[str, Any] = {}
                    if values is None:
                        bar.update(1)
                    else:
                        tps = meter.rate()
                        bar.update(1, loss=f"{values['loss']:.4f}", tok_s=f"{tps:,.0f}")
                        skips.logged()
                        row = {
                            "step": step,
                            "tokens": tokens,
                            "loss": values["loss"],
                            "ce": values["ce"],
                            "epsilon": values["epsilon"],
                            "lr": lr,
                            "grad_norm": values["grad_norm"],
                            "tokens_per_s": tps,
                            "mfu": mfu(flops_per_token, tps, peak, ctx.world_size),
                            "skipped": skipped_since_row,  # steps skipped since the previous row
                            **(stats.diagnostics or {}),
                            "elapsed_s": time.perf_counter() - started,
                        }
                    if step % cfg.eval_interval == 0 or last:
                        row = {"step": step, "tokens": tokens, **row, **validate()}
                    if row:
                        log(row)
                    if values is not None and (began := watch.see(step, values["ce"])) is not None:
                        raise diverged(
                            began,
                            f"the training CE of {watch.window} logged steps in a row was above the "
                            f"initial validation CE {watch.initial:.4f} or not finite",
                        )
                    if tripped:  # found at this read; the limit may have been reached a few steps ago
                        raise diverged(
                            tripped - cfg.max_skipped_steps + 1,
                            f"{max(skipped_in_a_row, cfg.max_skipped_steps)} non-finite steps in a row "
                            f"(max_skipped_steps={cfg.max_skipped_steps}); they did not change the weights",
                        )
                    if step % cfg.checkpoint_interval == 0 or last or stats.stopping:
                        try:
                            save(step)
                        except ckpt.CheckpointError as err:
                            if last or stats.stopping or not is_out_of_space(err):
                                raise
                            bar.write(f"dpls train: warning: {err}; training continues")
                    if stats.stopping:
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


class _Skips:
    """Skipped (non-finite) steps counted on the device, so that a step that is not logged
    never waits to learn whether it was skipped; `read` (log and checkpoint steps) copies
    three numbers to the host."""

    def __init__(self, device: torch.device, in_a_row: int, limit: int) -> None:
        # skipped since the last row, skipped in a row now, the step at which `limit` in a row
        # was first reached (0: not yet); float64 holds step numbers exactly
        self._t = torch.tensor([0.0, float(in_a_row), 0.0], dtype=torch.float64, device=device)
        self.limit = limit

    def add(self, skipped: torch.Tensor, step: int) -> None:
        since, run, tripped = self._t.unbind()
        run = (run + 1) * skipped
        tripped = torch.where((tripped == 0) & (run >= self.limit), float(step), tripped)
        self._t = torch.stack([since + skipped, run, tripped])

    def read(self) -> tuple[int, int, int]:
        """(skipped since the last row, skipped in a row now, step the limit tripped or 0)."""
        since, run, tripped = self._t.tolist()
        return int(since), int(run), int(tripped)

    def logged(self) -> None:
        """A row was written: count from zero again."""
        self._t[0] = 0.0


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
    "evaluate",
    "read_run_summary",
    "train",
    "train_step",
]
