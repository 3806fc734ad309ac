"""The study's memory: which runs it has, where they live, and which are finished.

``STUDY_DIR/study_state.json`` lists the trunk and every arm × seed run (paths relative to
the study directory, so the folder can be moved). A rerun reads it to skip finished work,
and the report reads it to know which run is which arm. It is rewritten atomically (temp
file + rename), so an interrupted study never leaves it half written.
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

PENDING, TRAINED, DONE = "pending", "trained", "done"
DIVERGED = "diverged"  # a result: RUN/diverged.json says where; never retrained


@dataclass
class RunEntry:
    """One arm × seed run of the study."""

    arm: str
    seed: int
    run_dir: str  # relative to the study directory
    status: str = PENDING
    value: Any = None  # the swept key's value ([sweep] studies)


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
    sweep: dict[str, Any] | None = None  # {"key": ..., "values": [...]} of a [sweep] study

    def entry(self, arm: str, seed: int, value: Any = None) -> RunEntry:
        for r in self.runs:
            if r.arm == arm and r.seed == seed and r.value == value:
                return r
        raise KeyError((arm, seed, value))

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
