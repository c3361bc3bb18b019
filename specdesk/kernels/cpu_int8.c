/* W8A8 linear for the CPU: int8 weights times int8 activations, both with one scale per group of 32 inputs
 * (as llama.cpp's Q8_0; per-channel and per-token scales lost 9 points of top-1 agreement with float32 on the
 * default model, whose GGUF weights have a scale per 32 anyway), each group's sum exact in int32. The torch twin is `specdesk.kernels.cpu_int8.linear_reference`; the
 * Python side (`cpu_int8.py`) compiles this file once per machine with -march=native and calls it by ctypes.
 *
 * Why this shape of kernel: a decode step of a small model on a CPU reads every weight once for a handful of
 * tokens (1 plain, ~10 when verifying a draft tree). Weights are packed so that one AVX-512 VNNI instruction
 * multiplies 4 inputs of one token into 16 output channels (layout [N/16][K/4][16][4]); a block of channels
 * stays in L1 while every token of the pass is multiplied by it, so a 13-token verification reads the weights
 * from memory once, as a 1-token step does. A group's integer sum does not depend on the order it is added in
 * and the groups join one float sum in a fixed order, so the result of a row never depends on which other rows
 * share the pass (speculation stays exact) nor on whether the vector or the scalar path ran.
 *
 * Threads: a small pool of our own (below), not OpenMP. libgomp throttles its workers to a few spins and then
 * sleeps them whenever it manages more threads than there are CPUs, which is always the case when the calls
 * come from a thread other than the process's first (the engine's loop thread): every parallel region then
 * pays a futex wake-up, and a decode step has 120 of them (measured: a 3072x576 linear took 2.2x as long in
 * a second thread as in the main one).
 *
 * Activations enter as unsigned bytes (q + 128, VNNI multiplies unsigned by signed); the kernel subtracts
 * 128 * sum(w[n, group]) per channel and group afterwards. No floating-point contraction (-ffp-contract=off):
 * every multiply and add rounds as torch's separate ones in the twin do.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "cpu_common.h"

/* ------------------------------------------------------------------------------------------ thread pool */

#define GROUP 32 /* inputs per quantization group, of weights and of activations alike */
#define MAX_ROWS 6 /* tokens a tile multiplies by one load of weights: 2 x MAX_ROWS int32 + as many float sums */
#define MAX_WORKERS 255
#define SPIN_NS 200000 /* a worker spins this long for the next call before it sleeps (a step's gaps are shorter) */

static struct {
    pthread_mutex_t mu, call_mu;
    pthread_cond_t cv;
    atomic_long generation;
    atomic_int pending;
    task_fn fn;
    const void *args;
    int parts, workers;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *worker(void *arg) {
    /* The id (1 .. workers; the caller is part 0) is the low byte, the generation current when the worker was
     * created the rest: a worker that starts late still takes part in the call that created it. */
    const int id = (int)((intptr_t)arg & 0xff);
    long seen = (long)((intptr_t)arg >> 8);
    for (;;) {
        long g;
        const int64_t until = now_ns() + SPIN_NS;
        for (int spins = 0; (g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen; spins++) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
            if ((spins & 255) == 255 && now_ns() > until) {
                pthread_mutex_lock(&pool.mu);
                while ((g = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = g;
        if (id < pool.parts) pool.fn(pool.args, id, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void forget_workers(void) { pool.workers = 0; } /* a forked child has none of the parent's threads */

/* fn(args, p, parts) for p in 0 .. parts - 1, on the caller and parts - 1 workers; returns when all are done.
 * Calls from several threads take turns. */
void run_parallel(task_fn fn, const void *args, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts <= 1) {
        fn(args, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.call_mu);
    static int atfork;
    if (!atfork) atfork = !pthread_atfork(NULL, NULL, forget_workers);
    while (pool.workers < parts - 1) {
        pthread_t t;
        const intptr_t arg = ((intptr_t)atomic_load(&pool.generation) << 8) | (pool.workers + 1);
        if (pthread_create(&t, NULL, worker, (void *)arg) != 0) break;
        pthread_detach(t);
        pool.workers++;
    }
    if (parts > pool.workers + 1) parts = pool.workers + 1;
    pool.fn = fn;
    pool.args = args;
    pool.parts = parts;
    atomic_store(&pool.pending, pool.workers);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(args, 0, parts);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_unlock(&pool.call_mu);
}

/* ------------------------------------------------------------------------------------------ kernels */

typedef struct {
    const void *x;
    int x_bf16;
    int64_t m, k;
    uint8_t *xu;
    float *scales;
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
            for (int h = 0; h < 2; h++) {
                __m512i q8 = _mm512_setzero_si512();
                if (scale > 0.0f) {
                    const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v[h], _mm512_set1_ps(scale)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    const __m512 c = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
                    q8 = _mm512_cvtps_epi32(c);
                }
                _mm_storeu_si128((__m128i *)(q->xu + base + 16 * h),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(q8, _mm512_set1_epi32(128))));
            }
#else
            float amax = 0.0f, v[GROUP];
            for (int i = 0; i < GROUP; i++) {
                v[i] = q->x_bf16 ? from_bf16(((const uint16_t *)q->x)[base + i]) : ((const float *)q->x)[base + i];
                amax = fmaxf(amax, fabsf(v[i]));
            }
            const float scale = amax / 127.0f;
            q->scales[r * groups + g] = scale;
            for (int i = 0; i < GROUP; i++) {
                float v8 = scale > 0.0f ? nearbyintf(v[i] / scale) : 0.0f;
                v8 = fminf(fmaxf(v8, -127.0f), 127.0f);
                q->xu[base + i] = (uint8_t)((int)v8 + 128);
            }
#endif
        }
}

/* Symmetric int8 quantization of x [m, k] (bf16 if x_bf16, else float32) in groups of GROUP inputs: scale =
 * max|x| / 127 of the group, q = round-half-even(x / scale) (0 for an all-zero group), stored as q + 128 in
 * xu [m, k], scales [m, k / GROUP]. */
void sd_quantize_rows(const void *x, int x_bf16, int64_t m, int64_t k, uint8_t *xu, float *scales, int threads) {
    const quantize_args args = {x, x_bf16, m, k, xu, scales};
    run_parallel(quantize_part, &args, m >= 16 ? threads : 1);
}

/* out[r, n] = sum (+ bias[n]), to bf16 or float32. */
static inline void store(void *out, int out_bf16, int64_t idx, float v, const float *bias, int64_t n) {
    if (bias) v = v + bias[n];
    if (out_bf16)
        ((uint16_t *)out)[idx] = to_bf16(v);
    else
        ((float *)out)[idx] = v;
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

/* store() for 16 channels of one token: plus the bias, then bf16 by round-to-nearest-even (as to_bf16). */
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
                        store(out, out_bf16, (r0 + r) * n + ch, f, bias, ch);
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
