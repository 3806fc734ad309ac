"""From finished runs to an answer: report.md, summary.json and the plots.

Input is a study directory (its ``study_state.json`` says which run is which arm and seed)
or any list of run directories (``dpls compare``): runs are then grouped by their loss
configuration and matched by ``seed``. For every evaluation metric (plus the last
validation CE of the training log and each lm-eval task) the report gives each arm's mean
± sd over seeds and its difference from the baseline arm with a 95% interval: paired by
seed when every arm has each seed once, Welch's unpaired interval otherwise (and it says
so). Then one sentence per arm: which differences are larger than their interval.

Training behaviour comes from ``metrics.jsonl``: validation-CE curves, the ε in force,
stability (loss spikes, gradient norms, skipped steps) and cost (tokens/s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpls._io import check_output_dir, forget_owned, mark_owned, write_owned_json, write_owned_text
from dpls.runs.layout import METRICS_FILE, is_run_dir
from dpls.study.frequency import FREQUENCY_PLOT, frequency_lines, frequency_summary, plot_frequency
from dpls.study.plots import plot_curves, plot_reliability
from dpls.study.primary import add_power, primary_block, primary_lines
from dpls.study.records import (
    BEST_STEP_METRIC,
    BEST_VAL_METRIC,
    TRAIN_LOG_METRIC,
    RunRecord,
    check_poolable,
    collect_runs,
    group_runs,
)
from dpls.study.spec import DEFAULT_PRIMARY, SWEEP_PRIMARY
from dpls.study.spikes import spike_cell
from dpls.study.state import is_study_dir
from dpls.study.summary import summarize
from dpls.study.sweep import SWEEP_PLOTS, sweep_report
from dpls.study.sweep_tables import sweep_section_lines
from dpls.study.tables import data_line, evaluation_table_lines, findings_lines, fmt, hms, samples_lines

# Every file `write_report` may write: checked before any of them is.
REPORT_FILES = (
    "report.md",
    "summary.json",
    "val_ce.png",
    "reliability.png",
    "epsilon.png",
    "train_ce.png",
    FREQUENCY_PLOT,
    *SWEEP_PLOTS,
)


def write_report(
    source: str | Path | Sequence[str | Path] | Sequence[RunRecord],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    confidence: float = 0.95,
    method: str = "t",
    title: str | None = None,
    primary: str | None = None,
    min_effect: float | None = None,
) -> Path:
    """Write report.md, summary.json and PNG plots to ``out_dir``; returns the report.md path.

    ``source``: a study directory, run directories, or already loaded `RunRecord`s.
    ``baseline``: the arm differences are taken against (default: the study's, else the
    first CE arm, else the first arm). ``primary`` and ``min_effect``: the question the report
    answers first (default: the study's; else LR sensitivity in a sweep, the final validation CE
    otherwise) and the difference in it worth finding.
    """
    info: dict[str, Any] = {}
    if (
        isinstance(source, Sequence)
        and not isinstance(source, str)
        and source
        and isinstance(source[0], RunRecord)
    ):
        records = [r for r in source if isinstance(r, RunRecord)]
    else:
        records, info = collect_runs(source)  # type: ignore[arg-type]  # paths, not records
    out = Path(out_dir)
    check_output_dir(out, REPORT_FILES, "out")
    sweep = None
    if info.get("sweep"):  # the sweep's own section; the other sections compare at one value
        out.mkdir(parents=True, exist_ok=True)
        sweep, records = sweep_report(
            records, info["sweep"], baseline or info.get("baseline"), info.get("arms", []), out, confidence
        )
    groups = group_runs(records)
    if "name" not in info:  # runs from anywhere (a study's arms are made alike by the study)
        check_poolable(groups)
    order = [a for a in info.get("arms", []) if a in groups]
    groups = {a: groups[a] for a in [*order, *(g for g in groups if g not in order)]}
    if baseline is None:
        baseline = info.get("baseline") or next(
            (n for n, runs in groups.items() if runs[0].config.get("loss", "ce") == "ce"), next(iter(groups))
        )
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the arms {sorted(groups)}")
    summary = summarize(groups, baseline, confidence=confidence, method=method)
    summary["by_frequency"] = frequency_summary(groups, baseline, confidence=confidence, method=method)
    summary["title"] = title or (f"Study {info['name']}" if "name" in info else "Comparison of runs")
    summary["notes"] += [f"missing from this report: {m}" for m in info.get("missing", [])]
    if sweep is not None:
        summary["sweep"] = sweep
    add_power(summary)
    primary = primary or info.get("primary") or (SWEEP_PRIMARY if sweep is not None else DEFAULT_PRIMARY)
    min_effect = min_effect if min_effect is not None else info.get("min_effect")
    summary["primary"] = primary_block(summary, primary, min_effect)
    known = [*summary["metrics"], *([SWEEP_PRIMARY] if sweep is not None else [])]
    if not summary["primary"]["comparisons"] and len(groups) > 1 and primary not in known:
        summary["notes"].append(
            f"the primary metric {primary!r} is not among the compared metrics ({', '.join(summary['metrics'])})"
        )
    summary["execution"] = _execution(info, [r for runs in groups.values() for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = _draw_plots(groups, summary, info.get("trunk"), out)
    write_owned_json(out / "summary.json", summary, default=_json_default)
    report = write_owned_text(out / "report.md", _markdown(summary))
    written = {out / name for name in [*summary["plots"].values(), *(sweep or {}).get("plots", {}).values()]}
    mark_owned(*written)
    forget_owned(*(out / n for n in REPORT_FILES if n.endswith(".png") and out / n not in written))
    return report


def _execution(info: Mapping[str, Any], records: Sequence[RunRecord]) -> dict[str, Any]:
    """How the runs were made: the study's executor, workers and wall time (when known), and the
    torch thread counts their training ran with: on CPU another count changes the last bits."""
    threads = sorted({t for r in records for t in r.threads})
    return {**info.get("execution", {}), "threads_per_run": threads}


def _draw_plots(
    groups: Mapping[str, Sequence[RunRecord]], summary: Mapping[str, Any], trunk: RunRecord | None, out: Path
) -> dict[str, str]:
    """The report's figures (caption → file), each drawn only when its data exists."""
    plots: dict[str, str] = {}
    val_title = "Validation cross-entropy (thick: mean over seeds; thin: each seed)"
    if plot_curves(
        groups, "val_rows", "val_ce", "validation CE (nats/token)", val_title, out / "val_ce.png", trunk
    ):
        plots["Validation cross-entropy"] = "val_ce.png"
    if plot_reliability(groups, summary, out / "reliability.png"):
        plots["Reliability diagrams (pooled over seeds)"] = "reliability.png"
    eps_title = "Smoothing ε in force over training"
    if plot_curves(groups, "train_rows", "epsilon", "ε in force", eps_title, out / "epsilon.png"):
        plots["ε in force"] = "epsilon.png"
    ce_title = "Training CE of the batches"
    if plot_curves(
        groups, "train_rows", "ce", "training CE (nats/token)", ce_title, out / "train_ce.png", trunk
    ):
        plots["Training cross-entropy"] = "train_ce.png"
    if plot_frequency(summary, out / FREQUENCY_PLOT):
        plots["Validation CE by token frequency: difference from the baseline"] = FREQUENCY_PLOT
    return plots


