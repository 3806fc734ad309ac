"""dpls: Dynamic Partial Label Smoothing for language-model pretraining.

The top level stays light: heavy pieces (the loss library pulls in torch; the
model, data and evaluation code pull in more) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.losses import DPLSLoss, dpls_linear_loss, dpls_loss, label_smoothing_loss
    from dpls.runs.checkpoint import load_model
    from dpls.runs.layout import load_tokenizer

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "dpls_loss": ".losses",
    "dpls_linear_loss": ".losses",
    "label_smoothing_loss": ".losses",
    "DPLSLoss": ".losses",
    "load_model": ".runs.checkpoint",
    "load_tokenizer": ".runs.layout",
}

__all__ = [
    "DPLSLoss",
    "__version__",
    "dpls_linear_loss",
    "dpls_loss",
    "label_smoothing_loss",
    "load_model",
    "load_tokenizer",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
