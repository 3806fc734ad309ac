"""One view of a study while it runs: what runs now (with its step and ETA), and how many jobs
are done, failed and waiting.

On a terminal the view is a small block redrawn in place; elsewhere (a log file, a batch
job) it is plain lines: one when a job starts or ends, and the counts every minute. Each
job's own output goes to its log file, not here (the sequential executor also shows it).
A running training job's step comes from the last row of its ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from dpls.runs.layout import METRICS_FILE
from dpls.study.executors.base import Handle
from dpls.study.tables import hms

PLAIN_EVERY_S = 60.0  # how often the counts are printed when not on a terminal


def last_step(run_dir: Path) -> int | None:
    """The step of the last complete row of a running run's ``metrics.jsonl`` (None: none yet).
    Reads only the file's tail: a running run's log grows, and a row may be half written."""
    path = run_dir / METRICS_FILE
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    rows = tail.split("\n")[:-1]  # after the last newline: a row still being written, or nothing
    for line in reversed(rows):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return row["step"]
    return None


class StudyView:
    """The progress of one `dpls study` process."""

    def __init__(self, name: str, total: int, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.name, self.total = name, total
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0  # lines of the live block on screen
        self._last_plain = self.started
        self._seen: dict[str, tuple[int, float]] = {}  # job → (first step seen, when)
        self._rate: dict[str, float] = {}  # job → steps per second

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        self._erase()
        print(f"[study {self.name}] {text}", file=self.stream, flush=True)

    def job_started(self, handle: Handle, index: int) -> None:
        where = f", {handle.where}" if handle.where and handle.where != "this process" else ""
        retry = f", attempt {handle.attempt}" if handle.attempt > 1 else ""
        self.line(f"{index}/{self.total} {handle.job.describe()} (elapsed {hms(self.elapsed)}{where}{retry})")

    def job_ended(self, handle: Handle, outcome: str, message: str = "") -> None:
        self._seen.pop(handle.job.name, None)
        self._rate.pop(handle.job.name, None)
        if outcome == "done" and not message:
            return
        self.line(f"{handle.job.name}: {outcome}{': ' + message if message else ''}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def refresh(self, running: Sequence[Handle], counts: Mapping[str, int], steps_left: int) -> None:
        """Redraw the block (terminal), or print the counts once a minute (plain lines)."""
        if not self.enabled:
            return
        rows = [self._job_row(h) for h in running]
        status = self._status(counts, steps_left)
        if self.live:
            self._erase()
            print("\n".join([status, *rows]), file=self.stream, flush=True)
            self._drawn = 1 + len(rows)
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            print(f"[study {self.name}] {status}", file=self.stream, flush=True)
            for row in rows:
                print(f"[study {self.name}] {row}", file=self.stream, flush=True)

    def close(self) -> None:
        self._erase()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, clear below
            self._drawn = 0

    def _job_row(self, handle: Handle) -> str:
        job = handle.job
        where = f" [{handle.where}]" if handle.where else ""
        span = job.progress()
        if span is None:
            return f"  {job.describe()}{where}"
        run_dir, _, final = span
        step = last_step(run_dir)
        if step is None:
            return f"  {job.name}: starting{where}"
        now = time.monotonic()
        seen_step, seen_at = self._seen.setdefault(job.name, (step, now))
        eta = ""
        if step > seen_step and now > seen_at:
            self._rate[job.name] = (step - seen_step) / (now - seen_at)
            eta = f", ETA {hms((final - step) / self._rate[job.name])}"
        return f"  {job.name}: step {step}/{final}{eta}{where}"

    def _status(self, counts: Mapping[str, int], steps_left: int) -> str:
        parts = [f"{counts.get(k, 0)} {k}" for k in ("done", "running", "failed", "waiting")]
        eta = ""
        rate = sum(self._rate.values())
        if rate > 0 and steps_left > 0:
            eta = f", ETA ~{hms(steps_left / rate)} of training"
        return f"{', '.join(parts)} of {self.total} jobs (elapsed {hms(self.elapsed)}{eta})"
