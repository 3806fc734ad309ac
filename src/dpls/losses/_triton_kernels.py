"""Triton kernels for the fused DPLS loss (imported lazily by ``triton_impl``).

One program walks whole rows (a persistent grid strides over them). Per row:

1. **stats pass** — online max ``m`` and ``s = Σ exp(z − m)``, and the histogram of the top radix
   digit of every logit's *key* (the order-preserving integer image of its float bits).
2. **select** — the exact k-th largest key by radix select, one digit per level: pick the bucket that
   holds the k-th largest, keep counting inside it on the next digit. Two tricks keep the passes over
   the row few: as soon as the surviving bucket fits in ``CAP`` entries it is compacted into a small
   per-program scratch row and the remaining digits are counted there (cache-resident), and the
   search stops early when the whole bucket belongs to the top-k (no need to resolve finer bits).
3. **final pass** — the membership of ``T`` (strictly above the threshold, plus the first ``k_rem``
   ties by lowest index, so exactly ``k`` entries are chosen), the top-k sum for the loss, and the
   gradient ``softmax − (1−ε)·onehot(y) − (ε/k)·1[T]`` already scaled, stored in the logits' dtype
   (possibly into the logits' own storage: every element is read before it is overwritten).

So a row is read three times (stats, compaction, final) and written once; the second and third
reads usually hit L2. All arithmetic is float32; keys are int32.
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
        b = b
        key = b ^ ((b >> 15) & 0x7FFF)
    else:
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(b == -2147483648, 0, b)
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
    return key


@triton.jit
def _unsigned_key(x, KEY_BITS: tl.constexpr):
    """The same key shifted to unsigned order (bit pattern in an int32), so radix digits are plain."""
    if KEY_BITS == 16:
        u = _signed_key(x, KEY_BITS) + 32768
    else:
        u = _signed_key(x, KEY_BITS) ^ -2147483648
    return u


@triton.jit
def _pick_bucket(hist, k_rem, BINS: tl.constexpr):
    """Bucket holding the ``k_rem``-th largest entry; also the counts above it and inside it."""
    bins = tl.arange(0, BINS)
    count_ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # entries in this bucket or higher
    b = tl.max(tl.where(count_ge >= k_rem, bins, -1), 0)
    above = tl.sum(tl.where(bins > b, hist, 0), 0)
    inside = tl.sum(tl.where(bins == b, hist, 0), 0)
    return b, above, inside


@triton.jit
def _histogram_pass(
    src,
    n,
    ptop,
    HI_SHIFT: tl.constexpr,
    SHIFT: tl.constexpr,
    KEY_BITS: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Histogram of the digit at ``SHIFT`` over entries whose bits above ``HI_SHIFT`` equal ``ptop``."""
    BINS: tl.constexpr = 1 << DIGIT_BITS
    offs = tl.arange(0, BLOCK_V)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, n, BLOCK_V):
        idx = start + offs
        valid = idx < n
        x = tl.load(src + idx, mask=valid, other=0.0)
        u = _unsigned_key(x, KEY_BITS)
        live = valid & ((u >> HI_SHIFT) == ptop)
        hist += tl.histogram((u >> SHIFT) & (BINS - 1), BINS, mask=live)
    return hist


