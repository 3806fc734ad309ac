"""The study runner: data positions of the seeds, planning, and (slow) a whole tiny study.

The end-to-end tests train a tiny model on a small sample of the embedded corpus and check
what a study promises: arms of one seed train on the very same batches, seeds on different
ones, a rerun skips finished runs, and the report is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_helpers import write_data_dir
from dpls.data import TokenLoader
from dpls.study.jobs.fork import advance_position
from dpls.study.plan import plan_study
from dpls.study.spec import parse_spec

# -- where each seed's data starts ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    train = [np.arange(n, dtype=np.uint16) % 500 for n in (700, 333, 512)]
    write_data_dir(root, train, [np.arange(300, dtype=np.uint16)], vocab_size=512, tokenizer="gpt2")
    return root


@given(
    batch=st.integers(1, 7),
    world=st.integers(1, 3),
    start=st.integers(0, 40),
    steps=st.integers(0, 200),
)
def test_advance_position_matches_the_loader(tiny_data, batch, world, start, steps):
    # Windows of 16 tokens: 43 + 20 + 31 = 94 per epoch (the shard tails are cut).
    loader = TokenLoader(tiny_data, batch_size=batch, block_size=16, seed=3, rank=0, world_size=world)
    for _ in range(start):
        loader.next_batch()
    epoch, position = loader.epoch, loader.position
    for _ in range(steps):
        loader.next_batch()
    got = advance_position(epoch, position, steps, loader.num_windows, batch * world)
    assert got == (loader.epoch, loader.position)


# -- planning -------------------------------------------------------------------------------------


def _spec(tmp_path: Path, data: Path, **changes) -> dict:
    spec = {
        "name": "t",
        "out_dir": str(tmp_path / "study"),
        "data_dir": str(data),
        "fork_step": 6,
        "seeds": [0, 1],
        "iters_per_arm": 4,
        "train": {
            "model": "tiny",
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 16,
            "batch_size": 2,
        },
        "arms": [
            {"name": "ce", "loss": "ce"},
            {"name": "dpls", "loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 5},
        ],
    }
    spec.update(changes)
    return spec


def _study_file(tmp_path: Path, data: Path, name: str, seeds: int) -> Path:
    """A one-arm STUDY.toml on ``data``: a 3-step trunk, 2 steps per arm."""
    study = tmp_path / "s.toml"
    study.write_text(
        f"""
