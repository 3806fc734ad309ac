"""The trainer end to end on a tiny synthetic corpus: metrics, bitwise resume, kill -9, fork, faults."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import write_data_dir
from dpls.cli import main
from dpls.runs.checkpoint import latest_checkpoint, list_checkpoints, load_model
from dpls.runs.layout import read_metrics
from dpls.train.config import load_config
from dpls.train.plan import plan_run
from dpls.train.trainer import TrainingError, train
from spike_reference import reference_counts

METRIC_ROW_KEYS = (
    "step",
    "tokens",
    "loss",
    "ce",
    "epsilon",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "loss_spikes",
)
VAL_KEYS = ("val_ce", "val_ppl", "val_entropy")

pytestmark = pytest.mark.usefixtures("one_thread")


def make_corpus(root: Path, vocab: int = 64, train_tokens: int = 40_000, val_tokens: int = 3_000) -> Path:
    """Shards of a noisy deterministic chain (next = 5·cur + 3 mod V, 15% random): learnable fast."""
    rng = np.random.default_rng(0)

    def stream(n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        cur = 0
        noise = rng.random(n) < 0.15
        jumps = rng.integers(0, vocab, n)
        for i in range(n):
            cur = int(jumps[i]) if noise[i] else (5 * cur + 3) % vocab
            out[i] = cur
        return out

    write_data_dir(root, [stream(train_tokens)], [stream(val_tokens)], vocab_size=vocab, source="files")
    (root / "tokenizer.json").write_text("{}")  # copied into the run, never parsed here
    return root


def base_args(data: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data_dir": data,
        "out_dir": out,
        "model": "tiny",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 2,
        "block_size": 32,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_iters": 40,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_iters": 5,
        "lr_decay_iters": 40,
        "eval_interval": 10,
        "eval_tokens": 1024,
        "log_interval": 1,
        "checkpoint_interval": 10,
        "keep_checkpoints": 2,
        "device": "cpu",
        "dtype": "float32",
        "progress": False,
        # loss spikes: a window short enough that this 40-step run has some (at steps 31 and 39)
        "spike_window": 4,
        "spike_sigmas": 1.0,
    }
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def run_train(data: Path, out: Path, **extra: object) -> Path:
    return train(load_config(overrides=base_args(data, out, **extra)))


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "chain")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """40 steps without interruption: the reference every resumed run must reproduce."""
    return run_train(corpus, tmp_path_factory.mktemp("runs") / "straight")


@pytest.fixture(scope="module")
def half(corpus, tmp_path_factory) -> Path:
    """The same run stopped after 20 steps (max_iters=20; the LR schedule is pinned by lr_decay_iters)."""
    return run_train(corpus, tmp_path_factory.mktemp("runs") / "half", max_iters=20)


def test_metrics_and_run_files(straight, corpus):
    rows = read_metrics(straight)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    for r in train:
        assert all(k in r for k in METRIC_ROW_KEYS) and r["skipped"] == 0
        assert r["tokens"] == r["step"] * 4 * 32 * 2 and r["epsilon"] == 0.0 and r["loss"] == r["ce"]
        assert r["mfu"] is None  # CPU: no peak to compare with
    evals = [r for r in rows if "val_ce" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert all(all(k in r for k in VAL_KEYS) for r in evals)
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] - 1.0  # it learns the chain
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_ce"]), rel_tol=1e-9)
    # LR of row `step` (the step-1'th update): linear warmup over 5 steps, cosine to min_lr at 40
    for r in train:
        it = r["step"] - 1
        want = (
            3e-3 * (it + 1) / 6 if it < 5 else 3e-4 + 0.5 * (1 + math.cos(math.pi * (it - 5) / 35)) * 2.7e-3
        )
        assert r["lr"] == pytest.approx(want, rel=1e-12)
    # run files
    assert [p.name for p in list_checkpoints(straight)] == [
        "step_0000030",
        "step_0000040",
    ]  # keep_checkpoints=2
    assert (straight / "config.toml").is_file()
    assert (straight / "tokenizer" / "meta.json").is_file() and (
        straight / "tokenizer" / "tokenizer.json"
    ).is_file()
    assert not load_model(straight).training


def test_resume_reproduces_the_uninterrupted_run_bitwise(straight, half, tmp_path):
    run = tmp_path / "half"
    shutil.copytree(half, run)
    assert main(["train", f"--resume_dir={run}", "--max_iters=40"]) == 0
    want, got = train_rows(straight), train_rows(run)
    assert sorted(got) == list(range(1, 41))  # every step once
    for step in range(1, 41):
        for k in ("loss", "ce", "grad_norm", "lr", "tokens", "loss_spikes"):
            assert got[step][k] == want[step][k], (step, k)
    a, b = load_model(straight), load_model(run)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_loss_spikes_are_counted_on_every_step_and_resume_exactly(straight, tmp_path):
    """Every step is logged here, so the rows give every loss the counter saw: its count is the
    NumPy reference's. Resumed at step 30, the checkpoint's window (steps 27-30) judges step 31."""
    want = train_rows(straight)
    losses = [want[s]["loss"] for s in range(1, 41)]
    expected = reference_counts(losses, 4, 1.0)
    assert [want[s]["loss_spikes"] for s in range(1, 41)] == expected
    assert expected[29] == 0 < expected[30]  # a spike at step 31: after the resume point below
    state = json.loads((straight / "checkpoints" / "step_0000040" / "trainer_state.json").read_text())
    assert state["spike_count"] == expected[-1] and state["spike_losses"] == losses[-4:]
    run = shutil.copytree(straight, tmp_path / "from30")
    shutil.rmtree(run / "checkpoints" / "step_0000040")
    assert main(["train", f"--resume_dir={run}"]) == 0
    got = train_rows(run)
    assert [got[s]["loss_spikes"] for s in range(1, 41)] == expected


def test_fork_continues_step_tokens_and_data(straight, half, tmp_path):
    # A CE "fork" is the same computation as resuming: the data position and RNG carry over.
    same = tmp_path / "ce_fork"
    assert main(["train", f"--resume_dir={half}", f"--out_dir={same}", "--max_iters=25"]) == 0
    want = train_rows(straight)
    assert {s: r["loss"] for s, r in train_rows(same).items()} == {s: want[s]["loss"] for s in range(21, 26)}

    # The published recipe: CE run, then --resume_dir=CE_RUN --loss=dpls --out_dir=NEW
    fork = tmp_path / "dpls_fork"
    args = [f"--resume_dir={half}", f"--out_dir={fork}", "--loss=dpls", "--dpls_top_k=8", "--max_iters=25"]
    assert main(["train", *args]) == 0
    rows = train_rows(fork)
    assert sorted(rows) == [21, 22, 23, 24, 25]
    first = rows[21]
    assert first["tokens"] == want[21]["tokens"] and first["epsilon"] == pytest.approx(0.1)
    assert first["loss"] > first["ce"]  # the smoothed objective is not CE ...
    assert first["ce"] == pytest.approx(want[21]["ce"], rel=1e-5)  # ... but CE of the very same tokens
    assert all(r["loss_spikes"] == 0 for r in rows.values())  # a fork counts afresh: its window is empty
    saved = (fork / "config.toml").read_text()
    assert 'loss = "dpls"' in saved and "batch_size = 4" in saved  # the rest inherited from the CE run
    assert 'loss = "ce"' in (half / "config.toml").read_text()  # the source run is untouched
    assert [p.name for p in list_checkpoints(half)] == ["step_0000010", "step_0000020"]


# every number of a row but the clock's
EXACT_KEYS = ("loss", "ce", "grad_norm", "lr", "tokens", "logit_max", "lse_mean", "attn_logit_max")


def test_activation_checkpointing_changes_no_number_and_resumes_exactly(corpus, straight, half, tmp_path):
    want = train_rows(straight)
    fresh = run_train(corpus, tmp_path / "full", max_iters=3, activation_checkpointing="full")
    assert {s: [r[k] for k in EXACT_KEYS] for s, r in train_rows(fresh).items()} == {
        s: [want[s][k] for k in EXACT_KEYS] for s in (1, 2, 3)
    }
    run = shutil.copytree(half, tmp_path / "half")  # made without it: the key may change on a restart
    assert (
        main(["train", f"--resume_dir={run}", "--max_iters=23", "--activation_checkpointing=selective"]) == 0
    )
    got = train_rows(run)
    assert [[got[s][k] for k in EXACT_KEYS] for s in range(21, 24)] == [
        [want[s][k] for k in EXACT_KEYS] for s in range(21, 24)
    ]
    assert 'activation_checkpointing = "selective"' in (run / "config.toml").read_text()


@pytest.mark.slow
def test_activation_checkpointing_under_compile(corpus, straight, tmp_path):
    """Inductor fuses the recomputation its own way: the same numbers up to float32 rounding."""
    run = run_train(corpus, tmp_path / "c", max_iters=2, compile=True, activation_checkpointing="full")
    want, got = train_rows(straight), train_rows(run)
    for step in (1, 2):
        for k in ("loss", "ce", "grad_norm", "attn_logit_max"):
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-6), (step, k)


def _bad(capsys, args: list[str], message: str, out: Path) -> None:
    assert main(["train", *args]) == 2, args
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(capsys, corpus, straight, tmp_path):
    out = tmp_path / "never"
    _bad(capsys, base_args(tmp_path / "nodata", out), "not a prepared data directory", out)
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    with open(broken / "train_000000.bin", "r+b") as fh:
        fh.truncate(5000)
    _bad(capsys, base_args(broken, out), "train_000000.bin", out)
    (broken / "train_000000.bin").unlink()
    _bad(capsys, base_args(broken, out), "does not exist", out)
    _bad(capsys, base_args(corpus, out, loss="dlps"), "loss", out)
    _bad(capsys, base_args(corpus, out, batch_size=2000), "batch", out)
    _bad(capsys, base_args(corpus, out, n_embd=63), "n_embd", out)
    wide = make_corpus(tmp_path / "wide", vocab=300, train_tokens=5000, val_tokens=500)
    _bad(capsys, [*base_args(wide, out), f"--resume_dir={straight}", "--max_iters=50"], "vocabulary", out)
    _bad(capsys, [f"--resume_dir={straight}", f"--out_dir={out}"], "max_iters", out)  # nothing left to train
    fork = [f"--resume_dir={straight}", f"--out_dir={out}", "--max_iters=50"]
    _bad(capsys, [*fork, "--model=small"], "model=small differs from the checkpoint's tiny", out)
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        plan_run(load_config(overrides=base_args(corpus, out)), world_size=3)  # gas=2 over 3 ranks
    # an existing run with checkpoints is never overwritten
    before = (straight / "metrics.jsonl").read_bytes()
    assert main(["train", *base_args(corpus, straight)]) == 2
    assert "--resume_dir" in capsys.readouterr().err
    assert (straight / "metrics.jsonl").read_bytes() == before


def test_out_dir_in_checkpoints_or_data_and_damaged_checkpoints_exit_2(capsys, corpus, straight, tmp_path):
    """Nothing may be written into a checkpoint (its config.toml) or a data directory, and a
    damaged checkpoint is a one-line error that leaves the run as it was."""
    latest = latest_checkpoint(straight)
    snapshot = {p: p.read_bytes() for p in [*straight.rglob("*"), *corpus.rglob("*")] if p.is_file()}
    fork = [f"--resume_dir={straight}", "--max_iters=50"]
    for out, message in (
        (latest, "inside the checkpoint"),
        (straight / "checkpoints" / "new", "inside the checkpoints of the run"),
        (corpus, "is a data directory"),
    ):
        assert main(["train", *fork, f"--out_dir={out}"]) == 2, out
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["train", *base_args(corpus, corpus)]) == 2  # a new run into the data directory
    assert "is a data directory" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in [*straight.rglob("*"), *corpus.rglob("*")] if p.is_file()} == snapshot

    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    tensors = latest_checkpoint(damaged) / "__0_0.distcp"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()}
    for elsewhere in ([], [f"--out_dir={tmp_path / 'fork'}"]):  # resumed in place, forked
        assert main(["train", f"--resume_dir={damaged}", "--max_iters=50", *elsewhere]) == 2
        err = capsys.readouterr().err
        assert "damaged or incomplete" in err and str(tensors.parent) in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "fork").exists()


def test_gradient_accumulation_is_a_mean_over_the_global_batch(corpus, tmp_path):
    """4 sequences × 2 micro-steps and 8 sequences × 1 see the same tokens: same loss and update."""
    a = run_train(corpus, tmp_path / "a", max_iters=3, eval_interval=100, checkpoint_interval=100)
    b = run_train(
        corpus, tmp_path / "b", max_iters=3, batch_size=8, gradient_accumulation_steps=1, eval_interval=100
    )
    ra, rb = train_rows(a), train_rows(b)
    for step in (1, 2, 3):
        assert ra[step]["tokens"] == rb[step]["tokens"]
        assert ra[step]["loss"] == pytest.approx(rb[step]["loss"], rel=1e-5)
        assert ra[step]["grad_norm"] == pytest.approx(rb[step]["grad_norm"], rel=1e-4)


def test_fused_linear_loss_matches_the_logits_path(corpus, tmp_path):
    """fused_linear_loss=true (hidden states + output weight, no [N, V] logits) trains the same."""
    extra = {"max_iters": 3, "loss": "dpls", "dpls_top_k": 8, "eval_interval": 100}
    a = train_rows(run_train(corpus, tmp_path / "logits", **extra))
    b = train_rows(run_train(corpus, tmp_path / "fused", fused_linear_loss=True, **extra))
    for step in (1, 2, 3):
        for k in ("loss", "ce", "grad_norm"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-4), (step, k)


def test_nonfinite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DPLS_INJECT_NAN_AT_STEP", "3")
    run = run_train(corpus, tmp_path / "nan", max_iters=5, eval_interval=100)
    rows = train_rows(run)
    assert rows[3]["skipped"] == 1 and rows[3]["loss"] is None  # NaN, written as JSON null
    assert [rows[s]["skipped"] for s in (1, 2, 4, 5)] == [0, 0, 0, 0] and math.isfinite(rows[5]["loss"])
    assert all(torch.isfinite(p).all() for p in load_model(run).parameters())

    monkeypatch.setenv("DPLS_INJECT_NAN_AT_STEP", "2-10")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        run_train(corpus, tmp_path / "nan_stop", max_iters=10, max_skipped_steps=3, eval_interval=100)


def test_sigint_saves_then_exits_130(corpus, tmp_path, capsys):
    """Ctrl-C: the step ends, a checkpoint is saved, `dpls train` returns 130."""
    run = tmp_path / "interrupted"

    def interrupt() -> None:
        while latest_checkpoint(run) is None:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler, as in a terminal, even when the suite runs under nohup (SIG_IGN)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        # max_iters far away: the run cannot finish before the signal lands inside the loop
        assert main(["train", *base_args(corpus, run, max_iters=100_000, checkpoint_interval=3)]) == 130
        last = latest_checkpoint(run)
        assert f"continue from {last.name} with --resume_dir={run}" in capsys.readouterr().err
        assert max(train_rows(run)) == int(last.name[5:])  # saved at the step it stopped on
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        signal.signal(signal.SIGINT, outer)


def test_tensorboard_and_swanlab_offline(corpus, tmp_path):
    run = run_train(corpus, tmp_path / "loggers", max_iters=2, tensorboard=True, swanlab="offline")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert any((run / "swanlab").iterdir())  # written locally, no network
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/ce", "val/val_ce"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_ctrl_c_before_the_first_checkpoint_says_so(corpus, tmp_path, capsys, monkeypatch):
    import dpls.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "plan_run", interrupted)  # Ctrl-C during setup: nothing saved
    assert main(["train", *base_args(corpus, tmp_path / "run")]) == 130
    assert "interrupted before the first checkpoint; nothing to resume" in capsys.readouterr().err


def test_a_logger_that_cannot_start_is_one_line_exit_2(corpus, tmp_path, capsys, monkeypatch):
    """swanlab=cloud without a login: a usage error naming the way out, not SwanLab's traceback."""
    import swanlab

    def no_login(**kwargs):
        raise RuntimeError("no TTY is available for interactive login")

    monkeypatch.setattr(swanlab, "init", no_login)
    assert main(["train", *base_args(corpus, tmp_path / "run", max_iters=2, swanlab="cloud")]) == 2
    err = capsys.readouterr().err
    assert "swanlab=cloud: SwanLab did not start (no TTY" in err and "offline" in err and err.count("\n") == 1
    assert not list_checkpoints(tmp_path / "run")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dpls", "train", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, after: str = "", timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (latest_checkpoint(run) or Path()).name <= after:
        assert proc.poll() is None, "the trainer ended before the checkpoint awaited"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def test_kill_9_and_sigterm_then_resume_like_the_uninterrupted_run(corpus, straight, tmp_path):
    """kill -9 at a random moment (checkpointing every step), resume; SIGTERM that one (it saves and
    exits 0), resume again: every step once, with the uninterrupted run's losses bit for bit."""
    run = tmp_path / "killed"
    proc = _spawn(base_args(corpus, run, checkpoint_interval=1), tmp_path / "log1")
    _wait_for_checkpoint(proc, run)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))  # somewhere in a step or a save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # killed mid-run, not finished
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000040"

    proc = _spawn([f"--resume_dir={run}"], tmp_path / "log2")
    _wait_for_checkpoint(proc, run, after=killed_at.name)
    proc.send_signal(signal.SIGTERM)
    log = (tmp_path / "log2").read_text
    assert proc.wait(timeout=60) == 0, log()
    assert "SIGTERM received" in log()
    stopped_at = latest_checkpoint(run)
    assert killed_at.name < stopped_at.name < "step_0000040", "SIGTERM came too late to test anything"
    assert max(train_rows(run)) == int(stopped_at.name[5:])  # the stop saved the step it ended on

    assert main(["train", f"--resume_dir={run}"]) == 0
    assert latest_checkpoint(run).name == "step_0000040"
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    want, got = train_rows(straight), train_rows(run)
    assert sorted(got) == list(range(1, 41))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]  # bitwise, across processes too
    assert [got[s]["loss_spikes"] for s in got] == [want[s]["loss_spikes"] for s in got]


