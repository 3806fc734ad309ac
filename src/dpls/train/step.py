"""One optimizer step: `train_step(parts, step, lr, stop_requested)`.

A step is this rank's micro-batches (gradient accumulation), gradient clipping and the update,
and it never waits for the device unless the loop reads its values. Its values (loss, ce, ε,
gradient norm, skipped) stay in one device tensor (`StepStats.values`) that the loop reads on
log steps. Whether to skip a non-finite update is decided on the device: AdamW is the fused
kernel, whose ``found_inf`` input (the one ``GradScaler`` uses) leaves weights, moments and
step count untouched. With several ranks the stop request is reduced with the step and read
one step later, when the device has long finished it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpls.distributed import DistContext, Faults, no_sync
from dpls.losses.objective import Objective, ObjectiveOutput
from dpls.losses.validation import values_checked
from dpls.model import Transformer
from dpls.train.diagnostics import Diagnostics
from dpls.train.optim import set_hyperparameters


class TrainStep(nn.Module):
    """Model + objective in one module, so DDP / FSDP2 wrap (and sync) the whole computation.

    ``forward(idx)`` returns logits (validation); ``forward(idx, target, step)`` returns the
    objective's ``ObjectiveOutput``, from the logits or, with ``fused``, from the hidden
    states and the output weight (the ``[N, V]`` logits never exist).
    """

    def __init__(self, model: Transformer, objective: Objective, fused: bool) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.fused = fused
        # The logits are this module's own temporaries (forward(idx, target) never returns them),
        # so the loss may overwrite them with their gradient. On a CPU that saves allocating and
        # page-faulting a fresh [N, V] gradient every step (measured: 0–7% of a step at nanoGPT's
        # CPU shape); on GPUs it is left off until measured there.
        objective.inplace_backward = next(model.parameters()).device.type == "cpu"
        self.diagnostics: Diagnostics | None = None  # set on log steps: record the logits

    def forward(
        self, idx: torch.Tensor, target: torch.Tensor | None = None, step: int = 0
    ) -> torch.Tensor | ObjectiveOutput:
        if target is None:
            return self.model(idx)
        if self.fused:
            hidden = self.model.hidden_states(idx)
            cap = self.model.config.logit_softcap
            if self.diagnostics is not None:
                self.diagnostics.add_hidden(hidden, self.model.output_weight, cap)
            return self.objective.from_hidden(
                hidden, self.model.output_weight, target, step=step, softcap=cap
            )
        logits = self.model(idx)
        vocab = self.model.config.vocab_size
        if logits.shape[-1] > vocab:  # pad_vocab_to: the padded (-inf) columns are no tokens
            logits = logits[..., :vocab]
        out = self.objective(logits, target, step=step)
        if self.diagnostics is not None:
            self.diagnostics.add_logits(logits, target, out.ce)
        return out


@dataclass(kw_only=True)
class Parts:
    """What the steps of a run work with: built once by `dpls.train.trainer.build`, or
    directly (as ``dpls bench train`` does)."""

    ctx: DistContext
    model: Transformer  # the bare model (checkpoints, FLOPs, diagnostics)
    wrapped: nn.Module  # TrainStep under DDP / FSDP2: what a step calls
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    autocast: AbstractContextManager[Any]  # torch.autocast, or a null context in float32
    micro_steps: int  # this rank's micro-batches per optimizer step
    grad_clip: float  # clip the global gradient norm to this (0: no clipping)
    faults: Faults = field(default_factory=Faults)  # faults injected by tests (none in a real run)
    stop_flag: torch.Tensor | None = None  # several ranks: the stop request reduced with the last step
    params: list[nn.Parameter] = field(init=False)  # the trainable ones, clipped together

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]


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
    def loss(self) -> torch.Tensor:
        """The objective, mean over the global batch (on the device, the same on every rank)."""
        return self.values[STEP_VALUES.index("loss")]

    @property
    def skipped(self) -> torch.Tensor:
        """1.0 if the step was skipped, else 0.0 (on the device)."""
        return self.values[STEP_VALUES.index("skipped")]

    def read(self) -> dict[str, float]:
        """The values on the host: one small copy, which waits for the step to finish."""
        return dict(zip(STEP_VALUES, self.values.tolist(), strict=True))


def train_step(
    parts: Parts, step: int, lr: float, stop_requested: bool, diagnostics: bool = False
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
    ctx, wrapped, micro_steps = parts.ctx, parts.wrapped, parts.micro_steps
    set_hyperparameters(parts.optimizer, lr=lr)
    sums = torch.zeros(3, device=ctx.device)  # this rank's sums of (loss, ce, ε)
    diag = Diagnostics(ctx.device) if diagnostics else None
    if diag is not None:
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
    grad_norm = _clip_grad_norm(parts.params, parts.grad_clip).float().reshape(1)
    means = ctx.all_reduce_sum(sums) / (micro_steps * ctx.world_size)  # over the global batch
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


def _record_diagnostics(parts: Parts, diag: Diagnostics | None) -> None:
    """Switch the recording of `dpls.train.diagnostics` on (``diag``) or off (None)."""
    step_module = getattr(parts.wrapped, "module", parts.wrapped)  # DDP wraps it; FSDP2 shards it in place
    step_module.diagnostics = diag
    parts.model.record_attention_logits(diag is not None)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping, left on the device (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


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
