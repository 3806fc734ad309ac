"""Evaluate a model on the fixed validation set: metrics.json, a reliability diagram, an entropy plot.

`evaluate_model` is the loop (model + batches → metrics) that the trainer's periodic
validation shares; `evaluate_checkpoint` adds what `dpls eval` needs around it: load a
checkpoint, find its data and block size in the run's config, write the files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpls._io import check_replaceable, forget_owned, one_writer, write_owned_json
from dpls.data.checks import check_meta_matches, check_same_tokenizer, max_token_id
from dpls.data.loader import validation_batches
from dpls.data.meta import DataMeta
from dpls.eval.metrics import EXTRA_METRIC_KEYS, METRIC_KEYS, MetricAccumulator
from dpls.eval.plots import plot_entropy_histogram, plot_reliability
from dpls.eval.token_stats import metric_accumulator_for
from dpls.runs.checkpoint import load_model, read_model_config, reads_checkpoint, trained_tokenizer
from dpls.runs.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    EVAL_FILE,
    config_path,
    read_toml,
    run_dir_of,
    saved_path,
)

# --dtype choices: the autocast dtype of the forward pass (float32: no autocast).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → CUDA when present, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def _batch_size(batch: Any) -> int:
    return int(batch[1].numel()) if isinstance(batch, tuple | list) else 0


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    accumulator: MetricAccumulator | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    total_tokens: int | None = None,
    ignore_index: int = -100,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """The evaluation metrics (`METRIC_KEYS`) of ``model`` over ``batches`` of ``(x, y)`` int64 ``[B, T]``.

    Pass an ``accumulator`` to keep the per-bin data (reliability diagram, histograms)
    or to reduce it over ranks before `compute`. ``device`` defaults to the model's.
    The model is put in eval mode for the loop and given back in the mode it came in.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    acc = accumulator if accumulator is not None else MetricAccumulator()
    first = next(model.parameters(), None)
    dev = resolve_device(device) if device is not None else (first.device if first is not None else None)
    dev = dev or torch.device("cpu")
    autocast = (
        torch.autocast(dev.type, dtype=DTYPES[dtype]) if DTYPES[dtype] is not torch.float32 else nullcontext()
    )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=total_tokens,
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=None if progress else True,
        leave=False,
    )
    try:
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with autocast:
                logits = model(x)
            if vocab is not None and logits.shape[-1] > vocab:  # pad_vocab_to: padded columns are no tokens
                logits = logits[..., :vocab]
            acc.update(logits, y, ignore_index=ignore_index)
            bar.update(int(y.numel()))
    finally:
        bar.close()
        model.train(was_training)
    return acc.compute()


# -- checkpoints ---------------------------------------------------------------------------


def run_settings(checkpoint: Path) -> dict[str, Any]:
    """The resolved training config saved in a checkpoint (``config.toml``): data_dir, block_size..."""
    path = config_path(checkpoint)
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no {CONFIG_FILE}; pass data_dir (--data-dir) and block_size")
    return read_toml(path)


def _json_safe(obj: Any) -> Any:
    """NaN (an empty bin's mean) → null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files `evaluate_checkpoint` writes for ``out`` (metrics.json): all beside it."""
    out = Path(out)
    stem = out.stem
    return {
        "metrics": out,
        "bins": out.with_name(f"{stem}_bins.json"),
        "reliability": out.with_name(f"{stem}_reliability.png"),
        "reliability_adaptive": out.with_name(f"{stem}_reliability_adaptive.png"),
        "entropy": out.with_name(f"{stem}_entropy.png"),
    }


def default_out(checkpoint: str | Path) -> Path:
    """Where `dpls eval` writes without ``--out``: into the run, never the current folder.
    A run directory → ``RUN/eval/metrics.json`` (as a study does); a checkpoint named
    explicitly → ``RUN/eval/step_NNNNNNN.json`` (so it does not replace the run's own)."""
    path = Path(checkpoint)
    if path.parent.name == CHECKPOINTS_DIR:
        return run_dir_of(path) / EVAL_DIR / f"{path.name}.json"
    return path / EVAL_DIR / EVAL_FILE


