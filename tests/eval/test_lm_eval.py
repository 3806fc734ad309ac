"""`run_lm_eval` / `dpls lm-eval`: a custom multiple-choice task on a tiny checkpoint, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_export_hf import make_tiny_run

from lm_eval_helpers import QUESTIONS, write_task


def direct_accuracy(model: torch.nn.Module, tokenizer_file: Path) -> float:
    """Multiple-choice accuracy computed with the dpls model itself: argmax over choices of
    log p(" " + choice | question), summed over the choice's tokens (the harness's ``acc``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    hits = 0
    for q, choices, label in QUESTIONS:
        context = tok.encode(q).ids
        scores = []
        for choice in choices:
            whole = tok.encode(q + " " + choice).ids
            cont = whole[len(context) :]
            ids = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = model(ids)[0].double().log_softmax(-1)
            targets = torch.tensor(cont)
            scores.append(logp[len(context) - 1 :].gather(-1, targets[:, None]).sum().item())
        hits += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return hits / len(QUESTIONS)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.mark.slow
def test_custom_task_end_to_end(tmp_path, offline, capsys):
    from dpls.cli import main
    from dpls.eval.lm_eval import run_lm_eval

    run, model = make_tiny_run(tmp_path)
    tasks = write_task(tmp_path)
    out = tmp_path / "results"
    # bad input first: it must fail before exporting or writing anything
    with pytest.raises(
        ValueError, match=r"unknown lm-evaluation-harness task.*'toy_mcc' \(did you mean toy_mc"
    ):
        run_lm_eval(run, "toy_mc,toy_mcc", include_path=tasks, out_dir=out)
    with pytest.raises(ValueError, match=r"'hellaswagg' \(did you mean hellaswag"):
        run_lm_eval(run, "hellaswagg", include_path=tasks, out_dir=out)
    with pytest.raises(ValueError, match="include_path"):
        run_lm_eval(run, "toy_mc", include_path=tmp_path / "no_such_dir", out_dir=out)
    assert not (run / "hf").exists() and not out.exists()

    code = main(
        ["lm-eval", str(run), "--tasks", "toy_mc", "--include_path", str(tasks), "--out", str(out),
         "--device", "cpu", "--batch-size", "4"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    acc = results["results"]["toy_mc"]["acc,none"]
    assert acc == pytest.approx(direct_accuracy(model, run / "tokenizer" / "tokenizer.json"))
    assert results["n-samples"]["toy_mc"]["effective"] == len(QUESTIONS)
    assert results["dpls"]["hf_dir"] == str(run / "hf" / "step_0000001")
    table = (out / "results.md").read_text()
    assert "| toy_mc | acc |" in table and f"{acc:.4f}" in table
    assert "| toy_mc | acc |" in capsys.readouterr().out
    assert main(["lm-eval", str(run), "--tasks", "toy_mc", "--limit", "0"]) == 2


@pytest.mark.slow
def test_qk_norm_and_softcap_models_run_through_the_harness(tmp_path, offline):
    """They export as Qwen3 and VaultGemma (their logits: test_export_hf.py), which the harness's
    own hf model class loads offline; its accuracy is the one our model gives."""
    from dpls.eval.lm_eval import run_lm_eval

    tasks = write_task(tmp_path)
    for name, keys, arch in (
        ("qknorm", dict(qk_norm=True), "Qwen3ForCausalLM"),
        ("softcap", dict(logit_softcap=2.0), "VaultGemmaForCausalLM"),
    ):
        run, model = make_tiny_run(tmp_path / name, **keys)
        results = run_lm_eval(run, "toy_mc", include_path=tasks, device="cpu", batch_size=4, out_dir=None)
        acc = results["results"]["toy_mc"]["acc,none"]
        assert acc == pytest.approx(direct_accuracy(model, run / "tokenizer" / "tokenizer.json"))
        config = json.loads((Path(results["dpls"]["hf_dir"]) / "config.json").read_text())
        assert config["architectures"] == [arch]


def test_cli_option_types_say_what_is_allowed(tmp_path, capsys):
    from dpls.cli import main

    for option, value, allowed in (
        ("--limit", "abc", "a number of examples"),
        ("--batch-size", "x", "'auto'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["lm-eval", str(tmp_path), option, value])
        assert exc.value.code == 2 and allowed in capsys.readouterr().err


def test_cheap_argument_checks(tmp_path):
    from dpls.eval.lm_eval import run_lm_eval

    run, _ = make_tiny_run(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        run_lm_eval(run, " , ")
    for limit in (0, 1.5, math.inf, math.nan):  # 1.5 would silently become 1 example, inf a crash
        with pytest.raises(ValueError, match="limit must be a whole number"):
            run_lm_eval(run, "toy", limit=limit)
    with pytest.raises(ValueError, match="not found"):
        run_lm_eval(tmp_path / "missing", "toy")
    assert not (run / "hf").exists()


def test_unwritable_results_folder_fails_before_exporting(tmp_path):
    """--out under a file is found before the export and the evaluation, not after them."""
    from dpls.eval.lm_eval import run_lm_eval

    run, _ = make_tiny_run(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot create the folder .*a file is in the way"):
        run_lm_eval(run, "toy_mc", out_dir=tmp_path / "file" / "results")
    assert not (run / "hf").exists() and (tmp_path / "file").read_text() == "x"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")  # never replaced by a results table
    with pytest.raises(ValueError, match=r"results\.md, not written by dpls"):
        run_lm_eval(run, "toy_mc", out_dir=mine)
    assert not (run / "hf").exists() and (mine / "results.md").read_text() == "my notes"


def test_parse_tasks_and_table():
    from dpls.eval.lm_eval import parse_tasks, results_table

    assert parse_tasks("hellaswag, piqa,,hellaswag") == ["hellaswag", "piqa"]
    assert parse_tasks(["arc_easy"]) == ["arc_easy"]
    table = results_table(
        {
            "results": {
                "piqa": {
                    "alias": "piqa",
                    "acc,none": 0.625,
                    "acc_stderr,none": 0.0125,
                    "acc_norm,none": 0.5,
                    "acc_norm_stderr,none": "N/A",
                },
                "lambada_openai": {"alias": "lambada_openai", "perplexity,none": math.nan},
            }
        }
    )
    assert table.splitlines() == [
        "| task | metric | value | stderr |",
        "| --- | --- | --- | --- |",
        "| piqa | acc | 0.6250 | 0.0125 |",
        "| piqa | acc_norm | 0.5000 | - |",
        "| lambada_openai | perplexity | - | - |",
    ]
