"""What `dpls eval` needs from the data beyond the validation tokens: every token id's frequency
in the training split (``ce_by_frequency``) and its bytes of text (``bits_per_byte``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpls.data import DataError, load_tokenizer, token_counts
from dpls.eval.metrics import FrequencyBins, MetricAccumulator, frequency_bins


def metric_accumulator_for(data_dir: str | Path, vocab_size: int) -> tuple[MetricAccumulator, dict[str, Any]]:
    """A `MetricAccumulator` with the frequency bins of ``data_dir``'s training shards and the
    byte lengths of its tokenizer, and a record of both for the evaluation's provenance.

    A tokenizer that cannot be loaded here (GPT-2's BPE is downloaded by tiktoken on first use)
    leaves ``bits_per_byte`` out (null), saying why; so does a data directory without training
    tokens for ``ce_by_frequency``. Neither stops the evaluation.
    """
    counts = token_counts(data_dir, vocab_size)
    bins: FrequencyBins | None = frequency_bins(counts) if counts.sum() > 0 else None
    info: dict[str, Any] = {
        "frequency_bins": {
            "counted_tokens": int(counts.sum()),
            "bins": 0 if bins is None else len(bins.types),
        }
    }
    lengths = None
    try:
        tokenizer = load_tokenizer(data_dir)
        lengths, exact = tokenizer.byte_lengths()
        info["bytes"] = {"tokenizer": tokenizer.kind, "exact": exact}
    except (DataError, ValueError, OSError) as err:
        info["bytes"] = {"unavailable": f"the tokenizer could not be loaded: {err}"}
    return MetricAccumulator(token_bytes=lengths, frequency_bins=bins), info
