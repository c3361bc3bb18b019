/* Paged attention for every pass of the CPU int8 path, straight from the bf16 page pool. The torch twin is
 * `specdesk.kernels.reference.paged_attention`; `cpu_attention.py` calls this through ctypes.
 *
 * Why: the torch path gathers each sequence's pages, converts K/V to float32 and runs a dozen small ops per
 * layer; a 13-token verification with a tree mask cost about as much as the layer's matmuls. Here each query
 * (token, head) walks the keys it may see in position order, so its result depends only on which keys those
 * are: a draft-tree node sees its context and its ancestors in the same order, with the same values, as
 * plain decoding sees the same tokens, and speculation stays exact on this path too. This file holds that
 * contract, the dispatch and the one-task-per-query paths (AVX-512 without BF16, portable C, and AVX2 under
 * -DSPECDESK_PER_QUERY, the test build of cpu_attention_avx2.c's arithmetic); CPUs with AVX2 run tasks of queries
 * sharing each block's conversion (cpu_attention_avx2.c), CPUs with AVX-512 BF16 cpu_attention_grouped.c, whose
 * tasks share each key's loading among the queries that read it.
 *
 * Per query: the scores of its visible keys, their max, exp and sum, then the weighted sum of V (on AVX2 and in
 * the AVX-512 BF16 tasks, per segment of 256 keys, the segments then joined in order: cpu_attention.h's SEGMENT,
 * and run_split below, which spreads a decode step's few tasks over the threads by segment); float32
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

/* Keys visible to query token `token` of its pass, in list order: all context keys, then those of the pass's new
 * tokens the causal rule or the tree mask allows. Entries lo .. hi - 1 of that list go to slots[0 ..] (page slots,
 * page by page: no division per key); returns the whole list's length. */
int64_t visible_range(const attention_args *A, int64_t token, int64_t lo, int64_t hi, int64_t *slots) {
    int64_t seq = 0;
    while (A->query_start[seq + 1] <= token) seq++;
    const int64_t seq_len = A->seq_lens[seq], q_start = A->query_start[seq];
    const int64_t q_len = A->query_start[seq + 1] - q_start, i = token - q_start, context = seq_len - q_len;
    const int32_t *table = A->block_tables + seq * A->max_blocks;
    const uint8_t *mask = A->tree_mask ? A->tree_mask + token * A->width : NULL;
    const int64_t bs = A->block_size, news = mask ? q_len : i + 1; /* new tokens it may see: causal, a prefix */
    int64_t w = 0, j = lo < context ? lo : context;
    for (int64_t b = j / bs, o = j % bs; j < context && j < hi; j++) { /* the context: entry j is key j */
        slots[w++] = (int64_t)table[b] * bs + o;
        if (++o == bs) b++, o = 0;
    }
    int64_t n = context;
    for (int64_t c = 0, b = context / bs, o = context % bs; c < news; c++) { /* the pass's own keys, in order */
        if (!mask || mask[c]) {
            if (n >= lo && n < hi) slots[w++] = (int64_t)table[b] * bs + o;
            n++;
        }
        if (++o == bs) b++, o = 0;
    }
    return n;
}

static int64_t visible_slots(const attention_args *A, int64_t token, int64_t *slots) {
    return visible_range(A, token, 0, INT64_MAX, slots);
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
    /* The AVX-512 loop's steps, 8 lanes at a time (CPUs with AVX2 only), segment by segment of the list, the
     * segments joined in order (cpu_attention.h); sums across lanes in a fixed order. */
    const int64_t chunks = d / 8;
    __m256 q[32], acc[32];
    float max = 0.0f, part[256];
    for (int64_t c = 0; c < chunks; c++) q[c] = load8_bf16(qh + c * 8);
    for (int64_t e = 0; n == 0 && e < d; e++) o[e] = 0.0f; /* no key to see: 0 / 0, as the grouped tasks give */
    for (int64_t s0 = 0; s0 < n; s0 += SEGMENT) {
        const int64_t live = n - s0 < SEGMENT ? n - s0 : SEGMENT;
        for (int64_t j = 0; j < live; j++) {
            const uint16_t *k = kbase + slots[s0 + j] * stride;
            __m256 s = _mm256_mul_ps(q[0], load8_bf16(k));
            for (int64_t c = 1; c < chunks; c++) s = _mm256_fmadd_ps(q[c], load8_bf16(k + c * 8), s);
            scores[j] = hsum8(s) * A->scale;
        }
        const float seg_max = max8(scores, live), seg_sum = softmax8(scores, live, seg_max);
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t jj = 0; jj < live; jj++) {
            const uint16_t *v = vbase + slots[s0 + jj] * stride;
            const __m256 p = _mm256_set1_ps(scores[jj]);
            for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, load8_bf16(v + c * 8), acc[c]);
        }
        for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(part + c * 8, acc[c]);
        join_segment(&max, &sum, o, seg_max, seg_sum, part, d, s0 == 0);
    }
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
                tasks[k++] = (attention_task){s, g, f, m, cost, 0, 0};
            }
    }
    *count = k;
    return tasks;
}

