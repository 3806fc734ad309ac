"""Run a study: its plan, one lock, the graph of jobs, and one loop handing ready jobs to an executor.

``run_study`` checks everything (`plan_study`), takes the study folder's lock (a second
``dpls study`` on the same folder is refused at once, naming the holder), records the study
in ``study_state.json``, builds the graph (`dpls.study.graph`) and drives it: every job whose
outputs are complete is done, whoever made them; a ready job goes to the executor; a job whose
worker died is tried again (its run resumes from its latest checkpoint) up to ``retries``
more times, then reported failed with its log; the runs it leaves out are named in the
report. SIGTERM or Ctrl-C stops the workers, which save a checkpoint: every run stays
resumable, and the same command continues, with this executor or another.

Several GPUs, the old way: ``torchrun --nproc_per_node=N -m dpls study FILE`` trains every run
over all N ranks, one run at a time (the sequential executor).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from dpls._io import exclusive_lock, write_owned_text
from dpls.distributed import DistContext, init_distributed, launched_by_torchrun
from dpls.runs.layout import read_toml
from dpls.study.executor_spec import DEFAULT_RETRIES, ExecutorSpec
from dpls.study.executors import Executor, Finished, Handle, SequentialExecutor, make_executor
from dpls.study.executors.slurm import live_jobs
from dpls.study.graph import JobGraph, build_graph
from dpls.study.jobs import FINISHED, STOPPED, Job, JobResult
from dpls.study.jobs.evaluate import EvalJob
from dpls.study.jobs.train import TrainJob
from dpls.study.plan import STUDY_COPY, StudyPlan, StudyStopped, check_runs_with_trainer, plan_study
from dpls.study.progress import StudyView
from dpls.study.spec import StudySpec, load_spec
from dpls.study.state import (
    DIVERGED,
    DONE,
    FAILED,
    PENDING,
    TRAINED,
    RunEntry,
    StudyState,
    read_state,
    write_state,
)

WAITING, RUNNING, FINISHED_OK, FAILED_JOB, BLOCKED = "waiting", "running", "done", "failed", "blocked"
POLL_S = 1.0  # how often a parallel study looks at its jobs (and redraws its progress)


class StudyIncomplete(RuntimeError):
    """Jobs failed after every attempt. The report, if one was written (``report``), leaves their
    runs out and names them; rerunning the study tries them again."""

    def __init__(self, message: str, report: Path | None) -> None:
        super().__init__(message)
        self.report = report


class _Terminated(Exception):
    """SIGTERM reached the study's own process (a parallel executor's)."""


def run_study(
    study: str | Path | StudySpec | StudyPlan,
    *,
    progress: bool = True,
    executor: ExecutorSpec | Executor | None = None,
) -> Path | None:
    """Run (or continue) a study; returns the path of its report.md (None when the jobs were
    left to a cluster queue, and on torchrun ranks other than 0).

    ``study``: a STUDY.toml path, a parsed `StudySpec`, or a `StudyPlan`; ``executor``: where
    the jobs run (default: the study file's ``[executor]``). Everything is checked before the
    first job starts; finished jobs are skipped.
    """
    plan = (
        study
        if isinstance(study, StudyPlan)
        else plan_study(study if isinstance(study, StudySpec) else load_spec(study))
    )
    spec = executor if isinstance(executor, ExecutorSpec) else plan.spec.executor
    ctx = init_distributed() if launched_by_torchrun() else None
    if ctx is not None and not isinstance(executor, Executor) and spec.kind != "sequential":
        raise ValueError(f"under torchrun a study runs with the sequential executor, not {spec.kind!r}")
    main = ctx is None or ctx.is_main
    with exclusive_lock(plan.study_dir, "study") if main else contextlib.nullcontext():
        # the engine first: one that is not installed is refused before anything is written
        engine = executor if isinstance(executor, Executor) else make_executor(spec, plan.study_dir, ctx=ctx)
        try:
            state = _claim(plan, engine.kind) if main else None
            if ctx is not None:
                ctx.barrier()
            bars = progress and isinstance(engine, SequentialExecutor)  # workers write plain logs
            ranks = ctx.world_size if ctx else _ranks(spec)
            graph = build_graph(plan, ranks_per_run=ranks, show_progress=bars)
            view = StudyView(plan.spec.name, len(graph), enabled=main)  # lines even without progress bars
            try:
                return Driver(
                    graph, engine, view, plan=plan, state=state, ctx=ctx, retries=spec.retries
                ).run()
            finally:
                view.close()
        finally:
            engine.close()


def _ranks(spec: ExecutorSpec) -> int:
    """Ranks each run trains with: the GPUs a job gets, when it gets several."""
    return max(1, spec.gpus_per_job or 1) if spec.kind != "sequential" else 1


def _claim(plan: StudyPlan, kind: str) -> StudyState:
    """Make the folder this study's: its file copied in, its state (statuses kept, the plan followed)."""
    study_dir, spec = plan.study_dir, plan.spec
    if kind != "slurm" and (queued := live_jobs(study_dir)):
        raise ValueError(
            f"{study_dir} has Slurm jobs still queued or running ({', '.join(queued[:5])}): wait for them, "
            f"cancel them (scancel), or run this study with --executor slurm"
        )
    study_dir.mkdir(parents=True, exist_ok=True)
    if spec.source is not None and spec.source.resolve() != (study_dir / STUDY_COPY).resolve():
        write_owned_text(study_dir / STUDY_COPY, spec.source.read_text(encoding="utf-8"))
    fresh = _initial_state(plan)
    if (study_dir / "study_state.json").is_file():
        old = read_state(study_dir)
        known = {(r.arm, r.seed, repr(r.value)): r for r in old.runs}
        fresh.runs = [known.get((r.arm, r.seed, repr(r.value)), r) for r in fresh.runs]  # statuses kept
        fresh.trunk_status, fresh.execution = old.trunk_status, old.execution
    fresh.spec = read_toml(spec.source) if spec.source is not None else {}
    write_state(study_dir, fresh)
    return fresh


def _initial_state(plan: StudyPlan) -> StudyState:
    spec = plan.spec
    trunk_dir = plan.trunk_dir
    if trunk_dir is None:  # from scratch: no trunk
        rel = ""
    else:
        rel = (
            str(trunk_dir.relative_to(plan.study_dir)) if plan.trunk is not None else str(trunk_dir.resolve())
        )
    return StudyState(
        name=spec.name,
        baseline=spec.baseline,
        seeds=list(spec.seeds),
        arms=[a.name for a in spec.arms],
        fork_step=plan.fork_step,
        trunk_dir=rel,
        seed_offsets={str(s): o for s, o in sorted(plan.seed_offsets.items())},
        runs=[
            RunEntry(
                r.arm or "", r.seed or 0, r.run_dir.relative_to(plan.study_dir).as_posix(), value=r.value
            )
            for r in plan.arms
        ],
        sweep=spec.sweep.to_dict() if spec.sweep else None,
        primary=spec.primary,
        min_effect=spec.min_effect,
    )


class Driver:
    """One pass of the study's process over a graph: the runner's loop, usable on any graph.

    ``state``: the study state to keep up to date in ``study_dir`` (None: record nothing, as on
    torchrun ranks other than 0); ``plan``: the study's, whose runs are checked by the
    trainer once the data a study prepares itself exists.
    """

    def __init__(
        self,
        graph: JobGraph,
        executor: Executor,
        view: StudyView,
        *,
        plan: StudyPlan | None = None,
        state: StudyState | None = None,
        ctx: DistContext | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self.plan, self.graph, self.executor, self.view = plan, graph, executor, view
        self.state = state if plan is not None else None
        self.study_dir = plan.study_dir if plan is not None else Path()
        self.ctx = ctx
        self.retries = retries
        self.status = dict.fromkeys(graph.jobs, WAITING)
        self.handles: dict[str, Handle] = {}
        self.attempts: Counter[str] = Counter()
        self.errors: dict[str, str] = {}
        self.report: Path | None = None
        self.stopping = False
        self.started = time.monotonic()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> Path | None:
        self.view.line(self.executor.describe())
        for job in self.graph:
            if job.kind != "report" and job.is_done():
                self.status[job.name] = FINISHED_OK
            elif (handle := self.executor.adopt(job)) is not None:  # left in a cluster queue earlier
                self._started(handle)
        if done := self._already_done():
            self.view.line(f"already done: {done}")
        try:
            with self._terminate_raises():
                self._loop()
        except (KeyboardInterrupt, _Terminated) as stop:
            self._stop(signal.SIGTERM)
            if isinstance(stop, KeyboardInterrupt):
                raise
            raise StudyStopped(
                "SIGTERM received: the running jobs saved their progress; rerun the same study to continue"
            ) from None
        finally:
            self._save_state()
        return self._outcome()

    def _already_done(self) -> str:
        """What an earlier run of the study finished (skipped now), in words."""
        trains = [j for j in self.graph.of_kind("train") if self.status[j.name] == FINISHED_OK]
        diverged = sum(1 for j in trains if isinstance(j, TrainJob) and j.study_run.diverged is not None)
        trunk = any(isinstance(j, TrainJob) and j.study_run.name == "trunk" for j in trains)
        evaluated = sum(1 for j in self.graph.of_kind("eval") if isinstance(j, EvalJob) and j.is_evaluated())
        parts = ["the trunk"] if trunk else []
        if len(trains) - trunk - diverged:
            parts.append(f"{len(trains) - trunk - diverged} runs trained")
        if diverged:
            parts.append(f"{diverged} diverged (kept as results)")
        if evaluated:
            parts.append(f"{evaluated} evaluated")
        return ", ".join(parts)

    def _loop(self) -> None:
        while True:
            if self.ctx is not None and self._training_over() and not self._leave_group():
                return  # a torchrun rank other than 0: its part (training) is done
            self._block_after_failures()
            moved = self._dispatch()
            if not self.handles:
                if moved:
                    continue
                return
            finished = self.executor.wait(0.0 if self.executor.detached else POLL_S)
            for fin in finished:
                self._finish(fin)
            if self.executor.detached and not finished:
                return  # the queue has everything it can take now; a later run collects the rest
            self._refresh()

    def _dispatch(self) -> bool:
        """Start every job that is ready (or, with an engine that keeps the order, submittable)."""
        moved = False
        for job in self.graph:
            if self.status[job.name] != WAITING:
                continue
            ready = self._submittable(job)
            if ready is None:
                continue
            after, prelude = ready
            if not after and job.kind != "report" and job.is_done():  # made by someone else, or nothing to do
                self._set(job, FINISHED_OK)
                moved = True
            elif job.inline:
                if not after:  # else it waits (or travels with a dependent, as its prelude)
                    self._run_inline(job)
                    moved = True
            elif self.executor.has_slot():
                self._started(self.executor.submit(job, self.attempts[job.name] + 1, after, prelude))
                moved = True
            else:
                break
        return moved

    def _submittable(self, job: Job) -> tuple[list[Handle], list[Job]] | None:
        """None if ``job`` cannot start yet; else the running jobs it must wait for and the inline
        jobs to run first (both empty unless the engine keeps the order itself)."""
        after: list[Handle] = []
        prelude: list[Job] = []
        chain = self.executor.chains and job.chainable()
        for name in job.deps:
            status = self.status[name]
            if status == FINISHED_OK or (job.after_failures and status in (FAILED_JOB, BLOCKED)):
                continue
            if chain and status == RUNNING:
                after.append(self.handles[name])
                continue
            dep = self.graph.jobs[name]
            if chain and status == WAITING and dep.inline and (sub := self._submittable(dep)) is not None:
                after += sub[0]
                prelude += [*sub[1], dep]
                continue
            return None
        return after, prelude

    def _run_inline(self, job: Job) -> None:
        if job.kind == "report" and self.state is not None and self.plan is not None:
            self.state.execution = {
                **self.executor.execution(),
                "wall_s": round(time.monotonic() - self.started, 1),
            }
            write_state(self.study_dir, self.state)
        handle = Handle(job, self.attempts[job.name] + 1, where="this process")
        self._started(handle)
        self._finish(Finished(handle, self.executor.run_inline(job, handle.attempt)))

    def _started(self, handle: Handle) -> None:
        self.status[handle.job.name] = RUNNING
        self.handles[handle.job.name] = handle
        index = sum(1 for s in self.status.values() if s != WAITING)
        self.view.job_started(handle, index)

    # -- results ---------------------------------------------------------------------------

    def _finish(self, fin: Finished) -> None:
        job, result = fin.handle.job, fin.result
        self.handles.pop(job.name, None)
        if result.status in FINISHED and (job.kind == "report" or job.is_done()):
            self._set(job, FINISHED_OK)
            self.view.job_ended(fin.handle, result.status, "" if job.kind == "report" else result.message)
            if job.kind == "report":
                self.report = Path(result.message)
            elif job.kind == "prepare" and self.plan is not None:
                check_runs_with_trainer(self.plan)  # the data exists now: every run checked before training
            return
        if self.stopping:  # asked to stop: whatever it was doing, it is resumed by the next run
            self._set(job, WAITING)
            return
        if result.status == STOPPED and isinstance(self.executor, SequentialExecutor):
            self._set(job, WAITING)
            raise StudyStopped(f"{result.message}; rerun the same study to continue")
        if any(self.status[d] != FINISHED_OK for d in job.deps) and not job.after_failures:
            self._set(job, WAITING)  # cancelled because a job it waits on failed: not its own attempt
            return
        self._failed_attempt(fin.handle, result)

    def _failed_attempt(self, handle: Handle, result: JobResult) -> None:
        job = handle.job
        self.attempts[job.name] += 1
        log = f" (log: {job.log})" if job.log else ""
        if result.retry and self.attempts[job.name] <= self.retries:
            again = " from its latest checkpoint" if job.kind == "train" else ""
            self.view.job_ended(handle, "retrying", f"{result.message}{log}; trying again{again}")
            self._set(job, WAITING)
            return
        tries = self.attempts[job.name]
        self.errors[job.name] = f"{result.message} ({tries} attempt{'s' if tries != 1 else ''})"
        self.view.job_ended(handle, "failed", f"{self.errors[job.name]}{log}")
        self._set(job, FAILED_JOB)

    def _block_after_failures(self) -> None:
        for job in self.graph:
            if self.status[job.name] == WAITING and not job.after_failures:
                bad = [d for d in job.deps if self.status[d] in (FAILED_JOB, BLOCKED)]
                if bad:
                    self.errors[job.name] = f"not run: {bad[0]} failed"
                    self._set(job, BLOCKED)

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self.view.line("stopping: the running jobs save their progress")
        self.executor.stop(signum)
        for fin in self.executor.wait(0.0):
            self._finish(fin)

    @contextlib.contextmanager
    def _terminate_raises(self) -> Iterator[None]:
        """SIGTERM stops a parallel study like Ctrl-C (the sequential one's trainer handles it itself)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            raise _Terminated

        if isinstance(self.executor, SequentialExecutor):
            yield
            return
        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    # -- torchrun --------------------------------------------------------------------------

    def _training_over(self) -> bool:
        return all(
            self.status[j.name] != WAITING and self.status[j.name] != RUNNING
            for j in self.graph.of_kind("train")
        )

    def _leave_group(self) -> bool:
        """After the last training job, the process group goes; True on rank 0, which goes on."""
        assert isinstance(self.executor, SequentialExecutor)
        main = self.executor.leave_group()
        self.ctx = None
        return main

    # -- what the study records ------------------------------------------------------------

    def _set(self, job: Job, status: str) -> None:
        self.status[job.name] = status
        if self.state is None:
            return
        error = self.errors.get(job.name)
        log = (
            str(job.log.relative_to(self.study_dir))
            if job.log and job.log.is_relative_to(self.study_dir)
            else None
        )
        if isinstance(job, TrainJob) and job.study_run.name == "trunk":
            self.state.trunk_status = (
                DONE if status == FINISHED_OK else FAILED if status in (FAILED_JOB, BLOCKED) else PENDING
            )
        elif isinstance(job, TrainJob | EvalJob):
            _update_entry(self.state, job, status, error, log)
        self._save_state()

    def _save_state(self) -> None:
        if self.state is not None:
            write_state(self.study_dir, self.state)

    def _refresh(self) -> None:
        if isinstance(self.executor, SequentialExecutor):
            return  # one job at a time, showing its own progress
        counts = Counter({FINISHED_OK: 0, **Counter(self.status.values())})
        counts["failed"] = counts[FAILED_JOB] + counts[BLOCKED]
        steps_left = 0
        for job in self.graph.of_kind("train"):
            if self.status[job.name] in (WAITING, RUNNING) and (span := job.progress()) is not None:
                steps_left += span[2] - span[1]
        self.view.refresh(list(self.handles.values()), counts, steps_left)

    def _outcome(self) -> Path | None:
        waiting = [n for n, s in self.status.items() if s in (WAITING, RUNNING)]
        if self.executor.detached and waiting:
            queued = sum(1 for s in self.status.values() if s == RUNNING)
            self.view.line(
                f"{queued} jobs queued or running on the cluster: run the same command again to collect "
                "them, submit what is left and write the report (or pass --wait to stay until the end)"
            )
            return None
        failed = [n for n, s in self.status.items() if s in (FAILED_JOB, BLOCKED)]
        if failed:
            shown = "; ".join(f"{n}: {self.errors.get(n, 'failed')}" for n in failed[:5])
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise StudyIncomplete(
                f"{len(failed)} job(s) failed: {shown}{more}; the report leaves their runs out; rerun the "
                "study to try them again",
                self.report,
            )
        return self.report


def _update_entry(
    state: StudyState, job: TrainJob | EvalJob, status: str, error: str | None, log: str | None
) -> None:
    """A run's entry follows its training and evaluation jobs."""
    run = job.study_run
    entry = state.entry(run.arm or "", run.seed or 0, run.value)
    if status in (FAILED_JOB, BLOCKED):
        entry.status, entry.error, entry.log = FAILED, error, log
    elif run.diverged is not None:
        entry.status, entry.error = DIVERGED, None
    elif status == FINISHED_OK and isinstance(job, EvalJob):
        entry.status, entry.error = (DONE if job.is_evaluated() else TRAINED), None
    elif status == FINISHED_OK and entry.status != DONE:
        entry.status, entry.error = TRAINED, None
    elif status == WAITING and entry.status == FAILED:
        entry.status = PENDING