def _markdown(summary: Mapping[str, Any]) -> str:
    lines = [f"# {summary['title']}", "", _arms_line(summary), "", *primary_lines(summary)]
    if summary.get("sweep"):
        sw = summary["sweep"]
        lines += ["", *sweep_section_lines(sw, sw.get("plots"))]
        ref = sw["reference_value"]
        where = (
            ", ".join(f"{k} = {v}" for k, v in ref.items())
            if isinstance(ref, dict)
            else f"{sw['key']} = {ref}"
        )
        lines.append(
            f"The sections below compare the arms at {where} (the best value of **{summary['baseline']}**)."
        )
    if data_line(summary):
        lines += ["", str(data_line(summary))]
    heading = "## Exploratory" if summary.get("primary") else "## Findings"
    lines += ["", heading, "", *findings_lines(summary)]
    if summary["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    lines += [
        "## Evaluation",
        "",
        "Mean ± sd over seeds (the metrics of the final evaluation; "
        f"`{TRAIN_LOG_METRIC}` is the last validation CE of the training log, `{BEST_VAL_METRIC}` "
        f"its lowest and `{BEST_STEP_METRIC}` the step of that lowest: a best below the final "
        "value means the curve turned upward).",
        "",
        *evaluation_table_lines(summary),
        *frequency_lines(summary),
        *samples_lines(summary),
        *_stability_lines(summary),
        *_cost_lines(summary),
        *_execution_lines(summary),
    ]
    if summary["plots"]:
        lines += ["## Plots", ""]
        for caption, file in summary["plots"].items():
            lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return "\n".join(lines)


