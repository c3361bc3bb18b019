/* Paged attention for every pass of the CPU int8 path, straight from the bf16 page pool. The torch twin is
 * `specdesk.kernels.reference.paged_attention`; `cpu_attention.py` calls this through ctypes.
 *
 * Why: the torch path gathers each sequence's pages, converts K/V to float32 and runs a dozen small ops per
 * layer; a 13-token verification with a tree mask cost about as much as the layer's matmuls. Here each query
 * (token, head) walks the keys it may see in position order, so its result depends only on which keys those
 * are: a draft-tree node sees its context and its ancestors in the same order, with the same values, as
 * plain decoding sees the same tokens, and speculation stays exact on this path too. This file holds that
 * contract, the dispatch and the paths of CPUs without AVX-512 BF16 (one task per query in AVX-512 or portable
 * C; on AVX2, tasks of queries sharing each block's conversion, below); CPUs with it run
 * cpu_attention_grouped.c, whose tasks share each key's loading among the queries that read it.
 *
 * Per query: the scores of its visible keys, their max, exp and sum, then the weighted sum of V; float32
 * throughout, every multiply-add spelled out (-ffp-contract=off), so the arithmetic is fixed by the code.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.h"
#include "cpu_attention_avx2.h"
#include "cpu_common.h"

#define LANES 16

/* Keys visible to query `i` of its pass: all context keys, then those of the pass's new tokens the causal
 * rule or the tree mask allows. Returns how many; their page slots in order into `slots`. */
static int64_t visible_slots(const attention_args *A, int64_t token, int64_t *slots) {
    int64_t seq = 0;
    while (A->query_start[seq + 1] <= token) seq++;
    const int64_t seq_len = A->seq_lens[seq], q_start = A->query_start[seq];
    const int64_t q_len = A->query_start[seq + 1] - q_start, i = token - q_start, context = seq_len - q_len;
    const int32_t *table = A->block_tables + seq * A->max_blocks;
    const uint8_t *mask = A->tree_mask ? A->tree_mask + token * A->width : NULL;
    const int64_t bs = A->block_size, last = mask ? seq_len : context + i + 1; /* causal: a prefix of the keys */
    int64_t n = 0;
    for (int64_t j = 0, b = 0; j < last; b++) /* page by page: no division per key */
        for (int64_t o = 0, page = (int64_t)table[b] * bs; o < bs && j < last; o++, j++) {
            const int64_t c = j - context; /* the key's index among the pass's new tokens, if it is one */
            if (c >= 0 && mask && !mask[c]) continue;
            slots[n++] = page + o;
        }
    return n;
}

/* One query head of one query token over the keys it may see. */
static void attend(const attention_args *A, int64_t token, int64_t h, int64_t *slots, float *scores) {
    const int64_t d = A->head_dim, kvh = h / (A->heads / A->kv_heads), stride = A->kv_heads * d;
    const int64_t n = visible_slots(A, token, slots);
    const uint16_t *qh = A->q + token * A->q_stride + h * d, *kbase = A->k_cache + kvh * d, *vbase = A->v_cache + kvh * d;
    float sum = 0.0f, o[256];
#ifdef __AVX512F__
    float max = -INFINITY;
    const int64_t chunks = d / LANES;
    __m512 q[16], acc[16];
    for (int64_t c = 0; c < chunks; c++) q[c] = load_bf16(qh + c * LANES), acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *k = kbase + slots[j] * stride;
        __m512 s = _mm512_mul_ps(q[0], load_bf16(k));
        for (int64_t c = 1; c < chunks; c++) s = _mm512_fmadd_ps(q[c], load_bf16(k + c * LANES), s);
        scores[j] = _mm512_reduce_add_ps(s) * A->scale;
        max = fmaxf(max, scores[j]);
    }
    __m512 sums = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += LANES) {
        const __mmask16 live = n - j >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), _mm512_set1_ps(max)));
        _mm512_mask_storeu_ps(scores + j, live, p);
        sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(live, p));
    }
    sum = _mm512_reduce_add_ps(sums);
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *v = vbase + slots[j] * stride;
        const __m512 p = _mm512_set1_ps(scores[j]);
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, load_bf16(v + c * LANES), acc[c]);
    }
    for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(o + c * LANES, acc[c]);