def _check_outputs(files: dict[str, Path], plots: bool) -> None:
    """Before any work: every output can be written, and none would replace a file that an
    earlier evaluation did not write (``--out data/meta.json`` must not clobber the data)."""
    for name, path in files.items():
        if plots or name in ("metrics", "bins"):
            check_replaceable(path, "out", create=True)
    folder = files["metrics"].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = (
            "a file is in the way" if isinstance(err, FileExistsError | NotADirectoryError) else err.strerror
        )
        raise ValueError(f"out: cannot create the folder {folder} ({why})") from None


@one_writer("out", "evaluation folder", file=True)  # two would interleave their files and manifest
@reads_checkpoint  # a run still training does not prune the checkpoint under us
def evaluate_checkpoint(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    tokens: int | None = None,
    batch_size: int = 8,
    block_size: int | None = None,
    device: str | torch.device | None = "auto",
    dtype: str = "float32",
    out: str | Path | None = None,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate the checkpoint (or the latest one of a run directory) on the fixed validation set.

    ``data_dir`` and ``block_size`` default to the run's ``config.toml``; ``tokens`` caps the
    number of validation tokens (None: all of them). With ``out`` it writes the metrics
    there (`METRIC_KEYS`, then `EXTRA_METRIC_KEYS`) and, beside it, ``<stem>_bins.json`` (per-bin data
    and provenance) and, with ``plots``, the reliability diagrams and the entropy histogram.
    """
    # -- everything checked before any work ---------------------------------------------
    _check_arguments(tokens=tokens, batch_size=batch_size, block_size=block_size, dtype=dtype)
    dev = resolve_device(device)
    path = Path(path)  # the checkpoint `reads_checkpoint` resolved (a run directory's newest) and holds
    data_dir, block_size = _data_of(path, data_dir, block_size)
    meta = _check_data_fits(path, data_dir, block_size)
    files = output_paths(out) if out is not None else {}
    if out is not None:
        _check_outputs(files, plots)

    # -- the work -------------------------------------------------------------------------
    batches = validation_batches(data_dir, block_size, batch_size, tokens)  # checks the data first
    model = load_model(path, device=dev)
    acc, token_stats = metric_accumulator_for(data_dir, model.config.vocab_size)
    metrics = evaluate_model(
        model,
        batches,
        accumulator=acc,
        device=dev,
        dtype=dtype,
        total_tokens=batches.tokens,
        progress=progress,
    )
    if out is not None:
        provenance = {
            "checkpoint": str(path),
            "data_dir": str(data_dir),
            "corpus_fingerprint": meta.corpus_fingerprint,  # which tokens (meta.json)
            "block_size": block_size,
            "batch_size": batch_size,
            "dtype": dtype,
            "token_statistics": token_stats,  # frequency bins and bytes per token: where from
        }
        _write_outputs(files, metrics, acc, provenance, plots=plots, title=_plot_title(path))
    return metrics


def _check_arguments(*, tokens: int | None, batch_size: int, block_size: int | None, dtype: str) -> None:
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be a positive number of validation tokens, got {tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _data_of(checkpoint: Path, data_dir: str | Path | None, block_size: int | None) -> tuple[Path, int]:
    """The data directory and block size to evaluate with: as given, else the run's."""
    if data_dir is None or block_size is None:
        cfg = run_settings(checkpoint)
        if data_dir is None and cfg.get("data_dir"):  # a relative one: from where the run was made
            data_dir = saved_path(checkpoint.resolve().parent.parent, cfg.get("out_dir"), cfg["data_dir"])
        block_size = block_size if block_size is not None else cfg.get("block_size")
        if not data_dir or not block_size:
            raise ValueError(f"{config_path(checkpoint)} lacks data_dir or block_size; pass them explicitly")
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise ValueError(
            f"data_dir {str(data_dir)!r} is not a prepared data directory (no meta.json); "
            "pass the right one with data_dir (--data-dir)"
        )
    return data_dir, int(block_size)


def _check_data_fits(checkpoint: Path, data_dir: Path, block_size: int) -> DataMeta:
    """The data's meta.json, once the data is known to be this model's: the context fits, the
    vocabulary and the tokenizer are the model's, and every validation token id is in range."""
    model_cfg = read_model_config(checkpoint)
    if block_size > model_cfg["block_size"]:
        raise ValueError(f"block_size {block_size} exceeds the model's context of {model_cfg['block_size']}")
    meta = DataMeta.load(data_dir, check_shards=False)  # a damaged meta.json is named
    if meta.vocab_size > model_cfg["vocab_size"]:
        raise ValueError(
            f"data_dir {str(data_dir)!r} has a {meta.vocab_size}-token vocabulary, larger than the model's "
            f"{model_cfg['vocab_size']}: not the data this model was trained on"
        )
    check_meta_matches(data_dir, meta)  # an edited vocab_size or fingerprint, before it is used
    check_same_tokenizer(
        trained_tokenizer(checkpoint), data_dir, f"the checkpoint {checkpoint} was trained with"
    )
    top, shard = max_token_id(data_dir, meta.val_shards)
    if top >= min(model_cfg["vocab_size"], meta.vocab_size):
        raise ValueError(
            f"{data_dir / shard} holds token id {top}, outside the vocabulary ({meta.vocab_size} in meta.json, "
            f"{model_cfg['vocab_size']} in the model): data from another tokenizer, or a wrong meta.json"
        )
    return meta


def _plot_title(checkpoint: Path) -> str:
    parent = checkpoint.parent
    return f"{parent.parent.name}/{checkpoint.name}" if parent.name == CHECKPOINTS_DIR else checkpoint.name


def _write_outputs(
    files: dict[str, Path],
    metrics: dict[str, float],
    acc: MetricAccumulator,
    provenance: dict[str, Any],
    *,
    plots: bool,
    title: str,
) -> None:
    """metrics.json, the bins beside it and, with ``plots``, the figures. Only files an earlier
    evaluation wrote are replaced (checked before the work); with ``plots=False`` an earlier
    evaluation's figures are removed, so no stale figure sits beside new numbers."""
    write_owned_json(
        files["metrics"], _json_safe({k: metrics[k] for k in (*METRIC_KEYS, *EXTRA_METRIC_KEYS)})
    )
    edges, counts = acc.entropy_histogram()
    equal_width, equal_mass = acc.reliability(), acc.reliability(adaptive=True)
    write_owned_json(
        files["bins"],
        _json_safe(
            {
                **provenance,
                "reliability": equal_width.to_dict(),
                "reliability_adaptive": equal_mass.to_dict(),
                "entropy_histogram": {"edges": edges, "counts": counts},
            }
        ),
    )
    figures = [files[k] for k in ("reliability", "reliability_adaptive", "entropy")]
    if not plots:
        forget_owned(*figures)
        return
    plot_reliability(equal_width, files["reliability"], ece=metrics["ece"], title=title)
    plot_reliability(
        equal_mass, files["reliability_adaptive"], ece=metrics["ece_adaptive"], title=f"{title}, equal mass"
    )
    plot_entropy_histogram(edges, counts, files["entropy"], mean=metrics["entropy"], title=title)


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table for the terminal."""
    width = max(len(k) for k in metrics)
    lines = []
    for key, value in metrics.items():
        if isinstance(value, list):  # ce_by_frequency: one line per bin is metrics.json's job
            text = f"{len(value)} bins (in the metrics file)"
        elif isinstance(value, int):
            text = f"{value:,}"
        elif isinstance(value, float) and math.isfinite(value):
            text = f"{value:.6g}"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
