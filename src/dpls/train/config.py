"""The training configuration: one flat, typed dataclass with the published recipe's key names.

Where a value comes from, lowest priority first:

1. the defaults below (nanoGPT's where nanoGPT has the key);
2. when resuming or forking (``resume_dir``), the resolved config of that run;
3. a TOML file (``dpls train CONFIG.toml``), flat ``key = value`` lines;
4. ``--key=value`` (or ``--key value``) on the command line.

Every value is converted to its field's type (``bool`` accepts true/false/1/0/yes/no; an
optional field accepts ``none``); an unknown key is an error naming the closest valid key.
A `TrainConfig` is frozen and checked when it is made, so one that exists is valid.
`plan_run` turns it into a `ResolvedConfig`: the model keys become the model's (from the
preset or the checkpoint), and ``block_size`` and ``data_seed`` are set. That is what
``RUN/config.toml`` and every checkpoint record, so a run directory alone says how it was
trained (keys left unset, such as ``lr_decay_iters``, stay unset: a fork with another
``max_iters`` gets its own schedule).

Adding a key is one field below: `key` for a training key, `model_key` for a key of the
network (it then also reaches the model's preset, is filled in from the model, and may not
change when resuming or forking).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpls._io import write_text_atomic
from dpls.runs.layout import (
    dumps_toml,
    find_run_config,
    read_toml,
    run_dir_of,
    saved_path,
    toml_value,
)

if TYPE_CHECKING:
    from dpls.losses.objective import LossConfig
    from dpls.model.config import ModelConfig

Scalar = str | int | float | bool

# The values some string keys accept. Keys whose choices live in another component's
# registry (loss, dpls_schedule, model, ...) are checked by that component.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "float32", "bfloat16"),  # float16 would need loss scaling
    "parallel": ("ddp", "fsdp", "none"),
    "swanlab": ("off", "cloud", "local", "offline"),
    "wandb": ("off", "online", "offline"),
    "activation_checkpointing": ("none", "full", "selective"),
}


def key(default: Any, help: str, *, model: bool = False) -> Any:
    """A config field with its one-line help (shown by ``dpls train --help``)."""
    if isinstance(default, list | dict):
        raise TypeError("config fields are flat scalars")
    return field(default=default, metadata={"help": help, "model": model})


def model_key(help: str) -> Any:
    """A key of the network (a `dpls.model.ModelConfig` field of the same name): unset means
    the preset's value; it is taken from the checkpoint when resuming or forking, and may not
    differ from it there (the weights would not fit)."""
    return key(None, help, model=True)


SEED_LIMIT = 2**64  # torch.manual_seed and torch.Generator take seeds in [0, 2**64 - 1]


def _is_text(value: str) -> bool:
    """Encodable as UTF-8: command-line bytes that are not arrive as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TrainConfig:
    """Every key ``dpls train`` accepts. Units: steps are optimizer steps; tokens are global."""

    # -- where ------------------------------------------------------------------------
    out_dir: str = key("out", "run directory (config.toml, metrics.jsonl, checkpoints/)")
    data_dir: str = key("data/stdlib", "prepared data directory (meta.json + token shards)")
    resume_dir: str | None = key(
        None,
        "continue this run (alone: in place) or fork it (with another out_dir); a run or checkpoint dir",
    )
    fork_optimizer: bool = key(True, "when forking, also load the optimizer state (else a fresh AdamW)")
    run_name: str | None = key(None, "name shown by SwanLab, W&B and MLflow (default: out_dir's name)")

    # -- model (keys given here override the preset) -----------------------------------
    model: str = key("tiny", "model preset: tiny, small, 124m, 350m, 760m, 1.3b")
    n_layer: int | None = model_key("transformer blocks (default: the preset's)")
    n_head: int | None = model_key("attention heads (default: the preset's)")
    n_kv_head: int | None = model_key("key/value heads, grouped-query attention (default: the preset's)")
    n_embd: int | None = model_key("model width (default: the preset's)")
    attention: str | None = model_key("attention: mha, gqa (with n_kv_head), tpa (default: the preset's)")
    pad_vocab_to: int | None = model_key(
        "pad the output layer's rows to a multiple of this, padded logits exactly -inf "
        "(default: the preset's; 64 for GPT-2-tokenised data: 50257 -> 50304)"
    )
    qk_norm: bool | None = model_key(
        "RMSNorm on each head's queries and keys (mha/gqa; exports as Qwen3) (default: off)"
    )
    logit_softcap: float | None = model_key(
        "cap the output logits at cap·tanh(z/cap) before any loss (Gemma 2: 30) (default: off)"
    )

    # -- data and batch ----------------------------------------------------------------
    batch_size: int = key(12, "micro-batch of ONE rank, in sequences")
    block_size: int | None = key(None, "sequence length in tokens (default: the preset's context)")
    gradient_accumulation_steps: int = key(1, "micro-batches per step, TOTAL over all ranks (as nanoGPT)")
    data_seed: int | None = key(None, "seed of the training data order (default: seed)")

    # -- optimizer and learning rate ---------------------------------------------------
    max_iters: int = key(5000, "optimizer steps to train for (the step counter continues on a fork)")
    learning_rate: float = key(6e-4, "peak learning rate")
    min_lr: float = key(6e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = key(100, "linear warmup steps")
    lr_decay_iters: int | None = key(None, "step where the cosine reaches min_lr (default: max_iters)")
    weight_decay: float = key(0.1, "AdamW weight decay (2-D parameters only)")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    grad_clip: float = key(1.0, "clip the global gradient norm to this (0: no clipping)")

    # -- the objective -----------------------------------------------------------------
    loss: str = key(
        "ce", "objective: ce, ls, dpls, confidence_penalty, prior_ls (ε spread by token frequency)"
    )
    dpls_epsilon: float = key(0.1, "DPLS smoothing mass ε")
    dpls_top_k: int = key(100, "DPLS: ε is spread over the k most likely tokens")
    dpls_schedule: str = key("constant", "ε over steps: constant, linear, cosine, warmup, step")
    dpls_start_step: int = key(0, "schedule start (the 'step' schedule: plain CE before it)")
    dpls_end_step: int | None = key(None, "schedule end (default: max_iters)")
    dpls_epsilon_final: float = key(0.0, "ε at dpls_end_step for decaying schedules")
    dpls_epsilon_mode: str = key("constant", "per-token ε: constant, confidence, entropy")
    dpls_gamma: float = key(1.0, "exponent of the confidence / entropy modes")
    label_smoothing: float = key(0.1, "ε of plain label smoothing (loss=ls, loss=prior_ls)")
    confidence_penalty_beta: float = key(0.1, "β of the confidence penalty CE − β·H(p)")
    z_loss: float = key(0.0, "coefficient of the z-loss term λ·lse², added to any objective")
    loss_impl: str = key("auto", "loss implementation: auto, reference, chunked, triton")
    fused_linear_loss: bool = key(False, "compute the loss from hidden states, never the full logits")

    # -- system ------------------------------------------------------------------------
    device: str = key("auto", "auto, cpu, cuda, cuda:N (under torchrun cuda means the local rank's GPU)")
    dtype: str = key("auto", "autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    compile: bool = key(False, "torch.compile every transformer block")
    activation_checkpointing: str = key(
        "none",
        "recompute activations in the backward instead of keeping them: none, full (every block), "
        "selective (every second block); same losses, less memory, about one more forward of time",
    )
    parallel: str = key("ddp", "several ranks: ddp or fsdp")
    seed: int = key(1337, "seed of the initialisation")

    # -- evaluation, logging, checkpoints ----------------------------------------------
    eval_interval: int = key(250, "validate every this many steps (and at the start and the end)")
    eval_iters: int = key(20, "validation batches when eval_tokens is not set")
    eval_tokens: int | None = key(None, "validation tokens per evaluation (default: eval_iters batches)")
    log_interval: int = key(10, "write a metrics.jsonl row every this many steps")
    checkpoint_interval: int = key(1000, "save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = key(3, "keep the newest N checkpoints (0: keep all)")
    max_skipped_steps: int = key(10, "stop after this many non-finite steps in a row")
    divergence_window: int = key(
        0,
        "stop as diverged when the training CE of this many logged steps in a row is above the first "
        "validation CE or not finite (0: off; studies use 5)",
    )
    spike_window: int = key(
        128, "loss spikes: losses of this many previous steps make the window (OLMo-core: 128; >= 2)"
    )
    spike_sigmas: float = key(
        6.0, "loss spikes: a step's loss more than this many σ above the window's mean (OLMo-core: 6)"
    )
    progress: bool = key(True, "progress bar on stderr (only on a terminal)")
    tensorboard: bool = key(False, "also log to TensorBoard (RUN/tensorboard)")
    swanlab: str = key("off", "also log to SwanLab: off, cloud, local, offline")
    swanlab_project: str = key("dpls", "SwanLab project")
    wandb: str = key(
        "off", "also log to Weights & Biases: off, online, offline (RUN/wandb; `wandb sync` later)"
    )
    wandb_project: str = key("dpls", "W&B project")
    mlflow: str = key(
        "off", "also log to MLflow: off, or a tracking URI (http://host:5000, sqlite:///path/mlflow.db, ...)"
    )
    mlflow_experiment: str = key("dpls", "MLflow experiment")

    # -- conversions ---------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (default: the defaults) with ``values`` converted to each field's type."""
        converted = {k: convert(k, v) for k, v in values.items()}
        return dataclasses.replace(base, **converted) if base is not None else cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check ranges and choices; raise ``ValueError`` naming the key and what is allowed.
        Every new config runs it (a `TrainConfig` that exists is valid)."""
        positive: tuple[str, ...] = ("batch_size", "gradient_accumulation_steps", "max_iters")
        positive += (
            "eval_interval",
            "eval_iters",
            "log_interval",
            "checkpoint_interval",
            "max_skipped_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "keep_checkpoints", "dpls_start_step", "divergence_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        model_ints = [k for k in MODEL_OVERRIDE_KEYS if _split_optional(_FIELD_TYPES[k])[0] is int]
        for name in (*model_ints, "block_size", "eval_tokens", "lr_decay_iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.spike_window < 2:
            raise ValueError(
                f"spike_window must be an integer >= 2 (the window needs a spread), got {self.spike_window}"
            )
        if not (math.isfinite(self.spike_sigmas) and self.spike_sigmas > 0):
            raise ValueError(f"spike_sigmas must be a finite number > 0, got {self.spike_sigmas}")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and not _is_text(value):
                raise ValueError(
                    f"{f.name} is not valid UTF-8 text ({value!r}); config.toml holds it as UTF-8: choose a name "
                    "that is UTF-8 text"
                )
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < SEED_LIMIT:
                raise ValueError(
                    f"{name} must be an integer in [0, 2**64 - 1] (what torch seeds take), got {value}"
                )
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        return self

    # -- derived values --------------------------------------------------------------------

    @property
    def resolved_lr_decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters

    @property
    def resolved_data_seed(self) -> int:
        return self.data_seed if self.data_seed is not None else self.seed

    @property
    def resolved_eval_tokens(self) -> int:
        if self.eval_tokens is not None:
            return self.eval_tokens
        if self.block_size is None:
            raise ValueError("block_size is not resolved yet (it comes from the model preset)")
        return self.eval_iters * self.batch_size * self.block_size

    def model_overrides(self) -> dict[str, Any]:
        """The model keys given explicitly, and ``block_size`` (they override the preset's values)."""
        keys = (*MODEL_OVERRIDE_KEYS, "block_size")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def to_loss_config(self) -> LossConfig:
        """The loss library's ``LossConfig`` from this config's loss keys (matched by name);
        ``dpls_end_step`` defaults to ``max_iters``."""
        from dpls.losses.objective import LossConfig  # torch: reading a config stays light

        values = self.to_dict()
        if values["dpls_end_step"] is None:
            values["dpls_end_step"] = self.max_iters
        names = {f.name for f in fields(LossConfig)}
        return LossConfig(**{k: v for k, v in values.items() if k in names})


# The keys of the network (`model_key` fields) and, with them, the preset's name: taken from
# the checkpoint when resuming or forking, and they may not change there.
MODEL_OVERRIDE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig) if f.metadata["model"])
MODEL_KEYS: tuple[str, ...] = ("model", *MODEL_OVERRIDE_KEYS)


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(TrainConfig):
    """A `TrainConfig` resolved for one run by `dpls.train.plan.plan_run`: every model key is
    the model's, and the values a run needs are set. It is what ``RUN/config.toml`` and each
    checkpoint record, and what the trainer reads."""

    block_size: int  # the preset's context unless given
    data_seed: int  # seed unless given


def resolve_config(cfg: TrainConfig, model: ModelConfig) -> ResolvedConfig:
    """``cfg`` with the model keys of ``model`` (the preset with the user's keys, or the
    checkpoint's network), ``block_size`` (default: the model's context) and ``data_seed``."""
    values = cfg.to_dict()
    values.update({k: getattr(model, k) for k in MODEL_OVERRIDE_KEYS})
    values["block_size"] = cfg.block_size or model.block_size
    values["data_seed"] = cfg.resolved_data_seed
    return ResolvedConfig(**values)


# -- typed conversion -----------------------------------------------------------------------

_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def closest_key(name: str, keys: Iterable[str] | None = None) -> str | None:
    """The valid key most like ``name`` (difflib), or None when nothing is close."""
    options = list(keys if keys is not None else TrainConfig.key_names())
    matches = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_message(name: str) -> str:
    suggestion = closest_key(name)
    hint = f"; did you mean {suggestion!r}?" if suggestion else "; `dpls train --help` lists the keys"
    return f"unknown config key {name!r}{hint}"


def _split_optional(tp: Any) -> tuple[type, bool]:
    """``int | None`` → (int, True); ``int`` → (int, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _type_name(tp: type, optional: bool) -> str:
    names = {bool: "a boolean (true/false/1/0)", int: "an integer", float: "a number", str: "a string"}
    return names[tp] + (" or none" if optional else "")


def convert(name: str, value: Any, *, typed: bool = False) -> Any:
    """``value`` (a string from the command line, or a TOML value) as key ``name``'s type.

    ``typed``: the value comes from a TOML file, whose numbers and booleans have types of their
    own: a string there (``learning_rate = "1e-2"``) is an error, not a number. (TOML has no
    null, so ``"none"`` still unsets an optional key.)"""
    if name not in _FIELD_TYPES:
        raise ValueError(unknown_key_message(name))
    tp, optional = _split_optional(_FIELD_TYPES[name])
    wrong = ValueError(f"{name} must be {_type_name(tp, optional)}, got {value!r}")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise wrong
    if typed and isinstance(value, str) and tp is not str:
        raise ValueError(
            f"{name} must be {_type_name(tp, optional)}, got the string {value!r}: in TOML, write numbers and "
            "true/false without quotes"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:  # "1e4" is a fine way to write ten thousand
                    as_float = float(value)
                except ValueError:
                    raise wrong from None
                if as_float.is_integer():
                    return int(as_float)
        raise wrong
    if tp is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if isinstance(value, str):
        return value
    raise wrong


# -- reading: TOML files and command-line overrides -------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat TOML config file → {key: value}, converted and checked key by key."""
    raw = read_toml(path)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            raise ValueError(f"{path}: tables ([{k}]) are not config keys; the config is flat key = value")
        try:
            out[k] = convert(k, v, typed=True)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return out


def parse_overrides(args: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``[CONFIG.toml] --key=value --key value --flag ...`` → (config path or None, {key: value}).

    A boolean key given alone (``--compile``) means true. Dashes in a key are read as
    underscores (``--max-iters`` is ``max_iters``).
    """
    config_path: str | None = None
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            name, eq, value = arg.lstrip("-").partition("=")
            if eq and name.replace("-", "_") in _FIELD_TYPES and not Path(arg).is_file():
                raise ValueError(f"unexpected argument {arg!r}: a key is given as --{name}={value}")
            if config_path is not None:
                raise ValueError(
                    f"unexpected argument {arg!r}: give one config file, then --key=value overrides"
                )
            config_path = arg
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in _FIELD_TYPES:
            raise ValueError(unknown_key_message(name))
        if not eq:
            is_bool = _split_optional(_FIELD_TYPES[name])[0] is bool
            if i < len(args) and not (args[i].startswith("--") and len(args[i]) > 2):
                value = args[i]
                i += 1
            elif is_bool:
                value = "true"
            else:
                raise ValueError(f"--{name} needs a value (--{name}=VALUE)")
        values[name] = convert(name, value)
    return config_path, values


def load_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> TrainConfig:
    """Defaults ← (the resumed run's config) ← ``config_file`` ← ``overrides``; validated.

    ``overrides`` is either command-line strings (``["--loss=dpls"]``) or a mapping. With
    ``resume_dir`` and no other ``out_dir`` the run continues in place; with another
    ``out_dir`` it is a fork whose every key not given here comes from the resumed run.
    """
    if isinstance(overrides, Mapping):
        explicit = {k: convert(k, v) for k, v in overrides.items()}
    else:
        path_arg, explicit = parse_overrides(list(overrides))
        if path_arg is not None:
            if config_file is not None:
                raise ValueError(f"two config files given: {config_file} and {path_arg}")
            config_file = path_arg
    values = read_config_file(config_file) if config_file is not None else {}
    values.update(explicit)

    base: TrainConfig | None = None
    resume_dir = values.get("resume_dir")
    if resume_dir:
        saved = read_config_file(find_run_config(resume_dir))
        saved.pop("resume_dir", None)
        if saved.get("data_dir"):  # a relative data_dir means: from where the run was made
            saved["data_dir"] = str(
                saved_path(run_dir_of(resume_dir), saved.get("out_dir"), saved["data_dir"])
            )
        if "out_dir" not in values:  # alone: continue the run in place
            values["out_dir"] = str(run_dir_of(resume_dir))
        base = TrainConfig.from_dict(saved)
    return TrainConfig.from_dict(values, base=base)


def read_run_config(path: str | Path) -> TrainConfig:
    """The `TrainConfig` saved in a run or checkpoint directory."""
    return TrainConfig.from_dict(read_config_file(find_run_config(path)))


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# -- writing --------------------------------------------------------------------------------


def write_config(cfg: TrainConfig, path: str | Path, header: str = "") -> Path:
    """Write ``cfg`` as TOML atomically (temporary file, fsync, rename)."""
    return write_text_atomic(path, dumps_toml(cfg.to_dict(), header=header))


def help_text() -> str:
    """Every key with its type, default and help: the epilog of ``dpls train --help``."""
    rows = []
    for f in fields(TrainConfig):
        tp, optional = _split_optional(_FIELD_TYPES[f.name])
        default = f.default  # every TrainConfig key has one
        shown = "unset" if default is None or default is dataclasses.MISSING else toml_value(default)
        rows.append(f"  --{f.name}  ({tp.__name__}{'?' if optional else ''}, default {shown})")
        rows.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(rows)
