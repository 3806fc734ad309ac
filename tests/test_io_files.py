"""`dpls._io`: files recorded before they appear, paths the file system can hold, and the
errors of a write that ran out of room."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import dpls._io as io
from dpls._io import (
    check_output_dir,
    check_path,
    check_replaceable,
    is_owned,
    owned_output,
    unowned_files,
    write_failure,
    write_owned_text,
)

ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """A kill -9 at one instant of a write (nothing after it runs, cleanup aside)."""


def _writes(monkeypatch, kill_at: int | None) -> list[str]:
    """Count `os.replace` calls (every step that makes a file appear or change under its name);
    with ``kill_at``, the process "dies" instead of making that one."""
    calls: list[str] = []
    real = os.replace

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append(Path(dst).name)
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    return calls


@pytest.mark.parametrize("existed", [False, True])
def test_a_kill_at_any_instant_leaves_no_file_of_dpls_unrecorded(tmp_path, monkeypatch, existed):
    """The rule behind "report folder holds val_ce.png, not written by dpls" after a kill: at
    every instant, the file under its name is absent or recorded as dpls's, so a rerun may
    replace it; the temporary a kill leaves is dpls's own bookkeeping."""
    target = tmp_path / "val_ce.png"
    if existed:
        write_owned_text(target, "old")
    calls = _writes(monkeypatch, None)
    write_owned_text(target.with_name("probe.png"), "x")  # how many renames one write takes
    steps = len(calls)
    monkeypatch.undo()
    assert steps >= 3
    for kill_at in range(1, steps + 1):
        _writes(monkeypatch, kill_at)
        with pytest.raises(Killed):
            write_owned_text(target, f"new {kill_at}")
        monkeypatch.undo()
        assert not target.exists() or is_owned(target), f"killed at rename {kill_at}: {target.read_text()}"
        check_replaceable(target)  # a rerun may write it
        assert not unowned_files(tmp_path), kill_at
    write_owned_text(target, "done")
    assert is_owned(target) and target.read_text() == "done"


def test_one_write_takes_the_steps_the_kill_test_covers(tmp_path, monkeypatch):
    calls = _writes(monkeypatch, None)
    write_owned_text(tmp_path / "a.md", "x")
    # record (old and new), rename onto the name, record (new): a kill between any two is safe
    assert calls[1] == "a.md" and len(calls) == 3


def test_a_temporary_left_by_a_kill_is_never_taken_for_the_users_file(tmp_path):
    (tmp_path / ".report.md.k3j2.dpls-tmp").write_text("half")
    (tmp_path / "notes.txt").write_text("mine")
    assert [p.name for p in unowned_files(tmp_path)] == ["notes.txt"]
    check_output_dir(tmp_path, ["report.md"])


def test_an_error_while_writing_leaves_the_file_as_it_was(tmp_path):
    target = tmp_path / "m.json"
    write_owned_text(target, "old")
    with pytest.raises(RuntimeError), owned_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the plot failed")
    assert target.read_text() == "old" and is_owned(target) and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda base: base / ("x" * 300),
            r"the name 'xxx.*' is 300 bytes long; a file or folder name may be at most",
        ),
        (lambda base: base / ("é" * 150) / "m.json", r"is 300 bytes long"),  # bytes, not characters
        (lambda base: base.joinpath(*["y" * 200] * 25), r"the path .* is \d+ bytes long \(from the root\)"),
    ],
)
def test_a_path_the_file_system_cannot_hold_is_one_line_before_any_work(tmp_path, make, match):
    path = make(tmp_path)
    for check in (check_path, check_replaceable, check_output_dir, io.check_writable_dir):
        with pytest.raises(ValueError, match=match):
            check(path, "--out") if check is not check_output_dir else check(path, ["a"], "--out")
    with pytest.raises(ValueError, match=match), io.exclusive_lock(path, "run"):
        pass
    assert list(tmp_path.iterdir()) == []  # nothing created on the way
    assert check_path(tmp_path / ("x" * 255)) == tmp_path / ("x" * 255)


def test_path_error_turns_enametoolong_into_the_same_line(tmp_path):
    long = str(tmp_path / ("x" * 300))
    with pytest.raises(OSError) as caught:
        os.stat(long)
    assert "is 300 bytes long" in io.path_error(caught.value)
    assert io.path_error(FileNotFoundError(errno.ENOENT, "gone", long)) is None


class _DcpLike(BaseException):
    """torch.distributed.checkpoint.CheckpointException: a BaseException with per-rank failures."""

    def __init__(self, err: BaseException) -> None:
        super().__init__("CheckpointException ranks:dict_keys([0])")
        self.failures = {0: (err, "traceback")}


@pytest.mark.parametrize(
    "err, says",
    [
        (
            OSError(errno.EFBIG, "File too large", "run/metrics.jsonl"),
            "size limit of this process (ulimit -f)",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
        (
            _DcpLike(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")),
            "full or",
        ),
        (RuntimeError("wrapped"), None),
        (OSError(errno.EACCES, "Permission denied"), None),
    ],
)
def test_a_write_that_ran_out_of_room_is_named_whatever_wraps_it(err, says):
    found = write_failure(err)
    assert (
        found is None if says is None else (found.startswith("a file could not be written") and says in found)
    )
