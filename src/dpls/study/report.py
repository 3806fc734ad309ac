"""From finished runs to an answer: report.md, summary.json and the plots.

Input is a study directory (its ``study_state.json`` says which run is which arm and seed)
or any list of run directories (``dpls compare``): runs are then grouped by their loss
configuration and matched by ``seed``. For every evaluation metric (plus the last
validation CE of the training log and each lm-eval task) the report gives each arm's mean
± sd over seeds and its difference from the baseline arm with a 95% interval: paired by
seed when every arm has each seed once, Welch's unpaired interval otherwise (and it says
so). Then one sentence per arm: which differences are larger than their interval.

Training behaviour comes from ``metrics.jsonl``: validation-CE curves, the ε in force,
stability (loss spikes, gradient norms, skipped steps) and cost (tokens/s).
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpls._io import check_output_dir, forget_owned, mark_owned, write_owned_json, write_owned_text
from dpls.eval.generation import GENERATION_METRICS
from dpls.eval.metrics import METRIC_KEYS
from dpls.runs.layout import (
    EVAL_DIR,
    EVAL_FILE,
    METRICS_FILE,
    TOKENIZER_DIR,
    config_path,
    is_run_dir,
    metrics_path,
    read_diverged,
    read_metrics,
    read_run_config,
)
from dpls.study.plots import plot_curves, plot_reliability
from dpls.study.spec import LOSS_KEYS
from dpls.study.state import LM_EVAL_FILE, SAMPLES_FILE, is_study_dir, read_state
from dpls.study.stats import EFFECT_LARGER, Interval, is_finite_number, mean_sd, paired_ci, welch_ci
from dpls.study.sweep import SWEEP_PLOTS

# The evaluation metrics in metrics.json order; "tokens" is a count, reported but not compared.
EVAL_METRICS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if k != "tokens")
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
    TRAIN_LOG_METRIC: -1,
    BEST_VAL_METRIC: -1,
}

# Loss spikes: a logged loss above (1 + SPIKE_REL) × the median of the previous SPIKE_WINDOW.
SPIKE_WINDOW = 20
SPIKE_REL = 0.10


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
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
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
    from dpls.eval.evaluate import output_paths

    bins_file = output_paths(eval_file)["bins"]
    if not bins_file.is_file():
        return None
    try:
        bins = json.loads(bins_file.read_text()).get("reliability")
    except (json.JSONDecodeError, AttributeError):
        return None
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
    reliability = samples = None
    eval_file = find_eval_file(run_dir)
    if eval_file is not None:
        data = json.loads(eval_file.read_text())
        metrics.update(
            {k: float(data[k]) for k in (*EVAL_METRICS, "tokens") if is_finite_number(data.get(k))}
        )
        reliability = _reliability(eval_file)
        lm_file = eval_file.parent / LM_EVAL_FILE
        if lm_file.is_file():
            lm = json.loads(lm_file.read_text())
            metrics.update({f"lm_eval/{k}": float(v) for k, v in lm.items() if is_finite_number(v)})
        samples_file = eval_file.parent / SAMPLES_FILE
        if samples_file.is_file():
            samples = json.loads(samples_file.read_text())
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
        "data_dir",
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
    """Records from a study directory, or from run directories (a study directory expands to its runs)."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    records: list[RunRecord] = []
    info: dict[str, Any] = {}
    for s in sources:
        s = Path(s)
        if is_study_dir(s):
            state = read_state(s)
            info.update(name=state.name, baseline=state.baseline, arms=state.arms, fork_step=state.fork_step)
            if state.sweep:
                info["sweep"] = state.sweep
            trunk = s / state.trunk_dir
            if state.trunk_dir and metrics_path(trunk).is_file():
                info["trunk"] = load_run(trunk, arm="trunk")
            for entry in state.runs:
                if (s / entry.run_dir).is_dir():
                    records.append(load_run(s / entry.run_dir, arm=entry.arm, seed=entry.seed))
                    records[-1].value = entry.value
        else:
            records.append(load_run(s))
    if not records:
        raise ValueError(f"no finished runs found in {', '.join(map(str, sources))}")
    return records, info


# -- statistics ---------------------------------------------------------------------------------


