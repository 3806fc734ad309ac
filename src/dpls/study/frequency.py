"""Validation CE by token frequency in study reports: per frequency bin, each arm's CE and its
paired difference from the baseline, a table and one plot.

`dpls eval` writes ``ce_by_frequency`` into metrics.json: the validation tokens grouped by
their target's frequency in the training split (bin 0 holds the most frequent ids; each bin
about a tenth of the training tokens, `dpls.eval.metrics.frequency_bins`), with the bin's mean
CE. Smoothing moves probability mass from the target to other tokens, and what that does may
differ between frequent and rare tokens, which one mean CE hides. So per bin ``b`` and arm the
report gives
``Δ_b = CE_b(arm) − CE_b(baseline)``, paired by seed like every other difference
(`dpls.study.stats`: Student-t interval over the per-seed differences; Welch's unpaired
interval when the arms share no seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpls.eval.plots import pyplot, save_figure
from dpls.study.stats import Interval, is_finite_number, paired_ci, welch_ci
from dpls.study.tables import fmt, interval_cell

if TYPE_CHECKING:
    from dpls.study.records import RunRecord

FREQUENCY_PLOT = "ce_by_frequency.png"
_BIN_KEYS = ("bin", "train_share", "train_frequency_min", "train_frequency_max", "types")


def _bin_ce(run: RunRecord, b: int) -> float | None:
    bins = run.by_frequency or []
    value: Any = bins[b].get("ce") if b < len(bins) else None
    return float(value) if is_finite_number(value) else None


def _difference(
    arm: Sequence[RunRecord], base: Sequence[RunRecord], b: int, confidence: float, method: str
) -> Interval | None:
    """Bin ``b``'s arm − baseline CE over the seeds both have (paired), else unpaired (Welch)."""
    a = {r.seed: v for r in arm if (v := _bin_ce(r, b)) is not None}
    z = {r.seed: v for r in base if (v := _bin_ce(r, b)) is not None}
    common = sorted(s for s in a.keys() & z.keys() if s is not None)
    if common:
        return paired_ci([a[s] for s in common], [z[s] for s in common], confidence=confidence, method=method)
    if a and z:
        return welch_ci(list(a.values()), list(z.values()), confidence=confidence)
    return None


def frequency_summary(
    groups: Mapping[str, Sequence[RunRecord]], baseline: str, *, confidence: float, method: str
) -> dict[str, Any] | None:
    """summary.json's ``by_frequency`` block, or None when no run has ``ce_by_frequency``.

    ``bins``: each bin's description (training share and frequency range, from the first run
    that has them); per arm ``ce`` (mean over seeds per bin, None where no seed has the bin)
    and ``n``; per arm other than the baseline ``difference``: per bin the interval of
    arm − baseline (`Interval.to_dict`), None where either side has no value. Runs whose bins
    differ in number from the first run's are left out and named in ``notes``.
    """
    runs = [r for rs in groups.values() for r in rs if r.by_frequency]
    if not runs:
        return None
    first = runs[0].by_frequency or []
    n_bins = len(first)
    notes = [
        f"{r.run_dir}: {len(r.by_frequency or [])} frequency bins, not {n_bins}: left out"
        for r in runs
        if len(r.by_frequency or []) != n_bins
    ]
    kept = {
        a: [r for r in rs if r.by_frequency and len(r.by_frequency) == n_bins] for a, rs in groups.items()
    }
    arms: dict[str, Any] = {}
    for name, rs in kept.items():
        per_bin = [[v for r in rs if (v := _bin_ce(r, b)) is not None] for b in range(n_bins)]
        entry: dict[str, Any] = {
            "ce": [float(np.mean(v)) if v else None for v in per_bin],
            "n": [len(v) for v in per_bin],
        }
        if name != baseline:
            diffs = [_difference(rs, kept.get(baseline, []), b, confidence, method) for b in range(n_bins)]
            entry["difference"] = [d.to_dict() if d is not None else None for d in diffs]
        arms[name] = entry
    bins = [{k: bin_.get(k) for k in _BIN_KEYS} for bin_ in first]
    return {"bins": bins, "arms": arms, "notes": notes}


def frequency_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report's section: per bin the baseline's CE and each arm's Δ CE [interval]."""
    block = summary.get("by_frequency")
    if not block or not block.get("bins"):
        return []
    base = summary["baseline"]
    others = [a for a in block["arms"] if a != base]
    lines = [
        "## Validation CE by token frequency",
        "",
        "The validation tokens grouped by their target's frequency in the training split (bin 0: the "
        "most frequent ids; each bin about an equal share of the training tokens; frequency: occurrences "
        "per training token of the bin's ids). Per bin: the "
        f"baseline's CE (nats/token, mean over seeds) and each arm's difference from **{base}** with its "
        f"{summary.get('confidence', 0.95):.0%} interval (bold: larger than its interval; negative: lower CE). "
        "Exploratory: each interval is uncorrected for the other bins and arms.",
        "",
        "| bin | training share | training frequency | baseline CE | "
        + " | ".join(f"{a} − {base}" for a in others)
        + " |",
        "|---" * (4 + len(others)) + "|",
    ]
    base_ce = block["arms"].get(base, {}).get("ce") or [None] * len(block["bins"])
    for b, desc in enumerate(block["bins"]):
        cells = []
        for a in others:
            d = block["arms"][a]["difference"][b]
            cells.append(interval_cell(d) if d is not None else "–")
        freq = f"{fmt(desc.get('train_frequency_min'))} – {fmt(desc.get('train_frequency_max'))}"
        share = fmt(desc.get("train_share"))
        lines.append(f"| {b} | {share} | {freq} | {fmt(base_ce[b])} | " + " | ".join(cells) + " |")
    lines += [f"- {n}" for n in block.get("notes", [])]
    return [*lines, ""]


def plot_frequency(summary: Mapping[str, Any], path: Path) -> bool:
    """Δ CE against frequency bin, one line per arm with its interval as error bars; False when
    there is nothing to draw (no bins, or no arm besides the baseline)."""
    block = summary.get("by_frequency")
    base = summary["baseline"]
    if not block or not block.get("bins"):
        return False
    arms = {a: e["difference"] for a, e in block["arms"].items() if a != base}
    if not any(d is not None for diffs in arms.values() for d in diffs):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.axhline(0.0, color="grey", lw=1.0)
    for i, (name, diffs) in enumerate(arms.items()):
        pts = [(b, d) for b, d in enumerate(diffs) if d is not None]
        x = np.array([b for b, _ in pts], dtype=float) + 0.06 * (i - (len(arms) - 1) / 2)  # no overlap
        y = np.array([d["mean"] for _, d in pts])
        low = np.array([d["mean"] - d["low"] if d["low"] is not None else 0.0 for _, d in pts])
        high = np.array([d["high"] - d["mean"] if d["high"] is not None else 0.0 for _, d in pts])
        ax.errorbar(x, y, yerr=[low, high], color=f"C{i}", marker="o", capsize=3, label=f"{name} − {base}")
    ax.set_xlabel("training-frequency bin (0: most frequent ids)")
    ax.set_ylabel("Δ validation CE (nats/token)")
    ax.set_xticks(range(len(block["bins"])))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Validation CE by token frequency: arm − {base} (bars: interval)")
    save_figure(fig, path)
    return True
