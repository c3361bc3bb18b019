/* What the CPU attention kernels share (cpu_attention.c: the paths of machines without AVX-512 BF16;
 * cpu_attention_grouped.c: tasks of queries that read the same keys, with AVX-512 BF16). */
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

/* Attention of every query of the pass with tasks of queries that read the same keys; returns 0. Built where
 * the compiler targets AVX-512 BF16 (cpu_attention_grouped.c). */
int grouped_attention(const attention_args *A, int threads);
#endif
