"""Power, the primary question, the absolute reading of a sweep and sweeps over several keys:
hand-built records and summaries, and one small two-key study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_sweep import _study, _write, tiny_data  # noqa: F401  (the fixture is used by name)

from dpls.study.primary import add_power, power_sentence, primary_block, primary_lines, with_power
from dpls.study.records import RunRecord
from dpls.study.spec import parse_spec
from dpls.study.stats import holm, minimum_detectable_effect, paired_ci, seeds_needed
from dpls.study.sweep import (
    FLATTER_BECAUSE_WORSE,
    MORE_STABLE,
    NO_DIFFERENCE,
    reference_point,
    summarize_sweep,
)
from dpls.study.sweep_tables import by_value_table_lines, sweep_section_lines, sweep_table_lines

INIT = 8.0


def _run(arm: str, value, seed: int, final: float | None, spikes: int | None = None) -> RunRecord:
    """A run from scratch: L_init 8.0 at step 0, ``final`` at the end (None: diverged)."""
    val_rows = [{"step": 0, "val_ce": INIT}]
    if final is not None:
        val_rows.append({"step": 10, "val_ce": final})
    train = [{"step": 10, "loss": 5.0, **({} if spikes is None else {"loss_spikes": spikes})}]
    diverged = None if final is not None else {"step": 3}
    return RunRecord(
        Path(f"{arm}/{value}/{seed}"), arm, seed, {}, train, val_rows, value=value, diverged=diverged
    )


def _groups(
    grid: dict[str, dict[int, list[float | None]]], values, spikes=None
) -> dict[str, list[RunRecord]]:
    return {
        arm: [
            _run(arm, v, s, L, None if spikes is None else spikes)
            for s, losses in seeds.items()
            for v, L in zip(values, losses, strict=True)
        ]
        for arm, seeds in grid.items()
    }


# -- the absolute reading of a sweep --------------------------------------------------------------

VALUES = [0.01, 0.1, 1.0]


def test_an_arm_better_at_the_high_rates_is_more_stable():
    # ce degrades at 1.0 (and diverges there for seed 2); "cure" is as good at its best and lower at 1.0.
    grid = {
        "ce": {0: [5.0, 4.0, 7.0], 1: [5.1, 4.1, 7.3], 2: [5.2, 4.2, None]},
        "cure": {0: [5.0, 4.0, 5.0], 1: [5.1, 4.1, 5.2], 2: [5.2, 4.2, 5.1]},
    }
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    ce, cure = out["arms"]["ce"], out["arms"]["cure"]
    assert ce["largest_stable_lr"] == 0.1 and cure["largest_stable_lr"] == 1.0
    # the per-value paired differences, by hand: 0 at the first two values, [−2.0, −2.1, −2.9] at 1.0
    by = cure["by_value"]
    assert [b["value"] for b in by] == VALUES
    assert by[0]["difference"]["mean"] == pytest.approx(0.0) and by[1]["difference"]["mean"] == pytest.approx(
        0.0
    )
    d = np.array([5.0 - 7.0, 5.2 - 7.3, 5.1 - INIT])
    ref = paired_ci(d, np.zeros(3))
    assert by[2]["difference"]["mean"] == pytest.approx(d.mean())
    assert by[2]["difference"]["low"] == pytest.approx(ref.low) and by[2]["difference"]["excludes_zero"]
    assert by[2]["difference"]["mde"] == pytest.approx(minimum_detectable_effect(d.std(ddof=1), 3))
    assert cure["conclusion"] == MORE_STABLE
    assert "conclusion" not in ce and "by_value" not in ce  # the baseline is what the others are read against


def test_a_flat_arm_whose_best_is_worse_is_flatter_not_more_stable():
    # "meh" is 0.5 nats worse at ce's best and no better anywhere: its sensitivity is lower, its
    # largest stable rate the same.
    grid = {
        "ce": {0: [5.0, 4.0, 6.0], 1: [5.1, 4.2, 6.2], 2: [5.2, 4.1, 6.1]},
        "meh": {0: [5.0, 4.5, 6.0], 1: [5.1, 4.8, 6.2], 2: [5.2, 4.6, 6.1]},
    }
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    meh = out["arms"]["meh"]
    assert meh["difference"]["mean"] < 0  # flatter by Wortsman's measure...
    best = meh["best_difference"]
    assert best["mean"] == pytest.approx(np.mean([0.5, 0.6, 0.5])) and best["excludes_zero"]
    assert meh["largest_stable_lr"] == out["arms"]["ce"]["largest_stable_lr"] == 1.0
    assert meh["conclusion"] == FLATTER_BECAUSE_WORSE  # ...because its best is worse
    lines = "\n".join(sweep_section_lines(out))
    assert "flatter because its best is worse" in lines


def test_noise_alone_is_no_difference_and_a_larger_stable_rate_is_more_stable():
    grid = {
        "ce": {0: [5.0, 4.0, 6.0], 1: [5.1, 4.2, 6.2]},
        "same": {0: [5.1, 3.9, 6.3], 1: [5.0, 4.3, 5.9]},
        "keeps": {0: [5.0, 4.0, 7.9], 1: [5.1, 4.2, 7.95]},  # worse at 1.0 but not above L_init
    }
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    assert out["arms"]["same"]["conclusion"] == NO_DIFFERENCE
    # keeps has the same largest stable rate: worse (if not significantly) is not "more stable"
    assert (
        out["arms"]["keeps"]["largest_stable_lr"] == 1.0
        and out["arms"]["keeps"]["conclusion"] == NO_DIFFERENCE
    )
    grid["ce"][1][2] = None  # one ce seed diverges at 1.0: ce's largest stable rate drops to 0.1...
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    assert out["arms"]["ce"]["largest_stable_lr"] == 0.1
    assert out["arms"]["same"]["largest_stable_lr"] == 1.0
    assert out["arms"]["same"]["conclusion"] == NO_DIFFERENCE  # ...but one seed decides nothing


def test_a_larger_stable_rate_counts_seed_by_seed():
    # ce ends above L_init at 1.0 in every seed; the arm trains there in every seed, by very
    # different margins, so its paired difference at 1.0 alone is not shown (t test), but the
    # stable rate is larger in 6 of 6 seeds (sign test p = 0.031).
    at_one = [7.99, 6.0, 7.999, 7.9, 7.99, 7.999]
    grid = {
        "ce": {s: [5.0 + s / 100, 4.0 + s / 100, 8.5] for s in range(6)},
        "arm": {s: [5.0 + s / 100, 4.0 + s / 100, at_one[s]] for s in range(6)},
    }
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    arm = out["arms"]["arm"]
    assert not arm["by_value"][2]["difference"]["excludes_zero"]
    assert (out["arms"]["ce"]["largest_stable_lr"], arm["largest_stable_lr"]) == (0.1, 1.0)
    assert arm["conclusion"] == MORE_STABLE
    # with five seeds (5 of 5: p = 0.062) it is not shown
    grid = {name: {s: losses for s, losses in seeds.items() if s < 5} for name, seeds in grid.items()}
    five = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")["arms"]["arm"]
    assert not five["by_value"][2]["difference"]["excludes_zero"]
    assert five["conclusion"] == NO_DIFFERENCE


def test_one_better_value_among_many_is_holm_corrected():
    # Better at one of six values above ce's best with p ≈ 0.01: significant alone, not after
    # Holm's correction over the six (0.06).
    values = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    noise = [0.03, -0.05, 0.02, 0.04, -0.01, 0.06]
    ce = {s: [4.0 + s / 10] + [6.0 + s / 10] * 6 for s in range(6)}
    arm = {s: [4.0 + s / 10] + [6.0 + s / 10 + noise[(s + j) % 6] for j in range(6)] for s in range(6)}
    for s, d in enumerate([-0.1, 0.0, -0.15, -0.02, -0.12, -0.05]):  # t = −3.03, p = 0.029
        arm[s][1] = 6.0 + s / 10 + d
    out = summarize_sweep(_groups({"ce": ce, "arm": arm}, values), "learning_rate", values, "ce")
    a = out["arms"]["arm"]
    d = a["by_value"][1]["difference"]
    assert d["mean"] < 0 and d["excludes_zero"] and 6 * d["p_value"] > 0.05
    assert all(not b["difference"]["excludes_zero"] for i, b in enumerate(a["by_value"]) if i != 1)
    assert a["conclusion"] == NO_DIFFERENCE


def test_sign_test_against_the_binomial_by_hand():
    from dpls.study.stats import sign_test

    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(5, 1) == pytest.approx(2 * 7 / 64)
    assert sign_test(3, 3) == pytest.approx(1.0)
    assert sign_test(0, 0) is None
    with pytest.raises(ValueError, match="counts"):
        sign_test(-1, 2)


def test_a_run_that_ends_above_its_initial_loss_is_not_stable():
    grid = {"ce": {0: [5.0, 4.0, 8.5]}}  # 8.5 > L_init 8.0 but within the 10% divergence margin
    out = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")
    assert out["arms"]["ce"]["diverged"] == 0 and out["arms"]["ce"]["largest_stable_lr"] == 0.1
    assert (
        summarize_sweep(_groups({"ce": {0: [None] * 3}}, VALUES), "learning_rate", VALUES, "ce")["arms"][
            "ce"
        ]["largest_stable_lr"]
        is None
    )


def test_spikes_are_summed_over_seeds_and_unknown_stays_unknown():
    grid = {"ce": {0: [5.0, 4.0, 6.0], 1: [5.1, 4.2, 6.2]}, "z": {0: [5.0, 4.0, 6.0], 1: [5.1, 4.2, 6.2]}}
    out = summarize_sweep(_groups(grid, VALUES, spikes=3), "learning_rate", VALUES, "ce")
    assert out["arms"]["ce"]["spikes"] == [6, 6, 6]
    assert "| ce | 0.1 | 4.1 | " in "\n".join(sweep_table_lines(out)) and "| 18 |" in "\n".join(
        sweep_table_lines(out)
    )
    old = summarize_sweep(_groups(grid, VALUES), "learning_rate", VALUES, "ce")  # rows without the key
    assert old["arms"]["ce"]["spikes"] == [None, None, None]
    table = sweep_table_lines(old)
    assert table[2].split("|")[5].strip() == "–"  # the loss-spikes column: unknown, not 0
    mixed = _groups(grid, VALUES, spikes=2)
    mixed["ce"][0] = _run("ce", 0.01, 0, 5.0, None)
    assert summarize_sweep(mixed, "learning_rate", VALUES, "ce")["arms"]["ce"]["spikes"] == [None, 4, 4]
    assert any("Loss spikes per run" in line for line in by_value_table_lines(out))


# -- several swept keys ------------------------------------------------------------------------------


def test_a_two_key_sweep_reads_the_sensitivity_at_each_value_of_the_other_key():
    lrs, widths = [0.01, 0.1, 1.0], [32, 64]
    # per (arm, width): seed -> L at each lr
    losses = {
        ("ce", 32): {0: [5.0, 4.0, 6.0], 1: [5.1, 4.2, 6.2]},
        ("ce", 64): {0: [4.5, 3.5, None], 1: [4.6, 3.6, None]},
        ("z", 32): {0: [5.0, 4.1, 5.9], 1: [5.1, 4.3, 6.0]},
        ("z", 64): {0: [4.5, 3.6, 5.0], 1: [4.6, 3.7, 5.1]},
    }
    groups: dict[str, list[RunRecord]] = {"ce": [], "z": []}
    for (arm, w), seeds in losses.items():
        for s, row in seeds.items():
            groups[arm] += [_run(arm, {"learning_rate": lr, "n_embd": w}, s, L) for lr, L in zip(lrs, row)]
    out = summarize_sweep(groups, "learning_rate", lrs, "ce", others={"n_embd": widths})
    assert out["keys"] == ["learning_rate", "n_embd"] and [s["label"] for s in out["slices"]] == [
        "n_embd=32",
        "n_embd=64",
    ]
    for w in widths:  # each slice is the one-key block of its runs alone
        one = summarize_sweep(
            {
                a: [_run(a, lr, s, L) for s, row in losses[(a, w)].items() for lr, L in zip(lrs, row)]
                for a in ("ce", "z")
            },
            "learning_rate",
            lrs,
            "ce",
        )
        label = f"n_embd={w}"
        for a in ("ce", "z"):
            assert out["arms"][a]["lr_sensitivity"][label] == pytest.approx(one["arms"][a]["lr_sensitivity"])
            assert out["arms"][a]["largest_stable_lr"][label] == one["arms"][a]["largest_stable_lr"]
        assert out["arms"]["z"]["difference"][label]["mean"] == pytest.approx(
            one["arms"]["z"]["difference"]["mean"]
        )
    assert out["arms"]["ce"]["largest_stable_lr"] == {"n_embd=32": 1.0, "n_embd=64": 0.1}
    assert out["arms"]["z"]["conclusion"]["n_embd=64"] == MORE_STABLE
    at_64 = out["arms"]["z"]["by_value"]["n_embd=64"]  # z − ce at 1.0: [5.0 − 8.0, 5.1 − 8.0]
    assert at_64[2]["value"] == 1.0 and at_64[2]["difference"]["mean"] == pytest.approx(-2.95)
    # the reference point: ce's best over the whole grid (width 64 at 0.1), as the runs' values are written
    assert reference_point(out) == {"learning_rate": 0.1, "n_embd": 64}
    lines = "\n".join(sweep_section_lines(out))
    assert "### At n_embd=32" in lines and "### At n_embd=64" in lines
    # Holm across arms × widths for the primary question
    summary = {"baseline": "ce", "confidence": 0.95, "differences": {"z": {}}, "sweep": out}
    block = primary_block(summary, "lr_sensitivity", None)
    assert [(c["arm"], c["at"]) for c in block["comparisons"]] == [
        ("z", {"n_embd": 32}),
        ("z", {"n_embd": 64}),
    ]
    ps = [c["p_value"] for c in block["comparisons"]]
    assert [c["p_adjusted"] for c in block["comparisons"]] == pytest.approx(
        [h["p_adjusted"] for h in holm(ps)]
    )


def test_the_spec_takes_several_sweep_keys_and_a_primary_question(tmp_path, tiny_data):  # noqa: F811
    from dpls.study.plan import plan_study

    two = _study(tmp_path, tiny_data, sweep={"n_embd": [32, 64], "learning_rate": [1e-3, 1e-2]})
    two["train"].pop("n_embd")
    spec = parse_spec(two)
    sw = spec.sweep
    assert sw is not None and sw.key == "learning_rate" and sw.others == (("n_embd", (32, 64)),)
    assert spec.primary == "lr_sensitivity" and spec.min_effect is None
    plan = plan_study(spec)
    assert len(plan.arms) == 2 * 4
    first = plan.arms[0]
    assert first.name == "ce/learning_rate_0.001/n_embd_32/seed0" and first.value == {
        "learning_rate": 1e-3,
        "n_embd": 32,
    }
    assert first.values["n_embd"] == 32 and first.values["learning_rate"] == 1e-3
    forked = parse_spec(_study(tmp_path, tiny_data, fork_step=3, primary="best_val_ce", min_effect=0.05))
    assert forked.primary == "best_val_ce" and forked.min_effect == 0.05
    assert parse_spec(_study(tmp_path, tiny_data, fork_step=3)).primary == "lr_sensitivity"
    no_sweep = _study(tmp_path, tiny_data, fork_step=3)
    del no_sweep["sweep"]
    assert parse_spec(no_sweep).primary == "final_val_ce"
    with pytest.raises(ValueError, match="needs a \\[sweep\\]"):
        parse_spec({**no_sweep, "primary": "lr_sensitivity"})
    for bad in (0, -1.0, "big", True, math.inf):
        with pytest.raises(ValueError, match="min_effect must be a number > 0"):
            parse_spec({**no_sweep, "min_effect": bad})
    two["fork_step"] = 3
    with pytest.raises(ValueError, match="model key can be swept only from scratch"):
        parse_spec(two)


# -- power and the primary question -----------------------------------------------------------------


def _diff(arm: list[float], base: list[float]) -> dict:
    return with_power(paired_ci(arm, base).to_dict())


def test_every_paired_difference_has_its_minimum_detectable_effect():
    d = _diff([1.0, 1.3, 0.8, 1.1], [0.9, 1.0, 0.9, 0.8])
    sd = float(np.std(np.array([0.1, 0.3, -0.1, 0.3]), ddof=1))
    assert d["sd"] == pytest.approx(sd) and d["mde"] == pytest.approx(minimum_detectable_effect(sd, 4))
    assert _diff([1.0], [0.9])["mde"] is None  # one seed: no spread
    summary = {"differences": {"a": {"loss": paired_ci([1, 2, 3], [1, 1, 1]).to_dict()}}}
    add_power(summary)
    assert summary["differences"]["a"]["loss"]["mde"] == pytest.approx(minimum_detectable_effect(1.0, 3))


def test_the_primary_question_is_holm_corrected_with_seeds_needed():
    base = [3.00, 3.10, 2.95, 3.05, 3.02]
    arms = {
        "big": [2.80, 2.92, 2.74, 2.86, 2.81],  # about −0.2, consistent
        "small": [2.99, 3.11, 2.93, 3.06, 3.00],  # about −0.006
        "worse": [3.05, 3.12, 3.01, 3.06, 3.09],
    }
    summary = {
        "baseline": "ce",
        "confidence": 0.95,
        "differences": {
            a: {"final_val_ce": paired_ci(v, base).to_dict(), "ece": paired_ci(v, base).to_dict()}
            for a, v in arms.items()
        },
    }
    add_power(summary)
    block = primary_block(summary, "final_val_ce", 0.05)
    assert block["metric"] == "final_val_ce" and block["family"] == 3
    raw = [summary["differences"][a]["final_val_ce"]["p_value"] for a in arms]
    expected = holm(raw)
    for c, h, a in zip(block["comparisons"], expected, arms, strict=True):
        assert (
            c["arm"] == a
            and c["p_adjusted"] == pytest.approx(h["p_adjusted"])
            and c["significant"] == h["significant"]
        )
        d = summary["differences"][a]["final_val_ce"]
        assert c["seeds_needed"] == {
            "observed": seeds_needed(d["mean"], d["sd"]),
            "min_effect": seeds_needed(0.05, d["sd"]),
        }
        assert d["holm"]["p_adjusted"] == c["p_adjusted"]  # the difference itself carries it too
    # Holm's step-down by hand: the smallest p times 3, the next times 2 (kept non-decreasing), the last times 1
    order = np.argsort(raw)
    adj = np.maximum.accumulate([min(1.0, (3 - i) * raw[j]) for i, j in enumerate(order)])
    assert [block["comparisons"][j]["p_adjusted"] for j in order] == pytest.approx(list(adj))
    verdicts = {c["arm"]: c["conclusion"] for c in block["comparisons"]}
    assert verdicts["big"] == "better" and verdicts["small"] == "no difference shown"
    text = "\n".join(primary_lines({**summary, "primary": block}))
    assert text.startswith("## Primary question") and "Holm-adjusted p" in text
    assert "this study could detect differences of" in text and "min_effect" in text
    assert "ece" not in text  # the other metrics are exploratory, elsewhere


def test_the_power_sentence_says_what_the_study_could_see():
    c = {"mde": 0.9, "n": 2, "mean": -0.086, "seeds_needed": {"observed": 40, "min_effect": 12}}
    words = power_sentence(c, "lr_sensitivity", 0.2)
    assert words == (
        "this study could detect differences of 0.9 nats or more (80% power, 2 seeds); the observed −0.086 "
        "would need about 40 seeds, and the declared min_effect of 0.2 nats about 12"
    )
    assert "run more seeds" in power_sentence({"mde": None, "n": 1, "mean": 0.1}, "loss", None)


# -- one small two-key study, end to end -------------------------------------------------------------


@pytest.mark.slow
def test_a_two_key_sweep_study_writes_its_summary(tmp_path, tiny_data, one_thread):  # noqa: F811
    from dpls.cli import main

    study = _study(
        tmp_path,
        tiny_data,
        seeds=2,
        iters_per_arm=4,
        sweep={"learning_rate": [3e-3, 10.0], "n_embd": [16, 32]},
        min_effect=0.1,
    )
    study["train"].update(eval_interval=4, log_interval=1)
    study["train"].pop("n_embd")
    path = _write(tmp_path / "s.toml", study)
    assert main(["study", str(path), "--no-progress"]) == 0
    report = tmp_path / "study" / "report"
    summary = json.loads((report / "summary.json").read_text())
    sw = summary["sweep"]
    assert sw["keys"] == ["learning_rate", "n_embd"] and [s["at"] for s in sw["slices"]] == [
        {"n_embd": 16},
        {"n_embd": 32},
    ]
    for arm in ("ce", "zloss"):
        a = sw["arms"][arm]
        assert set(a["lr_sensitivity"]) == {"n_embd=16", "n_embd=32"}
        assert all(v is None or v in (3e-3, 10.0) for v in a["largest_stable_lr"].values())
    z = sw["arms"]["zloss"]
    assert set(z["conclusion"].values()) <= {MORE_STABLE, FLATTER_BECAUSE_WORSE, NO_DIFFERENCE}
    for part in sw["slices"]:
        by = part["arms"]["zloss"]["by_value"]
        assert [b["value"] for b in by] == [3e-3, 10.0] and all("mde" in b["difference"] for b in by)
    assert all("mde" in d for diffs in summary["differences"].values() for d in diffs.values())
    primary = summary["primary"]
    assert primary["metric"] == "lr_sensitivity" and primary["min_effect"] == 0.1 and primary["family"] == 2
    assert all({"seeds_needed", "p_adjusted", "mde"} <= set(c) for c in primary["comparisons"])
    assert isinstance(summary["sweep"]["reference_value"], dict)
    text = (report / "report.md").read_text()
    assert (
        text.index("## Primary question")
        < text.index("## Learning-rate sensitivity")
        < text.index("## Exploratory")
    )
    assert (tmp_path / "study/arms/ce/learning_rate_0.003/n_embd_16/seed0/config.toml").is_file()


# -- keys that change nothing a run computes -----------------------------------------------------------


def test_logging_and_memory_keys_do_not_stop_pooling_or_resuming(tmp_path):
    from dpls.study.checks import check_run_on_disk
    from dpls.study.records import check_poolable

    base = {"learning_rate": 1e-3, "wandb": "off", "mlflow": "off", "activation_checkpointing": "none"}
    other = {
        **base,
        "wandb": "offline",
        "wandb_project": "x",
        "mlflow": "sqlite:///m.db",
        "mlflow_experiment": "y",
        "activation_checkpointing": "full",
    }
    runs = [
        RunRecord(Path("a"), "ce", 0, dict(base), [], []),
        RunRecord(Path("b"), "ce", 1, dict(other), [], []),
    ]
    check_poolable({"ce": runs})  # seeds of one experiment, logged elsewhere
    runs[1].config["learning_rate"] = 2e-3
    with pytest.raises(ValueError, match="differ in learning_rate"):
        check_poolable({"ce": runs})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        'learning_rate = 0.001\nwandb = "off"\nactivation_checkpointing = "none"\n'
    )
    check_run_on_disk(
        run, {"learning_rate": 1e-3, "wandb": "online", "activation_checkpointing": "full"}, None, 0, None
    )
    with pytest.raises(ValueError, match="learning_rate"):
        check_run_on_disk(run, {"learning_rate": 2e-3}, None, 0, None)


def test_a_report_of_loose_runs_answers_its_primary_question_first(tmp_path):
    from dpls.study.report import write_report

    def run(loss: str, seed: int, ce: float) -> RunRecord:
        rows = [{"step": 0, "val_ce": 8.0}, {"step": 10, "val_ce": ce}]
        cfg = {"loss": loss, "seed": seed, **({"label_smoothing": 0.1} if loss == "ls" else {})}
        return RunRecord(
            Path(f"{loss}{seed}"),
            loss,
            seed,
            cfg,
            [],
            rows,
            metrics={"loss": ce, "top1_acc": 0.1, "final_val_ce": ce},
        )

    records = [run("ce", s, 5.0 + 0.1 * s) for s in range(3)] + [
        run("ls", s, 4.9 + 0.1 * s + 0.01 * s * s) for s in range(3)
    ]
    write_report(records, tmp_path / "r", min_effect=0.05)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["primary"]["metric"] == "final_val_ce" and summary["primary"]["min_effect"] == 0.05
    (c,) = summary["primary"]["comparisons"]
    assert (
        c["arm"] == "ls"
        and c["mean"] == pytest.approx(-0.1 + 0.05 / 3)
        and c["seeds_needed"]["min_effect"] >= 2
    )
    assert all(d["mde"] is not None for d in summary["differences"]["ls"].values())
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.index("## Primary question") < text.index("## Exploratory")
    write_report(records, tmp_path / "typo", primary="final_val_cee")
    notes = json.loads((tmp_path / "typo" / "summary.json").read_text())["notes"]
    assert any("'final_val_cee' is not among the compared metrics" in n for n in notes)
