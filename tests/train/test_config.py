"""TrainConfig: TOML + overrides, typed conversion, closest-key errors, resume/fork merging."""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpls.cli import main
from dpls.runs.layout import dumps_toml
from dpls.train.config import (
    TrainConfig,
    convert,
    load_config,
    parse_overrides,
    read_config_file,
    write_config,
)


def test_every_spec_key_is_a_field():
    spec_keys = """loss dpls_epsilon dpls_top_k dpls_schedule dpls_start_step dpls_end_step dpls_epsilon_final
    dpls_epsilon_mode dpls_gamma label_smoothing confidence_penalty_beta z_loss loss_impl resume_dir out_dir
    data_dir batch_size block_size gradient_accumulation_steps max_iters learning_rate min_lr warmup_iters
    lr_decay_iters weight_decay beta1 beta2 grad_clip n_layer n_head n_kv_head n_embd attention compile dtype
    device seed data_seed eval_interval eval_iters eval_tokens log_interval checkpoint_interval keep_checkpoints
    model parallel max_skipped_steps progress tensorboard swanlab swanlab_project run_name fused_linear_loss"""
    assert set(spec_keys.split()) <= set(TrainConfig.key_names())


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('loss = "dpls"\nmax_iters = 100\nlearning_rate = 1e-3\ncompile = true\n')
    cfg = load_config(overrides=[str(path), "--max_iters=7", "--dpls_top_k", "5", "--progress"])
    assert cfg.loss == "dpls"  # from the file
    assert cfg.max_iters == 7  # the override wins
    assert cfg.dpls_top_k == 5  # "--key value" form
    assert cfg.learning_rate == 1e-3 and cfg.compile is True and cfg.progress is True
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("True", True), ("no", False)],
)
def test_bool_conversion(text, expected):
    assert convert("compile", text) is expected


def test_typed_conversion():
    assert convert("max_iters", "1_000") == 1000
    assert convert("max_iters", "1e4") == 10000
    assert convert("learning_rate", "6e-4") == pytest.approx(6e-4)
    assert convert("learning_rate", 3) == 3.0 and isinstance(convert("learning_rate", 3), float)
    assert convert("lr_decay_iters", "none") is None
    assert convert("n_layer", "null") is None
    _, values = parse_overrides(["--max-iters=3", "--fused_linear_loss"])  # dashes; bare bool flag
    assert values == {"max_iters": 3, "fused_linear_loss": True}


