/* The CPU sampler's pass over one row of logits (sampler._Nucleus, `specdesk.kernels.cpu_sampling`).
 *
 * A top-p row needs three things of the whole vocabulary: the maximum of its scaled logits, the normalizer of their
 * exponentials, and the few tokens near the maximum that can hold the nucleus. numpy made them in about ten
 * calls over a 49k row (~75 us); this is one call of two passes reading it (~35 us). */
#include <math.h>

#include "cpu_common.h"

/* s_i = z_i / t (float32 division, as filter_logits), top = max s, *total = sum of e^(s_i - top) over every i (each
 * exponential in float32, summed in double), and the candidates: the indices i with s_i >= top - span, ascending,
 * into idx (room for n). Returns the number of candidates, or -1 where the row holds a NaN or top or the total is
 * not finite (it cannot be sampled). The exponentials are exp8's polynomial (about 2 ulp; a scaled logit more than 87 below the maximum
 * counts as e^-87, which no sum of 10^6 such terms can move); without AVX2, libm's expf. */
int64_t sd_nucleus_scan(const float *z, int64_t n, float t, float span, int32_t *idx, float *top_out,
                        double *total_out) {
    /* Pass 1, the maximum: max(z) / t is max(z / t) (correctly rounded division by t > 0 keeps the order), one
     * division instead of n. */
    float zmax = -INFINITY;
    int64_t i = 0;
    int nan = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(z + i);
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) zmax = lanes[l] > zmax ? lanes[l] : zmax;
#endif
    for (; i < n; i++) {
        nan |= z[i] != z[i];
        zmax = z[i] > zmax ? z[i] : zmax;
    }
    const float top = zmax / t;
    if (nan || !isfinite(top)) return -1;
    const float floor = top - span;
    double total = 0.0;
    int64_t count = 0;
    i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vt = _mm256_set1_ps(t), vtop = _mm256_set1_ps(top), vfloor = _mm256_set1_ps(floor);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        const __m256 s = _mm256_div_ps(_mm256_loadu_ps(z + i), vt);
        const __m256 e = exp8(_mm256_sub_ps(s, vtop));
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(s, vfloor, _CMP_GE_OQ));
        for (; mask; mask &= mask - 1, count++) /* rare: the few tokens near the maximum */
            idx[count] = (int32_t)(i + __builtin_ctz(mask));
    }
    double sums[4];
    _mm256_storeu_pd(sums, _mm256_add_pd(acc0, acc1));
    total = (sums[0] + sums[1]) + (sums[2] + sums[3]);
#endif
    for (; i < n; i++) {
        const float s = z[i] / t, e = expf(s - top);
        total += e;
        if (s >= floor) idx[count++] = (int32_t)i;
    }
    *top_out = top;
    *total_out = total;
    return isfinite(total) ? count : -1;
}
