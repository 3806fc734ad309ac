"""``--executor local --workers N``: N jobs at once on this machine, each in its own process.

Each job runs in a fresh process made by `multiprocessing`'s forkserver, which imported
torch and the study's code once: a job starts in milliseconds, and a job that crashes or is
killed (``kill -9``) takes nothing else down: the runner retries it from its latest
checkpoint. The resources are split between the workers: with GPUs one device per worker
(``CUDA_VISIBLE_DEVICES``; a run asking for several, ``gpus_per_job``, trains over them with
torch.distributed), on CPU the cores (``torch.set_num_threads``, ``cpus_per_job`` to choose).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dpls.study.executor_spec import ExecutorSpec
from dpls.study.executors.base import Executor, Finished, Handle
from dpls.study.jobs import ERROR, Job, JobResult, WorkerSpec, execute

STOP_GRACE_S = 120.0  # how long stopped workers get to save a checkpoint before they are killed


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; all of them where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` entries."""
    count = torch.cuda.device_count()  # NVML: no CUDA context in this process
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, spec: ExecutorSpec) -> None:
        gpus = visible_gpus()
        per_job = spec.gpus_per_job if spec.gpus_per_job is not None else (1 if gpus else 0)
        if per_job > len(gpus):
            raise ValueError(f"[executor] gpus_per_job = {per_job}, but this machine shows {len(gpus)} GPUs")
        cores = usable_cores()
        workers = spec.workers or (len(gpus) // per_job if per_job else cores)
        if per_job and workers * per_job > len(gpus):
            raise ValueError(
                f"{workers} workers × {per_job} GPUs per job need {workers * per_job} GPUs; this machine "
                f"shows {len(gpus)}: lower --workers"
            )
        self.gpus_per_job = per_job
        self.threads = spec.cpus_per_job or max(1, cores // workers)
        self.cores = cores
        self.devices = [
            ",".join(gpus[i * per_job : (i + 1) * per_job]) if per_job else None for i in range(workers)
        ]
        self.slots: list[Handle | None] = [None] * workers
        self.mp = multiprocessing.get_context("forkserver")
        # Workers fork from a server that imported these once (no torch import per job).
        self.mp.set_forkserver_preload(["dpls.study.executors.local"])

    def describe(self) -> str:
        n = len(self.slots)
        threads = f"{self.threads} torch thread{'s' if self.threads != 1 else ''} each"
        if self.gpus_per_job:
            return f"local: {n} workers, {self.gpus_per_job} GPU(s) each ({', '.join(map(str, self.devices))}), {threads}"
        return f"local: {n} workers, {threads} ({self.cores} cores split between them)"

    def execution(self) -> dict[str, Any]:
        return {"executor": self.kind, "workers": len(self.slots), "threads_per_job": self.threads}

    def has_slot(self) -> bool:
        return None in self.slots

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        slot = self.slots.index(None)
        worker = WorkerSpec(self.kind, attempt, self.threads, self.devices[slot])
        ranks = self.gpus_per_job if job.multi_rank and self.gpus_per_job > 1 else 1
        receive, send = self.mp.Pipe(duplex=False)
        process = self.mp.Process(target=_work, args=(job, worker, ranks, send), name=f"dpls {job.name}")
        process.start()
        send.close()  # the child holds the only writing end: its death ends the pipe
        handle = Handle(job, attempt, ref=(process, receive, slot), where=f"pid {process.pid}")
        self.slots[slot] = handle
        return handle

    def wait(self, timeout: float) -> list[Finished]:
        running = {h.ref[0].sentinel: h for h in self.slots if h is not None}
        if not running:
            return []
        ready = multiprocessing.connection.wait(list(running), timeout)
        return [self._collect(running[s]) for s in ready]  # type: ignore[index]

    def _collect(self, handle: Handle) -> Finished:
        process, receive, slot = handle.ref
        result: JobResult | None = None
        with contextlib.suppress(EOFError, OSError):
            if receive.poll():
                result = receive.recv()
        process.join()
        receive.close()
        self.slots[slot] = None
        if result is None:
            code = process.exitcode
            how = (
                f"killed by {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exit status {code}"
            )
            result = JobResult(ERROR, f"its worker process {process.pid} died ({how})")
        return Finished(handle, result)

    def running(self) -> list[Handle]:
        return [h for h in self.slots if h is not None]

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Forward the signal (the trainer saves a checkpoint and stops), wait, then kill what is left."""
        for handle in self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.ref[0].pid, signum)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.running() and time.monotonic() < deadline:
            self.wait(1.0)
        for handle in self.running():
            handle.ref[0].kill()
            self._collect(handle)

    def close(self) -> None:
        if self.running():
            self.stop(signal.SIGTERM)


def _work(job: Job, worker: WorkerSpec, ranks: int, send: multiprocessing.connection.Connection) -> None:
    """A worker process: one job (over ``ranks`` processes when it trains on several GPUs)."""
    result = launch_ranks(job, worker, ranks) if ranks > 1 else execute(job, worker)
    send.send(result)
    send.close()


def launch_ranks(job: Job, worker: WorkerSpec, ranks: int) -> JobResult:
    """``job`` over ``ranks`` processes on this machine, as ``torchrun --standalone`` would start them."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=ranks,
        run_id=f"dpls-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=1,
    )
    # Every rank sees the job's devices and takes the LOCAL_RANK-th (`execute` sets them).
    results = elastic_launch(config, execute)(job, worker)
    return results[0]
