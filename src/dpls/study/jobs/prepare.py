"""The first job of a study with ``prepare``: the corpus, tokenizer and shards in its data folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dpls.data.meta import META_FILE
from dpls.study.checks import PREPARERS
from dpls.study.jobs import DONE, Job, JobResult

PREPARE_LOG = "prepare.log"  # in the study folder: the data folder may be shared


@dataclass
class PrepareJob(Job):
    kind: ClassVar[str] = "prepare"

    name: str
    deps: tuple[str, ...]
    source: str  # "stdlib" or "fineweb-edu"
    data_dir: Path
    study_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    show_progress: bool = False

    def is_done(self) -> bool:
        return (self.data_dir / META_FILE).is_file()

    def run(self) -> JobResult:
        if not self.is_done():
            PREPARERS[self.source](self.data_dir, **self.options, progress=self.show_progress)
        return JobResult(DONE)

    @property
    def log(self) -> Path:
        return self.study_dir / PREPARE_LOG

    def describe(self) -> str:
        return f"preparing the {self.source} corpus into {self.data_dir}"
