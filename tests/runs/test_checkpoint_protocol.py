"""The checkpoint save protocol is safe at every point: a crash after each filesystem step,
then recovery, leaves the newest complete checkpoint in use and deletes nothing complete."""

from __future__ import annotations

import warnings

import pytest
import torch

import dpls.runs.checkpoint as ckpt
from dpls.model import Transformer, model_config
from dpls.train.config import TrainConfig

MC = model_config("tiny", vocab_size=31, n_layer=1, n_embd=16, n_head=2, block_size=8)

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(BaseException):
    """A kill -9: nothing after it runs, no cleanup (``except Exception`` does not catch it)."""


def _model(value: float) -> Transformer:
    model = Transformer(MC)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _save(run, step, value, keep=0):
    return ckpt.save_checkpoint(
        run,
        step,
        model=_model(value),
        optimizer=None,
        trainer_state={"tokens": step},
        config=TrainConfig(out_dir=str(run)),
        model_config=MC,
        keep=keep,
    )


def _weight(path) -> float:
    return float(next(ckpt.load_model(path).parameters()).detach().flatten()[0])


# (event the crash follows, the save that reaches it, expected steps after recovery,
#  the value the newest checkpoint holds after recovery)
CASES = {
    "written": ((2, 9.0, 0), [1, 2], 2.0),  # same step saved again; tmp complete, not committed
    "displaced": ((2, 9.0, 0), [1, 2], 2.0),  # committed copy moved aside, new one not in place
    "renamed": ((2, 9.0, 0), [1, 2], 9.0),  # new copy in place, the moved-aside one not deleted
    "cleaned": ((2, 9.0, 0), [1, 2], 9.0),
    "trashed": ((3, 3.0, 2), [2, 3], 3.0),  # pruning: step 1 renamed out, not yet deleted
    "pruned": ((3, 3.0, 2), [2, 3], 3.0),
}


@pytest.mark.parametrize("event", list(CASES))
def test_crash_after_each_step_then_recover(tmp_path, monkeypatch, event):
    (step, value, keep), steps_after, newest_value = CASES[event]
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)

    def crash(name, path):
        if name == event:
            raise Crash(name)

    monkeypatch.setattr(ckpt, "_event", crash)
    with pytest.raises(Crash):
        _save(tmp_path, step, value, keep=keep)
    monkeypatch.undo()

    # Before recovery, readers (which write nothing) already see the newest complete copy.
    newest = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.checkpoint_step(newest) == steps_after[-1]
    assert _weight(newest) == newest_value

    ckpt.recover_checkpoints(tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [ckpt.checkpoint_name(s) for s in steps_after]  # no .tmp/.old/.trash left
    assert all(ckpt.is_complete(tmp_path / "checkpoints" / n) for n in names)
    assert _weight(tmp_path) == newest_value
    if event in ("written", "displaced", "renamed", "cleaned"):
        assert _weight(tmp_path / "checkpoints" / "step_0000001") == 1.0  # untouched
    # and the run goes on: the next save works over the recovered folder
    _save(tmp_path, 4, 4.0, keep=2)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [steps_after[-1], 4]


def test_recovery_never_deletes_the_only_complete_copy(tmp_path):
    """The state from the report: step_N.old-* and step_N.tmp-* beside an older step_M."""
    _save(tmp_path, 1, 1.0)
    two = _save(tmp_path, 2, 2.0)
    folder = tmp_path / "checkpoints"
    two.rename(folder / "step_0000002.old-77")
    _save(tmp_path, 9, 9.0).rename(folder / "step_0000002.tmp-78")
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path)) == 2
    ckpt.recover_checkpoints(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000001", "step_0000002"]
    assert _weight(tmp_path) == 2.0


def test_an_incomplete_newer_checkpoint_is_named_not_skipped_silently(tmp_path):
    _save(tmp_path, 1, 1.0)
    two = _save(tmp_path, 2, 2.0)
    (two / ".metadata").unlink()
    with pytest.warns(UserWarning, match=r"step_0000002 is incomplete \(missing \.metadata\).*step_0000001"):
        assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000001"


def test_a_damaged_checkpoint_names_the_file_and_the_way_out(tmp_path):
    _save(tmp_path, 1, 1.0)
    two = _save(tmp_path, 2, 2.0)
    rng = next(two.glob("rng_rank*.pt"))
    rng.write_bytes(rng.read_bytes()[:20])
    with pytest.raises(ValueError) as err, warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_checkpoint(two, model=_model(0.0))
    text = str(err.value)
    assert str(rng) in text and "no detail" not in text and "\n" not in text
    assert "step_0000001" in text and f"dpls train --resume_dir={tmp_path}" in text
    (two / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"trainer_state\.json is damaged.*--resume_dir"):
        ckpt.read_trainer_state(two)


def test_a_failed_rename_puts_the_committed_copy_back(tmp_path, monkeypatch):
    _save(tmp_path, 2, 2.0)
    real = ckpt.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(ckpt.CheckpointError, match="step_0000002 is intact"):
        _save(tmp_path, 2, 9.0)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    assert _weight(tmp_path) == 2.0
