"""Is the run still healthy? Non-finite steps, counted on the device, and the divergence rule.

`RunWatch` stops a run as `Diverged`, after writing ``RUN/diverged.json``, when
``max_skipped_steps`` non-finite steps come in a row, or when the training CE of
``divergence_window`` logged steps in a row is above the loss at the start (the first
validation CE) or not finite (`DivergenceWatch`). It looks at the device only when the loop
reads it anyway (log and checkpoint steps), and its state goes into every checkpoint, so a
resumed run continues its counts.
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


class TrainingError(RuntimeError):
    """The run stopped on its own (e.g. too many non-finite steps); the message says why."""


class Diverged(TrainingError):
    """The run diverged; RUN/diverged.json says where and why."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class DivergenceWatch:
    """Calls a run diverged when ``window`` logged training CEs in a row are above ``initial`` or not finite.

    ``window`` 0 switches the rule off. Its state (``initial``, ``streak``) goes into the
    checkpoint's trainer state, so a resumed run continues the count.
    """

    window: int
    initial: float | None = None
    streak: list[int] = field(default_factory=list)  # steps of the current run of bad rows

    def see(self, step: int, ce: float) -> int | None:
        """Take a logged row; the step where the divergence began, once ``window`` rows in a row are bad."""
        if self.window <= 0 or self.initial is None:
            return None
        if math.isfinite(ce) and ce <= self.initial:
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
    """The skip limit and the divergence rule of one run (see the module docstring)."""

    def __init__(self, plan: RunPlan, ctx: DistContext) -> None:
        """A run resumed in place continues the counts of its checkpoint; a new run or a fork
        starts them afresh."""
        cfg, self.run_dir, self.is_main = plan.cfg, plan.run_dir, ctx.is_main
        resumed = plan.start.trainer_state if plan.start.mode == "resume" else None
        self.max_skipped = cfg.max_skipped_steps
        self.skipped_in_a_row = int(resumed.get("skipped_in_a_row", 0)) if resumed is not None else 0
        self.divergence = DivergenceWatch(cfg.divergence_window)
        if resumed is not None:
            self.divergence.load_state_dict(resumed)
        self._skips = SkipCounter(ctx.device, self.skipped_in_a_row, cfg.max_skipped_steps)
        self._tripped = 0  # the step at which max_skipped_steps in a row were reached (0: never)

    def start(self, initial_val_ce: float) -> None:
        """The loss at the start, which the divergence rule compares the training CE with."""
        self.divergence.initial = initial_val_ce

    def add(self, skipped: torch.Tensor, step: int) -> None:
        """Count the step (on the device: nothing waits)."""
        self._skips.add(skipped, step)

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
                f"the training CE of {self.divergence.window} logged steps in a row was above the "
                f"initial validation CE {self.divergence.initial:.4f} or not finite",
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
        return {"skipped_in_a_row": self.skipped_in_a_row, **self.divergence.state_dict()}

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
