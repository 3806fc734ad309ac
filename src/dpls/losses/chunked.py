"""The chunked implementation: pure PyTorch, rows in cache-sized chunks, gradient recomputed.

The soft target is

    q = (1 − ε)·onehot(y) + ε·r,   r = uniform over T (DPLS; T = every finite logit for k = V)
                                    or a fixed prior over the vocabulary (prior-weighted LS),

with ``T`` the ``k`` largest *finite* logits of the row, ties at the threshold to the lowest index,
and ``|T| = min(k, number of finite logits)``: a masked (``−inf``) logit is outside the vocabulary,
so padding a vocabulary with masked entries changes nothing (docs/losses.md).

Forward, per chunk: one fused ``log_softmax`` into a cache-resident buffer gives ``log p_y`` and,
gathered at ``T``, the smoothing term; the loss is ``−(1−ε)·log p_y − ε·Σ_j r_j log p_j``, so the
row maximum is subtracted before anything is exponentiated (exact at any logit offset, as CE).
``T`` is found without a full-row ``topk`` (the slow part on CPU): the row is viewed as ``B``
interleaved strips of ``V/B`` columns, the ``k+1`` columns with the largest strip maxima hold
every one of the row's ``k+1`` largest entries, and one small selection over those ``B·(k+1)``
candidates gives the values and column indices (on GPU ``topk``; on CPU a compiled C kernel
or its NumPy twin, :func:`strip_search`, with the rows that need a tie or mask rule sent to the
exact path). For
small ``k`` the ``k`` indices per row are kept for backward; otherwise the threshold ``τ`` is
kept and backward compares against it (on CPU found by one quickselect, :func:`partition_top`).

Backward, per chunk: one fused ``softmax`` written straight into the gradient (or the logits'
own storage with ``inplace_backward``), scaled per row, and ``−ε·r·scale`` / ``−(1−ε)·scale``
scattered onto the ``k`` entries of ``T`` and the target: no ``[N, V]`` temporary besides the
gradient itself. The helpers (``chunk_forward``, ``chunk_grad``) are shared with the
fused-linear loss and the related objectives.

With ``softcap`` each chunk is capped (``cap·tanh(z/cap)``) in its private copy as it is read, in
forward and again in backward, where the gradient of the capped logits is multiplied by
``1 − (s/cap)²``: the capped ``[N, V]`` logits are never stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from dpls.losses import cpu_kernel
from dpls.losses.reference import compute_dtype, reduce_rows
from dpls.losses.registry import register_impl
from dpls.losses.softcap import softcap as apply_softcap
from dpls.losses.softcap import softcap_, softcap_backward_

CHUNK_ELEMS = 1 << 21  # 8 MiB of float32 per chunk: few enough chunks that per-op overhead is small
GPU_CHUNK_ELEMS = 1 << 24  # on a GPU, fewer and larger launches (64 MiB of float32 per chunk)
STRIPS = 16  # B: candidates per selected column in the top-k search
SPARSE_K_FRACTION = 16  # keep T's indices when k ≤ V/16 (then they cost ≤ V/8 bytes per row)


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
    descheduled thread stalls every region, while dynamic chunk scheduling keeps both cores
    busy. GPU chunks simply run in order.
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


def refuse_double_backward(name: str) -> None:
    """Raise when a backward that builds no graph is asked for one (``create_graph=True``):
    a silently zero Hessian-vector product is worse than an error."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} does not support double backward (create_graph=True): its backward builds no "
            "graph. Use dpls_loss(..., impl='chunked') or impl='reference' on the logits for "
            "second-order gradients."
        )


@dataclass(frozen=True)
class Smoothing:
    """Where the ε mass goes: uniformly on the ``top_k`` largest logits, or along a fixed ``prior``."""

    top_k: int
    prior: torch.Tensor | None = None  # [V] in the compute dtype, sums to 1
    active: bool = True  # False when ε = 0 everywhere: plain CE, skip the selection

    def mode(self, v: int) -> str:
        """How ``T`` is represented: ``none`` (CE), ``prior``, ``all`` (k = V: every finite logit),
        ``sparse`` (its k column indices per row) or ``dense`` (the threshold τ, compared in backward)."""
        if not self.active:
            return "none"
        if self.prior is not None:
            return "prior"
        if self.top_k >= v:
            return "all"
        return "sparse" if self.top_k * SPARSE_K_FRACTION <= v else "dense"


