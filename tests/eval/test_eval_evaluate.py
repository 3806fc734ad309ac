"""`evaluate_checkpoint` / `dpls eval` end to end on a tiny run, against a direct computation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_hf import make_tiny_run

from data_helpers import write_data_dir
from dpls.eval.metrics import EXTRA_METRIC_KEYS, METRIC_KEYS

BLOCK = 32  # make_tiny_run's block size


def make_data(root: Path, vocab: int, val_tokens: int = 300) -> Path:
    """A prepared data directory (meta.json + one train and one val shard of random tokens)."""
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, vocab, 500), rng.integers(0, vocab, val_tokens)
    write_data_dir(root / "data", [train], [val], vocab_size=vocab, source="files")
    return root / "data"


@pytest.fixture
def run_and_data(tmp_path):
    run, model = make_tiny_run(tmp_path)
    data = make_data(tmp_path, model.config.vocab_size)
    return run, data, model


def direct_loss(model: torch.nn.Module, data: Path, tokens: int) -> tuple[float, float]:
    """Mean CE and top-1 accuracy over consecutive BLOCK windows of the val shard, in float64."""
    from dpls.data.shards import read_shard

    val = torch.from_numpy(read_shard(data / "val_000000.bin").astype(np.int64))
    ce, hits, n = 0.0, 0, 0
    for start in range(0, len(val) - 1, BLOCK):
        length = min(BLOCK, len(val) - 1 - start, tokens - n)
        if length <= 0:
            break
        x, y = val[start : start + length], val[start + 1 : start + 1 + length]
        with torch.no_grad():
            logits = model(x.unsqueeze(0))[0].double()
        ce += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        hits += int((logits.argmax(-1) == y).sum())
        n += length
    return ce / n, hits / n


def test_evaluate_checkpoint_writes_metrics_and_plots(run_and_data, tmp_path):
    from dpls.eval.evaluate import evaluate_checkpoint, output_paths

    run, data, model = run_and_data
    shutil.copy(run / "tokenizer" / "tokenizer.json", data / "tokenizer.json")  # for bits per byte
    out = tmp_path / "eval" / "metrics.json"
    metrics = evaluate_checkpoint(run, out=out, tokens=200, batch_size=3, progress=False)
    saved = json.loads(out.read_text())
    assert list(saved) == [*METRIC_KEYS, *EXTRA_METRIC_KEYS]
    by_frequency = saved.pop("ce_by_frequency")
    assert by_frequency == metrics["ce_by_frequency"]
    assert saved == pytest.approx({k: v for k, v in metrics.items() if k != "ce_by_frequency"})
    # the bins partition the evaluated tokens: their token-weighted CE is the loss
    assert sum(b["tokens"] for b in by_frequency) == 200 and len(by_frequency) == 10
    weighted = sum(b["tokens"] * b["ce"] for b in by_frequency if b["tokens"]) / 200
    assert weighted == pytest.approx(metrics["loss"], rel=1e-9)
    assert 0 < metrics["aurc"] < 1 and 0 <= metrics["auroc"] <= 1 and math.isfinite(metrics["bits_per_byte"])
    assert metrics["tokens"] == 200
    loss, acc = direct_loss(model, data, 200)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["top1_acc"] == pytest.approx(acc)
    assert metrics["loss_at_best_temperature"] <= metrics["loss"] + 1e-9
    for name, path in output_paths(out).items():
        assert path.is_file() and path.stat().st_size > 0, name
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bins = json.loads(output_paths(out)["bins"].read_text())
    assert sum(bins["reliability"]["count"]) == 200
    assert sum(bins["entropy_histogram"]["counts"]) == 200
    assert bins["checkpoint"].endswith("step_0000001")
    meta = json.loads((Path(bins["data_dir"]) / "meta.json").read_text())
    assert bins["corpus_fingerprint"] == meta.get("corpus_fingerprint")  # which tokens were evaluated
    assert bins["token_statistics"] == {
        "frequency_bins": {"counted_tokens": 500, "bins": 10},
        "bytes": {"tokenizer": "bpe", "exact": True},
    }


def test_bits_per_byte_of_a_short_text_by_hand(tmp_path):
    """The validation shard is one short text in the run's byte-level BPE. Every token but the
    first is predicted, so the bytes are the text's UTF-8 bytes less the first token's; bits per
    byte is the summed CE over those, in bits. A run without the tokenizer has none (null)."""
    from tokenizers import Tokenizer

    from dpls.eval.evaluate import evaluate_checkpoint

    run, model = make_tiny_run(tmp_path)
    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    text = "def add(x, y):\n    return x + y  # héllo wörld ✓\n"
    ids = tok.encode(text).ids
    write_data_dir(
        tmp_path / "data", [np.array(ids * 3)], [np.array(ids)], vocab_size=model.config.vocab_size
    )
    shutil.copy(run / "tokenizer" / "tokenizer.json", tmp_path / "data" / "tokenizer.json")
    first = len(tok.decode(ids[:1]).encode("utf-8"))  # the first token is ASCII: whole bytes
    n_bytes = len(text.encode("utf-8")) - first
    nats = direct_loss(model, tmp_path / "data", len(ids) - 1)[0] * (len(ids) - 1)
    metrics = evaluate_checkpoint(run, data_dir=tmp_path / "data", progress=False)
    assert metrics["tokens"] == len(ids) - 1
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    (tmp_path / "data" / "tokenizer.json").unlink()
    assert math.isnan(evaluate_checkpoint(run, data_dir=tmp_path / "data", progress=False)["bits_per_byte"])


def test_whole_validation_set_and_in_memory(run_and_data):
    from dpls.data.loader import validation_batches
    from dpls.eval.evaluate import evaluate_checkpoint, evaluate_model

    run, data, model = run_and_data
    metrics = evaluate_checkpoint(run / "checkpoints" / "step_0000001", progress=False)  # out=None: no files
    assert metrics["tokens"] == 299  # every val token but the first is predicted once
    model.train()
    again = evaluate_model(model, validation_batches(data, BLOCK, 4), progress=False)
    assert model.training  # mode restored
    # the same numbers (the frequency bins and bytes per token come from the data: dpls eval only)
    assert {k: again[k] for k in METRIC_KEYS} == pytest.approx({k: metrics[k] for k in METRIC_KEYS}, rel=1e-6)


def test_relative_data_dir_is_found_from_another_directory(tmp_path, monkeypatch):
    from dpls.eval.evaluate import evaluate_checkpoint

    run, model = make_tiny_run(tmp_path, relative_paths=True)  # as if trained from tmp_path
    make_data(tmp_path, model.config.vocab_size)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_checkpoint(run, tokens=40, progress=False)["tokens"] == 40


def test_bad_input_fails_before_writing(run_and_data, tmp_path):
    from dpls.eval.evaluate import evaluate_checkpoint

    run, _, _ = run_and_data
    out = tmp_path / "nothing" / "metrics.json"
    cases = [
        (dict(tokens=0), "tokens must be"),
        (dict(batch_size=0), "batch_size"),
        (dict(data_dir=tmp_path / "nope"), "not a prepared data directory"),
        (dict(block_size=BLOCK * 2), "exceeds the model's context"),
        (dict(dtype="int8"), "dtype"),
        (dict(device="tpu"), "device"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_checkpoint(run, out=out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="not found"):
        evaluate_checkpoint(tmp_path / "missing", out=out)
    damaged = make_data(tmp_path / "damaged", 50)
    (damaged / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"damaged/data/meta\.json' is not valid JSON"):
        evaluate_checkpoint(run, data_dir=damaged, out=out)
    assert not out.exists()


def test_outputs_never_replace_other_files(run_and_data, tmp_path):
    """--out that is a directory, lies under a file, or names a file dpls eval did not write
    (a data directory's meta.json) is refused before any work; an earlier evaluation's is replaced."""
    from dpls.eval.evaluate import evaluate_checkpoint

    run, data, _ = run_and_data
    meta = (data / "meta.json").read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "notes_bins.json").write_text("{}")  # where out=notes.json would put its bins
    cases = [
        (data / "meta.json", "was not written by dpls"),
        (tmp_path / "notes.json", "notes_bins.json exists and was not written by dpls"),
        (run, "is a directory"),
        (tmp_path / "notes.txt" / "metrics.json", "a file is in the way"),
    ]
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_checkpoint(run, out=out, tokens=40, progress=False, plots=False)
    assert (data / "meta.json").read_bytes() == meta and (tmp_path / "notes_bins.json").read_text() == "{}"
    assert not (tmp_path / "notes.json").exists()
    out = tmp_path / "again.json"
    for tokens in (40, 50):  # a rerun replaces its own files
        evaluate_checkpoint(run, out=out, tokens=tokens, progress=False, plots=False)
        assert json.loads(out.read_text())["tokens"] == tokens


def test_cli(run_and_data, tmp_path, capsys):
    from dpls.cli import main

    run, data, _ = run_and_data
    out = tmp_path / "m.json"
    code = main(
        ["eval", str(run), "--out", str(out), "--tokens", "64", "--data-dir", str(data), "--no-plots"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "best_temperature" in printed and str(out) in printed
    assert json.loads(out.read_text())["tokens"] == 64
    assert not (tmp_path / "m_reliability.png").exists()
    assert main(["eval", str(run), "--out", str(tmp_path / "x.json"), "--tokens", "0"]) == 2
    assert "tokens must be" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_ctrl_c_exits_130_without_a_traceback(run_and_data, tmp_path, capsys, monkeypatch):
    import dpls.eval.evaluate as ev
    from dpls.cli import main

    run, _, _ = run_and_data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate_model", interrupted)
    out = tmp_path / "m.json"
    assert main(["eval", str(run), "--out", str(out), "--tokens", "40"]) == 130
    assert capsys.readouterr().err == "dpls eval: interrupted\n" and not out.exists()


def test_a_run_without_its_tokenizer_copy_finds_the_relative_data_dir(tmp_path, monkeypatch):
    from dpls.runs.layout import TOKENIZER_DIR, load_tokenizer
    from dpls.train.config import TrainConfig, write_config

    run, model = make_tiny_run(tmp_path, relative_paths=True)  # as if trained from tmp_path
    data = make_data(tmp_path, model.config.vocab_size)
    (run / TOKENIZER_DIR / "tokenizer.json").rename(data / "tokenizer.json")  # the run has no copy
    write_config(TrainConfig(out_dir="run", data_dir="data"), run / "config.toml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    tok = load_tokenizer(run)  # found through config.toml's data_dir, relative to where the run was made
    assert tok.decode(tok.encode("a tiny run")) == "a tiny run"
