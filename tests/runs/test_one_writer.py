"""One writer per run, any number of readers: the run's write lock (`run_writer`, rank 0 only
under torchrun) and the hold a reader keeps on the checkpoint it reads (`reading_checkpoint`),
which a run still training never prunes from under it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpls._io import LOCK_FILE, FolderInUse, exclusive_lock
from dpls.runs import checkpoint as ckpt
from dpls.runs.layout import run_writer


def _checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint as far as finding one goes (the files every reader looks for)."""
    folder = run / "checkpoints" / ckpt.checkpoint_name(step)
    folder.mkdir(parents=True)
    for name in (".metadata", ckpt.MODEL_CONFIG, "config.toml"):
        (folder / name).write_text("{}")
    (folder / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step}))
    return folder


def test_a_checkpoint_being_read_is_pruned_only_by_a_later_save(tmp_path):
    first, second = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    with ckpt.reading_checkpoint(first) as held:
        assert held == first
        assert ckpt.prune_checkpoints(tmp_path, keep=1) == []  # a reader holds it: left for later
        assert first.is_dir() and ckpt.is_complete(first)
    assert ckpt.prune_checkpoints(tmp_path, keep=1) == [first]
    assert ckpt.list_checkpoints(tmp_path) == [second]


def test_a_reader_whose_checkpoint_is_pruned_under_it_reads_the_newest_or_says_so(tmp_path, monkeypatch):
    """Between finding a run's newest checkpoint and holding it, a running train may save a newer
    one and prune it: a run directory is then read at its next newest; a checkpoint named
    explicitly is a one-line error that says what happened."""
    old, real_hold = _checkpoint(tmp_path, 1), ckpt._hold
    pruned = []

    def prune_first(folder, *, exclusive):  # the trainer saves step 2 and prunes step 1 right now
        if not pruned:
            pruned.append(folder)
            _checkpoint(tmp_path, 2)
            shutil.rmtree(folder)
        return real_hold(folder, exclusive=exclusive)

    monkeypatch.setattr(ckpt, "_hold", prune_first)
    with ckpt.reading_checkpoint(tmp_path) as held:
        assert pruned == [old] and held.name == "step_0000002"
    pruned.clear()
    shutil.rmtree(tmp_path / "checkpoints")
    named = _checkpoint(tmp_path, 3)
    with (
        pytest.raises(
            ValueError, match=r"step_0000003 was removed while it was being read .*keep_checkpoints"
        ),
        ckpt.reading_checkpoint(named),
    ):
        pytest.fail("a pruned checkpoint was read")


def test_a_checkpoint_named_after_it_was_pruned_points_at_the_runs_newest(tmp_path):
    _checkpoint(tmp_path, 5)
    with pytest.raises(
        ValueError, match=r"not found: .*step_0000001 \(its run's newest checkpoint is step_0000005"
    ):
        ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "step_0000001")


class _Rank(SimpleNamespace):
    """What `run_writer` needs of a DistContext: rank 0 says, every rank hears."""

    def broadcast_object(self, obj):
        return self.rank0_says if not self.is_main else obj


def test_under_torchrun_rank_0_alone_takes_the_lock_and_every_rank_hears_the_refusal(tmp_path):
    run = tmp_path / "run"
    with exclusive_lock(run, "run"):  # another job writes the run
        rank0 = _Rank(world_size=2, is_main=True)
        with pytest.raises(FolderInUse, match=rf"pid {os.getpid()}"), run_writer(run, rank0):
            pytest.fail("rank 0 took a held lock")
        refused = f"run {run} is being written by another dpls process (pid 123); wait ..."
        with (
            pytest.raises(FolderInUse, match="pid 123"),
            run_writer(run, _Rank(world_size=2, is_main=False, rank0_says=("FolderInUse", refused))),
        ):
            pytest.fail("rank 1 went on after rank 0 was refused")
        with run_writer(run, _Rank(world_size=2, is_main=False, rank0_says=None)):
            pass  # rank 1 never touches the lock itself (it would have been refused here)
    with run_writer(run, _Rank(world_size=2, is_main=True)):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