#elif defined(__AVX2__) && defined(__FMA__)
    /* The AVX-512 loop's steps, 8 lanes at a time (CPUs with AVX2 only); sums across lanes in a fixed order. */
    const int64_t chunks = d / 8;
    __m256 q[32], acc[32];
    for (int64_t c = 0; c < chunks; c++) q[c] = load8_bf16(qh + c * 8), acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *k = kbase + slots[j] * stride;
        __m256 s = _mm256_mul_ps(q[0], load8_bf16(k));
        for (int64_t c = 1; c < chunks; c++) s = _mm256_fmadd_ps(q[c], load8_bf16(k + c * 8), s);
        scores[j] = hsum8(s) * A->scale;
    }
    sum = softmax8(scores, n, max8(scores, n));
    for (int64_t jj = 0; jj < n; jj++) {
        const uint16_t *v = vbase + slots[jj] * stride;
        const __m256 p = _mm256_set1_ps(scores[jj]);
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, load8_bf16(v + c * 8), acc[c]);
    }
    for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(o + c * 8, acc[c]);
#else
    float max = -INFINITY;
    for (int64_t e = 0; e < d; e++) o[e] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float s = 0.0f;
        for (int64_t e = 0; e < d; e++) s += from_bf16(qh[e]) * from_bf16(kbase[slots[j] * stride + e]);
        scores[j] = s * A->scale;
        max = fmaxf(max, scores[j]);
    }
    for (int64_t j = 0; j < n; j++) scores[j] = expf(scores[j] - max), sum += scores[j];
    for (int64_t j = 0; j < n; j++)
        for (int64_t e = 0; e < d; e++) o[e] += scores[j] * from_bf16(vbase[slots[j] * stride + e]);
#endif
    uint16_t *out = A->out + (token * A->heads + h) * d;
    for (int64_t e = 0; e < d; e++) out[e] = to_bf16(o[e] / sum);
}

static void attention_part(const void *a, int64_t part, int64_t parts) {
    const attention_args *A = a;
    const int64_t tasks = A->num_tokens * A->heads;
    int64_t longest = 0;
    for (int64_t s = 0; s < A->num_seqs; s++) longest = A->seq_lens[s] > longest ? A->seq_lens[s] : longest;
    float *scores = malloc(sizeof(float) * (size_t)(longest + LANES));
    int64_t *slots = malloc(sizeof(int64_t) * (size_t)(longest + 1));
    if (scores && slots)
        for (int64_t t = tasks * part / parts; t < tasks * (part + 1) / parts; t++)
            attend(A, t / A->heads, t % A->heads, slots, scores);
    free(scores);
    free(slots);
}

attention_task *plan_tasks(const attention_args *A, int threads, int64_t max_queries, int64_t *count) {
    const int64_t per_group = A->heads / A->kv_heads, total = A->num_tokens * A->heads;
    int64_t size = (total + 2 * threads - 1) / (2 * threads);
    if (size <= 4) size = (total + 4 * threads - 1) / (4 * threads);
    /* The heads of one token that share a KV head read the same keys: a task holding only some of them reads the
     * keys again, and a decode step's attention waits on memory (3 tasks of 3 queries on 2 threads ran 1.12x
     * faster than 6 of 1-2). So no smaller tasks unless that would leave threads idle. */
    if (size < per_group && A->num_tokens * A->kv_heads >= threads) size = per_group;
    size = size < 1 ? 1 : size > max_queries ? max_queries : size;
    int64_t n = 0;
    for (int64_t s = 0; s < A->num_seqs; s++)
        n += A->kv_heads * (((A->query_start[s + 1] - A->query_start[s]) * per_group + size - 1) / size);
    attention_task *tasks = malloc(sizeof(attention_task) * (size_t)(n + 1));
    if (!tasks) return NULL;
    int64_t k = 0, cost = 0;
    for (int64_t s = 0; s < A->num_seqs; s++) {
        const int64_t q_len = A->query_start[s + 1] - A->query_start[s], queries = q_len * per_group;
        const int64_t chunks = (queries + size - 1) / size; /* of equal sizes, give or take one */
        for (int64_t g = 0; g < A->kv_heads; g++)
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t f = queries * c / chunks, m = queries * (c + 1) / chunks - f, last = (f + m - 1) / per_group;
                cost += m * (A->seq_lens[s] - q_len + last + 1 + 64); /* + 64: a task's fixed work */
                tasks[k++] = (attention_task){s, g, f, m, cost};
            }
    }
    *count = k;
    return tasks;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__) && !defined(SPECDESK_PER_QUERY)
