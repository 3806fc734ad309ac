"""Triton kernels for the fused DPLS loss (imported lazily by ``triton_impl``).

One program walks whole rows (a persistent grid strides over them). Selection works on *keys*: the
int32 whose signed order is the order of the float values (``_signed_key``). Per row:

1. **stats pass** — online max ``m`` and ``s = Σ exp(z − m)``, plus a running maximum per lane of
   the block (``BLOCK_V`` lanes, each the max of a strided subset of the row).
2. **lower bound** — the k-th largest lane maximum ``L``: at least k entries of the row are ≥ ``L``,
   so the k-th largest entry ``t`` is ≥ ``L``. Found by bisection on the key range, in registers.
3. **compaction pass** — the entries ≥ ``L`` (typically between k and 2k of them) are copied to a
   per-program scratch row of ``CAP`` entries.
4. **exact threshold** — bisection on the key range ``[L, key(m)]``, counting in the scratch row
   (cache-resident), gives ``t``, the count strictly above it and the number of ties at it. If more
   than ``CAP`` entries were ≥ ``L`` (heavy ties, or k larger than the block), the bisection counts
   over the row itself instead: slower, same result.
5. **final pass** — membership of T (above ``t``, plus the first ``k_rem`` ties by lowest index, so
   exactly k entries), the top-k sum for the loss, and the gradient
   ``softmax − (1−ε)·onehot(y) − (ε/k)·1[T]``, already scaled, in the logits' dtype (possibly into
   the logits' own storage: each element is read before it is overwritten).

A row is read three times (the second and third reads usually hit L2) and written once. Only
elementwise ops, reductions and a scan are used (no ``tl.histogram``, whose cost differs a lot
between Triton versions), so the kernel runs the same under Triton's CPU interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Logical names for the compile-time switches of the row kernel.
TOPK_NONE = 0  # ε = 0 everywhere: plain cross-entropy, no selection at all
TOPK_SELECT = 1  # the general case
TOPK_ALL = 2  # k ≥ V: label smoothing, every entry is in T

SCALE_MEAN = 0  # gradient scaled by 1 / n_valid (n_valid read from device memory: no host sync)
SCALE_ROW = 1  # gradient row i scaled by scale[i] (reduction "none" recomputed in backward)
SCALE_ONE = 2  # unscaled


@triton.jit
def _signed_key(x, KEY_BITS: tl.constexpr):
    """int32 whose signed order is the float order of ``x``; −0 is mapped to +0, so they tie."""
    if KEY_BITS == 16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        b = tl.where(b == -32768, 0, b)
        key = b ^ ((b >> 15) & 0x7FFF)
    else:
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(b == -2147483648, 0, b)
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
    return key


@triton.jit
def _bisect_registers(keys, top_k, lo, hi):
    """Largest ``t`` in ``[lo, hi)`` with at least ``top_k`` of ``keys`` ≥ t (given: ``lo`` qualifies)."""
    while hi - lo > 1:
        mid = (lo + (hi - lo) // 2).to(tl.int32)
        count = tl.sum((keys >= mid).to(tl.int32), 0)
        if count >= top_k:
            lo = mid.to(tl.int64)
        else:
            hi = mid.to(tl.int64)
    return lo.to(tl.int32)


@triton.jit
def _count_at_least(src, n, t, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """How many of the ``n`` entries at ``src`` have a key ≥ ``t``."""
    offs = tl.arange(0, BLOCK_V)
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK_V):
        idx = start + offs
        x = tl.load(src + idx, mask=idx < n, other=0.0)
        count += tl.sum(((_signed_key(x, KEY_BITS) >= t) & (idx < n)).to(tl.int32), 0)
    return count


@triton.jit
def _bisect_memory(src, n, top_k, lo, hi, count_lo, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The k-th largest key of ``n`` entries at ``src``, within ``[lo, hi)``.

    Needs ``count_lo`` = #(key ≥ lo) ≥ top_k and #(key ≥ hi) = 0. Returns ``(t, above, ties)``:
    the threshold, how many entries are > t and how many are = t.
    """
    count_hi = tl.zeros([], dtype=tl.int32)
    while hi - lo > 1:
        mid = (lo + (hi - lo) // 2).to(tl.int32)
        count = _count_at_least(src, n, mid, KEY_BITS, BLOCK_V)
        if count >= top_k:
            lo = mid.to(tl.int64)
            count_lo = count
        else:
            hi = mid.to(tl.int64)
            count_hi = count
    return lo.to(tl.int32), count_hi, count_lo - count_hi


@triton.jit
def _compact(row, V, low, dst, CAP: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Copy the entries with key ≥ ``low`` to ``dst`` (the first ``CAP`` of them); return their count."""
    offs = tl.arange(0, BLOCK_V)
    base = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        valid = idx < V
        x = tl.load(row + idx, mask=valid, other=0.0)
        live = valid & (_signed_key(x, KEY_BITS) >= low)
        found = tl.sum(live.to(tl.int32), 0)
        if found > 0:
            pos = base + tl.cumsum(live.to(tl.int32), 0) - 1
            tl.store(dst + pos, x, mask=live & (pos < CAP))
            base += found
    return base


@triton.jit
def _select_threshold(
    row, V, lane_max, m, top_k, scratch, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr, CAP: tl.constexpr
):
    """The k-th largest key ``t`` of the row, how many entries exceed it and how many equal it."""
    if KEY_BITS == 16:
        lane_keys = _signed_key(lane_max.to(row.dtype.element_ty), KEY_BITS)
        top = _signed_key(m.to(row.dtype.element_ty), KEY_BITS)
    else:
        lane_keys = _signed_key(lane_max, KEY_BITS)
        top = _signed_key(m, KEY_BITS)
    hi = top.to(tl.int64) + 1  # no entry is above the row's max
    if top_k <= BLOCK_V:  # enough lanes to certify a lower bound
        low = _bisect_registers(lane_keys, top_k, tl.min(lane_keys, 0).to(tl.int64), hi)
    else:
        low = tl.full([], -2147483648, tl.int32)
    tl.debug_barrier()  # the previous row's readers of the scratch row are done
    n_cand = _compact(row, V, low, scratch, CAP, KEY_BITS, BLOCK_V)
    tl.debug_barrier()  # the scratch row is visible to every thread of the program
    if n_cand <= CAP:
        t, above, ties = _bisect_memory(scratch, n_cand, top_k, low.to(tl.int64), hi, n_cand, KEY_BITS, BLOCK_V)
    else:  # too many candidates to hold: count over the row itself
        t, above, ties = _bisect_memory(row, V, top_k, low.to(tl.int64), hi, n_cand, KEY_BITS, BLOCK_V)
    return t, above, ties


@triton.jit
def _dpls_rows_kernel(
    x_ptr,
    x_stride,
    g_ptr,
    g_stride,
    target_ptr,
    eps_ptr,
    eps_value,
    scale_ptr,
    loss_ptr,
    nll_ptr,
    scratch_ptr,
    N,
    V,
    top_k,
    ignore_index,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP: tl.constexpr,
    TOPK_MODE: tl.constexpr,
    EPS_PER_ROW: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_MODE: tl.constexpr,
):
    """Loss, plain NLL and (optionally) the scaled gradient of each row; see the module docstring."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_V)
    scratch = scratch_ptr + tl.cast(pid, tl.int64) * CAP
    if SCALE_MODE == 0:
        mean_scale = 1.0 / tl.maximum(tl.load(scale_ptr), 1.0)
    else:
        mean_scale = 1.0
    for r in range(pid, N, nprog):
        r64 = tl.cast(r, tl.int64)  # row offsets overflow int32 for large N·V
        row = x_ptr + r64 * x_stride
        grow = g_ptr + r64 * g_stride
        y = tl.load(target_ptr + r)
        if y == ignore_index:
            tl.store(loss_ptr + r, 0.0)
            tl.store(nll_ptr + r, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(g_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    tl.store(grow + start + offs, zero, mask=start + offs < V)
        else:
            col = y.to(tl.int32)
            if EPS_PER_ROW:
                eps = tl.load(eps_ptr + r)
            else:
                eps = eps_value
            if SCALE_MODE == 1:
                grad_scale = tl.load(scale_ptr + r).to(tl.float32)
            else:
                grad_scale = mean_scale
            z_y = tl.load(row + col).to(tl.float32)

            # 1. stats pass: online max / sum-exp, and the max of each lane
            m = -float("inf")
            s = 0.0
            lane_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                xf = tl.load(row + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(xf, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xf - m_new), 0)
                m = m_new
                if TOPK_MODE == 1:
                    lane_max = tl.maximum(lane_max, xf)

            # 2–4. the threshold of T
            t = tl.zeros([], dtype=tl.int32)
            k_rem = tl.zeros([], dtype=tl.int32)
            ties = tl.zeros([], dtype=tl.int32)
            if TOPK_MODE == 1:
                t, above, ties = _select_threshold(row, V, lane_max, m, top_k, scratch, KEY_BITS, BLOCK_V, CAP)
                k_rem = top_k - above
            need_rank = ties > k_rem  # only then does the index order of ties matter

            # 5. final pass: membership of T, top-k sum, gradient
            inv_s = 1.0 / s
            c_target = (1.0 - eps) * grad_scale
            c_topk = eps / top_k * grad_scale
            top_sum = 0.0  # Σ_{j∈T} (m − z_j), non-negative terms
            taken = tl.zeros([], dtype=tl.int32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                valid = idx < V
                x = tl.load(row + idx, mask=valid, other=0.0)
                xf = x.to(tl.float32)
                if TOPK_MODE == 1:
                    key = _signed_key(x, KEY_BITS)
                    tie = valid & (key == t)
                    if need_rank:
                        rank = taken + tl.cumsum(tie.to(tl.int32), 0)
                        take = tie & (rank <= k_rem)
                        taken += tl.sum(tie.to(tl.int32), 0)
                    else:
                        take = tie
                    in_t = (valid & (key > t)) | take
                else:
                    in_t = valid
                if TOPK_MODE != 0:
                    top_sum += tl.sum(tl.where(in_t, m - xf, 0.0), 0)
                if WRITE_GRAD:
                    g = tl.exp(xf - m) * (inv_s * grad_scale)
                    g -= tl.where(idx == col, c_target, 0.0)
                    if TOPK_MODE != 0:
                        g -= tl.where(in_t, c_topk, 0.0)
                    tl.store(grow + idx, g.to(g_ptr.dtype.element_ty), mask=valid)

            nll = tl.log(s) + (m - z_y)
            if TOPK_MODE == 0:
                loss = nll
            else:
                loss = tl.log(s) + (1.0 - eps) * (m - z_y) + eps / top_k * top_sum
            tl.store(loss_ptr + r, loss)
            tl.store(nll_ptr + r, nll)
