"""``dpls bench loss``: the contender registry, the table and JSON, the memory measurement, and
the command line's argument checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpls.bench.loss import (
    BASELINE,
    CONTENDERS,
    LossBenchConfig,
    _cpu_peak,
    bench_loss,
    format_table,
    load_contenders,
    register_loss_contender,
)
from dpls.cli import main


def test_bench_rows_are_ratios_to_cross_entropy():
    cfg = LossBenchConfig(n=32, v=300, top_k=5, repeats=2, memory=False)
    rows = bench_loss(cfg, progress=False)
    by_name = {r.name: r for r in rows}
    assert {BASELINE, "dense_published", "dpls:chunked", "dpls:reference"} <= set(by_name)
    assert by_name[BASELINE].ratio == 1.0
    for r in rows:
        assert len(r.times_ms) == 2 and r.ms > 0
        assert r.ratio == pytest.approx(r.ms / by_name[BASELINE].ms)
    table = format_table(rows, cfg)
    assert "dpls:chunked" in table and "× CE" in table


def test_plugin_contenders_join_the_registry():
    calls = []

    def build(logits, target, cfg):
        return lambda: calls.append(logits.shape)

    register_loss_contender("test-noop", build, description="does nothing")
    try:
        assert "test-noop" in load_contenders(torch.device("cpu"))
        rows = bench_loss(
            LossBenchConfig(n=8, v=50, top_k=3, repeats=1, memory=False, impls=("test-noop",)), progress=False
        )
        assert [r.name for r in rows] == [BASELINE, "test-noop"] and calls == [(8, 50), (8, 50)]
        register_loss_contender("test-noop", build, available=lambda d: False)
        assert "test-noop" not in load_contenders(torch.device("cpu"))
    finally:
        CONTENDERS.pop("test-noop", None)


def test_peak_rss_growth_sees_a_large_allocation():
    """In a fresh process (as the benchmark measures): in this one, memory freed by earlier tests
    may already be resident and would hide the allocation."""
    code = (
        "import torch\n"
        "from dpls.bench.loss import peak_rss_growth\n"
        "print(peak_rss_growth(lambda: float(torch.ones(16 * 2**20 // 4).sum())))\n"  # 16 MiB, touched
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) >= 15 * 2**20


def test_cpu_memory_chunked_needs_the_gradient_only_dense_needs_more():
    cfg = LossBenchConfig(n=1024, v=8192, top_k=50)
    logits_bytes = 1024 * 8192 * 4
    chunked = _cpu_peak("dpls:chunked", cfg)
    dense = _cpu_peak("dense_published", cfg)
    assert chunked is not None and dense is not None
    # the gradient (1×) plus a fixed number of chunk buffers, independent of N: two pool threads,
    # each holding a chunk's log-probabilities and its working copy
    from dpls.losses.chunked import CHUNK_ELEMS

    assert chunked <= logits_bytes + 4 * CHUNK_ELEMS * 4
    assert dense >= 2.5 * logits_bytes  # one-hot, mask, soft target, log-probs, gradient


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "loss",
            "--n",
            "16",
            "--v",
            "200",
            "--top-k",
            "4",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--no-memory",
            "--impls",
            "dpls:chunked,dense_published",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "dpls:chunked" in text and "dense_published" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == [BASELINE, "dpls:chunked", "dense_published"]
    assert data["config"]["v"] == 200 and data["rows"][0]["ratio"] == 1.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--top-k", "0"], "--top-k"),
        (["--v", "10", "--top-k", "11"], "--top-k"),
        (["--epsilon", "1.0"], "--epsilon"),
        (["--dtype", "int8"], "--dtype"),
        (["--n", "0"], "--n"),
        (["--repeats", "0"], "--repeats"),
        (["--impls", "dpls:nonesuch"], "--impls"),
        (["--device", "tpu"], "--device"),
        (["--json", "/nonexistent-dir/x.json"], "--json"),
        (["--json", "/"], "is a directory"),
        (["--n", "1000000000", "--v", "1000000"], "lower --n or --v"),
    ],
)
def test_cli_bad_arguments_are_usage_errors(args, needle, capsys):
    assert main(["bench", "loss", "--n", "8", "--v", "50", "--top-k", "5", "--no-memory", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_bench_train_is_registered():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--help"])
    assert exc.value.code == 0
