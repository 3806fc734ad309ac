"""Is the run still healthy? Non-finite steps and loss spikes, counted on the device, and the
divergence rules.

`RunWatch` stops a run as `Diverged`, after writing ``RUN/diverged.json``, when
``max_skipped_steps`` non-finite steps come in a row, or by rule 1 below (`DivergenceWatch`).
It also counts loss spikes on every step (`dpls.train.spikes`, OLMo-core's rule), which never
stop a run. It looks at the device only when the loop reads it anyway (log and checkpoint
steps), and its state goes into every checkpoint, so a resumed run continues its counts.

**The divergence rules.** L_init is the validation CE of a run's first evaluation (its
initial weights, or the checkpoint it was forked from).

1. While training (`DivergenceWatch`): a run has diverged when the training CE of ``window``
   logged steps in a row is not finite or more than `DIVERGENCE_MARGIN` (10%) above L_init.
   The margin is there because a batch's CE is not the validation CE: at initialisation the
   two differ by a few percent (other tokens), and batches are noisy, so a healthy run at a
   small learning rate sits just above L_init for its first steps. A run whose weights never
   change (``learning_rate = 0``) is never watched: it cannot diverge.
2. After training (`run_outcome`, what a study reports): a run stopped by rule 1, or whose
   final validation CE is not finite, has diverged. A run **from scratch** whose final
   validation CE ends more than the same margin above L_init has diverged too: it is worse than
   its own initial weights, however it got there (a loss that blew up to millions and
   collapsed back to about ln V, under the watch's threshold, ends far above L_init on the
   validation set, and is caught here). One that ends near L_init, within the margin above
   it or less than `NO_PROGRESS_TOLERANCE` below it, made "no progress": it never moved
   (``learning_rate = 0``) or there was nothing it could learn. A **forked** run may end above
   its L_init without diverging: a data-limited run that overfits its few tokens is a result;
   it is "no progress" only within the tolerance of L_init. Anything else is "trained".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dpls._io import write_json_atomic
from dpls.distributed import DistContext
from dpls.runs.checkpoint import latest_checkpoint
from dpls.runs.layout import DIVERGED_FILE
from dpls.train.plan import RunPlan
from dpls.train.spikes import SpikeCounter


class TrainingError(RuntimeError):
    """The run stopped on its own (e.g. too many non-finite steps); the message says why."""


class Diverged(TrainingError):
    """The run diverged; RUN/diverged.json says where and why."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


DIVERGENCE_MARGIN = 0.1  # rule 1: a logged training CE is "above L_init" beyond L_init·(1 + margin)
NO_PROGRESS_TOLERANCE = 1e-3  # rule 2: a final CE less than this (relative) below L_init is "no progress"


