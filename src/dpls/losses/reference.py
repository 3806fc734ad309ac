"""The reference implementation: the definition of docs/losses.md written out densely.

It builds the soft target ``q`` as a full ``[N, V]`` tensor and lets autograd differentiate
``−Σ q·log_softmax(z)``, exactly as the definition reads: ``T`` is the ``min(k, #finite)``
largest finite logits, ties to the lowest index (a stable sort), and ``0·log p`` is 0 where
``p = 0``. It is the slowest and hungriest implementation; use it to check the others, not to
train. Differentiable twice (the selection is a constant).
"""

from __future__ import annotations

import torch

from dpls.losses.registry import register_impl
from dpls.losses.softcap import softcap as apply_softcap


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 arithmetic for every input dtype, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over valid rows (0 when none), sum, or per row; ``per_row`` is already 0 at ignored rows."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def reference_dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    reduction: str,
    return_nll: bool = False,
    inplace_backward: bool = False,  # part of the shared signature; nothing to reuse here
    softcap: float | None = None,
):
    valid = target != ignore_index
    # Ignored rows get zeros: they contribute nothing, and a row of −inf there cannot make NaN.
    z = apply_softcap(logits.to(compute_dtype(logits.dtype)), softcap)
    z = torch.where(valid[:, None], z, 0.0)
    y = torch.where(valid, target, torch.zeros_like(target))
    eps = epsilon.to(z.dtype)[:, None] if isinstance(epsilon, torch.Tensor) else epsilon

    logp = torch.log_softmax(z, dim=-1)
    onehot = torch.zeros_like(z).scatter_(1, y[:, None], 1.0)
    q = (1.0 - eps) * onehot + eps * top_k_target(z.detach(), top_k)
    loss = reduce_rows(torch.where(valid, _cross(q, logp), 0.0), valid, reduction)
    if not return_nll:
        return loss
    nll = reduce_rows(torch.where(valid, _cross(onehot, logp), 0.0), valid, reduction)
    return loss, nll.detach()


def top_k_target(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """The uniform distribution over T: the ``min(k, #finite)`` largest finite entries of each row,
    ties to the lowest index (a stable descending sort keeps index order among equal values)."""
    finite = z > -float("inf")
    k_eff = finite.sum(-1, keepdim=True).clamp(1, top_k)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(z.shape[1], device=z.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return ((rank < k_eff) & finite).to(z.dtype) / k_eff.to(z.dtype)


def _cross(q: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``−Σ_j q_j log p_j`` per row, with ``0·log 0 = 0`` (masked logits carry no mass)."""
    return -torch.where(q > 0, q * logp, 0.0).sum(-1)


register_impl("reference", reference_dpls_loss, priority=0, softcap=True)
