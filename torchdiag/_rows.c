/* torchdiag's statistics row of a contiguous float32 CPU tensor in one read (loaded by cpurow.py).
 *
 * out = [r, sum(x - r), sum((x - r)^2), min, max, nonzero count, saturated count], in double; r = x[0] when
 * `shift`, else 0; min and max are NaN when x holds a NaN (as torch.aminmax); a count not asked for is NaN.
 * Returns 1 when the float sums give the variance to float accuracy (cpurow re-reads it in float64 if not).
 *
 * The order of every addition is fixed by this source: LANES independent float accumulators over blocks
 * of BLOCK elements (element k in lane k % LANES), each block's lanes added in order into double. The
 * compiler vectorises across the lanes without reassociating anything (no -ffast-math, -ffp-contract=off),
 * so the AVX2 clone and the baseline one give bit-identical rows.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 4096
#define PREFETCH 1024 /* elements ahead: the kernel is otherwise bound by memory latency */

static inline __attribute__((always_inline)) int
row_impl(const float *x, int64_t n, int shift, float c, float h, double ratio, int zeros, int sat, double *out)
{
    float r = shift && n > 0 ? x[0] : 0.0f;
    float mn[LANES], mx[LANES];
    int nan[LANES];
    double S = 0.0, Q = 0.0, NZ = 0.0, ST = 0.0;
    for (int j = 0; j < LANES; j++) {
        mn[j] = INFINITY;
        mx[j] = -INFINITY;
        nan[j] = 0;
    }
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        float s[LANES] = {0}, q[LANES] = {0}, nz[LANES] = {0}, st[LANES] = {0};
        int64_t k = i;
        for (; k + LANES <= end; k += LANES) {
            __builtin_prefetch(x + k + PREFETCH); /* a hint (never faults): ~2x on a cold tensor */
            for (int j = 0; j < LANES; j++) {
                float v = x[k + j];
                float d = v - r;
                s[j] += d;
                q[j] += d * d;
                nan[j] |= v != v;
                mn[j] = v < mn[j] ? v : mn[j];
                mx[j] = v > mx[j] ? v : mx[j];
                if (zeros) nz[j] += v != 0.0f ? 1.0f : 0.0f;
                if (sat) st[j] += fabsf(v - c) > h ? 1.0f : 0.0f;
            }
        }
        for (; k < end; k++) { /* the last block's tail: the lane it would have in a full block */
            int j = (int)(k % LANES);
            float v = x[k];
            float d = v - r;
            s[j] += d;
            q[j] += d * d;
            nan[j] |= v != v;
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
            if (zeros) nz[j] += v != 0.0f ? 1.0f : 0.0f;
            if (sat) st[j] += fabsf(v - c) > h ? 1.0f : 0.0f;
        }
        for (int j = 0; j < LANES; j++) {
            S += s[j];
            Q += q[j];
            NZ += nz[j];
            ST += st[j];
        }
    }
    float a = mn[0], b = mx[0];
    int any_nan = nan[0];
    for (int j = 1; j < LANES; j++) {
        a = mn[j] < a ? mn[j] : a;
        b = mx[j] > b ? mx[j] : b;
        any_nan |= nan[j];
    }
    out[0] = r;
    out[1] = S;
    out[2] = Q;
    out[3] = any_nan ? NAN : a;
    out[4] = any_nan ? NAN : b;
    out[5] = zeros ? NZ : NAN;
    out[6] = sat ? ST : NAN;
    /* float32 accuracy of the variance: finite sums, and |mean| <= ratio * std about r (no cancellation) */
    if (!isfinite(S) || !isfinite(Q))
        return 0;
    return Q == 0.0 || S * S / (double)n * (1.0 + ratio * ratio) <= ratio * ratio * Q;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TD_ONE_TARGET)
#define TD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TD_CLONES
#endif

#define TD_VARIANT(name, Z, SAT)                                                                            \
    TD_CLONES int name(const float *x, int64_t n, int shift, float c, float h, double ratio, double *out) \
    {                                                                                                       \
        return row_impl(x, n, shift, c, h, ratio, Z, SAT, out);                                             \
    }

TD_VARIANT(td_row, 0, 0)
TD_VARIANT(td_row_zeros, 1, 0)
TD_VARIANT(td_row_sat, 0, 1)
TD_VARIANT(td_row_zeros_sat, 1, 1)
