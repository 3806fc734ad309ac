"""Pretraining: config, optimizer and LR schedule, metrics logging, the plan and the loop.

``train(cfg)`` runs a whole run; names are imported on first use so that reading a
config does not import the model, data and loss libraries. Checkpoints and the files of
a run directory are `dpls.runs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.train.config import TrainConfig, load_config
    from dpls.train.plan import plan_run
    from dpls.train.trainer import train, train_step

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "TrainConfig": ".config",
    "load_config": ".config",
    "plan_run": ".plan",
    "train": ".trainer",
    "train_step": ".trainer",
}

__all__ = ["TrainConfig", "load_config", "plan_run", "train", "train_step"]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
