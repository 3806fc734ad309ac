/* The CPU search for T, the k largest logits of each row, in one visit per row.
 *
 * Built at first use by dpls/losses/cpu_kernel.py with the system C compiler and loaded with
 * ctypes; without a compiler the loss uses the NumPy search in chunked.py, which computes the
 * same thing. Both are tested against the definition (tests/losses/test_cpu_selection.py).
 *
 * Per row (float32, contiguous), while the row sits in the core's cache:
 *   1. strip maxima: the row is viewed as 8 interleaved strips of width = v/8 columns,
 *      m_c = max over strips of z[s*width + c] (the one full read of the row);
 *   2. a cut: any t that at least k+1 strip maxima reach is at most the row's (k+1)-th largest
 *      value (those columns hold k+1 entries >= t). Bisection on t, counting with a vectorised
 *      loop, stops once about k+1 maxima reach it;
 *   3. the candidates, the entries >= t, lie in the columns whose maximum reaches t (and in the
 *      few tail columns past 8*width): about k+1 columns of 8 entries are read, not the row;
 *   4. the (k+1)-th and k-th largest candidates (tau); with no tie between them, T is the
 *      candidates >= tau, and the smoothing term needs only spread = mean_T (z - M), M the row
 *      maximum, summed in double.
 * A row is handed back to the exact path (exact[r] = 1) when it holds a NaN, an infinite entry
 * among its largest, fewer than k+1 finite strip maxima, a tie at tau, or more than `cap`
 * candidates (many equal values at the cut).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define STRIPS 8 /* cpu_kernel.STRIPS, which checks the precondition v/STRIPS >= k+1 */
#define SMALL_SELECT 32 /* below this many ranks, selection by insertion into a sorted buffer */

/* The kth smallest (0-based) of a[0..n-1]; reorders a (Hoare partition, median of three). */
static float kth_smallest(float *a, int64_t n, int64_t kth) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        float t;
        if (a[mid] < a[lo]) { t = a[mid]; a[mid] = a[lo]; a[lo] = t; }
        if (a[hi] < a[lo]) { t = a[hi]; a[hi] = a[lo]; a[lo] = t; }
        if (a[hi] < a[mid]) { t = a[hi]; a[hi] = a[mid]; a[mid] = t; }
        float p = a[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < p) i++;
            while (a[j] > p) j--;
            if (i <= j) { t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (kth <= j) hi = j;
        else if (kth >= i) lo = i;
        else return a[kth];
    }
    return a[kth];
}

/* Step 1: m[c] = max over strips of row[s*width + c]; returns 1 if the row holds a NaN. */
static int strip_maxima(const float *row, int64_t v, int64_t width, float *m) {
    int64_t c = 0;
    int nan = 0;
#ifdef __SSE2__
    __m128 bad = _mm_setzero_ps();
    for (; c + 4 <= width; c += 4) {
        __m128 best = _mm_loadu_ps(row + c);
        bad = _mm_or_ps(bad, _mm_cmpunord_ps(best, best));
        for (int64_t s = 1; s < STRIPS; s++) {
            __m128 x = _mm_loadu_ps(row + s * width + c);
            bad = _mm_or_ps(bad, _mm_cmpunord_ps(x, x));
            best = _mm_max_ps(best, x);
        }
        _mm_storeu_ps(m + c, best);
    }
    nan = _mm_movemask_ps(bad) != 0;
#endif
    for (; c < width; c++) {
        float best = row[c];
        nan |= best != best;
        for (int64_t s = 1; s < STRIPS; s++) {
            float x = row[s * width + c];
            nan |= x != x;
            best = x > best ? x : best;
        }
        m[c] = best;
    }
    for (int64_t j = STRIPS * width; j < v; j++) nan |= row[j] != row[j];
    return nan;
}

static int32_t count_at_least(const float *a, int64_t n, float t) {
    int32_t c = 0;  /* 32-bit lanes: the loop vectorises four compares at a time */
    for (int64_t i = 0; i < n; i++) c += a[i] >= t;
    return c;
}

/* Step 2: a cut t with count_at_least(m, width, t) >= need (and not many more), or NAN when
 * there is none worth having: fewer than `need` finite maxima, or an infinite one at the top. */
