"""Pretraining: config, optimizer and LR schedule, metrics logging, the plan and the loop.

``train(cfg)`` runs a whole run; names are imported on first use so that reading a
config does not import the model, data and loss libraries. Checkpoints and the files of
a run directory are `dpls.runs`.
"""

from __future__ import annotations

from dpls._lazy import lazy_exports

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "TrainConfig": ".config",
    "load_config": ".config",
    "plan_run": ".plan",
    "train": ".trainer",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
