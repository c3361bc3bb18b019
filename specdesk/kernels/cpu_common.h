/* Shared by the CPU kernels (cpu_int8.c, cpu_attention*.c, cpu_fused.c, cpu_model.c): bf16 conversions, the
 * thread pool's entry point, the kernels' entry points and a fixed-arithmetic exp. */
#ifndef SPECDESK_CPU_COMMON_H
#define SPECDESK_CPU_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* float -> bfloat16 bits, round to nearest even (torch's .to(torch.bfloat16)); NaN stays NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

/* out[idx] = v (+ bias[n]), to bf16 or float32: the matmuls' epilogue (cpu_int8.c, cpu_q4.c). */
static inline void store_out(void *out, int out_bf16, int64_t idx, float v, const float *bias, int64_t n) {
    if (bias) v = v + bias[n];
    if (out_bf16)
        ((uint16_t *)out)[idx] = to_bf16(v);
    else
        ((float *)out)[idx] = v;
}

#ifdef __AVX2__
/* Rows r0 .. r0 + rows - 1 of out [., n] at the 16 columns from col, from two 8-lane sums per row (the AVX2
 * tiles of cpu_int8.c and cpu_q4.c), each through store_out. */
static inline void store_block16(void *out, int out_bf16, int64_t n, int64_t r0, int rows, int64_t col,
                                 __m256 (*f)[2], const float *bias) {
    for (int r = 0; r < rows; r++) {
        float v[16];
        _mm256_storeu_ps(v, f[r][0]);
        _mm256_storeu_ps(v + 8, f[r][1]);
        for (int c = 0; c < 16; c++) store_out(out, out_bf16, (r0 + r) * n + col + c, v[c], bias, col + c);
    }
}
#endif

/* A buffer of at least `bytes` (64-byte aligned) that lives as long as its owner's pointer and capacity (a
 * thread's, for the kernels' scratch: no allocation per call), grown when a larger pass comes; NULL if out of
 * memory. */
static inline void *scratch(void **buf, size_t *cap, size_t bytes) {
    if (bytes > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *cap = *buf ? bytes : 0;
    }
    return *buf;
}

/* fn(args, p, parts) for p in 0 .. parts - 1 on the pool's threads (cpu_int8.c); returns when all are done. */
typedef void (*task_fn)(const void *args, int64_t part, int64_t parts);
void run_parallel(task_fn fn, const void *args, int parts);

/* The kernels' entry points (cpu_int8.c, cpu_q4.c, cpu_fused.c, cpu_attention.c), which cpu_model.c chains. */
void sd_quantize_rows(const void *x, int x_bf16, int64_t m, int64_t k, uint8_t *xu, float *scales, int threads);
void sd_quantize_rows_q4(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *scales, float *sums,
                         int threads);
void sd_linear_q4(const int8_t *xq, const float *xs, const float *sums, int64_t m, int64_t k, const uint8_t *w,
                  const uint16_t *dm, const float *bias, int64_t n, void *out, int out_bf16, int threads);
void sd_linear(const uint8_t *xu, const float *xs, int64_t m, int64_t k, const int8_t *w, const int32_t *wsum,
               const float *ws, const float *bias, int64_t n, void *out, int out_bf16, int threads);
void sd_rms_norm(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, float eps, float multiplier,
                 int64_t m, int64_t n, uint16_t *out, uint16_t *res_out, int threads);
void sd_rotary(uint16_t *x, int64_t row_stride, const uint16_t *cos, const uint16_t *sin, int64_t t, int64_t heads,
               int64_t d);
void sd_silu_mul(const uint16_t *gate_up, int64_t t, int64_t inter, uint16_t *out, int threads);
int sd_paged_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int32_t *block_tables, const int32_t *seq_lens, const int32_t *query_start,
                       const uint8_t *tree_mask, int64_t width, int64_t num_seqs, int64_t num_tokens, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,
                       uint16_t *out, int threads);

#ifdef __AVX512F__
static inline __m512 load_bf16(const uint16_t *p) { /* 16 bf16 -> 16 float32, exactly */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* e^x for x in [-87, 88]: 2^n * p(r), r = x - n ln2, a degree-6 polynomial (about 2 ulp); fixed arithmetic. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 float32 -> 16 bf16 bits, round to nearest even with NaN kept (as to_bf16). */
static inline __m256i to_bf16_16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

static inline __m512 round16_bf16(__m512 v) { /* v rounded to the nearest bf16, as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(v)), 16));
}
#endif

/* 8-lane helpers: the AVX2 paths, and on AVX-512 builds the loops written once for 8 lanes (cpu_fused.c). */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 load8_bf16(const uint16_t *p) { /* 8 bf16 -> 8 float32, exactly */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 float32 -> bf16 bits in 32-bit lanes, round to nearest even with NaN kept (as to_bf16). */
static inline __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

static inline __m128i to_bf16_8(__m256 v) { /* 8 float32 -> 8 bf16, as to_bf16 */
    const __m256i r = bf16_bits8(v);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

static inline __m256 round8_bf16(__m256 v) { /* v rounded to the nearest bf16, as float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}

/* exp16 on 8 lanes (CPUs with AVX2 but not AVX-512): the same polynomial; 2^n built from the exponent bits (n in [-126, 127]
 * after the clamp, so the scaling is exact as scalef's). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
#endif
