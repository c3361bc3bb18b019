/* The small ops of a decoder layer in bf16 for the CPU path, one call each instead of 3 to 9 torch ops: the
 * residual add with RMSNorm, the rotary embedding, SwiGLU's activation. Torch twins: `specdesk.kernels.reference`
 * (rms_norm, rotary, silu_and_mul), which they follow op for op in float32 with the same bf16 roundings
 * between ops; reductions and exp differ in their last bits, so results agree to a bf16 rounding.
 *
 * Why: at batch 1 a 135M model's layer spends about as long dispatching those ~25 small torch ops (a few
 * microseconds each) as its int8 matmuls take. Every row is computed alone and every element by the same code
 * whatever the number of rows, so a token's result does not depend on the others in the pass (speculation
 * stays exact).
 */
#include <math.h>
#include <stdint.h>

#include "cpu_common.h"

typedef struct {
    const uint16_t *x, *residual, *weight;
    float eps, multiplier;
    int64_t m, n;
    uint16_t *out, *res_out;
} norm_args;

static void norm_part(const void *a, int64_t part, int64_t parts) {
    const norm_args *A = a;
    const int64_t n = A->n;
    for (int64_t r = A->m * part / parts; r < A->m * (part + 1) / parts; r++) {
        const uint16_t *xr = A->x + r * n;
        uint16_t *sr = A->res_out + r * n;
        float part16[16] = {0};
        int64_t i = 0;
/* On AVX-512 builds too (norm_part was scalar there): the same bits as the scalar loop. */
#if defined(__AVX2__) && defined(__FMA__)
        /* The loop below 16 at a time: part16's lanes are two registers, each element's roundings the same. */
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; i + 16 <= n; i += 16)
            for (int h = 0; h < 2; h++) {
                __m256 s = load8_bf16(xr + i + 8 * h);
                if (A->residual) {
                    if (A->multiplier != 1.0f) s = round8_bf16(_mm256_mul_ps(s, _mm256_set1_ps(A->multiplier)));
                    s = round8_bf16(_mm256_add_ps(load8_bf16(A->residual + r * n + i + 8 * h), s));
                }
                _mm_storeu_si128((__m128i *)(sr + i + 8 * h), to_bf16_8(s));
                acc[h] = _mm256_add_ps(acc[h], _mm256_mul_ps(s, s));
            }
        _mm256_storeu_ps(part16, acc[0]);
        _mm256_storeu_ps(part16 + 8, acc[1]);
#endif
        for (; i < n; i++) {
            float s = from_bf16(xr[i]);
            if (A->residual) {
                if (A->multiplier != 1.0f) s = round_bf16(s * A->multiplier);
                s = round_bf16(from_bf16(A->residual[r * n + i]) + s);
            }
            sr[i] = to_bf16(s);
            part16[i % 16] += s * s;
        }
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += part16[l];
        const float inv = 1.0f / sqrtf(sum / (float)n + A->eps);
        i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= n; i += 8) {
            const __m256 h = round8_bf16(_mm256_mul_ps(load8_bf16(sr + i), _mm256_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(A->out + r * n + i), to_bf16_8(_mm256_mul_ps(load8_bf16(A->weight + i), h)));
        }
#endif
        for (; i < n; i++) {
            const float h = round_bf16(from_bf16(sr[i]) * inv);
            A->out[r * n + i] = to_bf16(from_bf16(A->weight[i]) * h);
        }
    }
}

/* s = residual + x * multiplier (or x), rounded to bf16 into res_out; out = weight * bf16(s * rsqrt(mean(s^2)
 * + eps)). x, residual, res_out, out: [m, n] bf16 (residual may be NULL; res_out may alias residual). */
void sd_rms_norm(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, float eps, float multiplier,
                 int64_t m, int64_t n, uint16_t *out, uint16_t *res_out, int threads) {
    const norm_args args = {x, residual, weight, eps, multiplier, m, n, out, res_out};
    run_parallel(norm_part, &args, m >= 8 ? threads : 1);
}

/* x [t, heads, d] bf16 (rows row_stride apart, heads contiguous) rotated in place by cos, sin [t, d / 2]
 * (bf16): rotate-half layout, each product and sum rounded to bf16 as the twin's bf16 torch ops do. */
void sd_rotary(uint16_t *x, int64_t row_stride, const uint16_t *cos, const uint16_t *sin, int64_t t, int64_t heads,
               int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < t; i++)
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + i * row_stride + h * d;
            int64_t e = 0;
#if defined(__AVX2__) && defined(__FMA__)
            for (; e + 8 <= half; e += 8) { /* the loop below 8 at a time, the same roundings */
                const __m256 c = load8_bf16(cos + i * half + e), s = load8_bf16(sin + i * half + e);
                const __m256 x1 = load8_bf16(v + e), x2 = load8_bf16(v + e + half);
                const __m256 y1 = _mm256_sub_ps(round8_bf16(_mm256_mul_ps(x1, c)), round8_bf16(_mm256_mul_ps(x2, s)));
                const __m256 y2 = _mm256_add_ps(round8_bf16(_mm256_mul_ps(x2, c)), round8_bf16(_mm256_mul_ps(x1, s)));
                _mm_storeu_si128((__m128i *)(v + e), to_bf16_8(y1));
                _mm_storeu_si128((__m128i *)(v + e + half), to_bf16_8(y2));
            }
