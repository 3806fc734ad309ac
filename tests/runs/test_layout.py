"""The run directory's files: one set of names, readers that say which file is bad."""

from __future__ import annotations

import math
import tomllib

import pytest

from dpls.runs.layout import (
    dumps_toml,
    find_run_config,
    is_run_dir,
    read_diverged,
    read_metrics,
    read_run_config,
    read_toml,
    run_dir_of,
    truncate_metrics,
)


def test_run_and_checkpoint_dirs_find_the_run_config(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    assert not is_run_dir(run)
    with pytest.raises(ValueError, match=r"no config\.toml"):
        find_run_config(step)
    (run / "config.toml").write_text('data_dir = "d"\nblock_size = 64\n')
    assert is_run_dir(run)
    assert find_run_config(step) == run / "config.toml"  # a checkpoint without its own: the run's
    (step / "config.toml").write_text("block_size = 32\n")
    assert read_run_config(step) == {"block_size": 32}  # a checkpoint's own config comes first
    assert read_run_config(run) == {"data_dir": "d", "block_size": 64}
    assert run_dir_of(step) == run and run_dir_of(run) == run


def test_read_toml_names_the_bad_file(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = \n")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid TOML"):
        read_toml(bad)
    bad.write_bytes(b"\xff\xfea = 1\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_toml(bad)


def test_dumps_toml_round_trips_scalars_and_skips_none():
    values = {"a": 1, "b": 0.1, "c": 'x"y\x7f', "d": True, "e": None, "f": math.inf}
    back = tomllib.loads(dumps_toml(values, header="written by a test"))
    assert back == {"a": 1, "b": 0.1, "c": 'x"y\x7f', "d": True, "f": math.inf}
    with pytest.raises(ValueError, match="bare TOML key"):
        dumps_toml({"a b": 1})


def test_metrics_truncate_after_a_step_and_cut_a_torn_last_line_with_a_warning(tmp_path):
    """Resuming (allow_torn_tail): a last line cut by a crash mid-write is expected; it is cut
    with a warning naming the file."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: the last line was cut off"):
        assert [r["step"] for r in read_metrics(tmp_path, allow_torn_tail=True)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="cut off"):
        truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    "text, allow_torn_tail, match",
    [
        ('{"step": 1}\n{"step": 2, "val_ce": 6.9', False, "line 2 of 2 is cut off"),  # a finished run: never
        ('{"step": 1}\ngarbage\n{"step": 3}\n', False, "line 2 of 3 is not a JSON object"),
        ('{"step": 1}\ngarbage\n{"step": 3}\n', True, "line 2 of 3 is not a JSON object"),  # resume: not torn
        ('{"step": 1}\n[1, 2]\n', True, "line 2 of 2 is not a JSON object"),
        ('{"step": 1}\n{"step": 2}garbage\n', True, "line 2 of 2 is not a JSON object"),  # has its newline
    ],
)
def test_a_metrics_file_that_cannot_be_read_whole_is_an_error_naming_it(
    tmp_path, text, allow_torn_tail, match
):
    """A report never takes an earlier row for the last one: every damaged line is an error that
    names the file and the line; only resuming may cut a torn last line."""
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metrics.jsonl'}: {match}"):
        read_metrics(tmp_path, allow_torn_tail=allow_torn_tail)


def test_other_run_files_that_cannot_be_read_are_errors_naming_them(tmp_path):
    (tmp_path / "diverged.json").write_text('{"step": 3, "rea')
    with pytest.raises(ValueError, match=r"cannot read .*diverged.json.*damaged"):
        read_diverged(tmp_path)
