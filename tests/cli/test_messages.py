"""Messages that say what is wrong and what to do: checkpoints, model shapes, shards, stops."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_text_data, train_tiny_run, write_data_dir
from dpls.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messages")
    return train_tiny_run(make_text_data(root / "data"), root / "run", steps=4, checkpoint_interval=2)


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_damaged_latest_checkpoint_says_how_to_resume_from_the_previous(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    step4 = copy / "checkpoints" / "step_0000004"
    data = next(step4.glob("__*.distcp"))
    data.write_bytes(data.read_bytes()[:500])
    err = one_line_error(capsys, "eval", str(copy), "--device=cpu", "--no-plots")
    assert "step_0000004" in err and "no detail" not in err
    assert "step_0000002" in err and f"dpls train --resume_dir={copy}" in err


def test_an_incomplete_checkpoint_is_reported_when_skipped(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "checkpoints" / "step_0000004" / ".metadata").unlink()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["eval", str(copy), "--device=cpu", "--no-plots", "--tokens=64"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "step_0000004 is incomplete (missing .metadata)" in err
    assert "using step_0000002" in err


def test_n_head_that_does_not_divide_names_valid_values(run, tmp_path, capsys):
    data, out = run.parent / "data", tmp_path / "o"
    err = one_line_error(
        capsys, "train", f"--data_dir={data}", f"--out_dir={out}", "--n_embd=32", "--n_head=3"
    )
    assert "head_dim" not in err and "n_head values that fit: 1, 2, 4, 8, 16" in err


def test_tiny_shards_are_blamed_not_the_batch(tmp_path, capsys):
    shards = [np.arange(40) % 50 for _ in range(30)]
    write_data_dir(tmp_path / "d", shards, shards[:5], vocab_size=50)
    err = one_line_error(
        capsys,
        "train",
        f"--data_dir={tmp_path / 'd'}",
        f"--out_dir={tmp_path / 'o'}",
        "--block_size=64",
        "--batch_size=1",
        "--n_layer=1",
        "--n_embd=16",
        "--n_head=2",
        "--device=cpu",
    )
    assert "too small" in err and "--shard-tokens" in err
    assert "shard_tokens must be an integer >= 512" in one_line_error(
        capsys, "prepare", "files", str(tmp_path), "--out", str(tmp_path / "p"), "--shard-tokens=1"
    )


def test_stop_signal_says_where_it_stopped_and_how_to_continue(run, tmp_path, capsys, monkeypatch):
    import dpls.train.trainer as trainer

    copy = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(copy / "checkpoints" / "step_0000004")  # as if stopped by SIGTERM at step 2 of 4
    monkeypatch.setattr(trainer, "train", lambda cfg: copy)
    capsys.readouterr()
    assert main(["train", f"--resume_dir={copy}"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 2 of 4" in out and f"dpls train --resume_dir={copy}" in out
    assert "done" not in out


def test_permission_error_on_the_way_is_one_line(run, capsys, monkeypatch):
    import dpls.eval.evaluate as evaluate

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/srv/shared/run")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", denied)
    err = one_line_error(capsys, "eval", str(run))
    assert "no permission" in err and "/srv/shared/run" in err
