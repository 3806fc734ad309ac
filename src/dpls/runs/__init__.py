"""Run directories: the file names, reading a run's config and metrics, and checkpoints.

Below the trainer, evaluation and studies, which all use it: `layout` names the files of
a run directory and reads them; `checkpoint` saves, finds and loads checkpoints (and
builds a model from one). Names are imported on first use, so reading a run's config
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpls._lazy import lazy_exports

if TYPE_CHECKING:
    from dpls.runs.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        load_model,
        read_model_config,
        read_trainer_state,
        resolve_checkpoint,
        save_checkpoint,
    )
    from dpls.runs.layout import (
        CONFIG_FILE,
        METRICS_FILE,
        find_run_config,
        load_tokenizer,
        read_metrics,
        read_run_config,
        read_toml,
        run_dir_of,
    )

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "CONFIG_FILE": ".layout",
    "METRICS_FILE": ".layout",
    "find_run_config": ".layout",
    "load_tokenizer": ".layout",
    "read_metrics": ".layout",
    "read_run_config": ".layout",
    "read_toml": ".layout",
    "run_dir_of": ".layout",
    "CheckpointError": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "list_checkpoints": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "load_model": ".checkpoint",
    "read_model_config": ".checkpoint",
    "read_trainer_state": ".checkpoint",
    "resolve_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
}

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "CheckpointError",
    "find_run_config",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_tokenizer",
    "read_metrics",
    "read_model_config",
    "read_run_config",
    "read_toml",
    "read_trainer_state",
    "resolve_checkpoint",
    "run_dir_of",
    "save_checkpoint",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
