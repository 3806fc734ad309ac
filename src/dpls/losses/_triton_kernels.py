"""Triton kernels for the fused DPLS loss (imported lazily by ``triton_impl``).

One program walks whole rows (a persistent grid strides over them). Selection works on *keys*: the
int32 whose signed order is the order of the float values (``_signed_key``). The row is seen as
``BLOCK_V`` lanes, lane ``j`` holding entries ``j, j + BLOCK_V, j + 2·BLOCK_V, …``. Per row:

1. **stats pass** — online max ``m`` and ``s = Σ exp(z − m)``, and for each lane its ``TOP_R``
   largest values (a small insertion network in registers: ``2·TOP_R`` min/max per entry).
2. **threshold from the lanes' top values** — bisection on the key range gives ``t``, the k-th
   largest key among those ``TOP_R · BLOCK_V`` values, with the counts above and at it. If every
   lane that had to drop values dropped only values below ``t`` (its ``TOP_R``-th value is < t),
   every entry ≥ t is among them, so ``t`` and both counts are exact for the whole row. This holds
   unless some lane holds ``TOP_R`` or more of the top-k (the host picks ``TOP_R`` so that happens in
   well under 1% of rows of random order).
3. **fallback** (when the certificate fails) — ``t`` is still a lower bound of the true threshold:
   the entries ≥ it are compacted into a per-program scratch row of ``CAP`` entries and the exact
   threshold is found by bisection there (or, past ``CAP``, by counting over the row itself).
4. **final pass** — membership of T (above ``t``, plus the first ``k_rem`` ties by lowest index, so
   exactly k entries), the top-k sum for the loss, and the gradient
   ``softmax − (1−ε)·onehot(y) − (ε/k)·1[T]``, already scaled, in the logits' dtype (possibly into
   the logits' own storage: each element is read before it is overwritten).

A ``−inf`` logit is masked: outside the vocabulary, never smoothed onto. So ``k`` above stands for
``k_eff = min(k, finite entries of the row)`` (T is that many largest finite logits, each with
``ε / k_eff``; for ``k ≥ V``, every finite entry), the entropy ε-mode normalises by the log of the
finite count, and no step forms ``−inf − (−inf)`` or ``0·(−inf)``: a padded vocabulary changes nothing.

**Soft-capping** (``SOFTCAP``): every read of a row caps it first, ``cap·tanh(z/cap)`` in float32
(``−inf`` stays masked), and everything above runs on the capped values: the selection then uses
32-bit keys of the capped floats (a half-precision row's capped values are not half-precision
values) and a float32 scratch row, and the gradient is multiplied by ``1 − (s/cap)²``. So the
kernel computes exactly the loss of the capped logits, ties among capped values included.

So a row is usually read twice and written once, like a fused cross-entropy. Steps 1–3 and step 4
run as two launches of one kernel (``PHASE`` 1 and 2, a few numbers per row between them), so the
final pass runs with the final pass's registers, not the selection's; ties at ``t`` are then taken
up to the index ``cut`` that phase 1 finds (reading the row only as far as the ``k_rem``-th tie). Only elementwise ops,
reductions and scans are used (no ``tl.histogram``, whose cost differs a lot between Triton
versions), so the kernels also run under Triton's CPU interpreter.
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
def _tanh(u):
    """``tanh`` from one ``exp`` (Triton's interpreter has no ``tanh``): odd, monotone, within a few
    float32 ulps of 1 in absolute terms (``1 − e`` rounds), so ``cap·tanh`` is within ``cap·2⁻²²``."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _cap(x, softcap, SOFTCAP: tl.constexpr):
    """``softcap·tanh(x / softcap)`` of float32 ``x`` when ``SOFTCAP``, ``−inf`` kept (masked); else ``x``."""
    if SOFTCAP:
        x = tl.where(x == -float("inf"), x, softcap * _tanh(x / softcap))
    return x


@triton.jit
def _float_key(value, dtype, KEY_BITS: tl.constexpr):
    """Key of a float32 ``value`` that holds a ``dtype`` value (16-bit keys) or any float32 (32-bit keys)."""
    if KEY_BITS == 16:
        key = _signed_key(value.to(dtype), KEY_BITS)
    else:
        key = _signed_key(value, KEY_BITS)
    return key


@triton.jit
def _key_value(key, dtype, KEY_BITS: tl.constexpr):
    """The float32 value whose key is ``key`` (the key map is its own inverse on the bits)."""
    if KEY_BITS == 16:
        b = key ^ ((key >> 15) & 0x7FFF)
        value = b.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    else:
        value = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return value


@triton.jit
def _insert(k0, k1, k2, k3, k4, k5, k6, k7, v, TOP_R: tl.constexpr):
    """Insert ``v`` into each lane's descending list ``k0 ≥ k1 ≥ …`` of its ``TOP_R`` largest values."""
    h = tl.maximum(k0, v)
    v = tl.minimum(k0, v)
    k0 = h
    if TOP_R > 1:
        h = tl.maximum(k1, v)
        v = tl.minimum(k1, v)
        k1 = h
    if TOP_R > 2:
        h = tl.maximum(k2, v)
        v = tl.minimum(k2, v)
        k2 = h
    if TOP_R > 3:
        h = tl.maximum(k3, v)
        v = tl.minimum(k3, v)
        k3 = h
    if TOP_R > 4:
        h = tl.maximum(k4, v)
        v = tl.minimum(k4, v)
        k4 = h
    if TOP_R > 5:
        h = tl.maximum(k5, v)
        v = tl.minimum(k5, v)
        k5 = h
    if TOP_R > 6:
        h = tl.maximum(k6, v)
        v = tl.minimum(k6, v)
        k6 = h
    if TOP_R > 7:
        k7 = tl.maximum(k7, v)
    return k0, k1, k2, k3, k4, k5, k6, k7


@triton.jit
def _lane_key(value, held, dtype, KEY_BITS: tl.constexpr):
    """Key of a lane's kept value; -2^31 (below every real key) where the lane holds no such value."""
    return tl.where(held, _float_key(value, dtype, KEY_BITS), -2147483648)


@triton.jit
def _count_kept(q0, q1, q2, q3, q4, q5, q6, q7, t, TOP_R: tl.constexpr):
    """How many kept keys are ≥ ``t``."""
    c = (q0 >= t).to(tl.int32)
    if TOP_R > 1:
        c += (q1 >= t).to(tl.int32)
    if TOP_R > 2:
        c += (q2 >= t).to(tl.int32)
    if TOP_R > 3:
        c += (q3 >= t).to(tl.int32)
    if TOP_R > 4:
        c += (q4 >= t).to(tl.int32)
    if TOP_R > 5:
        c += (q5 >= t).to(tl.int32)
    if TOP_R > 6:
        c += (q6 >= t).to(tl.int32)
    if TOP_R > 7:
        c += (q7 >= t).to(tl.int32)
    return tl.sum(c, 0)


@triton.jit
def _lowest_held(q0, q1, q2, q3, q4, q5, q6, q7, TOP_R: tl.constexpr):
    """Per lane, the smallest key it holds (2^31 − 1 where it holds none); reduced once by the caller."""
    low = tl.where(q0 > -2147483648, q0, 2147483647)
    if TOP_R > 1:
        low = tl.minimum(low, tl.where(q1 > -2147483648, q1, 2147483647))
    if TOP_R > 2:
        low = tl.minimum(low, tl.where(q2 > -2147483648, q2, 2147483647))
    if TOP_R > 3:
        low = tl.minimum(low, tl.where(q3 > -2147483648, q3, 2147483647))
    if TOP_R > 4:
        low = tl.minimum(low, tl.where(q4 > -2147483648, q4, 2147483647))
    if TOP_R > 5:
        low = tl.minimum(low, tl.where(q5 > -2147483648, q5, 2147483647))
    if TOP_R > 6:
        low = tl.minimum(low, tl.where(q6 > -2147483648, q6, 2147483647))
    if TOP_R > 7:
        low = tl.minimum(low, tl.where(q7 > -2147483648, q7, 2147483647))
    return low


@triton.jit
def _count_at_least(
    src, n, t, softcap, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr, CAP_LOAD: tl.constexpr
):
    """How many of the ``n`` entries at ``src`` have a key ≥ ``t`` (capped first with ``CAP_LOAD``)."""
    offs = tl.arange(0, BLOCK_V)
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK_V):
        idx = start + offs
        x = tl.load(src + idx, mask=idx < n, other=0.0)
        if CAP_LOAD:
            x = _cap(x.to(tl.float32), softcap, CAP_LOAD)
        count += tl.sum(((_signed_key(x, KEY_BITS) >= t) & (idx < n)).to(tl.int32), 0)
    return count


