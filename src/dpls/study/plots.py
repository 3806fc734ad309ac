"""The study's figures: training curves per arm, pooled reliability diagrams, and the final
loss against a swept value (PNG, Agg).

`report.write_report` decides which to draw and links them from report.md; each function
here draws one figure from the runs' records and says whether there was anything to draw.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpls.eval.plots import pyplot, save_figure
from dpls.study.stats import is_finite_number

if TYPE_CHECKING:
    from dpls.study.records import RunRecord


def _curve(
    runs: Sequence[RunRecord], rows_of: str, key: str, start: tuple[int, float] | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
    """Per-run (step, value) arrays and their mean over the steps every run logged.

    ``start``: a point put in front of every series (the trunk's value at the fork), so the
    arms' curves begin where the trunk's ends.
    """
    series = []
    for r in runs:
        pts = [
            (int(row["step"]), float(row[key]))
            for row in getattr(r, rows_of)
            if is_finite_number(row.get(key))
        ]
        if start is not None and pts and start[0] < pts[0][0]:
            pts.insert(0, start)
        if pts:
            steps, vals = zip(*pts)
            series.append((np.array(steps), np.array(vals)))
    if not series:
        return [], None
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
    if not common:
        return series, None
    mean = np.mean([[dict(zip(s.tolist(), v.tolist()))[c] for c in common] for s, v in series], axis=0)
    return series, (np.array(common), mean)


_LINESTYLES = ("-", "--", "-.", ":")


def _draw_arms(
    ax: Any,
    groups: Mapping[str, Sequence[RunRecord]],
    rows_of: str,
    key: str,
    start: tuple[int, float] | None,
    thin: bool,
) -> bool:
    drew = False
    for i, (name, runs) in enumerate(groups.items()):
        style = {"color": f"C{i}", "ls": _LINESTYLES[i % len(_LINESTYLES)]}  # overlapping arms stay visible
        series, mean = _curve(runs, rows_of, key, start)
        if thin:
            for s, v in series:
                ax.plot(s, v, lw=0.8, alpha=0.35, **style)
        drew |= bool(series)
        if mean is not None:
            ax.plot(*mean, lw=2.0, label=f"{name} (mean of {len(series)})", **style)
    return drew


def plot_curves(
    groups: Mapping[str, Sequence[RunRecord]],
    rows_of: str,
    key: str,
    ylabel: str,
    title: str,
    path: Path,
    trunk: RunRecord | None = None,
) -> bool:
    """Arms' curves (thick: mean over seeds; thin: each seed). With a trunk, two panels: the
    whole run, and the part after the fork at a scale where the arms can be told apart."""
    plt = pyplot()
    trunk_series = _curve([trunk], rows_of, key)[0] if trunk is not None else []
    if trunk_series:
        fig, (whole, after) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
        steps, vals = trunk_series[0]
        start = (int(steps[-1]), float(vals[-1]))
        whole.plot(steps, vals, color="grey", lw=1.5, ls="--", label="trunk (CE)")
        _draw_arms(whole, groups, rows_of, key, start, thin=False)
        whole.set_title("whole run")
        drew = _draw_arms(after, groups, rows_of, key, start, thin=True)
        after.set_title(f"after the fork at step {start[0]}")
        axes: tuple[Any, ...] = (whole, after)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        drew = _draw_arms(ax, groups, rows_of, key, None, thin=True)
        axes = (ax,)
    if not drew:
        plt.close(fig)
        return False
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


def _pooled_bins(runs: Sequence[RunRecord]) -> dict[str, np.ndarray] | None:
    """Reliability bins summed over seeds: counts add, confidence and accuracy are count-weighted."""
    bins = [r.reliability for r in runs if r.reliability is not None]
    if not bins or len({len(b["count"]) for b in bins}) != 1:
        return None
    count = np.sum([np.asarray(b["count"]) for b in bins], axis=0)

    def weighted(key: str) -> np.ndarray:
        num = np.sum([np.nan_to_num(np.asarray(b[key])) * np.asarray(b["count"]) for b in bins], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, num / np.where(count > 0, count, 1), np.nan)

    return {
        "lower": np.asarray(bins[0]["lower"]),
        "upper": np.asarray(bins[0]["upper"]),
        "count": count,
        "confidence": weighted("confidence"),
        "accuracy": weighted("accuracy"),
    }


def plot_reliability(
    groups: Mapping[str, Sequence[RunRecord]], summary: Mapping[str, Any], path: Path
) -> bool:
    bins = {name: _pooled_bins(runs) for name, runs in groups.items()}
    pooled = {k: v for k, v in bins.items() if v is not None}
    if not pooled:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(pooled), figsize=(3.6 * len(pooled), 3.8), sharey=True, constrained_layout=True, squeeze=False
    )
    for ax, (name, b) in zip(axes[0], pooled.items()):
        centers, widths = (b["lower"] + b["upper"]) / 2, b["upper"] - b["lower"]
        filled = b["count"] > 0
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        ax.bar(
            centers[filled],
            b["accuracy"][filled],
            width=widths[filled],
            color="tab:blue",
            alpha=0.75,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot(centers[filled], b["confidence"][filled], "o", color="tab:red", ms=4, label="mean confidence")
        ece = summary["arms"][name]["metrics"].get("ece")
        ax.set_title(name + (f"\nECE {ece['mean']:.4f}" if ece else ""), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
    axes[0][0].set_ylabel("top-1 accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    save_figure(fig, path)
    return True


def plot_sweep(sweep: Mapping[str, Any], path: Path) -> bool:
    """Final validation CE against the swept value: one line per arm (the mean over seeds,
    diverged runs at L_init), every seed's point, diverged runs marked with an x; below it the
    paired difference of L(v) from the baseline with its interval (the absolute reading). With
    several swept keys, one column per point of the other keys."""
    parts = list(sweep.get("slices") or [sweep])
    if not list(sweep["values"]) or not sweep["arms"]:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(
        2,
        len(parts),
        figsize=(7.5 * len(parts), 7.6),
        constrained_layout=True,
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [3, 2]},
    )
    drew = False
    for col, part in enumerate(parts):
        drew |= _sweep_panel(axes[0][col], part)
        _difference_panel(axes[1][col], part)
        if part.get("label"):
            axes[0][col].set_title(f"At {part['label']} (dots: each seed)")
    if not drew:
        plt.close(fig)
        return False
    save_figure(fig, path)
    return True


def _sweep_x(values: Sequence[Any]) -> tuple[bool, list[float]]:
    numeric = all(is_finite_number(v) and v > 0 for v in values)
    return numeric, [float(v) for v in values] if numeric else [float(i) for i in range(len(values))]


def _set_sweep_axis(ax: Any, key: str, values: Sequence[Any], numeric: bool, xs: Sequence[float]) -> None:
    if numeric:
        ax.set_xscale("log")
    else:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(key)
    ax.grid(alpha=0.3, which="both")


def _sweep_panel(ax: Any, sweep: Mapping[str, Any]) -> bool:
    values = list(sweep["values"])
    numeric, xs = _sweep_x(values)
    drew = False
    initials = []
    for i, (arm, a) in enumerate(sweep["arms"].items()):
        color, ls = f"C{i}", _LINESTYLES[i % len(_LINESTYLES)]
        means = [(x, g["mean"]) for x, g in zip(xs, a["grid"]) if is_finite_number(g["mean"])]
        if means:
            ax.plot(*zip(*means), color=color, ls=ls, lw=2.0, marker="o", ms=4, label=arm)
            drew = True
        jitter = 1.0 + 0.03 * (i - (len(sweep["arms"]) - 1) / 2) if numeric else 0.0
        for x, g in zip(xs, a["grid"]):
            xp = x * jitter if numeric else x + jitter
            for p in g["points"]:
                if is_finite_number(p.get("initial")):
                    initials.append(p["initial"])
                y = p["effective"]
                if not is_finite_number(y):
                    continue
                if p["diverged"]:
                    ax.plot(xp, y, marker="x", ms=9, mew=2, color=color, ls="none")
                else:
                    ax.plot(xp, y, marker=".", ms=6, alpha=0.5, color=color, ls="none")
    if initials:
        ax.axhline(
            statistics.fmean(initials), color="grey", ls=":", lw=1, label="L_init (loss at initialisation)"
        )
    ax.plot([], [], marker="x", ms=8, mew=2, color="black", ls="none", label="diverged run (at L_init)")
    _set_sweep_axis(ax, sweep["key"], values, numeric, xs)
    ax.set_ylabel("final validation CE (nats/token)")
    ax.set_title("Final validation CE against the swept value (dots: each seed)")
    ax.legend(fontsize=8)
    return drew


def _difference_panel(ax: Any, sweep: Mapping[str, Any]) -> None:
    """Each arm's paired Δ L(v) from the baseline at every value, with its interval."""
    values = list(sweep["values"])
    numeric, xs = _sweep_x(values)
    arms = list(sweep["arms"].items())
    for i, (arm, a) in enumerate(arms):
        if not a.get("by_value"):
            continue
        jitter = 1.0 + 0.03 * (i - (len(arms) - 1) / 2) if numeric else 0.0
        pts = [
            (x * jitter if numeric else x + jitter, d["difference"])
            for x, d in zip(xs, a["by_value"])
            if d.get("difference") and is_finite_number(d["difference"].get("mean"))
        ]
        if not pts:
            continue
        x = [p for p, _ in pts]
        y = [float(d["mean"]) for _, d in pts]
        lo = [y_ - float(d["low"]) if d.get("low") is not None else 0.0 for y_, (_, d) in zip(y, pts)]
        hi = [float(d["high"]) - y_ if d.get("high") is not None else 0.0 for y_, (_, d) in zip(y, pts)]
        ax.errorbar(x, y, yerr=[lo, hi], color=f"C{i}", marker="o", ms=4, capsize=3, lw=1.2, label=arm)
    ax.axhline(0.0, color="grey", lw=1)
    _set_sweep_axis(ax, sweep["key"], values, numeric, xs)
    ax.set_ylabel(f"Δ L(v) vs {sweep['baseline']} (nats)")
    ax.set_title(
        f"Paired difference from {sweep['baseline']} with its {round(100 * sweep['confidence'])}% interval"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
