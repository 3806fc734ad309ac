"""``--executor local --workers N``: N jobs at once on this machine, each worker its own process.

Every worker is a process of its own (a ``concurrent.futures`` process pool of one, started by
`multiprocessing`'s forkserver, which imported torch and the study's code once). A worker runs
job after job, so each job finds torch, the tokenizer and the CPU kernel warm; a worker that
crashes or is killed (``kill -9``) takes nothing else down: its slot gets a fresh worker and
the runner retries the job from its run's latest checkpoint. The machine is split between
the workers: with GPUs one device per worker (``CUDA_VISIBLE_DEVICES``; a run asking for
several, ``gpus_per_job``, trains over them with torch.distributed), on CPU the cores
(``torch.set_num_threads``; ``cpus_per_job`` to choose).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dpls.study.executor_spec import ExecutorSpec
from dpls.study.executors.base import Executor, Finished, Handle
from dpls.study.jobs import ERROR, Job, JobResult, WorkerSpec, execute

STOP_GRACE_S = 120.0  # how long stopped workers get to save a checkpoint before they are killed
# Imported once by the forkserver, so that every worker starts with them (matplotlib: the
# evaluation's plots; a module that is not installed is left out).
PRELOAD = ["dpls.study.executors.local", "dpls.study.jobs.evaluate", "matplotlib.pyplot"]


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


class _Slot:
    """One worker: a process pool of one, so that a crash breaks this worker alone."""

    def __init__(self, mp: Any, devices: str | None) -> None:
        self.devices = devices
        self.pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=mp, initializer=_use_devices, initargs=(devices,)
        )
        self.pid = self.pool.submit(os.getpid).result()  # started now, and known for signals
        self.handle: Handle | None = None


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
        self.gpus_per_job, self.cores = per_job, cores
        self.threads = spec.cpus_per_job or max(1, cores // workers)
        self.devices = [
            ",".join(gpus[i * per_job : (i + 1) * per_job]) if per_job else None for i in range(workers)
        ]
        self.mp = multiprocessing.get_context("forkserver")
        self.mp.set_forkserver_preload(PRELOAD)
        self.slots: list[_Slot | None] = [None] * workers  # started on first use

    def describe(self) -> str:
        n = len(self.slots)
        threads = f"{self.threads} torch thread{'s' if self.threads != 1 else ''} each"
        if self.gpus_per_job:
            return f"local: {n} workers, {self.gpus_per_job} GPU(s) each ({', '.join(map(str, self.devices))}), {threads}"
        return f"local: {n} workers, {threads} ({self.cores} cores split between them)"

    def execution(self) -> dict[str, Any]:
        return {"executor": self.kind, "workers": len(self.slots), "threads_per_job": self.threads}

    def has_slot(self) -> bool:
        return any(s is None or s.handle is None for s in self.slots)

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        index = next(i for i, s in enumerate(self.slots) if s is None or s.handle is None)
        slot = self.slots[index] or _Slot(self.mp, self.devices[index])
        self.slots[index] = slot
        worker = WorkerSpec(self.kind, attempt, self.threads, slot.devices)
        ranks = self.gpus_per_job if job.multi_rank and self.gpus_per_job > 1 else 1
        future = slot.pool.submit(_work, job, worker, ranks)
        slot.handle = Handle(job, attempt, ref=(future, index), where=f"pid {slot.pid}")
        return slot.handle

    def wait(self, timeout: float) -> list[Finished]:
        futures = {h.ref[0]: h for h in self.running()}
        if not futures:
            return []
        done, _ = concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return [self._collect(futures[f]) for f in done]

    def _collect(self, handle: Handle) -> Finished:
        future, index = handle.ref
        slot = self.slots[index]
        assert slot is not None
        slot.handle = None
        try:
            return Finished(handle, future.result())
        except (
            BrokenProcessPool
        ):  # the worker died (killed, out of memory, a crash): a fresh one takes its slot
            slot.pool.shutdown(wait=False, cancel_futures=True)
            self.slots[index] = None
            return Finished(handle, JobResult(ERROR, f"its worker process {slot.pid} died without a result"))

    def running(self) -> list[Handle]:
        return [s.handle for s in self.slots if s is not None and s.handle is not None]

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Ask the running jobs to stop (SIGTERM: the trainer saves a checkpoint and returns), wait
        for them, then kill what is left."""
        for slot in self.slots:
            if slot is not None and slot.handle is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.running() and time.monotonic() < deadline:
            self.wait(1.0)
        for slot in self.slots:
            if slot is not None and slot.handle is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
                self._collect(slot.handle)

    def close(self) -> None:
        if self.running():
            self.stop(signal.SIGTERM)
        for slot in self.slots:
            if slot is not None:
                slot.pool.shutdown(wait=True, cancel_futures=True)
        self.slots = [None] * len(self.slots)


def _use_devices(devices: str | None) -> None:
    """A worker's first act: the GPUs it may use (before anything touches CUDA)."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices


def _work(job: Job, worker: WorkerSpec, ranks: int) -> JobResult:
    """A worker's job: here, or over ``ranks`` processes when it trains on several GPUs."""
    return launch_ranks(job, worker, ranks) if ranks > 1 else execute(job, worker)


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
