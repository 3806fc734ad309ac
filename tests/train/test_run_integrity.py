"""What keeps a run whole: one writer per run (and per data, evaluation and report folder), a
damaged metrics.jsonl named before a resume, data whose meta.json does not describe it refused,
and a run that never moves never called diverged."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest

from data_helpers import make_text_data, train_tiny_run
from dpls._io import LOCK_FILE, exclusive_lock
from dpls.cli import main
from dpls.data.meta import DataMeta, corpus_fingerprint
from dpls.data.tokenizer import load_tokenizer
from dpls.runs.checkpoint import latest_checkpoint
from dpls.runs.layout import read_diverged, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Real text with both fingerprints recorded in meta.json, as `dpls prepare` writes them."""
    root = make_text_data(tmp_path_factory.mktemp("integrity") / "data")
    meta = DataMeta.load(root)
    meta.tokenizer_fingerprint = load_tokenizer(root).fingerprint()
    meta.corpus_fingerprint = corpus_fingerprint(root, meta, meta.tokenizer_fingerprint)
    meta.save(root)
    return root


@pytest.fixture(scope="module")
def run(data) -> Path:
    return train_tiny_run(data, data.parent / "run", steps=4, checkpoint_interval=2)


def one_line(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- one writer --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "held, argv",
    [
        (lambda r, t: r, lambda r, t: ["train", f"--resume_dir={r}", "--max_iters=6"]),
        (lambda r, t: r / "eval", lambda r, t: ["eval", str(r), "--device=cpu"]),
        (
            lambda r, t: t / "d",
            lambda r, t: ["prepare", "files", str(r / "config.toml"), "--out", str(t / "d")],
        ),
        (lambda r, t: t / "c", lambda r, t: ["compare", str(r), "--out", str(t / "c")]),
        (lambda r, t: t / "lm", lambda r, t: ["lm-eval", str(r), "--tasks", "x", "--out", str(t / "lm")]),
    ],
    ids=["train", "eval", "prepare", "compare", "lm-eval"],
)
def test_a_second_writer_is_refused_at_once_with_the_holders_pid(run, tmp_path, capsys, held, argv):
    """Two `dpls train --resume_dir=RUN` mixed one run's files (config and rows of one, checkpoints
    of the other); two evaluations or reports into one folder race on its files and manifest."""

    def files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}

    before = files()
    with exclusive_lock(held(run, tmp_path), "run"):  # another process (the pid is ours here)
        err = one_line(capsys, *argv(run, tmp_path))
    assert f"being written by another dpls process (pid {os.getpid()})" in err
    assert files() == before


# -- the metrics of a run being resumed ---------------------------------------------------------------


def test_resuming_names_a_garbage_line_and_cuts_a_torn_last_row_with_a_warning(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    metrics = copy / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0], "garbage", *rows[1:]]) + "\n")
    err = one_line(capsys, "train", f"--resume_dir={copy}", "--max_iters=6")
    assert f"{metrics}: line 2 of {len(rows) + 1} is not a JSON object" in err
    metrics.write_text("\n".join(rows) + "\n" + rows[-1][:-7])  # a crash while writing a row after step 4
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["train", f"--resume_dir={copy}", "--max_iters=6"]) == 0
    assert f"dpls train: warning: {metrics}: the last line was cut off" in capsys.readouterr().err
    steps = [r["step"] for r in read_metrics(copy) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # every row whole, none twice


# -- data whose meta.json does not describe it ---------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            {"vocab_size": 4096},
            "says vocab_size 4096 and eot_token 0, but its tokenizer tokenizer.json has 3",
        ),
        ({"corpus_fingerprint": "0" * 32}, "records corpus_fingerprint 0000.*but its shards have"),
        ({"tokenizer_fingerprint": "0" * 32}, "records tokenizer_fingerprint 0000.*but tokenizer.json has"),
    ],
    ids=["vocab_size", "corpus_fingerprint", "tokenizer_fingerprint"],
)
def test_an_edited_meta_json_is_refused_by_train_and_eval(run, data, tmp_path, capsys, edit, match):
    copy = shutil.copytree(data, tmp_path / "data")
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, **edit}))
    err = one_line(capsys, "train", f"--data_dir={copy}", f"--out_dir={tmp_path / 'r'}", "--model=tiny")
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()
    if "vocab_size" not in edit:  # eval refuses a larger vocabulary on its own, before this check
        err = one_line(
            capsys, "eval", str(run), f"--data-dir={copy}", "--device=cpu", f"--out={tmp_path / 'm.json'}"
        )
        assert re.search(match, err), err


# -- divergence ----------------------------------------------------------------------------------------


def test_a_run_at_learning_rate_0_is_never_called_diverged(data, tmp_path):
    """Its batch CEs wander around L_init (and sit a few percent above the validation CE at the
    start): noise, not divergence. The weights never change, so it cannot diverge."""
    out = train_tiny_run(
        data, tmp_path / "r", steps=8, learning_rate=0.0, min_lr=0.0, divergence_window=2, log_interval=1
    )
    assert read_diverged(out) is None and latest_checkpoint(out).name == "step_0000008"
    rows = read_metrics(out)
    assert rows[-1]["val_ce"] == pytest.approx(rows[0]["val_ce"], rel=1e-6)  # it never moved
