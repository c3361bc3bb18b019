/* What the CPU attention kernels share (cpu_attention.c: the dispatch and the paths of one task per query;
 * cpu_attention_avx2.c and cpu_attention_grouped.c: tasks of queries that read the same keys, with AVX2 and with
 * AVX-512 BF16). */
#ifndef SPECDESK_CPU_ATTENTION_H
#define SPECDESK_CPU_ATTENTION_H
#include <stdint.h>

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
    int64_t seg, split; /* split (cpu_attention_avx2.c): the task covers segment seg of its queries' lists only */
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

/* Attention of every query of the pass with tasks of queries that read the same keys; returns 0. Built where
 * the compiler targets AVX-512 BF16 (cpu_attention_grouped.c). */
int grouped_attention(const attention_args *A, int threads);

/* The same with AVX2 and FMA (cpu_attention_avx2.c); returns 0, or -1 if out of memory. */
int grouped_avx2(const attention_args *A, int threads);
#endif