def _arms_line(summary: Mapping[str, Any]) -> str:
    seeds = {a: entry["seeds"] for a, entry in summary["arms"].items()}
    return (
        "Arms: "
        + ", ".join(
            f"**{a}** ({len(s)} run{'s' if len(s) != 1 else ''}, seeds {s})" for a, s in seeds.items()
        )
        + "."
    )


def _stability_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Training stability",
        "",
        f"Loss spike: {summary['spike_rule']}; counted by the trainer, summed over seeds ('–': a run "
        "logged no count). Gradient norms as logged, pooled over seeds.",
        "",
        "| arm | logged steps | loss spikes | non-finite | skipped | grad-norm mean | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, entry in summary["arms"].items():
        s = entry["stability"]
        lines.append(
            f"| {a} | {s['logged_steps']} | {spike_cell(s['loss_spikes'])} | {s['nonfinite_loss']} | {s['skipped']} | "
            f"{fmt(s['grad_norm_mean'])} | {fmt(s['grad_norm_p99'])} | {fmt(s['grad_norm_max'])} |"
        )
    return [*lines, ""]


def _cost_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Cost",
        "",
        "Median training tokens/s over logged steps (the first one left out). The ratio to "
        f"**{summary['baseline']}** is a fair comparison only for runs that shared a machine.",
        "",
        "| arm | tokens/s | × baseline | MFU |",
        "|---|---|---|---|",
    ]
    for a, entry in summary["arms"].items():
        c = entry["cost"]
        lines.append(
            f"| {a} | {fmt(c['tokens_per_s'])} | {fmt(c['relative_to_baseline'])} | {fmt(c['mfu'])} |"
        )
    return [*lines, ""]


def _execution_lines(summary: Mapping[str, Any]) -> list[str]:
    """One sentence on how the study ran (executor, workers, threads, wall time), when known."""
    ex = summary.get("execution") or {}
    threads = ex.get("threads_per_run") or []
    parts = []
    if ex.get("executor"):
        workers = ex.get("workers")
        parts.append(f"executor `{ex['executor']}`" + (f" with {workers} workers" if workers else ""))
    if threads:
        parts.append(f"torch threads per run: {', '.join(map(str, threads))}")
    if ex.get("wall_s") is not None:
        parts.append(f"wall time of the last `dpls study`: {hms(float(ex['wall_s']))}")
    if not parts:
        return []
    return ["## How it ran", "", "; ".join(parts).capitalize() + ".", ""]


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def iter_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths`` (a path holding several runs expands to them)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_study_dir(p) or is_run_dir(p):
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.glob(f"*/{METRICS_FILE}")))
    return out
