"""The last job: report.md, summary.json and the plots, from every complete run (rewritten on
every run of the study; runs that failed are named in it as missing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dpls.study.jobs import DONE, Job, JobResult
from dpls.study.report import write_report


@dataclass
class ReportJob(Job):
    kind: ClassVar[str] = "report"
    inline: ClassVar[bool] = True
    after_failures: ClassVar[bool] = True  # a report of what finished, naming what did not

    name: str
    deps: tuple[str, ...]
    study_dir: Path
    report_dir: Path
    baseline: str
    title: str

    def is_done(self) -> bool:
        return False  # the report follows the runs: always written again

    def run(self) -> JobResult:
        report = write_report(self.study_dir, self.report_dir, baseline=self.baseline, title=self.title)
        return JobResult(DONE, str(report))

    def describe(self) -> str:
        return f"writing the report into {self.report_dir}"
