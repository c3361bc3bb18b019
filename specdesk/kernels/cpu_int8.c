/* W8A8 linear for the CPU: int8 weights (one scale per output channel) times int8 activations (one scale per
 * token), accumulated exactly in int32. The torch twin is `specdesk.kernels.cpu_int8.linear_reference`; the
 * Python side (`cpu_int8.py`) compiles this file once per machine with -march=native and calls it by ctypes.
 *
 * Why this shape of kernel: a decode step of a small model on a CPU reads every weight once for a handful of
 * tokens (1 plain, ~10 when verifying a draft tree). Weights are packed so that one AVX-512 VNNI instruction
 * multiplies 4 inputs of one token into 16 output channels (layout [N/16][K/4][16][4]); a block of channels
 * stays in L1 while every token of the pass is multiplied by it, so a 13-token verification reads the weights
 * from memory once, as a 1-token step does. Integer sums do not depend on the order they are added in, so the
 * result of a row never depends on which other rows share the pass (speculation stays exact) nor on whether
 * the vector or the scalar path ran.
 *
 * Threads: a small pool of our own (below), not OpenMP. libgomp throttles its workers to a few spins and then
 * sleeps them whenever it manages more threads than there are CPUs, which is always the case when the calls
 * come from a thread other than the process's first (the engine's loop thread): every parallel region then
 * pays a futex wake-up, and a decode step has 120 of them (measured: a 3072x576 linear took 2.2x as long in
 * a second thread as in the main one).
 *
 * Activations enter as unsigned bytes (q + 128, VNNI multiplies unsigned by signed); the kernel subtracts
 * 128 * sum(w[n, :]) per channel afterwards. No floating-point contraction (-ffp-contract=off): the epilogue
 * rounds like torch's separate multiply and add.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __AVX512VNNI__
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

/* ------------------------------------------------------------------------------------------ thread pool */

typedef void (*task_fn)(const void *args, int64_t part, int64_t parts);

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

float sd_from_bf16(uint16_t b) { return from_bf16(b); }
uint16_t sd_to_bf16(float f) { return to_bf16(f); }

/* Per-token symmetric quantization of rows [m * part / parts, m * (part + 1) / parts) of x. */
static void quantize_part(const void *a, int64_t part, int64_t parts) {
    const quantize_args *q = a;
    const int64_t k = q->k;
    for (int64_t r = q->m * part / parts; r < q->m * (part + 1) / parts; r++) {
        float amax = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            float v = q->x_bf16 ? from_bf16(((const uint16_t *)q->x)[r * k + i]) : ((const float *)q->x)[r * k + i];
            amax = fmaxf(amax, fabsf(v));
        }
        float scale = amax / 127.0f;
        q->scales[r] = scale;
        for (int64_t i = 0; i < k; i++) {
            float v = q->x_bf16 ? from_bf16(((const uint16_t *)q->x)[r * k + i]) : ((const float *)q->x)[r * k + i];
            float v8 = scale > 0.0f ? nearbyintf(v / scale) : 0.0f;
            v8 = fminf(fmaxf(v8, -127.0f), 127.0f);
            q->xu[r * k + i] = (uint8_t)((int)v8 + 128);
        }
    }
}

/* Per-token symmetric quantization of x [m, k] (bf16 if x_bf16, else float32): scale = max|x| / 127,
 * q = round-half-even(x / scale) (0 for an all-zero row), stored as q + 128 in xu [m, k]. */
void sd_quantize_rows(const void *x, int x_bf16, int64_t m, int64_t k, uint8_t *xu, float *scales, int threads) {
    const quantize_args args = {x, x_bf16, m, k, xu, scales};
    run_parallel(quantize_part, &args, m >= 16 ? threads : 1);
}

/* out[r, n] = ((float)acc * xs[r]) * ws[n] (+ bias[n]), to bf16 or float32. */
static inline void store(void *out, int out_bf16, int64_t idx, int32_t acc, float xs, float ws, const float *bias,
                         int64_t n) {
    float v = (float)acc * xs;
    v = v * ws;
    if (bias) v = v + bias[n];
    if (out_bf16)
        ((uint16_t *)out)[idx] = to_bf16(v);
    else
        ((float *)out)[idx] = v;
}

