"""The STUDY.toml format: one CE trunk, forked into loss arms × seeds, evaluated the same way.

```toml
name = "demo"
out_dir = "runs/study_demo"        # everything the study writes goes here
prepare = "stdlib"                 # or: data_dir = "data/fineweb_edu"
                                   # or a table: [prepare] source = "stdlib", vocab_size = 4096
fork_step = 200                    # the trunk trains this many iterations; arms fork there
seeds = [0, 1]                     # or a count: seeds = 3  (→ 0, 1, 2)
tokens_per_arm = 2_000_000         # or: iters_per_arm = 500
baseline = "ce"                    # differences are arm − baseline (default: the first CE arm)

[train]                            # training keys shared by the trunk and every arm
model = "tiny"
batch_size = 8

[trunk]                            # keys for the trunk only (its loss defaults to "ce"); the arms get
                                   # [train]'s value or the default; model/batch keys go in [train] ...
warmup_iters = 50
# checkpoint = "runs/ce/checkpoints/step_0005000"   # ... or fork an existing checkpoint

[[arms]]
name = "ce"
loss = "ce"

[[arms]]
name = "dpls"
loss = "dpls"
dpls_epsilon = 0.1
dpls_top_k = 100

[executor]                         # where the jobs run (default: one after another, here)
kind = "local"                     # sequential | local | slurm | ray; see `executor_spec`
workers = 2

[eval]
tokens = 200_000                   # validation tokens per evaluation (default: the whole split)
lm_eval_tasks = ["hellaswag"]      # downstream tasks through lm-evaluation-harness (optional)
lm_eval_limit = 500
samples = 8                        # samples per run for the generation metrics (0: none)
sample_tokens = 32                 # new tokens per sample at most
sample_prompt_tokens = 16          # each prompt: the opening of a validation document
```

Without ``fork_step`` and ``[trunk]`` there is no trunk: every run trains from initialisation
(all runs of one seed from the same weights and batches), and arms may also set model keys
(``qk_norm = true``) and optimizer keys. A ``[sweep]`` table names one or more keys and their
values (``learning_rate = [1e-3, 3e-3, 1e-2]``, and say ``n_embd = [64, 128]``): every arm ×
grid point (the product of the keys' values) × seed is then a run.

``primary = "<metric>"`` names the question the study is for (default ``lr_sensitivity`` in a
sweep, ``final_val_ce`` otherwise): the report answers it first, Holm-corrected across arms,
and lists every other metric as exploratory. ``min_effect`` is the smallest difference in it
worth finding: the report says how many seeds would find it.

Relative paths are taken from the current directory, as ``dpls train`` does. Every key is
checked against the format (and training keys against ``TrainConfig``); an unknown one is
an error that names the closest valid key. ``max_iters``, ``out_dir`` and ``resume_dir``
are the study's to set (from ``fork_step`` and the arm budget), so they are not accepted.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dpls.runs.layout import read_toml
from dpls.study.executor_spec import ExecutorSpec, parse_executor
from dpls.train.config import MODEL_KEYS, SEED_LIMIT, TrainConfig, convert

# Training keys the arms inherit from the trunk whatever they say: the model and the shape
# of the data stream (and the LR horizon, which the study sets for trunk and arms at once).
SHARED_WITH_ARMS: frozenset[str] = frozenset(
    {*MODEL_KEYS, "block_size", "batch_size", "gradient_accumulation_steps", "data_seed", "lr_decay_iters"}
)

# Training keys that choose the objective: what one arm differs in.
LOSS_KEYS: tuple[str, ...] = (
    "loss",
    "dpls_epsilon",
    "dpls_top_k",
    "dpls_schedule",
    "dpls_start_step",
    "dpls_end_step",
    "dpls_epsilon_final",
    "dpls_epsilon_mode",
    "dpls_gamma",
    "label_smoothing",
    "confidence_penalty_beta",
    "z_loss",
)

# Optimizer keys a [sweep] may set, from scratch or after a fork (arms share them from [train]).
ARM_OPTIMIZER_KEYS: tuple[str, ...] = (
    "learning_rate",
    "min_lr",
    "warmup_iters",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
)

# Training keys that change nothing a run computes (where it also logs, and whether activations are
# recomputed in the backward): runs may differ in them and still be compared, pooled or resumed.
NEUTRAL_KEYS = frozenset(
    {"wandb", "wandb_project", "mlflow", "mlflow_experiment", "activation_checkpointing"}
)

# Training keys the study sets itself (per run), so a study file may not.
STUDY_OWNED_KEYS: dict[str, str] = {
    "max_iters": "set fork_step (the trunk's length) and tokens_per_arm / iters_per_arm instead",
    "out_dir": "runs are placed under the study's out_dir",
    "resume_dir": "arms are forked from the trunk by the study",
    "data_dir": "set data_dir (or prepare) at the top of the study file",
}

TOP_KEYS = (
    "name",
    "out_dir",
    "data_dir",
    "prepare",
    "fork_step",
    "seeds",
    "tokens_per_arm",
    "iters_per_arm",
    "baseline",
    "train",
    "trunk",
    "arms",
    "eval",
    "sweep",
    "executor",
    "primary",
    "min_effect",
)
# The primary metric of a sweep, and of a study without one.
SWEEP_PRIMARY = "lr_sensitivity"
DEFAULT_PRIMARY = "final_val_ce"
# The swept key LR sensitivity is read along when a [sweep] names several (else the first key).
SWEEP_AXIS = "learning_rate"
EVAL_KEYS = (
    "tokens",
    "batch_size",
    "lm_eval_tasks",
    "lm_eval_limit",
    "lm_eval_include_path",
    "lm_eval_batch_size",
    "samples",
    "sample_tokens",
    "sample_prompt_tokens",
)
PREPARE_SOURCES = ("stdlib", "fineweb-edu")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ArmSpec:
    """One loss arm: a name (its directory) and the loss keys that set it apart."""

    name: str
    loss: Mapping[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """The swept keys and their values: every arm × grid point × seed is a run.

    ``key``/``values`` are the axis LR sensitivity is read along (``learning_rate`` when swept,
    else the first key); ``others`` the remaining keys, in file order. A run's swept value is
    the axis value alone for one key, else ``{key: value}`` over `keys` (the axis first).
    """

    key: str
    values: tuple[Any, ...]
    others: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *(k for k, _ in self.others))

    def points(self) -> list[Any]:
        """Every grid point as a run's value, the axis varying fastest."""
        if not self.others:
            return list(self.values)
        return [
            {self.key: v, **dict(zip((k for k, _ in self.others), rest, strict=True))}
            for rest in itertools.product(*(vals for _, vals in self.others))
            for v in self.values
        ]

    def to_dict(self) -> dict[str, Any]:
        """As the study state keeps it (and the report reads it)."""
        out: dict[str, Any] = {"key": self.key, "values": list(self.values)}
        if self.others:
            out["others"] = {k: list(v) for k, v in self.others}
        return out


