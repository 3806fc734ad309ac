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
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpls.study.plots import plot_curves, plot_sweep
from dpls.study.records import RunRecord
from dpls.study.stats import EFFECT_LARGER, is_finite_number, paired_ci
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
    }


def _grid(runs: Sequence[RunRecord], values: Sequence[Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per swept value: its runs (one point per seed) and their mean effective loss."""
    by = {(_key(r.value), r.seed): r for r in runs}
    grid = []
    for v in values:
        points = [_point(by[(_key(v), s)], s) for s in seeds if (_key(v), s) in by]
        eff = [float(p["effective"]) for p in points if is_finite_number(p["effective"])]
        grid.append({"value": v, "mean": statistics.fmean(eff) if eff else None, "points": points})
    return grid


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
        "sensitivity_by_seed": {str(s): v for s, v in sens.items()},
        "grid": grid,
        "diverged_runs": diverged,
    }


def summarize_sweep(
    groups: Mapping[str, Sequence[RunRecord]],
    key: str,
    values: Sequence[Any],
    baseline: str,
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The ``"sweep"`` block of summary.json: per arm its best value, the loss there, its LR
    sensitivity (mean over seeds, and per seed), its diverged runs, and the paired difference
    in sensitivity from ``baseline``."""
    values = list(values)
    arms: dict[str, Any] = {}
    per_seed: dict[str, dict[int, float]] = {}
    notes: list[str] = []
    for arm, runs in groups.items():
        seeds = sorted({r.seed for r in runs if r.seed is not None})
        grid = _grid(runs, values, seeds)
        per_seed[arm] = _sensitivity_by_seed(arm, grid, seeds, notes)
        arms[arm] = _arm_block(grid, values, per_seed[arm])
    for arm, block in arms.items():
        if arm == baseline or baseline not in per_seed:
            continue
        common = sorted(set(per_seed[arm]) & set(per_seed[baseline]))
        if common:
            interval = paired_ci(
                [per_seed[arm][s] for s in common],
                [per_seed[baseline][s] for s in common],
                confidence=confidence,
            )
            block["difference"] = interval.to_dict()
    stable = [
        v
        for i, v in enumerate(values)
        if all(not p["diverged"] for a in arms.values() for p in a["grid"][i]["points"])
    ]
    return {
        "key": key,
        "values": values,
        "baseline": baseline,
        "metric": "final validation CE (the last val_ce of the training log); diverged runs count as L_init",
        "divergence": DIVERGENCE_RULE,
        "sensitivity": SENSITIVITY_FORMULA,
        "confidence": confidence,
        "largest_stable_value": _largest(stable),
        "arms": arms,
        "notes": notes,
    }


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
    block = summarize_sweep(groups, sweep["key"], sweep["values"], baseline, confidence=confidence)
    ref = block["arms"][baseline]["best"]
    if ref is None:
        ref = block["values"][0]
    block["reference_value"] = ref
    plots: dict[str, str] = {}
    if plot_sweep(block, out / SWEEP_PLOT):
        plots[f"Final validation CE against {block['key']}"] = SWEEP_PLOT
    stable = block["largest_stable_value"]
    if stable is not None:
        at = {a: [r for r in runs if _key(r.value) == _key(stable)] for a, runs in groups.items()}
        for metric, file in DIAGNOSTIC_PLOTS.items():
            caption = f"{metric} over training at {block['key']} = {_fmt(stable)} (the largest value no arm diverged at)"
            if plot_curves(at, "train_rows", metric, metric, caption, out / file):
                plots[caption] = file
    block["plots"] = plots
    return block, [r for r in records if _key(r.value) == _key(ref)]


def _largest(values: Sequence[Any]) -> Any:
    if not values:
        return None
    numeric = all(is_finite_number(v) for v in values)
    return max(values) if numeric else values[-1]


# -- the report's section ----------------------------------------------------------------------


def _fmt(x: Any, signed: bool = False) -> str:
    """A number as the report writes it; a swept value that is not a number as it is."""
    return fmt(x, signed) if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _interval(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    if d.get("low") is None:
        return f"{_fmt(d['mean'], True)} [undefined: one seed]"
    cell = f"{_fmt(d['mean'], True)} [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]"
    return f"**{cell}**" if d.get("effect") == EFFECT_LARGER else cell


def sweep_table_lines(sweep: Mapping[str, Any]) -> list[str]:
    """Per arm: best value, the loss there, LR sensitivity, its paired difference, diverged runs."""
    key, base = sweep["key"], sweep["baseline"]
    conf = round(100 * sweep["confidence"])
    lines = [
        f"| arm | best {key} | loss at best | LR sensitivity | Δ sensitivity vs {base} [{conf}% CI] | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for arm, a in sweep["arms"].items():
        edge = " (grid edge)" if a.get("best_at_edge") else ""
        diff = "—" if arm == base else _interval(a.get("difference"))
        lines.append(
            f"| {arm} | {_fmt(a['best'])}{edge} | {_fmt(a['best_loss'])} | {_fmt(a['lr_sensitivity'])} | "
            f"{diff} | {a['diverged']} of {a['runs']} |"
        )
    return [*lines, ""]


def findings_paragraph(sweep: Mapping[str, Any]) -> str:
    """One paragraph that claims only what the intervals support."""
    key, base = sweep["key"], sweep["baseline"]
    arms = sweep["arms"]
    conf = round(100 * sweep["confidence"])
    parts: list[str] = []
    shown, not_shown, undefined = [], [], []
    for arm, a in arms.items():
        if arm == base:
            continue
        d = a.get("difference")
        if not d or d.get("low") is None:
            undefined.append(arm)
        elif d.get("effect") == EFFECT_LARGER:
            word = "lower" if d["mean"] < 0 else "higher"
            shown.append(f"{arm} has a {word} LR sensitivity than {base} ({_interval(d)})")
        else:
            not_shown.append(f"{arm} ({_interval(d)})")
    if shown:
        parts.append("; ".join(shown) + f": these {conf}% intervals exclude 0.")
    if not_shown:
        parts.append(
            f"For {', '.join(not_shown)} the difference in LR sensitivity from {base} is not larger than its "
            f"{conf}% interval: this study does not show that they are more or less stable than {base}."
        )
    if undefined:
        parts.append(
            f"For {', '.join(undefined)} there is no interval (one seed, or no seed with the whole grid): "
            "run more seeds before reading anything into the differences."
        )
    total = sum(a["runs"] for a in arms.values())
    n_div = sum(a["diverged"] for a in arms.values())
    if n_div:
        by_arm = ", ".join(f"{a} {arms[a]['diverged']}" for a in arms if arms[a]["diverged"])
        parts.append(f"{n_div} of {total} runs diverged ({by_arm}).")
    else:
        parts.append(f"None of the {total} runs diverged; the sensitivity comes from degraded final losses.")
    stuck = sum(a.get("no_progress", 0) for a in arms.values())
    if stuck:
        parts.append(f"{stuck} of {total} runs made no progress (their final validation CE is about L_init).")
    edge = [a for a, v in arms.items() if v.get("best_at_edge")]
    if edge:
        parts.append(
            f"The best {key} of {', '.join(edge)} lies at the edge of the grid, so the grid does not bracket "
            "it: part of a difference in sensitivity there may be a shifted optimum, not stability."
        )
    best = ", ".join(f"{a} {_fmt(v['best'])}" for a, v in arms.items())
    parts.append(f"Best {key} per arm: {best}.")
    return " ".join(parts)


def sweep_section_lines(sweep: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> list[str]:
    """The report's "Learning-rate sensitivity" section (markdown lines)."""
    key = sweep["key"]
    lines = [
        "## Learning-rate sensitivity",
        "",
        f"Every arm trained from the same initial weights and batches per seed at each {key} in "
        f"{{{', '.join(_fmt(v) for v in sweep['values'])}}}. L(v) is the final validation CE; a diverged run counts "
        "as L_init, the validation CE of its initial weights. LR sensitivity (Wortsman et al. 2023) is "
        f"{sweep['sensitivity']}, per seed, then the mean over seeds (lower: more stable). The difference "
        "from the baseline is paired by seed; **bold**: its interval excludes 0.",
        "",
        *sweep_table_lines(sweep),
        findings_paragraph(sweep),
        "",
    ]
    if sweep.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in sweep["notes"]), ""]
    for caption, file in (plots or {}).items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return lines
