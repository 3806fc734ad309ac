"""A plain Python/NumPy reference of the loss-spike rule (OLMo-core's), for the trainer's tests."""

from __future__ import annotations

import math

import numpy as np


def reference_counts(losses: list[float], window: int, sigmas: float) -> list[int]:
    """The count after each step: a finite loss above mean + sigmas·σ (ddof 0) of the previous
    ``window`` finite losses is a spike; it then joins the window; non-finite losses are ignored."""
    history: list[float] = []
    count, out = 0, []
    for x in losses:
        if math.isfinite(x):
            if len(history) == window:
                mean, sd = float(np.mean(history)), float(np.std(history))
                count += sd >= 1e-10 and x > mean + sigmas * sd
            history = [*history, x][-window:]
        out.append(count)
    return out