class Selection(NamedTuple):
    """``T`` for the rows of a chunk (or of the whole batch, once the chunks are stored)."""

    k_eff: torch.Tensor  # |T| per row (compute dtype, ≥ 1): k, or fewer finite logits
    cols: torch.Tensor | None = None  # sparse: [rows, k] int64, entries j ≥ k_eff unused
    tau: torch.Tensor | None = None  # dense/all: T = {z ≥ τ} (plus the tie rule on ``tied`` rows)
    tied: torch.Tensor | None = None  # dense: bool per row, the (k+1)-th value equals τ


_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _strip_offsets(width: int, device: torch.device) -> torch.Tensor:
    """``[1, STRIPS, 1]`` column offsets of the strips (cached: one tensor per shape)."""
    key = (width, device)
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.arange(STRIPS, device=device)[None, :, None] * width
    return _OFFSETS[key]


def top_candidates(zc: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kk`` largest values of each row, descending, and their column indices.

    Rows are viewed as ``STRIPS`` strips of ``V // STRIPS`` interleaved columns (plus a short
    tail). If an entry among the row's ``kk`` largest sat in a column outside the ``kk`` columns
    with the largest maxima, those ``kk`` maxima would be ``kk`` other entries at least as large:
    so the ``kk`` largest values (and, without ties at the ``kk``-th, their positions) are among
    the ``STRIPS·kk`` candidates of those columns. Falls back to a full ``topk`` when the
    candidates would not be much fewer than the row.
    """
    rows, v = zc.shape
    width = v // STRIPS
    if kk * STRIPS * 4 > v:
        return torch.topk(zc, kk, dim=-1)
    head = zc[:, : STRIPS * width].unflatten(1, (STRIPS, width))  # [rows, B, width], a view
    best = head.amax(1).topk(kk, dim=-1, sorted=False).indices  # [rows, kk] columns
    best = best.sort(-1).values  # ascending addresses: the gather below streams instead of jumping
    cand_col = (best[:, None, :] + _strip_offsets(width, zc.device)).flatten(1)
    if STRIPS * width < v:  # the tail columns are always candidates
        tail = torch.arange(STRIPS * width, v, device=zc.device).expand(rows, -1)
        cand_col = torch.cat([cand_col, tail], 1)
    vals, pos = torch.topk(zc.gather(1, cand_col), kk, dim=-1)
    return vals, cand_col.gather(1, pos)


def exact_topk_mask(zc: torch.Tensor, tau: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean membership of T, exactly ``top_k`` per row: above ``τ``, then ties by lowest index."""
    above = zc > tau[:, None]
    equal = zc == tau[:, None]
    quota = top_k - above.sum(-1, keepdim=True)
    return above | (equal & (equal.cumsum(-1) <= quota))


CPU_STRIPS = cpu_kernel.STRIPS  # B of the CPU search (kernel and NumPy): 8 interleaved strips
CPU_CANDIDATE_CAP = 4  # a row with more than 4·(k+1) entries at or above its cut takes the exact path