#define GROUPED_AVX2 1
/* Tasks of queries that read the same keys, for AVX2 (the grouped idea of cpu_attention_grouped.c without its
 * bf16 dot products): up to GQ queries of one sequence and KV head, whose key and value rows are converted to
 * float32 once per block of KB list entries for every query reading them, instead of once per query. Each
 * query's arithmetic is `attend`'s AVX2 loop step for step (the same FMA chain per key, softmax8, the same
 * weighted sum in key order): the per-query build (-DSPECDESK_PER_QUERY) gives the same bits, a test says so. */
#define GQ 32
#define KB 16
#define PREFETCH 2 /* blocks ahead (prefetch_block) */
#define PREFETCH_QUERIES 16 /* in tasks of at most this many queries */

typedef struct {
    const attention_args *A;
    const attention_task *tasks;
    int64_t num_tasks, longest;
} group_tasks;

/* Rows slots[0 .. live) of the cache at base (a KV head's columns) as float32, kf[l * d ..]. */
static void convert_rows(const uint16_t *base, int64_t stride, const int64_t *slots, int64_t live, int64_t d, float *kf) {
    for (int64_t l = 0; l < live; l++)
        for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(kf + l * d + c, load8_bf16(base + slots[l] * stride + c));
}

/* The rows of list entries [j, j + KB) of `keys` (page slots; n entries in all), on their way to the cache
 * while an earlier block is computed: a step reads each layer's pages from memory, at addresses that follow
 * the page table, which the hardware's prefetchers do not (without this, decode's attention waited on memory
 * for most of its time at 1000 tokens of context). Loads nothing into registers: the arithmetic is unchanged. */
static inline void prefetch_block(const uint16_t *base, int64_t stride, const int64_t *keys, int64_t j, int64_t n,
                                  int64_t d) {
    for (int64_t l = j; l < j + KB && l < n; l++)
        for (int64_t e = 0; e < d; e += 32) _mm_prefetch((const char *)(base + keys[l] * stride + e), _MM_HINT_T0);
}

/* out[l] = scale * (q . row l) for l < live: `attend`'s AVX2 FMA chain and lane sum, on converted rows. One key's
 * chain is a run of dependent FMAs, so keys run side by side: 8 at a time where the head's chunk count is a
 * constant (head_dim 64: q and the 8 chains fill the 16 registers), else 4. Each key's own chain is unchanged. */
static inline __attribute__((always_inline)) void score_keys(const __m256 *q, const float *r, int64_t d, float scale,
                                                             float *out, const int chunks, const int keys) {
    __m256 s[8];
    for (int i = 0; i < keys; i++) s[i] = _mm256_mul_ps(q[0], _mm256_loadu_ps(r + i * d));
    for (int c = 1; c < chunks; c++)
        for (int i = 0; i < keys; i++) s[i] = _mm256_fmadd_ps(q[c], _mm256_loadu_ps(r + i * d + c * 8), s[i]);
    for (int i = 0; i < keys; i += 4)
        _mm_storeu_ps(out + i, _mm_mul_ps(hsum8x4(s[i], s[i + 1], s[i + 2], s[i + 3]), _mm_set1_ps(scale)));
}

static inline __attribute__((always_inline)) void score_rows_n(const uint16_t *qh, const float *rows, int64_t live,
                                                               int64_t d, float scale, float *out, const int chunks,
                                                               const int keys) {
    __m256 q[32];
    for (int c = 0; c < chunks; c++) q[c] = load8_bf16(qh + c * 8);
    int64_t l = 0;
    for (; l + keys <= live; l += keys) score_keys(q, rows + l * d, d, scale, out + l, chunks, keys);
    for (; l + 4 <= live; l += 4) score_keys(q, rows + l * d, d, scale, out + l, chunks, 4);
    for (; l < live; l++) {
        __m256 sc = _mm256_mul_ps(q[0], _mm256_loadu_ps(rows + l * d));
        for (int c = 1; c < chunks; c++) sc = _mm256_fmadd_ps(q[c], _mm256_loadu_ps(rows + l * d + c * 8), sc);
        out[l] = hsum8(sc) * scale;
    }
}