def point_keys(value: Any, key: str) -> dict[str, Any]:
    """A run's swept value as training keys: ``{key: value}``, or the dict itself (several keys)."""
    return dict(value) if isinstance(value, dict) else {key: value}


def point_dir(value: Any, key: str) -> Path:
    """The folder of a grid point below the arm's: ``<key>_<value>``, one level per swept key."""
    return Path(*(f"{k}_{v}" for k, v in point_keys(value, key).items()))


def arm_keys(from_scratch: bool) -> tuple[str, ...]:
    """The training keys an arm may set: the loss keys, and the model keys from scratch."""
    return (*LOSS_KEYS, *(MODEL_KEYS if from_scratch else ()))


def sweep_keys(from_scratch: bool) -> tuple[str, ...]:
    """The keys a ``[sweep]`` may set: an arm's, and the optimizer keys."""
    return (*arm_keys(from_scratch), *ARM_OPTIMIZER_KEYS)


@dataclass(frozen=True)
class TrunkSpec:
    """The shared start: trained here from ``train`` keys, or an existing ``checkpoint``."""

    train: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


@dataclass(frozen=True)
class EvalSpec:
    """How each finished arm is evaluated (``None`` = the evaluator's default)."""

    tokens: int | None = None
    batch_size: int | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: float | None = None
    lm_eval_include_path: Path | None = None
    lm_eval_batch_size: int | None = None
    # generation: one batch of samples per run, from the openings of validation documents
    samples: int = 8
    sample_tokens: int = 32
    sample_prompt_tokens: int = 16


