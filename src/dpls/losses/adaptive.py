"""Confidence-adaptive ε: one smoothing value per token from the model's own (detached) prediction.

``constant``    ε_i = ε
``confidence``  ε_i = ε·(1 − max_j p_ij)^γ      confident rows get little smoothing
``entropy``     ε_i = ε·(H_i / log V)^γ          uncertain (flat) rows get more (V: unmasked logits)

The prediction is detached, so ε_i is a constant of the step: it reaches every implementation as
the per-token ``epsilon`` tensor. It costs one extra read of the logits, in row chunks under
``no_grad`` (for the fused-linear path, one extra chunked matmul), never a ``[N, V]`` temporary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dpls.losses.chunked import chunk_rows, run_chunks
from dpls.losses.linear import default_chunk_size
from dpls.losses.reference import compute_dtype
from dpls.losses.softcap import softcap as apply_softcap


def _one_minus_max_p(z: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(z, dim=-1)
    return (-torch.expm1(z.amax(-1) - lse)).clamp_(0.0, 1.0)  # 1 − p_max without cancellation


def _normalized_entropy(z: torch.Tensor) -> torch.Tensor:
    """``H(p) / log V'`` with ``V'`` the row's finite (unmasked) logits: a padded vocabulary
    changes nothing; ``0·log 0 = 0``; 0 for a row with a single finite logit."""
    logp = torch.log_softmax(z, dim=-1)
    finite = logp > -float("inf")
    h = -(logp.exp() * torch.where(finite, logp, 0.0)).sum(-1)
    log_v = finite.sum(-1).to(z.dtype).log()
    return torch.where(log_v > 0, h / log_v.clamp_min(1e-30), 0.0).clamp_(0.0, 1.0)


# mode -> per-row statistic in [0, 1] that ε is scaled by (before the power γ); None: constant ε
EPSILON_MODES: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "constant": None,
    "confidence": _one_minus_max_p,
    "entropy": _normalized_entropy,
}


def check_mode(mode: str, gamma: float) -> None:
    if mode not in EPSILON_MODES:
        raise ValueError(f"epsilon_mode must be one of {sorted(EPSILON_MODES)}, got {mode!r}")
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float))
        or not math.isfinite(gamma)
        or gamma < 0
    ):
        raise ValueError(f"gamma must be a finite float >= 0, got {gamma!r}")


@torch.no_grad()
def _per_row(
    n: int,
    make_chunk: Callable[[int, int], torch.Tensor],
    v: int,
    stat: Callable,
    device: torch.device,
    chunk: int | None = None,
) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=device)

    def one(s: int, e: int) -> None:
        out[s:e] = stat(make_chunk(s, e))

    run_chunks(n, chunk or chunk_rows(n, v, device=device), one, device)
    return out


def adaptive_epsilon(
    logits: torch.Tensor, epsilon: float, mode: str = "constant", gamma: float = 1.0
) -> float | torch.Tensor:
    """ε per token (float32, the logits' batch shape) for ``mode``; a plain float for ``constant``."""
    check_mode(mode, gamma)
    stat = EPSILON_MODES[mode]
    if stat is None or epsilon == 0.0:
        return float(epsilon)
    v = logits.shape[-1]
    z = logits.detach().reshape(-1, v)
    cd = compute_dtype(logits.dtype)
    r = _per_row(z.shape[0], lambda s, e: z[s:e].to(cd), v, stat, logits.device)
    return (epsilon * r.pow(gamma)).reshape(logits.shape[:-1])


def adaptive_epsilon_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    mode: str = "constant",
    gamma: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> float | torch.Tensor:
    """The same from hidden states and the output weight, forming the logits chunk by chunk
    (capped by ``softcap``, as the loss will see them)."""
    check_mode(mode, gamma)
    stat = EPSILON_MODES[mode]
    if stat is None or epsilon == 0.0:
        return float(epsilon)
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    b = None if bias is None else bias.detach()
    cd = compute_dtype(hidden.dtype)
    v = w.shape[0]

    def make(s: int, e: int) -> torch.Tensor:
        z = h[s:e] @ w.T if b is None else torch.addmm(b, h[s:e], w.T)
        return apply_softcap(z.to(cd), softcap)

    n = h.shape[0]
    r = _per_row(n, make, v, stat, hidden.device, chunk_size or default_chunk_size(n, v))
    return (epsilon * r.pow(gamma)).reshape(hidden.shape[:-1])
