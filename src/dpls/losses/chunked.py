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

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.registry import register_impl

CHUNK_ELEMS = 1 << 19  # 2 MiB of float32 per chunk: stays in cache next to its temporaries


GPU_CHUNK_ELEMS = 1 << 24  # on a GPU, fewer and larger launches (64 MiB of float32 per chunk)


def chunk_rows(
    n_rows: int, v: int, chunk_elems: int | None = None, device: torch.device | None = None
) -> int:
    """Rows per chunk: about ``chunk_elems`` logits (default by device), at least one row."""
    if chunk_elems is None:
        chunk_elems = GPU_CHUNK_ELEMS if device is not None and device.type != "cpu" else CHUNK_ELEMS
    return max(1, min(n_rows, chunk_elems // max(v, 1)))


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()
_pool_lock = threading.Lock()  # one pooled loss at a time: the thread count is process-global


def run_chunks(n: int, step: int, fn: Callable[[int, int], None], device: torch.device) -> None:
    """Call ``fn(start, end)`` for every row chunk; chunks are independent (disjoint outputs).

    On CPU the chunks are spread over a pool of Python threads, each running single-threaded
    ops (torch releases the GIL inside ops). Why not intra-op threads: each of the many small ops
    would open an OpenMP region whose barrier waits for every thread, and on a busy machine a
    descheduled thread stalls every region — measured 5–15× slower than CE under load, while
    dynamic chunk scheduling keeps both cores busy. GPU chunks simply run in order.
    """
    global _pool, _pool_size
    starts = range(0, n, step)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(starts) < 2:
        for s in starts:
            fn(s, min(n, s + step))
        return

    def call(s: int, e: int) -> None:
        with torch.no_grad():  # grad mode is thread-local: the workers' default is "enabled"
            fn(s, e)

    with _pool_lock:
        if _pool is None or _pool_size != threads:
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="dpls-chunks"), threads
        torch.set_num_threads(1)
        try:
            for future in [_pool.submit(call, s, min(n, s + step)) for s in starts]:
                future.result()
        finally:
            torch.set_num_threads(threads)


def chunk_buffer(name: str, rows: int, v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable ``[rows, v]`` buffer (one chunk), so chunks do not allocate."""
    key = (name, dtype, device)
    cache = _local.__dict__.setdefault("buffers", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < rows * v:
        buf = cache[key] = torch.empty(rows * v, dtype=dtype, device=device)
    return buf[: rows * v].view(rows, v)


@dataclass(frozen=True)
class Smoothing:
    """Where the ε mass goes: uniformly on the ``top_k`` largest logits, or along a fixed ``prior``."""

    top_k: int
    prior: torch.Tensor | None = None  # [V] in the compute dtype, sums to 1
    active: bool = True  # False when ε = 0 everywhere: plain CE, skip the selection


class RowStats(NamedTuple):
    lse: torch.Tensor  # log-sum-exp of the row
    smooth: torch.Tensor  # Σ_j r_j z_j: the mean of the top-k logits, or the prior-weighted mean
    tau: torch.Tensor  # the k-th largest logit (−inf when T is the whole row)
    tied: torch.Tensor  # bool: the (k+1)-th largest equals τ, so ``z ≥ τ`` would select more than k


def row_stats(zc: torch.Tensor, sm: Smoothing, scratch: torch.Tensor | None = None) -> RowStats:
    """Per-row statistics of one chunk ``zc`` (compute dtype); ``scratch`` is a buffer like ``zc``.

    One partial selection ``topk(k + 1, sorted=False)`` gives the top-k sum, ``τ``, whether the
    row ties at ``τ`` (then the (k+1)-th value equals ``τ``), and the row maximum for ``lse``.
    """
    rows, v = zc.shape
    no_tie = torch.zeros(rows, dtype=torch.bool, device=zc.device)
    if sm.active and sm.prior is None and sm.top_k < v:
        vals = torch.topk(zc, sm.top_k + 1, dim=-1, sorted=False).values
        low2 = torch.topk(vals, 2, dim=-1, largest=False, sorted=True).values  # (k+1)-th and k-th largest
        lse = _lse(zc, vals.amax(-1), scratch)
        smooth = (vals.sum(-1) - low2[:, 0]) / sm.top_k
        return RowStats(lse, smooth, low2[:, 1], low2[:, 0] == low2[:, 1])
    lse = _lse(zc, zc.amax(-1), scratch)
    if not sm.active:
        return RowStats(lse, torch.zeros_like(lse), torch.zeros_like(lse), no_tie)
    if sm.prior is not None:
        return RowStats(lse, zc @ sm.prior, torch.zeros_like(lse), no_tie)
    return RowStats(lse, zc.mean(-1), torch.full_like(lse, -float("inf")), no_tie)  # k = V: T is the row


def _lse(zc: torch.Tensor, row_max: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``log Σ exp z`` given the row maxima, with the exponentials written into ``scratch``."""
    buf = torch.sub(zc, row_max[:, None], out=scratch[: zc.shape[0]] if scratch is not None else None)
    # A row of −inf has max −inf and gives NaN above; logsumexp's answer (−inf) is kept for it.
    return torch.where(torch.isfinite(row_max), buf.exp_().sum(-1).log_() + row_max, row_max)


def exact_topk_mask(zc: torch.Tensor, tau: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean membership of T, exactly ``top_k`` per row: above ``τ``, then ties by lowest index."""
    above = zc > tau[:, None]
    equal = zc == tau[:, None]
    quota = top_k - above.sum(-1, keepdim=True)
    return above | (equal & (equal.cumsum(-1) <= quota))


def write_grad(
    src: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tau: torch.Tensor,
    tied: torch.Tensor | None,
    y: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
    sm: Smoothing,
    scratch: torch.Tensor | None = None,
    negative: bool = True,
) -> torch.Tensor:
    """``out = (softmax(src) − q)·scale`` for one chunk; ``out`` may be ``src`` itself.

    Per-row arguments are ``[rows]``; ``tied`` lists the rows (indices in the chunk) whose entries
    tie at ``τ``, or is None when there are none; ``scratch`` is a float buffer like ``src``;
    ``negative=False`` promises that no ``scale`` is negative (saves a pass).
    Four passes over the chunk: the top-k mask, ``src − shift``, ``exp``, and ``−spread·mask``,
    with the scale folded into the exponent (``p·s = exp(z − lse + log s)``).
    """
    rows, v = src.shape
    partial = sm.active and sm.prior is None and sm.top_k < v
    spread = scale * eps / (sm.top_k if sm.prior is None else 1.0)
    if partial:  # the mask must be read before ``out`` (maybe ``src``) is overwritten
        mask = scratch[:rows] if scratch is not None else torch.empty_like(src)
        torch.ge(src, tau[:, None], out=mask)
        if tied is not None:
            exact = exact_topk_mask(src[tied], tau[tied], sm.top_k)
            mask[tied] = exact.to(mask.dtype)
    shift = lse - scale.abs().log()  # +inf where scale = 0: exp gives exact zeros
    torch.sub(src, shift[:, None], out=out)
    out.exp_()
    if negative:  # a negative upstream gradient is possible: restore the sign
        out.mul_(scale.sign()[:, None])
    if partial:
        out.addcmul_(mask, spread[:, None], value=-1.0)
    elif sm.active and sm.prior is not None:
        out.sub_(spread[:, None] * sm.prior)
    elif sm.active:  # k = V: every entry gets ε/V
        out.sub_(spread[:, None])
    out[torch.arange(rows, device=out.device), y] -= scale * (1.0 - eps)
    return out


def row_scale(
    grad_out: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype
) -> torch.Tensor:
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


def chunk_tied(tied_rows: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """The tied rows falling in chunk ``[s, e)``, as chunk-local indices (None if there are none)."""
    if tied_rows is None:
        return None
    local = tied_rows[(tied_rows >= s) & (tied_rows < e)] - s
    return local if local.numel() else None


def tied_row_index(tied: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows that tie at ``τ`` (one host sync on GPU), or None."""
    idx = tied.nonzero().flatten()
    return idx if idx.numel() else None


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
        smooth, tau = torch.empty_like(lse), torch.empty_like(lse)
        tied = torch.zeros(n, dtype=torch.bool, device=logits.device)
        step = chunk_rows(n, v, device=logits.device)

        def chunk(s: int, e: int) -> None:
            zc = logits[s:e]
            buf = chunk_buffer("work", e - s, v, cd, zc.device)
            if zc.dtype != cd:
                zc = chunk_buffer("copy", e - s, v, cd, zc.device).copy_(zc)
            lse[s:e], smooth[s:e], tau[s:e], tied[s:e] = row_stats(zc, sm, buf)

        with torch.no_grad():
            run_chunks(n, step, chunk, logits.device)
            z_y = logits.gather(1, y[:, None]).squeeze(1).to(cd)
            per_loss, per_nll = loss_rows(lse, z_y, smooth, eps, valid.to(cd))
            loss = reduce_rows(per_loss, valid, reduction)
            nll = reduce_rows(per_nll, valid, reduction)
            if nll is loss:  # ε = 0 with reduction "none": two outputs must be two tensors
                nll = nll.clone()
        ctx.save_for_backward(logits, y, valid, lse, tau, tied, eps)
        ctx.sm, ctx.reduction, ctx.inplace = sm, reduction, inplace_backward
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor | None):
        logits, y, valid, lse, tau, tied, eps = ctx.saved_tensors
        n, v = logits.shape
        cd = lse.dtype
        scale = row_scale(grad_loss, valid, ctx.reduction, cd).expand(n)
        negative = logits.device.type != "cpu" or bool((scale < 0).any())  # no host sync on GPU
        tied_rows = tied_row_index(tied)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        direct = logits.dtype == cd  # compute straight into the output rows
        step = chunk_rows(n, v, device=logits.device)

        def chunk(s: int, e: int) -> None:
            if direct:
                src, out = logits[s:e], grad[s:e]
            else:  # a private float32 copy, overwritten in place
                src = out = chunk_buffer("copy", e - s, v, cd, logits.device).copy_(logits[s:e])
            write_grad(
                src,
                out,
                lse[s:e],
                tau[s:e],
                chunk_tied(tied_rows, s, e),
                y[s:e],
                scale[s:e],
                eps[s:e],
                ctx.sm,
                chunk_buffer("work", e - s, v, cd, logits.device),
                negative,
            )
            if not direct:
                grad[s:e].copy_(out)

        with torch.no_grad():
            run_chunks(n, step, chunk, logits.device)
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
    loss, nll = ChunkedSoftTargetLoss.apply(
        logits, target, eps, sm, ignore_index, reduction, inplace_backward
    )
    return (loss, nll) if return_nll else loss


register_impl("chunked", chunked_dpls_loss, priority=10)
