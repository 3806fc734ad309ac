"""`dpls train` checks everything before any work: an earlier run's files, lying metadata,
another tokenizer, unreadable folders, memory that cannot fit; a one-line exit-2 error and
nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_text_data, train_tiny_run, write_data_dir
from dpls.cli import main
from dpls.train.config import load_config
from dpls.train.plan import plan_run

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "model": "tiny",
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "block_size": 32,
    "batch_size": 2,
    "max_iters": 4,
    "warmup_iters": 1,
    "eval_tokens": 64,
    "device": "cpu",
    "dtype": "float32",
    "progress": False,
}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plan")
    data = make_text_data(root / "data")
    return data, train_tiny_run(data, root / "run", steps=2)


def fails(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def argv(**values: object) -> list[str]:
    return [f"--{k}={v}" for k, v in {**SMALL, **values}.items()]


def test_never_replaces_an_earlier_runs_metrics(made, tmp_path, capsys):
    data, _ = made
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "config.toml").write_text("# my notes\nlr = 1\n")
    assert "metrics.jsonl" in fails(capsys, *argv(data_dir=data, out_dir=out))
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert (out / "config.toml").read_text() == "# my notes\nlr = 1\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "metrics.jsonl"]


def test_the_same_run_stopped_before_a_checkpoint_starts_over(made, tmp_path):
    data, _ = made
    run = train_tiny_run(data, tmp_path / "r", steps=2)
    shutil.rmtree(run / "checkpoints")  # as if it died before its first checkpoint
    train_tiny_run(data, run, steps=2)  # the same command again: allowed
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="another run"):
        plan_run(load_config(overrides=[*argv(data_dir=data, out_dir=run)]))  # another config: refused


def test_token_ids_beyond_the_vocabulary_are_refused_before_writing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, 4000)
    write_data_dir(tmp_path / "lying", [tokens], [tokens[:1000]], vocab_size=100)  # meta says 100
    out = tmp_path / "out"
    err = fails(capsys, *argv(data_dir=tmp_path / "lying", out_dir=out))
    assert "token id 199" in err and "vocab_size 100" in err
    assert not out.exists()


def _other_tokenizer_data(other: Path) -> Path:
    """Data of another, smaller BPE (its ids fit any model trained on the text data)."""
    from dpls.data.tokenizer import train_bpe

    tok = train_bpe(["completely different words here, zebra quartz"] * 30, vocab_size=280)
    ids = np.array([t for _ in range(200) for t in [tok.eot, *tok.encode("zebra quartz words")]])
    write_data_dir(other, [ids], [ids[:400]], vocab_size=tok.vocab_size)
    tok.save(other / "tokenizer.json")
    return other


def test_another_tokenizer_of_a_smaller_vocabulary_is_refused(made, tmp_path, capsys):
    data, run = made
    other = _other_tokenizer_data(tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    assert meta["vocab_size"] <= json.loads((data / "meta.json").read_text())["vocab_size"]
    err = fails(
        capsys,
        f"--resume_dir={run}",
        f"--out_dir={tmp_path / 'fork'}",
        f"--data_dir={other}",
        "--max_iters=4",
    )
    assert "another tokenizer" in err
    assert not (tmp_path / "fork").exists()
    # and dpls eval --data-dir, export-hf's tokenizer: the same rule
    capsys.readouterr()
    assert (
        main(["eval", str(run), f"--data-dir={other}", "--device=cpu", f"--out={tmp_path / 'e.json'}"]) == 2
    )
    assert "another tokenizer" in capsys.readouterr().err


def test_memory_that_cannot_fit_is_refused_with_numbers(made, tmp_path, capsys):
    data, _ = made
    err = fails(capsys, *argv(data_dir=data, out_dir=tmp_path / "big", block_size=100_000, n_layer=4))
    assert "GiB" in err and "activations" in err and "block_size" in err
    assert not (tmp_path / "big").exists()


def test_warmup_longer_than_the_run_is_a_warning(made, tmp_path):
    data, _ = made
    plan = plan_run(load_config(overrides=argv(data_dir=data, out_dir=tmp_path / "w", warmup_iters=10)))
    assert any("warmup_iters=10 exceeds max_iters=4" in n for n in plan.notes)


def test_resume_from_another_folder_finds_the_relative_data_dir(made, tmp_path, monkeypatch):
    data, _ = made
    home = tmp_path / "project"
    home.mkdir()
    shutil.copytree(data, home / "data")
    monkeypatch.chdir(home)
    train_tiny_run(Path("data"), Path("runs/ce"), steps=2)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["--resume_dir=project/runs/ce", "--max_iters=3"])
    assert Path(cfg.data_dir) == home / "data"
    plan = plan_run(cfg)
    assert plan.start.mode == "resume" and plan.loader.state_dict() == plan.start.trainer_state["loader"]


def test_unreadable_data_dir_is_a_clear_error(made, tmp_path, monkeypatch):
    data, _ = made
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == data else real(p, mode))
    with pytest.raises(ValueError, match="no permission to read"):
        plan_run(load_config(overrides=argv(data_dir=data, out_dir=tmp_path / "x")))


def test_export_refuses_a_data_dir_prepared_again_with_another_tokenizer(made, tmp_path, capsys):
    data, run = made
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(copy / "tokenizer")  # an older run: the export falls back on its data_dir
    other = _other_tokenizer_data(tmp_path / "other")
    for cfg in [copy / "config.toml", *copy.glob("checkpoints/*/config.toml")]:
        cfg.write_text(cfg.read_text().replace(str(data), str(other)))
    capsys.readouterr()
    assert main(["export-hf", str(copy), str(tmp_path / "hf")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_memory_estimate_counts_parameters_activations_and_logits():
    import torch

    from dpls.model import Transformer, model_config
    from dpls.train.config import ResolvedConfig
    from dpls.train.memory import estimate_bytes

    mc = model_config("tiny", vocab_size=300, n_layer=2, n_embd=32, n_head=2, block_size=64)
    cfg = ResolvedConfig(batch_size=4, block_size=64, data_seed=0, dtype="float32")
    parts = estimate_bytes(cfg, mc, torch.device("cpu"))
    assert parts["parameters and AdamW"] == 16 * sum(p.numel() for p in Transformer(mc).parameters())
    assert parts["logits"] == 3 * 4 * 64 * 300 * 4
    per_layer = 34 * 64 * 32 + 5 * 2 * 64 * 64
    assert parts["activations"] == 2 * 4 * per_layer * 4
    # checkpointed blocks keep their input only, and one block is recomputed at a time
    full = estimate_bytes(dataclasses.replace(cfg, activation_checkpointing="full"), mc, torch.device("cpu"))
    assert full["activations"] == 4 * (2 * 64 * 32 + per_layer) * 4
    selective = estimate_bytes(
        dataclasses.replace(cfg, activation_checkpointing="selective"), mc, torch.device("cpu")
    )
    assert selective["activations"] == 4 * (per_layer + 64 * 32 + per_layer) * 4
    fused = estimate_bytes(
        ResolvedConfig(batch_size=4, block_size=64, data_seed=0, fused_linear_loss=True),
        mc,
        torch.device("cpu"),
    )
    assert fused["logits"] == 0


def test_a_fork_is_planned_from_one_read_of_each_checkpoint_file_and_built_once(made, tmp_path, monkeypatch):
    """plan_run reads the checkpoint's trainer state and config once, and the objective and the
    data streams it builds to check them are the ones the trainer uses (`build` makes no others)."""
    from collections import Counter

    import dpls.runs.checkpoint as ckpt
    import dpls.train.config as config_module
    import dpls.train.plan as plan_module
    from dpls.distributed import DistContext
    from dpls.train.config import MODEL_OVERRIDE_KEYS, ResolvedConfig
    from dpls.train.trainer import build

    _, run = made
    fork = [f"--resume_dir={run}", f"--out_dir={tmp_path / 'fork'}", "--loss=dpls", "--max_iters=4"]
    cfg = load_config(overrides=fork)
    calls: Counter[str] = Counter()

    def counted(module, name):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    counted(ckpt, "read_trainer_state")  # the checkpoint's trainer_state.json
    counted(config_module, "read_config_file")  # its config.toml
    counted(plan_module, "TokenLoader")
    counted(plan_module, "validation_batches")
    counted(plan_module, "build_objective")
    plan = plan_run(cfg)
    parts = build(plan, DistContext())
    assert calls == {n: 1 for n in calls} and len(calls) == 5, calls
    assert parts.wrapped.objective is plan.objective
    # the resolved config: frozen, every model key the model's, block_size and data_seed set
    assert isinstance(plan.cfg, ResolvedConfig) and plan.start.mode == "fork"
    assert {k: getattr(plan.cfg, k) for k in MODEL_OVERRIDE_KEYS} == {
        k: getattr(plan.model_config, k) for k in MODEL_OVERRIDE_KEYS
    }
    assert plan.cfg.block_size == plan.start.saved_config.block_size and plan.cfg.data_seed == plan.cfg.seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cfg.block_size = 8  # type: ignore[misc]
