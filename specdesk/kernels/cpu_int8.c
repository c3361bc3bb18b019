/* W8A8 linear for the CPU: int8 weights times int8 activations, both with one scale per group of 32 inputs
 * (as llama.cpp's Q8_0; per-channel and per-token scales lost 9 points of top-1 agreement with float32 on the
 * default model, whose GGUF weights have a scale per 32 anyway), each group's sum exact in int32. The torch
 * twin is `specdesk.kernels.cpu_int8.linear_reference`; `cpu_lib.py` compiles the C files once per machine with
 * -march=native, and `cpu_int8.py` calls this one by ctypes.
 *
 * Why this shape of kernel: a decode step of a small model on a CPU reads every weight once for a handful of
 * tokens (1 plain, ~10 when verifying a draft tree). Weights are packed so that one AVX-512 VNNI instruction
 * multiplies 4 inputs of one token into 16 output channels (layout [N/16][K/4][16][4]); a block of channels
 * stays in L1 while every token of the pass is multiplied by it, so a 13-token verification reads the weights
 * from memory once, as a 1-token step does (CPUs with AVX2 but not VNNI: `tile8`, 4 instructions per 32
 * products instead of 1 per 64, the same integers). A group's integer sum does not depend on the order it is added in
 * and the groups join one float sum in a fixed order, so the result of a row never depends on which other rows
 * share the pass (speculation stays exact) nor on whether the vector or the scalar path ran.
 *
 * Threads: the pool of cpu_pool.c.
 *
 * Activations enter as unsigned bytes (q + 128, VNNI multiplies unsigned by signed); the kernel subtracts
 * 128 * sum(w[n, group]) per channel and group afterwards. No floating-point contraction (-ffp-contract=off):
 * every multiply and add rounds as torch's separate ones in the twin do.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

#define GROUP 32 /* inputs per quantization group, of weights and of activations alike */
/* Bytes ahead of the weight stream that the tiles prefetch: the hardware prefetcher alone left a one-token pass
 * reading weights at about two thirds of what a plain read of memory reaches (benchmarks.linear_ab --against; 1024
 * ran best of 1, 2 and 4 KiB on the 2-core Zen 2). A prefetch changes no result. */
#ifndef WEIGHT_PREFETCH
#define WEIGHT_PREFETCH 1024
#endif
#define MAX_ROWS 6 /* tokens a tile multiplies by one load of weights: 2 x MAX_ROWS int32 + as many float sums */

/* ------------------------------------------------------------------------------------------ kernels */

typedef struct {
    const void *x;
    int x_bf16;
    int64_t m, k;
    uint8_t *xu;
    float *scales;
    float *sums; /* NULL, or scale * sum(q) per group, and then xu holds q itself (cpu_q4.c's operands) */
} quantize_args;

/* Symmetric int8 quantization of rows [m * part / parts, m * (part + 1) / parts) of x, group by group. */
static void quantize_part(const void *a, int64_t part, int64_t parts) {
    const quantize_args *q = a;
    const int64_t k = q->k, groups = k / GROUP;
    for (int64_t r = q->m * part / parts; r < q->m * (part + 1) / parts; r++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t base = r * k + g * GROUP;
#ifdef __AVX512F__
            /* The same numbers as the loop below, 16 at a time (a verification pass quantizes ~100k inputs). */
            __m512 v[2];
            for (int h = 0; h < 2; h++)
                v[h] = q->x_bf16 ? load_bf16((const uint16_t *)q->x + base + 16 * h)
                                 : _mm512_loadu_ps((const float *)q->x + base + 16 * h);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            const float scale = amax / 127.0f;
            q->scales[r * groups + g] = scale;
            int32_t isum = 0;
            for (int h = 0; h < 2; h++) {
                __m512i q8 = _mm512_setzero_si512();
                if (scale > 0.0f) {
                    const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v[h], _mm512_set1_ps(scale)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    const __m512 c = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
                    q8 = _mm512_cvtps_epi32(c);
                }
                if (q->sums) isum += _mm512_reduce_add_epi32(q8);
                _mm_storeu_si128((__m128i *)(q->xu + base + 16 * h),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(q8, _mm512_set1_epi32(q->sums ? 0 : 128))));
            }
            if (q->sums) q->sums[r * groups + g] = scale * (float)isum;
#elif defined(__AVX2__)
            /* The loop below 8 at a time (a prefill chunk quantizes millions of inputs). */
            __m256 v[4], m = _mm256_setzero_ps();
            const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (int h = 0; h < 4; h++) {
                v[h] = q->x_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                       _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)q->x + base + 8 * h))), 16))
                                 : _mm256_loadu_ps((const float *)q->x + base + 8 * h);
                m = _mm256_max_ps(m, _mm256_and_ps(v[h], abs_mask));
            }
            float lanes[8], amax = 0.0f;
            _mm256_storeu_ps(lanes, m);
            for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
            const float scale = amax / 127.0f;
            q->scales[r * groups + g] = scale;
            __m256i q8[4];
            for (int h = 0; h < 4; h++) {
                q8[h] = _mm256_setzero_si256();
                if (scale > 0.0f) {
                    const __m256 t = _mm256_round_ps(_mm256_div_ps(v[h], _mm256_set1_ps(scale)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    const __m256 c = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
                    q8[h] = _mm256_cvtps_epi32(c);
                }
            }
            /* 32 int32 in [-127, 127] -> bytes (the packs interleave 128-bit lanes; the permute restores the
             * order), + 128 as a flip of the top bit. */
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q8[0], q8[1]), _mm256_packs_epi32(q8[2], q8[3]));
            const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            if (q->sums) {
                const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q8[0], q8[1]), _mm256_add_epi32(q8[2], q8[3]));
                int32_t s8[8], isum = 0;
                _mm256_storeu_si256((__m256i *)s8, s4);
                for (int i = 0; i < 8; i++) isum += s8[i];
                q->sums[r * groups + g] = scale * (float)isum;
                _mm256_storeu_si256((__m256i *)(q->xu + base), ordered);
            } else {
                _mm256_storeu_si256((__m256i *)(q->xu + base), _mm256_xor_si256(ordered, _mm256_set1_epi8((char)0x80)));
            }
