"""Learning-rate sensitivity of a ``[sweep]`` study (Wortsman et al. 2023, arXiv 2309.14322).

Each arm trains once per value of the swept key and per seed. Its loss ``L(v)`` at a value is
the final validation CE of the run (the last ``val_ce`` of its training log); a run that
diverged counts as ``L_init``, the validation CE of its own initial weights (step 0). The
**LR sensitivity** of an arm and seed is

    mean over the grid of min(L(v), L_init)  −  min over the grid of min(L(v), L_init)

(the second term is Wortsman's ``min_v L(v)``; capping it too only matters when every value
is worse than the initial weights). It is 0 when every value trains as well as the best one,
and grows as more of the grid degrades or diverges. An arm's sensitivity is its mean over
seeds; the paired difference from the baseline arm is taken per seed (all arms of a seed
start from the same weights and read the same batches) with a t interval.

Sensitivity is measured from each arm's own best, so it alone would call an arm that trains
worse everywhere "flat". Each arm therefore also gets the paired difference of L(v) from the
baseline at every value, its largest stable value, and a conclusion read from all of them
(`stability_conclusion`). With several swept keys, all of this is read along one axis
(``learning_rate``) at each point of the other keys (say each width).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dpls.study.plots import plot_curves, plot_sweep
from dpls.study.primary import with_power
from dpls.study.records import RunRecord
from dpls.study.spikes import run_spikes
from dpls.study.stats import holm, is_finite_number, paired_ci, sign_test
from dpls.study.tables import fmt
from dpls.train import watch

# Plots of the section: loss against the swept value, and two diagnostics over training.
SWEEP_PLOT = "lr_sweep.png"
DIAGNOSTIC_PLOTS = {"lse_mean": "lse_mean.png", "attn_logit_max": "attn_logit_max.png"}
SWEEP_PLOTS = (SWEEP_PLOT, *DIAGNOSTIC_PLOTS.values())

DIVERGENCE_RULE = (
    "diverged: stopped by the training watch (divergence_window logged training CEs in a row more than 10% "
    "above L_init, or not finite), or a final validation CE that is not finite or, from scratch, more than "
    "10% above L_init; no progress: a final validation CE less than 0.1% below L_init (from scratch: up to "
    "10% above it)"
)
SENSITIVITY_FORMULA = "mean over the grid of min(L(v), L_init) − min over the grid of min(L(v), L_init)"
STABLE_RULE = "the largest value at which no seed's run diverged or ended above L_init"

# How a sweep reads an arm's stability against the baseline's, from the whole grid.
MORE_STABLE = "more_stable"
FLATTER_BECAUSE_WORSE = "flatter_because_worse"
NO_DIFFERENCE = "no_difference"
CONCLUSIONS = (MORE_STABLE, FLATTER_BECAUSE_WORSE, NO_DIFFERENCE)


def lr_sensitivity(losses: Sequence[float | None], initial: float) -> float:
    """Wortsman et al.'s LR sensitivity of one grid: ``losses[i]`` is L at the i-th value,
    ``None`` or non-finite for a diverged run (it counts as ``initial``)."""
    if not losses:
        raise ValueError("lr_sensitivity needs at least one value of the grid")
    if not is_finite_number(initial):
        raise ValueError(f"the initial loss must be a finite number, got {initial!r}")
    capped = [min(float(x), initial) if x is not None and is_finite_number(x) else initial for x in losses]
    return statistics.fmean(capped) - min(capped)


def run_loss(record: RunRecord) -> tuple[float | None, float | None]:
    """(L, L_init) of one run: its final validation CE (None if it diverged, see `run_outcome`)
    and the validation CE at its first logged step."""
    initial = float(record.val_rows[0]["val_ce"]) if record.val_rows else None
    if run_outcome(record) == "diverged":
        return None, initial
    return float(record.val_rows[-1]["val_ce"]), initial


def run_outcome(record: RunRecord) -> str:
    """``"trained"``, ``"no_progress"`` or ``"diverged"`` (`dpls.train.watch.run_outcome`):
    a run from scratch (its first validation at step 0) whose final validation CE ends above
    its L_init has diverged; a forked one may end there by overfitting."""
    rows = record.val_rows
    initial = float(rows[0]["val_ce"]) if rows else None
    final = float(rows[-1]["val_ce"]) if len(rows) >= 2 else None
    from_scratch = bool(rows) and rows[0].get("step") == 0
    return watch.run_outcome(initial, final, from_scratch=from_scratch, stopped=record.diverged is not None)


def _key(value: Any) -> str:
    return repr(value)


def _point(record: RunRecord, seed: int) -> dict[str, Any]:
    """One run of the grid: its L, L_init, the loss it counts with, and its outcome."""
    loss, initial = run_loss(record)
    outcome = run_outcome(record)
    if loss is None:  # diverged (or never validated at the end): the initial loss
        effective = initial
    else:
        effective = loss if initial is None else min(loss, initial)
    return {
        "seed": seed,
        "loss": loss,
        "initial": initial,
        "effective": effective,
        "outcome": outcome,
        "diverged": outcome == "diverged",
        "diverged_step": None if record.diverged is None else record.diverged.get("step"),
        "spikes": run_spikes(record.train_rows),
    }


def _grid(runs: Sequence[RunRecord], values: Sequence[Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per swept value: its runs (one point per seed) and their mean effective loss."""
    by = {(_key(r.value), r.seed): r for r in runs}
    grid = []
    for v in values:
        points = [_point(by[(_key(v), s)], s) for s in seeds if (_key(v), s) in by]
        eff = [float(p["effective"]) for p in points if is_finite_number(p["effective"])]
        spikes = [p["spikes"] for p in points]
        grid.append(
            {
                "value": v,
                "mean": statistics.fmean(eff) if eff else None,
                "points": points,
                "spikes": sum(spikes) if points and None not in spikes else None,
            }
        )
    return grid


