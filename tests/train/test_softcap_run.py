"""A soft-capped run (``logit_softcap``): it trains, resumes bit for bit, its fused-linear loss
caps too, and the saved model caps its logits (evaluation and sampling). The export is checked
numerically in ``tests/eval/test_export_hf.py``."""

from __future__ import annotations

import pytest
import torch
from test_train import make_corpus, run_train, train_rows

from dpls.cli import main
from dpls.runs.checkpoint import load_model
from dpls.runs.layout import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CAP = 2.0
KEYS = dict(
    logit_softcap=CAP, loss="dpls", dpls_top_k=8, max_iters=12, lr_decay_iters=12, checkpoint_interval=6
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "chain", train_tokens=8_000, val_tokens=1_500)


def test_softcap_run_trains_resumes_exactly_and_caps_its_logits(corpus, tmp_path):
    straight = run_train(corpus, tmp_path / "straight", **KEYS)
    rows = train_rows(straight)
    assert sorted(rows) == list(range(1, 13))
    assert "logit_softcap = 2.0" in (straight / "config.toml").read_text()
    val = [r["val_ce"] for r in read_metrics(straight) if "val_ce" in r]
    assert val[-1] < val[0]  # it learns
    # every logit the trainer saw was capped: its logged maximum is below the cap
    assert all(0 < r["logit_max"] < CAP for r in rows.values() if "logit_max" in r)

    half = run_train(corpus, tmp_path / "half", **{**KEYS, "max_iters": 6})
    assert main(["train", f"--resume_dir={half}", "--max_iters=12"]) == 0
    got = train_rows(half)
    for step in range(1, 13):
        for k in ("loss", "ce", "grad_norm"):
            assert got[step][k] == rows[step][k], (step, k)
    assert main(["train", f"--resume_dir={half}", "--max_iters=13", "--logit_softcap=3"]) == 2  # a model key
    a, b = load_model(straight), load_model(half)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # load_model honours the key: evaluation and sampling see capped logits
    assert a.config.logit_softcap == CAP
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        logits = a(idx)
        raw = a.hidden_states(idx) @ a.output_weight.T
        torch.testing.assert_close(logits, CAP * torch.tanh(raw / CAP))
        cache = a.new_cache()
        cached = torch.cat([a(idx[:, :8], cache), a(idx[:, 8:], cache)], dim=1)
    torch.testing.assert_close(cached, logits, rtol=1e-5, atol=1e-6)
    out = a.generate(idx[:, :4], 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 10) and int(out.max()) < 64


def test_fused_linear_loss_caps_like_the_logits_path(corpus, tmp_path):
    """The first step of a fused-linear run computes the loss of the same capped logits."""
    keys = {**KEYS, "max_iters": 2, "lr_decay_iters": 2, "eval_interval": 100, "checkpoint_interval": 100}
    keys["logit_softcap"] = 0.1  # below the initial logits' spread: the cap bites from the first step
    plain = train_rows(run_train(corpus, tmp_path / "plain", **keys))
    fused = train_rows(run_train(corpus, tmp_path / "fused", **keys, fused_linear_loss=True))
    assert fused[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-5)
    assert fused[1]["ce"] == pytest.approx(plain[1]["ce"], rel=1e-5)
    assert (
        fused[1]["logit_max"] == pytest.approx(plain[1]["logit_max"], rel=1e-5)
        and plain[1]["logit_max"] <= 0.1 + 1e-6
    )


def test_bad_softcap_is_refused_before_training(corpus, tmp_path, capsys):
    code = main(["train", *[f"--{k}={v}" for k, v in {"data_dir": corpus, "out_dir": tmp_path / "r"}.items()],
                 "--logit_softcap=-1", "--device=cpu"])  # fmt: skip
    assert code == 2
    assert "logit_softcap must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
