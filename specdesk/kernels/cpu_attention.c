/* Paged attention for every pass of the CPU int8 path, straight from the bf16 page pool. The torch twin is
 * `specdesk.kernels.reference.paged_attention`; `cpu_attention.py` calls this through ctypes.
 *
 * Why: the torch path gathers each sequence's pages, converts K/V to float32 and runs a dozen small ops per
 * layer; a 13-token verification with a tree mask cost about as much as the layer's matmuls. Here each query
 * (token, head) walks the keys it may see in position order, so its result depends only on which keys those
 * are: a draft-tree node sees its context and its ancestors in the same order, with the same values, as
 * plain decoding sees the same tokens, and speculation stays exact on this path too. This file holds that
 * contract, the dispatch and the path of CPUs without AVX-512 BF16 (one task per query); CPUs with it run
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
    const int64_t bs = A->block_size;
    int64_t n = 0;
    for (int64_t j = 0; j < seq_len; j++) {
        const int64_t c = j - context; /* the key's index among the pass's new tokens, if it is one */
        if (c >= 0 && (mask ? !mask[c] : c > i)) continue;
        slots[n++] = (int64_t)table[j / bs] * bs + j % bs;
    }
    return n;
}


/* One query head of one query token over the keys it may see. */
static void attend(const attention_args *A, int64_t token, int64_t h, int64_t *slots, float *scores) {
    const int64_t d = A->head_dim, kvh = h / (A->heads / A->kv_heads), stride = A->kv_heads * d;
    const int64_t n = visible_slots(A, token, slots);
    const uint16_t *qh = A->q + token * A->q_stride + h * d, *kbase = A->k_cache + kvh * d, *vbase = A->v_cache + kvh * d;
    float max = -INFINITY, sum = 0.0f, o[256];
#ifdef __AVX512F__
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
#else
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
#else
    const int64_t tasks = num_tokens * heads;
    run_parallel(attention_part, &args, (int)(tasks < threads ? tasks : threads));
    return 0;
#endif
}

/* Which path this build runs (one per build, so a pass's numbers never depend on the batch): 2 the grouped
 * AVX-512 BF16 tasks (cpu_attention_grouped.c), 1 a task per query with AVX-512, 0 the portable loops. */
int sd_attention_path(void) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 2;
#elif defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
