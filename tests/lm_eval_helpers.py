"""A tiny multiple-choice task for lm-evaluation-harness, shared by the eval and study tests."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    ("def add(x, y):", ["return x + y", "pass", "class Point"], 0),
    ("class Point:", ["pass", "return x", "def add"], 0),
    ("x + y", ["return", "class", "def"], 1),
    ("return x", ["+ y", "pass", "Point"], 0),
    ("def", ["add", "Point", "return"], 0),
    ("class", ["Point", "add", "x"], 0),
    ("pass", ["def", "class", "return"], 2),
    ("y):", ["return", "pass", "def"], 1),
    ("Point", ["pass", "add", "y"], 2),
    ("add(x,", ["y", "x", "Point"], 0),
]


def write_task(root: Path) -> Path:
    """A task folder for --include_path: a multiple_choice YAML over a local JSONL file."""
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    (tasks / "toy_mc.yaml").write_text(
        "task: toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks
