"""Samples in studies: the [eval] keys, samples.json per run, the report's Samples section and
the generation metrics with paired intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_helpers import make_text_data
from dpls.eval.generation import GENERATION_METRICS, generation_metrics
from dpls.study.spec import parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(tmp_path: Path, data: Path, **eval_keys: object) -> dict:
    return {
        "name": "samples",
        "out_dir": str(tmp_path / "study"),
        "data_dir": str(data),
        "fork_step": 3,
        "seeds": 2,
        "iters_per_arm": 2,
        "train": {
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 32,
            "batch_size": 2,
            "eval_tokens": 128,
            "learning_rate": 1e-2,
            "device": "cpu",
        },
        "arms": [{"name": "ce", "loss": "ce"}, {"name": "ls", "loss": "ls", "label_smoothing": 0.3}],
        "eval": {"tokens": 256, **eval_keys},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_text_data(tmp_path_factory.mktemp("text") / "data")


def test_eval_sample_keys_have_small_defaults_and_are_checked(tmp_path, data):
    ev = parse_spec(_spec(tmp_path, data)).eval
    assert (ev.samples, ev.sample_tokens, ev.sample_prompt_tokens) == (8, 32, 16)
    ev = parse_spec(_spec(tmp_path, data, samples=0, sample_tokens=5, sample_prompt_tokens=3)).eval
    assert (ev.samples, ev.sample_tokens, ev.sample_prompt_tokens) == (0, 5, 3)
    for key, bad in (("samples", -1), ("sample_tokens", 0), ("sample_prompt_tokens", 1.5)):
        with pytest.raises(ValueError, match=rf"\[eval\] {key} must be an integer"):
            parse_spec(_spec(tmp_path, data, **{key: bad}))
    with pytest.raises(ValueError, match="sample_tokens"):
        parse_spec(_spec(tmp_path, data, sample_token=4))  # the closest key is named


@pytest.mark.slow
def test_study_samples_side_by_side_with_paired_generation_metrics(tmp_path, data, capsys):
    from dpls.study.runner import run_study

    report = run_study(
        parse_spec(_spec(tmp_path, data, samples=4, sample_tokens=12, sample_prompt_tokens=6)), progress=False
    )
    study = tmp_path / "study"
    files = {
        (arm, seed): json.loads((study / "arms" / arm / f"seed{seed}" / "eval" / "samples.json").read_text())
        for arm in ("ce", "ls")
        for seed in (0, 1)
    }
    for (_arm, seed), s in files.items():
        assert s["settings"] == {
            "num_samples": 4,
            "prompt_tokens": 6,
            "max_new_tokens": 12,
            "temperature": 1.0,
            "seed": seed,
        }
        assert len(s["prompts"]) == len(s["samples"]) == 4
        assert set(s["metrics"]) == set(GENERATION_METRICS)
        assert 0 <= s["metrics"]["mean_length"] <= 12
    # every arm gets the same prompts: the openings of the first validation documents
    assert len({tuple(s["prompts"]) for s in files.values()}) == 1

    summary = json.loads((study / "report" / "summary.json").read_text())
    gen = [f"generation/{k}" for k in GENERATION_METRICS]
    assert [m for m in summary["metrics"] if m.startswith("generation/")] == [
        g for g in gen if all(g in a["metrics"] for a in summary["arms"].values())
    ]
    distinct = summary["arms"]["ls"]["metrics"]["generation/distinct_1"]
    assert distinct["values"] == [files[("ls", s)]["metrics"]["distinct_1"] for s in (0, 1)]
    diff = summary["differences"]["ls"]["generation/distinct_1"]
    per_seed = [
        files[("ls", s)]["metrics"]["distinct_1"] - files[("ce", s)]["metrics"]["distinct_1"] for s in (0, 1)
    ]
    assert diff["mean"] == pytest.approx(sum(per_seed) / 2) and diff["paired"] is True
    assert diff["direction"] == 0  # more diverse text is not better in itself

    block = summary["samples"]
    assert block["seed"] == 0 and block["prompts"] == files[("ce", 0)]["prompts"][:3]
    assert block["arms"] == {a: files[(a, 0)]["samples"][:3] for a in ("ce", "ls")}
    text = report.read_text()
    section = text[text.index("## Samples") :]
    assert "| prompt | ce | ls |" in section
    rows = [line for line in section.splitlines() if line.startswith("| <code>")]
    assert len(rows) == 3
    assert "| generation/distinct_2 |" in text

    # `dpls demo` ends by printing the first prompt and one sample per arm
    from dpls.cli.demo import print_samples

    capsys.readouterr()
    print_samples(report.parent)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("One sample per arm (seed 0")
    shown = {line.split(":", 1)[0].strip(): line.split(": ", 1)[1] for line in lines[1:]}
    assert list(shown) == ["prompt", "ce", "ls"]
    assert shown["ls"] == (block["arms"]["ls"][0].replace("\n", "⏎") or "(nothing)")

    # A rerun with samples = 0 draws none (and trains and evaluates nothing): no section, no rows.
    for f in study.rglob("samples.json"):
        f.unlink()
    report = run_study(parse_spec(_spec(tmp_path, data, samples=0)), progress=False)
    assert not list(study.rglob("samples.json"))
    text = report.read_text()
    assert "## Samples" not in text and "generation/" not in text


def test_report_cell_escapes_markup():
    from dpls.study.tables import code_cell as _code_cell

    assert _code_cell("a|b\n<c> & d") == "<code>a&#124;b⏎&lt;c&gt; &amp; d</code>"
    assert _code_cell("") == "(nothing)"


def test_generation_metrics_match_the_module_names():
    assert list(generation_metrics([[1, 2, 3, 4, 5]])) == list(GENERATION_METRICS)
