"""The metrics rows of a run: which steps write one, what a training row holds, where rows go.

`MetricsLog` writes a row every ``log_interval`` steps and at the last step (plus the
validation rows the loop adds). A training row holds the step's values, the learning rate,
the throughput of training alone (validation and checkpoints left out) and its MFU, the steps
skipped since the previous row, the loss spikes since the run started and the step's
instability diagnostics. Rank 0 sends rows to
its loggers (`dpls.train.loggers`: metrics.jsonl, TensorBoard, ...) and to the progress bar,
which is also the run's console for messages.
"""

from __future__ import annotations

import math
import time
from typing import Any

from dpls.train.loggers import MultiLogger, open_loggers
from dpls.train.perf import mfu, peak_flops
from dpls.train.plan import InvalidRun, RunPlan
from dpls.train.progress import ProgressBar
from dpls.train.step import Parts


class MetricsLog:
    """The rows of the run of ``plan``, from step ``start_step`` on."""

    def __init__(self, plan: RunPlan, parts: Parts, start_step: int) -> None:
        cfg, ctx = plan.cfg, parts.ctx
        self.interval, self.last, self.world_size = cfg.log_interval, cfg.max_iters, ctx.world_size
        self.tokens_per_step = plan.tokens_per_step
        self.flops_per_token = parts.model.flops_per_token(cfg.block_size)
        self.peak = peak_flops(ctx.device, plan.dtype)
        try:
            self.logger: MultiLogger | None = open_loggers(cfg, plan.run_dir) if ctx.is_main else None
        except ValueError as err:  # a logger that cannot start (SwanLab without a login): no step run yet
            raise InvalidRun(str(err)) from err
        self.console = ProgressBar(
            cfg.max_iters, start_step, enabled=cfg.progress and ctx.is_main, echo=ctx.is_main
        )
        self.meter = _Throughput()
        self.started = time.perf_counter()

    def announce(self, plan: RunPlan, parts: Parts, step: int) -> None:
        """The run's first lines: what it is, and the plan's notes (rank 0)."""
        if not parts.ctx.is_main:
            return
        self.console.write(
            f"dpls train: {plan.start.mode} run {plan.run_dir} from step {step} | model {plan.cfg.model} "
            f"({parts.model.num_params() / 1e6:.2f}M params) | loss {plan.cfg.loss} | "
            f"{self.tokens_per_step:,} tokens/step | {parts.ctx.world_size} rank(s) on {parts.ctx.device.type}"
        )
        for note in plan.notes:
            self.console.write(f"dpls train: note: {note}")

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last

    def step_done(self, seconds: float) -> None:
        """One training step took ``seconds`` (its reads of the device included)."""
        self.meter.add(self.tokens_per_step, seconds)

    def training_row(
        self,
        step: int,
        tokens: int,
        lr: float,
        values: dict[str, float] | None,
        skipped: int,
        loss_spikes: int | None,
        diagnostics: dict[str, float] | None,
    ) -> dict[str, Any]:
        """Advance the bar; on a log step (``values`` read), the training row, else ``{}``."""
        if values is None:
            self.console.update(1)
            return {}
        tps = self.meter.rate()
        self.console.update(1, loss=f"{values['loss']:.4f}", tok_s=f"{tps:,.0f}")
        return {
            "step": step,
            "tokens": tokens,
            "loss": values["loss"],
            "ce": values["ce"],
            "epsilon": values["epsilon"],
            "lr": lr,
            "grad_norm": values["grad_norm"],
            "tokens_per_s": tps,
            "mfu": mfu(self.flops_per_token, tps, self.peak, self.world_size),
            "skipped": skipped,  # steps skipped since the previous row
            "loss_spikes": loss_spikes,  # loss spikes since the run started (dpls.train.spikes)
            **(diagnostics or {}),
            "elapsed_s": time.perf_counter() - self.started,
        }

    def write(self, row: dict[str, Any]) -> None:
        """Send ``row`` to the loggers and print it (rank 0)."""
        if self.logger is not None:
            self.logger.log(row)
            self.console.write(_format_row(row, self.last))

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.console.close()
        if self.logger is not None:
            self.logger.close()


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


def _format_row(row: dict[str, Any], max_iters: int) -> str:
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
