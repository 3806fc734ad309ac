"""Instability diagnostics (logit_max, lse_mean, attn_logit_max) and the divergence rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import write_data_dir
from dpls.train.diagnostics import Diagnostics
from dpls.train.watch import DivergenceWatch


def test_logit_diagnostics_against_float64():
    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 11) * 4, torch.randn(3, 7, 11)]
    diag = Diagnostics(torch.device("cpu"))
    for chunk in logits:
        diag.add_logits(chunk)

    class Ctx:  # one rank
        all_reduce_max = all_reduce_sum = staticmethod(lambda t: t.clone())

    out = diag.reduce(Ctx())
    flat = torch.cat([x.reshape(-1, 11) for x in logits]).double()
    assert out["logit_max"] == pytest.approx(flat.abs().max().item(), rel=1e-6)
    assert out["lse_mean"] == pytest.approx(torch.logsumexp(flat, -1).mean().item(), rel=1e-6)
    assert "attn_logit_max" not in out  # nothing recorded: no made-up value
    # From hidden states and the output weight (fused losses): the same numbers.
    hidden, weight = torch.randn(4, 6, 8), torch.randn(11, 8)
    a, b = Diagnostics(torch.device("cpu")), Diagnostics(torch.device("cpu"))
    a.add_hidden(hidden, weight)
    b.add_logits(hidden @ weight.T)
    a.add_attention(torch.tensor(2.5))
    b.add_attention(torch.tensor(2.5))
    assert a.reduce(Ctx()) == pytest.approx(b.reduce(Ctx()))


@pytest.mark.parametrize("ignored", [False, True])
def test_log_z_from_the_objectives_ce_equals_logsumexp(ignored):
    """With the objective's CE, log Z = CE + z_y needs no pass over the logits; a batch with
    ignored targets falls back to logsumexp. Both agree with float64."""
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 50) * 5 + 20
    target = torch.randint(0, 50, (3, 9))
    if ignored:
        target[1, 4] = -100
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), ignore_index=-100)
    diag = Diagnostics(torch.device("cpu"))
    diag.add_logits(logits, target, ce)

    class Ctx:
        all_reduce_max = all_reduce_sum = staticmethod(lambda t: t.clone())

    out = diag.reduce(Ctx())
    want = torch.logsumexp(logits.reshape(-1, 50).double(), -1).mean().item()
    assert out["lse_mean"] == pytest.approx(want, rel=1e-6)
    assert out["logit_max"] == pytest.approx(logits.abs().max().item())


def test_divergence_rule_needs_window_bad_rows_in_a_row():
    watch = DivergenceWatch(window=3, initial=5.0)
    assert [watch.see(s, ce) for s, ce in [(1, 6.0), (2, 6.0), (3, 4.0), (4, 5.6)]] == [None] * 4
    assert watch.see(5, math.nan) is None
    assert watch.see(6, math.inf) == 4  # three bad rows in a row: it began at step 4
    assert DivergenceWatch(window=0, initial=5.0).see(1, 99.0) is None  # switched off
    restored = DivergenceWatch(window=3)
    restored.load_state_dict({"initial_val_ce": 5.0, "divergence_streak": [4, 5]})
    assert restored.see(6, 7.0) == 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_data_dir(
        root,
        [rng.integers(0, 60, 3000).astype(np.uint16)],
        [rng.integers(0, 60, 600).astype(np.uint16)],
        vocab_size=64,
        tokenizer="gpt2",
    )
    return root


def _overrides(data: Path, out: Path, **changes) -> dict:
    base = dict(
        data_dir=str(data),
        out_dir=str(out),
        model="tiny",
        n_layer=1,
        n_embd=32,
        n_head=2,
        block_size=16,
        batch_size=2,
        eval_tokens=64,
        eval_interval=100,
        progress=False,
        device="cpu",
        warmup_iters=1,
        min_lr=0.0,
    )
    return {**base, **changes}


def test_diagnostics_on_log_steps_only_and_training_unchanged(tmp_path, data, one_thread):
    from dpls.runs.checkpoint import load_model
    from dpls.runs.layout import read_metrics
    from dpls.train.config import load_config
    from dpls.train.trainer import train

    a = train(load_config(overrides=_overrides(data, tmp_path / "a", max_iters=6, log_interval=3)))
    b = train(load_config(overrides=_overrides(data, tmp_path / "b", max_iters=6, log_interval=1)))
    rows = [r for r in read_metrics(a) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r[k]) for r in rows for k in ("logit_max", "lse_mean", "attn_logit_max"))
    # Measuring on every step (b) or every third (a) trains exactly the same weights.
    for (name, p), q in zip(load_model(a).state_dict().items(), load_model(b).state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_diverging_run_records_where_and_stops(tmp_path, data, one_thread):
    from dpls.runs.layout import read_diverged, read_metrics
    from dpls.train.config import load_config
    from dpls.train.trainer import Diverged, train

    out = tmp_path / "run"
    cfg = load_config(
        overrides=_overrides(data, out, max_iters=40, log_interval=1, learning_rate=10.0, divergence_window=3)
    )
    with pytest.raises(Diverged, match="3 logged steps in a row") as err:
        train(cfg)
    record = read_diverged(out)
    assert record["step"] == err.value.step and record["detected_at"] == record["step"] + 2
    assert record["initial_val_ce"] == pytest.approx(read_metrics(out)[0]["val_ce"])
    assert read_metrics(out)[-1]["step"] == record["detected_at"]  # the log stays, up to the stop
    assert json.loads((out / "diverged.json").read_text()) == record


def test_the_watch_ignores_batch_noise_within_its_margin_and_a_run_that_cannot_move():
    """lr 0 with divergence_window = 3: batch CEs 7.61-7.66 around L_init 7.636 are noise. A
    healthy run at a small learning rate starts a few percent above the validation CE (6.24 vs
    6.08 measured on the stdlib corpus): not a divergence either."""
    noise = [7.61, 7.66, 7.65, 7.64, 7.66, 7.62]
    assert [DivergenceWatch(3, initial=7.636).see(s, ce) for s, ce in enumerate(noise, 1)] == [None] * 6
    watch = DivergenceWatch(3, initial=6.08)
    assert [watch.see(s, ce) for s, ce in enumerate([6.25, 6.24, 6.24, 6.23, 6.2], 1)] == [None] * 5
    frozen = DivergenceWatch(3, initial=7.636, frozen=True)  # learning_rate = 0: the weights never change
    assert [frozen.see(s, math.nan) for s in (1, 2, 3, 4)] == [None] * 4
    blown = DivergenceWatch(3, initial=7.636)
    assert [blown.see(s, ce) for s, ce in [(1, 9.0), (2, 2.7e6), (3, 8.5)]] == [None, None, 1]


@pytest.mark.parametrize(
    "initial, final, from_scratch, stopped, outcome",
    [
        (7.636, 17.38, True, False, "diverged"),  # lr 50: blew up to 2.7M, collapsed; ends far above L_init
        (7.636, 7.636, True, False, "no_progress"),  # lr 0: never moved
        (4.163, 4.1705, True, False, "no_progress"),  # moved, but nothing to learn (random tokens): +0.2%
        (7.636, 5.1, True, False, "trained"),
        (3.0, 3.4, False, False, "trained"),  # forked, data-limited: overfits above L_init, a result
        (3.0, 3.5, False, True, "diverged"),  # forked, stopped by the watch
        (3.0, 3.0, False, False, "no_progress"),
        (7.636, math.nan, True, False, "diverged"),
        (7.636, None, True, False, "diverged"),  # no validation after the first
    ],
)
def test_the_outcome_of_a_run(initial, final, from_scratch, stopped, outcome):
    from dpls.train.watch import run_outcome

    assert run_outcome(initial, final, from_scratch=from_scratch, stopped=stopped) == outcome
