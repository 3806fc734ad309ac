"""Reading finished runs: one `RunRecord` per run directory, grouped into arms.

A run directory gives its configuration (``config.toml``), its training log (``metrics.jsonl``),
its final evaluation (``eval/metrics.json`` with the reliability bins beside it, lm-eval scores
and generation samples) and, for a study's runs, the study's own record of how it was run
(``study_jobs.json``: the executor and thread count of every attempt). A study directory
(``study_state.json``) says which run is which arm, seed and swept value, and which runs
are complete; runs that are not are left out and named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpls.eval.evaluate import output_paths
from dpls.eval.metrics import EXTRA_METRIC_KEYS, METRIC_KEYS
from dpls.runs.layout import (
    EVAL_DIR,
    EVAL_FILE,
    TOKENIZER_DIR,
    config_path,
    is_run_dir,
    metrics_path,
    read_diverged,
    read_json,
    read_metrics,
    read_run_config,
)
from dpls.study.spec import LOSS_KEYS, NEUTRAL_KEYS
from dpls.study.state import (
    COMPLETE,
    FAILED,
    LM_EVAL_FILE,
    SAMPLES_FILE,
    RunEntry,
    is_study_dir,
    read_state,
    training_threads,
)
from dpls.study.stats import is_finite_number

FREQUENCY_KEY = "ce_by_frequency"
# The evaluation metrics in metrics.json order; "tokens" is a count, reported but not compared;
# "ce_by_frequency" is a list of bins, compared bin by bin (`dpls.study.frequency`).
EVAL_METRICS: tuple[str, ...] = tuple(
    k for k in (*METRIC_KEYS, *EXTRA_METRIC_KEYS) if k not in ("tokens", FREQUENCY_KEY)
)
TRAIN_LOG_METRIC = "final_val_ce"  # the last val_ce of metrics.jsonl: there even without `dpls eval`
# The lowest val_ce of the run's own training log and the step it was logged at: beside
# final_val_ce they show overfitting (the curve turned upward when best < final).
BEST_VAL_METRIC = "best_val_ce"
BEST_STEP_METRIC = "best_val_ce_step"
TRAIN_LOG_METRICS = (TRAIN_LOG_METRIC, BEST_VAL_METRIC, BEST_STEP_METRIC)
GENERATION = (
    "generation/"  # generation metrics of the run's samples (samples.json), e.g. generation/distinct_2
)
SAMPLE_PROMPTS = 3  # prompts whose samples the report shows side by side

# +1: higher is better, −1: lower is better; absent: neither (entropy, temperature).
DIRECTION: dict[str, int] = {
    "loss": -1,
    "ppl": -1,
    "top1_acc": +1,
    "ece": -1,
    "ece_adaptive": -1,
    "brier": -1,
    "loss_at_best_temperature": -1,
    "aurc": -1,  # risk (error rate) averaged over coverage
    "auroc": +1,
    "aurc_at_best_temperature": -1,
    "auroc_at_best_temperature": +1,
    "bits_per_byte": -1,
    TRAIN_LOG_METRIC: -1,
    BEST_VAL_METRIC: -1,
}

# -- reading runs -------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """Everything the report needs from one run directory."""

    run_dir: Path
    arm: str
    seed: int | None
    config: dict[str, Any]
    train_rows: list[dict[str, Any]]  # metrics.jsonl rows with a training loss
    val_rows: list[dict[str, Any]]  # metrics.jsonl rows with val_ce
    metrics: dict[str, float] = field(default_factory=dict)  # final evaluation + lm-eval + generation
    reliability: dict[str, list[float]] | None = None
    samples: dict[str, Any] | None = None  # samples.json: prompts, samples, generation metrics
    value: Any = None  # the swept key's value ([sweep] studies)
    diverged: dict[str, Any] | None = None  # RUN/diverged.json: where and why it diverged
    data: dict[str, Any] = field(default_factory=dict)  # corpus fingerprint and source of its data
    threads: list[int] = field(default_factory=list)  # torch threads of each training attempt (studies)
    by_frequency: list[dict[str, Any]] | None = None  # the evaluation's ce_by_frequency bins


def run_data(run_dir: Path) -> dict[str, Any]:
    """What the run was trained on, from the meta.json copied into ``RUN/tokenizer/``: the
    corpus fingerprint (equal fingerprints: the same tokens), the source and, for the stdlib
    corpus, the Python it came from. Empty for runs without that copy."""
    try:
        meta = json.loads((run_dir / TOKENIZER_DIR / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    settings = meta["settings"] if isinstance(meta.get("settings"), dict) else {}
    out = {"corpus_fingerprint": meta.get("corpus_fingerprint"), "source": meta.get("source")}
    if settings.get("python"):
        out["python"] = settings["python"]
    return out


def find_eval_file(run_dir: Path) -> Path | None:
    """The run's final evaluation: RUN/eval/metrics.json, RUN/metrics.json, else the newest one below RUN."""
    for candidate in (run_dir / EVAL_DIR / EVAL_FILE, run_dir / EVAL_FILE):
        if candidate.is_file():
            return candidate
    found = sorted(run_dir.rglob(EVAL_FILE), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


_BIN_KEYS = ("lower", "upper", "count", "confidence", "accuracy")


def _reliability(eval_file: Path) -> dict[str, list[float]] | None:
    """Equal-width reliability bins from the ``<stem>_bins.json`` that ``dpls eval`` writes beside metrics.json."""
    bins_file = output_paths(eval_file)["bins"]
    if not bins_file.is_file():
        return None
    doc = read_json(bins_file)  # damaged: an error naming it, never a report without it
    bins = doc.get("reliability") if isinstance(doc, dict) else None
    if not isinstance(bins, Mapping) or not all(k in bins for k in _BIN_KEYS):
        return None
    return {k: [float("nan") if v is None else float(v) for v in bins[k]] for k in _BIN_KEYS}


def load_run(run_dir: str | Path, *, arm: str | None = None, seed: int | None = None) -> RunRecord:
    """Read a run directory: config.toml, metrics.jsonl, and its evaluation if there is one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no config.toml or metrics.jsonl)")
    config = read_run_config(run_dir) if config_path(run_dir).is_file() else {}
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r and "step" in r]
    val_rows = [r for r in rows if is_finite_number(r.get("val_ce")) and "step" in r]
    metrics: dict[str, float] = {}
    reliability = samples = by_frequency = None
    eval_file = find_eval_file(run_dir)
    if eval_file is not None:
        data = read_json(eval_file)
        metrics.update(
            {k: float(data[k]) for k in (*EVAL_METRICS, "tokens") if is_finite_number(data.get(k))}
        )
        reliability = _reliability(eval_file)
        if isinstance(data.get(FREQUENCY_KEY), list):
            by_frequency = [b for b in data[FREQUENCY_KEY] if isinstance(b, dict)]
        lm_file = eval_file.parent / LM_EVAL_FILE
        if lm_file.is_file():
            lm = read_json(lm_file)
            metrics.update({f"lm_eval/{k}": float(v) for k, v in lm.items() if is_finite_number(v)})
        samples_file = eval_file.parent / SAMPLES_FILE
        if samples_file.is_file():
            samples = read_json(samples_file)
            gen = samples.get("metrics", {})
            metrics.update({GENERATION + k: float(v) for k, v in gen.items() if is_finite_number(v)})
    if val_rows:
        metrics[TRAIN_LOG_METRIC] = float(val_rows[-1]["val_ce"])
        best = min(val_rows, key=lambda r: float(r["val_ce"]))  # the first of equal ones
        metrics[BEST_VAL_METRIC] = float(best["val_ce"])
        metrics[BEST_STEP_METRIC] = float(best["step"])
    if seed is None and isinstance(config.get("seed"), int):
        seed = int(config["seed"])
    return RunRecord(
        run_dir=run_dir,
        arm=arm or loss_label(config),
        seed=seed,
        config=config,
        train_rows=train_rows,
        val_rows=val_rows,
        metrics=metrics,
        reliability=reliability,
        samples=samples,
        diverged=read_diverged(run_dir),
        data=run_data(run_dir),
        threads=training_threads(run_dir),
        by_frequency=by_frequency,
    )


def loss_label(config: Mapping[str, Any]) -> str:
    """A short name for a run's loss configuration, e.g. ``dpls_eps0.1_k100``."""
    loss = str(config.get("loss", "ce"))
    parts = [loss]
    if loss == "dpls":
        parts += [f"eps{config.get('dpls_epsilon')}", f"k{config.get('dpls_top_k')}"]
        for key in ("dpls_schedule", "dpls_epsilon_mode"):
            if config.get(key) not in (None, "constant"):
                parts.append(str(config[key]))
    elif loss == "ls":
        parts.append(f"eps{config.get('label_smoothing', config.get('dpls_epsilon'))}")
    elif loss == "confidence_penalty":
        parts.append(f"beta{config.get('confidence_penalty_beta')}")
    if is_finite_number(config.get("z_loss")) and config["z_loss"] > 0:
        parts.append(f"z{config['z_loss']}")
    return "_".join(parts)


def _loss_key(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, repr(config.get(k))) for k in LOSS_KEYS)


