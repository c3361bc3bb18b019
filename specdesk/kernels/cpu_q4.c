/* W4A8 linear for the CPU: 4-bit weights on GGUF's Q4_1 grid (w = d * q + m, q in 0..15, one d and one m per
 * group of 32 inputs of a channel) times int8 activations (cpu_int8.c's groups of 32). The torch twin is
 * `specdesk.kernels.cpu_q4.linear_reference`.
 *
 * Why: a Q4_1 checkpoint (the default model's GGUF) holds exactly these codes, so the kernel reads the weights
 * the checkpoint was made with, in half the bytes of int8 weights re-quantized from them; on an AVX2 CPU the
 * unsigned 4-bit codes are vpmaddubsw's unsigned operand as they are, with no sign trick, and 8 steps of
 * pairs (at most 8 * 2 * 15 * 127 = 30480) add up in int16 before one widening per group. With AVX-512 VNNI
 * (and VL) one vpdpbusd per step adds the same products straight into int32: the same integers, so the same
 * bits, in half the instructions (1.1-1.4x on 4 to 512 tokens, Zen 4), and more tokens per weight load.
 *
 * Per group g of a token with scale s and codes x (sums = s * sum(x), from sd_quantize_rows_q4):
 *     sum_i w_i * s * x_i = (s * d) * sum_i q_i x_i + m * sums
 * and the float sum over groups goes f = f + float(int sum) * (s * d), then f = f + sums * m, in group order,
 * with each product and sum rounded on its own (-ffp-contract=off), so a token's result never depends on the
 * other tokens of the pass (speculation stays exact) nor on whether the vector or the portable loop ran.
 *
 * Weights: [n/16][k/4][32 bytes]: byte 4c + t of step j holds input 4j + t of channel c (low nibble) and of
 * channel c + 8 (high nibble), c in 0..7, for the 16 channels of a block. dm: float16 [n/16][k/32][2][16], the
 * block's 16 steps d then its 16 minimums m per group, as GGUF stores them: a block's weights and scales are
 * two streams read front to back, 20 bytes per 32 weights in all (int8: 36).
 */
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

#define GROUP 32
/* Bytes ahead of the weight stream that the tiles prefetch: the hardware prefetcher alone left a one-token pass
 * reading weights at about two thirds of what a plain read of memory reaches (benchmarks.linear_ab --against; 1024
 * ran best of 1, 2 and 4 KiB on the 2-core Zen 2). A prefetch changes no result. */
#ifndef WEIGHT_PREFETCH
#define WEIGHT_PREFETCH 1024
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q4_VNNI 1 /* the tile's steps as vpdpbusd */
#endif
#ifdef Q4_VNNI
#define MAX_ROWS 8 /* VNNI: 2 x 8 int32 sums, the nibble mask, the weights' two halves and a token's broadcast
                    * in 32 registers (AVX-512's 16 more); 8 ran faster than 10 on 8 and
                    * 512 tokens (benchmarks.linear_ab, Zen 4) */
#else
#define MAX_ROWS 5 /* tokens multiplied by one load of a block's weights: 2 x 5 int16 sums, the nibble mask, the
                    * two halves of the weights, a token's broadcast and a product fill the 16 AVX2 registers (the
                    * float sums wait in memory between groups); 5 rows ran 1.04x faster than 4, 6 no faster */
#endif

typedef struct {
    const int8_t *xq;
    const float *xs, *sums;
    int64_t m, k;
    const uint8_t *w;
    const uint16_t *dm;
    const float *bias;
    int64_t n;
    void *out;
    int out_bf16;
} q4_args;

/* float16 bits -> float32, exactly (subnormals too; a Q4_1 step of a nearly constant group can be one). */
static inline float from_fp16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0x1f)
        u = sign | 0x7f800000u | (man << 13);
    else if (exp != 0)
        u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0)
        u = sign;
    else { /* subnormal: man * 2^-24, normalized */
        int e = -1;
        uint32_t mm = man;
        do {
            e++;
            mm <<= 1;
        } while (!(mm & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((mm & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX2__) && defined(__F16C__)
/* R tokens x one block of 16 channels (two registers of 8); dm points at the block's scales. */
static inline __attribute__((always_inline)) void tile(const int8_t *x, int64_t k, const uint8_t *wb, const float *xs,
                                                       const float *sums, const uint16_t *dm, const int R,
                                                       __m256 f[MAX_ROWS][2]) {
    const int64_t groups = k / GROUP;
    const __m256i low = _mm256_set1_epi8(0x0f);
#ifndef Q4_VNNI
    const __m256i ones = _mm256_set1_epi16(1); /* the int16 sums' widening */
#endif
    for (int r = 0; r < R; r++) f[r][0] = f[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i a[MAX_ROWS][2];
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        const uint8_t *wg = wb + g * GROUP * 8;
        const int8_t *xg = x + g * GROUP;
        for (int l = 0; l < GROUP * 8; l += 64) _mm_prefetch((const char *)(wg + WEIGHT_PREFETCH + l), _MM_HINT_T0);
        _mm_prefetch((const char *)(dm + g * 32) + WEIGHT_PREFETCH / 4, _MM_HINT_T0);
        /* A group's 8 steps unrolled (no loop-carried register copies) and, below, each token's two sums pinned
         * to registers after its step: without the pin GCC hoists all broadcasts and products ahead of the adds
         * and spills two sums to the stack. The tile then keeps vpmaddubsw's one port busy: 1.15x on prefill
         * (benchmarks.linear_ab --against). */
#pragma GCC unroll 8
        for (int j = 0; j < GROUP / 4; j++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(wg + j * 32));
            const __m256i w0 = _mm256_and_si256(w, low), w1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
            for (int r = 0; r < R; r++) {
                int32_t v;
                memcpy(&v, xg + r * k + 4 * j, 4);
                const __m256i xv = _mm256_set1_epi32(v);
#ifdef Q4_VNNI
                /* One vpdpbusd adds a channel's 4 products (unsigned codes times signed activations) into its
                 * int32 lane: the same integer as the AVX2 pair of steps below, in half the instructions. */
                a[r][0] = _mm256_dpbusd_epi32(a[r][0], w0, xv);
                a[r][1] = _mm256_dpbusd_epi32(a[r][1], w1, xv);
#else
                a[r][0] = _mm256_add_epi16(a[r][0], _mm256_maddubs_epi16(w0, xv));
                a[r][1] = _mm256_add_epi16(a[r][1], _mm256_maddubs_epi16(w1, xv));
#endif
                __asm__("" : "+x"(a[r][0]), "+x"(a[r][1])); /* emits nothing: the sums stay in registers */
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + g * 32 + 8 * h)));
            const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + g * 32 + 16 + 8 * h)));
            for (int r = 0; r < R; r++) {
#ifdef Q4_VNNI
                const __m256 s = _mm256_cvtepi32_ps(a[r][h]); /* int32 sums already */
#else
                const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(a[r][h], ones));
#endif
                f[r][h] = _mm256_add_ps(f[r][h], _mm256_mul_ps(s, _mm256_mul_ps(_mm256_set1_ps(xs[r * groups + g]), dv)));
                f[r][h] = _mm256_add_ps(f[r][h], _mm256_mul_ps(_mm256_set1_ps(sums[r * groups + g]), mv));
            }
        }
    }
}

