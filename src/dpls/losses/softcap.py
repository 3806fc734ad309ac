"""Logit soft-capping: ``z ↦ cap·tanh(z / cap)`` before the loss (Gemma 2, nanochat, Liger, Cut Cross-Entropy).

Every loss entry point takes ``softcap`` (None: off). The statement is always "cap the logits, then
the loss of the capped logits": the gradient reaching the raw logits is the capped logits' gradient
times ``1 − tanh²(z / cap) = 1 − (s / cap)²`` with ``s`` the capped value.

A ``−inf`` logit stays ``−inf``: it is a masked entry (outside the vocabulary, never smoothed onto),
not a very small logit, so capping keeps it masked (``cap·tanh(−∞) = −cap`` would unmask it).
The chunked and Triton implementations cap each chunk of logits as they read it (no capped
``[N, V]`` copy); :func:`softcap` is the differentiable form for everything else.
"""

from __future__ import annotations

import math

import torch


def check_softcap(value: object, name: str = "softcap") -> float | None:
    """``None`` (off) or a finite float > 0; anything else is a ``ValueError`` naming ``name``."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0 (or None: off), got {value!r}")
    return float(value)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap·tanh(logits / cap)``, differentiable, ``−inf`` kept; ``cap=None`` returns ``logits``."""
    if cap is None:
        return logits
    capped = torch.tanh(logits / cap) * cap
    return torch.where(logits == -float("inf"), logits, capped)


@torch.no_grad()
def softcap_(z: torch.Tensor, cap: float) -> torch.Tensor:
    """``z`` capped in place (a chunk buffer of the compute dtype), ``−inf`` kept; returns ``z``."""
    masked = z == -float("inf")
    z.div_(cap).tanh_().mul_(cap)
    return z.masked_fill_(masked, -float("inf"))


@torch.no_grad()
def softcap_backward_(grad: torch.Tensor, capped: torch.Tensor, cap: float) -> torch.Tensor:
    """``grad *= 1 − (capped / cap)²`` in place: the chain rule through the cap (0 at masked
    entries). ``capped`` (a chunk buffer, no longer needed) is overwritten with that slope."""
    slope = capped.square_().mul_(-1.0 / (cap * cap)).add_(1.0).clamp_min_(0.0)
    return grad.mul_(slope)
