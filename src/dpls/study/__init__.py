"""Paired studies: does DPLS help, by how much, and how sure are we.

`spec` reads a STUDY.toml and `plan` resolves it into runs, checked before any work;
`graph` turns the plan into jobs (`jobs/`: prepare, train, fork, evaluate, report) and
`runner` hands the ready ones to an executor (`executors/`: sequential, local, slurm, ray).
`records` reads finished runs, `summary` and `stats` give paired differences with their
intervals, `sweep` the LR sensitivity, `tables`, `report` and `plots` write report.md,
summary.json and the figures. Names are imported on first use (the runner pulls in the
trainer; the report, matplotlib).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.study.plan import StudyPlan, plan_study
    from dpls.study.records import load_run
    from dpls.study.report import write_report
    from dpls.study.runner import run_study
    from dpls.study.spec import StudySpec, load_spec, parse_spec
    from dpls.study.stats import paired_ci, t_quantile, welch_ci

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "StudySpec": ".spec",
    "load_spec": ".spec",
    "parse_spec": ".spec",
    "StudyPlan": ".plan",
    "plan_study": ".plan",
    "run_study": ".runner",
    "paired_ci": ".stats",
    "welch_ci": ".stats",
    "t_quantile": ".stats",
    "write_report": ".report",
    "load_run": ".records",
}

__all__ = [
    "StudyPlan",
    "StudySpec",
    "load_run",
    "load_spec",
    "paired_ci",
    "parse_spec",
    "plan_study",
    "run_study",
    "t_quantile",
    "welch_ci",
    "write_report",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