def numpy_top_k_rows(zc: torch.Tensor, k: int, cap: int) -> tuple[np.ndarray, ...]:
    """The NumPy form of the compiled search (``cpu_top_k.c``, same contract): per row, ``T``'s
    columns ``[rows, k]``, ``mean_T (z − M)`` (float64), the row maximum ``M`` and whether the
    row needs the exact path. Used where the kernel cannot be built, and for float64 logits.

    The cut is the ``(k+1)``-th largest strip maximum (one quickselect over ``V/B`` maxima); one
    comparison pass and a scan for its hits give the candidates ``≥ cut``, padded with ``−inf``
    to a ``[rows, max count]`` array, and a second quickselect gives ``τ`` and the ``(k+1)``-th.
    """
    rows, v = zc.shape
    b = CPU_STRIPS
    width = v // b
    z = zc.detach().numpy()
    col_max = zc[:, : b * width].unflatten(1, (b, width)).amax(1).numpy()  # [rows, width]
    maxima = np.partition(col_max, width - k - 1, axis=-1)[:, width - k - 1 :]
    cut = maxima[:, 0].copy()  # the (k+1)-th largest strip maximum: ≤ the row's (k+1)-th value
    exact = ~np.isfinite(cut) | np.isnan(maxima).any(-1)  # NaN, or fewer than k+1 finite maxima
    cut[exact] = np.nan  # those rows get no candidates (nothing compares ≥ NaN)
    flags = chunk_buffer("flags", rows, v, torch.bool, zc.device).numpy()
    flat = np.flatnonzero(np.greater_equal(z, cut[:, None], out=flags))
    bounds = np.searchsorted(flat, np.arange(rows + 1) * v)
    counts = np.diff(bounds)
    exact |= (counts <= k) | (counts > cap) | np.isnan(z[:, b * width :]).any(-1)  # the tail's NaN
    cols = np.zeros((rows, k), dtype=np.int64)
    spread = np.zeros(rows)
    peak = np.zeros(rows, dtype=z.dtype)
    if exact.all():
        return cols, spread, peak, exact
    row_of = flat // v
    if exact.any():  # drop those rows' candidates
        keep = ~exact[row_of]
        flat, row_of = flat[keep], row_of[keep]
        counts = np.where(exact, 0, counts)
        bounds[1:] = np.cumsum(counts)
    width_c = int(counts.max())  # candidates per row, padded with −inf
    slot = row_of * width_c + (np.arange(flat.size) - bounds[row_of])
    flat_vals = np.full(rows * width_c, -np.inf, dtype=z.dtype)
    flat_vals[slot] = z.reshape(-1).take(flat)
    flat_where = np.zeros(rows * width_c, dtype=np.int64)
    flat_where[slot] = flat - row_of * v
    vals, where = flat_vals.reshape(rows, width_c), flat_where.reshape(rows, width_c)
    part = np.partition(vals, width_c - k - 1, axis=-1)
    tau = part[:, width_c - k :].min(axis=-1, keepdims=True)  # the k-th largest
    top = part[:, width_c - k :].max(axis=-1)
    exact |= (part[:, width_c - k - 1] == tau[:, 0]) | ~np.isfinite(top)
    inside = vals >= tau
    inside[exact] = np.arange(width_c) < k  # any k entries: those rows are redone exactly
    pick = np.flatnonzero(inside)
    cols = where.reshape(-1).take(pick).reshape(rows, k)
    with np.errstate(invalid="ignore"):  # −inf − (−inf) on rows marked exact
        spread = (vals.reshape(-1).take(pick).reshape(rows, k).astype(np.float64) - top[:, None]).mean(-1)
    return cols, spread, top, exact


class StripSearch(NamedTuple):
    """What the strip search finds per row of a chunk (NumPy arrays; see ``cpu_top_k.c``)."""

    cols: np.ndarray  # [rows, k] int64: T's columns, unordered
    spread: np.ndarray  # [rows] float64: mean_T (z − M)
    peak: np.ndarray  # [rows]: M, the row maximum
    exact: np.ndarray  # [rows] bool: the row needs the exact path (the other fields are unset)


def strip_search(zc: torch.Tensor, k: int) -> StripSearch | None:
    """``T`` of each row of a CPU chunk by the strip search, or None when ``k`` is too large for
    it to pay (``k + 1 > V/32``: then :func:`top_candidates`). Run it before ``log_softmax``
    writes its buffer: the chunk is then still in cache (measured at 768 × 8192: 2–3 ms less per
    loss call, forward and backward, of about 10 ms that the search costs).

    A cut at most the row's ``(k+1)``-th largest value, found cheaply, leaves about ``k``
    candidates. View the row as ``B`` interleaved strips of ``V/B`` columns: any ``t`` that at
    least ``k+1`` strip maxima reach is such a cut (those columns hold ``k+1`` entries ``≥ t``).
    The entries ``≥ t`` are then the candidates, and a selection over them gives ``τ`` (the
    ``k``-th largest) and the ``(k+1)``-th. With no tie between them, ``T`` is the candidates
    ``≥ τ``. The compiled kernel (``cpu_kernel``) does this row by row in cache; NumPy
    (:func:`numpy_top_k_rows`) in whole-chunk passes where it cannot be built. Rows with a tie at
    ``τ``, a NaN, a masked (``−inf``) or infinite entry among the top ``k+1``, or too many
    candidates are marked for the exact path.
    """
    if (k + 1) * CPU_STRIPS * 4 > zc.shape[1]:
        return None
    cap = CPU_CANDIDATE_CAP * (k + 1)
    z = zc.detach().numpy()
    found = None
    if z.dtype == np.float32 and z.flags.c_contiguous:
        found = cpu_kernel.top_k_rows(z, k, cap)
    return StripSearch(*(found if found is not None else numpy_top_k_rows(zc, k, cap)))


