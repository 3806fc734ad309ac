"""dpls: Dynamic Partial Label Smoothing for language-model pretraining.

The top level stays light: heavy pieces (the loss library pulls in torch; the
model, data and evaluation code pull in more) are imported on first use.
"""

from __future__ import annotations

from dpls._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "dpls_loss": ".losses",
    "dpls_linear_loss": ".losses",
    "label_smoothing_loss": ".losses",
    "DPLSLoss": ".losses",
    "load_model": ".runs.checkpoint",
    "load_tokenizer": ".runs.layout",
}

__all__ = ["__version__", *_EXPORTS]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
