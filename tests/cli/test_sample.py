"""`dpls sample` on a tiny run trained in the test: determinism, seeds, errors, nothing written."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from data_helpers import make_text_data, train_tiny_run
from dpls.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    return train_tiny_run(make_text_data(root / "data"), root / "run")


def _files(root: Path) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def sample(capsys, run: Path, *args: str) -> str:
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", *args]) == 0
    return capsys.readouterr().out


def test_same_seed_same_text_other_seed_other_text(run, capsys):
    args = ("--num-samples=3", "--max-new-tokens=40", "--temperature=1.0", "--prompt=the cat")
    a = sample(capsys, run, *args, "--seed=1")
    assert a == sample(capsys, run, *args, "--seed=1")
    assert a != sample(capsys, run, *args, "--seed=2")
    samples = a.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("the cat") for s in samples)
    assert len(set(samples)) > 1  # one generator across the samples: they differ from each other


def test_greedy_is_seed_independent_and_top_k_1_is_greedy(run, capsys):
    args = ("--max-new-tokens=30", "--prompt=a dog")
    greedy = sample(capsys, run, *args, "--temperature=0", "--seed=1")
    assert greedy == sample(capsys, run, *args, "--temperature=0", "--seed=2")
    assert greedy == sample(capsys, run, *args, "--top-k=1", "--seed=3")


def test_prompt_file_empty_prompt_and_verbose(run, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os", encoding="utf-8")
    via_file = sample(capsys, run, f"--prompt-file={prompt}", "--max-new-tokens=20")
    assert via_file == sample(capsys, run, "--prompt=import os", "--max-new-tokens=20")
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", "--max-new-tokens=20", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err


def test_sampling_from_a_checkpoint_dir_equals_the_run(run, capsys):
    checkpoint = next((run / "checkpoints").iterdir())
    args = ("--max-new-tokens=25", "--seed=4")
    assert sample(capsys, run, *args) == sample(capsys, checkpoint, *args)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--temperature=-1"], "--temperature"),
        (["--top-k=0"], "--top-k"),
        (["--top-k=100000"], "--top-k"),
        (["--top-p=0"], "--top-p"),
        (["--top-p=1.5"], "--top-p"),
        (["--max-new-tokens=0"], "--max-new-tokens"),
        (["--max-new-tokens=64"], "block_size 64"),  # <|endoftext|> + 64 > 64
        (["--num-samples=0"], "--num-samples"),
        (["--prompt-file=/nonexistent/prompt.txt"], "--prompt-file"),
        (["--device=nonsense"], "device"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(run, capsys, args, match):
    before = _files(run)
    cwd_before = set(os.listdir("."))
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpls sample: error:") and match in lines[0]
    assert _files(run) == before and set(os.listdir(".")) == cwd_before


def test_a_bad_run_exits_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["sample", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dpls sample: error:") for line in err)


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and counts its writes."""

    writes = 0

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_terminal_gets_the_same_text_token_by_token(run, capsys, monkeypatch):
    args = ("--max-new-tokens=30", "--seed=5", "--num-samples=2", "--prompt=the")
    piped = sample(capsys, run, *args)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["sample", str(run), "--device=cpu", *args]) == 0
    assert terminal.getvalue() == piped
    assert terminal.writes > 10  # streamed, not written once per sample