#else
            float amax = 0.0f, v[GROUP];
            for (int i = 0; i < GROUP; i++) {
                v[i] = q->x_bf16 ? from_bf16(((const uint16_t *)q->x)[base + i]) : ((const float *)q->x)[base + i];
                amax = fmaxf(amax, fabsf(v[i]));
            }
            const float scale = amax / 127.0f;
            q->scales[r * groups + g] = scale;
            int32_t isum = 0;
            for (int i = 0; i < GROUP; i++) {
                float v8 = scale > 0.0f ? nearbyintf(v[i] / scale) : 0.0f;
                v8 = fminf(fmaxf(v8, -127.0f), 127.0f);
                isum += (int)v8;
                q->xu[base + i] = (uint8_t)((int)v8 + (q->sums ? 0 : 128));
            }
            if (q->sums) q->sums[r * groups + g] = scale * (float)isum;
#endif
        }
}

/* Symmetric int8 quantization of x [m, k] (bf16 if x_bf16, else float32) in groups of GROUP inputs: scale =
 * max|x| / 127 of the group, q = round-half-even(x / scale) (0 for an all-zero group), stored as q + 128 in
 * xu [m, k], scales [m, k / GROUP]. */
void sd_quantize_rows(const void *x, int x_bf16, int64_t m, int64_t k, uint8_t *xu, float *scales, int threads) {
    const quantize_args args = {x, x_bf16, m, k, xu, scales, NULL};
    run_parallel(quantize_part, &args, m >= 16 ? threads : 1);
}

/* The same quantization for the W4A8 kernel (cpu_q4.c): q itself in xq (signed bytes), and per group
 * sums [m, k / GROUP] = scale * sum(q) in float32 (the Q4_1 minimum's term). */
void sd_quantize_rows_q4(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *scales, float *sums,
                         int threads) {
    const quantize_args args = {x, x_bf16, m, k, (uint8_t *)xq, scales, sums};
    run_parallel(quantize_part, &args, m >= 16 ? threads : 1);
}

#ifdef __AVX512VNNI__
/* R tokens x B blocks of 16 channels: R * B int32 accumulators in registers for one group of GROUP inputs
 * (one weight load per block and one broadcast per token for every 4 inputs), then each group's sum joins a
 * float sum: f += float(acc - 128 * wsum) * (xs * ws). R and B are constants at each call site. */
