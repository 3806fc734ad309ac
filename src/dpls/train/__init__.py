"""Pretraining: config, optimizer and LR schedule, checkpoints, metrics logging, the loop.

``train(cfg)`` runs a whole run; names are imported on first use so that reading a
config or a checkpoint does not import the model, data and loss libraries.
"""

from __future__ import annotations

from dpls._lazy import lazy_exports

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "TrainConfig": ".config",
    "load_config": ".config",
    "train": ".trainer",
    "load_model": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "read_metrics": ".loggers",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