#define PARTIALS_MAX (16 << 20) /* bytes of segment results a split pass may hold (decode and trees: ~100 KB) */

/* A split pass's last step: each query's segments joined in order, as a whole task joins them, and written out. */
static void combine_part(const void *a, int64_t part, int64_t parts) {
    const segment_pass *P = a;
    const attention_args *A = P->A;
    const int64_t d = A->head_dim, queries = A->num_tokens * A->heads;
    float state[256];
    for (int64_t q = queries * part / parts; q < queries * (part + 1) / parts; q++) {
        float max = 0.0f, sum = 0.0f;
        for (int64_t s = 0; s * SEGMENT < P->counts[q]; s++) {
            const float *p = partial_of(P, q, s);
            join_segment(&max, &sum, state, p[0], p[1], p + 2, d, s == 0);
        }
        write_query(A, q, state, sum, P->counts[q]);
    }
}

/* The tasks of plan_tasks cut by segment (malloc'd; NULL if out of memory): per sequence, segment by segment,
 * each of its tasks that reaches that far, so that a part's share of the tasks reads neighbouring pages. */
static attention_task *split_tasks(const attention_args *A, const attention_task *tasks, int64_t k, int64_t segments,
                                   int64_t *count) {
    attention_task *out = malloc(sizeof(attention_task) * (size_t)(k * segments + 1));
    if (!out) return NULL;
    const int64_t per_group = A->heads / A->kv_heads;
    int64_t n = 0, cost = 0;
    for (int64_t t0 = 0, t1 = 0; t0 < k; t0 = t1) {
        while (t1 < k && tasks[t1].seq == tasks[t0].seq) t1++; /* tasks t0 .. t1 - 1: one sequence's */
        const int64_t seq = tasks[t0].seq, q_len = A->query_start[seq + 1] - A->query_start[seq];
        const int64_t context = A->seq_lens[seq] - q_len;
        for (int64_t s = 0; s < segments; s++)
            for (int64_t t = t0; t < t1; t++) {
                /* The most keys a query of the task may see from this segment on: causally its last token's
                 * count; with a tree mask, which may let a token see later ones, the sequence's. */
                const int64_t last = (tasks[t].first + tasks[t].count - 1) / per_group;
                const int64_t most = A->tree_mask ? A->seq_lens[seq] : context + last + 1;
                const int64_t keys = most - s * SEGMENT;
                if (keys <= 0) continue;
                cost += tasks[t].count * ((keys < SEGMENT ? keys : SEGMENT) + 64);
                out[n] = tasks[t];
                out[n].end_cost = cost, out[n].seg = s, out[n].split = 1;
                n++;
            }
    }
    *count = n;
    return out;
}

int run_split(segment_pass *P, void (*part)(const void *, int64_t, int64_t), int threads) {
    const attention_args *A = P->A;
    const int64_t queries = A->num_tokens * A->heads;
    P->segments = (P->longest + SEGMENT - 1) / SEGMENT;
    const size_t bytes = sizeof(float) * (size_t)(queries * P->segments * (A->head_dim + 2));
    if (threads <= 1 || P->num_tasks >= 2 * threads || P->segments <= 1 || bytes > PARTIALS_MAX) return 0;
    const attention_task *whole = P->tasks;
    const int64_t num_whole = P->num_tasks;
    attention_task *split = split_tasks(A, whole, num_whole, P->segments, &P->num_tasks);
    P->partials = malloc(bytes);
    P->counts = malloc(sizeof(int64_t) * (size_t)queries);
    const int ready = split && P->partials && P->counts;
    if (ready) {
        P->tasks = split;
        run_parallel(part, P, (int)(P->num_tasks < threads ? P->num_tasks : threads));
        run_parallel(combine_part, P, (int)(queries < threads ? queries : threads));
    }
    free(split), free(P->partials), free(P->counts);
    P->tasks = whole, P->num_tasks = num_whole, P->partials = NULL, P->counts = NULL;
    return ready;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__) && !defined(SPECDESK_PER_QUERY)
#define GROUPED_AVX2 1 /* tasks of queries (cpu_attention_avx2.c) */
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
