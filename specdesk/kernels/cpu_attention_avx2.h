/* The AVX2 arithmetic of the CPU attention (CPUs with AVX2 and FMA but not AVX-512): what both AVX2 paths of
 * cpu_attention.c (one task per query) and cpu_attention_avx2.c (tasks of queries) compute per query, so that the
 * two give the same bits. */
#ifndef SPECDESK_CPU_ATTENTION_AVX2_H
#define SPECDESK_CPU_ATTENTION_AVX2_H
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_attention.h" /* SEGMENT, join_segment */
#include "cpu_common.h" /* load8_bf16, exp8 */

static inline float hsum8(__m256 v) { /* ((0+4) + (2+6)) + ((1+5) + (3+7)): one fixed order */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* hsum8 of four vectors at once, each summed in hsum8's order: lanes i + (i + 4) first, then the 4 x 4
 * transpose puts each vector's four pair sums in one column, joined as ((0+4) + (2+6)) + ((1+5) + (3+7)). */
static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 t1 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 t2 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    __m128 t3 = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
    _MM_TRANSPOSE4_PS(t0, t1, t2, t3); /* t0 = the vectors' lanes 0+4, t1: 1+5, t2: 2+6, t3: 3+7 */
    return _mm_add_ps(_mm_add_ps(t0, t2), _mm_add_ps(t1, t3));
}


/* hsum8x4 of eight vectors, each summed in hsum8's order, into 8 lanes (v[i]'s sum in lane i): the pairs
 * i + (i + 4) of two vectors at once (one 256-bit add for v[r] and v[r + 4]), then one 4 x 4 transpose per
 * 128-bit half and the same ((0+4) + (2+6)) + ((1+5) + (3+7)) joins. Half hsum8x4's shuffles and adds for the
 * same bits: the lane sums took about a quarter of a tree's attention (perf, 1 thread, a tree of 11). */
static inline __m256 hsum8x8(const __m256 *v) {
    __m256 t[4];
    for (int r = 0; r < 4; r++) /* [v_r's lanes j + (j + 4) | v_(r+4)'s], j = 0..3 */
        t[r] = _mm256_add_ps(_mm256_permute2f128_ps(v[r], v[r + 4], 0x20), _mm256_permute2f128_ps(v[r], v[r + 4], 0x31));
    const __m256 a = _mm256_unpacklo_ps(t[0], t[1]), b = _mm256_unpackhi_ps(t[0], t[1]);
    const __m256 c = _mm256_unpacklo_ps(t[2], t[3]), d = _mm256_unpackhi_ps(t[2], t[3]);
    /* per half: p0 holds the four vectors' pair sums j = 0, p1: j = 1, p2: j = 2, p3: j = 3 */
    const __m256 p0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
    const __m256 p1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
    const __m256 p2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
    const __m256 p3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
    return _mm256_add_ps(_mm256_add_ps(p0, p2), _mm256_add_ps(p1, p3));
}

/* The largest of scores[0 .. n) (-inf for none), by lanes of 8: a max is exact in any order. */
static inline float max8(const float *scores, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(_mm256_loadu_ps(scores + j), m); /* a NaN score is skipped, as fmaxf does */
    float lanes[8], max = -INFINITY;
    _mm256_storeu_ps(lanes, m);
    for (int i = 0; i < 8; i++) max = lanes[i] > max ? lanes[i] : max;
    for (; j < n; j++) max = scores[j] > max ? scores[j] : max;
    return max;
}

/* scores[0 .. n) -> exp(score - max) in place; returns their sum, added in 8 lanes by list index and then
 * across lanes (both AVX2 paths call this, so their softmax is one arithmetic). */
static float softmax8(float *scores, int64_t n, float max) {
    __m256 sums = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(max)));
        _mm256_storeu_ps(scores + j, p);
        sums = _mm256_add_ps(sums, p);
    }
    if (j < n) { /* the tail through a padded copy: lanes past n add 0 */
        float tail[8] = {0};
        for (int64_t t = j; t < n; t++) tail[t - j] = scores[t] - max;
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        for (int64_t t = n - j; t < 8; t++) tail[t] = 0.0f;
        for (int64_t t = j; t < n; t++) scores[t] = tail[t - j];
        sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail));
    }
    return hsum8(sums);
}

#endif
#endif
