"""pad_vocab_to end to end: a padded model trains, validates and evaluates exactly as an unpadded one."""

from __future__ import annotations

import json

import pytest

from data_helpers import make_text_data, train_tiny_run
from dpls.cli import main
from dpls.runs import read_metrics
from metric_helpers import assert_metrics_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_text_data(tmp_path_factory.mktemp("pad") / "data")


def _train(data, out, **extra):
    return train_tiny_run(data, out, steps=6, eval_interval=3, log_interval=1, **extra)


@pytest.mark.parametrize(
    "loss",
    [
        dict(loss="ce"),
        dict(loss="ls"),  # smoothing spread over the real vocabulary, never the padding
        dict(loss="dpls", dpls_top_k=20, dpls_epsilon_mode="entropy", z_loss=1e-3),
        dict(loss="dpls", dpls_top_k=20, fused_linear_loss=True),  # from the output weight's real rows
    ],
    ids=["ce", "ls", "dpls-entropy-zloss", "dpls-fused"],
)
def test_padded_and_unpadded_runs_give_the_same_numbers(data, tmp_path, capsys, loss):
    plain = _train(data, tmp_path / "plain", pad_vocab_to=1, **loss)
    padded = _train(data, tmp_path / "padded", pad_vocab_to=64, **loss)
    model_cfg = json.loads(next((padded / "checkpoints").iterdir()).joinpath("model_config.json").read_text())
    assert model_cfg["pad_vocab_to"] == 64 and model_cfg["vocab_size"] % 64 != 0  # really padded
    rows = [read_metrics(run) for run in (plain, padded)]
    assert [sorted(r) for r in rows[0]] == [sorted(r) for r in rows[1]]
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "ce", "val_ce", "val_ppl", "val_entropy", "grad_norm", "epsilon"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (a["step"], key)
    evals = []
    for run in (plain, padded):
        out = tmp_path / f"{run.name}.json"
        assert main(["eval", str(run), "--out", str(out), "--device=cpu", "--no-plots", "--tokens=200"]) == 0
        evals.append(json.loads(out.read_text()))
    assert_metrics_close(evals[1], evals[0], rel=2e-5, abs=1e-6)  # every key, the bins of ce_by_frequency too
    capsys.readouterr()
    samples = [
        main(["sample", str(run), "--device=cpu", "--max-new-tokens=30", "--seed=3"])
        or capsys.readouterr().out
        for run in (plain, padded)
    ]
    assert samples[0] == samples[1]


def test_pad_vocab_to_is_a_model_key(data, tmp_path, capsys):
    """It cannot change when forking (the weights would not fit), and a bad value is exit 2."""
    run = _train(data, tmp_path / "a", pad_vocab_to=64)
    capsys.readouterr()
    args = [
        "train",
        f"--data_dir={data}",
        f"--resume_dir={run}",
        f"--out_dir={tmp_path / 'b'}",
        "--max_iters=8",
    ]
    assert main([*args, "--pad_vocab_to=8", "--device=cpu"]) == 2
    assert "pad_vocab_to" in capsys.readouterr().err
    assert main(["train", f"--data_dir={data}", "--pad_vocab_to=0", f"--out_dir={tmp_path / 'c'}"]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_gpt2_tokenised_data_pads_to_64_by_default(tmp_path):
    import numpy as np

    from data_helpers import write_data_dir
    from dpls.train.config import load_config
    from dpls.train.plan import plan_run

    tokens = np.arange(4000) % 261
    write_data_dir(tmp_path / "gpt2", [tokens], [tokens[:600]], vocab_size=261, tokenizer="gpt2")
    base = [
        f"--data_dir={tmp_path / 'gpt2'}",
        f"--out_dir={tmp_path / 'run'}",
        "--block_size=32",
        "--n_layer=1",
    ]
    plan = plan_run(load_config(overrides=base))
    assert (plan.model_config.vocab_size, plan.model_config.padded_vocab_size) == (261, 320)
    assert plan.cfg.pad_vocab_to == 64  # resolved into the run's config.toml
    assert plan_run(load_config(overrides=[*base, "--pad_vocab_to=1"])).model_config.padded_vocab_size == 261
