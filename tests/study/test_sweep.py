"""Sweeps and from-scratch studies: the sensitivity metric, bad [sweep] input, pairing, and a
whole tiny sweep with a diverging learning rate (a result, not a crash; never retrained)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_helpers import write_data_dir
from dpls.data import TokenLoader
from dpls.study.plan import plan_study
from dpls.study.records import RunRecord
from dpls.study.spec import parse_spec
from dpls.study.sweep import lr_sensitivity, summarize_sweep

# -- the metric ------------------------------------------------------------------------------------


def test_lr_sensitivity_matches_a_hand_computed_example():
    # L_init = 4.0; the diverged run (None) counts as 4.0 and 5.0 (worse than init) is capped at 4.0:
    # capped = [3.0, 2.5, 2.8, 4.0, 4.0], mean 3.26, min 2.5 -> 0.76
    assert lr_sensitivity([3.0, 2.5, 2.8, None, 5.0], 4.0) == pytest.approx(0.76)
    assert lr_sensitivity([3.0, 2.5, 2.8, float("nan")], 4.0) == pytest.approx((0.5 + 0 + 0.3 + 1.5) / 4)
    assert lr_sensitivity([2.0, 2.0], 4.0) == 0.0  # a flat grid: not sensitive at all
    with pytest.raises(ValueError, match="at least one value"):
        lr_sensitivity([], 4.0)


def _record(arm: str, value: float, seed: int, final: float | None, initial: float = 4.0) -> RunRecord:
    val_rows = [{"step": 0, "val_ce": initial}]
    if final is not None:
        val_rows.append({"step": 10, "val_ce": final})
    diverged = None if final is not None else {"step": 3}
    return RunRecord(Path(f"{arm}{value}{seed}"), arm, seed, {}, [], val_rows, value=value, diverged=diverged)


def test_summarize_sweep_by_hand():
    values = [1e-3, 1e-2, 1e-1]
    runs = {  # seed -> L at each value (None: diverged)
        "ce": {0: [3.0, 2.5, None], 1: [3.2, 2.6, None]},
        "z": {0: [3.0, 2.4, 2.9], 1: [3.1, 2.5, 3.0]},
    }
    groups = {
        arm: [_record(arm, v, s, L) for s, grid in seeds.items() for v, L in zip(values, grid)]
        for arm, seeds in runs.items()
    }
    out = summarize_sweep(groups, "learning_rate", values, "ce")
    ce, z = out["arms"]["ce"], out["arms"]["z"]
    # ce seed 0: [3.0, 2.5, 4.0] -> 3.1667 - 2.5; seed 1: [3.2, 2.6, 4.0] -> 3.2667 - 2.6
    assert ce["sensitivity_by_seed"] == {"0": pytest.approx(2 / 3), "1": pytest.approx(2 / 3)}
    assert ce["lr_sensitivity"] == pytest.approx(2 / 3)
    assert ce["best"] == 1e-2 and ce["best_loss"] == pytest.approx(2.55) and ce["diverged"] == 2
    assert ce["diverged_runs"] == [{"value": 0.1, "seed": 0, "step": 3}, {"value": 0.1, "seed": 1, "step": 3}]
    # z seed 0: [3.0, 2.4, 2.9] -> 2.7667 - 2.4; seed 1: [3.1, 2.5, 3.0] -> 2.8667 - 2.5
    assert z["lr_sensitivity"] == pytest.approx(0.3667, abs=1e-4) and z["diverged"] == 0
    assert z["difference"]["mean"] == pytest.approx(0.3667 - 2 / 3, abs=1e-4)
    # Both seeds give the same difference: a zero-width interval around it.
    assert z["difference"]["low"] == pytest.approx(z["difference"]["mean"], abs=1e-9)
    assert z["difference"]["high"] == pytest.approx(z["difference"]["mean"], abs=1e-9)
    assert out["largest_stable_value"] == 1e-2


# -- bad [sweep] input: exit 2, one line, nothing trained or written ------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 60, 4000).astype(np.uint16) for _ in range(2)]
    write_data_dir(
        root, train, [rng.integers(0, 60, 1000).astype(np.uint16)], vocab_size=64, tokenizer="gpt2"
    )
    return root


def _study(tmp_path: Path, data: Path, **changes) -> dict:
    study = {
        "name": "sw",
        "out_dir": str(tmp_path / "study"),
        "data_dir": str(data),
        "seeds": 1,
        "iters_per_arm": 12,
        "sweep": {"learning_rate": [3e-3, 10.0]},
        "train": {
            "model": "tiny",
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 16,
            "batch_size": 2,
            "warmup_iters": 1,
            "min_lr": 0.0,
            "log_interval": 1,
            "eval_interval": 6,
            "eval_tokens": 128,
            "device": "cpu",
            "keep_checkpoints": 1,
        },
        "arms": [{"name": "ce", "loss": "ce"}, {"name": "zloss", "loss": "ce", "z_loss": 1e-4}],
        "eval": {"tokens": 128, "samples": 0},
    }
    study.update(changes)
    return study


def _toml(value) -> str:
    if isinstance(value, dict):
        raise TypeError
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _write(path: Path, study: dict) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in study.items() if not isinstance(v, dict | list) or k == "seeds"]
    for table in ("sweep", "train", "eval"):
        if table in study:
            lines += [f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in study[table].items())]
    for arm in study["arms"]:
        lines += ["[[arms]]", *(f"{k} = {_toml(v)}" for k, v in arm.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "sweep, arm_keys, message",
    [
        ({"learning_rate": []}, {}, "needs a non-empty list"),
        ({"learning_rat": [1e-3]}, {}, "did you mean 'learning_rate'"),
        ({"batch_size": [2, 4]}, {}, "cannot sweep 'batch_size'"),
        ({"learning_rate": [1e-3, 1e-3]}, {}, "must be distinct"),
        ({"learning_rate": [1e-3], "warmup_iters": [1]}, {}, "warmup_iters is also set in [train]"),
        ({"learning_rate": [1e-3], "n_embd": []}, {}, "n_embd needs a non-empty list"),
        ({"z_loss": [0.0, 1e-4]}, {}, "also set by arm 'zloss'"),
        ({"learning_rate": ["fast"]}, {}, "learning_rate must be"),
    ],
)
def test_bad_sweep_exits_2_before_any_work(tmp_path, tiny_data, capsys, sweep, arm_keys, message):
    from dpls.cli import main

    path = _write(tmp_path / "s.toml", _study(tmp_path, tiny_data, sweep=sweep))
    for extra in ([], ["--dry-run"]):
        assert main(["study", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "study").exists()


def test_sweep_rules_of_forks_and_train(tmp_path, tiny_data):
    # A model key is swept (or set by an arm) only from scratch; a swept key may not be in [train].
    fork = {"fork_step": 3}
    with pytest.raises(ValueError, match="model key can be swept only from scratch"):
        parse_spec(_study(tmp_path, tiny_data, sweep={"qk_norm": [False, True]}, **fork))
    arms = [{"name": "qk", "loss": "ce", "qk_norm": True}]
    with pytest.raises(ValueError, match="only in a study from scratch"):
        parse_spec(_study(tmp_path, tiny_data, arms=arms, **fork))
    bad = _study(tmp_path, tiny_data)
    bad["train"]["learning_rate"] = 1e-3
    with pytest.raises(ValueError, match=r"also set in \[train\]"):
        parse_spec(bad)
    # A fork study can be swept too: the sweep applies after the fork.
    plan = plan_study(parse_spec(_study(tmp_path, tiny_data, **fork)))
    assert plan.trunk is not None and len(plan.arms) == 4
    assert sorted({j.values["learning_rate"] for j in plan.arms}) == [3e-3, 10.0]
    # From scratch: no trunk, every run from step 0, run directories per value.
    plan = plan_study(parse_spec(_study(tmp_path, tiny_data)))
    assert plan.from_scratch and plan.trunk is None and plan.fork_step == 0
    assert [j.name for j in plan.arms][:2] == ["ce/learning_rate_0.003/seed0", "ce/learning_rate_10.0/seed0"]
    assert all(j.values["divergence_window"] == 5 and j.final_step == 12 for j in plan.arms)


# -- pairing and a whole sweep ------------------------------------------------------------------------


def _record_starts(monkeypatch) -> dict[str, dict[str, object]]:
    """Per run directory: a hash of the initial weights (the parameters every arm has) and of
    every training batch."""
    import torch

    import dpls.train.trainer as trainer

    seen: dict[str, dict[str, object]] = {}
    real_build, real_next = trainer.build, TokenLoader.next_batch
    current = {"run": ""}

    def build(plan, ctx):
        parts = real_build(plan, ctx)
        current["run"] = str(Path(plan.cfg.out_dir).resolve())
        h = hashlib.sha1()
        for name, p in sorted(parts.model.state_dict().items()):
            if "q_norm" not in name and "k_norm" not in name:
                h.update(name.encode() + p.detach().to(torch.float64).numpy().tobytes())
        seen[current["run"]] = {"init": h.hexdigest(), "batches": []}
        return parts

    def next_batch(self):
        x, y = real_next(self)
        if self.split == "train" and current["run"]:
            seen[current["run"]]["batches"].append(hashlib.sha1(x.numpy().tobytes()).hexdigest())
        return x, y

    monkeypatch.setattr(trainer, "build", build)
    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    return seen


def test_runs_of_one_seed_share_initial_weights_and_batches(tmp_path, tiny_data, monkeypatch, one_thread):
    from dpls.study.runner import run_study

    seen = _record_starts(monkeypatch)
    study = _study(
        tmp_path,
        tiny_data,
        seeds=[0, 1],
        iters_per_arm=3,
        sweep={"learning_rate": [1e-3, 3e-3]},
        arms=[{"name": "ce", "loss": "ce"}, {"name": "qk", "loss": "ls", "qk_norm": True}],
    )
    run_study(parse_spec(study), progress=False)
    runs = {
        (arm, lr, seed): seen[
            str((tmp_path / "study/arms" / arm / f"learning_rate_{lr}" / f"seed{seed}").resolve())
        ]
        for arm in ("ce", "qk")
        for lr in (1e-3, 3e-3)
        for seed in (0, 1)
    }
    for seed in (0, 1):
        group = [r for (_, _, s), r in runs.items() if s == seed]
        assert len({r["init"] for r in group}) == 1  # same initial weights, whatever the arm and value
        assert len({tuple(r["batches"]) for r in group}) == 1 and len(group[0]["batches"]) == 3
    zero, one = runs[("ce", 1e-3, 0)], runs[("ce", 1e-3, 1)]
    assert zero["init"] != one["init"] and not set(zero["batches"]) & set(one["batches"])
    cfg = (tmp_path / "study/arms/qk/learning_rate_0.001/seed0/config.toml").read_text()
    assert "qk_norm = true" in cfg


@pytest.mark.slow
def test_sweep_with_an_absurd_learning_rate_finishes_and_reports(tmp_path, tiny_data, capsys, one_thread):
    from dpls.cli import main

    path = _write(tmp_path / "s.toml", _study(tmp_path, tiny_data))
    assert main(["study", str(path), "--no-progress"]) == 0
    study = tmp_path / "study"
    summary = json.loads((study / "report/summary.json").read_text())
    sweep = summary["sweep"]
    assert sweep["key"] == "learning_rate" and sweep["values"] == [3e-3, 10.0]
    for arm in ("ce", "zloss"):
        a = sweep["arms"][arm]
        assert a["diverged"] == 1 and a["best"] == 3e-3 and np.isfinite(a["best_loss"])
        assert np.isfinite(a["lr_sensitivity"]) and a["lr_sensitivity"] >= 0
        absurd = study / "arms" / arm / "learning_rate_10.0" / "seed0"
        record = json.loads((absurd / "diverged.json").read_text())
        assert record["step"] >= 1 and record["detected_at"] <= 12
        assert (absurd / "metrics.jsonl").is_file()  # everything it wrote stays
    report = (study / "report/report.md").read_text()
    assert "## Learning-rate sensitivity" in report and "(lr_sweep.png)" in report
    assert (study / "report/lr_sweep.png").stat().st_size > 0
    # The diagnostics are in the training log, on log steps.
    rows = [json.loads(line) for line in (study / "arms/ce/learning_rate_0.003/seed0/metrics.jsonl").open()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(
        np.isfinite(r[k]) for r in train_rows for k in ("logit_max", "lse_mean", "attn_logit_max")
    )
    state = json.loads((study / "study_state.json").read_text())
    assert sorted(r["status"] for r in state["runs"]) == ["diverged", "diverged", "done", "done"]

    # A rerun trains nothing: the diverged runs are results, kept as they are.
    before = {p: p.stat().st_mtime_ns for p in study.glob("arms/*/*/seed0/metrics.jsonl")}
    capsys.readouterr()
    assert main(["study", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already done: 2 runs trained, 2 diverged (kept as results), 2 evaluated" in out
    assert before == {p: p.stat().st_mtime_ns for p in study.glob("arms/*/*/seed0/metrics.jsonl")}


# -- the README's stability section ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
STABILITY = "stability_cpu"


def _committed_stability() -> dict:
    from dpls.study.readme import SUMMARY, study_assets

    return json.loads((ROOT / study_assets(STABILITY) / SUMMARY).read_text())


def _has_stability_section() -> bool:
    from dpls.study.readme import study_markers

    return study_markers(STABILITY)[0] in (ROOT / "README.md").read_text()


def test_committed_stability_summary_is_a_whole_and_consistent_sweep():
    """On any machine: the committed sweep behind the README has the shipped study's shape, and each
    arm's sensitivity, best value and diverged count follow from its own grid points."""
    from dpls.study.readme import current_section, render_section, study_assets
    from dpls.study.sweep import SWEEP_PLOT

    assert _has_stability_section()
    summary = _committed_stability()
    sweep = summary["sweep"]
    values = sweep["values"]
    assert sweep["key"] == "learning_rate" and len(values) >= 5 and max(values) / min(values) >= 30
    from dpls.runs.layout import read_toml

    shipped = [a["name"] for a in read_toml(ROOT / "studies" / f"{STABILITY}.toml")["arms"]]
    assert [a for a in shipped if a in sweep["arms"]] == list(sweep["arms"]) and len(sweep["arms"]) >= 6
    assert summary["provenance"]["command"] == f"make readme-{STABILITY}"
    assert (ROOT / study_assets(STABILITY) / SWEEP_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = (study_assets(STABILITY) / "val_ce.png").as_posix()
    assert current_section(ROOT / "README.md", STABILITY) == render_section(summary, plot, STABILITY)
    for arm, a in sweep["arms"].items():
        assert {"lr_sensitivity", "best", "best_loss", "diverged"} <= set(a)
        seeds = sorted({p["seed"] for g in a["grid"] for p in g["points"]})
        assert len(seeds) >= 2 and seeds == list(range(len(seeds))), arm
        for s in seeds:
            pts = [next(p for p in g["points"] if p["seed"] == s) for g in a["grid"]]
            initial = sum(p["initial"] for p in pts) / len(pts)
            assert a["sensitivity_by_seed"][str(s)] == pytest.approx(
                lr_sensitivity([p["loss"] for p in pts], initial), rel=1e-9, abs=1e-12
            )
        assert a["lr_sensitivity"] == pytest.approx(np.mean(list(a["sensitivity_by_seed"].values())))
        means = [g["mean"] for g in a["grid"]]
        assert a["best"] == values[int(np.argmin(means))] and a["best_loss"] == pytest.approx(min(means))
        assert a["diverged"] == sum(p["diverged"] for g in a["grid"] for p in g["points"])


@pytest.mark.slow
def test_stability_numbers_are_reproduced_where_the_corpus_is_the_same(tmp_path, one_thread):
    """Trains the baseline's run at its best rate (seed 0) as the shipped study does. The numbers are
    compared only where this Python's corpus has the committed fingerprint (another Python build
    has another standard library, hence other numbers); elsewhere the run must still be a whole,
    finite run of the same shape."""
    from dpls.runs.layout import read_metrics, read_toml
    from dpls.study.runner import run_study

    summary = _committed_stability()
    sweep = summary["sweep"]
    best = sweep["arms"]["ce"]["best"]
    study = read_toml(ROOT / "studies" / f"{STABILITY}.toml")
    study.update(out_dir=str(tmp_path / "study"), seeds=[0], sweep={"learning_rate": [best]})
    study["arms"] = [a for a in study["arms"] if a["name"] == "ce"]
    run_study(parse_spec(study), progress=False)
    run = tmp_path / "study" / "arms" / "ce" / f"learning_rate_{best}" / "seed0"
    final = [r["val_ce"] for r in read_metrics(run) if "val_ce" in r][-1]
    assert np.isfinite(final)
    fingerprint = json.loads((tmp_path / "study" / "data" / "meta.json").read_text())["corpus_fingerprint"]
    if fingerprint != summary["data"]["corpus_fingerprint"]:
        return  # another corpus: its numbers are not comparable (the structure is checked above)
    point = next(
        p for g in sweep["arms"]["ce"]["grid"] if g["value"] == best for p in g["points"] if p["seed"] == 0
    )
    assert final == pytest.approx(point["loss"], rel=2e-3), (
        "README numbers are stale; run `make readme-stability_cpu`"
    )


def test_the_sweep_counts_what_the_divergence_rules_say():
    """From scratch: a run that ends far above L_init without tripping the watch diverged (the
    lr-50 case: 17.38 against 7.636), one that never moved made no progress (lr 0), and neither
    changes the sensitivity's arithmetic (both count as L_init)."""
    values = [0.0, 1e-3, 50.0]
    runs = [
        _record("ce", 0.0, 0, 7.636, 7.636),
        _record("ce", 1e-3, 0, 5.0, 7.636),
        _record("ce", 50.0, 0, 17.38, 7.636),
    ]
    out = summarize_sweep({"ce": runs}, "learning_rate", values, "ce")["arms"]["ce"]
    assert out["diverged"] == 1 and out["no_progress"] == 1
    assert [p["outcome"] for g in out["grid"] for p in g["points"]] == ["no_progress", "trained", "diverged"]
    assert out["lr_sensitivity"] == pytest.approx((7.636 + 5.0 + 7.636) / 3 - 5.0)
    forked = [
        RunRecord(
            Path("f"),
            "ce",
            0,
            {},
            [],
            [{"step": 100, "val_ce": 3.0}, {"step": 200, "val_ce": 3.4}],
            value=1e-3,
        )
    ]
    assert summarize_sweep({"ce": forked}, "learning_rate", [1e-3], "ce")["arms"]["ce"]["diverged"] == 0
