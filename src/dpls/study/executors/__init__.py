"""Executors: who runs the jobs the study's runner hands out.

The runner keeps the graph and decides what is ready; an executor only starts a job
(`Executor.submit`), says which have ended (`Executor.wait`) and stops them (`Executor.stop`).
Every worker runs a job through `dpls.study.jobs.execute`, so a job behaves the same whoever
runs it. The engines are existing ones, none of our own:

- `sequential`: one job after another in the study's own process (the default);
- `local`: N worker processes on this machine (`multiprocessing`'s forkserver: each job its
  own process, started from one that has imported torch once), cores or GPUs split between them;
- `slurm`: Slurm through submitit (job arrays, dependencies, requeue on preemption);
- `ray`: Ray tasks (a running cluster, or a local one).
"""

from __future__ import annotations

from pathlib import Path

from dpls.distributed import DistContext
from dpls.study.executor_spec import ExecutorSpec
from dpls.study.executors.base import Executor, Finished, Handle, require
from dpls.study.executors.local import LocalExecutor
from dpls.study.executors.ray import RayExecutor
from dpls.study.executors.sequential import SequentialExecutor
from dpls.study.executors.slurm import SlurmExecutor


def make_executor(spec: ExecutorSpec, study_dir: Path, *, ctx: DistContext | None = None) -> Executor:
    """The executor ``spec`` names (checks that its engine is installed before any work); ``ctx``:
    the torchrun process group a sequential study runs under."""
    if spec.kind == "sequential":
        return SequentialExecutor(ctx=ctx)
    if spec.kind == "local":
        return LocalExecutor(spec)
    if spec.kind == "slurm":
        return SlurmExecutor(spec, study_dir)
    if spec.kind == "ray":
        return RayExecutor(spec)
    raise ValueError(f"unknown executor {spec.kind!r}")


__all__ = [
    "Executor",
    "Finished",
    "Handle",
    "LocalExecutor",
    "RayExecutor",
    "SequentialExecutor",
    "SlurmExecutor",
    "make_executor",
    "require",
]