def strip_select(
    search: StripSearch, zc: torch.Tensor, y: torch.Tensor, k: int, logp: torch.Tensor, logp_y: torch.Tensor
) -> tuple[torch.Tensor, Selection]:
    """Smoothing term and ``T`` (its column indices) of a CPU chunk from :func:`strip_search`.

    ``mean_T log p = mean_T (z − M) + log p_M`` with ``log p_M = log p_y − (z_y − M)``, as in
    :func:`partition_top`: no read of ``logp``. The rows marked exact, and rows with a masked
    target, take the exact :func:`top_candidates` + :func:`finish_top` path.
    """
    rows, v = zc.shape
    z = zc.detach().numpy()
    z_y = z.reshape(-1).take(np.arange(rows) * v + y.numpy()).astype(np.float64)
    with np.errstate(invalid="ignore"):  # −inf − (−inf) on the rows sent to the exact path
        logp_peak = logp_y.numpy().astype(np.float64) - (z_y - search.peak.astype(np.float64))
    exact = search.exact | ~np.isfinite(logp_peak)
    smooth = torch.from_numpy(search.spread + logp_peak).to(zc.dtype)
    top_cols = torch.from_numpy(search.cols)
    k_eff = torch.full((rows,), float(k), dtype=zc.dtype)
    odd_rows = torch.from_numpy(np.flatnonzero(exact))
    if odd_rows.numel():  # the exact path on the few rows that need a rule
        sub = zc[odd_rows]
        vals_o, cols_o = top_candidates(sub, k + 1)
        raw = RawTop(vals_o, cols_o, logp[odd_rows].gather(1, cols_o))
        smooth_o, sel_o = finish_top(raw, k, "sparse", lambda idx: sub[idx])
        assert sel_o.cols is not None  # the sparse mode selects columns
        smooth[odd_rows], top_cols[odd_rows], k_eff[odd_rows] = smooth_o, sel_o.cols, sel_o.k_eff
    return smooth, Selection(k_eff, cols=top_cols)


def partition_top(
    zc: torch.Tensor, y: torch.Tensor, k: int, logp: torch.Tensor, logp_y: torch.Tensor
) -> tuple[torch.Tensor, Selection]:
    """Smoothing term ``mean_{j∈T} log p_j`` and ``T`` (as τ) of a CPU chunk, ``k < V``.

    One quickselect (NumPy's ``partition``, vectorised, several times faster than ``topk`` on
    CPU) of a copy of the rows puts the ``(k+1)``-th largest value at column ``V−k−1`` and the
    ``k`` largest, unordered, after it. That is all the loss needs: ``τ`` (the smallest finite of
    those ``k``), whether the ``(k+1)``-th ties with it, and the mean of ``log p`` over ``T``,
    ``mean_T (z − M) + log p_M`` (``M`` the row maximum; tied entries have equal values, so
    which of them is in ``T`` does not change the mean). ``logp`` holds ``log_softmax(zc)`` and
    ``logp_y`` its values at the targets ``y``: ``log p_M = log p_y − (z_y − M)``, as precise as
    ``log p_y`` itself, saves a pass over the row (rows with a masked target read ``logp``).
    """
    rows, v = zc.shape
    work = chunk_buffer("select", rows, v, zc.dtype, zc.device).copy_(zc)
    work.numpy().partition(v - k - 1, axis=-1)  # NumPy's quickselect, as in strip_select
    top, after = work[:, v - k :], work[:, v - k - 1]
    finite = top > -float("inf")
    k_fin = finite.sum(-1)
    k_eff = k_fin.clamp_min(1).to(zc.dtype)
    tau = torch.where(finite, top, float("inf")).amin(-1)
    tied = (after == tau) & (after > -float("inf"))
    wide = torch.float64  # z − M is exact here whatever the logits' offset
    peak = top.amax(-1, keepdim=True).to(wide)
    spread = torch.where(finite, top.to(wide) - peak, 0.0).sum(-1) / k_eff.to(wide)
    logp_peak = logp_y.to(wide) - (zc.gather(1, y[:, None]).to(wide) - peak).squeeze(1)
    odd = (~torch.isfinite(logp_peak)).nonzero().flatten()
    if odd.numel():
        logp_peak[odd] = logp[odd].amax(-1).to(wide)
    smooth = (spread + logp_peak).to(zc.dtype)
    return torch.where(k_fin > 0, smooth, 0.0), Selection(k_eff, tau=tau, tied=tied)


