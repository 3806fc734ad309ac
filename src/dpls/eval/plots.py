"""The two evaluation figures: a reliability diagram and an entropy histogram (PNG, Agg)."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

from dpls._io import owned_output
from dpls.eval.metrics import ReliabilityBins


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only: never needs a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, recorded as dpls's before it appears (`dpls._io.owned_output`:
    a kill mid-write never leaves a figure that a rerun takes for the user's), then closed."""
    path = Path(path)
    try:
        with owned_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        pyplot().close(fig)
    return path


def plot_reliability(
    bins: ReliabilityBins, path: str | Path, *, ece: float | None = None, title: str = ""
) -> Path:
    """Accuracy against confidence per bin (gap to the diagonal shaded), token counts below."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    centers = [(lo + hi) / 2 for lo, hi in zip(bins.lower, bins.upper)]
    widths = [hi - lo for lo, hi in zip(bins.lower, bins.upper)]
    filled = [i for i, c in enumerate(bins.count) if c > 0]
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.bar(
        [centers[i] for i in filled],
        [bins.accuracy[i] for i in filled],
        width=[widths[i] for i in filled],
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    # the gap between mean confidence and accuracy, drawn from accuracy to confidence
    top.bar(
        [centers[i] for i in filled],
        [bins.confidence[i] - bins.accuracy[i] for i in filled],
        bottom=[bins.accuracy[i] for i in filled],
        width=[widths[i] for i in filled],
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to mean confidence",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("top-1 accuracy")
    heading = title or "reliability diagram"
    if ece is not None and math.isfinite(ece):
        heading += f"  (ECE {ece:.4f})"
    top.set_title(heading)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, bins.count, width=widths, edgecolor="black", color="tab:grey")
    filled_counts = [c for c in bins.count if c > 0]
    if filled_counts and max(filled_counts) > 50 * min(filled_counts):  # a wide range: log scale
        bottom.set_yscale("log")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("tokens")
    return save_figure(fig, path)


def plot_entropy_histogram(
    edges: list[float], counts: list[float], path: str | Path, *, mean: float | None = None, title: str = ""
) -> Path:
    """Histogram of per-token predictive entropy over [0, log V] nats."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    widths = [hi - lo for lo, hi in pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:green", edgecolor="none")
    if mean is not None and math.isfinite(mean):
        ax.axvline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.3f} nats")
        ax.legend(fontsize=8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(f"predictive entropy (nats; log V = {edges[-1]:.2f})")
    ax.set_ylabel("tokens")
    ax.set_title(title or "predictive entropy")
    return save_figure(fig, path)