def _stable_point(p: Mapping[str, Any]) -> bool:
    """A run that trained: it did not diverge and did not end above its L_init."""
    return (
        not p["diverged"]
        and is_finite_number(p["loss"])
        and (not is_finite_number(p["initial"]) or p["loss"] <= p["initial"])
    )


def _stable(g: Mapping[str, Any]) -> bool:
    """A grid value where every seed's run trained."""
    return bool(g["points"]) and all(_stable_point(p) for p in g["points"])


def _largest_stable_by_seed(grid: Sequence[Mapping[str, Any]]) -> dict[int, Any]:
    """Each seed's largest grid value whose run trained (None: none did)."""
    seeds = sorted({int(p["seed"]) for g in grid for p in g["points"]})
    return {
        s: _largest([g["value"] for g in grid for p in g["points"] if p["seed"] == s and _stable_point(p)])
        for s in seeds
    }


def _sensitivity_by_seed(
    arm: str, grid: Sequence[Mapping[str, Any]], seeds: Sequence[int], notes: list[str]
) -> dict[int, float]:
    """Each seed's LR sensitivity over the whole grid (a seed missing a value is left out, noted)."""
    sens: dict[int, float] = {}
    for s in seeds:
        pts = [next((p for p in g["points"] if p["seed"] == s), None) for g in grid]
        inits = [float(p["initial"]) for p in pts if p is not None and is_finite_number(p["initial"])]
        if any(p is None for p in pts) or not inits:
            notes.append(
                f"{arm}, seed {s}: not every value of the grid has a run; left out of the sensitivity"
            )
            continue
        sens[s] = lr_sensitivity([p["loss"] for p in pts if p is not None], statistics.fmean(inits))
    return sens


def _arm_block(
    grid: list[dict[str, Any]], values: Sequence[Any], sens: Mapping[int, float]
) -> dict[str, Any]:
    """One arm's entry of the sweep block: best value and loss, sensitivity, diverged runs, the grid."""
    finite = [(g["mean"], i) for i, g in enumerate(grid) if is_finite_number(g["mean"])]
    best_i = min(finite)[1] if finite else None
    diverged = [
        {"value": g["value"], "seed": p["seed"], "step": p["diverged_step"]}
        for g in grid
        for p in g["points"]
        if p["diverged"]
    ]
    return {
        "lr_sensitivity": statistics.fmean(sens.values()) if sens else None,
        "best": values[best_i] if best_i is not None else None,
        "best_loss": grid[best_i]["mean"] if best_i is not None else None,
        "diverged": len(diverged),
        "no_progress": sum(p["outcome"] == "no_progress" for g in grid for p in g["points"]),
        "runs": sum(len(g["points"]) for g in grid),
        "best_at_edge": best_i is not None and len(values) > 1 and best_i in (0, len(values) - 1),
        "largest_stable_lr": _largest([g["value"] for g in grid if _stable(g)]),
        "spikes": [g["spikes"] for g in grid],
        "sensitivity_by_seed": {str(s): v for s, v in sens.items()},
        "grid": grid,
        "diverged_runs": diverged,
    }


