"""Where metrics rows go: metrics.jsonl always; TensorBoard, SwanLab, Weights & Biases and
MLflow when asked.

Each sink is a small class behind one interface (``log(row)``, ``close()``) and registers
itself by name with `register_logger`, saying when the config turns it on and which package
(and dpls extra) it needs; `check_loggers` finds a missing package before a run starts, and
`open_loggers` opens every sink the config turns on. A new sink is one more class here, not
a branch in the training loop. Only rank 0 opens loggers.

Every sink gets the rows of metrics.jsonl (losses, learning rate, the instability
diagnostics, validation), keyed by ``step``; W&B and MLflow also get the resolved config.
Those two are services that may be unreachable (no login, a server down): a failure to
start or to log is said once on stderr and the run goes on without that sink.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from tqdm.auto import tqdm

from dpls.runs.layout import jsonl_line, metrics_path
from dpls.train.config import TrainConfig


class Logger(Protocol):
    def log(self, row: Mapping[str, Any]) -> None:
        """One metrics row; always has ``step``."""

    def close(self) -> None: ...


LoggerFactory = Callable[[TrainConfig, Path], Logger]


@dataclass(frozen=True)
class Sink:
    """A registered logger: how to open it and when the config turns it on."""

    factory: LoggerFactory
    enabled: Callable[[TrainConfig], bool]
    package: str | None = None  # the module it imports, checked before a run starts ...
    extra: str | None = None  # ... and the dpls extra that installs it
    tolerant: bool = False  # a service: failing to start or to log is a warning, never the run's end


LOGGERS: dict[str, Sink] = {}


def register_logger(
    name: str,
    *,
    enabled: Callable[[TrainConfig], bool] = lambda cfg: True,
    package: str | None = None,
    extra: str | None = None,
    tolerant: bool = False,
) -> Callable[[LoggerFactory], LoggerFactory]:
    def deco(factory: LoggerFactory) -> LoggerFactory:
        LOGGERS[name] = Sink(factory, enabled, package, extra, tolerant)
        return factory

    return deco


def _setting(cfg: TrainConfig, name: str) -> str:
    return f"{name}={getattr(cfg, name)}" if hasattr(cfg, name) else name


def check_loggers(cfg: TrainConfig) -> None:
    """``ValueError`` naming the extra to install when a logger the config turns on needs a
    package that is not there (a cheap look-up: nothing is imported)."""
    for name, sink in LOGGERS.items():
        if sink.enabled(cfg) and sink.package and importlib.util.find_spec(sink.package) is None:
            raise ValueError(
                f"{_setting(cfg, name)} needs the {sink.package} package, which is not installed: "
                f"pip install '{sink.extra}'"
            )
    if cfg.mlflow.strip() == "":
        raise ValueError("mlflow must be off or an MLflow tracking URI (http://host:5000, sqlite:///path.db)")


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


@register_logger(
    "tensorboard", enabled=lambda cfg: cfg.tensorboard, package="tensorboard", extra="dpls[logging]"
)
def _tensorboard(cfg: TrainConfig, run_dir: Path) -> Logger:
    return TensorBoardLogger(run_dir / "tensorboard")


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


@register_logger(
    "swanlab", enabled=lambda cfg: cfg.swanlab != "off", package="swanlab", extra="dpls[logging]"
)
def _swanlab(cfg: TrainConfig, run_dir: Path) -> Logger:
    return SwanLabLogger(cfg, run_dir)


# -- Weights & Biases -------------------------------------------------------------------------


class WandbLogger:
    """A W&B run (``wandb = "online"``, or ``"offline"``: written under RUN/wandb only, for a
    later ``wandb sync RUN/wandb/offline-run-*``), named ``run_name`` in ``wandb_project``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        import wandb

        mode: Literal["online", "offline"] = "offline" if cfg.wandb == "offline" else "online"
        self._run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.run_name or run_dir.name,
            mode=mode,
            dir=str(run_dir),
            config=cfg.to_dict(),
            # the progress bar and dpls's own lines stay as they are: W&B leaves stdout alone
            settings=wandb.Settings(console="off"),
        )

    def log(self, row: Mapping[str, Any]) -> None:
        self._run.log(_numbers(row), step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


@register_logger(
    "wandb", enabled=lambda cfg: cfg.wandb != "off", package="wandb", extra="dpls[wandb]", tolerant=True
)
def _wandb(cfg: TrainConfig, run_dir: Path) -> Logger:
    return WandbLogger(cfg, run_dir)


# -- MLflow -----------------------------------------------------------------------------------

MLFLOW_BATCH = 100  # the most params one log_batch call takes


class MLflowLogger:
    """An MLflow run named ``run_name`` in experiment ``mlflow_experiment`` at the tracking URI
    ``mlflow`` (a server, or a local ``sqlite:///…/mlflow.db``). Through an ``MlflowClient`` of
    its own: no global MLflow state, so runs in one process never mix."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=cfg.mlflow)
        experiment = self._client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self._client.create_experiment(cfg.mlflow_experiment)
        )
        run = self._client.create_run(
            experiment_id,
            run_name=cfg.run_name or run_dir.name,
            tags={"dpls.run_dir": str(run_dir.resolve())},
        )
        self._run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in cfg.to_dict().items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self._client.log_batch(self._run_id, params=params[start : start + MLFLOW_BATCH])

    def log(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(row["step"])
        metrics = [Metric(k, v, stamp, step) for k, v in _numbers(row).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


@register_logger(
    "mlflow", enabled=lambda cfg: cfg.mlflow != "off", package="mlflow", extra="dpls[mlflow]", tolerant=True
)
def _mlflow(cfg: TrainConfig, run_dir: Path) -> Logger:
    return MLflowLogger(cfg, run_dir)


# -- all of them ------------------------------------------------------------------------------


def warn(message: str) -> None:
    """One line on stderr, above the progress bar when it is shown."""
    tqdm.write(f"dpls train: warning: {message}", file=sys.stderr)


class Tolerant:
    """A sink that may fail (a service out of reach): its first failure, opening or logging,
    is said once and the sink is dropped; the run goes on with the others."""

    def __init__(self, setting: str) -> None:
        self.setting = setting  # how the config turned it on: "mlflow=http://..."
        self.logger: Logger | None = None

    @classmethod
    def open(cls, name: str, factory: LoggerFactory, cfg: TrainConfig, run_dir: Path) -> Tolerant:
        sink = cls(_setting(cfg, name))
        try:
            sink.logger = factory(cfg, run_dir)
        except Exception as err:  # whatever a service raises is the service's failure, not the run's
            sink._drop("did not start", err)
        return sink

    def _drop(self, what: str, err: Exception) -> None:
        lines = str(err).strip().splitlines()
        warn(
            f"{self.setting}: {what} ({type(err).__name__}: {lines[0] if lines else ''}); the run goes on without it"
        )
        self.logger = None

    def log(self, row: Mapping[str, Any]) -> None:
        if self.logger is not None:
            try:
                self.logger.log(row)
            except Exception as err:
                self._drop(f"logging step {row.get('step')} failed", err)

    def close(self) -> None:
        if self.logger is not None:
            try:
                self.logger.close()
            except Exception as err:
                self._drop("closing failed", err)


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
    loggers: list[Logger] = []
    for name, sink in LOGGERS.items():
        if sink.enabled(cfg):
            loggers.append(
                Tolerant.open(name, sink.factory, cfg, run_dir)
                if sink.tolerant
                else sink.factory(cfg, run_dir)
            )
    return MultiLogger(loggers)
