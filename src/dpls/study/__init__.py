"""Paired studies: does DPLS help, by how much, and how sure are we.

`spec` reads a STUDY.toml, `runner` trains the CE trunk and forks every arm × seed from it,
`stats` gives paired differences with their intervals, `report` turns run directories into
report.md and summary.json, `plots` draws its figures. Names are imported on first use (the
runner pulls in the trainer; the report, matplotlib).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.study.report import load_run, write_report
    from dpls.study.runner import StudyPlan, plan_study, run_study
    from dpls.study.spec import StudySpec, load_spec, parse_spec
    from dpls.study.stats import paired_ci, t_quantile, welch_ci

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "StudySpec": ".spec",
    "load_spec": ".spec",
    "parse_spec": ".spec",
    "StudyPlan": ".runner",
    "plan_study": ".runner",
    "run_study": ".runner",
    "paired_ci": ".stats",
    "welch_ci": ".stats",
    "t_quantile": ".stats",
    "write_report": ".report",
    "load_run": ".report",
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
