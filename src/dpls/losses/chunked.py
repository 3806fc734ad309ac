"""The chunked implementation: pure PyTorch, rows in cache-sized chunks, gradient recomputed.

Forward walks the rows in chunks and keeps a few numbers per row — ``lse``, the target logit
``z_y``, the smoothing term ``Σ_j r_j z_j`` and the k-th largest value ``τ`` — and nothing of size
``[N, V]``. Backward walks the chunks again and writes ``(softmax − q)·scale`` straight into the
gradient (or, with ``inplace_backward``, into the logits' own storage). The soft target is

    q = (1 − ε)·onehot(y) + ε·r,   r = uniform over T (DPLS; T = whole row for k = V)
                                    or a fixed prior over the vocabulary (prior-weighted LS),
    T = {j : z_j > τ}  ∪  the first (k − |{z_j > τ}|) indices with z_j = τ,

so exactly ``k`` entries receive ``ε/k`` even when values tie at the threshold (the same
lowest-index rule as the Triton kernel and the vocabulary-parallel loss). The loss does not depend
on how ties are broken: tied entries have equal logits.

Why it is fast on CPU: each chunk stays in cache between the passes over it, the only allocation
of size ``[N, V]`` is the gradient itself, and ``torch.topk(sorted=False)`` on a chunk is a partial
selection, not a sort. The helpers here (``row_stats``, ``write_grad``) are shared with the
fused-linear loss and the related objectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.registry import register_impl

CHUNK_ELEMS = 1 << 18  # ~1 MiB of float32 per chunk: fits in L2 next to its temporaries


def chunk_rows(n_rows: int, v: int, chunk_elems: int | None = None) -> int:
    return max(1, min(n_rows, (chunk_elems or CHUNK_ELEMS) // max(v, 1)))


@dataclass(frozen=True)
class Smoothing:
    """Where the ε mass goes: uniformly on the ``top_k`` largest logits, or along a fixed ``prior``."""

    top_k: int
    prior: torch.Tensor | None = None  # [V] in the compute dtype, sums to 1
    active: bool = True  # False when ε = 0 everywhere: plain CE, skip the selection


def row_stats(zc: torch.Tensor, sm: Smoothing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of one chunk (compute dtype): ``lse``, ``Σ_j r_j z_j`` and the threshold ``τ``."""
    lse = torch.logsumexp(zc, dim=-1)
    if not sm.active:
        return lse, torch.zeros_like(lse), torch.zeros_like(lse)
    if sm.prior is not None:
        return lse, zc @ sm.prior, torch.zeros_like(lse)
    if sm.top_k >= zc.shape[-1]:  # label smoothing: T is the whole row
        return lse, zc.mean(-1), torch.full_like(lse, -float("inf"))
    vals = torch.topk(zc, sm.top_k, dim=-1, sorted=False).values
    return lse, vals.sum(-1) / sm.top_k, vals.amin(-1)


