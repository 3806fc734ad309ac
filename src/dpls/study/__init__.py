"""Paired studies: does DPLS help, by how much, and how sure are we.

`spec` reads a STUDY.toml, `runner` trains the CE trunk and forks every arm × seed from it,
`stats` gives paired differences with their intervals, `report` turns run directories into
report.md, summary.json and plots. Names are imported on first use (the runner pulls in the
trainer; the report, matplotlib).
"""

from __future__ import annotations

from dpls._lazy import lazy_exports

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

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