@dataclass(frozen=True)
class StudySpec:
    """A parsed, checked study file (see the module docstring for the format)."""

    name: str
    out_dir: Path
    arms: tuple[ArmSpec, ...]
    seeds: tuple[int, ...]
    data_dir: Path | None = None
    prepare: str | None = None
    prepare_options: Mapping[str, Any] = field(default_factory=dict)  # keywords of prepare_<source>
    fork_step: int | None = None
    tokens_per_arm: int | None = None
    iters_per_arm: int | None = None
    baseline: str = ""
    train: Mapping[str, Any] = field(default_factory=dict)
    trunk: TrunkSpec = field(default_factory=TrunkSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    source: Path | None = None
    sweep: SweepSpec | None = None
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    primary: str = DEFAULT_PRIMARY
    min_effect: float | None = None

    @property
    def from_scratch(self) -> bool:
        """No trunk: every run trains from initialisation."""
        return self.fork_step is None and self.trunk.checkpoint is None

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)


# -- checking ---------------------------------------------------------------------------------


def train_config_keys() -> frozenset[str]:
    """The keys ``dpls train`` accepts: the fields of ``TrainConfig``."""
    return frozenset(f.name for f in fields(TrainConfig))


def closest_hint(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {match[0]!r}? " if match else ""
    return f"{hint}(valid: {', '.join(valid)})"


def _check_keys(table: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    valid = set(valid)
    for key in table:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {where}; {closest_hint(key, valid)}")


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_path(value: Any, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a path string, got {value!r}")
    return Path(value).expanduser()


def _seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return tuple(range(_int(value, "seeds (a count)", minimum=1)))
    if isinstance(value, list) and value:
        seeds = tuple(_int(s, "each seed") for s in value)
        if max(seeds) >= SEED_LIMIT:
            raise ValueError(f"each seed must be an integer in [0, 2**64 - 1], got {max(seeds)}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {value!r}")
        return seeds
    raise ValueError(f"seeds must be a positive count or a non-empty list of integers, got {value!r}")


def _train_table(table: Any, where: str, train_keys: frozenset[str], allow_loss: bool) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of training keys, got {table!r}")
    for key in table:
        if key in STUDY_OWNED_KEYS:
            raise ValueError(f"{key!r} is not allowed in {where}: {STUDY_OWNED_KEYS[key]}")
        if key in LOSS_KEYS and not allow_loss:
            raise ValueError(
                f"loss key {key!r} is not allowed in {where}: put it in an [[arms]] entry (or in [trunk])"
            )
    _check_keys(table, train_keys, where)
    _check_types(table, where)
    return dict(table)


def _check_types(table: Mapping[str, Any], where: str) -> None:
    """Each value has its key's type: a TOML string is not a number (``"1e-2"`` is a typo)."""
    for key, value in table.items():
        try:
            convert(key, value, typed=True)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _arm(entry: Any, index: int, train_keys: frozenset[str], from_scratch: bool) -> ArmSpec:
    where = f"[[arms]] entry {index + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a table, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where} needs a name of letters, digits, '.', '_' or '-', got {name!r}")
    where = f"[[arms]] {name!r}"
    loss = {k: v for k, v in entry.items() if k != "name"}
    allowed = arm_keys(from_scratch)
    for key in loss:
        if key in MODEL_KEYS and not from_scratch:
            raise ValueError(
                f"{where} sets the model key {key!r}: forked arms continue the trunk's model; model keys "
                "may differ between arms only in a study from scratch (no fork_step, no [trunk])"
            )
        if key not in allowed:
            others = "" if key not in train_keys else " (shared training keys go in [train])"
            raise ValueError(
                f"unknown key {key!r} in {where}{others}; arms take a name, loss keys and, from scratch, "
                f"model keys: {closest_hint(key, (*allowed, 'name'))}"
            )
    missing = [k for k in loss if k not in train_keys]
    if missing:
        raise ValueError(f"{where}: this version of TrainConfig has no key {missing[0]!r}")
    if "loss" not in loss:
        raise ValueError(f"{where} needs a 'loss' key (e.g. 'ce', 'ls', 'dpls')")
    _check_types(loss, where)
    return ArmSpec(name=name, loss=loss)


def _eval(table: Any) -> EvalSpec:
    if table is None:
        return EvalSpec()
    if not isinstance(table, dict):
        raise ValueError(f"[eval] must be a table, got {table!r}")
    _check_keys(table, EVAL_KEYS, "[eval]")
    tasks = table.get("lm_eval_tasks", [])
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"[eval] lm_eval_tasks must be a list of task names, got {tasks!r}")
    limit = table.get("lm_eval_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0):
        raise ValueError(f"[eval] lm_eval_limit must be a positive number, got {limit!r}")

    def opt_int(key: str) -> int | None:
        v = table.get(key)
        return None if v is None else _int(v, f"[eval] {key}", minimum=1)

    return EvalSpec(
        tokens=opt_int("tokens"),
        batch_size=opt_int("batch_size"),
        lm_eval_tasks=tuple(tasks),
        lm_eval_limit=limit,
        lm_eval_include_path=_optional_path(table.get("lm_eval_include_path"), "[eval] lm_eval_include_path"),
        lm_eval_batch_size=opt_int("lm_eval_batch_size"),
        samples=_int(table.get("samples", EvalSpec.samples), "[eval] samples", minimum=0),
        sample_tokens=_int(
            table.get("sample_tokens", EvalSpec.sample_tokens), "[eval] sample_tokens", minimum=1
        ),
        sample_prompt_tokens=_int(
            table.get("sample_prompt_tokens", EvalSpec.sample_prompt_tokens),
            "[eval] sample_prompt_tokens",
            minimum=1,
        ),
    )


def _sweep(table: Any, arms: tuple[ArmSpec, ...], train: Mapping[str, Any], from_scratch: bool) -> SweepSpec:
    """``[sweep] KEY = [v1, v2, ...]`` (one line per key): keys an arm may set, each a non-empty
    list of distinct values; the runs are the product of the lists."""
    if not isinstance(table, dict) or not table:
        raise ValueError(
            "[sweep] must name training keys and their values, e.g. "
            f"[sweep] learning_rate = [1e-3, 3e-3, 1e-2]; got {table!r}"
        )
    checked = {key: _sweep_values(key, values, arms, train, from_scratch) for key, values in table.items()}
    axis = SWEEP_AXIS if SWEEP_AXIS in checked else next(iter(checked))
    others = tuple((k, v) for k, v in checked.items() if k != axis)
    return SweepSpec(key=axis, values=checked[axis], others=others)


def _sweep_values(
    key: str, values: Any, arms: tuple[ArmSpec, ...], train: Mapping[str, Any], from_scratch: bool
) -> tuple[Any, ...]:
    allowed = sweep_keys(from_scratch)
    if key in MODEL_KEYS and not from_scratch:
        raise ValueError(
            f"[sweep] {key}: a model key can be swept only from scratch (no fork_step, no [trunk]); "
            "forked runs continue the trunk's model"
        )
    if key not in allowed:
        raise ValueError(f"[sweep] cannot sweep {key!r}; sweepable keys: {closest_hint(key, allowed)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"[sweep] {key} needs a non-empty list of values, got {values!r}")
    try:
        converted = tuple(convert(key, v, typed=True) for v in values)
    except ValueError as err:
        raise ValueError(f"[sweep] {err}") from None
    if len(set(converted)) != len(converted):
        raise ValueError(f"[sweep] {key} values must be distinct, got {values!r}")
    setters = [a.name for a in arms if key in a.loss]
    if setters:
        raise ValueError(
            f"[sweep] {key} is also set by arm {setters[0]!r}: a swept key takes the sweep's values in "
            "every arm; remove it from the arm (or sweep another key)"
        )
    if key in train:
        raise ValueError(f"[sweep] {key} is also set in [train]; remove it there (the sweep sets it)")
    return converted


def _primary(data: Mapping[str, Any], sweep: SweepSpec | None) -> tuple[str, float | None]:
    """``primary`` (the metric the study is for) and ``min_effect`` (> 0, in its units)."""
    primary = data.get("primary", SWEEP_PRIMARY if sweep else DEFAULT_PRIMARY)
    if not isinstance(primary, str) or not primary:
        raise ValueError(f'primary must name a metric, e.g. primary = "final_val_ce"; got {primary!r}')
    if primary == SWEEP_PRIMARY and sweep is None:
        raise ValueError(f"primary = {SWEEP_PRIMARY!r} needs a [sweep] (it is read along the swept key)")
    min_effect = data.get("min_effect")
    if min_effect is not None and (
        isinstance(min_effect, bool)
        or not isinstance(min_effect, int | float)
        or not math.isfinite(min_effect)
        or min_effect <= 0
    ):
        raise ValueError(
            f"min_effect must be a number > 0 (in the primary metric's units), got {min_effect!r}"
        )
    return primary, None if min_effect is None else float(min_effect)


def _prepare(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``prepare = "stdlib"`` or a ``[prepare]`` table: the source and the preparer's keywords."""
    prepare = data.get("prepare")
    options: dict[str, Any] = {}
    if isinstance(prepare, dict):
        options = dict(prepare)
        prepare = options.pop("source", None)
    if prepare is not None and prepare not in PREPARE_SOURCES:
        raise ValueError(f"prepare (or [prepare] source) must be one of {PREPARE_SOURCES}, got {prepare!r}")
    return prepare, options


def _trunk(data: Mapping[str, Any], keys: frozenset[str]) -> TrunkSpec:
    """``[trunk]``: training keys for the trunk alone, or ``checkpoint`` alone."""
    table = data.get("trunk", {})
    if not isinstance(table, dict):
        raise ValueError(f"[trunk] must be a table, got {table!r}")
    table = dict(table)
    checkpoint = _optional_path(table.pop("checkpoint", None), "[trunk] checkpoint")
    train = _train_table(table, "[trunk]", keys, allow_loss=True)
    if checkpoint is not None and train:
        raise ValueError(
            f"[trunk] with a checkpoint takes no training keys (got {sorted(train)}): "
            "the checkpoint is used as it is"
        )
    shared = sorted(k for k in train if k in SHARED_WITH_ARMS)
    if shared:
        raise ValueError(
            f"[trunk] cannot set {', '.join(shared)}: the arms continue the trunk's model and data "
            "stream, so these keys belong in [train]"
        )
    return TrunkSpec(train=train, checkpoint=checkpoint)


def _fork_step(data: Mapping[str, Any], checkpoint: Path | None) -> int | None:
    fork_step = data.get("fork_step")
    if fork_step is not None:
        return _int(fork_step, "fork_step", minimum=1)
    if checkpoint is None and "trunk" in data:
        raise ValueError(
            "fork_step (how many iterations the CE trunk trains) is required with a [trunk] table "
            "(leave out both fork_step and [trunk] to train every run from scratch)"
        )
    return None


def _budget(data: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(tokens_per_arm, iters_per_arm): exactly one of them."""
    tokens, iters = data.get("tokens_per_arm"), data.get("iters_per_arm")
    if (tokens is None) == (iters is None):
        raise ValueError(
            "set exactly one of tokens_per_arm and iters_per_arm (the training budget after the fork)"
        )
    if tokens is not None:
        return _int(tokens, "tokens_per_arm", minimum=1), None
    return None, _int(iters, "iters_per_arm", minimum=1)


def _arms(
    data: Mapping[str, Any], keys: frozenset[str], from_scratch: bool
) -> tuple[tuple[ArmSpec, ...], str]:
    """The ``[[arms]]`` (unique names) and the baseline among them."""
    table = data.get("arms")
    if not isinstance(table, list) or not table:
        raise ValueError("the study needs at least one [[arms]] entry (name + loss keys)")
    arms = tuple(_arm(entry, i, keys, from_scratch) for i, entry in enumerate(table))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"arm names must be unique; repeated: {dupes}")
    baseline = data.get("baseline")
    if baseline is None:
        baseline = next((a.name for a in arms if a.loss.get("loss") == "ce"), arms[0].name)
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not an arm; {closest_hint(str(baseline), names)}")
    return arms, baseline


def parse_spec(
    data: Mapping[str, Any], *, source: Path | None = None, train_keys: Iterable[str] | None = None
) -> StudySpec:
    """Check a study table (as read from TOML) and turn it into a `StudySpec`.

    ``train_keys`` defaults to the fields of ``TrainConfig``. Raises ``ValueError``
    naming the offending key and what is allowed.
    """
    keys = frozenset(train_keys) if train_keys is not None else train_config_keys()
    _check_keys(data, TOP_KEYS, "the study file")

    name = data.get("name", source.stem if source else None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be letters, digits, '.', '_' or '-', got {name!r}")
    out_dir = _optional_path(data.get("out_dir", f"runs/study_{name}"), "out_dir")
    assert out_dir is not None
    data_dir = _optional_path(data.get("data_dir"), "data_dir")
    prepare, prepare_options = _prepare(data)
    trunk = _trunk(data, keys)
    if data_dir is None and prepare is None:
        raise ValueError('the study needs data: set data_dir = PATH or prepare = "stdlib"')
    fork_step = _fork_step(data, trunk.checkpoint)
    from_scratch = fork_step is None and trunk.checkpoint is None
    tokens_per_arm, iters_per_arm = _budget(data)
    if "seeds" not in data:
        raise ValueError("seeds is required: a count (seeds = 3) or a list (seeds = [0, 1, 2])")
    seeds = _seeds(data["seeds"])
    arms, baseline = _arms(data, keys, from_scratch)
    train = _train_table(data.get("train", {}), "[train]", keys, allow_loss=False)
    sweep = _sweep(data.get("sweep"), arms, train, from_scratch) if "sweep" in data else None
    primary, min_effect = _primary(data, sweep)
    return StudySpec(
        name=name,
        out_dir=out_dir,
        arms=arms,
        seeds=seeds,
        data_dir=data_dir,
        prepare=prepare,
        prepare_options=prepare_options,
        fork_step=fork_step,
        tokens_per_arm=tokens_per_arm,
        iters_per_arm=iters_per_arm,
        baseline=baseline,
        train=train,
        trunk=trunk,
        eval=_eval(data.get("eval")),
        source=source,
        sweep=sweep,
        executor=parse_executor(data.get("executor")),
        primary=primary,
        min_effect=min_effect,
    )


def load_spec(path: str | Path, **overrides: Any) -> StudySpec:
    """Read and check a STUDY.toml; ``overrides`` replace top-level keys (e.g. ``out_dir``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file not found: {path}")
    data = read_toml(path)
    data.update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items() if v is not None})
    try:
        return parse_spec(data, source=path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
