"""The report from synthetic run directories: summary.json must agree with the files it was made from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpls.cli import main
from dpls.study.records import EVAL_METRICS, TRAIN_LOG_METRIC, load_run
from dpls.study.report import write_report
from dpls.study.state import RunEntry, StudyState, write_state
from dpls.study.stats import EFFECT_LARGER, EFFECT_NOT_LARGER, EFFECT_UNDEFINED

T_975_DF2 = 4.3026527  # t_{0.975, 2} from a t table: three seeds

LOSSES = {
    "ce": {"loss": "ce"},
    "ls": {"loss": "ls", "label_smoothing": 0.1},
    "dpls": {"loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 100},
}


def eval_metrics(arm: str, seed: int) -> dict[str, float]:
    """Deterministic, distinct numbers for every evaluation metric key."""
    offset = {"ce": 0.0, "ls": 0.01, "dpls": -0.05}[arm]
    noise = {0: 0.0, 1: 0.1, 2: -0.05, 3: 0.07}[seed]
    # dpls − ce on "loss" is −0.05 + a seed-dependent wiggle; ls − ce is +0.01 + another.
    wiggle = {"ce": 0.0, "ls": (0.02, -0.03, 0.015, 0.0)[seed], "dpls": (0.0, 0.01, -0.01, 0.02)[seed]}[arm]
    out = {k: 1.0 + 0.1 * i + noise + offset + wiggle for i, k in enumerate(EVAL_METRICS)}
    out["loss"] = 3.0 + noise + offset + wiggle
    out["ppl"] = math.exp(out["loss"])
    out["tokens"] = 4096
    return out


def make_run(
    root: Path,
    name: str,
    arm: str,
    seed: int,
    *,
    spike: bool = False,
    spikes_logged: bool = True,
    evaluated: bool = True,
    tps: float = 1000.0,
) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = {"seed": seed, "out_dir": str(run), "batch_size": 4, **LOSSES[arm]}
    lines = []
    for k, v in cfg.items():
        lines.append(f"{k} = {json.dumps(v)}")
    (run / "config.toml").write_text("\n".join(lines) + "\n")
    rows = []
    for step in range(100, 140):
        loss = 4.0 - 0.01 * (step - 100) + 0.001 * seed
        if spike and step == 120:
            loss *= 1.5
        rows.append(
            {
                "step": step,
                "tokens": step * 512,
                "loss": loss,
                "ce": loss - 0.1,
                "epsilon": 0.1 if arm != "ce" else 0.0,
                "lr": 1e-3,
                "grad_norm": 1.0 + 0.01 * (step - 100) + (10.0 if spike and step == 120 else 0.0),
                "tokens_per_s": tps + step,
                "mfu": 0.1,
                "skipped": 1 if spike and step == 121 else 0,
            }
        )
        if spikes_logged:  # the trainer's count since the run started (an older trainer logged none)
            rows[-1]["loss_spikes"] = 1 if spike and step >= 120 else 0
        if step % 10 == 9:
            rows.append(
                {
                    "step": step,
                    "val_ce": 3.5 - 0.01 * step / 10 + 0.01 * seed,
                    "val_ppl": 1.0,
                    "val_entropy": 2.0,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluated:
        (run / "eval" / "metrics.json").write_text(json.dumps(eval_metrics(arm, seed)))
        bins = {
            "lower": [i / 15 for i in range(15)],
            "upper": [(i + 1) / 15 for i in range(15)],
            "count": [float(10 * i) for i in range(15)],
            "confidence": [(i + 0.5) / 15 for i in range(15)],
            "accuracy": [(i + 0.3) / 15 for i in range(15)],
        }
        (run / "eval" / "metrics_bins.json").write_text(json.dumps({"reliability": bins}))
        (run / "eval" / "lm_eval.json").write_text(json.dumps({"hellaswag/acc_norm": 0.25 + 0.01 * seed}))
    return run


def expected_paired(arm: str, metric: str) -> tuple[float, float, float]:
    d = np.array([eval_metrics(arm, s)[metric] - eval_metrics("ce", s)[metric] for s in range(3)])
    half = T_975_DF2 * d.std(ddof=1) / math.sqrt(3)
    return d.mean(), d.mean() - half, d.mean() + half


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    root.mkdir()
    entries = []
    for arm in LOSSES:
        for seed in range(3):
            make_run(root / "arms" / arm, f"seed{seed}", arm, seed, spike=(arm == "dpls" and seed == 1))
            entries.append(RunEntry(arm=arm, seed=seed, run_dir=f"arms/{arm}/seed{seed}", status="done"))
    state = StudyState(
        name="synthetic",
        baseline="ce",
        seeds=[0, 1, 2],
        arms=list(LOSSES),
        fork_step=100,
        trunk_dir="trunk",
        runs=entries,
    )
    write_state(root, state)
    return root


def test_report_numbers_agree_with_inputs(study_dir: Path, tmp_path: Path):
    report = write_report(study_dir, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["baseline"] == "ce" and summary["paired"] is True
    assert list(summary["arms"]) == ["ce", "ls", "dpls"]
    for arm in LOSSES:
        for metric in EVAL_METRICS:
            vals = [eval_metrics(arm, s)[metric] for s in range(3)]
            got = summary["arms"][arm]["metrics"][metric]
            assert got["values"] == pytest.approx(vals)
            assert got["mean"] == pytest.approx(np.mean(vals))
            assert got["sd"] == pytest.approx(np.std(vals, ddof=1))
    for arm in ("ls", "dpls"):
        for metric in EVAL_METRICS:
            mean, low, high = expected_paired(arm, metric)
            d = summary["differences"][arm][metric]
            assert (d["mean"], d["low"], d["high"]) == pytest.approx((mean, low, high), abs=1e-6)
            assert d["effect"] == (EFFECT_LARGER if low > 0 or high < 0 else EFFECT_NOT_LARGER)
    # dpls − ce on loss: d = [−0.05, −0.04, −0.06] → larger than its interval, and lower is better.
    assert summary["differences"]["dpls"]["loss"]["effect"] == EFFECT_LARGER
    assert summary["differences"]["dpls"]["loss"]["better"] is True
    # ls − ce: d = [0.03, −0.02, 0.025] → not larger than its interval.
    assert summary["differences"]["ls"]["loss"]["effect"] == EFFECT_NOT_LARGER
    # lm-eval tasks and the training log's last val_ce are compared too (same for every arm here).
    assert summary["differences"]["dpls"]["lm_eval/hellaswag/acc_norm"]["mean"] == pytest.approx(0.0)
    assert summary["arms"]["ce"]["metrics"][TRAIN_LOG_METRIC]["values"] == pytest.approx(
        [3.5 - 0.01 * 139 / 10 + 0.01 * s for s in range(3)]
    )

    # Stability and cost from metrics.jsonl: one seed of dpls logged one spike, one skipped step,
    # a gradient norm of 11.2 at step 120.
    stab = summary["arms"]["dpls"]["stability"]
    assert stab["loss_spikes"] == 1 and stab["skipped"] == 1
    assert stab["grad_norm_max"] == pytest.approx(11.2)
    assert summary["arms"]["ce"]["stability"]["loss_spikes"] == 0
    grads = [1.0 + 0.01 * i for i in range(40)] * 3
    assert summary["arms"]["ce"]["stability"]["grad_norm_mean"] == pytest.approx(np.mean(grads))
    assert summary["arms"]["ce"]["cost"]["tokens_per_s"] == pytest.approx(1000 + np.median(range(101, 140)))
    assert summary["arms"]["ls"]["cost"]["relative_to_baseline"] == pytest.approx(1.0)

    text = report.read_text()
    assert "**dpls** − **ce**: larger than their interval: loss" in text
    for png in ("val_ce.png", "reliability.png", "epsilon.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"({png})" in text


def test_compare_groups_by_loss_and_pairs_by_seed(tmp_path: Path):
    runs = [make_run(tmp_path, f"{arm}_{s}", arm, s) for arm in LOSSES for s in range(3)]
    rc = main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    assert rc == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["baseline"] == "ce" and summary["paired"] is True
    assert set(summary["arms"]) == {"ce", "ls_eps0.1", "dpls_eps0.1_k100"}
    mean, low, high = expected_paired("dpls", "ece")
    d = summary["differences"]["dpls_eps0.1_k100"]["ece"]
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((mean, low, high))


def test_compare_unpaired_when_seeds_do_not_match(tmp_path: Path):
    ce = [make_run(tmp_path, f"ce_{s}", "ce", s) for s in (0, 1)]
    dp = [make_run(tmp_path, f"dpls_{s}", "dpls", s) for s in (2, 3)]  # no seed in common: cannot pair
    report = write_report([*ce, *dp], tmp_path / "cmp")
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["paired"] is False and summary["method"] == "welch"
    d = summary["differences"]["dpls_eps0.1_k100"]["loss"]
    a = [eval_metrics("dpls", s)["loss"] for s in (2, 3)]
    b = [eval_metrics("ce", s)["loss"] for s in (0, 1)]
    assert d["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert d["method"] == "welch" and d["paired"] is False
    assert "unpaired" in report.read_text()


def test_single_seed_reports_undefined(tmp_path: Path):
    runs = [make_run(tmp_path, arm, arm, 0) for arm in ("ce", "dpls")]
    report = write_report(runs, tmp_path / "one")
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    d = summary["differences"]["dpls_eps0.1_k100"]["loss"]
    assert d["low"] is None and d["effect"] == EFFECT_UNDEFINED
    assert d["mean"] == pytest.approx(eval_metrics("dpls", 0)["loss"] - eval_metrics("ce", 0)["loss"])
    assert "with one seed no difference has an interval" in report.read_text()


def test_runs_without_evaluation_use_the_training_log(tmp_path: Path):
    runs = [
        make_run(tmp_path, f"{arm}{s}", arm, s, evaluated=False) for arm in ("ce", "ls") for s in range(2)
    ]
    write_report(runs, tmp_path / "noeval")
    summary = json.loads((tmp_path / "noeval" / "summary.json").read_text())
    assert summary["metrics"] == [TRAIN_LOG_METRIC, "best_val_ce", "best_val_ce_step"]
    assert summary["differences"]["ls_eps0.1"][TRAIN_LOG_METRIC]["mean"] == pytest.approx(0.0)


def test_bad_inputs(tmp_path: Path):
    with pytest.raises(ValueError, match="not found"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a run directory"):
        load_run(tmp_path / "empty")
    run = make_run(tmp_path, "ce0", "ce", 0)
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report([run], tmp_path / "x", baseline="nope")
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("damage", ["metrics.jsonl", "eval/metrics.json", "eval/metrics_bins.json"])
def test_a_run_file_that_cannot_be_read_whole_is_an_error_naming_it(tmp_path: Path, capsys, damage):
    """Cutting the last 40 bytes of one run's metrics.jsonl silently moved its "final" loss to
    an earlier step: a report is made from whole files or not at all."""
    runs = [make_run(tmp_path, f"{arm}0", arm, 0) for arm in ("ce", "ls")]
    target = runs[1] / damage
    if not target.exists():
        target.write_text('{"reliability": {}}\n')
    target.write_bytes(target.read_bytes()[:-40])
    with pytest.raises(ValueError, match=str(target)):
        write_report(runs, tmp_path / "report")
    capsys.readouterr()
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "report")]) == 2
    assert str(target) in capsys.readouterr().err


def test_best_validation_ce_shows_the_turn_and_the_data_fingerprint_is_reported(tmp_path: Path):
    """CE overfits (its validation CE turns upward), LS does not: the best value over training
    sits beside the final one, each with its paired interval; the runs' corpus is named."""
    runs = []
    for arm in ("ce", "ls"):
        for seed in range(3):
            run = make_run(tmp_path, f"{arm}{seed}", arm, seed, evaluated=False)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "val_ce" not in r]
            for i, step in enumerate(range(100, 140, 5)):  # ce: down to step 115, then up; ls: down
                turn = 0.05 * max(0, i - 3) if arm == "ce" else -0.01 * i
                rows.append({"step": step, "val_ce": 3.0 - 0.02 * min(i, 3) + turn + 0.003 * seed})
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (run / "tokenizer").mkdir()
            meta = {
                "source": "stdlib",
                "corpus_fingerprint": "ab" * 16,
                "settings": {"python": "CPython 3.x"},
            }
            (run / "tokenizer" / "meta.json").write_text(json.dumps(meta))
            runs.append(run)
    report = write_report(runs, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    ce = summary["arms"]["ce"]["metrics"]
    assert ce["best_val_ce"]["values"] == pytest.approx([2.94 + 0.003 * s for s in range(3)])
    assert ce["best_val_ce_step"]["values"] == [115.0] * 3
    assert ce["final_val_ce"]["values"] == pytest.approx([2.94 + 0.2 + 0.003 * s for s in range(3)])
    d = summary["differences"]["ls_eps0.1"]
    assert d["final_val_ce"]["mean"] == pytest.approx(2.94 - 0.07 - 3.14) and d["final_val_ce"]["better"]
    assert d["best_val_ce"]["mean"] == pytest.approx(-0.07) and d["best_val_ce"]["paired"]
    assert summary["data"]["corpus_fingerprint"] == "ab" * 16
    text = report.read_text()
    assert "| best_val_ce ↓ |" in text and "| best_val_ce_step |" in text
    assert f"corpus fingerprint `{'ab' * 16}`" in text and "CPython 3.x" in text

    # runs on two corpora: no shared fingerprint, and the report says the numbers do not compare
    meta = json.loads((runs[0] / "tokenizer" / "meta.json").read_text())
    (runs[0] / "tokenizer" / "meta.json").write_text(json.dumps({**meta, "corpus_fingerprint": "cd" * 16}))
    text = write_report(runs, tmp_path / "mixed").read_text()
    assert json.loads((tmp_path / "mixed" / "summary.json").read_text())["data"]["corpus_fingerprint"] is None
    assert "2 different corpora" in text
