"""When the trainer saves a checkpoint, and what its trainer state holds.

`Checkpointer` saves every ``checkpoint_interval`` steps, at the last step and when the run is
asked to stop (`dpls.runs.checkpoint` writes it atomically). The trainer state holds what a
resume or fork needs beside the weights: the token count, the data position, the data and
tokenizer it was trained on, the run watch's counts and the learning-rate schedule. A disk
that fills up between those points costs a warning, not the run: the next save tries again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpls.distributed.faults import is_out_of_space
from dpls.runs.checkpoint import CheckpointError, save_checkpoint
from dpls.train.plan import RunPlan
from dpls.train.progress import ProgressBar
from dpls.train.step import Parts


class Checkpointer:
    """Saves the run of ``plan`` from ``parts``; warnings go to ``console``."""

    def __init__(self, plan: RunPlan, parts: Parts, console: ProgressBar) -> None:
        self.plan, self.parts, self.console = plan, parts, console
        self.interval, self.last = plan.cfg.checkpoint_interval, plan.cfg.max_iters

    def should_save(self, step: int, *, stopping: bool) -> bool:
        return step % self.interval == 0 or step == self.last or stopping

    def save(self, step: int, tokens: int, watch_state: Mapping[str, Any], *, stopping: bool) -> None:
        """Save the state after ``step`` steps; ``watch_state`` is `RunWatch.state_dict`."""
        plan, parts = self.plan, self.parts
        trainer_state = {
            "tokens": tokens,
            "loader": plan.loader.state_dict(),
            "data_dir": plan.cfg.data_dir,
            "tokenizer_fingerprint": plan.data.tokenizer_fingerprint,  # what the ids mean
            **watch_state,
            "lr": plan.lr_at(step),
            "lr_schedule": plan.lr_schedule,
        }
        try:
            save_checkpoint(
                plan.run_dir,
                step,
                model=parts.model,
                optimizer=parts.optimizer,
                trainer_state=trainer_state,
                config=plan.cfg,
                model_config=plan.model_config,
                ctx=parts.ctx,
                keep=plan.cfg.keep_checkpoints,
                faults=parts.faults,
            )
        except CheckpointError as err:
            if step == self.last or stopping or not is_out_of_space(err):
                raise
            self.console.write(f"dpls train: warning: {err}; training continues")
