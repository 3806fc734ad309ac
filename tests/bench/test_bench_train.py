"""`dpls bench train`: whole optimizer steps per loss, each timed beside CE in the same process."""

from __future__ import annotations

import math

import pytest
import torch

from dpls.bench.train import bench_train, format_table
from dpls.cli import main


def test_rows_carry_their_ratio_to_the_ce_step_of_the_same_group():
    rows = bench_train(
        ["tiny"],
        ["ce", "dpls"],
        ["chunked"],
        batch_size=2,
        block_size=16,
        steps=2,
        warmup=1,
        device=torch.device("cpu"),
        dtype=torch.float32,
        compile_model=False,
        epsilon=0.1,
        top_k=10,
        vocab_size=512,
    )
    assert [(r.preset, r.loss, r.impl) for r in rows] == [
        ("tiny", "ce", "chunked"),
        ("tiny", "dpls", "chunked"),
    ]
    ce, dpls = rows
    assert ce.ratio_to_ce == 1.0
    assert math.isclose(dpls.ratio_to_ce, dpls.ms_per_step / ce.ms_per_step)
    assert all(r.ms_per_step > 0 and r.tokens_per_s > 0 for r in rows)
    assert all(r.mfu is None and r.peak_mem_gb is None for r in rows)  # no peak known on CPU
    table = format_table(rows)
    assert "dpls" in table and "ms × CE" in table


def test_unknown_preset_is_a_usage_error(capsys):
    assert main(["bench", "train", "--presets", "tiny,huge", "--device", "cpu"]) == 2
    assert "huge" in capsys.readouterr().err


def test_bad_loss_keys_and_outputs_are_usage_errors_before_any_case(capsys, monkeypatch):
    import dpls.bench.train as bt

    monkeypatch.setattr(bt, "build_case", lambda *a, **k: pytest.fail("a case ran before the checks"))
    base = ["bench", "train", "--presets", "tiny", "--device", "cpu", "--vocab-size", "512"]
    for extra, needle in (
        (["--losses", "ce,dlps"], "loss must be one of"),
        (["--top-k", "600"], "dpls_top_k must be in [1, V=512]"),
        (["--epsilon", "1.5"], "epsilon"),
        (["--impls", "nope"], "impl must be one of"),
        (["--json", "/"], "--json"),
        (["--device", "tpu"], "device"),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_nanogpt_yardstick_and_the_trainers_own_step(monkeypatch):
    """The dpls rows time `train_step` itself; the nanogpt row is the GPT-2-style model in its
    plain step; every row carries its speed relative to that row."""
    import dpls.bench.train as bt

    calls = []
    real = bt.train_step  # the trainer's own step, as the bench imports it
    monkeypatch.setattr(bt, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = bench_train(
        ["tiny", "nanogpt"],
        ["ce", "dpls"],
        ["chunked"],
        batch_size=2,
        block_size=16,
        steps=2,
        warmup=1,
        device=torch.device("cpu"),
        dtype=torch.float32,
        compile_model=False,
        epsilon=0.1,
        top_k=10,
        vocab_size=512,
    )
    assert [(r.preset, r.loss, r.impl) for r in rows] == [
        ("tiny", "ce", "chunked"),
        ("tiny", "dpls", "chunked"),
        ("nanogpt", "ce", "torch"),
    ]
    assert len(calls) == 2 * (1 + 2)  # two dpls cases, one warm-up and two timed steps each
    nano = rows[-1]
    assert nano.speed_vs_nanogpt == 1.0 and nano.ratio_to_ce == 1.0
    for r in rows:
        assert math.isclose(r.speed_vs_nanogpt, r.tokens_per_s / nano.tokens_per_s)
    assert "tok/s vs nanogpt" in format_table(rows)


def test_gpt2_yardstick_is_causal_and_learns():
    from dpls.bench.gpt2 import GPT2, GPT2Config, plain_optimizer, plain_step

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :10], model(changed)[:, :10])  # no peeking ahead
        assert not torch.allclose(model(x)[:, 10:], model(changed)[:, 10:])
    y = (x + 1) % 64
    opt = plain_optimizer(model, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 1e-2

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()

    before = loss()
    for _ in range(20):
        plain_step(model, opt, x, y)
    assert loss() < before - 1.0


def test_threads_must_be_positive(capsys):
    assert main(["bench", "train", "--presets", "tiny", "--device", "cpu", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
