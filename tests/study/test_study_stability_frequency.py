"""Study reports: loss spikes as the trainer counted them, validation CE by token frequency,
and bits per byte / AURC / AUROC among the compared metrics (hand-built run directories)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_study_report import LOSSES, T_975_DF2, make_run

from dpls.study.frequency import FREQUENCY_PLOT
from dpls.study.records import EVAL_METRICS, load_run
from dpls.study.report import write_report
from dpls.study.spikes import pooled_spikes, run_spikes
from dpls.study.summary import direction

SEEDS = (0, 1, 2)
# per-bin CE: the baseline's, and each arm's offset per bin (frequent ids better, rare ones worse)
BASE_CE = (2.0, 4.0, 7.0)
OFFSET = {"ce": (0.0, 0.0, 0.0), "ls": (0.01, 0.0, 0.02), "dpls": (-0.10, 0.05, 0.30)}


def bin_ce(arm: str, seed: int, b: int) -> float:
    wiggle = 0.01 * ((seed * 7 + b * 3 + len(arm)) % 5 - 2)  # a seed-dependent spread
    return BASE_CE[b] + OFFSET[arm][b] + 0.05 * seed + wiggle


def add_frequency_bins(run: Path, arm: str, seed: int, *, n_bins: int = 3) -> None:
    """What `dpls eval` writes: ce_by_frequency beside the other metrics of metrics.json."""
    path = run / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["ce_by_frequency"] = [
        {
            "bin": b,
            "train_frequency_min": 0.1 / (b + 1),
            "train_frequency_max": 0.2 / (b + 1),
            "train_share": 1.0 / n_bins,
            "types": 2**b,
            "tokens": 100,
            "ce": bin_ce(arm, seed, b) if b < len(BASE_CE) else None,
            "top1_acc": 0.5,
        }
        for b in range(n_bins)
    ]
    path.write_text(json.dumps(metrics))


def make_runs(root: Path, **kwargs: object) -> list[Path]:
    runs = []
    for arm in LOSSES:
        for seed in SEEDS:
            run = make_run(root, f"{arm}_{seed}", arm, seed, **kwargs)  # type: ignore[arg-type]
            add_frequency_bins(run, arm, seed)
            runs.append(run)
    return runs


# -- loss spikes --------------------------------------------------------------------------------


def test_run_spikes_is_the_last_rows_count_and_unknown_without_it():
    assert run_spikes([{"loss_spikes": 0}, {"loss_spikes": 3}]) == 3
    assert run_spikes([{"loss": 1.0}, {"loss_spikes": 3}]) is None  # partly logged: unknown
    assert run_spikes([{"loss": 1.0}]) is None and run_spikes([]) is None
    assert pooled_spikes([1, 2, 0]) == 3 and pooled_spikes([1, None]) is None


def test_report_uses_the_logged_count_and_names_the_rule(tmp_path):
    ce = [make_run(tmp_path, f"ce_{s}", "ce", s) for s in SEEDS]
    dp = [make_run(tmp_path, f"dpls_{s}", "dpls", s, spike=(s == 1)) for s in SEEDS]
    # the trainer's count wins over the rows' losses: a flat run that logged 2 spikes has 2
    rows = [json.loads(line) for line in (ce[0] / "metrics.jsonl").read_text().splitlines()]
    next(r for r in reversed(rows) if "loss" in r)["loss_spikes"] = 2
    (ce[0] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (dp[0] / "config.toml").open("a") as f:
        f.write("spike_window = 64\nspike_sigmas = 4.0\n")
    report = write_report([*ce, *dp], tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["arms"]["ce"]["stability"]["loss_spikes"] == 2
    assert summary["arms"]["dpls_eps0.1_k100"]["stability"]["loss_spikes"] == 1
    assert summary["spike_rule"] == (
        "loss > mean + 4σ of the previous 64 steps, every step (OLMo-core's rule; spike_window=64, "
        "spike_sigmas=4); loss > mean + 6σ of the previous 128 steps, every step (OLMo-core's rule; "
        "spike_window=128, spike_sigmas=6)"
    )
    text = report.read_text()
    assert f"Loss spike: {summary['spike_rule']}" in text
    assert "median" not in text  # the old after-the-fact rule is gone


def test_runs_without_a_logged_count_are_unknown_not_zero(tmp_path):
    ce = [make_run(tmp_path, f"ce_{s}", "ce", s, spikes_logged=False) for s in SEEDS]
    dp = [make_run(tmp_path, f"dpls_{s}", "dpls", s, spikes_logged=(s != 2)) for s in SEEDS]
    report = write_report([*ce, *dp], tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["arms"]["ce"]["stability"]["loss_spikes"] is None
    assert summary["arms"]["dpls_eps0.1_k100"]["stability"]["loss_spikes"] is None  # one seed unknown
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ce | 120 |")]
    assert rows == [rows[0]] and rows[0].split(" | ")[2] == "–"


# -- validation CE by token frequency ---------------------------------------------------------------


def expected_bin(arm: str, b: int) -> tuple[float, float, float]:
    d = np.array([bin_ce(arm, s, b) - bin_ce("ce", s, b) for s in SEEDS], dtype=np.float64)
    half = T_975_DF2 * d.std(ddof=1) / math.sqrt(len(SEEDS))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def test_frequency_bins_paired_per_bin_table_and_plot(tmp_path):
    report = write_report(make_runs(tmp_path), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    block = summary["by_frequency"]
    assert [b["bin"] for b in block["bins"]] == [0, 1, 2] and block["notes"] == []
    assert block["bins"][1]["train_share"] == pytest.approx(1 / 3)
    base = block["arms"]["ce"]
    assert "difference" not in base
    assert base["ce"] == pytest.approx([np.mean([bin_ce("ce", s, b) for s in SEEDS]) for b in range(3)])
    assert base["n"] == [3, 3, 3]
    for arm in ("ls_eps0.1", "dpls_eps0.1_k100"):
        for b in range(3):
            d = block["arms"][arm]["difference"][b]
            assert (d["mean"], d["low"], d["high"]) == pytest.approx(
                expected_bin(arm.split("_")[0], b), abs=1e-9
            )
            assert d["paired"] is True and d["n"] == 3
    # dpls: frequent ids better, rare ones worse, each beyond its interval
    dpls = block["arms"]["dpls_eps0.1_k100"]["difference"]
    assert dpls[0]["high"] < 0 < dpls[2]["low"]
    text = report.read_text()
    assert "## Validation CE by token frequency" in text
    assert (
        "| bin | training share | training frequency | baseline CE | ls_eps0.1 − ce | dpls_eps0.1_k100 − ce |"
        in text
    )
    mean, low, high = expected_bin("dpls", 2)
    ls_mean = expected_bin("ls", 2)[0]
    base_ce = np.mean([bin_ce("ce", s, 2) for s in SEEDS])
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row.startswith(f"| 2 | 0.3333 | 0.03333 – 0.06667 | {base_ce:.4g} | ")
    assert row.endswith(f" | **+{mean:.4g} [+{low:.4g}, +{high:.4g}]** |") and f"+{ls_mean:.4g} [" in row
    assert (tmp_path / "out" / FREQUENCY_PLOT).stat().st_size > 1000
    assert f"({FREQUENCY_PLOT})" in text


def test_frequency_bins_unpaired_missing_and_mismatched(tmp_path):
    ce = [make_run(tmp_path, f"ce_{s}", "ce", s) for s in (0, 1)]
    dp = [make_run(tmp_path, f"dpls_{s}", "dpls", s) for s in (2, 3)]  # no common seed: Welch
    for run, (arm, seed) in zip([*ce, *dp], [("ce", 0), ("ce", 1), ("dpls", 2), ("dpls", 0)], strict=True):
        add_frequency_bins(run, arm, seed)
    odd = make_run(tmp_path, "dpls_5", "dpls", 1)
    add_frequency_bins(odd, "dpls", 1, n_bins=4)  # other bins: left out, named
    write_report([*ce, *dp, odd], tmp_path / "out")
    block = json.loads((tmp_path / "out" / "summary.json").read_text())["by_frequency"]
    d = block["arms"]["dpls_eps0.1_k100"]["difference"][0]
    want = np.mean([bin_ce("dpls", s, 0) for s in (2, 0)]) - np.mean([bin_ce("ce", s, 0) for s in (0, 1)])
    assert d["method"] == "welch" and d["paired"] is False and d["mean"] == pytest.approx(want)
    assert len(block["notes"]) == 1 and "dpls_5" in block["notes"][0]


def test_no_frequency_bins_no_section_and_no_plot(tmp_path):
    runs = [make_run(tmp_path, f"{arm}_{s}", arm, s) for arm in ("ce", "dpls") for s in SEEDS]
    report = write_report(runs, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["by_frequency"] is None
    assert "by token frequency" not in report.read_text()
    assert not (tmp_path / "out" / FREQUENCY_PLOT).exists()


def test_load_run_reads_the_bins(tmp_path):
    run = make_run(tmp_path, "r", "ce", 0)
    add_frequency_bins(run, "ce", 0)
    record = load_run(run)
    assert record.by_frequency is not None and [b["ce"] for b in record.by_frequency] == pytest.approx(
        [bin_ce("ce", 0, b) for b in range(3)]
    )
    assert "ce_by_frequency" not in record.metrics


# -- bits per byte, AURC, AUROC ---------------------------------------------------------------------


def test_bits_per_byte_aurc_auroc_are_compared(tmp_path):
    report = write_report(
        [make_run(tmp_path, f"{a}_{s}", a, s) for a in ("ce", "dpls") for s in SEEDS], tmp_path / "o"
    )
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    for metric, sign in (
        ("bits_per_byte", -1),
        ("aurc", -1),
        ("auroc", +1),
        ("aurc_at_best_temperature", -1),
    ):
        assert metric in EVAL_METRICS and metric in summary["metrics"]
        assert direction(metric) == sign
        assert metric in summary["differences"]["dpls_eps0.1_k100"]
        assert f"| {metric} {'↑' if sign > 0 else '↓'} |" in report.read_text()