@pytest.mark.slow
def test_stdlib_corpus_end_to_end(tmp_path):
    """`dpls prepare stdlib` (a small sample) then `dpls train --model=tiny --loss=dpls`."""
    import dpls

    data, run = tmp_path / "stdlib", tmp_path / "run"
    assert (
        main(["prepare", "stdlib", "--out", str(data), "--max-files", "60", "--vocab-size", "512", "--quiet"])
        == 0
    )
    args = [f"--data_dir={data}", f"--out_dir={run}", "--model=tiny", "--max_iters=40", "--loss=dpls"]
    args += ["--dpls_top_k=20", "--block_size=64", "--batch_size=16", "--learning_rate=3e-3", "--min_lr=3e-4"]
    args += [
        "--warmup_iters=4",
        "--eval_interval=20",
        "--eval_tokens=2048",
        "--device=cpu",
        "--progress=false",
    ]
    assert main(["train", *args]) == 0
    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 4 and all(all(k in r for k in METRIC_ROW_KEYS) for r in train)  # log_interval 10
    assert all(r["epsilon"] == pytest.approx(0.1) and r["loss"] != r["ce"] for r in train)
    val = [r["val_ce"] for r in rows if "val_ce" in r]
    assert len(val) == 3 and val[0] > val[1] > val[2]  # steps 0, 20, 40
    tok = dpls.load_tokenizer(run)  # from RUN/tokenizer/
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