static inline __attribute__((always_inline)) void tile(const uint8_t *x, int64_t k, const int8_t *wb, int64_t k4,
                                                       const float *xs, const int32_t *wsum, const float *ws,
                                                       int64_t n, const int R, const int B, __m512 f[MAX_ROWS][2]) {
    const int64_t groups = k / GROUP;
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) f[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i a[MAX_ROWS][2];
        for (int r = 0; r < R; r++)
            for (int b = 0; b < B; b++) a[r][b] = _mm512_setzero_si512();
        for (int64_t j = g * (GROUP / 4); j < (g + 1) * (GROUP / 4); j++) {
            __m512i wv[2];
            for (int b = 0; b < B; b++) wv[b] = _mm512_loadu_si512((const void *)(wb + (b * k4 + j) * 64));
            for (int r = 0; r < R; r++) {
                int32_t v;
                memcpy(&v, x + r * k + 4 * j, 4);
                const __m512i xv = _mm512_set1_epi32(v);
                for (int b = 0; b < B; b++) a[r][b] = _mm512_dpbusd_epi32(a[r][b], xv, wv[b]);
            }
        }
        for (int b = 0; b < B; b++) {
            const __m512 wsv = _mm512_loadu_ps(ws + g * n + b * 16);
            const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(wsum + g * n + b * 16)), 7);
            for (int r = 0; r < R; r++) {
                const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[r * groups + g]), wsv);
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][b], offset)), scale);
                f[r][b] = _mm512_add_ps(f[r][b], t);
            }
        }
    }
}

/* store_out() for 16 channels of one token: plus the bias, then bf16 by round-to-nearest-even (as to_bf16). */
static inline void store16(void *out, int out_bf16, int64_t idx, __m512 v, const float *bias) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if (!out_bf16) {
        _mm512_storeu_ps((float *)out + idx, v);
        return;
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + idx), to_bf16_16(v));
}

#define TILE(R, B) tile(x, k, wb, k4, xs + r0 * groups, wsum + col, ws + col, n, R, B, f)
#define TILE_ROWS(B)                  \
    switch (rows) {                   \
        case 1: TILE(1, B); break;    \
        case 2: TILE(2, B); break;    \
        case 3: TILE(3, B); break;    \
        case 4: TILE(4, B); break;    \
        case 5: TILE(5, B); break;    \
        default: TILE(6, B); break;   \
    }
#elif defined(__AVX2__)
/* AVX2 without VNNI (most laptop CPUs before AVX-512): one 16-channel block, R tokens, two registers of 8
 * channels each. Per 4 inputs of a token: vpmaddubsw multiplies |q_x| (unsigned) by the weights with q_x's sign
 * (vpsignb), adding pairs into int16, and vpmaddwd by 1 adds the pairs into int32. Both factors lie in
 * [-127, 127], so a pair is at most 2 * 127 * 127 = 32258 and never saturates: each group's integer sum is
 * exactly the VNNI path's acc - 128 * wsum, and the float sum over groups repeats its operations in order. */
static inline __attribute__((always_inline)) void tile8(const uint8_t *x, int64_t k, const int8_t *wb,
                                                        const float *xs, const float *ws, int64_t n, const int R,
                                                        __m256 f[MAX_ROWS][2]) {
    const int64_t groups = k / GROUP;
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    for (int r = 0; r < R; r++) f[r][0] = f[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i a[MAX_ROWS][2];
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        for (int64_t j = g * (GROUP / 4); j < (g + 1) * (GROUP / 4); j++) {
            _mm_prefetch((const char *)(wb + j * 64 + WEIGHT_PREFETCH), _MM_HINT_T0);
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + j * 64));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + j * 64 + 32));
            for (int r = 0; r < R; r++) {
                int32_t v;
                memcpy(&v, x + r * k + 4 * j, 4);
                const __m256i xv = _mm256_xor_si256(_mm256_set1_epi32(v), flip); /* q_x as signed bytes */
                const __m256i ax = _mm256_sign_epi8(xv, xv);
                a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)), ones));
                a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)), ones));
                /* Emits nothing: pins the token's sums to registers after its step (as cpu_q4.c), where GCC
                 * otherwise kept five of them on the stack; 1.08x at 64-512 tokens (benchmarks.linear_ab). */
                __asm__("" : "+x"(a[r][0]), "+x"(a[r][1]));
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 wsv = _mm256_loadu_ps(ws + g * n + h * 8);
            for (int r = 0; r < R; r++) {
                const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(xs[r * groups + g]), wsv);
                f[r][h] = _mm256_add_ps(f[r][h], _mm256_mul_ps(_mm256_cvtepi32_ps(a[r][h]), scale));
            }
        }
    }
}

#define TILE8(R) tile8(x, k, wb + b * k4 * 64, xs + r0 * groups, ws + col + b * 16, n, R, f)
#endif

/* y [m, n] = x [m, k] W^T with W packed [n/16][k/4][16][4] (see cpu_int8.py); per group g of GROUP inputs,
 * ws [k / GROUP, n] the weights' scales and wsum [k / GROUP, n] their sums, xs [m, k / GROUP] the tokens'.
 * Parts split the output channels in pairs of 16-channel blocks; each pair stays in L1 while every
 * token of the pass, up to MAX_ROWS at a time, is multiplied by it. */