def group_runs(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by arm (given, or the loss configuration); labels made unique where they clash."""
    groups: dict[Any, list[RunRecord]] = {}
    for r in records:
        key = (r.arm, _loss_key(r.config))
        groups.setdefault(key, []).append(r)
    out: dict[str, list[RunRecord]] = {}
    for runs in groups.values():
        name, i = runs[0].arm, 2
        while name in out:
            name, i = f"{runs[0].arm}#{i}", i + 1
        for r in runs:
            r.arm = name
        out[name] = runs
    return out


# Keys that do not change what a run computes: runs of one arm may differ in them.
_POOLABLE_KEYS = frozenset(
    {
        "out_dir",
        "resume_dir",
        "run_name",
        "seed",
        "data_seed",
        "device",
        "compile",
        "progress",
        "loss_impl",
        "tensorboard",
        "swanlab",
        "swanlab_project",
        "log_interval",
        "eval_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "max_skipped_steps",
        "spike_window",  # what is counted as a loss spike, not what is trained
        "spike_sigmas",
        "data_dir",
        *NEUTRAL_KEYS,
    }
)


def check_poolable(groups: Mapping[str, Sequence[RunRecord]]) -> None:
    """The runs of one arm are seeds of one experiment: same length and settings, each seed
    once. Anything else pooled would be a silently wrong interval: ``ValueError``. (Runs on
    different corpora are reported as such: see the report's data section.)"""
    for arm, runs in groups.items():
        first = runs[0]
        seen: dict[Any, RunRecord] = {}
        for r in runs:
            if r.seed in seen:
                raise ValueError(
                    f"{seen[r.seed].run_dir} and {r.run_dir} are both seed {r.seed} of arm {arm!r}: pooled, one "
                    "seed would count twice; compare them as separate arms (different loss keys) or drop one"
                )
            seen[r.seed] = r
            keys = (set(first.config) | set(r.config)) - _POOLABLE_KEYS
            diff = sorted(k for k in keys if first.config.get(k) != r.config.get(k))
            if diff:
                shown = ", ".join(f"{k}={first.config.get(k)!r} vs {r.config.get(k)!r}" for k in diff[:3])
                raise ValueError(
                    f"{first.run_dir} and {r.run_dir} (arm {arm!r}) differ in {shown}: they are not seeds of one "
                    "experiment; compare runs that differ only in seed and loss keys"
                )


def collect_runs(source: str | Path | Sequence[str | Path]) -> tuple[list[RunRecord], dict[str, Any]]:
    """Records from a study directory, or from run directories (a study directory expands to its
    complete runs; ``info["missing"]`` names the others)."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    records: list[RunRecord] = []
    info: dict[str, Any] = {}
    for s in sources:
        s = Path(s)
        if is_study_dir(s):
            records += _study_records(s, info)
        else:
            records.append(load_run(s))
    if not records:
        raise ValueError(f"no finished runs found in {', '.join(map(str, sources))}")
    return records, info


def _study_records(study: Path, info: dict[str, Any]) -> list[RunRecord]:
    state = read_state(study)
    info.update(name=state.name, baseline=state.baseline, arms=state.arms, fork_step=state.fork_step)
    if state.sweep:
        info["sweep"] = state.sweep
    if state.primary:
        info["primary"] = state.primary
    if state.min_effect is not None:
        info["min_effect"] = state.min_effect
    if state.execution:
        info["execution"] = dict(state.execution)
    trunk = study / state.trunk_dir
    if state.trunk_dir and metrics_path(trunk).is_file():
        info["trunk"] = load_run(trunk, arm="trunk")
    records = []
    for entry in state.runs:
        if entry.status not in COMPLETE or not (study / entry.run_dir).is_dir():
            info.setdefault("missing", []).append(missing_run(entry))
            continue
        records.append(load_run(study / entry.run_dir, arm=entry.arm, seed=entry.seed))
        records[-1].value = entry.value
    return records


def missing_run(entry: RunEntry) -> str:
    """One line on a run the report leaves out: which, why, and where its log is."""
    why = entry.error or ("failed" if entry.status == FAILED else "not finished")
    log = f"; log: {entry.log}" if entry.log else ""
    return f"{entry.run_dir} ({entry.status}: {why}{log})"
