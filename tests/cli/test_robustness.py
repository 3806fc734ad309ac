"""The command line's rules for every command: a closed stdout never kills one, a path the file
system cannot hold and a file that could not be written are one line, and sampling arguments
at their limits (tiny temperatures, huge seeds, bytes that are not UTF-8) are handled."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import make_text_data, train_tiny_run
from dpls.cli import main
from dpls.runs.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "x" * 300  # over NAME_MAX (255 bytes) on every common file system


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    return train_tiny_run(make_text_data(root / "data"), root / "run", steps=4)


def _train_args(run: Path, out: Path, *extra: str) -> list[str]:
    args = dict(
        data_dir=run.parent / "data", out_dir=out, model="tiny", n_layer=1, n_embd=32, n_head=2,
        block_size=32, batch_size=2, max_iters=6, eval_interval=6, eval_tokens=64, log_interval=1,
        checkpoint_interval=3, device="cpu", dtype="float32", progress=False,
    )  # fmt: skip
    return ["train", *(f"--{k}={v}" for k, v in args.items()), *extra]


def one_line(capsys, code: int, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- a reader that goes away ----------------------------------------------------------------------


class ClosedAfter(io.StringIO):
    """A stdout whose reader leaves after ``lines`` writes (``dpls ... | head -1``)."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.left, self.refused = lines, 0

    def write(self, text: str) -> int:
        if self.left <= 0:
            self.refused += 1
            raise BrokenPipeError(32, "Broken pipe")
        self.left -= 1
        return super().write(text)


def test_training_goes_on_when_its_stdout_is_closed(run, tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setattr(sys, "stdout", ClosedAfter(1))
    assert main(_train_args(run, out)) == 0
    assert latest_checkpoint(out).name == "step_0000006"  # trained to the end, and resumable on the way
    assert sys.stdout.refused == 1  # after the first refused line, nothing more was sent to the pipe


def test_sample_stops_quietly_when_its_stdout_is_closed(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedAfter(0))
    assert main(["sample", str(run), "--device=cpu", "--num-samples=50", "--max-new-tokens=8"]) == 0
    assert sys.stdout.refused == 1  # stopped at the first sample: no one reads the other 49
    assert capsys.readouterr().err == ""


def test_sample_into_head_exits_quietly(run):
    """A real pipe: what Python still buffers at exit must not print "Exception ignored"."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpls",
            "sample",
            str(run),
            "--device=cpu",
            "--num-samples=30",
            "--max-new-tokens=40",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


# -- paths the file system cannot hold ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        lambda run, t: _train_args(run, t / LONG),
        lambda run, t: _train_args(run, t / "r", f"--resume_dir={t / LONG}"),
        lambda run, t: [*_train_args(run, t / "r"), f"--data_dir={t / LONG}"],
        lambda run, t: ["eval", str(t / LONG)],
        lambda run, t: ["eval", str(run), "--out", str(t / LONG / "m.json")],
        lambda run, t: ["sample", str(t / LONG)],
        lambda run, t: ["export-hf", str(run), str(t / LONG)],
        lambda run, t: ["prepare", "stdlib", "--out", str(t / LONG)],
        lambda run, t: ["compare", str(run), "--out", str(t / LONG)],
        lambda run, t: ["study", str(t / f"{LONG}.toml")],
        lambda run, t: ["bench", "loss", "--json", str(t / f"{LONG}.json")],
        lambda run, t: ["lm-eval", str(run), "--tasks", "x", "--out", str(t / LONG)],
    ],
    ids=[
        "train",
        "resume",
        "data",
        "eval",
        "eval-out",
        "sample",
        "export",
        "prepare",
        "compare",
        "study",
        "bench",
        "lm-eval",
    ],
)
def test_a_name_over_255_bytes_is_one_line_before_any_work(run, tmp_path, capsys, argv):
    err = one_line(capsys, 2, *argv(run, tmp_path))
    assert "bytes long; a file or folder name may be at most 255 bytes" in err
    assert not list(tmp_path.iterdir())  # nothing created


def test_a_path_over_path_max_is_one_line(run, tmp_path, capsys):
    deep = tmp_path.joinpath(*["d" * 200] * 25)
    assert "bytes long (from the root)" in one_line(capsys, 2, *_train_args(run, deep))


# -- a file that could not be written -------------------------------------------------------------


def test_a_size_limit_says_what_happened_and_that_the_run_is_resumable(run, tmp_path, capsys):
    """``ulimit -f``: Python ignores SIGXFSZ, so the write fails with EFBIG (torch's checkpoint
    writer only says "unexpected pos"): the message says a file could not be written and how
    the run goes on; once the limit is lifted it does."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "r"
    assert main(_train_args(run, out, "--max_iters=3")) == 0  # step_0000003, small files
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # smaller than a checkpoint's tensors
    try:
        err = one_line(capsys, 1, "train", f"--resume_dir={out}", "--max_iters=6")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "a file could not be written" in err and "ulimit -f" in err
    assert "resumable from step_0000003" in err and f"dpls train --resume_dir={out}" in err
    assert main(["train", f"--resume_dir={out}", "--max_iters=6"]) == 0
    assert latest_checkpoint(out).name == "step_0000006"


# -- sampling at its limits -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", ["1e-40", "1e-45", "1e-320"])
def test_a_tiny_temperature_samples_greedily(run, capsys, temperature):
    args = ["sample", str(run), "--device=cpu", "--max-new-tokens=12", "--prompt=the cat"]
    capsys.readouterr()
    assert main([*args, "--temperature=0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, f"--temperature={temperature}"]) == 0
    assert capsys.readouterr().out == greedy


def test_arguments_that_cannot_be_used_are_one_line(run, tmp_path, capsys):
    not_utf8 = "a\udcff\udcfeb"  # what Python makes of the bytes a\xff\xfeb in argv
    err = one_line(capsys, 2, "sample", str(run), "--prompt", not_utf8)
    assert "not valid UTF-8" in err
    err = one_line(capsys, 2, "sample", str(run), "--seed", "99999999999999999999999")
    assert "--seed must be an integer in [0, 2**64 - 1]" in err
    err = one_line(capsys, 2, *_train_args(run, tmp_path / "r", "--seed=99999999999999999999999"))
    assert "seed must be an integer in [0, 2**64 - 1]" in err
    err = one_line(capsys, 2, *_train_args(run, tmp_path / f"r{not_utf8}"))
    assert "out_dir is not valid UTF-8" in err