def _stability(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Loss spikes, gradient-norm statistics, skipped and non-finite steps of one run."""
    losses = [float(r["loss"]) for r in rows if is_finite_number(r.get("loss"))]
    spikes = 0
    for i in range(5, len(losses)):  # a few logged steps of history before judging
        median = statistics.median(losses[max(0, i - SPIKE_WINDOW) : i])
        spikes += losses[i] > (1.0 + SPIKE_REL) * median
    grads = [float(r["grad_norm"]) for r in rows if is_finite_number(r.get("grad_norm"))]
    return {
        "logged_steps": len(rows),
        "loss_spikes": spikes,
        "nonfinite_loss": sum(1 for r in rows if "loss" in r and not is_finite_number(r.get("loss"))),
        "skipped": int(sum(float(r.get("skipped") or 0) for r in rows if is_finite_number(r.get("skipped")))),
        "grad_norms": grads,
    }


def _pooled_stability(runs: Sequence[RunRecord]) -> dict[str, Any]:
    per_run = [_stability(r.train_rows) for r in runs]
    grads = np.array([g for s in per_run for g in s["grad_norms"]], dtype=np.float64)
    return {
        "logged_steps": sum(s["logged_steps"] for s in per_run),
        "loss_spikes": sum(s["loss_spikes"] for s in per_run),
        "nonfinite_loss": sum(s["nonfinite_loss"] for s in per_run),
        "skipped": sum(s["skipped"] for s in per_run),
        "grad_norm_mean": float(grads.mean()) if grads.size else None,
        "grad_norm_p99": float(np.quantile(grads, 0.99)) if grads.size else None,
        "grad_norm_max": float(grads.max()) if grads.size else None,
    }


def _cost(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Median throughput over logged steps (the first one, with start-up costs, left out)."""
    tps = [
        float(r["tokens_per_s"])
        for run in runs
        for r in run.train_rows[1:]
        if is_finite_number(r.get("tokens_per_s"))
    ]
    mfu = [float(r["mfu"]) for run in runs for r in run.train_rows[1:] if is_finite_number(r.get("mfu"))]
    return {
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfu) if mfu else None,
    }


def _metric_names(groups: Mapping[str, Sequence[RunRecord]]) -> list[str]:
    present = {k for runs in groups.values() for r in runs for k in r.metrics}
    ordered = [k for k in (*EVAL_METRICS, *TRAIN_LOG_METRICS) if k in present]
    ordered += [GENERATION + k for k in GENERATION_METRICS if GENERATION + k in present]
    return ordered + sorted(k for k in present if k.startswith("lm_eval/"))


def _direction(metric: str) -> int:
    if metric in DIRECTION:
        return DIRECTION[metric]
    parts = metric.split("/")
    name = parts[2] if parts[0] == "lm_eval" and len(parts) > 2 else parts[-1]  # lm_eval/task/metric[/filter]
    if name.startswith(("acc", "exact_match", "f1", "mcc")):
        return +1
    if "perplexity" in name or name in ("ppl", "bits_per_byte", "byte_perplexity"):
        return -1
    return 0


def _compare(
    arm: Sequence[RunRecord], base: Sequence[RunRecord], metric: str, confidence: float, method: str
) -> tuple[Interval | None, str | None]:
    """The arm − baseline interval for one metric, paired by seed when the seeds allow it."""
    a = {r.seed: r.metrics[metric] for r in arm if metric in r.metrics}
    b = {r.seed: r.metrics[metric] for r in base if metric in r.metrics}
    a_vals = [r.metrics[metric] for r in arm if metric in r.metrics]
    b_vals = [r.metrics[metric] for r in base if metric in r.metrics]
    if not a_vals or not b_vals:
        return None, None
    unique = len(a) == len(a_vals) and len(b) == len(b_vals) and None not in a and None not in b
    common = sorted(set(a) & set(b)) if unique else []
    if common:
        note = None
        if len(common) < max(len(a), len(b)):
            note = f"paired on the {len(common)} seeds both have ({common}); the others are left out"
        return paired_ci(
            [a[s] for s in common], [b[s] for s in common], confidence=confidence, method=method
        ), note
    return welch_ci(a_vals, b_vals, confidence=confidence), "no common seeds: unpaired (Welch) interval"


