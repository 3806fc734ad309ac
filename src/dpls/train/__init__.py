"""Pretraining: config, optimizer and LR schedule, checkpoints, metrics logging, the loop.

``train(cfg)`` runs a whole run; names are imported on first use so that reading a
config or a checkpoint does not import the model, data and loss libraries.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> module under dpls.train that defines it
_EXPORTS: dict[str, str] = {
    "TrainConfig": "config",
    "load_config": "config",
    "train": "trainer",
    "load_model": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "read_metrics": "loggers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpls.train' has no attribute {name!r}")
    value = getattr(import_module(f"dpls.train.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