name = "{name}"
data_dir = "{data}"
fork_step = 3
seeds = {seeds}
iters_per_arm = 2
[train]
block_size = 16
batch_size = 2
[[arms]]
name = "ce"
loss = "ce"
"""
    )
    return study


def test_plan(tmp_path, tiny_data):
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data)))
    assert plan.fork_step == 6 and plan.iters_per_arm == 4 and plan.tokens_per_step == 32
    assert plan.trunk is not None and plan.trunk.values["max_iters"] == 6
    assert plan.trunk.values["lr_decay_iters"] == 10  # trunk and arms share one LR schedule
    assert plan.trunk.values["loss"] == "ce"
    assert [j.name for j in plan.arms] == ["ce/seed0", "dpls/seed0", "ce/seed1", "dpls/seed1"]
    assert all(j.final_step == 10 for j in plan.arms)
    assert plan.arms[3].values["dpls_top_k"] == 5 and plan.arms[3].values["seed"] == 1
    assert "2 × seeds" in plan.describe() or "arms: 2" in plan.describe()
    # a token budget is rounded up to whole steps of 32 tokens
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data, iters_per_arm=None, tokens_per_arm=100)))
    assert plan.iters_per_arm == 4


def test_plan_rejects_bad_values_before_any_work(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="batch_size"):
        plan_study(parse_spec(_spec(tmp_path, tiny_data, train={"batch_size": 0})))
    with pytest.raises(ValueError, match="not a prepared data directory"):
        plan_study(parse_spec(_spec(tmp_path, tiny_data, data_dir=str(tmp_path / "nothing"))))
    with pytest.raises(ValueError, match=r"unknown key 'vocab' in \[prepare\].*vocab_size"):
        plan_study(
            parse_spec(_spec(tmp_path, tiny_data, data_dir=None, prepare={"source": "stdlib", "vocab": 5}))
        )
    assert not (tmp_path / "study").exists()


def test_trunk_only_keys_stay_with_the_trunk(tmp_path, tiny_data):
    from dpls.train.config import TrainConfig

    trunk = {"warmup_iters": 1, "z_loss": 1e-4, "min_lr": 1e-5}
    plan = plan_study(
        parse_spec(
            _spec(
                tmp_path,
                tiny_data,
                trunk=trunk,
                train={**_spec(tmp_path, tiny_data)["train"], "min_lr": 2e-5},
            )
        )
    )
    assert plan.trunk is not None and plan.trunk.values["z_loss"] == 1e-4
    for job in plan.arms:  # a fork keeps its checkpoint's keys unless told: the study tells it
        assert job.values["warmup_iters"] == TrainConfig().warmup_iters and job.values["z_loss"] == 0.0
        assert job.values["min_lr"] == 2e-5  # [train]'s value, not the trunk's
    with pytest.raises(ValueError, match=r"\[trunk\] cannot set batch_size.*belong in \[train\]"):
        parse_spec(_spec(tmp_path, tiny_data, trunk={"batch_size": 4}))


def test_seed_offsets_are_kept_by_the_study_state(tmp_path, tiny_data):
    from dpls.study.runner import _initial_state
    from dpls.study.state import write_state

    study = tmp_path / "study"
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data, seeds=[5, 9])))
    assert plan.seed_offsets == {5: 0, 9: 1} and [j.seed_offset for j in plan.arms] == [0, 0, 1, 1]
    study.mkdir()
    write_state(study, _initial_state(plan))
    # reordered, inserted, removed: a seed that has an offset keeps it; a new one takes the next free
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data, seeds=[9, 7, 5])))
    assert {j.seed: j.seed_offset for j in plan.arms} == {9: 1, 7: 2, 5: 0}
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data, seeds=[3])))
    assert {j.seed: j.seed_offset for j in plan.arms} == {3: 2}
    # a state written before offsets were recorded: they were the positions in its seed list
    state = json.loads((study / "study_state.json").read_text())
    state.pop("seed_offsets")
    state["seeds"] = [9, 5]
    (study / "study_state.json").write_text(json.dumps(state))
    plan = plan_study(parse_spec(_spec(tmp_path, tiny_data, seeds=[5, 9, 1])))
    assert {j.seed: j.seed_offset for j in plan.arms} == {9: 0, 5: 1, 1: 2}


def test_a_run_stopped_by_a_signal_stops_the_study(tmp_path, tiny_data, monkeypatch, capsys):
    """The trainer saves and returns on SIGTERM; the study must not go on as if the run had finished."""
    import dpls.study.jobs.train as train_job
    from dpls.cli import main

    monkeypatch.setattr(train_job, "train", lambda cfg: Path(cfg.out_dir))  # returns before the last step
    study = _study_file(tmp_path, tiny_data, "stop", seeds=1)
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "trunk stopped before step 3" in err and "rerun the same study to continue" in err
    state = json.loads((tmp_path / "out" / "study_state.json").read_text())
    assert state["trunk_status"] == "pending"


# -- end to end (slow) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_sample(tmp_path_factory) -> Path:
    from dpls.data.prepare import prepare_stdlib

    out = tmp_path_factory.mktemp("stdlib") / "data"
    prepare_stdlib(out, vocab_size=512, max_files=40, max_bpe_chars=200_000, progress=False)
    return out


def _record_batches(monkeypatch) -> dict[str, list[str]]:
    """Hash every training batch, keyed by the run directory that drew it."""
    import dpls.study.jobs.train as train_job

    seen: dict[str, list[str]] = {}
    current = {"run": ""}
    real_train, real_next = train_job.train, TokenLoader.next_batch

    def train(cfg):
        current["run"] = str(Path(cfg.out_dir).resolve())
        return real_train(cfg)

    def next_batch(self):
        x, y = real_next(self)
        if self.split == "train":
            seen.setdefault(current["run"], []).append(hashlib.sha1(x.numpy().tobytes()).hexdigest())
        return x, y

    monkeypatch.setattr(train_job, "train", train)
    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    return seen


@pytest.mark.slow
def test_study_end_to_end_pairs_arms_and_skips_finished_runs(
    tmp_path, stdlib_sample, monkeypatch, one_thread
):
    from dpls.study.runner import run_study

    seen = _record_batches(monkeypatch)
    data = _spec(tmp_path, stdlib_sample, eval={"tokens": 2048, "batch_size": 4})
    data["train"].update(eval_interval=5, eval_tokens=512, log_interval=1, warmup_iters=2)
    spec = parse_spec(data)
    report = run_study(spec, progress=False)
    study = tmp_path / "study"
    assert report == study / "report" / "report.md" and report.is_file()

    def arm(name: str, seed: int) -> str:
        return str((study / "arms" / name / f"seed{seed}").resolve())

    # Each arm trained its 4 steps (batch_size 2, no accumulation: one batch per step) ...
    assert all(len(seen[arm(a, s)]) == 4 for a in ("ce", "dpls") for s in (0, 1))
    # ... on the same batches as the other arm of its seed, and on other batches than the other seed.
    assert seen[arm("ce", 0)] == seen[arm("dpls", 0)]
    assert seen[arm("ce", 1)] == seen[arm("dpls", 1)]
    assert not set(seen[arm("ce", 0)]) & set(seen[arm("ce", 1)])
    # Seed 0 continues the trunk's stream exactly where the trunk stopped.
    trunk = TokenLoader(stdlib_sample, batch_size=2, block_size=16, seed=1337)
    hashes = [hashlib.sha1(trunk.next_batch()[0].numpy().tobytes()).hexdigest() for _ in range(14)]
    assert hashes[:6] == seen[str((study / "trunk").resolve())]
    assert hashes[6:10] == seen[arm("ce", 0)]
    assert hashes[10:14] == seen[arm("ce", 1)]  # seed 1 skips one arm budget further

    # The losses differ between arms (DPLS logs ε = 0.1), the evaluation and report exist.
    rows = [
        json.loads(line)
        for line in (study / "arms" / "dpls" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    eps = [r["epsilon"] for r in rows if "epsilon" in r]
    assert len(eps) == 4 and all(e == pytest.approx(0.1) for e in eps)
    summary = json.loads((study / "report" / "summary.json").read_text())
    assert summary["paired"] is True and set(summary["differences"]) == {"dpls"}
    for s in (0, 1):
        metrics = json.loads((study / "arms" / "dpls" / f"seed{s}" / "eval" / "metrics.json").read_text())
        assert summary["arms"]["dpls"]["metrics"]["loss"]["values"][s] == pytest.approx(metrics["loss"])
    state = json.loads((study / "study_state.json").read_text())
    assert {r["status"] for r in state["runs"]} == {"done"} and state["trunk_status"] == "done"

    # A rerun trains nothing and evaluates nothing.
    seen.clear()
    import dpls.eval.evaluate as evaluate

    real_evaluate = evaluate.evaluate_checkpoint
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated again"))
    assert run_study(spec, progress=False) == report
    assert seen == {}
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", real_evaluate)

    # A study on an existing checkpoint forks from it: seed 0 continues the trunk's stream.
    seen.clear()
    other = _spec(tmp_path, stdlib_sample, seeds=[5], iters_per_arm=2, fork_step=None, eval={"tokens": 512})
    other.update(
        out_dir=str(tmp_path / "other"), trunk={"checkpoint": str(study / "trunk")}, arms=data["arms"][:1]
    )
    assert run_study(parse_spec(other), progress=False).is_file()
    assert seen == {str((tmp_path / "other" / "arms" / "ce" / "seed5").resolve()): hashes[6:8]}

    # Seeds listed in another order: every run is where it was, nothing is trained again.
    seen.clear()
    assert run_study(parse_spec({**data, "seeds": [1, 0]}), progress=False) == report
    assert seen == {}

    # A changed study file that contradicts a finished run stops before any work: a loss key ...
    data["arms"][1]["dpls_epsilon"] = 0.2
    with pytest.raises(ValueError, match=r"dpls_epsilon=0\.1 but the study now says dpls_epsilon=0\.2"):
        run_study(parse_spec(data), progress=False)
    # ... or any other training key (but not where files go or how progress is shown).
    data["arms"][1]["dpls_epsilon"] = 0.1
    data["train"]["min_lr"] = 1e-5
    with pytest.raises(ValueError, match=r"min_lr=6e-05 but the study now says min_lr=1e-05"):
        run_study(parse_spec(data), progress=False)


def test_cli_dry_run_and_errors(tmp_path, tiny_data, capsys):
    from dpls.cli import main

    study = _study_file(tmp_path, tiny_data, "cli", seeds=2)
    assert main(["study", str(study), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "study 'cli'" in out and "CE for 3 steps" in out
    assert not (tmp_path / "out").exists()
    study.write_text(study.read_text().replace("fork_step", "fork_stp"))
    assert main(["study", str(study), "--dry-run"]) == 2
    assert "did you mean 'fork_step'" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "missing.toml"), "--dry-run"]) == 2


def _run_study_on_rank(data: dict) -> str:
    from dpls.study.runner import run_study

    report = run_study(parse_spec(data), progress=False)
    return str(report)


@pytest.mark.slow
def test_study_under_two_ranks(tmp_path, stdlib_sample):
    """torchrun-style: both ranks train every run, rank 0 evaluates and writes the report."""
    from dpls.distributed.testing import run_workers
    from dpls.runs.checkpoint import read_trainer_state

    data = _spec(tmp_path, stdlib_sample, iters_per_arm=3, fork_step=4, eval={"tokens": 512})
    data["train"].update(gradient_accumulation_steps=2, eval_interval=100, eval_tokens=256, device="cpu")
    report = run_workers(_run_study_on_rank, 2, data)
    study = tmp_path / "study"
    assert report == str(study / "report" / "report.md") and Path(report).is_file()

    def loader(path: Path) -> dict:
        return read_trainer_state(path)["loader"]

    def final(arm: str, seed: int) -> Path:
        return study / "arms" / arm / f"seed{seed}" / "checkpoints" / "step_0000007"

    assert loader(final("ce", 0)) == loader(final("dpls", 0))
    assert loader(final("ce", 1)) == loader(final("dpls", 1))
    # Seed 1 forks 3 steps × 2 micro-batches × 2 sequences = 12 windows further along the stream.
    trunk = loader(study / "trunk" / "checkpoints" / "step_0000004")
    fork1 = loader(study / "forks" / "seed1" / "checkpoints" / "step_0000004")
    assert (fork1["epoch"], fork1["position"]) == (trunk["epoch"], trunk["position"] + 12)
    assert loader(final("ce", 1))["position"] == loader(final("ce", 0))["position"] + 12


@pytest.mark.slow
def test_study_runs_lm_eval_on_every_arm_and_reports_it(tmp_path, stdlib_sample, monkeypatch, one_thread):
    """[eval] lm_eval_tasks: every arm is scored by the harness (offline, a local task) and the
    flattened scores reach the report as `lm_eval/<task>/<metric>`."""
    from dpls.study.runner import run_study
    from lm_eval_helpers import write_task

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    tasks = write_task(tmp_path)
    data = _spec(tmp_path, stdlib_sample, seeds=[0], iters_per_arm=2, fork_step=3)
    data["eval"] = {"tokens": 512, "lm_eval_tasks": ["toy_mc"], "lm_eval_include_path": str(tasks)}
    data["train"].update(eval_interval=100, eval_tokens=256)
    report = run_study(parse_spec(data), progress=False)
    study = tmp_path / "study"
    summary = json.loads((report.parent / "summary.json").read_text())
    for arm in ("ce", "dpls"):
        flat = json.loads((study / "arms" / arm / "seed0" / "eval" / "lm_eval.json").read_text())
        assert set(flat) == {"toy_mc/acc"} and 0.0 <= flat["toy_mc/acc"] <= 1.0
        harness = json.loads(
            (study / "arms" / arm / "seed0" / "eval" / "lm_eval" / "results.json").read_text()
        )
        assert flat["toy_mc/acc"] == harness["results"]["toy_mc"]["acc,none"]
        assert summary["arms"][arm]["metrics"]["lm_eval/toy_mc/acc"]["values"] == [flat["toy_mc/acc"]]
    assert "lm_eval/toy_mc/acc" in report.read_text()
