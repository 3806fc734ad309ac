"""`torchrun --nproc_per_node=2 -m dpls train` on CPU (gloo) against the one-process run.

Four torchrun launches (start-up is the cost), each checked against runs made in this
process with the same global batch:

1. DDP from scratch: every loss equals the one-process run's (CE steps, then DPLS steps);
   only rank 0 logs; its checkpoints hold both ranks' shards. Forked with ONE process
   from its step-2 checkpoint, the run continues exactly (2 → 1 ranks).
2. FSDP2 with activation checkpointing, forked from the one-process run's step-2
   checkpoint (1 → 2 ranks), continues exactly; forked back with one process from its
   step-4 checkpoint (2 → 1, sharded tensors) too.
3. SIGTERM to rank 1 only: both ranks stop at the same step, save, exit 0; resumed in
   place with one process, the losses are those of an uninterrupted run. A NaN injected
   on rank 1 only is skipped by both ranks on the way.
4. FSDP2 from scratch (its first steps equal the one-process run's); the checkpoint write
   fails with ENOSPC on rank 1 only: every rank goes on, the previous checkpoint stays the
   latest and intact, the message says so; then NaN steps in a row (rank 1 only) stop
   both ranks with a message naming the count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_helpers import write_data_dir
from dpls.runs.checkpoint import latest_checkpoint, list_checkpoints, load_model, read_trainer_state
from dpls.runs.layout import read_metrics
from dpls.train.config import load_config
from dpls.train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
STEPS = 6
WORLD = 2


def make_corpus(root: Path, vocab: int = 48, n_train: int = 12_000, n_val: int = 600) -> Path:
    """A noisy affine chain (next = 7·cur + 1 mod V, 20% random): learnable in a few steps."""
    rng = np.random.default_rng(1)

    def stream(n: int) -> np.ndarray:
        noise, jumps = rng.random(n) < 0.2, rng.integers(0, vocab, n)
        out, cur = np.empty(n, dtype=np.int64), 0
        for i in range(n):
            cur = int(jumps[i]) if noise[i] else (7 * cur + 1) % vocab
            out[i] = cur
        return out

    write_data_dir(root, [stream(n_train)], [stream(n_val)], vocab_size=vocab, source="files")
    (root / "tokenizer.json").write_text("{}")
    return root


def args_for(data: Path, out: Path, **extra: object) -> list[str]:
    """A tiny model; CE for steps 1-3 and DPLS from step 4 (the 'step' schedule); a global
    batch of 2 micro-batches (1 per rank with 2 ranks, 2 micro-steps with one process);
    the LR schedule pinned, so max_iters can change without changing any step."""
    values: dict[str, object] = {
        "data_dir": data,
        "out_dir": out,
        "model": "tiny",
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "block_size": 16,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_iters": STEPS,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_iters": 2,
        "lr_decay_iters": STEPS,
        "loss": "dpls",
        "dpls_epsilon": 0.2,
        "dpls_top_k": 5,
        "dpls_schedule": "step",
        "dpls_start_step": 3,
        "dpls_end_step": STEPS,
        "eval_interval": 1000,
        "eval_tokens": 128,
        "log_interval": 1,
        "checkpoint_interval": 2,
        "keep_checkpoints": 0,
        "device": "cpu",
        "dtype": "float32",
        "progress": False,
    }
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def run_here(*args: str) -> Path:
    return train(load_config(overrides=list(args)))


def torchrun(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    return subprocess.Popen(
        [*cmd, "-m", "dpls", "train", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=full_env
    )


def finish(proc: subprocess.Popen, log: Path, expect: int = 0, timeout: float = 240) -> str:
    code = proc.wait(timeout=timeout)
    text = log.read_text()
    assert code == expect, f"torchrun exited {code}, expected {expect}:\n{text[-4000:]}"
    return text


def rows(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in read_metrics(run):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice: more than one rank writes"
            out[r["step"]] = r
    return out


def assert_same_losses(got: dict[int, dict], want: dict[int, dict], steps) -> None:
    for s in steps:
        for key in ("loss", "ce"):
            assert got[s][key] == pytest.approx(want[s][key], abs=TOL, rel=TOL), (s, key, got[s], want[s])
        assert got[s]["tokens"] == want[s]["tokens"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("dist") / "data")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The one-process run every distributed run is compared with."""
    return run_here(*args_for(corpus, tmp_path_factory.mktemp("dist") / "one"))


