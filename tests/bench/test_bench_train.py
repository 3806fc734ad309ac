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
    assert "dpls" in table and "vs CE" in table


def test_unknown_preset_is_a_usage_error(capsys):
    assert main(["bench", "train", "--presets", "tiny,huge", "--device", "cpu"]) == 2
    assert "huge" in capsys.readouterr().err


def test_bad_loss_keys_and_outputs_are_usage_errors_before_any_case(capsys, monkeypatch):
    import dpls.bench.train as bt

    monkeypatch.setattr(bt, "time_case", lambda *a, **k: pytest.fail("a case ran before the checks"))
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
