"""Downstream tasks through EleutherAI's lm-evaluation-harness, on the Hugging Face export.

The harness's own ``hf`` model class runs the exported directory (a stock ``transformers`` class),
so the numbers are computed exactly the way the harness computes them for any other
Hugging Face model (same request batching, same tokenisation of contexts and
continuations) and are comparable with published ones. The export is cached beside the
checkpoint and reused while the checkpoint is unchanged.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpls._io import check_output_dir, one_writer, write_owned_json, write_owned_text
from dpls.eval.evaluate import resolve_device
from dpls.eval.export_hf import cached_export, check_exportable

DEFAULT_TASKS: tuple[str, ...] = ("hellaswag", "lambada_openai", "piqa", "arc_easy", "sciq")


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (standard harness names pass through unchanged)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if not names:
        raise ValueError("tasks must name at least one lm-evaluation-harness task, e.g. 'hellaswag,piqa'")
    return list(dict.fromkeys(names))


def is_hf_dir(path: str | Path) -> bool:
    """A directory `from_pretrained` can load: a config.json and safetensors weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@functools.lru_cache(maxsize=4)
def _index(include_path: str | None) -> Any:
    """The harness's task index; building it scans ~15k YAML files (seconds), so it is kept
    per process. Task contents are read when a task is loaded, so edits to a YAML still count."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_manager(include_path: str | Path | None, tasks: list[str]) -> Any:
    """The harness's task index (with ``include_path``), after checking every task name exists."""
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include_path {str(include_path)!r} is not a directory of task YAML files")
    manager = _index(str(Path(include_path).resolve()) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown lm-evaluation-harness task(s): {'; '.join(hints)}. "
            "Standard names such as hellaswag, lambada_openai, piqa, arc_easy, sciq work; "
            "custom tasks need include_path (--include_path DIR of task YAML files)."
        )
    return manager


def _check_harness() -> None:
    try:
        import accelerate  # noqa: F401  (the harness's hf model class imports it)
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"lm-evaluation-harness with its Hugging Face backend is needed ({err.name} is missing): "
            "pip install 'lm-eval[hf]' (or dpls[lmeval])"
        ) from err


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return "-" if value in (None, "N/A", "") else str(value)


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table (task, metric, value, stderr) of a harness result dict."""
    rows = ["| task | metric | value | stderr |", "| --- | --- | --- | --- |"]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric} ({filt})"
            rows.append(f"| {metrics.get('alias', task)} | {label} | {_fmt(value)} | {_fmt(stderr)} |")
    return "\n".join(rows)


RESULT_FILES = ("results.json", "results.md")


def _check_out_dir(out: Path) -> None:
    """The results folder can be created (checked first: it is written only after the
    evaluation, which may take hours) and writing its results files destroys nothing the
    user owns (only an earlier ``dpls lm-eval``'s files are replaced)."""
    check_output_dir(out, RESULT_FILES, "out_dir")


def _check_arguments(
    *, limit: int | float | None, num_fewshot: int | None, batch_size: int | str, dtype: str
) -> None:
    if limit is not None and not (
        0 < limit < 1 or (limit >= 1 and math.isfinite(limit) and limit == int(limit))
    ):
        raise ValueError(
            f"limit must be a whole number of examples per task (>= 1) or a fraction in (0, 1), got {limit}"
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


@one_writer("out_dir", "lm-eval folder")  # two would interleave their files and manifest
def run_lm_eval(
    checkpoint: str | Path,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str | None = "auto",
    dtype: str = "float32",
    out_dir: str | Path | None = "lm_eval",
    seed: int = 1234,
) -> dict[str, Any]:
    """Run harness ``tasks`` on a checkpoint (exported to Hugging Face format if needed).

    ``checkpoint``: a dpls checkpoint or run directory, or an exported HF directory.
    ``limit``: examples per task (a fraction if < 1; for quick checks only). Writes
    ``results.json`` (the harness's result dict) and ``results.md`` (the table) into
    ``out_dir`` and returns the result dict.
    """
    # -- everything checked before any work ---------------------------------------------
    checkpoint = Path(checkpoint)
    names = parse_tasks(tasks)
    _check_arguments(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, dtype=dtype)
    dev = resolve_device(device)
    if not is_hf_dir(checkpoint):
        check_exportable(checkpoint)  # a complete checkpoint, a Llama-shaped model, a tokenizer
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_out_dir(out)
    _check_harness()
    manager = _task_manager(include_path, names)

    # -- the work -------------------------------------------------------------------------
    model_dir = checkpoint if is_hf_dir(checkpoint) else cached_export(checkpoint)
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},
            tasks=names,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=str(dev),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except ConnectionError as err:  # a task's data set is neither cached nor reachable
        raise ConnectionError(
            f"{err}. The harness loads each task's data from the Hugging Face Hub (then caches it): "
            "run once with network access, or give tasks over local files with include_path"
        ) from err
    if results is None:  # non-zero ranks of a distributed harness run
        return {}
    results = dict(results)
    results["dpls"] = {"checkpoint": str(checkpoint), "hf_dir": str(model_dir)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_owned_json(out / "results.json", results, default=handle_non_serializable)
        write_owned_text(out / "results.md", results_table(results) + "\n")
    return results