#endif
            for (; e < half; e++) {
                const float c = from_bf16(cos[i * half + e]), s = from_bf16(sin[i * half + e]);
                const float x1 = from_bf16(v[e]), x2 = from_bf16(v[e + half]);
                v[e] = to_bf16(round_bf16(x1 * c) - round_bf16(x2 * s));
                v[e + half] = to_bf16(round_bf16(x2 * c) + round_bf16(x1 * s));
            }
        }
}

typedef struct {
    const uint16_t *gate_up;
    int64_t t, inter;
    uint16_t *out;
} silu_args;

static void silu_part(const void *a, int64_t part, int64_t parts) {
    const silu_args *A = a;
    const int64_t inter = A->inter;
    for (int64_t i = A->t * part / parts; i < A->t * (part + 1) / parts; i++) {
        const uint16_t *g = A->gate_up + i * 2 * inter, *u = g + inter;
        uint16_t *o = A->out + i * inter;
        int64_t e = 0;
#ifdef __AVX512F__
        for (; e + 16 <= inter; e += 16) {
            const __m512 gv = load_bf16(g + e);
            const __m512 act = round16_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                            exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
            _mm256_storeu_si256((__m256i *)(o + e), to_bf16_16(_mm512_mul_ps(act, load_bf16(u + e))));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        for (; e + 8 <= inter; e += 8) { /* the AVX-512 loop on 8 lanes (exp8 is exp16's arithmetic) */
            const __m256 gv = load8_bf16(g + e);
            const __m256 act = round8_bf16(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                                           exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)))));
            _mm_storeu_si128((__m128i *)(o + e), to_bf16_8(_mm256_mul_ps(act, load8_bf16(u + e))));
        }
#endif
        for (; e < inter; e++) {
            const float gf = from_bf16(g[e]);
            o[e] = to_bf16(round_bf16(gf / (1.0f + expf(-gf))) * from_bf16(u[e]));
        }
    }
}

/* out [t, inter] = silu(gate) * up for gate_up [t, 2 * inter] = [gate | up], bf16. */
void sd_silu_mul(const uint16_t *gate_up, int64_t t, int64_t inter, uint16_t *out, int threads) {
    const silu_args args = {gate_up, t, inter, out};
    run_parallel(silu_part, &args, t >= 8 ? threads : 1);
}

/* erf(x), Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7): sign(x) * (1 - t * poly(t) * exp(-x^2)), t = 1 / (1 +
 * p |x|), on 16 or 8 lanes (libm's erff for a row's tail); one arithmetic per build, lane for lane. */
#define ERF_P 0.3275911f
static const float ERF_POLY[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}; /* a5..a1 */

/* out[r] = GELU(w * (x[r] / sqrt(mean(x[r]^2) + eps)) + b) with GELU(y) = y / 2 * (1 + erf(y / sqrt(2))), float32
 * rows [rows, d]: the MLP speculator's norm and activation on the CPU int8 path (`MLPSpeculator.norm_act`), one
 * call where torch ran 8 ops. Each row alone, so a row's numbers never depend on the others. */
void sd_norm_gelu(const float *x, int64_t rows, int64_t d, const float *w, const float *b, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d, part[16] = {0}, sum = 0.0f;
        for (int64_t i = 0; i < d; i++) part[i % 16] += xr[i] * xr[i];
        for (int l = 0; l < 16; l++) sum += part[l];
        const float inv = 1.0f / sqrtf(sum / (float)d + eps);
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), root = _mm512_set1_ps(0.70710678f);
        for (; i + 16 <= d; i += 16) {
            const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(w + i),
                                                         _mm512_mul_ps(_mm512_loadu_ps(xr + i), _mm512_set1_ps(inv))),
                                           _mm512_loadu_ps(b + i));
            const __m512 z = _mm512_mul_ps(y, root), az = _mm512_abs_ps(z);
            const __m512 t = _mm512_div_ps(one, _mm512_add_ps(one, _mm512_mul_ps(_mm512_set1_ps(ERF_P), az)));
            __m512 poly = _mm512_setzero_ps(); /* 0 * t + a5 is a5: Horner's steps from the top */
            for (int c = 0; c < 5; c++) poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(ERF_POLY[c]));
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az)));
            __m512 erf = _mm512_sub_ps(one, _mm512_mul_ps(_mm512_mul_ps(poly, t), e));
            erf = _mm512_mask_sub_ps(erf, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), erf);
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(half, y), _mm512_add_ps(one, erf)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), root = _mm256_set1_ps(0.70710678f);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; i + 8 <= d; i += 8) {
            const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i),
                                                         _mm256_mul_ps(_mm256_loadu_ps(xr + i), _mm256_set1_ps(inv))),
                                           _mm256_loadu_ps(b + i));
            const __m256 z = _mm256_mul_ps(y, root), az = _mm256_andnot_ps(sign, z);
            const __m256 t = _mm256_div_ps(one, _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(ERF_P), az)));
            __m256 poly = _mm256_setzero_ps(); /* 0 * t + a5 is a5: Horner's steps from the top */
            for (int c = 0; c < 5; c++) poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(ERF_POLY[c]));
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(az, az)));
            const __m256 erf = _mm256_or_ps(_mm256_and_ps(sign, z), _mm256_sub_ps(one, _mm256_mul_ps(_mm256_mul_ps(poly, t), e)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(half, y), _mm256_add_ps(one, erf)));
        }
#endif
        for (; i < d; i++) {
            const float y = w[i] * (xr[i] * inv) + b[i];
            o[i] = 0.5f * y * (1.0f + erff(y * 0.70710678f));
        }
    }
}
