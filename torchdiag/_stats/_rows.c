/* torchdiag's statistics row of a contiguous float32 CPU tensor in one read (loaded by _cpurow.py), a histogram
 * step's binning (td_hist), and a CRC-32C for TensorBoard's event records (at the end).
 *
 * out = [r, sum(x - r), sum((x - r)^2), min, max, nonzero count, saturated count], in double; r = x[0] when
 * `shift`, else 0; min and max are NaN when x holds a NaN (as torch.aminmax); a count not asked for is NaN.
 * Returns 1 when the float sums give the variance to float accuracy (_cpurow re-reads it in float64 if not).
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

typedef struct {
    float s[LANES], q[LANES], nz[LANES], st[LANES]; /* this block's sums: reset per block */
    float mn[LANES], mx[LANES];
} lanes_t;

/* element v into lane j */
static inline __attribute__((always_inline)) void
add(lanes_t *L, int j, float v, float r, float c, float h, int zeros, int sat)
{
    float d = v - r;
    L->s[j] += d;
    L->q[j] += d * d;
    L->mn[j] = v < L->mn[j] ? v : L->mn[j];
    L->mx[j] = v > L->mx[j] ? v : L->mx[j];
    if (zeros) L->nz[j] += v != 0.0f ? 1.0f : 0.0f;
    if (sat) L->st[j] += fabsf(v - c) > h ? 1.0f : 0.0f;
}

static inline __attribute__((always_inline)) int
row_impl(const float *x, int64_t n, int shift, float c, float h, double ratio, int zeros, int sat, double *out)
{
    float r = shift && n > 0 ? x[0] : 0.0f;
    lanes_t L;
    double S = 0.0, Q = 0.0, NZ = 0.0, ST = 0.0;
    for (int j = 0; j < LANES; j++) {
        L.mn[j] = INFINITY;
        L.mx[j] = -INFINITY;
    }
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        for (int j = 0; j < LANES; j++)
            L.s[j] = L.q[j] = L.nz[j] = L.st[j] = 0.0f;
        int64_t k = i;
        for (; k + LANES <= end; k += LANES) {
            __builtin_prefetch(x + k + PREFETCH); /* a hint (never faults): ~2x on a cold tensor */
            for (int j = 0; j < LANES; j++)
                add(&L, j, x[k + j], r, c, h, zeros, sat);
        }
        for (; k < end; k++) /* the last block's tail: the lane it would have in a full block */
            add(&L, (int)(k % LANES), x[k], r, c, h, zeros, sat);
        for (int j = 0; j < LANES; j++) {
            S += L.s[j];
            Q += L.q[j];
            NZ += L.nz[j];
            ST += L.st[j];
        }
    }
    float a = L.mn[0], b = L.mx[0];
    for (int j = 1; j < LANES; j++) {
        a = L.mn[j] < a ? L.mn[j] : a;
        b = L.mx[j] > b ? L.mx[j] : b;
    }
    /* A NaN in x makes S NaN (every element is added into it); S is also NaN without one when infinities of
     * both signs meet (x holding both, r infinite, float lanes overflowing both ways): only then look. */
    int any_nan = 0;
    if (isnan(S))
        for (int64_t k = 0; k < n && !any_nan; k++)
            any_nan = x[k] != x[k];
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

/* A histogram step's fixed-bin counts of x (finite, all >= lo): bin floor((x - lo) * bins / width), the maximum
 * (and anything rounding past it) in the last bin; added into counts[0..bins), for 1 to 256 bins (returns 0
 * otherwise). The float32 operations of the ATen path (_histogram_cpu: sub, mul by bins, div by width,
 * truncation), one at a time, so the bins are the same; the bins of a block are computed vectorised, then
 * counted into four interleaved tables. */
TD_CLONES int
td_hist(const float *x, int64_t n, float lo, float width, int bins, int64_t *counts)
{
    const float fb = (float)bins;
    int32_t idx[256];
    int64_t sub[4][256 + 1]; /* four counts per bin (a run of one bin does not wait on its own increments) */
    if (bins < 1 || bins > 256)
        return 0; /* (torchdiag bins in 64: the caller bins any other count the ATen way) */
    for (int j = 0; j < 4; j++)
        for (int b = 0; b <= bins; b++)
            sub[j][b] = 0;
    for (int64_t i = 0; i < n; i += 256) {
        int m = n - i < 256 ? (int)(n - i) : 256;
        for (int k = 0; k < m; k++) { /* vectorised: the bins of a block */
            float f = x[i + k] - lo;
            f = f * fb;
            f = f / width;
            f = f >= 0.0f ? f : 0.0f; /* (x >= lo: never below; a guard, not a bin) */
            f = f < fb ? f : fb;
            idx[k] = (int32_t)f;
        }
        int k = 0;
        for (; k + 4 <= m; k += 4) {
            sub[0][idx[k]]++;
            sub[1][idx[k + 1]]++;
            sub[2][idx[k + 2]]++;
            sub[3][idx[k + 3]]++;
        }
        for (; k < m; k++)
            sub[0][idx[k]]++;
    }
    for (int b = 0; b <= bins; b++) /* bin `bins`: the maximum (and what rounds past it), in the last bin */
        counts[b < bins ? b : bins - 1] += sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
    return 1;
}

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of n bytes, as TensorBoard's event records are
 * checksummed with (its masking is done by the caller), eight bytes a step ("slicing-by-8"): tables built
 * once when the library is loaded. */
static uint32_t crc_table[8][256];

__attribute__((constructor)) static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

uint32_t
td_crc32c(const unsigned char *p, int64_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    for (; n >= 8; p += 8, n -= 8) { /* the bytes in order: independent of the machine's endianness */
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
            crc_table[0][p[7]];
    }
    for (; n > 0; p++, n--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p) & 0xFF];
    return c ^ 0xFFFFFFFFu;
}
