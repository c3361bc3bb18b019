/* A Llama-family decoder stack for the int8 CPU path in one call: every layer's norms, int8 or W4A8 matmuls, rotary,
 * K/V writes, paged attention and SwiGLU, by the same C functions `specdesk.engine.models.llama` calls one by
 * one from Python on this path (cpu_int8.c or cpu_q4.c, cpu_fused.c, cpu_attention.c), in the same order, on the same
 * buffers: the result is bit for bit the per-op path's (tests/kernels/test_cpu_model.py).
 *
 * Why: at 1-16 tokens a pass of a 30-layer, 135M model spends about 4 ms in Python between the kernels, a
 * third of the step; here the layers cost one ctypes call per pass.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

typedef struct { /* an Int8Linear (cpu_int8.py's Int8Weight) or a Q4Linear (cpu_q4.py's Q4Weight: w its codes,
                   * dm its scales; NULL for int8), and its float32 bias or NULL */
    const void *w;
    const int32_t *wsum;
    const float *ws;
    const uint16_t *dm;
    const float *bias;
    int64_t n, k;
} sd_qlinear;

typedef struct { /* one decoder layer: its two norms' bf16 weights, four linears and its K/V pages */
    const uint16_t *input_norm, *post_norm;
    sd_qlinear qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;
} sd_layer;

typedef struct { /* a pass: t tokens of num_seqs sequences (see AttentionMetadata) */
    int64_t t, num_seqs, max_blocks, block_size, width;
    const int64_t *slots;
    const int32_t *block_tables, *seq_lens, *query_start;
    const uint8_t *tree_mask;
    const uint16_t *cos, *sin; /* [t, head_dim / 2] */
} sd_pass;

typedef struct { /* the model's shape */
    int64_t hidden, heads, kv_heads, head_dim, inter;
    float eps, residual_multiplier, scale;
} sd_shape;

static void linear(const sd_qlinear *L, const uint16_t *x, int64_t t, uint8_t *xu, float *xs, float *sums,
                   uint16_t *out, int threads) {
    if (L->dm) {
        sd_quantize_rows_q4(x, 1, t, L->k, (int8_t *)xu, xs, sums, threads);
        sd_linear_q4((const int8_t *)xu, xs, sums, t, L->k, L->w, L->dm, L->bias, L->n, out, 1, threads);
        return;
    }
    sd_quantize_rows(x, 1, t, L->k, xu, xs, threads);
    sd_linear(xu, xs, t, L->k, L->w, L->wsum, L->ws, L->bias, L->n, out, 1, threads);
}

/* x [t, hidden]: the embeddings in; out, the last layer's MLP output, with residual [t, hidden] the stream it
 * joins (the model's final add_norm is the caller's). Scratch: h [t, hidden], qkv [t, (heads + 2 kv) d],
 * attn [t, heads d], gate_up [t, 2 inter], act [t, inter], xu [t, max(hidden, inter)], xs and sums [t, max / 32]. */
int sd_llama_layers(const sd_layer *layers, int64_t num_layers, const sd_shape *S, const sd_pass *P, uint16_t *x,
                    uint16_t *residual, uint16_t *h, uint16_t *qkv, uint16_t *attn, uint16_t *gate_up, uint16_t *act,
                    uint8_t *xu, float *xs, float *sums, int threads) {
    const int64_t t = P->t, d = S->head_dim, q_width = (S->heads + 2 * S->kv_heads) * d;
    const int64_t kv_width = S->kv_heads * d;
    for (int64_t l = 0; l < num_layers; l++) {
        const sd_layer *L = layers + l;
        if (l == 0)
            sd_rms_norm(x, NULL, L->input_norm, S->eps, 1.0f, t, S->hidden, h, residual, threads);
        else
            sd_rms_norm(x, residual, L->input_norm, S->eps, S->residual_multiplier, t, S->hidden, h, residual, threads);
        linear(&L->qkv, h, t, xu, xs, sums, qkv, threads);
        sd_rotary(qkv, q_width, P->cos, P->sin, t, S->heads + S->kv_heads, d);
        for (int64_t i = 0; i < t; i++) { /* write K/V to their page slots (reference.write_kv) */
            memcpy(L->k_cache + P->slots[i] * kv_width, qkv + i * q_width + S->heads * d, (size_t)kv_width * 2);
            memcpy(L->v_cache + P->slots[i] * kv_width, qkv + i * q_width + (S->heads + S->kv_heads) * d,
                   (size_t)kv_width * 2);
        }
        if (sd_paged_attention(qkv, q_width, L->k_cache, L->v_cache, P->block_tables, P->seq_lens, P->query_start,
                               P->tree_mask, P->width, P->num_seqs, t, S->heads, S->kv_heads, d, P->block_size,
                               P->max_blocks, S->scale, attn, threads) != 0)
            return -1;
        linear(&L->o, attn, t, xu, xs, sums, x, threads);
        sd_rms_norm(x, residual, L->post_norm, S->eps, S->residual_multiplier, t, S->hidden, h, residual, threads);
        linear(&L->gate_up, h, t, xu, xs, sums, gate_up, threads);
        sd_silu_mul(gate_up, t, S->inter, act, threads);
        linear(&L->down, act, t, xu, xs, sums, x, threads);
    }
    return 0;
}
