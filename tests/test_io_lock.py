"""One writer per folder: `dpls._io.exclusive_lock`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpls._io import LOCK_FILE, FolderInUse, check_output_dir, exclusive_lock

_HOLD = """
import sys, time
from dpls._io import exclusive_lock
with exclusive_lock(sys.argv[1], "run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        refused = pytest.raises(FolderInUse, match=rf"run {folder} is being written by .* \(pid {proc.pid}\)")
        with refused, exclusive_lock(folder, "run"):
            pytest.fail("the lock was taken twice")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with exclusive_lock(folder, "run"):  # the OS released the dead holder's lock
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_one_process_cannot_hold_a_folder_twice_and_the_lock_is_released_after(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    with exclusive_lock(folder, "study"), pytest.raises(FolderInUse, match="study"), exclusive_lock(folder):
        pass
    with exclusive_lock(folder, "study"):
        pass
    assert folder.is_dir()  # it existed before: left in place


def test_a_folder_created_for_the_lock_goes_again_when_nothing_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with pytest.raises(ValueError, match="bad input"), exclusive_lock(folder):
        assert folder.is_dir()
        raise ValueError("bad input")
    assert not folder.exists()
    with exclusive_lock(folder):
        (folder / "config.toml").write_text("x = 1\n")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "config.toml"]


def test_the_lock_file_is_never_taken_for_a_users_file(tmp_path: Path) -> None:
    with exclusive_lock(tmp_path / "out"):
        (tmp_path / "out" / "a.json").write_text("{}")
    assert (tmp_path / "out" / LOCK_FILE).is_file()
    (tmp_path / "out" / "a.json").unlink()
    assert check_output_dir(tmp_path / "out", [LOCK_FILE, "a.json"]) == tmp_path / "out"


def test_waiting_for_a_removed_lock_file_retries(tmp_path: Path) -> None:
    """A holder that removes its freshly created folder on exit leaves nothing a later writer trips on."""
    folder = tmp_path / "gone"
    for _ in range(3):
        with exclusive_lock(folder):
            pass
        assert not folder.exists()
    t0 = time.monotonic()
    with exclusive_lock(folder):
        assert time.monotonic() - t0 < 5