@dataclass
class DivergenceWatch:
    """Calls a run diverged when ``window`` logged training CEs in a row are more than
    `DIVERGENCE_MARGIN` above ``initial`` or not finite (rule 1 of the module docstring).

    ``window`` 0 switches the rule off, and so does ``frozen`` (the weights never change:
    ``learning_rate = 0``). Its state (``initial``, ``streak``) goes into the checkpoint's
    trainer state, so a resumed run continues the count.
    """

    window: int
    initial: float | None = None
    streak: list[int] = field(default_factory=list)  # steps of the current run of bad rows
    frozen: bool = False

    def see(self, step: int, ce: float) -> int | None:
        """Take a logged row; the step where the divergence began, once ``window`` rows in a row are bad."""
        if self.window <= 0 or self.initial is None or self.frozen:
            return None
        if math.isfinite(ce) and ce <= self.initial * (1 + DIVERGENCE_MARGIN):
            self.streak = []
            return None
        self.streak.append(step)
        return self.streak[0] if len(self.streak) >= self.window else None

    def state_dict(self) -> dict[str, Any]:
        return {"initial_val_ce": self.initial, "divergence_streak": list(self.streak)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("initial_val_ce") is not None:
            self.initial = float(state["initial_val_ce"])
        self.streak = [int(s) for s in state.get("divergence_streak", [])]


def run_outcome(initial: float | None, final: float | None, *, from_scratch: bool, stopped: bool) -> str:
    """``"trained"``, ``"no_progress"`` or ``"diverged"``: rule 2 of the module docstring.

    ``initial``: L_init, the first validation CE; ``final``: the last one (None: the run has
    none after its first); ``stopped``: rule 1 stopped the run (it has a diverged.json)."""
    if stopped or final is None or not math.isfinite(final):
        return "diverged"
    if initial is None or not math.isfinite(initial):
        return "trained"
    if from_scratch and final > initial * (1 + DIVERGENCE_MARGIN):
        return "diverged"
    above = initial * (1 + DIVERGENCE_MARGIN) if from_scratch else initial * (1 + NO_PROGRESS_TOLERANCE)
    if initial * (1 - NO_PROGRESS_TOLERANCE) <= final <= above:
        return "no_progress"
    return "trained"


class SkipCounter:
    """Skipped (non-finite) steps counted on the device, so that a step that is not logged
    never waits to learn whether it was skipped; `read` copies three numbers to the host."""

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


class RunWatch:
    """The skip limit, the divergence rule and the loss spikes of one run (see the module docstring)."""

    def __init__(self, plan: RunPlan, ctx: DistContext) -> None:
        """A run resumed in place continues the counts of its checkpoint; a new run or a fork
        starts them afresh."""
        cfg, self.run_dir, self.is_main = plan.cfg, plan.run_dir, ctx.is_main
        resumed = plan.start.trainer_state if plan.start.mode == "resume" else None
        self.max_skipped = cfg.max_skipped_steps
        self.skipped_in_a_row = int(resumed.get("skipped_in_a_row", 0)) if resumed is not None else 0
        self.divergence = DivergenceWatch(
            cfg.divergence_window, frozen=cfg.learning_rate == 0
        )  # lr 0: cannot diverge
        if resumed is not None:
            self.divergence.load_state_dict(resumed)
        self._skips = SkipCounter(ctx.device, self.skipped_in_a_row, cfg.max_skipped_steps)
        self.spikes = SpikeCounter(cfg.spike_window, cfg.spike_sigmas, ctx.device)
        if resumed is not None:
            self.spikes.load_state_dict(resumed)
        self._tripped = 0  # the step at which max_skipped_steps in a row were reached (0: never)

    def start(self, initial_val_ce: float) -> None:
        """The loss at the start, which the divergence rule compares the training CE with."""
        self.divergence.initial = initial_val_ce

    def add(self, skipped: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        """Count the step: skipped or not, and whether its loss (the logged objective) spiked
        (on the device: nothing waits)."""
        self._skips.add(skipped, step)
        self.spikes.update(loss)

    def read(self) -> int:
        """Read the counts (log and checkpoint steps): the steps skipped since the last row."""
        since, self.skipped_in_a_row, self._tripped = self._skips.read()
        return since

    def row_written(self) -> None:
        self._skips.logged()

    def check(self, step: int, ce: float | None) -> None:
        """Raise `Diverged` when a rule fires: ``ce`` is the training CE of a logged step (None
        on other steps); the skip limit is checked on the counts last read."""
        if ce is not None and (began := self.divergence.see(step, ce)) is not None:
            raise self._diverged(
                step,
                began,
                f"the training CE of {self.divergence.window} logged steps in a row was more than "
                f"{DIVERGENCE_MARGIN:.0%} above the initial validation CE {self.divergence.initial:.4f} or not finite",
            )
        if self._tripped:  # found at the last read; the limit may have been reached a few steps before
            raise self._diverged(
                step,
                self._tripped - self.max_skipped + 1,
                f"{max(self.skipped_in_a_row, self.max_skipped)} non-finite steps in a row "
                f"(max_skipped_steps={self.max_skipped}); they did not change the weights",
            )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run continues the counts."""
        return {
            "skipped_in_a_row": self.skipped_in_a_row,
            **self.divergence.state_dict(),
            **self.spikes.state_dict(),
        }

    def _diverged(self, step: int, began: int, reason: str) -> Diverged:
        """Record the divergence in RUN/diverged.json (rank 0) and the error every rank raises."""
        if self.is_main:
            record = {
                "step": began,
                "detected_at": step,
                "reason": reason,
                "initial_val_ce": self.divergence.initial,
            }
            write_json_atomic(self.run_dir / DIVERGED_FILE, record)
        return Diverged(
            f"stopped at step {step}: {reason}: diverged from step {began}; "
            f"last checkpoint: {latest_checkpoint(self.run_dir) or 'none'}",
            began,
        )
