"""The numbers of a report, as summary.json holds them: per arm and metric the mean ± sd over
seeds, per arm the difference from the baseline with its interval (paired by seed when the
seeds allow it, Welch's unpaired interval otherwise), training stability, cost, the data the
runs were trained on and their samples side by side.

Everything here is computed from `RunRecord`s alone, so the same runs give the same numbers
whoever trained them (the cost block, measured time, is the exception).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpls.eval.generation import GENERATION_METRICS
from dpls.study.records import (
    DIRECTION,
    EVAL_METRICS,
    GENERATION,
    SAMPLE_PROMPTS,
    TRAIN_LOG_METRICS,
    RunRecord,
)
from dpls.study.spec import LOSS_KEYS
from dpls.study.spikes import pooled_spikes, run_spikes, spike_rule
from dpls.study.stats import Interval, is_finite_number, mean_sd, paired_ci, welch_ci


def _stability(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Loss spikes (the trainer's count), gradient-norm statistics, skipped and non-finite steps of one run."""
    grads = [float(r["grad_norm"]) for r in rows if is_finite_number(r.get("grad_norm"))]
    return {
        "logged_steps": len(rows),
        "loss_spikes": run_spikes(rows),
        "nonfinite_loss": sum(1 for r in rows if "loss" in r and not is_finite_number(r.get("loss"))),
        "skipped": int(sum(float(r.get("skipped") or 0) for r in rows if is_finite_number(r.get("skipped")))),
        "grad_norms": grads,
    }


def _pooled_stability(runs: Sequence[RunRecord]) -> dict[str, Any]:
    per_run = [_stability(r.train_rows) for r in runs]
    grads = np.array([g for s in per_run for g in s["grad_norms"]], dtype=np.float64)
    return {
        "logged_steps": sum(s["logged_steps"] for s in per_run),
        "loss_spikes": pooled_spikes(s["loss_spikes"] for s in per_run),
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


def direction(metric: str) -> int:
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
    common = sorted(s for s in set(a) & set(b) if s is not None) if unique else []
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
            d = direction(m)
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
        "spike_rule": spike_rule(r for runs in groups.values() for r in runs),
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


def _samples_side_by_side(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, Any] | None:
    """The first prompts' samples of every arm, from the smallest seed all arms have samples
    for (the same prompts and the same random numbers), or None."""
    by_arm = {
        a: {r.seed: r.samples for r in runs if r.samples and r.samples.get("samples")}
        for a, runs in groups.items()
    }
    common = set.intersection(*(set(s) for s in by_arm.values())) if by_arm else set()
    seeds = [s for s in common if s is not None]
    if not seeds:
        return None
    seed = min(seeds)
    first = next(iter(by_arm.values()))[seed]
    n = min(SAMPLE_PROMPTS, *(len(s[seed]["samples"]) for s in by_arm.values()))
    return {
        "seed": seed,
        "settings": first.get("settings", {}),
        "prompts": first["prompts"][:n],
        "arms": {a: s[seed]["samples"][:n] for a, s in by_arm.items()},
    }