#define TILE(R) tile(x, k, wb + b * k4 * 32, xs + r0 * groups, sums + r0 * groups, dmb, R, f)
#endif

static void q4_part(const void *a, int64_t part, int64_t parts) {
    const q4_args *L = a;
    const float *xs = L->xs, *sums = L->sums;
    const int64_t m = L->m, k = L->k, n = L->n, k4 = k / 4, groups = k / GROUP;
    const int64_t nblocks = n / 16, pairs = (nblocks + 1) / 2;
    /* Parts split the channels in pairs of blocks (as cpu_int8.c); tiles of at most MAX_ROWS tokens, as even
     * as they come. */
    for (int64_t p = pairs * part / parts; p < pairs * (part + 1) / parts; p++) {
        const int64_t nb = 2 * p;
        const int blocks = nb + 1 < nblocks ? 2 : 1;
        const uint8_t *wb = L->w + nb * k4 * 32;
        const int64_t tiles = (m + MAX_ROWS - 1) / MAX_ROWS;
        for (int64_t ti = 0, r0 = 0; ti < tiles; ti++, r0 = m * ti / tiles) {
            const int rows = (int)(m * (ti + 1) / tiles - r0);
            const int8_t *x = L->xq + r0 * k;
            for (int b = 0; b < blocks; b++) {
                const int64_t cb = (nb + b) * 16;
                const uint16_t *dmb = L->dm + (nb + b) * groups * 32;
#if defined(__AVX2__) && defined(__F16C__)
                __m256 f[MAX_ROWS][2];
                switch (rows) {
                    case 1: TILE(1); break;
                    case 2: TILE(2); break;
                    case 3: TILE(3); break;
                    case 4: TILE(4); break;
#if MAX_ROWS == 8
                    case 5: TILE(5); break;
                    case 6: TILE(6); break;
                    case 7: TILE(7); break;
                    default: TILE(8); break;
#else
                    default: TILE(5); break;
#endif
                }
                store_block16(L->out, L->out_bf16, n, r0, rows, cb, f, L->bias);
#else
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < 16; c++) {
                        const uint8_t *wc = wb + b * k4 * 32 + (c % 8) * 4;
                        const int shift = c < 8 ? 0 : 4;
                        float f = 0.0f;
                        for (int64_t g = 0; g < groups; g++) {
                            int32_t acc = 0;
                            for (int64_t j = g * (GROUP / 4); j < (g + 1) * (GROUP / 4); j++)
                                for (int t = 0; t < 4; t++)
                                    acc += (int32_t)((wc[j * 32 + t] >> shift) & 15) * (int32_t)x[r * k + 4 * j + t];
                            const int64_t xi = (r0 + r) * groups + g;
                            f = f + (float)acc * (xs[xi] * from_fp16(dmb[g * 32 + c]));
                            f = f + sums[xi] * from_fp16(dmb[g * 32 + 16 + c]);
                        }
                        store_out(L->out, L->out_bf16, (r0 + r) * n + cb + c, f, L->bias, cb + c);
                    }
#endif
            }
        }
    }
}

/* y [m, n] = x W^T (+ bias), x given as sd_quantize_rows_q4's xq [m, k], xs and sums [m, k / GROUP]. */
void sd_linear_q4(const int8_t *xq, const float *xs, const float *sums, int64_t m, int64_t k, const uint8_t *w,
                  const uint16_t *dm, const float *bias, int64_t n, void *out, int out_bf16, int threads) {
    const q4_args args = {xq, xs, sums, m, k, w, dm, bias, n, out, out_bf16};
    run_parallel(q4_part, &args, threads);
}

/* Which W4A8 path this build runs: 2 the tile with VNNI's vpdpbusd, 1 the AVX2 tile, 0 the portable loop. */
int sd_q4_path(void) {
#ifdef Q4_VNNI
    return 2;
#elif defined(__AVX2__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}
