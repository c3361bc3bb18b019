/* What the CPU attention kernels share (cpu_attention.c: the dispatch and the paths of one task per query;
 * cpu_attention_avx2.c and cpu_attention_grouped.c: tasks of queries that read the same keys, with AVX2 and with
 * AVX-512 BF16). */
#ifndef SPECDESK_CPU_ATTENTION_H
#define SPECDESK_CPU_ATTENTION_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h" /* to_bf16 */

typedef struct {
    const uint16_t *q, *k_cache, *v_cache; /* q [T, H, D] (rows q_stride apart); caches [blocks, bs, KVH, D] */
    int64_t q_stride;
    const int32_t *block_tables, *seq_lens, *query_start; /* [S, max_blocks], [S], [S + 1] */
    const uint8_t *tree_mask; /* [T, width] or NULL: see AttentionMetadata.tree_mask */
    int64_t width, num_seqs, num_tokens, heads, kv_heads, head_dim, block_size, max_blocks;
    float scale;
    uint16_t *out; /* [T, H, D] */
} attention_args;

/* Entries lo .. hi - 1 of the visible key list of query token `token` (see cpu_attention.c), as page slots into
 * slots[0 ..]; returns the length of the whole list. (cpu_attention.c) */
int64_t visible_range(const attention_args *A, int64_t token, int64_t lo, int64_t hi, int64_t *slots);

/* A task of the grouped paths: queries first .. first + count - 1 of one sequence and KV head (a query is token
 * * heads per group + head within the group, counted among the sequence's); end_cost: the estimated cost
 * (query-keys) of this task and all before it. */
typedef struct {
    int64_t seq, group, first, count, end_cost;
    int64_t seg, split; /* split (run_split): the task covers segment seg of its queries' lists only */
} attention_task;

/* The pass's tasks (malloc'd; the caller frees), at most max_queries queries each and of equal sizes within a
 * sequence and KV head: the more queries a task holds, the more a block's loading is shared; the fewer, the
 * better the parts balance, so two tasks a thread where that still gives tasks of more than 4 queries, else
 * four. *count is set; NULL if out of memory. (cpu_attention.c) */
attention_task *plan_tasks(const attention_args *A, int threads, int64_t max_queries, int64_t *count);

/* Whether part `part` of `parts` runs task t: the consecutive tasks whose cost midpoints fall in its share of the
 * total (tasks differ: a causal prefill's later queries see more keys; a group's last task may hold fewer). */
static inline int task_in_part(const attention_task *tasks, int64_t num_tasks, int64_t t, int64_t part, int64_t parts) {
    const int64_t total = tasks[num_tasks - 1].end_cost, mid2 = (t ? tasks[t - 1].end_cost : 0) + tasks[t].end_cost;
    return mid2 * parts >= 2 * total * part && mid2 * parts < 2 * total * (part + 1);
}

/* A query's visible key list is taken SEGMENT entries at a time by the grouped paths and the AVX2 per-query loop:
 * each segment's scores, their max and softmax, and its weighted sum of V from zero, then the segments joined one
 * by one in list order. A pass may run a query's segments as tasks of their own (run_split: a decode step's few
 * tasks spread over the threads) and the numbers stay the same. A list of at most SEGMENT keys gets exactly the
 * one-piece softmax: its join only copies. */
#define SEGMENT 256

/* (max, sum, o[0 .. d)), the segments so far, joined with the next one's (m, l, part[0 .. d)): both rescaled to
 * the larger max, each product and sum rounded on its own (-ffp-contract=off: a compiler's vector loop gives
 * these bits too). first: part is the list's first segment. */
static inline void join_segment(float *max, float *sum, float *o, float m, float l, const float *part, int64_t d,
                                int first) {
    if (first) {
        *max = m, *sum = l;
        for (int64_t e = 0; e < d; e++) o[e] = part[e];
        return;
    }
    const float top = m > *max ? m : *max, a = expf(*max - top), b = expf(m - top);
    *sum = *sum * a + l * b;
    for (int64_t e = 0; e < d; e++) o[e] = o[e] * a + part[e] * b;
    *max = top;
}

/* A grouped pass: its tasks and, while they run cut by segment, each query's segment results. A path's own
 * arguments may extend it (as their first member: run_split hands the path's part function this pointer). */
typedef struct {
    const attention_args *A;
    const attention_task *tasks;
    int64_t num_tasks, longest; /* longest: the pass's longest sequence */
    int64_t segments; /* while split (run_split sets it): the most segments a query of the pass has */
    float *partials; /* split tasks: per query (token * heads + head) and segment, [max, sum, o[d]] */
    int64_t *counts; /* split tasks: per query, its visible keys */
} segment_pass;

/* Segment seg's [max, sum, o[d]] of query `query` (token * heads + head) in a split pass's partials. */
static inline float *partial_of(const segment_pass *P, int64_t query, int64_t seg) {
    return P->partials + (query * P->segments + seg) * (P->A->head_dim + 2);
}

/* A segment's result (m, l, part[d]) of a query of task T: a split task's into the pass's partials, a whole task's
 * joined into the query's (max, sum, state) as the pass's last step would join it. */
static inline void keep_segment(const segment_pass *P, const attention_task *T, int64_t query, float m, float l,
                                const float *part, float *max, float *sum, float *state, int first) {
    const int64_t d = P->A->head_dim;
    if (T->split) {
        float *p = partial_of(P, query, T->seg);
        p[0] = m, p[1] = l;
        memcpy(p + 2, part, sizeof(float) * (size_t)d);
    } else {
        join_segment(max, sum, state, m, l, part, d, first);
    }
}

/* A query's output row, bf16(state / sum); a query that saw no key (n == 0: a tree row masking everything) gets
 * 0 / 0 on every path. */
static inline void write_query(const attention_args *A, int64_t query, float *state, float sum, int64_t n) {
    const int64_t d = A->head_dim;
    if (n == 0) sum = 0.0f, memset(state, 0, sizeof(float) * (size_t)d);
    for (int64_t e = 0; e < d; e++) A->out[query * d + e] = to_bf16(state[e] / sum);
}

/* Where P's tasks (plan_tasks for one thread: one per KV head and sequence) leave fewer than two a thread
 * (decode steps, small trees), runs them cut by segment, `part` running each part's share of the cut tasks (a cut
 * task has split = 1 and covers segment seg; its queries' [max, sum, o] go to P->partials, and the first
 * segment's task sets P->counts), then joins each query's segments in order and writes them out. Returns 1 if it
 * ran the pass, 0 if the caller should run it whole (too many tasks, one segment, or no memory). P->tasks,
 * num_tasks, partials and counts are restored. (cpu_attention.c) */
int run_split(segment_pass *P, void (*part)(const void *, int64_t, int64_t), int threads);

/* Attention of every query of the pass with tasks of queries that read the same keys; returns 0. Built where
 * the compiler targets AVX-512 BF16 (cpu_attention_grouped.c). */
int grouped_attention(const attention_args *A, int threads);

/* The same with AVX2 and FMA (cpu_attention_avx2.c); returns 0, or -1 if out of memory. */
int grouped_avx2(const attention_args *A, int threads);
#endif
