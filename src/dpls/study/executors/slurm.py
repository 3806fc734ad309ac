"""``--executor slurm``: every job a Slurm job, submitted through submitit.

The whole graph goes to the queue at once: jobs that wait on the same job go as one job
array, and Slurm keeps the order (``--dependency=afterok:…``; an evaluation array waits on
its training array task by task, ``aftercorr``; a job whose dependency failed is cancelled,
``--kill-on-invalid-dep=yes``). A seed's fork point, a few hard links, is made by the first
of its runs to start. ``STUDY/slurm/`` holds submitit's files (pickles, Slurm's output) and
``jobs.json``, the Slurm job of every job of the study.

The submitting process may leave: ``dpls study FILE`` run again later finds the jobs still
queued or running, collects the ones that ended, submits what is missing and writes the
report once everything is done; ``--wait`` stays until the end instead. Preemption and time
limits: submitit requeues the job (Slurm's signal before the limit, then ``checkpoint``) and
the run resumes from its latest checkpoint. A run with ``gpus_per_job > 1`` trains over that
many tasks of one node with torch.distributed (submitit exports the rank environment).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpls._io import write_json_atomic
from dpls.study.executor_spec import ExecutorSpec, sbatch_option
from dpls.study.executors.base import Executor, Finished, Handle, require
from dpls.study.jobs import ERROR, Job, JobResult, WorkerSpec, execute

JOBS_FILE = "jobs.json"  # STUDY/slurm/jobs.json: job name → {"id", "attempt", "tasks"}
DEFAULT_TIME_MIN = 60
Item = tuple[Handle, Sequence[Handle], Sequence[Job]]  # a queued attempt, what it waits on, its prelude
ACTIVE = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING"}
)


class SlurmTask:
    """What every Slurm job runs: one job of the study on each of its tasks. Checkpointable in
    submitit's sense (it has ``checkpoint``): on preemption or time-out it is requeued with the
    same arguments, and the job resumes from the run's latest checkpoint."""

    def __call__(self, job: Job, worker: WorkerSpec, prelude: Sequence[Job] = ()) -> JobResult:
        submitit = require("submitit", "slurm", "slurm")
        if submitit.JobEnvironment().num_tasks > 1:  # one rank per task, every GPU of the node visible
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        for first in prelude:  # a fork point (safe to make from several tasks at once)
            if not first.is_done():
                first.run()
        return execute(job, worker)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        submitit = require("submitit", "slurm", "slurm")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor(Executor):
    kind = "slurm"

    def __init__(
        self, spec: ExecutorSpec, study_dir: Path, *, cluster: str = "slurm", poll_s: float = 30.0
    ) -> None:
        self.submitit = require("submitit", "slurm", "slurm")
        self.spec = spec
        self.cluster = cluster  # "slurm"; submitit's "local" or "debug" stand-ins for tests
        self.chains = cluster == "slurm"
        self.detached = not spec.wait
        self.poll_s = poll_s
        self.folder = study_dir / "slurm"
        self._pending: list[Item] = []
        self._running: list[Handle] = []
        self._records: dict[str, dict[str, Any]] = read_records(study_dir)

    def describe(self) -> str:
        s = self.spec
        parts = [f"partition {s.partition}" if s.partition else "the default partition"]
        parts.append(f"{s.gpus_per_job or 0} GPU(s) and {s.cpus_per_job or 1} CPU(s) per job")
        parts.append(f"time limit {s.time_min or DEFAULT_TIME_MIN} min")
        wait = "waiting for every job" if s.wait else "submitting, then leaving (rerun to collect)"
        return f"slurm: {', '.join(parts)}; {wait}"

    def execution(self) -> dict[str, Any]:
        return {
            "executor": self.kind,
            "workers": self.spec.workers,
            "threads_per_job": self.spec.cpus_per_job or 1,
        }

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        handle = Handle(job, attempt, where="queued")
        self._pending.append((handle, after, prelude))
        return handle

    def adopt(self, job: Job) -> Handle | None:
        """A Slurm job of an earlier submission that is still queued or running."""
        record = self._records.get(job.name)
        if record is None or self.cluster != "slurm":
            return None
        sjob = self.submitit.SlurmJob(
            folder=self.folder / "%j", job_id=record["id"], tasks=tuple(range(record["tasks"]))
        )
        handle = Handle(job, int(record["attempt"]), ref=sjob, where=f"slurm job {record['id']}")
        self._running.append(handle)
        return handle

    # -- submission ------------------------------------------------------------------------

    def flush(self) -> None:
        """Submit what `submit` queued: in waves (a job after the jobs it waits on), as arrays."""
        while self._pending:
            wave = [p for p in self._pending if all(h.ref is not None for h in p[1])]
            if not wave:
                raise RuntimeError("slurm: a job waits on a job that was never submitted")
            self._pending = [p for p in self._pending if p not in wave]
            for group, dependency in _groups(wave):
                self._submit_group(group, dependency)
        self._save_records()

    def _submit_group(self, group: list[Item], dependency: str) -> None:
        executor = self._executor(group[0][0].job, dependency)
        task = SlurmTask()
        with executor.batch() if len(group) > 1 else contextlib.nullcontext():
            submitted = [executor.submit(task, h.job, self._worker(h), prelude) for h, _, prelude in group]
        for index, ((handle, _, _), sjob) in enumerate(zip(group, submitted)):
            handle.ref, handle.where = sjob, f"slurm job {sjob.job_id}"
            if len(group) > 1:
                handle.array = (str(sjob.job_id).partition("_")[0], index, len(group))
            self._running.append(handle)
            self._records[handle.job.name] = {
                "id": sjob.job_id,
                "attempt": handle.attempt,
                "tasks": self._tasks(handle.job),
            }

    def _worker(self, handle: Handle) -> WorkerSpec:
        return WorkerSpec(self.kind, handle.attempt, self.spec.cpus_per_job or 1)

    def _gpus(self, job: Job) -> int:
        gpus = self.spec.gpus_per_job or 0
        return gpus if job.multi_rank else min(gpus, 1)

    def _tasks(self, job: Job) -> int:
        return max(1, self._gpus(job)) if job.multi_rank else 1

    def _executor(self, job: Job, dependency: str) -> Any:
        """A submitit executor with the job's resources, the table's Slurm options and ``dependency``."""
        executor = self.submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        spec = self.spec
        extra: dict[str, Any] = dict(sbatch_option(line) for line in spec.sbatch)
        if dependency:
            extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        params: dict[str, Any] = {
            "name": f"dpls-{job.kind}",
            "timeout_min": spec.time_min or DEFAULT_TIME_MIN,
            "gpus_per_node": self._gpus(job),
            "tasks_per_node": self._tasks(job),
            "cpus_per_task": spec.cpus_per_job or 1,
        }
        if self.cluster == "slurm":
            params["slurm_additional_parameters"] = extra
            params["slurm_array_parallelism"] = spec.workers or 256
            params.update(
                {f"slurm_{k}": v for k, v in (("partition", spec.partition), ("account", spec.account)) if v}
            )
        executor.update_parameters(**params)
        return executor

    def _save_records(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / JOBS_FILE, self._records)

    # -- waiting ---------------------------------------------------------------------------

    def wait(self, timeout: float) -> list[Finished]:
        """The jobs that ended (asking Slurm every ``poll_s``); once, without waiting, when detached."""
        self.flush()
        deadline = time.monotonic() + (0.0 if self.detached else timeout)
        while self._running:
            if self.cluster == "slurm":
                self.submitit.SlurmJob.watcher.update()
            finished = [self._collect(h) for h in list(self._running) if h.ref.done()]
            if finished or time.monotonic() >= deadline:
                return finished
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        return []

    def _collect(self, handle: Handle) -> Finished:
        self._running.remove(handle)
        try:
            result = handle.ref.results()[0]
        except (
            Exception
        ) as err:  # the job failed outside the study's code (node failure, cancelled, out of time)
            result = JobResult(
                ERROR, f"slurm job {handle.ref.job_id} ended without a result: {_last_line(err)}"
            )
        if not isinstance(result, JobResult):
            result = JobResult(ERROR, f"slurm job {handle.ref.job_id} returned {result!r}")
        return Finished(handle, result)

    def running(self) -> list[Handle]:
        return list(self._running)

    def stop(self, signum: int = signal.SIGINT) -> None:
        """The study's process stops waiting; the queued and running jobs go on (``scancel`` stops them)."""
        self.detached = True


