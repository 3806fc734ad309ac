"""A drop-in DPLS loss for Hugging Face ``transformers.Trainer(compute_loss_func=...)``.

``Trainer(..., compute_loss_func=make_hf_loss(epsilon=0.1, top_k=100))`` trains a causal LM with
DPLS instead of cross-entropy. The labels are shifted the way transformers' causal-LM loss does it
(position ``t`` predicts label ``t + 1``; ``-100`` is ignored), and with ``num_items_in_batch``
(gradient accumulation) the loss is the sum over this micro-batch divided by the number of label
tokens in the whole accumulated batch, so it matches the built-in loss's scaling. Nothing here
imports transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dpls.losses.functional import dpls_loss
from dpls.losses.registry import check_impl_name
from dpls.losses.validation import check_scalar_epsilon


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"model outputs must be a tensor or have .logits, got {type(outputs).__name__}")
    return logits


def make_hf_loss(
    epsilon: float = 0.1,
    top_k: int = 100,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Callable[..., torch.Tensor]:
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None) -> loss`` computing DPLS."""
    check_scalar_epsilon(epsilon)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    check_impl_name(impl)

    def compute_loss(
        outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None, **_: Any
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "labels are required (the Trainer passes them when the dataset has a 'labels' column)"
            )
        logits = _logits_of(outputs)
        # Pad one ignored label at the end and drop the first: labels[t + 1] for logits[t].
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = dpls_loss(
            logits,
            shift_labels,
            epsilon=epsilon,
            top_k=top_k,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    return compute_loss
