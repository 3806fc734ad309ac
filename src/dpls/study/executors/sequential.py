"""The default executor: every job in the study's own process, one after another.

This is how studies always ran: the trainer's own progress bar and lines on the terminal
(and in each job's log file), a signal stops the study at once. Under ``torchrun`` every
rank walks the same graph: training jobs run on all ranks together, every other job on
rank 0 alone while the others wait at a barrier; once the last training job is done, the
process group goes (an evaluation inside it would wait for the other ranks) and rank 0
evaluates and reports alone.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

import torch

from dpls.distributed import DistContext
from dpls.study.executors.base import Executor, Finished, Handle
from dpls.study.jobs import DONE, Job, JobResult, WorkerSpec, execute


class SequentialExecutor(Executor):
    kind = "sequential"

    def __init__(self, *, ctx: DistContext | None = None) -> None:
        self.ctx = ctx  # a torchrun process group, or None
        self._next: Handle | None = None

    def describe(self) -> str:
        ranks = f" on {self.ctx.world_size} ranks" if self.ctx is not None else ""
        return (
            f"sequential: one job at a time in this process{ranks} ({torch.get_num_threads()} torch threads)"
        )

    def execution(self) -> dict[str, Any]:
        return {"executor": self.kind, "workers": 1}

    def has_slot(self) -> bool:
        return self._next is None  # one at a time

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        self._next = Handle(job, attempt, where="this process")
        return self._next

    def wait(self, timeout: float) -> list[Finished]:
        """Run the job submitted last, here and now."""
        handle, self._next = self._next, None
        return [] if handle is None else [Finished(handle, self.run_inline(handle.job, handle.attempt))]

    def run_inline(self, job: Job, attempt: int) -> JobResult:
        """The job, here; its exceptions go to the caller, as they always did. Under torchrun a
        training job runs on every rank, any other on rank 0 while the others wait."""
        worker = WorkerSpec(self.kind, attempt, tee=True)
        if self.ctx is None or job.multi_rank:
            return execute(job, worker, catch=False)
        result = execute(job, worker, catch=False) if self.ctx.is_main else JobResult(DONE, "on rank 0")
        if self.group_alive:
            self.ctx.barrier()
        return result

    @property
    def group_alive(self) -> bool:
        return self.ctx is not None and self.ctx.world_size > 1 and torch.distributed.is_initialized()

    def leave_group(self) -> bool:
        """After the last training job: end the process group; True on rank 0, which goes on alone."""
        if self.ctx is None:
            return True
        if self.group_alive:
            self.ctx.barrier()
        self.ctx.destroy()
        return self.ctx.is_main

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Nothing runs in the background: the job in progress got the signal itself."""
