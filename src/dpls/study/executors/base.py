"""What the runner and every executor share: the interface, the handle of a running attempt,
and how an optional engine that is missing is reported."""

from __future__ import annotations

import importlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from dpls.study.jobs import Job, JobResult, WorkerSpec, execute


@dataclass
class Handle:
    """One attempt of a job, handed to an executor."""

    job: Job
    attempt: int
    started: float = field(default_factory=time.time)
    ref: Any = None  # the engine's own handle (a process, a Ray object ref, a submitit job)
    where: str = ""  # what the progress view shows (a pid, a Slurm job id)
    array: tuple[str, int, int] | None = None  # a task of a job array: (array id, index, size)


@dataclass
class Finished:
    handle: Handle
    result: JobResult


class Executor:
    """The interface the runner drives."""

    kind = "executor"
    chains = False  # takes jobs whose dependencies are still running (the engine keeps the order)
    detached = False  # the study's process may leave before the jobs end (a cluster queue)

    def describe(self) -> str:
        """One line for the start of the study: how many jobs at once, with what."""
        return self.kind

    def execution(self) -> dict[str, Any]:
        """What the report records: the executor, its workers and the threads per job."""
        return {"executor": self.kind}

    def has_slot(self) -> bool:
        """Another job can start now."""
        return True

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        """Start one attempt of ``job``. With `chains`: ``after``, running jobs it must wait for, and
        ``prelude``, cheap jobs between them and it that its worker runs first."""
        raise NotImplementedError

    def run_inline(self, job: Job, attempt: int) -> JobResult:
        """Run an ``inline`` job (bookkeeping: a fork point, the report) in the study's own process."""
        return execute(job, WorkerSpec(self.kind, attempt, tee=True))

    def wait(self, timeout: float) -> list[Finished]:
        """The attempts that ended, waiting at most ``timeout`` seconds for one."""
        raise NotImplementedError

    def adopt(self, job: Job) -> Handle | None:
        """A job an earlier process of this study left running (a cluster queue), or None."""
        return None

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Ask the running jobs to stop (they save a checkpoint) and wait for them."""

    def close(self) -> None:
        """Release the engine (processes, connections)."""


def require(module: str, extra: str, executor: str) -> ModuleType:
    """Import an optional engine, or one line that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"the {executor} executor needs {module}, which is not installed: pip install 'dpls[{extra}]'"
        ) from None