def _paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float) -> dict[str, Any] | None:
    """The paired difference ``a − b`` over the seeds both have, with its power (None: no seed)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    interval = paired_ci([a[s] for s in common], [b[s] for s in common], confidence=confidence)
    return with_power(interval.to_dict())


def _effective_by_seed(g: Mapping[str, Any]) -> dict[int, float]:
    return {int(p["seed"]): float(p["effective"]) for p in g["points"] if is_finite_number(p["effective"])}


def _best_by_seed(grid: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[int, float]:
    """Each seed's best effective loss over the grid (seeds with the whole grid only)."""
    out: dict[int, float] = {}
    for s in seeds:
        losses = [_effective_by_seed(g).get(s) for g in grid]
        if losses and all(x is not None for x in losses):
            out[s] = min(float(x) for x in losses if x is not None)
    return out


def _excludes(d: Mapping[str, Any] | None, sign: int) -> bool:
    """The interval excludes 0 on the side of ``sign`` (−1: below, +1: above)."""
    return bool(d and d.get("excludes_zero") and d["mean"] * sign > 0)


def _greater(a: Any, b: Any) -> bool:
    """a is a larger stable value than b (None: no stable value at all)."""
    if a is None:
        return False
    if b is None:
        return True
    return is_finite_number(a) and is_finite_number(b) and a > b


def _keeps_larger_stable_value(arm: Mapping[str, Any], base: Mapping[str, Any], confidence: float) -> bool:
    """The arm keeps a larger stable value than the baseline seed by seed: per seed, whose
    largest stable value is larger, by a two-sided sign test (pooled over seeds, one seed's
    divergence would decide it)."""
    a, b = _largest_stable_by_seed(arm["grid"]), _largest_stable_by_seed(base["grid"])
    common = set(a) & set(b)
    wins = sum(_greater(a[s], b[s]) for s in common)
    losses = sum(_greater(b[s], a[s]) for s in common)
    p = sign_test(wins, losses)
    return wins > losses and p is not None and p < 1.0 - confidence


def stability_conclusion(
    arm: Mapping[str, Any], base: Mapping[str, Any], values: Sequence[Any], confidence: float = 0.95
) -> str:
    """Reads an arm's stability from the whole grid, not from its sensitivity alone.

    ``more_stable``: lower L(v) than the baseline at some value above the baseline's best and
    higher at none of them (the paired tests at those values Holm-corrected together, as several
    are looked at), or a larger stable value seed by seed (a sign test). ``flatter_because_worse``:
    a lower sensitivity with a best loss that is worse (interval excluding 0) and no value where
    the arm is better. ``no_difference`` otherwise. Sensitivity is measured from each arm's own
    best, so an arm that trains worse everywhere looks flat without being more stable.
    """
    by_value = arm.get("by_value") or []
    best = base.get("best")
    start = next((i + 1 for i, v in enumerate(values) if _key(v) == _key(best)), len(values))
    high = [d["difference"] for d in by_value[start:]]
    tests = holm([d.get("p_value") for d in high], confidence=confidence)
    better_high = any(t["significant"] and d["mean"] < 0 for d, t in zip(high, tests, strict=True))
    worse_high = any(t["significant"] and d["mean"] > 0 for d, t in zip(high, tests, strict=True))
    larger = _keeps_larger_stable_value(arm, base, confidence)
    if (better_high or larger) and not worse_high:
        return MORE_STABLE
    flatter = (arm.get("difference") or {}).get("mean", 0.0) < 0
    better_anywhere = any(_excludes(d["difference"], -1) for d in by_value)
    if flatter and _excludes(arm.get("best_difference"), +1) and not better_anywhere:
        return FLATTER_BECAUSE_WORSE
    return NO_DIFFERENCE