@triton.jit
def _bisect_memory(
    src,
    n,
    top_k,
    lo,
    hi,
    count_lo,
    softcap,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP_LOAD: tl.constexpr,
):
    """The k-th largest key of ``n`` entries at ``src``, within ``[lo, hi)``.

    Needs ``count_lo`` = #(key ≥ lo) ≥ top_k and #(key ≥ hi) = 0. Returns ``(t, above, ties)``:
    the threshold, how many entries are > t and how many are = t.
    """
    count_hi = tl.zeros([], dtype=tl.int32)
    while hi - lo > 1:
        mid = (lo + (hi - lo) // 2).to(tl.int32)
        count = _count_at_least(src, n, mid, softcap, KEY_BITS, BLOCK_V, CAP_LOAD)
        if count >= top_k:
            lo = mid.to(tl.int64)
            count_lo = count
        else:
            hi = mid.to(tl.int64)
            count_hi = count
    return lo.to(tl.int32), count_hi, count_lo - count_hi


@triton.jit
def _compact(
    row,
    V,
    low,
    dst,
    softcap,
    CAP: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Copy the entries with key ≥ ``low`` to ``dst`` (the first ``CAP`` of them); return their count.
    With ``SOFTCAP`` the capped values are compared and copied (``dst`` is float32)."""
    offs = tl.arange(0, BLOCK_V)
    base = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        valid = idx < V
        x = tl.load(row + idx, mask=valid, other=0.0)
        if SOFTCAP:
            x = _cap(x.to(tl.float32), softcap, SOFTCAP)
        live = valid & (_signed_key(x, KEY_BITS) >= low)
        found = tl.sum(live.to(tl.int32), 0)
        if found > 0:
            pos = base + tl.cumsum(live.to(tl.int32), 0) - 1
            tl.store(dst + pos, x, mask=live & (pos < CAP))
            base += found
    return base


@triton.jit
def _select_threshold(
    row,
    V,
    k0,
    k1,
    k2,
    k3,
    k4,
    k5,
    k6,
    k7,
    m,
    top_k,
    scratch,
    softcap,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP: tl.constexpr,
    TOP_R: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """The k-th largest key ``t`` of the row, how many entries exceed it and how many equal it
    (of the capped row with ``SOFTCAP``: ``m`` and the lanes' values are capped values then)."""
    dtype = row.dtype.element_ty
    lane = tl.arange(0, BLOCK_V)
    per_lane = tl.where(lane < V, (V - 1 - lane) // BLOCK_V + 1, 0)  # entries each lane saw
    q0 = _lane_key(k0, per_lane > 0, dtype, KEY_BITS)
    q1 = _lane_key(k1, per_lane > 1, dtype, KEY_BITS)
    q2 = _lane_key(k2, per_lane > 2, dtype, KEY_BITS)
    q3 = _lane_key(k3, per_lane > 3, dtype, KEY_BITS)
    q4 = _lane_key(k4, per_lane > 4, dtype, KEY_BITS)
    q5 = _lane_key(k5, per_lane > 5, dtype, KEY_BITS)
    q6 = _lane_key(k6, per_lane > 6, dtype, KEY_BITS)
    q7 = _lane_key(k7, per_lane > 7, dtype, KEY_BITS)
    top = _float_key(m, dtype, KEY_BITS)
    # bisection on [lo, hi): #kept ≥ lo is ≥ k (or lo = -2^31, trivially a lower bound), #kept ≥ hi = 0
    lo = tl.full([], -2147483648, tl.int64)
    hi = top.to(tl.int64) + 1
    count_lo = _count_kept(q0, q1, q2, q3, q4, q5, q6, q7, -2147483647, TOP_R)  # real kept values
    count_hi = tl.zeros([], dtype=tl.int32)
    if count_lo >= top_k:
        lowest = tl.min(_lowest_held(q0, q1, q2, q3, q4, q5, q6, q7, TOP_R), 0)  # one reduction
        lo = lowest.to(tl.int64)
        while hi - lo > 1:
            mid = (lo + (hi - lo) // 2).to(tl.int32)
            count = _count_kept(q0, q1, q2, q3, q4, q5, q6, q7, mid, TOP_R)
            if count >= top_k:
                lo = mid.to(tl.int64)
                count_lo = count
            else:
                hi = mid.to(tl.int64)
                count_hi = count
    t = lo.to(tl.int32)
    # certificate: a lane that saw more than TOP_R entries dropped only values ≤ its TOP_R-th one
    if TOP_R == 1:
        floor = q0
    elif TOP_R == 2:
        floor = q1
    elif TOP_R == 3:
        floor = q2
    elif TOP_R == 4:
        floor = q3
    elif TOP_R == 5:
        floor = q4
    elif TOP_R == 6:
        floor = q5
    elif TOP_R == 7:
        floor = q6
    else:
        floor = q7
    dropped_max = tl.max(tl.where(per_lane > TOP_R, floor, -2147483648), 0)
    above = count_hi
    ties = count_lo - count_hi
    if (dropped_max >= t) | (t == -2147483648):  # not certified: t is only a lower bound
        tl.debug_barrier()  # the previous row's readers of the scratch row are done
        n_cand = _compact(row, V, t, scratch, softcap, CAP, KEY_BITS, BLOCK_V, SOFTCAP)
        tl.debug_barrier()  # the scratch row is visible to every thread of the program
        hi = top.to(tl.int64) + 1  # the bisection above narrowed it to t + 1
        if n_cand <= CAP:  # the scratch row holds capped values already
            t, above, ties = _bisect_memory(
                scratch, n_cand, top_k, t.to(tl.int64), hi, n_cand, softcap, KEY_BITS, BLOCK_V, False
            )
        else:  # too many candidates to hold: count over the row itself
            t, above, ties = _bisect_memory(
                row, V, top_k, t.to(tl.int64), hi, n_cand, softcap, KEY_BITS, BLOCK_V, SOFTCAP
            )
    return t, above, ties


@triton.jit
def _tie_cut(row, V, t_value, k_rem, softcap, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr):
    """Index of the ``k_rem``-th entry (lowest index first) equal to ``t_value``: T takes the ties up
    to it. Reads the row only up to that entry (there are more than ``k_rem`` ties)."""
    offs = tl.arange(0, BLOCK_V)
    taken = tl.zeros([], dtype=tl.int32)
    cut = tl.full([], -1, tl.int32)
    start = tl.zeros([], dtype=tl.int32)
    while (taken < k_rem) & (start < V):
        idx = start + offs
        xf = _cap(tl.load(row + idx, mask=idx < V, other=0.0).to(tl.float32), softcap, SOFTCAP)
        tie = (idx < V) & (xf == t_value)
        rank = taken + tl.cumsum(tie.to(tl.int32), 0)
        cut = tl.maximum(cut, tl.max(tl.where(tie & (rank == k_rem), idx, -1), 0))
        taken += tl.sum(tie.to(tl.int32), 0)
        start += BLOCK_V
    return cut


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _pow_gamma(x, gamma):
    """``x ** gamma`` for ``x`` in [0, 1] with torch's conventions (``0 ** 0 = 1``, ``0 ** γ = 0``)."""
    p = tl.exp(gamma * tl.log(tl.maximum(x, 1e-38)))
    p = tl.where(x > 0.0, p, 0.0)
    return tl.where(gamma == 0.0, 1.0, p)


@triton.jit
def _dpls_rows_kernel(
    x_ptr,
    x_stride,
    g_ptr,
    g_stride,
    target_ptr,
    eps_ptr,
    eps_value,
    gamma,
    softcap,
    eps_out_ptr,
    scale_ptr,
    loss_ptr,
    nll_ptr,
    scratch_ptr,
    stat_f_ptr,
    stat_i_ptr,
    N,
    V,
    top_k,
    ignore_index,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP: tl.constexpr,
    TOP_R: tl.constexpr,
    TOPK_MODE: tl.constexpr,
    EPS_PER_ROW: tl.constexpr,
    EPS_MODE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    PHASE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Loss, plain NLL and (optionally) the scaled gradient of each row; see the module docstring.

    ``PHASE`` 0 does a row in one program: stats pass, selection, final pass. With a top-k selection
    the work is split in two launches instead: phase 1 (stats pass and selection) writes each row's
    ``m``, ``s``, ε, threshold key ``t`` and tie cut to ``stat_f`` / ``stat_i``; phase 2 is the final
    pass alone. Registers are allocated for a kernel's heaviest part, so the selection's (about 100
    per thread at 8 warps, against under 64 for the final pass: read off ``cuobjdump -res-usage``)
    then no longer limit how many programs stream the final pass on each multiprocessor.
    """
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
            if PHASE != 2 and EPS_MODE != 0:
                tl.store(eps_out_ptr + r, 0.0)
            if PHASE != 1:
                tl.store(loss_ptr + r, 0.0)
                tl.store(nll_ptr + r, 0.0)
            if WRITE_GRAD and PHASE != 1:
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
            z_y = _cap(tl.load(row + col).to(tl.float32), softcap, SOFTCAP)

            cut = V  # entries equal to t are in T up to this index (phase 2)
            if PHASE != 2:
                # 1. stats pass: online max m and s = Σ exp(z − m) (for the ε-modes also a = Σ exp(z − m)·(z − m)
                #    or rest = s − 1 without its max term), and each lane's TOP_R largest values. While every entry so far is −inf, m is
                #    −inf and exponents are taken against 0 instead (exp(−inf − (−inf)) would be NaN).
                m = -float("inf")
                s = 0.0
                a = 0.0
                rest = 0.0
                n_fin = tl.zeros([], dtype=tl.int32)  # finite entries of the row
                k0 = tl.full([BLOCK_V], -float("inf"), tl.float32)
                k1 = k0
                k2 = k0
                k3 = k0
                k4 = k0
                k5 = k0
                k6 = k0
                k7 = k0
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    xf = tl.load(row + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
                    xf = _cap(xf, softcap, SOFTCAP)
                    m_new = tl.maximum(m, tl.max(xf, 0))
                    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
                    alpha = tl.exp(m - m_ref)
                    e = tl.exp(xf - m_ref)
                    if EPS_MODE == 1:  # s − 1 summed without the max entry: 1 − max p without cancellation
                        at_max = xf == m_new
                        n_max = tl.sum(at_max.to(tl.float32), 0) - tl.where(m_new > m, 1.0, 0.0)
                        old_max = tl.where((m_new > m) & (m > -float("inf")), alpha, 0.0)
                        rest = rest * alpha + old_max + n_max + tl.sum(tl.where(at_max, 0.0, e), 0)
                    if EPS_MODE == 2:
                        shift = tl.where(s > 0.0, m - m_ref, 0.0)
                        dz = tl.where(xf == -float("inf"), 0.0, xf - m_ref)  # 0·(−inf) would be NaN
                        a = alpha * (a + s * shift) + tl.sum(e * dz, 0)
                    if TOPK_MODE != 0 or EPS_MODE == 2:  # one reduction for both sums (no extra sync)
                        e_sum, n_blk = tl.reduce((e, (xf > -float("inf")).to(tl.int32)), 0, _add_pair)
                        n_fin += n_blk
                    else:
                        e_sum = tl.sum(e, 0)
                    s = s * alpha + e_sum
                    m = m_new
                    if TOPK_MODE == 1:
                        k0, k1, k2, k3, k4, k5, k6, k7 = _insert(k0, k1, k2, k3, k4, k5, k6, k7, xf, TOP_R)

                # adaptive ε from the same pass: no extra read of the row
                if EPS_MODE == 1:  # 1 − max p = 1 − exp(m − lse) = (s − 1)/s
                    eps = eps_value * _pow_gamma(tl.minimum(tl.maximum(rest / s, 0.0), 1.0), gamma)
                    tl.store(eps_out_ptr + r, eps)
                elif EPS_MODE == 2:  # H / log V' with H = log s − a/s, V' the finite entries (0 if V' ≤ 1)
                    h = (tl.log(s) - a / s) / tl.log(tl.maximum(n_fin, 2).to(tl.float32))
                    h = tl.where(n_fin > 1, h, 0.0)
                    eps = eps_value * _pow_gamma(tl.minimum(tl.maximum(h, 0.0), 1.0), gamma)
                    tl.store(eps_out_ptr + r, eps)

                # 2–3. the threshold of T. A −inf logit is masked, never smoothed onto: T is the
                #    k_eff = min(k, finite entries) largest finite logits, each getting ε / k_eff.
                k_eff = tl.zeros([], dtype=tl.int32) + top_k
                if TOPK_MODE != 0:
                    k_eff = tl.minimum(tl.maximum(n_fin, 1), top_k)
                t = tl.zeros([], dtype=tl.int32)
                k_rem = tl.zeros([], dtype=tl.int32)
                ties = tl.zeros([], dtype=tl.int32)
                if TOPK_MODE == 1:
                    t, above, ties = _select_threshold(
                        row, V, k0, k1, k2, k3, k4, k5, k6, k7, m, k_eff, scratch, softcap,
                        KEY_BITS, BLOCK_V, CAP, TOP_R, SOFTCAP,
                    )  # fmt: skip
                    k_rem = k_eff - above
                t_value = _key_value(t, row.dtype.element_ty, KEY_BITS)  # float compares: −0 == +0 too
                if PHASE == 1:
                    if TOPK_MODE == 1:  # noqa: SIM102 - a constexpr test, then a run-time one
                        if ties > k_rem:
                            cut = _tie_cut(row, V, t_value, k_rem, softcap, BLOCK_V, SOFTCAP)
                    tl.store(stat_f_ptr + 3 * r64, m)
                    tl.store(stat_f_ptr + 3 * r64 + 1, s)
                    tl.store(stat_f_ptr + 3 * r64 + 2, eps)
                    tl.store(stat_i_ptr + 3 * r64, t)
                    tl.store(stat_i_ptr + 3 * r64 + 1, cut)
                    tl.store(stat_i_ptr + 3 * r64 + 2, k_eff)
            else:
                m = tl.load(stat_f_ptr + 3 * r64)
                s = tl.load(stat_f_ptr + 3 * r64 + 1)
                eps = tl.load(stat_f_ptr + 3 * r64 + 2)
                t = tl.load(stat_i_ptr + 3 * r64)
                cut = tl.load(stat_i_ptr + 3 * r64 + 1)
                k_eff = tl.load(stat_i_ptr + 3 * r64 + 2)
                k_rem = tl.zeros([], dtype=tl.int32)
                ties = tl.zeros([], dtype=tl.int32)
                t_value = _key_value(t, row.dtype.element_ty, KEY_BITS)

            if PHASE != 1:
                # 4. final pass: membership of T, top-k sum, gradient. Sums stay per lane and are reduced
                #    once per row; ties at t are counted block by block only until k_rem of them are taken
                #    (and ranked by a scan only in the block where that happens).
                inv_s = 1.0 / s
                c_target = (1.0 - eps) * grad_scale
                c_topk = eps / k_eff * grad_scale
                top_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # Σ_{j∈T} (m − z_j) per lane, ≥ 0
                taken = tl.zeros([], dtype=tl.int32)
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    valid = idx < V
                    xf = _cap(tl.load(row + idx, mask=valid, other=0.0).to(tl.float32), softcap, SOFTCAP)
                    if TOPK_MODE == 1 and PHASE == 2:
                        in_t = valid & ((xf > t_value) | ((xf == t_value) & (idx <= cut)))
                    elif TOPK_MODE == 1:
                        tie = valid & (xf == t_value)
                        if ties > k_rem:  # only then does the index order of ties matter
                            if taken < k_rem:
                                n_tie = tl.sum(tie.to(tl.int32), 0)
                                if taken + n_tie > k_rem:  # the block where the k_rem-th tie is
                                    take = tie & (taken + tl.cumsum(tie.to(tl.int32), 0) <= k_rem)
                                else:
                                    take = tie
                                taken += n_tie
                            else:
                                take = tie & (idx < 0)
                        else:
                            take = tie
                        in_t = (valid & (xf > t_value)) | take
                    else:
                        in_t = valid & (xf > -float("inf"))  # k ≥ V: every finite entry
                    if TOPK_MODE != 0:
                        top_acc += tl.where(in_t, m - xf, 0.0)
                    if WRITE_GRAD:
                        g = tl.exp(xf - m) * (inv_s * grad_scale)
                        g -= tl.where(idx == col, c_target, 0.0)
                        if TOPK_MODE != 0:
                            g -= tl.where(in_t, c_topk, 0.0)
                        if SOFTCAP:  # the chain rule through the cap; masked entries keep 0
                            slope = 1.0 - (xf / softcap) * (xf / softcap)
                            g *= tl.where(xf > -float("inf"), slope, 0.0)
                        tl.store(grow + idx, g.to(g_ptr.dtype.element_ty), mask=valid)

                nll = tl.log(s) + (m - z_y)
                if TOPK_MODE == 0:
                    loss = nll
                else:
                    top_sum = tl.sum(top_acc, 0)  # finite: T holds finite logits only
                    smooth = eps / k_eff * tl.where(eps > 0.0, top_sum, 0.0)
                    loss = tl.log(s) + (1.0 - eps) * (m - z_y) + smooth
                tl.store(loss_ptr + r, loss)
                tl.store(nll_ptr + r, nll)


@triton.jit
def _scale_kernel(g_ptr, numel, factor_ptr, BLOCK: tl.constexpr):
    """``g *= factor`` in place, with the scalar read on the device; nothing is done when it is 1.

    Backward's common case (grad_output = 1) then costs one launch instead of a pass over the
    gradient, and needs no host read of grad_output (no sync, no graph break under torch.compile).
    """
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        first = tl.cast(tl.program_id(0), tl.int64) * BLOCK  # int64: N·V may pass 2^31
        stride = tl.cast(tl.num_programs(0), tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        for start in range(first, numel, stride):
            idx = start + offs
            live = idx < numel
            g = tl.load(g_ptr + idx, mask=live, other=0.0)
            tl.store(g_ptr + idx, (g.to(tl.float32) * factor).to(g_ptr.dtype.element_ty), mask=live)
