"""Evaluation: the one implementation of every metric, the eval driver, HF export and lm-eval.

Only `metrics` is light (torch + numpy); the rest pull in transformers, matplotlib or
lm_eval, so every name is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> module under dpls.eval that defines it
_EXPORTS: dict[str, str] = {
    "METRIC_KEYS": "metrics",
    "MetricAccumulator": "metrics",
    "ReliabilityBins": "metrics",
    "evaluate_model": "evaluate",
    "evaluate_checkpoint": "evaluate",
    "export_hf": "export_hf",
    "run_lm_eval": "lm_eval",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpls.eval' has no attribute {name!r}")
    value = getattr(import_module(f"dpls.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
