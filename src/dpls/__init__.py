"""dpls: Dynamic Partial Label Smoothing for language-model pretraining.

The top level stays light: heavy pieces (the loss library pulls in torch; the
model, data and evaluation code pull in more) are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "dpls_loss": "dpls.losses",
    "dpls_linear_loss": "dpls.losses",
    "label_smoothing_loss": "dpls.losses",
    "DPLSLoss": "dpls.losses",
    "load_model": "dpls.train.checkpoint",
    "load_tokenizer": "dpls.data.tokenizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpls' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
