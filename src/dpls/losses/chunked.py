"""The chunked implementation: pure PyTorch, rows in cache-sized chunks, gradient recomputed.

Forward walks the rows in chunks and keeps four numbers per row — ``lse``, the target logit
``z_y``, the top-k sum ``Σ_T z`` and the k-th largest value ``τ`` — and nothing of size ``[N, V]``.
Backward walks the chunks again and writes ``(softmax − q)·scale`` straight into the gradient
(or, with ``inplace_backward``, into the logits' own storage), where

    T = {j : z_j > τ}  ∪  the first (k − |{z_j > τ}|) indices with z_j = τ

so exactly ``k`` entries receive ``ε/k`` even when values tie at the threshold (the same
lowest-index rule as the Triton kernel and the vocabulary-parallel loss). The loss itself does not
depend on how ties are broken: tied entries have equal logits.

Why it is fast on CPU: every chunk stays in cache between the passes over it, the only
allocation of size ``[N, V]`` is the gradient itself, and ``torch.topk(sorted=False)`` on a chunk
is a partial selection, not a sort.
"""

from __future__ import annotations

import torch

from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.registry import register_impl

CHUNK_ELEMS = 1 << 18  # ~1 MiB of float32 per chunk: fits in L2 next to its temporaries


def chunk_rows(n_rows: int, v: int, chunk_elems: int = CHUNK_ELEMS) -> int:
    return max(1, min(n_rows, chunk_elems // max(v, 1)))


def row_stats(
    zc: torch.Tensor, top_k: int, need_topk: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``lse``, top-k sum and k-th largest value ``τ`` of each row of one chunk (compute dtype)."""
    lse = torch.logsumexp(zc, dim=-1)
    if not need_topk:
        return lse, None, None
    v = zc.shape[-1]
    if top_k >= v:  # label smoothing: T is the whole row
        return lse, zc.sum(-1), torch.full_like(lse, -float("inf"))
    vals = torch.topk(zc, top_k, dim=-1, sorted=False).values
    return lse, vals.sum(-1), vals.amin(-1)


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


class ChunkedDPLS(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        eps_tensor: torch.Tensor | None,
        eps_float: float,
        top_k: int,
        ignore_index: int,
        reduction: str,
        inplace_backward: bool,
    ):
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        need_topk = eps_tensor is not None or eps_float > 0.0
        lse = torch.empty(n, dtype=cd, device=logits.device)
        top_sum = torch.zeros(n, dtype=cd, device=logits.device)
        tau = torch.zeros(n, dtype=cd, device=logits.device)
        step = chunk_rows(n, v)
        with torch.no_grad():
            for s in range(0, n, step):
                zc = logits[s : s + step].to(cd)
                lse_c, sum_c, tau_c = row_stats(zc, top_k, need_topk)
                lse[s : s + step] = lse_c
                if need_topk:
                    top_sum[s : s + step] = sum_c
                    tau[s : s + step] = tau_c
            z_y = logits.gather(1, y[:, None]).squeeze(1).to(cd)
            keep = valid.to(cd)
            nll_rows = (lse - z_y) * keep
            if eps_tensor is not None:
                eps = eps_tensor.to(cd)
                loss_rows = nll_rows + eps * (z_y - top_sum / top_k) * keep
            elif need_topk:
                loss_rows = nll_rows + eps_float * (z_y - top_sum / top_k) * keep
            else:
                loss_rows = nll_rows
            loss = reduce_rows(loss_rows, valid, reduction)
            nll = reduce_rows(nll_rows, valid, reduction)
            if nll is loss:  # ε = 0 with reduction "none": two outputs must be two tensors
                nll = nll.clone()

        ctx.save_for_backward(logits, y, valid, lse, tau, eps_tensor)
        ctx.eps_float, ctx.top_k, ctx.reduction = eps_float, top_k, reduction
        ctx.need_topk, ctx.inplace = need_topk, inplace_backward
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor | None):
        logits, y, valid, lse, tau, eps_tensor = ctx.saved_tensors
        n, v = logits.shape
        cd = lse.dtype
        top_k = ctx.top_k
        # Per-row factor of the upstream gradient; 0 at ignored rows.
        keep = valid.to(cd)
        if ctx.reduction in ("none", "sum"):
            scale = grad_loss.to(cd) * keep
        else:
            scale = grad_loss.to(cd) * keep / valid.sum().clamp_min(1).to(cd)
        eps = eps_tensor.to(cd) if eps_tensor is not None else torch.full_like(scale, ctx.eps_float)
        hit = scale * (1.0 - eps)  # subtracted at the target
        spread = scale * eps / top_k  # subtracted on T

        grad = logits if ctx.inplace else torch.empty_like(logits)
        direct = logits.dtype == cd  # compute straight into the output chunk
        step = chunk_rows(n, v)
        with torch.no_grad():
            for s in range(0, n, step):
                e = min(n, s + step)
                zc = logits[s:e]
                if direct:
                    src, out = zc, grad[s:e]
                else:
                    src = zc.to(cd)
                    out = src  # a private float32 copy: overwrite it
                mask = topk_mask(src, tau[s:e], top_k) if ctx.need_topk else None  # before any overwrite
                torch.sub(src, lse[s:e, None], out=out)
                out.exp_().mul_(scale[s:e, None])
                if mask is not None:
                    out.sub_(mask * spread[s:e, None])
                rows = torch.arange(e - s, device=out.device)
                out[rows, y[s:e]] -= hit[s:e]
                if not direct:
                    grad[s:e].copy_(out)
        return grad, None, None, None, None, None, None, None


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
    eps_tensor = epsilon if isinstance(epsilon, torch.Tensor) else None
    eps_float = 0.0 if eps_tensor is not None else float(epsilon)
    loss, nll = ChunkedDPLS.apply(
        logits, target, eps_tensor, eps_float, top_k, ignore_index, reduction, inplace_backward
    )
    return (loss, nll) if return_nll else loss


register_impl("chunked", chunked_dpls_loss, priority=10)
