"""Loss spikes in study reports: the count each run's trainer logged, and the rule it used.

The trainer counts spikes on every step by OLMo-core's rule (`dpls.train.spikes`) and logs the
count since the run started as ``loss_spikes`` on every training row of metrics.jsonl; a run's
count is that of its last row. Runs made before the trainer counted them (rows without the
key) have an unknown count: reported as such ('–'), never as 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dpls.train.config import TrainConfig

if TYPE_CHECKING:
    from dpls.study.records import RunRecord


def run_spikes(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The run's spikes: its last training row's ``loss_spikes``; None unless every row has one."""
    counts = [c for r in rows if isinstance(c := r.get("loss_spikes"), int) and not isinstance(c, bool)]
    return counts[-1] if rows and len(counts) == len(rows) else None


def pooled_spikes(counts: Iterable[int | None]) -> int | None:
    """The spikes of several runs: their sum, or None when any run's count is unknown."""
    values = list(counts)
    return None if any(c is None for c in values) else sum(c for c in values if c is not None)


def spike_rule(runs: Iterable[RunRecord]) -> str:
    """The rule the runs counted spikes by, with their keys (each setting once)."""
    defaults = TrainConfig()
    settings = sorted(
        {
            (
                int(r.config.get("spike_window", defaults.spike_window)),
                float(r.config.get("spike_sigmas", defaults.spike_sigmas)),
            )
            for r in runs
            if run_spikes(r.train_rows) is not None
        }
    ) or [(defaults.spike_window, defaults.spike_sigmas)]
    return "; ".join(
        f"loss > mean + {k:g}σ of the previous {w} steps, every step (OLMo-core's rule; "
        f"spike_window={w}, spike_sigmas={k:g})"
        for w, k in settings
    )


def spike_cell(count: int | None) -> str:
    """A report cell: the count, or '–' when unknown."""
    return "–" if count is None else str(count)
