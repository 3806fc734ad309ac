"""The jobs of a study's graph, and `execute`: how any worker runs one of them.

A study is a graph: prepare the data → train the trunk → make each seed's fork point → train
each (arm, value, seed) run → evaluate it → write the report. Each job knows its inputs (the
jobs it depends on), its outputs (`Job.is_done` reads the files whose completeness says the
job is finished, so a job found done is never run again, whoever ran it) and what it needs
(``inline``: cheap bookkeeping that runs in the study's own process; ``multi_rank``: may run
over several devices). One module per kind of job: `prepare`, `train`, `fork`, `evaluate`,
`report`.

An executor hands a job to a worker, and the worker calls `execute`: torch threads and devices
set, the job's output sent to its log file (in its run folder), the attempt recorded in the
run's ``study_jobs.json``, and what happened returned as a `JobResult` (a crash of the job
itself is a result too; only a worker that dies returns nothing). A job never holds state
in memory that a retry would need: everything is on disk, so a killed worker costs at most
the steps since its run's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from dpls.study.state import add_job_record

# What became of an attempt.
DONE = "done"  # the job's outputs are complete
DIVERGED = "diverged"  # a training run diverged: a result, recorded in RUN/diverged.json
SKIPPED = "skipped"  # nothing to do (e.g. a sweep run away from the reference value needs no evaluation)
STOPPED = "stopped"  # asked to stop (a signal): progress saved, resumable
ERROR = "error"  # the job failed; `retry` says whether another attempt could help
FINISHED = frozenset({DONE, DIVERGED, SKIPPED})


@dataclass(frozen=True)
class JobResult:
    status: str
    message: str = ""
    retry: bool = True  # for ERROR: a crash (retry) or bad input (another attempt fails the same way)


@dataclass(frozen=True)
class WorkerSpec:
    """What an executor gives one attempt of a job."""

    executor: str  # "sequential", "local", "slurm", "ray"
    attempt: int = 1
    threads: int | None = None  # torch threads; None: leave the process's setting
    devices: str | None = None  # CUDA_VISIBLE_DEVICES for the job; None: leave it
    tee: bool = False  # also show the output where it goes now (the study's own process)


class Job:
    """One node of the graph. Subclasses are dataclasses holding only paths and plain values, so
    that any engine can pickle them to another process or machine."""

    kind: ClassVar[str] = "job"
    inline: ClassVar[bool] = False  # cheap bookkeeping: runs in the study's own process
    multi_rank: ClassVar[bool] = False  # may train over several devices at once
    after_failures: ClassVar[bool] = False  # runs once its dependencies ended, even if some failed

    name: str
    deps: tuple[str, ...]

    def is_done(self) -> bool:
        """Its outputs are complete (read from disk, never from memory)."""
        raise NotImplementedError

    def run(self) -> JobResult:
        raise NotImplementedError

    @property
    def log(self) -> Path | None:
        """Where its output goes (None: nowhere but the study's own output)."""
        return None

    @property
    def run_dir(self) -> Path | None:
        """The run folder whose ``study_jobs.json`` records its attempts (None: no record)."""
        return None

    def chainable(self) -> bool:
        """Can be queued before its dependencies end (an engine that keeps the order, Slurm), because
        what it has to do does not depend on their results."""
        return True

    def progress(self) -> tuple[Path, int, int] | None:
        """(run folder, first step, last step) of a training job, for the progress view."""
        return None

    def describe(self) -> str:
        """What it does, for the progress lines."""
        return self.name


def execute(job: Job, worker: WorkerSpec, *, catch: bool = True) -> JobResult:
    """Run one attempt of ``job`` here, as ``worker`` says. With ``catch`` (every worker but the
    study's own process) an exception becomes an ERROR result, its traceback in the log."""
    if worker.devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = worker.devices
    if worker.threads:
        torch.set_num_threads(worker.threads)
    logged = job.log is not None and os.environ.get("RANK", "0") == "0"  # one rank writes the log
    record = _attempt_record(job, worker)
    with _output_to(job.log if logged else None, worker.tee) as log:
        if log is not None:
            log.write(
                f"[{record['started']}] {job.name}: attempt {worker.attempt} on {record['host']} "
                f"(pid {record['pid']}, {record['threads']} torch threads, devices {record['devices']})\n"
            )
            log.flush()
            _record(job, record)
        result = _run(job, catch)
        if log is not None:
            _record(job, {**record, "status": result.status, "seconds": round(time.time() - record["t0"], 3)})
            sys.stdout.flush()
            sys.stderr.flush()
            log.write(f"{job.name}: {result.status}{': ' + result.message if result.message else ''}\n")
    return result


def _run(job: Job, catch: bool) -> JobResult:
    if not catch:
        return job.run()
    try:
        return job.run()
    except KeyboardInterrupt:
        return JobResult(STOPPED, "interrupted (its latest checkpoint is kept)")
    except ValueError as err:  # bad input: another attempt would fail the same way
        traceback.print_exc()
        return JobResult(ERROR, str(err).splitlines()[0] if str(err) else type(err).__name__, retry=False)
    except Exception as err:
        traceback.print_exc()
        return JobResult(ERROR, f"{type(err).__name__}: {err}".splitlines()[0])


def _attempt_record(job: Job, worker: WorkerSpec) -> dict[str, Any]:
    now = time.time()
    return {
        "job": job.name,
        "kind": job.kind,
        "attempt": worker.attempt,
        "executor": worker.executor,
        "host": platform.node(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "cuda" if torch.cuda.is_available() else "cpu"),
        "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        "t0": now,
        "status": "running",
    }


def _record(job: Job, record: dict[str, Any]) -> None:
    if job.run_dir is not None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        add_job_record(job.run_dir, {k: v for k, v in record.items() if k != "t0"})


@contextlib.contextmanager
def _output_to(log: Path | None, tee: bool) -> Iterator[IO[str] | None]:
    """Send stdout and stderr to ``log`` (appended) for the block, and yield the open log: at the
    level of file descriptors in a worker (so native libraries' output goes there too), or as a
    copy of Python's own output in the study's process (``tee``), whose terminal keeps showing it."""
    if log is None:
        yield None
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8", buffering=1) as fh:
        if tee:
            with (
                contextlib.redirect_stdout(_Tee(sys.stdout, fh)),
                contextlib.redirect_stderr(_Tee(sys.stderr, fh)),
            ):
                yield fh
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            yield fh
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class _Tee:
    """A text stream writing to the terminal stream it wraps and to a log file. Progress-bar
    redraws (text with a carriage return) go to the terminal only, so the log stays readable."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
