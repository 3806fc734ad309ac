"""Evaluation: the one implementation of every metric, the eval driver, HF export and lm-eval.

Only `metrics` is light (torch + numpy); the rest pull in transformers, matplotlib or
lm_eval, so every name is imported on first use. The HF export is `dpls.eval.export_hf.export_hf`:
a package attribute cannot share its name with a submodule (importing the submodule replaces it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.eval.evaluate import evaluate_checkpoint, evaluate_model
    from dpls.eval.lm_eval import run_lm_eval
    from dpls.eval.metrics import METRIC_KEYS, MetricAccumulator, ReliabilityBins

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "METRIC_KEYS": ".metrics",
    "MetricAccumulator": ".metrics",
    "ReliabilityBins": ".metrics",
    "evaluate_model": ".evaluate",
    "evaluate_checkpoint": ".evaluate",
    "run_lm_eval": ".lm_eval",
}

__all__ = [
    "METRIC_KEYS",
    "MetricAccumulator",
    "ReliabilityBins",
    "evaluate_checkpoint",
    "evaluate_model",
    "run_lm_eval",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