class RawTop(NamedTuple):
    """The ``k+1`` largest logits of each row, before the finite / tie rules are applied."""

    vals: torch.Tensor  # [rows, k+1] descending
    cols: torch.Tensor  # [rows, k+1] their columns
    logp: torch.Tensor  # [rows, k+1] log p there


def finish_top(
    raw: RawTop, k: int, mode: str, rows_of: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, Selection]:
    """Smoothing term ``mean_{j∈T} log p_j`` and ``T`` from the raw top ``k+1``: only finite logits
    count (``|T| = min(k, #finite)``), ties at τ go to the lowest index. ``rows_of(idx)`` returns
    those rows' logits (compute dtype), read only for rows that tie."""
    vals = raw.vals
    k_fin = (vals[:, :k] > -float("inf")).sum(-1)
    k_eff = k_fin.clamp_min(1).to(vals.dtype)
    used = torch.arange(k, device=vals.device) < k_fin[:, None]
    smooth = torch.where(used, raw.logp[:, :k], 0.0).sum(-1) / k_eff  # tied entries: equal log p
    tau = vals.gather(1, (k_fin - 1).clamp_min(0)[:, None]).squeeze(1)  # the smallest value in T
    tied = (vals[:, k - 1] == vals[:, k]) & (vals[:, k] > -float("inf"))
    if mode == "dense":
        return smooth, Selection(k_eff, tau=tau, tied=tied)
    cols = raw.cols[:, :k]
    tied_rows = tied.nonzero().flatten()
    if tied_rows.numel():  # the lowest-index rule, exactly, on the rows that tie at τ
        mask = exact_topk_mask(rows_of(tied_rows), tau[tied_rows], k)
        cols = cols.clone()
        cols[tied_rows] = mask.nonzero()[:, 1].view(-1, k)
    return smooth, Selection(k_eff, cols=cols)


def chunk_forward(
    zc: torch.Tensor, y: torch.Tensor, sm: Smoothing, logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | RawTop | None, Selection | None]:
    """``log p_y`` of one chunk ``zc`` (compute dtype) and what the smoothing needs: the smoothing
    term and ``T`` (``all``, ``prior`` modes and top-k on CPU; None and None for CE) or, for top-k
    modes on GPU, the raw top ``k+1`` for :func:`finish_top`. ``logp`` is a buffer like ``zc``
    for ``log_softmax(zc)``."""
    mode = sm.mode(zc.shape[1])
    on_cpu = zc.device.type == "cpu"
    search = strip_search(zc, sm.top_k) if on_cpu and mode == "sparse" else None
    torch.log_softmax(zc, -1, out=logp)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    if mode == "none":
        return logp_y, None, None
    if mode == "prior":
        assert sm.prior is not None  # the prior mode has one
        used = sm.prior > 0  # 0·log p is 0 even where log p = −inf
        return logp_y, torch.where(used, logp, 0.0) @ sm.prior, None
    if mode == "all":  # T = every finite logit; τ = the smallest of them
        finite = zc > -float("inf")
        k_eff = finite.sum(-1).clamp_min(1).to(zc.dtype)
        tau = torch.where(finite, zc, float("inf")).amin(-1)
        return logp_y, torch.where(finite, logp, 0.0).sum(-1) / k_eff, Selection(k_eff, tau=tau)
    if on_cpu and mode == "dense":
        return logp_y, *partition_top(zc, y, sm.top_k, logp, logp_y)
    if search is not None:
        return logp_y, *strip_select(search, zc, y, sm.top_k, logp, logp_y)
    vals, cols = top_candidates(zc, sm.top_k + 1)
    return logp_y, RawTop(vals, cols, logp.gather(1, cols)), None


