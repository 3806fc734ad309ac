"""The run directory's files: one set of names, readers that say which file is bad."""

from __future__ import annotations

import math
import tomllib

import pytest

from dpls.runs.layout import (
    dumps_toml,
    find_run_config,
    is_run_dir,
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


def test_metrics_skip_a_torn_line_and_truncate_after_a_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "nowhere") == []