@triton.jit
def _compact(src, n, ptop, SHIFT: tl.constexpr, dst, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Copy the entries whose bits above ``SHIFT`` equal ``ptop`` to ``dst`` (in index order)."""
    offs = tl.arange(0, BLOCK_V)
    base = 0
    for start in range(0, n, BLOCK_V):
        idx = start + offs
        valid = idx < n
        x = tl.load(src + idx, mask=valid, other=0.0)
        live = valid & ((_unsigned_key(x, KEY_BITS) >> SHIFT) == ptop)
        flags = live.to(tl.int32)
        pos = base + tl.cumsum(flags, 0) - 1
        tl.store(dst + pos, x, mask=live)
        base += tl.sum(flags, 0)


@triton.jit
def _select_threshold(
    row,
    V,
    hist0,
    top_k,
    scratch,
    KEY_BITS: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP: tl.constexpr,
):
    """Radix select of the k-th largest key of ``row``.

    Returns ``(t_top, shift, k_rem, ties)``: the membership test is ``key >> shift`` compared with
    ``t_top`` (signed keys); ``ties`` entries compare equal and the first ``k_rem`` of them (by index)
    belong to T. ``shift > 0`` only when the search stopped early because the whole bucket is in T.
    """
    BINS: tl.constexpr = 1 << DIGIT_BITS
    NUM_LEVELS: tl.constexpr = KEY_BITS // DIGIT_BITS
    prefix = tl.zeros([], dtype=tl.int32)
    k_rem = top_k + tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    shift = tl.zeros([], dtype=tl.int32)
    done = tl.zeros([], dtype=tl.int32)
    compacted = tl.zeros([], dtype=tl.int32)
    src = row
    n = V + tl.zeros([], dtype=tl.int32)
    for level in tl.static_range(NUM_LEVELS):
        SHIFT = KEY_BITS - (level + 1) * DIGIT_BITS
        if done == 0:
            if level == 0:
                hist = hist0
            else:
                HI = SHIFT + DIGIT_BITS
                hist = _histogram_pass(src, n, prefix >> HI, HI, SHIFT, KEY_BITS, DIGIT_BITS, BLOCK_V)
            b, above, inside = _pick_bucket(hist, k_rem, BINS)
            k_rem -= above
            prefix = prefix | (b << SHIFT)
            ties = inside
            shift = tl.zeros([], dtype=tl.int32) + SHIFT
            if inside == k_rem:
                done = 1  # every entry of the bucket is in T: finer digits change nothing
            if level + 1 < NUM_LEVELS:
                if (done == 0) & (compacted == 0) & (inside <= CAP):
                    tl.debug_barrier()  # the previous row's readers of the scratch are finished
                    _compact(row, V, prefix >> SHIFT, SHIFT, scratch, KEY_BITS, BLOCK_V)
                    tl.debug_barrier()  # the scratch row is visible to every thread of the program
                    src = scratch
                    n = inside
                    compacted = 1
    if KEY_BITS == 16:
        t_signed = prefix - 32768
    else:
        t_signed = prefix ^ -2147483648
    return t_signed >> shift, shift, k_rem, ties


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
    DIGIT_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CAP: tl.constexpr,
    TOPK_MODE: tl.constexpr,
    EPS_PER_ROW: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_MODE: tl.constexpr,
):
    """Loss, plain NLL and (optionally) the scaled gradient of each row; see the module docstring."""
    BINS: tl.constexpr = 1 << DIGIT_BITS
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

            # 1. stats pass: online max / sum-exp and the top-digit histogram
            m = -float("inf")
            s = 0.0
            hist0 = tl.zeros([BINS], dtype=tl.int32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                valid = idx < V
                x = tl.load(row + idx, mask=valid, other=-float("inf"))
                xf = x.to(tl.float32)
                m_new = tl.maximum(m, tl.max(xf, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xf - m_new), 0)
                m = m_new
                if TOPK_MODE == 1:
                    u = _unsigned_key(x, KEY_BITS)
                    hist0 += tl.histogram((u >> (KEY_BITS - DIGIT_BITS)) & (BINS - 1), BINS, mask=valid)

            # 2. the threshold of T
            t_top = tl.zeros([], dtype=tl.int32)
            shift = tl.zeros([], dtype=tl.int32)
            k_rem = tl.zeros([], dtype=tl.int32)
            ties = tl.zeros([], dtype=tl.int32)
            if TOPK_MODE == 1:
                t_top, shift, k_rem, ties = _select_threshold(
                    row, V, hist0, top_k, scratch, KEY_BITS, DIGIT_BITS, BLOCK_V, CAP
                )
            need_rank = ties > k_rem  # only then does the index order of ties matter

            # 3. final pass: membership of T, top-k sum, gradient
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
                    key = _signed_key(x, KEY_BITS) >> shift
                    tie = valid & (key == t_top)
                    if need_rank:
                        rank = taken + tl.cumsum(tie.to(tl.int32), 0)
                        take = tie & (rank <= k_rem)
                        taken += tl.sum(tie.to(tl.int32), 0)
                    else:
                        take = tie
                    in_t = (valid & (key > t_top)) | take
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