def chunk_stats(
    zc: torch.Tensor, y: torch.Tensor, sm: Smoothing, logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Selection | None]:
    """``(log p_y, smoothing term, T)`` of one chunk: :func:`chunk_forward` and :func:`finish_top`."""
    logp_y, extra, sel = chunk_forward(zc, y, sm, logp)
    if isinstance(extra, RawTop):
        smooth, sel = finish_top(extra, sm.top_k, sm.mode(zc.shape[1]), lambda idx: zc[idx])
        return logp_y, smooth, sel
    return logp_y, torch.zeros_like(logp_y) if extra is None else extra, sel


def dense_mask(src: torch.Tensor, sel: Selection, top_k: int, out: torch.Tensor | None) -> torch.Tensor:
    """Membership of T as a 0/1 tensor like ``src`` (dense and all modes)."""
    assert sel.tau is not None  # dense and all modes select by a threshold
    mask = torch.ge(src, sel.tau[:, None], out=out)
    if sel.tied is not None:
        rows = sel.tied.nonzero().flatten()
        if rows.numel():
            mask[rows] = exact_topk_mask(src[rows], sel.tau[rows], top_k).to(mask.dtype)
    return mask


def grad_weights(
    scale: torch.Tensor, eps: torch.Tensor, sm: Smoothing, sel: Selection | None, v: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row weights of the soft target in the gradient: ``(1−ε)·scale`` at the target, and the
    ε share: ``[rows, k]`` per entry of T (sparse), per row ``ε·scale/|T|`` (dense, all) or
    ``ε·scale`` (prior), None for CE."""
    mode = sm.mode(v)
    on_target = scale * (1.0 - eps)
    if mode == "none":
        return on_target, None
    if mode == "prior":
        return on_target, scale * eps
    assert sel is not None  # the top-k modes select T
    share = scale * eps / sel.k_eff
    if mode == "sparse":
        assert sel.cols is not None
        used = torch.arange(sel.cols.shape[1], device=share.device) < sel.k_eff[:, None]
        return on_target, torch.where(used, -share[:, None], 0.0)
    return on_target, share


def chunk_grad(
    src: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor | None],
    sm: Smoothing,
    sel: Selection | None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = (softmax(src) − q)·scale`` for one chunk; ``out`` may be ``src`` itself.

    Per-row arguments are the chunk's rows; ``weights`` come from :func:`grad_weights`;
    ``scratch`` is a float buffer like ``src`` (dense modes). One fused softmax, one scaling
    pass, and (sparse) a scatter onto the ``k`` entries of T and the target.
    """
    rows, v = src.shape
    mode = sm.mode(v)
    on_target, share = weights
    mask = None
    if mode in ("dense", "all"):  # read before ``out`` (maybe ``src``) is overwritten
        assert sel is not None
        buf = scratch[:rows] if scratch is not None and scratch.dtype == src.dtype else None
        mask = dense_mask(src, sel, sm.top_k, buf)
    torch.softmax(src, -1, out=out)
    out.mul_(scale[:, None])
    if mode == "sparse":
        assert sel is not None and sel.cols is not None and share is not None
        out.scatter_add_(1, sel.cols, share)
    elif mode in ("dense", "all"):
        assert mask is not None and share is not None
        out.addcmul_(mask, share[:, None], value=-1.0)
    elif mode == "prior":
        assert share is not None and sm.prior is not None
        out.sub_(share[:, None] * sm.prior)
    out.scatter_add_(1, y[:, None], -on_target[:, None])
    return out


def dense_grad(
    logits: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
    sm: Smoothing,
    sel,
    cap: float | None = None,
) -> torch.Tensor:
    """``(softmax − q)·scale`` with differentiable ops on the whole batch (for double backward),
    through the soft-cap when ``cap`` is set."""
    z = apply_softcap(logits.to(compute_dtype(logits.dtype)), cap)
    v = z.shape[1]
    mode = sm.mode(v)
    q = torch.zeros_like(z).scatter_(1, y[:, None], (1.0 - eps)[:, None])
    if mode == "sparse":
        used = torch.arange(sel.cols.shape[1], device=z.device) < sel.k_eff[:, None]
        q.scatter_add_(1, sel.cols, torch.where(used, (eps / sel.k_eff)[:, None], 0.0))
    elif mode in ("dense", "all"):
        q = q + dense_mask(z.detach(), sel, sm.top_k, None).to(z.dtype) * (eps / sel.k_eff)[:, None]
    elif mode == "prior":
        assert sm.prior is not None
        q = q + eps[:, None] * sm.prior
    grad = (torch.softmax(z, -1) - q) * scale[:, None]
    if cap is not None:  # d(cap·tanh(z/cap))/dz = 1 − (s/cap)², 0 at masked entries (no inf in the graph)
        finite = z > -float("inf")
        grad = grad * torch.where(finite, 1.0 - (torch.where(finite, z, 0.0) / cap).square(), 0.0)
    return grad.to(logits.dtype)


def row_scale(
    grad_out: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype
) -> torch.Tensor:
    """The factor each row's gradient gets from the upstream gradient and the reduction; 0 at ignored rows."""
    keep = valid.to(dtype)
    if reduction == "mean":
        return grad_out.to(dtype) * keep / valid.sum().clamp_min(1).to(dtype)
    return grad_out.to(dtype) * keep  # "sum": scalar; "none": one per row


def loss_rows(
    logp_y: torch.Tensor, smooth: torch.Tensor, eps: torch.Tensor | float, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``−(1−ε)·log p_y − ε·Σ r log p`` and plain CE ``−log p_y``, exactly 0 at ignored rows."""
    loss = -(1.0 - eps) * logp_y - eps * smooth
    return torch.where(valid, loss, 0.0), torch.where(valid, -logp_y, 0.0)


class StoredSelection:
    """Room for every row's ``T`` (filled chunk by chunk in forward, read back in backward)."""

    def __init__(self, n: int, sm: Smoothing, v: int, dtype: torch.dtype, device: torch.device):
        self.mode = sm.mode(v)
        self.k_eff = torch.ones(n, dtype=dtype, device=device)
        sparse, dense = self.mode == "sparse", self.mode in ("dense", "all")
        self.cols = torch.zeros(n, sm.top_k, dtype=torch.int64, device=device) if sparse else None
        self.tau = torch.zeros(n, dtype=dtype, device=device) if dense else None
        self.tied = torch.zeros(n, dtype=torch.bool, device=device) if self.mode == "dense" else None

    def put(self, s: int, e: int, sel: Selection | None) -> None:
        if sel is None:
            return
        self.k_eff[s:e] = sel.k_eff
        for name in ("cols", "tau", "tied"):
            if getattr(self, name) is not None:
                getattr(self, name)[s:e] = getattr(sel, name)

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.k_eff, self.cols, self.tau, self.tied]


def _part(t: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    return None if t is None else t[s:e]


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
        cap: float | None = None,
    ):
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        logp_y = torch.empty(n, dtype=cd, device=logits.device)
        smooth = torch.zeros_like(logp_y)
        mode = sm.mode(v)
        stored = StoredSelection(n, sm, v, cd, logits.device)
        raw = None
        if mode == "sparse" and logits.device.type != "cpu":  # the raw top k+1 of every row, finished once
            kk = sm.top_k + 1
            raw = RawTop(
                torch.empty(n, kk, dtype=cd, device=logits.device),
                torch.empty(n, kk, dtype=torch.int64, device=logits.device),
                torch.empty(n, kk, dtype=cd, device=logits.device),
            )

        def chunk(s: int, e: int) -> None:
            zc = logits[s:e]
            if zc.dtype != cd or cap is not None:
                zc = chunk_buffer("copy", e - s, v, cd, zc.device).copy_(zc)
                if cap is not None:
                    softcap_(zc, cap)
            logp_buf = chunk_buffer("work", e - s, v, cd, zc.device)
            logp_y[s:e], extra, sel = chunk_forward(zc, y[s:e], sm, logp_buf)
            if raw is not None:
                assert isinstance(extra, RawTop)  # the sparse mode on a GPU: finished once, below
                for whole, part in zip(raw, extra):
                    whole[s:e] = part
                return
            if isinstance(extra, RawTop):
                extra, sel = finish_top(extra, sm.top_k, mode, lambda idx: zc[idx])
            if extra is not None:
                smooth[s:e] = extra
            stored.put(s, e, sel)

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
            if raw is not None:
                smooth, sel = finish_top(
                    raw, sm.top_k, mode, lambda idx: apply_softcap(logits[idx].to(cd), cap)
                )
                stored.put(0, n, sel)
            per_loss, per_nll = loss_rows(logp_y, smooth, eps, valid)
            loss = reduce_rows(per_loss, valid, reduction)
            nll = reduce_rows(per_nll, valid, reduction)
        ctx.save_for_backward(logits, y, valid, eps, *stored.tensors())
        ctx.sm, ctx.reduction, ctx.inplace, ctx.cap = sm, reduction, inplace_backward, cap
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor | None):
        logits, y, valid, eps, k_eff, cols, tau, tied = ctx.saved_tensors
        n, v = logits.shape
        cd = compute_dtype(logits.dtype)
        sel = Selection(k_eff, cols, tau, tied)
        scale = row_scale(grad_loss, valid, ctx.reduction, cd).expand(n)
        nones = (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, so double backward is exact
            return dense_grad(logits, y, scale, eps, ctx.sm, sel, ctx.cap), *nones
        weights = grad_weights(scale, eps, ctx.sm, sel, v)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        direct = logits.dtype == cd  # compute straight into the output rows
        cap = ctx.cap

        def chunk(s: int, e: int) -> None:
            rows = e - s
            if direct and cap is None:
                src, out = logits[s:e], grad[s:e]
            else:  # a private float32 copy (capped), overwritten in place unless the cap needs it after
                src = out = chunk_buffer("copy", rows, v, cd, logits.device).copy_(logits[s:e])
                if cap is not None:
                    softcap_(src, cap)
                    out = grad[s:e] if direct else chunk_buffer("grad", rows, v, cd, logits.device)
            part = Selection(
                sel.k_eff[s:e], _part(sel.cols, s, e), _part(sel.tau, s, e), _part(sel.tied, s, e)
            )
            scratch = chunk_buffer("work", rows, v, cd, logits.device)
            part_w = (weights[0][s:e], _part(weights[1], s, e))
            chunk_grad(src, out, y[s:e], scale[s:e], part_w, ctx.sm, part, scratch)
            if cap is not None:
                softcap_backward_(out, src, cap)
            if out.data_ptr() != grad[s:e].data_ptr():
                grad[s:e].copy_(out)

        with torch.no_grad():
            run_chunks(n, chunk_rows(n, v, device=logits.device), chunk, logits.device)
            _zero_ignored_nonfinite_rows(grad, valid)
        return grad, *nones


def _zero_ignored_nonfinite_rows(grad: torch.Tensor, valid: torch.Tensor) -> None:
    """An ignored row of all ``−inf`` gives ``softmax = NaN`` (times a zero scale): its gradient is 0."""
    if grad.device.type != "cpu" or bool(valid.all()):
        return
    rows = (~valid).nonzero().flatten()
    bad = rows[~torch.isfinite(grad[rows]).all(-1)]
    if bad.numel():
        grad[bad] = 0


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
    softcap: float | None = None,
):
    n = logits.shape[0]
    eps = eps_rows(epsilon, n, compute_dtype(logits.dtype), logits.device)
    sm = Smoothing(top_k=top_k, active=is_active(epsilon))
    loss, nll = ChunkedSoftTargetLoss.apply(
        logits, target, eps, sm, ignore_index, reduction, inplace_backward, softcap
    )
    return (loss, nll) if return_nll else loss


register_impl("chunked", chunked_dpls_loss, priority=10, softcap=True)