def read_records(study_dir: Path) -> dict[str, dict[str, Any]]:
    """The Slurm job of every job submitted for this study (empty when there is none)."""
    try:
        records = json.loads((study_dir / "slurm" / JOBS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def live_jobs(study_dir: Path) -> list[str]:
    """Slurm jobs of this study still queued or running (empty without records, submitit or sacct)."""
    records = read_records(study_dir)
    if not records:
        return []
    try:
        submitit = require("submitit", "slurm", "slurm")
        watcher = submitit.SlurmJob.watcher
        for record in records.values():
            watcher.register_job(str(record["id"]))
        watcher.update()
        return [
            str(r["id"]) for r in records.values() if watcher.get_state(str(r["id"]), mode="cache") in ACTIVE
        ]
    except (ValueError, OSError):
        return []


def _groups(wave: list[Item]) -> list[tuple[list[Item], str]]:
    """The wave as (array, its dependency): jobs of one kind waiting on the same jobs (or none) go
    together; jobs that each wait on one task of the same array, all of it in order, wait task
    by task (``aftercorr``); any other job goes alone."""
    by_deps: dict[tuple[str, tuple[str, ...]], list[Item]] = {}
    for item in wave:
        ids = tuple(sorted({h.ref.job_id for h in item[1]}))
        by_deps.setdefault((item[0].job.kind, ids), []).append(item)
    groups: list[tuple[list[Item], str]] = []
    alone: list[Item] = []
    for (_, ids), items in by_deps.items():
        if not ids or len(items) > 1:
            groups.append((items, f"afterok:{':'.join(ids)}" if ids else ""))
        else:
            alone += items
    by_array: dict[tuple[str, str, int], list[Item]] = {}
    for item in alone:
        array = item[1][0].array if len(item[1]) == 1 else None
        if array is None:
            groups.append(([item], "afterok:" + ":".join(sorted({h.ref.job_id for h in item[1]}))))
        else:
            by_array.setdefault((item[0].job.kind, array[0], array[2]), []).append(item)
    for (_, array_id, size), items in by_array.items():
        items.sort(key=lambda item: item[1][0].array[1])  # type: ignore[index]
        if [item[1][0].array[1] for item in items] == list(range(size)):  # type: ignore[index]
            groups.append((items, f"aftercorr:{array_id}"))
        else:
            groups += [([item], f"afterok:{item[1][0].ref.job_id}") for item in items]
    return groups


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