def topk_mask(zc: torch.Tensor, tau: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean ``[rows, V]`` membership of T, exactly ``top_k`` per row (ties: lowest index first)."""
    mask = zc >= tau[:, None]
    if top_k >= zc.shape[-1]:
        return mask
    counts = mask.sum(-1)
    tied_rows = (counts > top_k).nonzero().flatten()
    if tied_rows.numel():  # rare: several entries equal τ; keep only the first ones
        zr, tr = zc[tied_rows], tau[tied_rows, None]
        above = zr > tr
        quota = top_k - above.sum(-1, keepdim=True)
        equal = zr == tr
        mask[tied_rows] = above | (equal & (equal.cumsum(-1) <= quota))
    return mask


def write_grad(
    src: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tau: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
    sm: Smoothing,
) -> torch.Tensor:
    """``out = (softmax(src) − q)·scale`` for one chunk; ``out`` may be ``src`` itself (all per-row args [rows])."""
    spread = scale * eps
    if sm.active and sm.prior is None:
        spread = spread / sm.top_k
        mask = topk_mask(src, tau, sm.top_k) if sm.top_k < src.shape[-1] else None  # before any overwrite
    torch.sub(src, lse[:, None], out=out)
    out.exp_().mul_(scale[:, None])
    if sm.active:
        if sm.prior is not None:
            out.sub_(spread[:, None] * sm.prior)
        elif mask is None:
            out.sub_(spread[:, None])
        else:
            out.sub_(mask * spread[:, None])
    rows = torch.arange(out.shape[0], device=out.device)
    out[rows, y] -= scale * (1.0 - eps)
    return out


def row_scale(grad_out: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """The factor each row's gradient gets from the upstream gradient and the reduction; 0 at ignored rows."""
    keep = valid.to(dtype)
    if reduction == "mean":
        return grad_out.to(dtype) * keep / valid.sum().clamp_min(1).to(dtype)
    return grad_out.to(dtype) * keep  # "sum": scalar; "none": one per row


def loss_rows(
    lse: torch.Tensor, z_y: torch.Tensor, smooth: torch.Tensor, eps: torch.Tensor | float, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``lse − (1−ε)z_y − ε·Σ r z`` and plain CE ``lse − z_y``, both 0 at ignored rows."""
    nll = (lse - z_y) * keep
    return nll + eps * (z_y - smooth) * keep, nll


class ChunkedSoftTargetLoss(torch.autograd.Function):
    """``−Σ q·log_softmax(z)`` for the soft target of :class:`Smoothing`, with ``(loss, nll)`` outputs."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        eps: torch.Tensor,  # [N] compute dtype
        sm: Smoothing,
        ignore_index: int,
        reduction: str,
        inplace_backward: bool,
    ):
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        lse = torch.empty(n, dtype=cd, device=logits.device)
        smooth = torch.empty_like(lse)
        tau = torch.empty_like(lse)
        step = chunk_rows(n, v)
        with torch.no_grad():
            for s in range(0, n, step):
                lse[s : s + step], smooth[s : s + step], tau[s : s + step] = row_stats(
                    logits[s : s + step].to(cd), sm
                )
            z_y = logits.gather(1, y[:, None]).squeeze(1).to(cd)
            per_loss, per_nll = loss_rows(lse, z_y, smooth, eps, valid.to(cd))
            loss = reduce_rows(per_loss, valid, reduction)
            nll = reduce_rows(per_nll, valid, reduction)
        ctx.save_for_backward(logits, y, valid, lse, tau, eps)
        ctx.sm, ctx.reduction, ctx.inplace = sm, reduction, inplace_backward
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor | None):
        logits, y, valid, lse, tau, eps = ctx.saved_tensors
        n, v = logits.shape
        cd = lse.dtype
        scale = row_scale(grad_loss, valid, ctx.reduction, cd).expand(n)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        direct = logits.dtype == cd  # compute straight into the output rows
        step = chunk_rows(n, v)
        with torch.no_grad():
            for s in range(0, n, step):
                e = min(n, s + step)
                src = logits[s:e] if direct else logits[s:e].to(cd)
                out = grad[s:e] if direct else src  # a private float32 copy may be overwritten
                write_grad(src, out, lse[s:e], tau[s:e], y[s:e], scale[s:e], eps[s:e], ctx.sm)
                if not direct:
                    grad[s:e].copy_(out)
        return grad, None, None, None, None, None, None


def eps_rows(epsilon: float | torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(epsilon, torch.Tensor):
        return epsilon.to(dtype)
    return torch.full((n,), float(epsilon), dtype=dtype, device=device)


def is_active(epsilon: float | torch.Tensor) -> bool:
    """Whether any ε mass must be placed (a tensor ε is assumed non-zero: checking would sync)."""
    return isinstance(epsilon, torch.Tensor) or float(epsilon) > 0.0


def chunked_dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    reduction: str,
    return_nll: bool = False,
    inplace_backward: bool = False,
):
    n = logits.shape[0]
    eps = eps_rows(epsilon, n, compute_dtype(logits.dtype), logits.device)
    sm = Smoothing(top_k=top_k, active=is_active(epsilon))
    loss, nll = ChunkedSoftTargetLoss.apply(logits, target, eps, sm, ignore_index, reduction, inplace_backward)
    return (loss, nll) if return_nll else loss


register_impl("chunked", chunked_dpls_loss, priority=10)
