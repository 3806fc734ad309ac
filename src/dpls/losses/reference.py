"""The reference implementation: SPEC §1 written out densely, for reading and for testing.

It builds the soft target ``q`` as a full ``[N, V]`` tensor and lets autograd differentiate
``−Σ q·log_softmax(z)``, exactly as the definition reads. It is the slowest and hungriest
implementation; use it to check the others, not to train.
"""

from __future__ import annotations

import torch

from dpls.losses.registry import register_impl


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
):
    z = logits.to(compute_dtype(logits.dtype))
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    eps = epsilon.to(z.dtype)[:, None] if isinstance(epsilon, torch.Tensor) else epsilon

    logp = torch.log_softmax(z, dim=-1)
    onehot = torch.zeros_like(z).scatter_(1, y[:, None], 1.0)
    top = torch.topk(z.detach(), top_k, dim=-1).indices  # the selection is a constant
    in_top = torch.zeros_like(z).scatter_(1, top, 1.0)
    q = (1.0 - eps) * onehot + (eps / top_k) * in_top

    keep = valid.to(z.dtype)
    loss = reduce_rows(-(q * logp).sum(-1) * keep, valid, reduction)
    if not return_nll:
        return loss
    nll = reduce_rows(-logp.gather(1, y[:, None]).squeeze(1) * keep, valid, reduction)
    return loss, nll.detach()


register_impl("reference", reference_dpls_loss, priority=0)
