"""Where metrics rows go: metrics.jsonl always, TensorBoard and SwanLab when asked.

Each sink is a small class behind one interface (``log(row)``, ``close()``) and registers
itself by name with `register_logger`; `open_loggers` asks every registered factory,
which returns a logger or None when its config key leaves it off. A new sink (W&B, MLflow)
is one more class here, not a branch in the training loop. Only rank 0 opens loggers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from dpls.runs.layout import jsonl_line, metrics_path
from dpls.train.config import TrainConfig


class Logger(Protocol):
    def log(self, row: Mapping[str, Any]) -> None:
        """One metrics row; always has ``step``."""

    def close(self) -> None: ...


LoggerFactory = Callable[[TrainConfig, Path], "Logger | None"]
LOGGERS: dict[str, LoggerFactory] = {}


def register_logger(name: str) -> Callable[[LoggerFactory], LoggerFactory]:
    def deco(factory: LoggerFactory) -> LoggerFactory:
        LOGGERS[name] = factory
        return factory

    return deco


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a row (dashboards take scalars only)."""
    out = {}
    for k, v in row.items():
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


# -- metrics.jsonl ----------------------------------------------------------------------------


class JsonlLogger:
    """Append one JSON object per row to RUN/metrics.jsonl, flushed at once (a crash loses nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def log(self, row: Mapping[str, Any]) -> None:
        self._fh.write(jsonl_line(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


@register_logger("jsonl")
def _jsonl(cfg: TrainConfig, run_dir: Path) -> Logger:
    return JsonlLogger(metrics_path(run_dir))


# -- TensorBoard ------------------------------------------------------------------------------


class TensorBoardLogger:
    """Scalars to RUN/tensorboard (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        for k, v in _numbers(row).items():
            group = "val" if k.startswith("val_") else "train"
            self._writer.add_scalar(f"{group}/{k}", v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


@register_logger("tensorboard")
def _tensorboard(cfg: TrainConfig, run_dir: Path) -> Logger | None:
    return TensorBoardLogger(run_dir / "tensorboard") if cfg.tensorboard else None


# -- SwanLab ----------------------------------------------------------------------------------

# our mode -> swanlab.init's. "local" and "offline" write under RUN/swanlab with no network
# ("local" for `swanlab watch`, "offline" for a later `swanlab sync`).
SWANLAB_MODES: dict[str, str] = {"cloud": "online", "local": "local", "offline": "offline"}


class SwanLabLogger:
    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        import swanlab

        self._swanlab = swanlab
        try:
            self._run = swanlab.init(
                project=cfg.swanlab_project,
                name=cfg.run_name or run_dir.name,
                mode=SWANLAB_MODES[cfg.swanlab],
                log_dir=str(run_dir / "swanlab"),
                config=cfg.to_dict(),
            )
        except Exception as err:  # e.g. cloud mode with no login and no terminal to ask for one
            raise ValueError(
                f"swanlab={cfg.swanlab}: SwanLab did not start ({err}); log in first (swanlab login) "
                "or use swanlab=offline or local"
            ) from err

    def log(self, row: Mapping[str, Any]) -> None:
        self._swanlab.log(_numbers(row), step=int(row["step"]))

    def close(self) -> None:
        self._swanlab.finish()


@register_logger("swanlab")
def _swanlab(cfg: TrainConfig, run_dir: Path) -> Logger | None:
    return SwanLabLogger(cfg, run_dir) if cfg.swanlab != "off" else None


# -- all of them ------------------------------------------------------------------------------


class MultiLogger:
    """Every enabled logger, fed the same rows."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, row: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(cfg: TrainConfig, run_dir: Path) -> MultiLogger:
    """One logger per registered sink that ``cfg`` turns on (metrics.jsonl always)."""
    loggers = [lg for factory in LOGGERS.values() if (lg := factory(cfg, run_dir)) is not None]
    return MultiLogger(loggers)
