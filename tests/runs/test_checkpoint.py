"""Checkpoints: exact round trip, atomic saving, never picking a half checkpoint, pruning, load_model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import dpls
from dpls.model import Transformer, model_config
from dpls.runs.checkpoint import (
    CheckpointError,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    remove_stale_tmp,
    save_checkpoint,
)
from dpls.train.config import TrainConfig
from dpls.train.optim import build_optimizer

MC = model_config("tiny", vocab_size=97, n_layer=2, n_embd=32, n_head=2, block_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: much faster on one thread


def _trained(seed: int = 0, steps: int = 2) -> tuple[Transformer, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Transformer(MC)
    opt = build_optimizer(
        model, learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device=torch.device("cpu")
    )
    for _ in range(steps):
        x = torch.randint(0, MC.vocab_size, (2, 16))
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run, step, model, opt, keep=0, **state):
    return save_checkpoint(
        run,
        step,
        model=model,
        optimizer=opt,
        trainer_state={"tokens": 10 * step, **state},
        config=TrainConfig(out_dir=str(run)),
        model_config=MC,
        keep=keep,
    )


def test_round_trip_is_exact(tmp_path):
    model, opt = _trained()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    path = _save(tmp_path, 2, model, opt, loader={"epoch": 0, "position": 4})
    expected_draws = (torch.rand(3), np.random.rand(2), random.random())

    fresh, fresh_opt = _trained(seed=1, steps=1)  # different weights and optimizer moments
    state = load_checkpoint(tmp_path, model=fresh, optimizer=fresh_opt)
    assert state["step"] == 2 and state["tokens"] == 20 and state["loader"] == {"epoch": 0, "position": 4}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for field in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][field]), torch.as_tensor(s2[k][field])), (k, field)
    # RNG states restored: the same draws as right after saving
    draws = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]
    assert path.name == checkpoint_name(2) == "step_0000002"


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    model, opt = _trained()
    good = _save(tmp_path, 1, model, opt)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    monkeypatch.setenv("DPLS_INJECT_ENOSPC_AT_STEP", "2")  # fails after the tensors are written
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, model, opt, keep=1)
    assert "step_0000001 is intact" in str(err.value) and "No space left" in str(err.value)
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]  # no leftovers
    restored, _ = _trained(seed=3)
    load_checkpoint(tmp_path, model=restored)
    assert not torch.equal(next(restored.parameters()), next(model.parameters()))


def test_half_written_checkpoints_are_never_latest(tmp_path):
    model, opt = _trained()
    good = _save(tmp_path, 5, model, opt)
    folder = tmp_path / "checkpoints"
    (folder / "step_0000009.tmp-1234").mkdir()  # a save killed before its rename
    incomplete = folder / "step_0000008"  # a real name without the files (cannot happen, but still)
    incomplete.mkdir()
    (incomplete / ".metadata").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == good
    assert remove_stale_tmp(tmp_path) == [folder / "step_0000009.tmp-1234"]
    assert latest_checkpoint(tmp_path) == good


def test_keep_prunes_oldest_only_after_the_new_one_is_complete(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    _save(tmp_path, 3, model, opt, keep=2)  # the same step again replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps everything
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step_0000002"]


def test_load_model_from_run_or_checkpoint(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 2, model, opt)
    x = torch.randint(0, MC.vocab_size, (2, 16))
    for where in (tmp_path, path):
        rng_before = capture_rng()["torch"]
        loaded = dpls.load_model(where)
        assert torch.equal(capture_rng()["torch"], rng_before)  # building it left the caller's RNG alone
        assert not loaded.training
        assert torch.equal(loaded(x), model.eval()(x))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_model(empty)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "__0_0.distcp").write_bytes((c / "__0_0.distcp").read_bytes()[:1000]), "EOFError"),
        (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp"),
        (lambda c: (c / ".metadata").write_bytes(b"garbage\n"), "damaged or incomplete"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 2'), "trainer_state.json is damaged"),
        (lambda c: (c / "model_config.json").write_text("xx"), "model_config.json is damaged"),
    ],
)
def test_damaged_checkpoint_is_a_value_error_naming_it(tmp_path, capfd, damage, message):
    """A truncated or garbled file is bad input (one line naming the checkpoint), not a reader traceback."""
    model, opt = _trained()
    path = _save(tmp_path, 2, model, opt)
    damage(path)
    with pytest.raises(ValueError, match=message) as err:
        dpls.load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert "Traceback" not in capfd.readouterr().err  # no fallback tracebacks logged on the way
