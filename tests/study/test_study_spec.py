"""STUDY.toml parsing: the typed spec, and a clear error naming the closest key for every mistake."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dpls.study.spec import LOSS_KEYS, load_spec, parse_spec

# A stand-in for TrainConfig's fields, so these tests do not depend on the trainer.
KEYS = frozenset(
    {
        *LOSS_KEYS,
        "model",
        "batch_size",
        "block_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "warmup_iters",
        "lr_decay_iters",
        "max_iters",
        "out_dir",
        "data_dir",
        "resume_dir",
        "seed",
        "eval_interval",
    }
)

BASE = {
    "name": "t",
    "out_dir": "runs/t",
    "prepare": "stdlib",
    "fork_step": 10,
    "seeds": 2,
    "iters_per_arm": 5,
    "train": {"model": "tiny", "batch_size": 4},
    "trunk": {"warmup_iters": 2},
    "arms": [
        {"name": "ce", "loss": "ce"},
        {"name": "dpls", "loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 10},
    ],
    "eval": {"tokens": 1000, "lm_eval_tasks": ["hellaswag"], "lm_eval_limit": 10},
}


def parse(**changes):
    data = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return parse_spec(data, train_keys=KEYS)


def test_parses_into_typed_spec():
    spec = parse()
    assert spec.name == "t" and spec.out_dir == Path("runs/t")
    assert spec.seeds == (0, 1)
    assert spec.fork_step == 10 and spec.iters_per_arm == 5 and spec.tokens_per_arm is None
    assert [a.name for a in spec.arms] == ["ce", "dpls"]
    assert spec.arm("dpls").loss == {"loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 10}
    assert spec.baseline == "ce"
    assert spec.train == {"model": "tiny", "batch_size": 4}
    assert spec.trunk.train == {"warmup_iters": 2} and spec.trunk.checkpoint is None
    assert (
        spec.eval.tokens == 1000
        and spec.eval.lm_eval_tasks == ("hellaswag",)
        and spec.eval.lm_eval_limit == 10
    )
    assert parse(seeds=[3, 7]).seeds == (3, 7)
    assert parse(baseline="dpls").baseline == "dpls"


def test_baseline_defaults_to_first_ce_arm():
    arms = [{"name": "ls", "loss": "ls", "label_smoothing": 0.1}, {"name": "plain", "loss": "ce"}]
    assert parse(arms=arms).baseline == "plain"
    assert parse(arms=arms[:1]).baseline == "ls"


def test_existing_checkpoint_trunk():
    spec = parse(trunk={"checkpoint": "runs/ce/checkpoints/step_0000100"}, fork_step=None)
    assert spec.trunk.checkpoint == Path("runs/ce/checkpoints/step_0000100") and spec.fork_step is None
    with pytest.raises(ValueError, match="takes no training keys"):
        parse(trunk={"checkpoint": "x", "warmup_iters": 3})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fork_stpe": 3}, "unknown key 'fork_stpe' in the study file; did you mean 'fork_step'"),
        (
            {"train": {"learning_rat": 1e-3}},
            "unknown key 'learning_rat' in \\[train\\]; did you mean 'learning_rate'",
        ),
        (
            {"trunk": {"warmup_iter": 3}},
            "unknown key 'warmup_iter' in \\[trunk\\]; did you mean 'warmup_iters'",
        ),
        (
            {"arms": [{"name": "d", "loss": "dpls", "dpls_epsilo": 0.1}]},
            "unknown key 'dpls_epsilo' in \\[\\[arms\\]\\] 'd'.*did you mean 'dpls_epsilon'",
        ),
        (
            {"arms": [{"name": "d", "loss": "dpls", "learning_rate": 0.1}]},
            "shared training keys go in \\[train\\]",
        ),
        ({"eval": {"tokns": 5}}, "unknown key 'tokns' in \\[eval\\]; did you mean 'tokens'"),
        ({"train": {"max_iters": 5}}, "'max_iters' is not allowed in \\[train\\]: set fork_step"),
        ({"train": {"out_dir": "x"}}, "'out_dir' is not allowed"),
        ({"train": {"loss": "dpls"}}, "loss key 'loss' is not allowed in \\[train\\]"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"seeds": None}, "seeds is required"),
        ({"iters_per_arm": None}, "exactly one of tokens_per_arm and iters_per_arm"),
        ({"tokens_per_arm": 100}, "exactly one of tokens_per_arm and iters_per_arm"),
        ({"fork_step": None}, "fork_step"),
        ({"fork_step": 0}, "fork_step must be an integer >= 1"),
        ({"prepare": None}, "needs data"),
        ({"prepare": "fineweb"}, "prepare \\(or \\[prepare\\] source\\) must be one of"),
        ({"arms": []}, "at least one \\[\\[arms\\]\\]"),
        ({"arms": [{"name": "a b", "loss": "ce"}]}, "needs a name"),
        ({"arms": [{"name": "a"}]}, "needs a 'loss' key"),
        ({"arms": [{"name": "a", "loss": "ce"}, {"name": "a", "loss": "ls"}]}, "unique; repeated: \\['a'\\]"),
        ({"baseline": "cee"}, "baseline 'cee' is not an arm; did you mean 'ce'"),
        ({"eval": {"lm_eval_limit": -1}}, "lm_eval_limit must be a positive number"),
        ({"name": "has space"}, "name must be"),
        # TOML values have types: a quoted number is a typo, not a number
        ({"train": {"learning_rate": "1e-2"}}, r"\[train\]: learning_rate must be .*got the string '1e-2'"),
        (
            {"arms": [{"name": "d", "loss": "dpls", "dpls_epsilon": "0.1"}]},
            r"\[\[arms\]\] 'd': dpls_epsilon .*string",
        ),
        ({"seeds": [0, 2**64]}, r"each seed must be an integer in \[0, 2\*\*64 - 1\]"),
    ],
)
def test_errors_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        parse(**changes)


def test_load_spec_file_and_overrides(tmp_path: Path, monkeypatch):
    import dpls.study.spec as spec_mod

    monkeypatch.setattr(spec_mod, "train_config_keys", lambda: KEYS)
    path = tmp_path / "s.toml"
    path.write_text(
        """
