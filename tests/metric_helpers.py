"""Comparing evaluation metrics as `MetricAccumulator.compute` and metrics.json give them."""

from __future__ import annotations

import pytest


def assert_metrics_close(
    got: object, want: object, rel: float = 1e-6, abs: float = 0.0, key: str = ""
) -> None:
    """Equal metrics: numbers within tolerance (NaN equals NaN), None equals None, lists and dicts
    (``ce_by_frequency``) item by item."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), key
        for k in want:
            assert_metrics_close(got[k], want[k], rel, abs, f"{key}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), key
        for i, (g, w) in enumerate(zip(got, want)):
            assert_metrics_close(g, w, rel, abs, f"{key}[{i}]")
    elif want is None:
        assert got is None, key
    else:
        assert got == pytest.approx(want, rel=rel, abs=abs, nan_ok=True), key