def summarize(
    groups: Mapping[str, Sequence[RunRecord]],
    baseline: str,
    *,
    confidence: float = 0.95,
    method: str = "t",
) -> dict[str, Any]:
    """The numbers of the report, as summary.json holds them."""
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the arms {sorted(groups)}")
    metrics = _metric_names(groups)
    arms: dict[str, Any] = {}
    for name, runs in groups.items():
        per_metric = {}
        for m in metrics:
            vals = [(r.seed, r.metrics[m]) for r in runs if m in r.metrics]
            if vals:
                mean, sd = mean_sd([v for _, v in vals])
                per_metric[m] = {
                    "mean": mean,
                    "sd": sd,
                    "n": len(vals),
                    "seeds": [s for s, _ in vals],
                    "values": [v for _, v in vals],
                }
        arms[name] = {
            "runs": [str(r.run_dir) for r in runs],
            "seeds": [r.seed for r in runs],
            "loss_config": {k: runs[0].config[k] for k in LOSS_KEYS if k in runs[0].config},
            "metrics": per_metric,
            "stability": _pooled_stability(runs),
            "cost": _cost(runs),
        }
    differences: dict[str, Any] = {}
    notes: set[str] = set()
    paired = True
    for name, runs in groups.items():
        if name == baseline:
            continue
        differences[name] = {}
        for m in metrics:
            interval, note = _compare(runs, groups[baseline], m, confidence, method)
            if interval is None:
                continue
            paired &= interval.paired
            if note:
                notes.add(f"{name} vs {baseline}: {note}")
            d = _direction(m)
            better = None if d == 0 or interval.mean == 0 else (interval.mean * d > 0)
            differences[name][m] = {**interval.to_dict(), "better": better, "direction": d}
    base_tps = arms[baseline]["cost"]["tokens_per_s"]
    for a in arms.values():
        tps = a["cost"]["tokens_per_s"]
        a["cost"]["relative_to_baseline"] = tps / base_tps if tps and base_tps else None
    return {
        "baseline": baseline,
        "confidence": confidence,
        "method": method if paired else "welch",
        "paired": paired,
        "metrics": metrics,
        "arms": arms,
        "differences": differences,
        "notes": sorted(notes),
        "samples": _samples_side_by_side(groups),
        "data": _data_provenance(groups),
        "spike_rule": f"loss > {1 + SPIKE_REL:.2f} × median of the previous {SPIKE_WINDOW} logged losses",
    }


def _data_provenance(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, Any]:
    """The corpus fingerprint the runs share (None when they differ or none is recorded), every
    fingerprint seen, and the sources and Pythons of the data: numbers measured on different
    corpora (the stdlib corpus of two Python builds, say) are not comparable."""
    records = [r for runs in groups.values() for r in runs]
    prints = sorted(
        {str(r.data.get("corpus_fingerprint")) for r in records if r.data.get("corpus_fingerprint")}
    )
    unknown = sum(1 for r in records if not r.data.get("corpus_fingerprint"))
    return {
        "corpus_fingerprint": prints[0] if len(prints) == 1 and not unknown else None,
        "corpus_fingerprints": prints,
        "runs_without_fingerprint": unknown,
        "sources": sorted({str(r.data["source"]) for r in records if r.data.get("source")}),
        "python": sorted({str(r.data["python"]) for r in records if r.data.get("python")}),
    }


def data_line(summary: Mapping[str, Any]) -> str | None:
    """One sentence on the data the numbers were measured on (None when nothing is known)."""
    data = summary.get("data") or {}
    prints = data.get("corpus_fingerprints") or []
    if not prints:
        return None
    where = ", ".join(data.get("sources") or []) or "?"
    if data.get("python"):
        where += f" ({', '.join(data['python'])})"
    if len(prints) == 1:
        line = f"Data: {where}, corpus fingerprint `{prints[0]}`"
        if data.get("runs_without_fingerprint"):
            line += f" ({data['runs_without_fingerprint']} runs record none)"
        return line + "."
    return (
        f"Data: the runs were trained on {len(prints)} different corpora "
        f"({', '.join(f'`{p}`' for p in prints)}; {where}): their numbers are not comparable."
    )