static float find_cut(const float *m, int64_t width, int32_t need) {
    float hi = m[0], lo = m[0];
    int64_t c = 0;
#ifdef __SSE2__
    __m128 hi4 = _mm_set1_ps(m[0]), lo4 = hi4;
    for (; c + 4 <= width; c += 4) {
        __m128 x = _mm_loadu_ps(m + c);
        hi4 = _mm_max_ps(hi4, x);
        lo4 = _mm_min_ps(lo4, x);
    }
    float h[4], l[4];
    _mm_storeu_ps(h, hi4);
    _mm_storeu_ps(l, lo4);
    for (int q = 0; q < 4; q++) {
        hi = h[q] > hi ? h[q] : hi;
        lo = l[q] < lo ? l[q] : lo;
    }
#endif
    for (; c < width; c++) {
        hi = m[c] > hi ? m[c] : hi;
        lo = m[c] < lo ? m[c] : lo;
    }
    if (!isfinite(hi)) return NAN;  /* +inf at the top, or every column masked */
    if (count_at_least(m, width, hi) >= need) return hi;  /* `need` maxima tie at the top */
    if (!isfinite(lo)) {  /* masked (-inf) columns: step down from the top until enough reach */
        float gap = 1.0f;
        for (lo = hi - gap; count_at_least(m, width, lo) < need; lo = hi - gap) {
            if (!isfinite(lo)) return NAN;
            gap *= 4.0f;
        }
    }
    int32_t enough = need + need / 8 + 4;
    for (int it = 0; it < 64; it++) {  /* invariant: count(lo) >= need > count(hi) */
        float mid = lo + (hi - lo) * 0.5f;
        if (!(mid > lo && mid < hi)) break;
        int32_t n = count_at_least(m, width, mid);
        if (n >= need) {
            lo = mid;
            if (n <= enough) break;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Step 3: the entries >= cut, up to cap of them (values and columns; vals and cols have room
 * for cap + 1); returns how many there are, possibly more than cap. Only the columns whose strip
 * maximum reaches the cut are read (listed in `chosen`, room for width), a strip at a time, and
 * the appends are branch-free: whether an entry passes is not predictable. */
static int64_t collect(const float *row, int64_t v, int64_t width, const float *m, float cut,
                       int64_t cap, float *vals, int64_t *cols, int64_t *chosen) {
    int64_t n = 0, n_chosen = 0;
    for (int64_t c = 0; c < width; c++) {
        chosen[n_chosen] = c;
        n_chosen += m[c] >= cut;
    }
    for (int64_t s = 0; s < STRIPS; s++) {
        const float *strip = row + s * width;
        for (int64_t i = 0; i < n_chosen; i++) {
            float x = strip[chosen[i]];
            int64_t slot = n < cap ? n : cap;
            vals[slot] = x;
            cols[slot] = s * width + chosen[i];
            n += x >= cut;
        }
    }
    for (int64_t j = STRIPS * width; j < v; j++) {
        int64_t slot = n < cap ? n : cap;
        vals[slot] = row[j];
        cols[slot] = j;
        n += row[j] >= cut;
    }
    return n;
}

/* Step 4: the (d+1)-th and (d+2)-th smallest of a[0..n-1] (0-based d and d+1), n >= d+2. When
 * d is small (the cut was tight) a sorted buffer of the d+2 smallest takes one pass with few
 * insertions; otherwise a quickselect on a copy in work. */
static void ranks_d_and_next(const float *a, int64_t n, int64_t d, float *work, float *at_d, float *after) {
    if (d + 2 <= SMALL_SELECT) {
        int64_t size = d + 2, have = 0;
        for (int64_t i = 0; i < n; i++) {
            float x = a[i];
            if (have == size && !(x < work[have - 1])) continue;
            int64_t p = have < size ? have++ : size - 1;
            while (p > 0 && work[p - 1] > x) { work[p] = work[p - 1]; p--; }
            work[p] = x;
        }
        *at_d = work[d];
        *after = work[d + 1];
        return;
    }
    memcpy(work, a, (size_t)n * sizeof(float));
    *at_d = kth_smallest(work, n, d);
    float next = work[d + 1];
    for (int64_t i = d + 2; i < n; i++) next = work[i] < next ? work[i] : next;
    *after = next;
}

/* z: [rows, v] float32, contiguous; needs v/8 >= k+1. Writes, per row r not marked exact:
 * cols[r*k .. r*k+k-1] (T, unordered), spread[r] = mean_T (z - M), peak[r] = M. Returns the
 * number of rows marked exact, or -1 when scratch memory cannot be had. */
int64_t dpls_top_k_rows(const float *z, int64_t rows, int64_t v, int64_t k, int64_t cap,
                        int64_t *cols, double *spread, float *peak, uint8_t *exact) {
    int64_t width = v / STRIPS, n_exact = 0;
    float *m = malloc((size_t)(width + 2 * (cap + 1)) * sizeof(float));
    int64_t *where = malloc((size_t)(cap + 1 + width) * sizeof(int64_t));
    if (m == NULL || where == NULL) {
        free(m);
        free(where);
        return -1;
    }
    float *vals = m + width, *work = vals + cap + 1;
    int64_t *chosen = where + cap + 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = z + r * v;
        exact[r] = 1;
        n_exact++;
        if (strip_maxima(row, v, width, m)) continue;  /* a NaN */
        float cut = find_cut(m, width, (int32_t)(k + 1));
        if (isnan(cut)) continue;
        int64_t n = collect(row, v, width, m, cut, cap, vals, where, chosen);
        if (n <= k || n > cap) continue;
        float next, tau, top = vals[0];  /* the (k+1)-th and the k-th largest, and the largest */
        ranks_d_and_next(vals, n, n - k - 1, work, &next, &tau);
        for (int64_t i = 1; i < n; i++) top = vals[i] > top ? vals[i] : top;
        if (next == tau || !isfinite(top)) continue;
        double sum = 0.0;
        int64_t t = 0;
        for (int64_t i = 0; i < n; i++) {
            if (vals[i] >= tau && t < k) {  /* exactly k pass: no tie at tau */
                cols[r * k + t++] = where[i];
                sum += (double)vals[i] - (double)top;
            }
        }
        spread[r] = sum / (double)k;
        peak[r] = top;
        exact[r] = 0;
        n_exact--;
    }
    free(m);
    free(where);
    return n_exact;
}