#ifdef __AVX512VNNI__
/* R tokens x B blocks of 16 channels: R * B accumulators in registers, one weight load per block and one
 * broadcast per token for every 4 inputs. R and B are constants at each call site, so the loops unroll. */
static inline __attribute__((always_inline)) void tile(const uint8_t *x, int64_t k, const int8_t *wb, int64_t k4,
                                                       const int R, const int B, int32_t acc[4][2][16]) {
    __m512i a[4][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) a[r][b] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k4; j++) {
        __m512i wv[2];
        for (int b = 0; b < B; b++) wv[b] = _mm512_loadu_si512((const void *)(wb + (b * k4 + j) * 64));
        for (int r = 0; r < R; r++) {
            int32_t v;
            memcpy(&v, x + r * k + 4 * j, 4);
            const __m512i xv = _mm512_set1_epi32(v);
            for (int b = 0; b < B; b++) a[r][b] = _mm512_dpbusd_epi32(a[r][b], xv, wv[b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) _mm512_storeu_si512((void *)acc[r][b], a[r][b]);
}

/* The epilogue of 16 channels of one token, vectorized but rounding exactly as store(): int32 -> float,
 * times the token's scale, times the channels' scales, plus the bias, then bf16 by round-to-nearest-even. */
static inline void store16(void *out, int out_bf16, int64_t idx, const int32_t *acc, const int32_t *wsum, float xs,
                           const float *ws, const float *bias) {
    __m512i a = _mm512_sub_epi32(_mm512_loadu_si512((const void *)acc),
                                 _mm512_slli_epi32(_mm512_loadu_si512((const void *)wsum), 7));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs));
    v = _mm512_mul_ps(v, _mm512_loadu_ps(ws));
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if (!out_bf16) {
        _mm512_storeu_ps((float *)out + idx, v);
        return;
    }
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + idx), _mm512_cvtepi32_epi16(r));
}

#define TILE_ROWS(B)                                       \
    switch (rows) {                                        \
        case 1: tile(x, k, wb, k4, 1, B, acc); break;      \
        case 2: tile(x, k, wb, k4, 2, B, acc); break;      \
        case 3: tile(x, k, wb, k4, 3, B, acc); break;      \
        default: tile(x, k, wb, k4, 4, B, acc); break;     \
    }
#endif

/* y [m, n] = x [m, k] W^T with W packed [n/16][k/4][16][4] (see cpu_int8.py), wsum[n] = sum_k W[n, k].
 * Parts split the output channels in pairs of 16-channel blocks; each pair stays in L1 while every
 * token of the pass, 4 at a time, is multiplied by it. */
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
    const int64_t nblocks = n / 16, k4 = k / 4, pairs = (nblocks + 1) / 2;
    for (int64_t p = pairs * part / parts; p < pairs * (part + 1) / parts; p++) {
        const int64_t nb = 2 * p;
        const int blocks = nb + 1 < nblocks ? 2 : 1;
        const int8_t *wb = w + nb * k4 * 64;
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            const int rows = m - r0 < 4 ? (int)(m - r0) : 4;
            const uint8_t *x = xu + r0 * k;
            int32_t acc[4][2][16];
#ifdef __AVX512VNNI__
            if (blocks == 2) {
                TILE_ROWS(2)
            } else {
                TILE_ROWS(1)
            }
#else
            memset(acc, 0, sizeof(acc));
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < blocks; b++)
                    for (int64_t j = 0; j < k4; j++)
                        for (int c = 0; c < 16; c++)
                            for (int t = 0; t < 4; t++)
                                acc[r][b][c] += (int32_t)x[r * k + 4 * j + t] * (int32_t)wb[(b * k4 + j) * 64 + c * 4 + t];
#endif
#ifdef __AVX512VNNI__
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < blocks; b++) {
                    const int64_t col = (nb + b) * 16;
                    store16(out, out_bf16, (r0 + r) * n + col, acc[r][b], wsum + col, xs[r0 + r], ws + col,
                            bias ? bias + col : NULL);
                }
            continue;
#endif
            for (int r = 0; r < rows; r++)
                for (int b = 0; b < blocks; b++)
                    for (int c = 0; c < 16; c++) {
                        const int64_t col = (nb + b) * 16 + c;
                        store(out, out_bf16, (r0 + r) * n + col, acc[r][b][c] - 128 * wsum[col], xs[r0 + r], ws[col],
                              bias, col);
                    }
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