static inline void score_rows(const uint16_t *qh, const float *rows, int64_t live, int64_t d, float scale, float *out) {
    if (d == 64)
        score_rows_n(qh, rows, live, d, scale, out, 8, 8);
    else
        score_rows_n(qh, rows, live, d, scale, out, (int)(d / 8), 4);
}

/* acc[0 .. 8 * chunks) += p[l] * row l for l < live, key by key (each lane's sequence of FMAs is `attend`'s),
 * with the accumulators in registers: `chunks` is a constant at each call site. */
static inline __attribute__((always_inline)) void weigh8(const float *p, const float *rows, int64_t live, int64_t d,
                                                         float *acc, const int chunks) {
    __m256 o[8];
    for (int c = 0; c < chunks; c++) o[c] = _mm256_loadu_ps(acc + c * 8);
    for (int64_t l = 0; l < live; l++) {
        const __m256 pl = _mm256_set1_ps(p[l]);
        for (int c = 0; c < chunks; c++) o[c] = _mm256_fmadd_ps(pl, _mm256_loadu_ps(rows + l * d + c * 8), o[c]);
    }
    for (int c = 0; c < chunks; c++) _mm256_storeu_ps(acc + c * 8, o[c]);
}

/* acc += p[l] * row l for l < live: weigh8 over the head's columns, 64 at a time. */
static inline void weigh_rows(const float *p, const float *rows, int64_t live, int64_t d, float *acc) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) weigh8(p, rows + c, live, d, acc + c, 8);
    for (; c + 16 <= d; c += 16) weigh8(p, rows + c, live, d, acc + c, 2);
}

static void run_group(const group_tasks *G, const attention_task *T, int64_t *slots, float *scores, float *rows,
                      float *acc) {
    const attention_args *A = G->A;
    const int64_t d = A->head_dim, per_group = A->heads / A->kv_heads, stride = A->kv_heads * d;
    const int64_t seq = T->seq, group = T->group, first = T->first, count = T->count;
    const int64_t list = G->longest + 1, row = G->longest + 8, q_start = A->query_start[seq];
    int64_t n[GQ], most = 0, longest = 0; /* longest: the query whose list is longest (its entries are prefetched) */
    const uint16_t *qh[GQ];
    const int64_t *keys[GQ]; /* each query's visible list (page slots); the heads of one token share theirs */
    for (int64_t qi = 0; qi < count; qi++) {
        const int64_t token = q_start + (first + qi) / per_group, h = group * per_group + (first + qi) % per_group;
        qh[qi] = A->q + token * A->q_stride + h * d;
        if (qi > 0 && (first + qi) % per_group != 0) {
            keys[qi] = keys[qi - 1], n[qi] = n[qi - 1];
        } else {
            keys[qi] = slots + qi * list;
            n[qi] = visible_slots(A, token, slots + qi * list);
        }
        if (n[qi] > most) most = n[qi], longest = qi;
    }
    float sum[GQ];
    for (int pass = 0; pass < 2; pass++) { /* the scores, then (after the softmax) the weighted sum of V */
        if (pass == 1)
            for (int64_t qi = 0; qi < count; qi++) {
                sum[qi] = softmax8(scores + qi * row, n[qi], max8(scores + qi * row, n[qi]));
                memset(acc + qi * d, 0, sizeof(float) * (size_t)d);
            }
        const uint16_t *base = (pass ? A->v_cache : A->k_cache) + group * d;
        /* Prefetching pays where few queries share a block (decode, small trees): with many, each block's
         * arithmetic hides the memory's latency, and the prefetches only cost instructions. */
        const int prefetch = count <= PREFETCH_QUERIES;
        for (int64_t b = 0; prefetch && b < PREFETCH; b++) prefetch_block(base, stride, keys[longest], b * KB, most, d);
        for (int64_t j0 = 0; j0 < most; j0 += KB) { /* a block of list entries at a time, in list order */
            if (prefetch) prefetch_block(base, stride, keys[longest], j0 + PREFETCH * KB, most, d);
            const int64_t *have = NULL; /* the slots `rows` holds, for have_live entries */
            int64_t have_live = 0;
            for (int64_t qi = 0; qi < count; qi++) {
                if (n[qi] <= j0) continue;
                const int64_t live = n[qi] - j0 < KB ? n[qi] - j0 : KB, *sl = keys[qi] + j0;
                if (!have || have_live < live || (have != sl && memcmp(have, sl, sizeof(int64_t) * (size_t)live))) {
                    convert_rows(base, stride, sl, live, d, rows);
                    have = sl, have_live = live;
                }
                if (pass == 0)
                    score_rows(qh[qi], rows, live, d, A->scale, scores + qi * row + j0);
                else
                    weigh_rows(scores + qi * row + j0, rows, live, d, acc + qi * d);
            }
        }
    }
    for (int64_t qi = 0; qi < count; qi++) {
        const int64_t token = q_start + (first + qi) / per_group, h = group * per_group + (first + qi) % per_group;
        uint16_t *out = A->out + (token * A->heads + h) * d;
        for (int64_t e = 0; e < d; e++) out[e] = to_bf16(acc[qi * d + e] / sum[qi]);
    }
}

