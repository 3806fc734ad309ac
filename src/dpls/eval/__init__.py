"""Evaluation: the one implementation of every metric, the eval driver, HF export and lm-eval.

Only `metrics` is light (torch + numpy); the rest pull in transformers, matplotlib or
lm_eval, so every name is imported on first use.
"""

from __future__ import annotations

from dpls._lazy import lazy_exports

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "METRIC_KEYS": ".metrics",
    "MetricAccumulator": ".metrics",
    "ReliabilityBins": ".metrics",
    "evaluate_model": ".evaluate",
    "evaluate_checkpoint": ".evaluate",
    "export_hf": ".export_hf",
    "run_lm_eval": ".lm_eval",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
