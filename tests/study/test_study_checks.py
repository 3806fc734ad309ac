"""A study checks every arm before any work (in --dry-run and in the real run), and names what
the user changed when a finished study no longer matches its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_helpers import write_data_dir
from dpls.study.checks import check_run_on_disk
from dpls.study.plan import StudyPlan, StudyRun, plan_study
from dpls.study.spec import parse_spec


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_data_dir(root, [np.arange(2000) % 500], [np.arange(300) % 500], vocab_size=512, tokenizer="gpt2")
    return root


def spec(tmp_path: Path, data: Path, arms: list[dict], **train) -> dict:
    return {
        "name": "t",
        "out_dir": str(tmp_path / "study"),
        "data_dir": str(data),
        "fork_step": 4,
        "seeds": [0],
        "iters_per_arm": 2,
        "train": {
            "model": "tiny",
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 16,
            "batch_size": 2,
            **train,
        },
        "arms": arms,
    }


@pytest.mark.parametrize(
    "arm, message",
    [
        ({"name": "f", "loss": "focal"}, "arm f/seed0: .*focal"),
        ({"name": "k0", "loss": "dpls", "dpls_top_k": 0}, "arm k0/seed0: .*top_k"),
        ({"name": "big", "loss": "dpls", "dpls_top_k": 5000}, "arm big/seed0: .*top_k"),
    ],
)
def test_arm_loss_keys_are_checked_before_any_work(tmp_path, data, arm, message):
    with pytest.raises(ValueError, match=message):
        plan_study(parse_spec(spec(tmp_path, data, [{"name": "ce", "loss": "ce"}, arm])))
    assert not (tmp_path / "study").exists()


def test_data_too_small_for_a_batch_is_found_by_the_plan(tmp_path, data):
    with pytest.raises(ValueError, match=r"the trunk: .*windows"):
        plan_study(
            parse_spec(spec(tmp_path, data, [{"name": "ce", "loss": "ce"}], block_size=512, batch_size=8))
        )


def test_dry_run_refuses_what_the_real_run_would(tmp_path, data, capsys):
    from dpls.cli import main

    study = tmp_path / "s.toml"
    study.write_text(
        f'name = "t"\ndata_dir = "{data}"\nfork_step = 4\nseeds = [0]\niters_per_arm = 2\n'
        "[train]\nblock_size = 16\nbatch_size = 2\n"
        '[[arms]]\nname = "ce"\nloss = "ce"\n[[arms]]\nname = "f"\nloss = "focal"\n'
    )
    assert main(["study", str(study), "--dry-run"]) == 2
    assert "focal" in capsys.readouterr().err


def test_changed_fork_step_names_the_setting_not_a_derived_key(tmp_path, data):
    plan = plan_study(parse_spec(spec(tmp_path, data, [{"name": "ce", "loss": "ce"}])))
    trunk: StudyRun = plan.trunk
    trunk.run_dir.mkdir(parents=True)
    (trunk.run_dir / "config.toml").write_text("lr_decay_iters = 99\nmax_iters = 4\n")
    with pytest.raises(ValueError, match="derives from fork_step"):
        check_run_on_disk(trunk.run_dir, trunk.values, None, 0, None)
    assert isinstance(plan, StudyPlan)


def _run(root: Path, name: str, seed: int, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"seed": seed, "loss": "ce", "max_iters": 40, "data_dir": "data", **config}
    (run / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    rows = [
        {"step": s, "loss": 4.0 - 0.01 * s, "ce": 4.0 - 0.01 * s, "val_ce": 4.0 - 0.01 * s} for s in (10, 40)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_never_pools_what_is_not_seeds_of_one_experiment(tmp_path, capsys):
    from dpls.cli import main

    a, b = _run(tmp_path, "a", 1337), _run(tmp_path, "b", 1337)
    assert main(["compare", str(a), str(b), f"--out={tmp_path / 'r1'}"]) == 2
    assert "both seed 1337" in capsys.readouterr().err
    c = _run(tmp_path, "c", 1, max_iters=80)
    assert main(["compare", str(a), str(c), f"--out={tmp_path / 'r2'}"]) == 2
    assert "max_iters=40 vs 80" in capsys.readouterr().err
    d = _run(tmp_path, "d", 2, out_dir="elsewhere", device="cuda")  # where and how: poolable
    assert main(["compare", str(a), str(d), f"--out={tmp_path / 'r3'}"]) == 0


def test_a_users_file_in_the_report_folder_is_found_before_training(tmp_path, data):
    from dpls.study.runner import _initial_state
    from dpls.study.state import write_state

    plan = plan_study(parse_spec(spec(tmp_path, data, [{"name": "ce", "loss": "ce"}])))
    report = tmp_path / "study" / "report"
    report.mkdir(parents=True)
    write_state(tmp_path / "study", _initial_state(plan))  # the study's own folder
    (report / "report.md").write_text("my draft")
    with pytest.raises(ValueError, match=r"report\.md, not written by dpls"):
        plan_study(parse_spec(spec(tmp_path, data, [{"name": "ce", "loss": "ce"}])))
    assert (report / "report.md").read_text() == "my draft"


def test_out_must_be_new_empty_or_this_studys_own_folder(tmp_path, data, capsys):
    """`dpls study FILE --out DIR` refuses a folder holding anything but this study, before any work
    and in --dry-run too; an empty folder or the study's own is fine."""
    from dpls.cli import main
    from dpls.study.runner import _initial_state
    from dpls.study.state import write_state

    study = tmp_path / "sw.toml"
    study.write_text(
        f'name = "sw"\ndata_dir = "{data}"\nfork_step = 4\nseeds = [0]\niters_per_arm = 2\n'
        "[train]\nblock_size = 16\nbatch_size = 2\n"
        '[[arms]]\nname = "ce"\nloss = "ce"\n'
    )
    users = tmp_path / "ud"
    users.mkdir()
    (users / "study.toml").write_text("# my notes\n")
    for args in ([], ["--dry-run"]):
        assert main(["study", str(study), "--out", str(users), *args]) == 2
        assert "ud is not empty (study.toml) and holds no study" in capsys.readouterr().err
    assert (users / "study.toml").read_text() == "# my notes\n" and len(list(users.iterdir())) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["study", str(study), "--out", str(empty), "--dry-run"]) == 0
    # the folder of another study is not this one's
    other = plan_study(parse_spec({**spec(tmp_path, data, [{"name": "ce", "loss": "ce"}]), "name": "other"}))
    other.study_dir.mkdir()
    write_state(other.study_dir, _initial_state(other))
    assert main(["study", str(study), "--out", str(other.study_dir), "--dry-run"]) == 2
    assert "holds the study 'other', not 'sw'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sweep": {"model": ["tiny", "huge"]}}, r"arm ce/model_huge/seed0: .*huge"),
        ({"sweep": {"n_head": [3, 4]}, "train": {"n_embd": 64}}, r"arm ce/n_head_3/seed0: .*n_head"),
    ],
)
def test_dry_run_checks_every_runs_whole_configuration(tmp_path, data, changes, message):
    """Every run is planned as `dpls train` would plan it, before any work: a swept model preset
    that does not exist, a swept head count that does not divide the width."""
    study = spec(tmp_path, data, [{"name": "ce", "loss": "ce"}], **changes.pop("train", {}))
    study.pop("fork_step")
    for key in ("model", "n_head"):
        if key in changes.get("sweep", {}):
            study["train"].pop(key, None)
    with pytest.raises(ValueError, match=message):
        plan_study(parse_spec({**study, **changes}))
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_dry_run_checks_the_trunk_checkpoint_against_the_arms(tmp_path, data, one_thread):
    """A [trunk] checkpoint whose model is not [train]'s: refused when planning, not after a fork."""
    from dpls.train.config import load_config
    from dpls.train.trainer import train

    cfg = {"model": "tiny", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16, "batch_size": 2}
    run = train(
        load_config(
            overrides={
                **cfg,
                "data_dir": str(data),
                "out_dir": str(tmp_path / "ce"),
                "max_iters": 1,
                "eval_tokens": 64,
                "progress": False,
            }
        )
    )
    study = spec(tmp_path, data, [{"name": "dpls", "loss": "dpls", "dpls_top_k": 5}])
    study.pop("fork_step")
    study["trunk"] = {"checkpoint": str(run)}
    study["train"] = {**study["train"], "model": "small", "n_layer": None, "n_embd": None, "n_head": None}
    study["train"] = {k: v for k, v in study["train"].items() if v is not None}
    with pytest.raises(ValueError, match=r"arm dpls/seed0: model=small differs from the checkpoint's tiny"):
        plan_study(parse_spec(study))
