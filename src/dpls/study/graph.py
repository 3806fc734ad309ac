"""A study plan as an explicit graph of jobs.

    prepare → trunk → fork point of each seed → each (arm, value, seed) run → its evaluation → report

Jobs are kept in dispatch order: the sequential executor runs them exactly in this order
(the trunk, then every run seed by seed, then the evaluations, then the report), and a
parallel executor starts the ready ones in this order. A job's dependencies are the jobs
whose outputs it reads: a run depends on its seed's fork point (or the trunk, or the data),
an evaluation on its run (in a sweep also on every baseline run, which decide the value
evaluated at), the report on everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from dpls.study.jobs import Job
from dpls.study.jobs.evaluate import EvalJob, SweepReference
from dpls.study.jobs.fork import ForkJob
from dpls.study.jobs.prepare import PrepareJob
from dpls.study.jobs.report import ReportJob
from dpls.study.jobs.train import TrainJob
from dpls.study.plan import REPORT_DIR, StudyPlan, StudyRun, fork_dir


@dataclass
class JobGraph:
    jobs: dict[str, Job] = field(default_factory=dict)  # name → job, in dispatch order

    def add(self, job: Job) -> Job:
        missing = [d for d in job.deps if d not in self.jobs]
        assert not missing, f"{job.name} depends on {missing}, not in the graph yet"
        self.jobs[job.name] = job
        return job

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)

    def of_kind(self, kind: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.kind == kind]

    def dependents(self, name: str) -> list[Job]:
        return [j for j in self.jobs.values() if name in j.deps]


def build_graph(plan: StudyPlan, *, ranks_per_run: int = 1, show_progress: bool = False) -> JobGraph:
    """The jobs of ``plan``. ``ranks_per_run``: the ranks each run trains with (its seed's fork
    point counts data in global batches of that many ranks)."""
    graph = JobGraph()
    spec = plan.spec
    data_deps: tuple[str, ...] = ()
    if spec.prepare is not None:
        prepare = PrepareJob(
            "prepare",
            (),
            spec.prepare,
            plan.data_dir,
            plan.study_dir,
            dict(spec.prepare_options),
            show_progress,
        )
        data_deps = (graph.add(prepare).name,)
    trunk_deps = data_deps
    if plan.trunk is not None:
        trunk_deps = (graph.add(TrainJob("train:trunk", data_deps, plan.trunk, None)).name,)
    trains = {}
    for run in plan.arms:
        deps = trunk_deps
        if not plan.from_scratch and run.seed_offset > 0:
            deps = (_fork_job(graph, plan, run, trunk_deps, ranks_per_run).name,)
        start = 0 if plan.from_scratch else plan.fork_step
        trains[run.name] = graph.add(TrainJob(f"train:{run.name}", deps, run, plan.fork_source(run), start))
    reference = _sweep_reference(plan)
    baseline_trains = tuple(
        trains[r.name].name for r in plan.arms if reference is not None and r.arm == spec.baseline
    )
    evals = []
    for run in plan.arms:
        deps = tuple(dict.fromkeys((trains[run.name].name, *baseline_trains)))
        evals.append(
            graph.add(
                EvalJob(f"eval:{run.name}", deps, run, spec.eval, plan.data_dir, reference, show_progress)
            )
        )
    report_deps = tuple(j.name for j in [*trains.values(), *evals])
    title = f"Study {spec.name}"
    graph.add(
        ReportJob("report", report_deps, plan.study_dir, plan.study_dir / REPORT_DIR, spec.baseline, title)
    )
    return graph


def _fork_job(graph: JobGraph, plan: StudyPlan, run: StudyRun, deps: tuple[str, ...], ranks: int) -> Job:
    name = f"fork:seed{run.seed}"
    if name in graph.jobs:
        return graph.jobs[name]
    seed = run.seed or 0
    job = ForkJob(
        name,
        deps,
        plan.trunk_checkpoint(),
        fork_dir(plan, seed),
        seed,
        run.seed_offset,
        plan.iters_per_arm,
        ranks,
    )
    return graph.add(job)


def _sweep_reference(plan: StudyPlan) -> SweepReference | None:
    sweep = plan.spec.sweep
    if sweep is None:
        return None
    base = plan.spec.baseline
    runs = [(r.value, r.seed or 0, r.run_dir) for r in plan.arms if r.arm == base]
    return SweepReference(sweep, base, runs)