name = "file"
prepare = "stdlib"
fork_step = 4
seeds = [0]
tokens_per_arm = 1_000
[[arms]]
name = "ce"
loss = "ce"
"""
    )
    spec = load_spec(path)
    assert spec.source == path and spec.out_dir == Path("runs/study_file") and spec.tokens_per_arm == 1000
    assert load_spec(path, out_dir=tmp_path / "o").out_dir == tmp_path / "o"
    path.write_text("name = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_spec(path)
    with pytest.raises(ValueError, match="study file not found"):
        load_spec(tmp_path / "nope.toml")


STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_parse_and_plan(path: Path, tmp_path: Path):
    from dpls.study.plan import plan_study

    spec = load_spec(path, out_dir=tmp_path / "study")
    plan = plan_study(spec)  # every training key checked against TrainConfig, nothing written
    assert plan.arms and spec.baseline in {a.name for a in spec.arms}
    assert not (tmp_path / "study").exists()


def test_demo_command_runs_the_shipped_demo_study(tmp_path: Path):
    from dpls.cli.demo import demo_study

    shipped = load_spec(Path(__file__).resolve().parents[2] / "studies" / "demo.toml", out_dir=tmp_path)
    built_in = parse_spec(demo_study(tmp_path))
    assert shipped.train == built_in.train and shipped.arms == built_in.arms
    assert shipped.eval == built_in.eval and shipped.seeds == built_in.seeds
    assert (shipped.fork_step, shipped.iters_per_arm) == (built_in.fork_step, built_in.iters_per_arm)
    assert (shipped.prepare, shipped.prepare_options) == (built_in.prepare, built_in.prepare_options)
