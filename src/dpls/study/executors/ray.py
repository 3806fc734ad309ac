"""``--executor ray``: each job a Ray task asking for ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs.

``[executor] address = "auto"`` joins a running cluster (``ray start --head`` on one node,
``ray start --address=...`` on the others; every node needs this package and the study
folder at the same path, e.g. on a shared file system), any other address that cluster; no
address starts a local one with ``workers × cpus_per_job`` CPUs. Ray places the tasks and
sets ``CUDA_VISIBLE_DEVICES`` for each; a task whose worker dies is retried by the study
from the run's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Sequence
from typing import Any

from dpls.study.executor_spec import ExecutorSpec
from dpls.study.executors.base import Executor, Finished, Handle, require
from dpls.study.executors.local import launch_ranks, usable_cores
from dpls.study.jobs import ERROR, STOPPED, Job, JobResult, WorkerSpec, execute


def _task(job: Job, worker: WorkerSpec, ranks: int) -> JobResult:
    """The body of every Ray task."""
    return launch_ranks(job, worker, ranks) if ranks > 1 else execute(job, worker)


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, spec: ExecutorSpec) -> None:
        self.ray = require("ray", "ray", "ray")
        self.spec = spec
        self.cpus = spec.cpus_per_job or 1
        self.gpus = spec.gpus_per_job or 0
        self.workers = spec.workers
        if spec.address is None:  # a local cluster, as large as asked
            total = (spec.workers or max(1, usable_cores() // self.cpus)) * self.cpus
            self.workers = total // self.cpus
            self._init(num_cpus=total)
        else:
            self._init(address=spec.address)
        self._remote = self.ray.remote(_task)
        self._running: dict[Any, Handle] = {}

    def _init(self, **kwargs: Any) -> None:
        if not self.ray.is_initialized():
            self.ray.init(log_to_driver=False, include_dashboard=False, **kwargs)

    def describe(self) -> str:
        where = f"the cluster at {self.spec.address}" if self.spec.address else "a local Ray cluster"
        limit = f", at most {self.workers} at once" if self.workers else ""
        return f"ray: {where}; each job a task with {self.cpus} CPU(s) (its torch threads) and {self.gpus} GPU(s){limit}"

    def execution(self) -> dict[str, Any]:
        return {"executor": self.kind, "workers": self.workers, "threads_per_job": self.cpus}

    def has_slot(self) -> bool:
        return self.workers is None or len(self._running) < self.workers

    def submit(
        self, job: Job, attempt: int, after: Sequence[Handle] = (), prelude: Sequence[Job] = ()
    ) -> Handle:
        gpus = self.gpus if job.multi_rank else min(self.gpus, 1)
        ranks = gpus if gpus > 1 else 1
        worker = WorkerSpec(self.kind, attempt, self.cpus)  # Ray sets CUDA_VISIBLE_DEVICES itself
        options = {"num_cpus": self.cpus, "num_gpus": gpus, "max_retries": 0, "name": job.name}
        ref = self._remote.options(**options).remote(job, worker, ranks)
        handle = Handle(job, attempt, ref=ref, where="ray task")
        self._running[ref] = handle
        return handle

    def wait(self, timeout: float) -> list[Finished]:
        if not self._running:
            return []
        ready, _ = self.ray.wait(list(self._running), num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            handle = self._running.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                result = JobResult(STOPPED, "cancelled (its latest checkpoint is kept)")
            except self.ray.exceptions.RayError as err:  # the worker died, or the task raised
                result = JobResult(ERROR, f"Ray task failed: {str(err).strip().splitlines()[-1]}")
            finished.append(Finished(handle, result))
        return finished

    def running(self) -> list[Handle]:
        return list(self._running.values())

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Cancel the tasks (Ray interrupts each; its run keeps its latest checkpoint) and wait for them."""
        for ref in list(self._running):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        while self._running:
            self.wait(5.0)

    def close(self) -> None:
        if self._running:
            self.stop()
        if self.spec.address is None:
            self.ray.shutdown()
