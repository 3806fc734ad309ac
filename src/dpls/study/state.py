"""The study's memory: which runs it has, where they live, and which are finished.

``STUDY_DIR/study_state.json`` lists the trunk and every arm × seed run (paths relative to
the study directory, so the folder can be moved). A rerun reads it to skip finished work,
and the report reads it to know which run is which arm and which runs are complete. It is
rewritten atomically (temp file + rename), so an interrupted study never leaves it half
written. Only the process holding the study's lock writes it.

``RUN/study_jobs.json`` is a run's own record of how the study ran it: one entry per
attempt of each of its jobs (training, evaluation) with the executor, the host, the torch
thread count and the devices. The thread count matters: on CPU it changes the order of
reductions, so the last bits of every number.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpls._io import write_json_atomic

STATE_FILE = "study_state.json"
LM_EVAL_FILE = "lm_eval.json"  # RUN/eval/lm_eval.json: {"task/metric": value}
SAMPLES_FILE = "samples.json"  # RUN/eval/samples.json: prompts, samples and generation metrics
JOBS_FILE = "study_jobs.json"  # RUN/study_jobs.json: every attempt of the run's jobs (see above)

PENDING, TRAINED, DONE = "pending", "trained", "done"
DIVERGED = "diverged"  # a result: RUN/diverged.json says where; never retrained
FAILED = "failed"  # every attempt failed (the entry's error and log say why); a rerun tries again
# Runs the report reads: trained (a sweep's runs away from the reference value need no
# evaluation), evaluated, or diverged. Any other run is left out and named as missing.
COMPLETE = frozenset({TRAINED, DONE, DIVERGED})


@dataclass
class RunEntry:
    """One arm × seed run of the study."""

    arm: str
    seed: int
    run_dir: str  # relative to the study directory
    status: str = PENDING
    value: Any = None  # the swept key's value ([sweep] studies)
    error: str | None = None  # why the last attempt failed (status "failed")
    log: str | None = None  # that job's log, relative to the study directory


@dataclass
class StudyState:
    name: str
    baseline: str
    seeds: list[int]
    arms: list[str]
    fork_step: int | None
    trunk_dir: str  # relative to the study directory (or absolute: an existing checkpoint's run)
    runs: list[RunEntry] = field(default_factory=list)
    trunk_status: str = PENDING
    spec: dict[str, Any] = field(default_factory=dict)
    # seed -> arm budgets its fork point lies along the trunk's data stream (JSON keys are strings)
    seed_offsets: dict[str, int] = field(default_factory=dict)
    # {"key": ..., "values": [...]} of a [sweep] study, with "others": {key: [...]} for several keys
    sweep: dict[str, Any] | None = None
    primary: str | None = None  # the study's primary metric (None: a state written before it existed)
    min_effect: float | None = None
    # how the last `dpls study` ran it: executor, workers, threads per job, wall time (seconds)
    execution: dict[str, Any] = field(default_factory=dict)

    def entry(self, arm: str, seed: int, value: Any = None) -> RunEntry:
        for r in self.runs:
            if r.arm == arm and r.seed == seed and r.value == value:
                return r
        raise KeyError((arm, seed, value))

    def entry_at(self, run_dir: str) -> RunEntry | None:
        """The run whose folder is ``run_dir`` (relative to the study directory), or None."""
        return next((r for r in self.runs if r.run_dir == run_dir), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyState:
        data = dict(data)
        data["runs"] = [RunEntry(**r) for r in data.get("runs", [])]
        return cls(**data)


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def read_state(study_dir: str | Path) -> StudyState:
    path = Path(study_dir) / STATE_FILE
    try:
        return StudyState.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"cannot read the study state {path}: {err}") from err


def write_state(study_dir: str | Path, state: StudyState) -> Path:
    return write_json_atomic(Path(study_dir) / STATE_FILE, state.to_dict(), default=str)


def read_job_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``RUN/study_jobs.json`` (empty when there is none or it is unreadable:
    a record of how a run was made, never a reason to stop)."""
    try:
        records = json.loads((Path(run_dir) / JOBS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def add_job_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append (or, for the same ``job`` and ``attempt``, replace) one attempt in ``RUN/study_jobs.json``.
    One job of a run runs at a time, so read-modify-write is safe."""
    records = [
        r
        for r in read_job_records(run_dir)
        if (r.get("job"), r.get("attempt"), r.get("started"))
        != (record["job"], record["attempt"], record["started"])
    ]
    write_json_atomic(Path(run_dir) / JOBS_FILE, [*records, record])


def training_threads(run_dir: str | Path) -> list[int]:
    """The torch thread counts the run's training attempts ran with, in order (empty if unrecorded)."""
    return [
        int(r["threads"])
        for r in read_job_records(run_dir)
        if r.get("kind") == "train" and isinstance(r.get("threads"), int)
    ]