def test_ddp_equals_one_process_and_reshards_to_one(corpus, reference, tmp_path):
    run, log = tmp_path / "ddp", tmp_path / "ddp.log"
    text = finish(torchrun(args_for(corpus, run), log), log)
    want, got = rows(reference), rows(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses(got, want, range(1, STEPS + 1))
    assert got[STEPS]["loss"] != pytest.approx(got[STEPS]["ce"], abs=1e-3)  # the DPLS steps differ from CE
    assert got[1]["loss"] == pytest.approx(got[1]["ce"], abs=1e-6)  # CE steps: the objective is CE
    # only rank 0 talks; every rank writes its shard; the state says how many ranks saved it
    assert text.count("step 1/") == 1 and text.count("dpls train: done") == 1
    ckpt = run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert read_trainer_state(ckpt)["world_size"] == WORLD
    # 2 → 1: fork the step-2 checkpoint with one process; steps 3.. as in the straight run
    fork = run_here(f"--resume_dir={ckpt}", f"--out_dir={tmp_path / 'fork1'}", "--device=cpu")
    assert_same_losses(rows(fork), want, range(3, STEPS + 1))


def test_fsdp_reshards_from_and_to_one_process(corpus, reference, tmp_path):
    run, log = tmp_path / "fsdp", tmp_path / "fsdp.log"
    start = reference / "checkpoints" / "step_0000002"
    args = [f"--resume_dir={start}", f"--out_dir={run}", "--parallel=fsdp", "--activation_checkpointing=full"]
    finish(torchrun(args, log), log)
    want, got = rows(reference), rows(run)
    assert sorted(got) == list(range(3, STEPS + 1))
    assert_same_losses(got, want, range(3, STEPS + 1))
    ckpt = run / "checkpoints" / "step_0000004"
    assert read_trainer_state(ckpt)["world_size"] == WORLD
    assert 'activation_checkpointing = "full"' in (run / "config.toml").read_text()
    fork = run_here(f"--resume_dir={ckpt}", f"--out_dir={tmp_path / 'fork1'}", "--device=cpu")
    assert_same_losses(rows(fork), want, range(5, STEPS + 1))


def _rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker with RANK=rank: a child of ``parent`` (found through /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (proc / "environ").read_bytes().split(b"\0") if ppid == parent else []
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or not ours to read
            if f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the rank-1 worker through /proc")
def test_sigterm_to_one_rank_saves_and_resumes(corpus, tmp_path):
    run, log = tmp_path / "term", tmp_path / "term.log"
    args = args_for(corpus, run, max_iters=100_000, checkpoint_interval=3)
    proc = torchrun(args, log, DPLS_INJECT_NAN_AT_STEP="2", DPLS_INJECT_RANK="1")
    rank1 = _rank_pid(proc.pid, 1)
    deadline = time.monotonic() + 180
    while latest_checkpoint(run) is None:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.kill(rank1, signal.SIGTERM)  # rank 0 never sees a signal: the ranks must agree
    text = finish(proc, log)
    stopped = read_trainer_state(latest_checkpoint(run))["step"]
    assert f"SIGTERM received: saved step {stopped}" in text
    got = rows(run)
    assert max(got) == stopped
    # the NaN on rank 1 only: both ranks skipped step 2, logged once, and went on
    assert got[2]["skipped"] == 1 and got[2]["loss"] is None  # non-finite values are logged as null
    assert all(got[s]["skipped"] == 0 for s in got if s != 2)

    # resume in place with ONE process (2 → 1), two more steps
    run_here(f"--resume_dir={run}", f"--max_iters={stopped + 2}", "--device=cpu")
    got = rows(run)
    assert sorted(got) == list(range(1, stopped + 3))
    # the uninterrupted one-process run with the same NaN step
    os.environ["DPLS_INJECT_NAN_AT_STEP"] = "2"
    try:
        straight = run_here(
            *args_for(corpus, tmp_path / "straight", max_iters=stopped + 2, checkpoint_interval=1000)
        )
    finally:
        del os.environ["DPLS_INJECT_NAN_AT_STEP"]
    want = rows(straight)
    assert_same_losses(got, want, [s for s in want if s != 2])


def test_out_of_disk_then_nonfinite_stop(corpus, reference, tmp_path):
    run, log = tmp_path / "faults", tmp_path / "faults.log"
    args = args_for(corpus, run, parallel="fsdp", max_iters=20, max_skipped_steps=3)
    env = {"DPLS_INJECT_ENOSPC_AT_STEP": "4", "DPLS_INJECT_NAN_AT_STEP": "5-20", "DPLS_INJECT_RANK": "1"}
    text = finish(torchrun(args, log, **env), log, expect=1)
    # the failed save: a message on rank 0 naming the cause and the intact checkpoint; no debris
    assert "saving the checkpoint of step 4 failed" in text and "No space left on device" in text
    assert "step_0000002 is intact" in text
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000006"], names  # 4 failed; 6 saved; stopped at 7
    assert [p.name for p in list_checkpoints(run)] == names
    # the stop: both ranks, after 3 skipped steps in a row, with a clear message
    assert "stopped at step 7: 3 non-finite steps in a row" in text
    got = rows(run)
    assert [got[s]["skipped"] for s in range(1, 8)] == [0, 0, 0, 0, 1, 1, 1]
    assert_same_losses(got, rows(reference), range(1, 5))  # FSDP2 from scratch: as one process
    for ckpt in list_checkpoints(run):
        model = load_model(ckpt)
        assert all(bool(p.isfinite().all()) for p in model.parameters())
