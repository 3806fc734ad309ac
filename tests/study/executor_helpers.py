"""Jobs for testing the runner and the executors without training: each writes one file, and
on its first attempts it can die the way a worker dies (killed by the test, or crashing).
They live in a module of their own so that worker processes can import them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dpls.study.jobs import DONE, Job, JobResult


@dataclass
class FileJob(Job):
    kind: ClassVar[str] = "file"

    name: str
    deps: tuple[str, ...]
    folder: Path
    doomed_attempts: int = 0  # attempts that never finish: they wait to be killed, or crash
    crash: bool = False  # crash (exit at once) instead of waiting to be killed

    def is_done(self) -> bool:
        return (self.folder / f"{self.name}.out").is_file()

    def run(self) -> JobResult:
        attempts = self.folder / f"{self.name}.attempts"
        attempt = len(attempts.read_text()) + 1 if attempts.exists() else 1
        attempts.write_text("x" * attempt)
        if attempt <= self.doomed_attempts:
            if self.crash:
                os._exit(3)
            (self.folder / f"{self.name}.pid").write_text(str(os.getpid()))
            time.sleep(120)  # until the test kills this worker
        (self.folder / f"{self.name}.out").write_text(str(attempt))
        return JobResult(DONE)

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"


@dataclass
class SummaryJob(FileJob):
    """Runs once its dependencies ended, even when some failed (like the report)."""

    after_failures: ClassVar[bool] = True