def _one_key(
    groups: Mapping[str, Sequence[RunRecord]],
    key: str,
    values: Sequence[Any],
    baseline: str,
    confidence: float,
) -> dict[str, Any]:
    """The sweep block of one axis (``run.value`` is the axis value)."""
    arms: dict[str, Any] = {}
    per_seed: dict[str, dict[int, float]] = {}
    best_seed: dict[str, dict[int, float]] = {}
    notes: list[str] = []
    for arm, runs in groups.items():
        seeds = sorted({r.seed for r in runs if r.seed is not None})
        grid = _grid(runs, values, seeds)
        per_seed[arm] = _sensitivity_by_seed(arm, grid, seeds, notes)
        best_seed[arm] = _best_by_seed(grid, seeds)
        arms[arm] = _arm_block(grid, values, per_seed[arm])
    base = arms.get(baseline)
    for arm, block in arms.items():
        if arm == baseline or base is None:
            continue
        diff = _paired(per_seed[arm], per_seed[baseline], confidence)
        if diff is not None:
            block["difference"] = diff
        block["best_difference"] = _paired(best_seed[arm], best_seed[baseline], confidence)
        block["by_value"] = [
            {"value": v, "difference": _paired(_effective_by_seed(g), _effective_by_seed(gb), confidence)}
            for v, g, gb in zip(values, block["grid"], base["grid"], strict=True)
        ]
        block["conclusion"] = stability_conclusion(block, base, values, confidence)
    stable = [
        v
        for i, v in enumerate(values)
        if all(not p["diverged"] for a in arms.values() for p in a["grid"][i]["points"])
    ]
    return {
        "key": key,
        "values": list(values),
        "baseline": baseline,
        "metric": "final validation CE (the last val_ce of the training log); diverged runs count as L_init",
        "divergence": DIVERGENCE_RULE,
        "sensitivity": SENSITIVITY_FORMULA,
        "stable": STABLE_RULE,
        "confidence": confidence,
        "largest_stable_value": _largest(stable),
        "arms": arms,
        "notes": notes,
    }


def slice_label(at: Mapping[str, Any]) -> str:
    """``n_embd=64``: a point of the other swept keys, as the summary's keys name it."""
    return ", ".join(f"{k}={v}" for k, v in at.items())