@pytest.mark.parametrize(
    ("key", "value", "type_name"),
    [
        ("max_iters", "ten", "an integer"),
        ("max_iters", "2.5", "an integer"),
        ("max_iters", True, "an integer"),
        ("learning_rate", "fast", "a number"),
        ("compile", "maybe", "a boolean"),
        ("max_iters", "none", "an integer"),  # not optional
        ("loss", 3, "a string"),
    ],
)
def test_wrong_type_names_key_and_type(key, value, type_name):
    with pytest.raises(ValueError) as err:
        convert(key, value)
    assert key in str(err.value) and type_name in str(err.value)


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ValueError, match="'max_iters'"):
        parse_overrides(["--max_iter=3"])
    with pytest.raises(ValueError, match="'dpls_epsilon'"):
        load_config(overrides={"dpls_epsilonn": 0.2})
    path = tmp_path / "c.toml"
    path.write_text("learnig_rate = 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        read_config_file(path)
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--max_iters"])
    for typo in ("max_iters=3", "-max_iters=3"):  # not "config file not found: max_iters=3"
        with pytest.raises(ValueError, match="a key is given as --max_iters=3"):
            parse_overrides([typo])
    path.write_bytes(b"\xff\xfemax_iters = 3\n")
    with pytest.raises(ValueError, match=r"c\.toml is not valid TOML: not UTF-8"):
        read_config_file(path)


def test_validation_ranges():
    for bad in ({"batch_size": 0}, {"min_lr": 1.0, "learning_rate": 0.1}, {"beta2": 1.0}, {"dtype": "fp8"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            load_config(overrides=bad)


def test_cli_bad_key_exits_2_with_suggestion(capsys, tmp_path):
    out = tmp_path / "never"
    assert main(["train", f"--out_dir={out}", "--gradient_acumulation_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "gradient_accumulation_steps" in err and err.count("\n") == 1
    assert main(["train", f"--out_dir={out}", "--batch_size=big"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not out.exists()


def test_cli_help_lists_every_key(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"--{k}" in text for k in TrainConfig.key_names())


_values = {
    bool: st.booleans(),
    int: st.integers(-(2**40), 2**40),
    float: st.floats(allow_nan=True, allow_infinity=True),
    str: st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
}


@st.composite
def config_values(draw):
    """Values of every key's type, in or out of the key's range: the writer must not care."""
    from dpls.train.config import _FIELD_TYPES, _split_optional

    values = TrainConfig().to_dict()
    for f in fields(TrainConfig):
        tp, optional = _split_optional(_FIELD_TYPES[f.name])
        if draw(st.booleans()):
            values[f.name] = None if optional and draw(st.booleans()) else draw(_values[tp])
    return values


@given(config_values())
def test_toml_writer_roundtrips(values):
    """What we write, tomllib reads back to the same values (strings with quotes, NaN, None...)."""
    back = tomllib.loads(dumps_toml(values, header="a\nheader"))
    for k, v in values.items():
        w = convert(k, back[k]) if k in back else None  # None is written as a comment
        assert (isinstance(v, float) and math.isnan(v) and math.isnan(w)) or w == v, k


def _saved_run(tmp_path, **values):
    run = tmp_path / "ce_run"
    run.mkdir()
    cfg = TrainConfig.from_dict({"out_dir": str(run), **values})
    write_config(cfg, run / "config.toml")
    return run


def test_resume_in_place_takes_the_runs_config(tmp_path):
    run = _saved_run(tmp_path, batch_size=3, max_iters=40, loss="ce")
    cfg = load_config(overrides=[f"--resume_dir={run}", "--max_iters=80"])
    assert cfg.out_dir == str(run) and cfg.batch_size == 3 and cfg.max_iters == 80 and cfg.loss == "ce"
    # a checkpoint dir inside the run names the run too
    cfg = load_config(overrides={"resume_dir": str(run / "checkpoints" / "step_0000040")})
    assert cfg.out_dir == str(run) and cfg.batch_size == 3


def test_fork_inherits_everything_but_what_is_given(tmp_path):
    run = _saved_run(tmp_path, batch_size=3, learning_rate=1e-3, loss="ce")
    new = tmp_path / "dpls_run"
    cfg = load_config(overrides=[f"--resume_dir={run}", "--loss=dpls", f"--out_dir={new}"])
    assert cfg.out_dir == str(new) and cfg.resume_dir == str(run)
    assert cfg.loss == "dpls" and cfg.batch_size == 3 and cfg.learning_rate == 1e-3
    with pytest.raises(ValueError, match=r"no config\.toml"):
        load_config(overrides=[f"--resume_dir={tmp_path / 'missing'}"])


def test_to_loss_config_carries_every_loss_key():
    from dpls.losses.objective import LossConfig, build_objective

    cfg = load_config(
        overrides=[
            *("--loss=dpls", "--dpls_top_k=7", "--dpls_schedule=step", "--dpls_start_step=5"),
            *("--z_loss=1e-4", "--dpls_gamma=2.0", "--loss_impl=reference"),
        ]
    )
    lc = cfg.to_loss_config()
    assert isinstance(lc, LossConfig)
    for f in fields(LossConfig):
        expected = cfg.max_iters if f.name == "dpls_end_step" else getattr(cfg, f.name)  # unset → max_iters
        assert getattr(lc, f.name) == expected, f.name
    objective = build_objective(lc)
    assert objective.epsilon_at(4) == 0.0 and objective.epsilon_at(5) == pytest.approx(
        0.1
    )  # the "step" recipe


def test_a_config_is_checked_when_made_and_never_changes():
    import dataclasses

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="n_head must be >= 1"):
        TrainConfig.from_dict({"n_head": "0"})
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]


def test_model_keys_are_declared_once_and_are_the_models():
    """Every `model_key` field is a ModelConfig field of the same name: `model_overrides` gives
    it to the preset, and `resolve_config` takes it back from the model."""
    from dpls.model import ModelConfig, model_config
    from dpls.train.config import MODEL_KEYS, MODEL_OVERRIDE_KEYS, resolve_config

    assert MODEL_KEYS[0] == "model" and MODEL_KEYS[1:] == MODEL_OVERRIDE_KEYS
    assert {"n_layer", "n_head", "n_embd", "attention", "qk_norm"} <= set(MODEL_OVERRIDE_KEYS)
    assert set(MODEL_OVERRIDE_KEYS) <= {f.name for f in fields(ModelConfig)}
    cfg = load_config(overrides=["--n_layer=2", "--qk_norm=true"])
    assert cfg.model_overrides() == {"n_layer": 2, "qk_norm": True}
    mc = model_config(cfg.model, vocab_size=100, **cfg.model_overrides())
    resolved = resolve_config(cfg, mc)
    assert [getattr(resolved, k) for k in MODEL_OVERRIDE_KEYS] == [
        getattr(mc, k) for k in MODEL_OVERRIDE_KEYS
    ]
    assert (resolved.block_size, resolved.data_seed) == (mc.block_size, cfg.seed)
    assert resolved.n_head == mc.n_head and cfg.n_head is None  # the user's config is left as written


def test_a_toml_string_is_not_a_number_but_a_command_line_string_is(tmp_path):
    """In a TOML file ``learning_rate = "1e-2"`` is a typo (TOML numbers have no quotes); on the
    command line every value is a string, so ``--learning_rate=1e-2`` is a number."""
    path = tmp_path / "c.toml"
    path.write_text('learning_rate = "1e-2"\n')
    with pytest.raises(
        ValueError, match=r"c.toml: learning_rate must be .*got the string '1e-2'.*without quotes"
    ):
        read_config_file(path)
    path.write_text(
        'learning_rate = 1e-2\ndtype = "float32"\nlr_decay_iters = "none"\n'
    )  # str keys, and unset
    assert read_config_file(path) == {"learning_rate": 0.01, "dtype": "float32", "lr_decay_iters": None}
    assert convert("learning_rate", "1e-2") == 0.01


@pytest.mark.parametrize("key", ["seed", "data_seed"])
def test_seeds_are_what_torch_takes(key):
    TrainConfig(**{key: 2**64 - 1})
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=rf"{key} must be an integer in \[0, 2\*\*64 - 1\]"):
            TrainConfig(**{key: bad})