static void group_part(const void *a, int64_t part, int64_t parts) {
    static __thread void *bufs[4];
    static __thread size_t caps[4];
    const group_tasks *G = a;
    const int64_t d = G->A->head_dim;
    int64_t *slots = scratch(&bufs[0], &caps[0], sizeof(int64_t) * (size_t)(GQ * (G->longest + 1)));
    float *scores = scratch(&bufs[1], &caps[1], sizeof(float) * (size_t)(GQ * (G->longest + 8)));
    float *rows = scratch(&bufs[2], &caps[2], sizeof(float) * (size_t)(KB * d));
    float *acc = scratch(&bufs[3], &caps[3], sizeof(float) * (size_t)(GQ * d));
    if (!(slots && scores && rows && acc)) return;
    for (int64_t t = 0; t < G->num_tasks; t++)
        if (task_in_part(G->tasks, G->num_tasks, t, part, parts)) run_group(G, G->tasks + t, slots, scores, rows, acc);
}

/* The pass through tasks of plan_tasks. Returns -1 if out of memory. */
static int grouped_avx2(const attention_args *A, int threads) {
    int64_t k = 0, longest = 0;
    attention_task *tasks = plan_tasks(A, threads, GQ, &k);
    if (!tasks) return -1;
    for (int64_t s = 0; s < A->num_seqs; s++) longest = A->seq_lens[s] > longest ? A->seq_lens[s] : longest;
    const group_tasks G = {A, tasks, k, longest};
    if (k > 0) run_parallel(group_part, &G, (int)(k < threads ? k : threads));
    free(tasks);
    return 0;
}
#endif

/* Returns 0, or -1 for a shape it does not take: head_dim not a multiple of 16 or above 256
 * (the caller then uses the twin). */
int sd_paged_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *block_tables,
                       const int32_t *seq_lens, const int32_t *query_start, const uint8_t *tree_mask, int64_t width,
                       int64_t num_seqs, int64_t num_tokens, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       int64_t block_size, int64_t max_blocks, float scale, uint16_t *out, int threads) {
    if (head_dim % LANES != 0 || head_dim > 256) return -1;
    const attention_args args = {q, k_cache, v_cache, q_stride, block_tables, seq_lens, query_start, tree_mask, width,
                                 num_seqs, num_tokens, heads, kv_heads, head_dim, block_size, max_blocks, scale, out};
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return grouped_attention(&args, threads);
#elif defined(GROUPED_AVX2)
    if (grouped_avx2(&args, threads) == 0) return 0;
    const int64_t tasks = num_tokens * heads; /* out of memory for the tasks' list: one task per query */
    run_parallel(attention_part, &args, (int)(tasks < threads ? tasks : threads));
    return 0;
#else
    const int64_t tasks = num_tokens * heads;
    run_parallel(attention_part, &args, (int)(tasks < threads ? tasks : threads));
    return 0;
#endif
}

/* Which path this build runs (one per build, so a pass's numbers never depend on the batch): 4 the grouped
 * AVX-512 BF16 tasks (cpu_attention_grouped.c), 3 a task per query with AVX-512, 2 grouped tasks with AVX2
 * and FMA, 1 a task per query with them (-DSPECDESK_PER_QUERY; the same bits as 2), 0 the portable loops. */
int sd_attention_path(void) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 4;
#elif defined(__AVX512F__)
    return 3;
#elif defined(GROUPED_AVX2)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