def summarize_sweep(
    groups: Mapping[str, Sequence[RunRecord]],
    key: str,
    values: Sequence[Any],
    baseline: str,
    *,
    confidence: float = 0.95,
    others: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """The ``"sweep"`` block of summary.json: per arm its best value, the loss there, its LR
    sensitivity (mean over seeds, and per seed), its diverged runs, the paired difference in
    sensitivity and in L(v) at every value from ``baseline``, and the stability conclusion.

    With ``others`` (the other swept keys and their values; each run's ``value`` a dict), one
    such block per point of the other keys (``slices``), and per arm its sensitivity, largest
    stable value, difference and conclusion at each (keyed by `slice_label`).
    """
    values = list(values)
    if not others:
        return _one_key(groups, key, values, baseline, confidence)
    slices = []
    for combo in itertools.product(*others.values()):
        at = dict(zip(others, combo, strict=True))
        sub = {
            arm: [replace(r, value=r.value[key]) for r in runs if _at(r.value, at)]
            for arm, runs in groups.items()
        }
        block = _one_key({a: r for a, r in sub.items() if r}, key, values, baseline, confidence)
        slices.append({"at": at, "label": slice_label(at), **block})
    arms: dict[str, Any] = {}
    for arm in groups:
        entries = {s["label"]: s["arms"][arm] for s in slices if arm in s["arms"]}
        arms[arm] = {
            "lr_sensitivity": {lab: a["lr_sensitivity"] for lab, a in entries.items()},
            "largest_stable_lr": {lab: a["largest_stable_lr"] for lab, a in entries.items()},
            "best": {lab: a["best"] for lab, a in entries.items()},
            "best_loss": {lab: a["best_loss"] for lab, a in entries.items()},
            "spikes": {lab: a["spikes"] for lab, a in entries.items()},
            "diverged": sum(a["diverged"] for a in entries.values()),
            "no_progress": sum(a["no_progress"] for a in entries.values()),
            "runs": sum(a["runs"] for a in entries.values()),
        }
        if arm != baseline:
            for field in ("difference", "best_difference", "by_value", "conclusion"):
                arms[arm][field] = {lab: a.get(field) for lab, a in entries.items()}
    return {
        "key": key,
        "keys": [key, *others],
        "values": values,
        "others": {k: list(v) for k, v in others.items()},
        "baseline": baseline,
        "metric": slices[0]["metric"],
        "divergence": DIVERGENCE_RULE,
        "sensitivity": SENSITIVITY_FORMULA,
        "stable": STABLE_RULE,
        "confidence": confidence,
        "largest_stable_value": None,
        "arms": arms,
        "slices": slices,
        "notes": [f"{s['label']}: {n}" for s in slices for n in s["notes"]],
    }


def _at(value: Any, at: Mapping[str, Any]) -> bool:
    return isinstance(value, dict) and all(_key(value.get(k)) == _key(v) for k, v in at.items())


def reference_point(block: Mapping[str, Any]) -> Any:
    """The run value the report's other sections compare the arms at: the baseline's best (its
    lowest mean loss over the whole grid; the first grid point when nothing trained)."""
    key, base = block["key"], block["baseline"]
    slices = block.get("slices")
    if not slices:
        best = block["arms"].get(base, {}).get("best")
        return block["values"][0] if best is None else best
    scored = [
        (s["arms"][base]["best_loss"], i)
        for i, s in enumerate(slices)
        if base in s["arms"] and is_finite_number(s["arms"][base]["best_loss"])
    ]
    s = slices[min(scored)[1]] if scored else slices[0]
    best = s["arms"].get(base, {}).get("best")
    return {key: block["values"][0] if best is None else best, **s["at"]}


def sweep_report(
    records: Sequence[RunRecord],
    sweep: Mapping[str, Any],
    baseline: str | None,
    arm_order: Sequence[str],
    out: Path,
    confidence: float = 0.95,
) -> tuple[dict[str, Any], list[RunRecord]]:
    """The sweep block of summary.json with its plots drawn into ``out``, and the runs at the
    reference value (the baseline's best), which the report's other sections compare."""
    groups: dict[str, list[RunRecord]] = {}
    for name in arm_order:
        groups[name] = []
    for r in records:
        groups.setdefault(r.arm, []).append(r)
    groups = {a: runs for a, runs in groups.items() if runs}
    if baseline is None or baseline not in groups:
        baseline = next(iter(groups))
    block = summarize_sweep(
        groups, sweep["key"], sweep["values"], baseline, confidence=confidence, others=sweep.get("others")
    )
    ref = reference_point(block)
    block["reference_value"] = ref
    plots: dict[str, str] = {}
    if plot_sweep(block, out / SWEEP_PLOT):
        plots[f"Final validation CE against {block['key']}, and its paired difference from {baseline}"] = (
            SWEEP_PLOT
        )
    plots.update(_diagnostic_plots(block, groups, ref, out))
    block["plots"] = plots
    return block, [r for r in records if _key(r.value) == _key(ref)]


def _diagnostic_plots(
    block: Mapping[str, Any], groups: Mapping[str, Sequence[RunRecord]], ref: Any, out: Path
) -> dict[str, str]:
    """lse_mean and attn_logit_max over training at the largest value no arm diverged at (with
    several swept keys: at the reference point's values of the others)."""
    key = block["key"]
    at = {k: v for k, v in ref.items() if k != key} if isinstance(ref, dict) else {}
    part = next((s for s in block.get("slices", []) if s["at"] == at), block)
    stable = part["largest_stable_value"]
    if stable is None:
        return {}
    point = {**ref, key: stable} if at else stable
    runs_at = {a: [r for r in runs if _key(r.value) == _key(point)] for a, runs in groups.items()}
    where = f"{key} = {_fmt(stable)}" + "".join(f", {k} = {v}" for k, v in at.items())
    plots = {}
    for metric, file in DIAGNOSTIC_PLOTS.items():
        caption = f"{metric} over training at {where} (the largest value no arm diverged at)"
        if plot_curves(runs_at, "train_rows", metric, metric, caption, out / file):
            plots[caption] = file
    return plots


def _largest(values: Sequence[Any]) -> Any:
    if not values:
        return None
    numeric = all(is_finite_number(v) for v in values)
    return max(values) if numeric else values[-1]


def _fmt(x: Any) -> str:
    return fmt(x) if isinstance(x, int | float) and not isinstance(x, bool) else str(x)
