"""Training one run of the study: the trunk, or an (arm, value, seed) run from its fork point.

A run trains fresh (the trunk, or a run from scratch), forks from its seed's fork point, or,
after an interruption anywhere (a signal, a killed worker, a preempted node), resumes in
place from its latest checkpoint: the trainer's resume is exact, so a run gives the same
numbers however often it was interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dpls.study.jobs import DIVERGED, DONE, STOPPED, Job, JobResult
from dpls.study.plan import StudyRun
from dpls.train.trainer import Diverged, train

TRAIN_LOG = "train.log"  # RUN/train.log: every attempt's output, appended


@dataclass
class TrainJob(Job):
    kind: ClassVar[str] = "train"
    multi_rank: ClassVar[bool] = True

    name: str
    deps: tuple[str, ...]
    study_run: StudyRun
    fork_from: Path | None  # the checkpoint it forks from (None: the trunk, or from scratch)
    start_step: int = 0

    def is_done(self) -> bool:
        return self.study_run.is_trained() or self.study_run.diverged is not None

    def run(self) -> JobResult:
        run = self.study_run
        if run.is_trained():
            return JobResult(DONE)
        if (record := run.diverged) is not None:
            return JobResult(DIVERGED, f"diverged at step {record.get('step')} (kept as a result)")
        try:
            train(run.train_config(self.fork_from))
        except Diverged as err:  # a result: recorded in diverged.json
            return JobResult(DIVERGED, f"diverged at step {err.step}")
        if not run.is_trained():  # the trainer saved and returned early: it was asked to stop
            return JobResult(
                STOPPED, f"{run.name} stopped before step {run.final_step} (its progress is saved)"
            )
        return JobResult(DONE)

    @property
    def log(self) -> Path:
        return self.study_run.run_dir / TRAIN_LOG

    @property
    def run_dir(self) -> Path:
        return self.study_run.run_dir

    def progress(self) -> tuple[Path, int, int]:
        return self.study_run.run_dir, self.start_step, self.study_run.final_step

    def describe(self) -> str:
        if self.study_run.name == "trunk":
            return f"training the CE trunk to step {self.study_run.final_step}"
        return f"training {self.study_run.name} from step {self.start_step} to {self.study_run.final_step}"