def _samples_side_by_side(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, Any] | None:
    """The first prompts' samples of every arm, from the smallest seed all arms have samples
    for (the same prompts and the same random numbers), or None."""
    by_arm = {
        a: {r.seed: r.samples for r in runs if r.samples and r.samples.get("samples")}
        for a, runs in groups.items()
    }
    common = set.intersection(*(set(s) for s in by_arm.values())) if by_arm else set()
    common.discard(None)
    if not common:
        return None
    seed = min(common)
    first = next(iter(by_arm.values()))[seed]
    n = min(SAMPLE_PROMPTS, *(len(s[seed]["samples"]) for s in by_arm.values()))
    return {
        "seed": seed,
        "settings": first.get("settings", {}),
        "prompts": first["prompts"][:n],
        "arms": {a: s[seed]["samples"][:n] for a, s in by_arm.items()},
    }


# -- writing ------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False, digits: int = 4) -> str:
    """``digits`` significant digits, in plain notation from 1e-4 up (thousands separated)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    sign = "+" if signed else ""
    if x != 0 and abs(x) < 1e-4:
        return f"{x:{sign}.{digits - 1}e}"
    if abs(x) >= 10**digits:
        return f"{x:{sign},.0f}"
    return f"{x:{sign}.{digits}g}"


def _interval_cell(d: Mapping[str, Any]) -> str:
    if d["low"] is None:
        return f"{_fmt(d['mean'], True)} [undefined]"
    cell = f"{_fmt(d['mean'], True)} [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]"
    return f"**{cell}**" if d["effect"] == EFFECT_LARGER else cell


def _sentence(arm: str, baseline: str, diffs: Mapping[str, Mapping[str, Any]]) -> str:
    def describe(m: str, d: Mapping[str, Any]) -> str:
        verdict = {True: "better", False: "worse", None: ""}[d["better"]]
        return f"{m} ({_fmt(d['mean'], True)}{', ' + verdict if verdict else ''})"

    larger = [describe(m, d) for m, d in diffs.items() if d["effect"] == EFFECT_LARGER]
    undefined = [m for m, d in diffs.items() if d["low"] is None]
    rest = [m for m, d in diffs.items() if d["effect"] != EFFECT_LARGER and d["low"] is not None]
    parts = [f"**{arm}** − **{baseline}**:"]
    if undefined and not larger and not rest:
        parts.append(f"with one seed no difference has an interval ({', '.join(undefined)}); run more seeds.")
        return " ".join(parts)
    parts.append(
        f"larger than their interval: {', '.join(larger)}."
        if larger
        else "no difference is larger than its interval."
    )
    if rest:
        parts.append(f"Not larger than their interval: {', '.join(rest)}.")
    if undefined:
        parts.append(f"Undefined (one seed): {', '.join(undefined)}.")
    return " ".join(parts)


def findings_lines(summary: Mapping[str, Any]) -> list[str]:
    """How the differences were taken, then one sentence per arm: which are larger than their interval."""
    base = summary["baseline"]
    others = [a for a in summary["arms"] if a != base]
    conf = round(100 * summary["confidence"])
    how = (
        f"paired by seed, {conf}% {'t' if summary['method'] == 't' else summary['method']} interval"
        if summary["paired"]
        else f"unpaired, {conf}% Welch interval"
    )
    lines = [
        f"Differences are arm − **{base}**, {how}; **bold**: larger than its interval "
        "(the interval excludes 0).",
        "",
    ]
    lines += [f"- {_sentence(a, base, summary['differences'][a])}" for a in others] + [""]
    lines += [
        "Each interval covers its own metric; with a dozen metrics per arm, about one in "
        f"{round(1 / (1 - summary['confidence']))} intervals excludes 0 by chance alone, "
        "and with few seeds the t interval is wide (t₀.₉₇₅ = 12.7 for two seeds, 4.30 for three).",
        "",
    ]
    return lines


def evaluation_table_lines(summary: Mapping[str, Any]) -> list[str]:
    """Each arm's mean ± sd per metric, and each arm's difference from the baseline with its interval."""
    base = summary["baseline"]
    arms = list(summary["arms"])
    others = [a for a in arms if a != base]
    header = ["metric", *arms, *(f"Δ {a}" for a in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in summary["metrics"]:
        row = [m + {1: " ↑", -1: " ↓"}.get(_direction(m), "")]
        for a in arms:
            s = summary["arms"][a]["metrics"].get(m)
            row.append(
                "n/a"
                if s is None
                else _fmt(s["mean"]) + ("" if s["sd"] is None else f" ± {_fmt(s['sd'], digits=2)}")
            )
        for a in others:
            d = summary["differences"][a].get(m)
            row.append("n/a" if d is None else _interval_cell(d))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _code_cell(text: str) -> str:
    """Text in a markdown table cell, exactly: HTML-escaped, line breaks shown as ⏎."""
    body = html.escape(text).replace("|", "&#124;").replace("\n", "⏎")
    return f"<code>{body}</code>" if body else "(nothing)"


def samples_lines(summary: Mapping[str, Any]) -> list[str]:
    """The "Samples" section: each prompt's continuation by every arm, side by side."""
    block = summary.get("samples")
    if not block:
        return []
    arms = list(block["arms"])
    settings = block.get("settings", {})
    lines = [
        "## Samples",
        "",
        f"The openings ({settings.get('prompt_tokens', '?')} tokens) of the first validation documents, "
        f"continued by every arm's seed-{block['seed']} run with the same random numbers "
        f"(temperature {settings.get('temperature', '?')}, at most {settings.get('max_new_tokens', '?')} "
        "new tokens, ending at <|endoftext|>). The `generation/` rows of the evaluation table measure "
        f"{settings.get('num_samples', '?')} such samples per run: distinct n-grams over all n-grams "
        "(distinct_1/2/3), the share of 4-grams repeated within a sample (repetition_4) and the "
        "mean length in tokens before <|endoftext|>.",
        "",
        "| prompt | " + " | ".join(arms) + " |",
        "|" + "---|" * (len(arms) + 1),
    ]
    for i, prompt in enumerate(block["prompts"]):
        cells = [_code_cell(prompt), *(_code_cell(block["arms"][a][i]) for a in arms)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _markdown(summary: Mapping[str, Any], title: str, plots: Mapping[str, str]) -> str:
    base = summary["baseline"]
    arms = list(summary["arms"])
    lines = [f"# {title}", ""]
    seeds = {a: summary["arms"][a]["seeds"] for a in arms}
    lines.append(
        "Arms: "
        + ", ".join(
            f"**{a}** ({len(s)} run{'s' if len(s) != 1 else ''}, seeds {s})" for a, s in seeds.items()
        )
        + "."
    )
    if summary.get("sweep"):
        from dpls.study.sweep import sweep_section_lines

        sw = summary["sweep"]
        lines += ["", *sweep_section_lines(sw, sw.get("plots"))]
        lines.append(
            f"The sections below compare the arms at {sw['key']} = {sw['reference_value']} "
            f"(the best value of **{base}**)."
        )
    if data_line(summary):
        lines += ["", data_line(summary)]
    lines += ["", "## Findings", "", *findings_lines(summary)]
    if summary["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in summary["notes"]] + [""]

    lines += [
        "## Evaluation",
        "",
        "Mean ± sd over seeds (the metrics of the final evaluation; "
        f"`{TRAIN_LOG_METRIC}` is the last validation CE of the training log, `{BEST_VAL_METRIC}` "
        f"its lowest and `{BEST_STEP_METRIC}` the step of that lowest: a best below the final "
        "value means the curve turned upward).",
        "",
    ]
    lines += evaluation_table_lines(summary)
    lines += samples_lines(summary)

    lines += [
        "## Training stability",
        "",
        f"Loss spike: {summary['spike_rule']}. Gradient norms as logged, pooled over seeds.",
        "",
    ]
    lines += [
        "| arm | logged steps | loss spikes | non-finite | skipped | grad-norm mean | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        s = summary["arms"][a]["stability"]
        lines.append(
            f"| {a} | {s['logged_steps']} | {s['loss_spikes']} | {s['nonfinite_loss']} | {s['skipped']} | "
            f"{_fmt(s['grad_norm_mean'])} | {_fmt(s['grad_norm_p99'])} | {_fmt(s['grad_norm_max'])} |"
        )
    lines += [
        "",
        "## Cost",
        "",
        "Median training tokens/s over logged steps (the first one left out). The ratio to "
        f"**{base}** is a fair comparison only for runs that shared a machine.",
        "",
    ]
    lines += ["| arm | tokens/s | × baseline | MFU |", "|---|---|---|---|"]
    for a in arms:
        c = summary["arms"][a]["cost"]
        lines.append(
            f"| {a} | {_fmt(c['tokens_per_s'])} | {_fmt(c['relative_to_baseline'])} | {_fmt(c['mfu'])} |"
        )
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for caption, file in plots.items():
            lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------


# Every file `write_report` may write: checked before any of them is.
REPORT_FILES = (
    "report.md",
    "summary.json",
    "val_ce.png",
    "reliability.png",
    "epsilon.png",
    "train_ce.png",
    *SWEEP_PLOTS,
)


def write_report(
    source: str | Path | Sequence[str | Path] | Sequence[RunRecord],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    confidence: float = 0.95,
    method: str = "t",
    title: str | None = None,
) -> Path:
    """Write report.md, summary.json and PNG plots to ``out_dir``; returns the report.md path.

    ``source``: a study directory, run directories, or already loaded `RunRecord`s.
    ``baseline``: the arm differences are taken against (default: the study's, else the
    first CE arm, else the first arm).
    """
    info: dict[str, Any] = {}
    if (
        isinstance(source, Sequence)
        and not isinstance(source, str)
        and source
        and isinstance(source[0], RunRecord)
    ):
        records = list(source)  # type: ignore[arg-type]
    else:
        records, info = collect_runs(source)  # type: ignore[arg-type]
    out = Path(out_dir)
    check_output_dir(out, REPORT_FILES, "out")
    sweep = None
    if info.get("sweep"):  # the sweep's own section; the other sections compare at one value
        from dpls.study.sweep import sweep_report

        out.mkdir(parents=True, exist_ok=True)
        sweep, records = sweep_report(
            records, info["sweep"], baseline or info.get("baseline"), info.get("arms", []), out, confidence
        )
    groups = group_runs(records)
    if "name" not in info:  # runs from anywhere (a study's arms are made alike by the study)
        check_poolable(groups)
    order = [a for a in info.get("arms", []) if a in groups]
    groups = {a: groups[a] for a in [*order, *(g for g in groups if g not in order)]}
    if baseline is None:
        baseline = info.get("baseline") or next(
            (n for n, runs in groups.items() if runs[0].config.get("loss", "ce") == "ce"), next(iter(groups))
        )
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the arms {sorted(groups)}")
    summary = summarize(groups, baseline, confidence=confidence, method=method)
    title = title or (f"Study {info['name']}" if "name" in info else "Comparison of runs")
    summary["title"] = title
    if sweep is not None:
        summary["sweep"] = sweep

    out.mkdir(parents=True, exist_ok=True)
    trunk = info.get("trunk")
    plots: dict[str, str] = {}
    if plot_curves(
        groups,
        "val_rows",
        "val_ce",
        "validation CE (nats/token)",
        "Validation cross-entropy (thick: mean over seeds; thin: each seed)",
        out / "val_ce.png",
        trunk,
    ):
        plots["Validation cross-entropy"] = "val_ce.png"
    if plot_reliability(groups, summary, out / "reliability.png"):
        plots["Reliability diagrams (pooled over seeds)"] = "reliability.png"
    if plot_curves(
        groups,
        "train_rows",
        "epsilon",
        "ε in force",
        "Smoothing ε in force over training",
        out / "epsilon.png",
    ):
        plots["ε in force"] = "epsilon.png"
    if plot_curves(
        groups,
        "train_rows",
        "ce",
        "training CE (nats/token)",
        "Training CE of the batches",
        out / "train_ce.png",
        trunk,
    ):
        plots["Training cross-entropy"] = "train_ce.png"
    summary["plots"] = plots

    write_owned_json(out / "summary.json", summary, default=_json_default)
    report = write_owned_text(out / "report.md", _markdown(summary, title, plots))
    written = {out / name for name in [*plots.values(), *(sweep or {}).get("plots", {}).values()]}
    mark_owned(*written)
    forget_owned(*(out / n for n in REPORT_FILES if n.endswith(".png") and out / n not in written))
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def iter_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (a path holding several runs expands to them)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_study_dir(p) or is_run_dir(p):
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.glob(f"*/{METRICS_FILE}")))
    return out