typedef struct {
    const uint8_t *xu;
    const float *xs;
    int64_t m, k;
    const int8_t *w;
    const int32_t *wsum;
    const float *ws, *bias;
    int64_t n;
    void *out;
    int out_bf16;
} linear_args;

static void linear_part(const void *a, int64_t part, int64_t parts) {
    const linear_args *L = a;
    const uint8_t *xu = L->xu;
    const float *xs = L->xs, *ws = L->ws, *bias = L->bias;
    const int8_t *w = L->w;
    const int32_t *wsum = L->wsum;
    const int64_t m = L->m, k = L->k, n = L->n;
    void *out = L->out;
    const int out_bf16 = L->out_bf16;
    const int64_t nblocks = n / 16, k4 = k / 4, pairs = (nblocks + 1) / 2, groups = k / GROUP;
    for (int64_t p = pairs * part / parts; p < pairs * (part + 1) / parts; p++) {
        const int64_t nb = 2 * p, col = nb * 16;
        const int blocks = nb + 1 < nblocks ? 2 : 1;
        const int8_t *wb = w + nb * k4 * 64;
#if defined(__AVX2__) && !defined(__AVX512VNNI__)
        /* The scales of the pair after next: a group's scales lie n floats apart, one stream per group (18 for
         * the default model's LM head), more than the hardware prefetcher follows beside the weights. */
        if (p + 2 < pairs)
            for (int64_t g = 0; g < groups; g++)
                for (int64_t c = 0; c < 32; c += 16) _mm_prefetch((const char *)(ws + g * n + col + 64 + c), _MM_HINT_T0);
#endif
        /* Tiles of at most MAX_ROWS tokens, as even as they come (5 tokens: one tile of 5, not 4 + 1). */
        const int64_t tiles = (m + MAX_ROWS - 1) / MAX_ROWS;
        for (int64_t ti = 0, r0 = 0; ti < tiles; ti++, r0 = m * ti / tiles) {
            const int rows = (int)(m * (ti + 1) / tiles - r0);
            const uint8_t *x = xu + r0 * k;
#ifdef __AVX512VNNI__
            __m512 f[MAX_ROWS][2];
            if (blocks == 2) {
                TILE_ROWS(2)
            } else {
                TILE_ROWS(1)
            }
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < blocks; b++)
                    store16(out, out_bf16, (r0 + r) * n + col + b * 16, f[r][b], bias ? bias + col + b * 16 : NULL);
#elif defined(__AVX2__)
            (void)wsum; /* the AVX2 sums are signed already: no offset to take off */
            for (int b = 0; b < blocks; b++) {
                __m256 f[MAX_ROWS][2];
                switch (rows) {
                    case 1: TILE8(1); break;
                    case 2: TILE8(2); break;
                    case 3: TILE8(3); break;
                    case 4: TILE8(4); break;
                    case 5: TILE8(5); break;
                    default: TILE8(6); break;
                }
                store_block16(out, out_bf16, n, r0, rows, col + b * 16, f, bias);
            }
#else
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < blocks; b++)
                    for (int c = 0; c < 16; c++) {
                        const int64_t ch = col + b * 16 + c;
                        float f = 0.0f;
                        for (int64_t g = 0; g < groups; g++) {
                            int32_t acc = 0;
                            for (int64_t j = g * (GROUP / 4); j < (g + 1) * (GROUP / 4); j++)
                                for (int t = 0; t < 4; t++)
                                    acc += (int32_t)x[r * k + 4 * j + t] * (int32_t)wb[(b * k4 + j) * 64 + c * 4 + t];
                            const float scale = xs[(r0 + r) * groups + g] * ws[g * n + ch];
                            f = f + (float)(acc - 128 * wsum[g * n + ch]) * scale;
                        }
                        store_out(out, out_bf16, (r0 + r) * n + ch, f, bias, ch);
                    }
#endif
        }
    }
}

void sd_linear(const uint8_t *xu, const float *xs, int64_t m, int64_t k, const int8_t *w, const int32_t *wsum,
               const float *ws, const float *bias, int64_t n, void *out, int out_bf16, int threads) {
    const linear_args args = {xu, xs, m, k, w, wsum, ws, bias, n, out, out_bf16};
    run_parallel(linear_part, &args, threads);
}

/* 1 when this build has the VNNI path (so a caller can say which path it measured). */
int sd_has_vnni(void) {
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

/* Which matmul path this build runs: 2 AVX-512 VNNI, 1 AVX2, 0 portable C. */
int sd_int8_path(void) {
#if defined(__AVX512VNNI__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
