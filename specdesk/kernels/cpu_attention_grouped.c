/* Paged attention with tasks of queries that read the same keys: the path of CPUs with AVX-512 BF16 (the
 * dispatch is in cpu_attention.c, the arithmetic contract there too).
 *
 * Why: one task per (query token, head) loads and converts every visible key and value once per query, and
 * pays a horizontal sum per key: a 13-token verification on 700 tokens of context cost as much as the layer's
 * matmuls. Here a task holds up to 32 queries of one sequence and one KV head (the heads of a group, and the
 * tokens of the pass), so each block of 16 keys is loaded and transposed once for all of them; a query's 16
 * scores then take 32 bf16 dot-product instructions (vdpbf16ps on key pairs) and no horizontal sum.
 *
 * Exactness: a query's arithmetic is a function of its own visible key list only, in the order cpu_attention.c
 * defines (context, then the pass keys the causal rule or the tree mask lets it see): a key's lane is its
 * index in that list mod 16, the dot product always runs over four accumulators joined in one fixed order, and
 * the softmax and the weighted sum of V are cpu_attention.c's, per segment of 256 list entries, the segments
 * joined in list order (cpu_attention.h). Which other queries share the task (how a pass is chunked or
 * batched, how many threads run, whether a decode step's segments ran as tasks of their own: run_split) never
 * changes a bit, so a draft-tree node gets exactly what plain decoding of its path gets.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.h"
#include "cpu_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)

#define LANES 16
#define MAX_QUERIES 32 /* queries per task: how far a block's loading and transposing is shared */

typedef attention_task task;

typedef struct {
    segment_pass P; /* first: run_split hands group_part a pointer to it */
    const uint8_t *causal; /* [num_seqs]: the seq's visible lists are prefixes of one list (no tree, or a causal one) */
    int64_t widest;
} grouped_args;

/* Rows r[0..15] of 16 dwords -> r[c] = column c (the standard unpack / shuffle 16 x 16 transpose). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int c = 0; c < 4; c++) {
            t[8 * i + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
            t[8 * i + 4 + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    }
}

/* The key rows of one block of 16 list entries (NULL: past the list, read as zeros), as kt[d / 2][16]: entry e
 * holds the 16 keys' bf16 pair (2e, 2e + 1), the operand of vdpbf16ps. */
static void transpose_keys(const uint16_t *const rows[LANES], int64_t d, __m512i *kt) {
    static const uint16_t zeros[256];
    for (int64_t c0 = 0; c0 < d / 2; c0 += LANES) {
        const int64_t live = d / 2 - c0 < LANES ? d / 2 - c0 : LANES;
        const __mmask16 m = (__mmask16)((1u << live) - 1);
        __m512i r[LANES];
        for (int i = 0; i < LANES; i++) r[i] = _mm512_maskz_loadu_epi32(m, (rows[i] ? rows[i] : zeros) + 2 * c0);
        transpose16(r);
        for (int64_t c = 0; c < live; c++) kt[c0 + c] = r[c];
    }
}

/* 16 scores (times scale) of one query against a transposed block: four accumulators over the key pairs,
 * joined as (a0 + a1) + (a2 + a3). */
static inline __m512 block_scores(const uint16_t *qh, const __m512i *kt, int64_t d, float scale) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const int32_t *q = (const int32_t *)qh; /* d / 2 is a multiple of 8: head_dim is one of 16 */
    for (int64_t e = 0; e < d / 2; e += 4) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)kt[e], (__m512bh)_mm512_set1_epi32(q[e]));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)kt[e + 1], (__m512bh)_mm512_set1_epi32(q[e + 1]));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)kt[e + 2], (__m512bh)_mm512_set1_epi32(q[e + 2]));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)kt[e + 3], (__m512bh)_mm512_set1_epi32(q[e + 3]));
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    return _mm512_mul_ps(s, _mm512_set1_ps(scale));
}

/* acc[0 .. chunks * 16) += p[l] * vf[l] for l < live, key by key: `chunks` is a constant at each call site, so
 * the accumulators stay in registers (the operations are the same whatever the constant). */
static inline __attribute__((always_inline)) void weigh_values(float *acc, const float *p, const float *vf,
                                                               int64_t live, int64_t d, const int chunks) {
    __m512 o[8];
    for (int c = 0; c < chunks; c++) o[c] = _mm512_loadu_ps(acc + c * LANES);
    for (int64_t l = 0; l < live; l++) {
        const __m512 pl = _mm512_set1_ps(p[l]);
        for (int c = 0; c < chunks; c++) o[c] = _mm512_fmadd_ps(pl, _mm512_loadu_ps(vf + l * d + c * LANES), o[c]);
    }
    for (int c = 0; c < chunks; c++) _mm512_storeu_ps(acc + c * LANES, o[c]);
}

typedef struct { /* one task's key lists */
    int64_t context, stride, shared_len, widest;
    const int64_t *shared; /* page slots of list entries 0 .. shared_len - 1, the same for every query */
    const int64_t *tails; /* [tokens of the task][widest]: each token's visible pass keys, when not causal */
    const int64_t *tail_len;
} view;

/* The page slot of entry j of token ti's visible list (ti: the token's index among the task's tokens), or -1. */
static inline int64_t slot_of(const view *v, int64_t ti, int64_t j) {
    if (j < v->shared_len) return v->shared[j];
    if (!v->tails) return -1;
    j -= v->context;
    return j < v->tail_len[ti] ? v->tails[ti * v->widest + j] : -1;
}

/* Which list token ti reads block j0 from: -1 where every query's list holds the same keys there (the rows are
 * loaded once for all), else its own. */
static inline int64_t list_of(const view *v, int64_t ti, int64_t j0) {
    return v->tails == NULL || j0 + LANES <= v->shared_len ? -1 : ti;
}

/* Row pointers (base + slot) of the block's 16 list entries, NULL past the list. */
static inline void block_rows(const view *v, const uint16_t *base, int64_t ti, int64_t j0, const uint16_t *rows[LANES]) {
    for (int l = 0; l < LANES; l++) {
        const int64_t s = slot_of(v, ti, j0 + l);
        rows[l] = s >= 0 ? base + s * v->stride : NULL;
    }
}

/* The next block's shared rows, on their way to L1 while this block is computed: their slots follow the page
 * table, which the hardware's stride prefetcher does not follow. */
static inline void prefetch_rows(const view *v, const uint16_t *base, int64_t j0, int64_t d) {
    for (int64_t j = j0; j < j0 + LANES && j < v->shared_len; j++)
        for (int64_t e = 0; e < d; e += 32) _mm_prefetch((const char *)(base + v->shared[j] * v->stride + e), _MM_HINT_T0);
}

/* Softmax of scores[s0 .. end) by lanes of 16 (s0 a multiple of 16), as cpu_attention.c: the max, exp, their
 * sum; returns the sum, *max set. */
static float softmax16(float *s, int64_t s0, int64_t end, float *max) {
    __m512 mx = _mm512_set1_ps(-INFINITY), sums = _mm512_setzero_ps();
    for (int64_t j = s0; j < end; j += LANES) {
        const __mmask16 live = end - j >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (end - j)) - 1);
        mx = _mm512_mask_max_ps(mx, live, mx, _mm512_loadu_ps(s + j));
    }
    *max = _mm512_reduce_max_ps(mx);
    for (int64_t j = s0; j < end; j += LANES) {
        const __mmask16 live = end - j >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (end - j)) - 1);
        const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), _mm512_set1_ps(*max)));
        _mm512_mask_storeu_ps(s + j, live, p);
        sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(live, p));
    }
    return _mm512_reduce_add_ps(sums);
}

/* Task T's queries over the segments it covers (cpu_attention.h's SEGMENT): all of them, joined here in order and
 * written out, or, for a split task, segment T->seg alone (its [max, sum, o] left in the pass's partials). */
static void run_task(const grouped_args *G, const task *T, int64_t *shared, int64_t *tails, int64_t *tail_len,
                     float *scores, __m512i *kt, float *vf, float *acc, float *state) {
    const segment_pass *P = &G->P;
    const attention_args *A = P->A;
    const int64_t d = A->head_dim, per_group = A->heads / A->kv_heads, bs = A->block_size;
    const int64_t seq = T->seq, seq_len = A->seq_lens[seq], q_start = A->query_start[seq];
    const int64_t q_len = A->query_start[seq + 1] - q_start, context = seq_len - q_len;
    const int64_t first_token = T->first / per_group, last_token = (T->first + T->count - 1) / per_group;
    const int32_t *table = A->block_tables + seq * A->max_blocks;
    const int causal = G->causal[seq];
    const view v = {context, A->kv_heads * d, causal ? seq_len : context, G->widest, shared, causal ? NULL : tails,
                    tail_len};
    int64_t visible[MAX_QUERIES], longest = 0; /* per token of the task: its list's length */
    for (int64_t t = first_token; t <= last_token; t++) {
        const int64_t ti = t - first_token;
        visible[ti] = context + t + 1;
        if (!causal) {
            const uint8_t *mask = A->tree_mask + (q_start + t) * A->width;
            tail_len[ti] = 0;
            for (int64_t c = 0; c < q_len; c++)
                if (mask[c]) tails[ti * G->widest + tail_len[ti]++] = (int64_t)table[(context + c) / bs] * bs + (context + c) % bs;
            visible[ti] = context + tail_len[ti];
        }
        longest = visible[ti] > longest ? visible[ti] : longest;
    }
    int64_t tok[MAX_QUERIES], n[MAX_QUERIES], query[MAX_QUERIES]; /* query: its row of the output and partials */
    const uint16_t *qh[MAX_QUERIES];
    for (int64_t qi = 0; qi < T->count; qi++) {
        const int64_t t = (T->first + qi) / per_group, h = T->group * per_group + (T->first + qi) % per_group;
        tok[qi] = t - first_token, n[qi] = visible[t - first_token];
        qh[qi] = A->q + (q_start + t) * A->q_stride + h * d;
        query[qi] = (q_start + t) * A->heads + h;
        if (T->split && T->seg == 0) P->counts[query[qi]] = n[qi];
    }
    const int64_t lo = T->split ? T->seg * SEGMENT : 0, hi = T->split && lo + SEGMENT < longest ? lo + SEGMENT : longest;
    /* The shared entries this task reads (its segments, and the blocks its prefetches look ahead to), page by
     * page with no division per key: a split task fills its segment's, not the whole list. */
    const int64_t fill = hi + 4 * LANES < v.shared_len ? hi + 4 * LANES : v.shared_len;
    for (int64_t j = lo, b = lo / bs, o = lo % bs; j < fill; j++) {
        shared[j] = (int64_t)table[b] * bs + o;
        if (++o == bs) b++, o = 0;
    }
    const int64_t row = (P->longest + LANES - 1) / LANES * LANES; /* scores by list entry */
    const uint16_t *kbase = A->k_cache + T->group * d, *vbase = A->v_cache + T->group * d;
    const uint16_t *rows[LANES];
    for (int64_t j0 = lo; j0 < hi; j0 += LANES) { /* the scores */
        prefetch_rows(&v, kbase, j0 + 3 * LANES, d);
        int64_t have = -2; /* which list kt holds (list_of), -2 none */
        for (int64_t qi = 0; qi < T->count; qi++) {
            if (n[qi] <= j0) continue;
            const int64_t want = list_of(&v, tok[qi], j0);
            if (want != have) {
                block_rows(&v, kbase, tok[qi], j0, rows);
                transpose_keys(rows, d, kt);
                have = want;
            }
            _mm512_storeu_ps(scores + qi * row + j0, block_scores(qh[qi], kt, d, A->scale));
        }
    }
    /* Segment by segment: each query's softmax there, its weighted sum of V key by key in list order (each block
     * of rows converted once for its readers), and the join. */
    const int64_t chunks = d / LANES;
    float seg_max[MAX_QUERIES], seg_sum[MAX_QUERIES], max[MAX_QUERIES], sum[MAX_QUERIES];
    for (int64_t s0 = lo; s0 < hi; s0 += SEGMENT) {
        const int64_t s_end = s0 + SEGMENT < hi ? s0 + SEGMENT : hi;
        for (int64_t qi = 0; qi < T->count; qi++) {
            if (n[qi] <= s0) continue;
            seg_sum[qi] = softmax16(scores + qi * row, s0, n[qi] < s_end ? n[qi] : s_end, &seg_max[qi]);
            memset(acc + qi * d, 0, sizeof(float) * (size_t)d);
        }
        for (int64_t j0 = s0; j0 < s_end; j0 += LANES) {
            prefetch_rows(&v, vbase, j0 + 3 * LANES, d);
            int64_t have = -2;
            for (int64_t qi = 0; qi < T->count; qi++) {
                if (n[qi] <= j0) continue;
                const int64_t want = list_of(&v, tok[qi], j0);
                if (want != have) {
                    block_rows(&v, vbase, tok[qi], j0, rows);
                    for (int l = 0; l < LANES; l++)
                        for (int64_t c = 0; c < chunks; c++)
                            _mm512_storeu_ps(vf + l * d + c * LANES,
                                             rows[l] ? load_bf16(rows[l] + c * LANES) : _mm512_setzero_ps());
                    have = want;
                }
                const float *p = scores + qi * row + j0;
                const int64_t live = n[qi] - j0 < LANES ? n[qi] - j0 : LANES;
                float *a = acc + qi * d;
                switch (chunks) {
                    case 2: weigh_values(a, p, vf, live, d, 2); break;
                    case 4: weigh_values(a, p, vf, live, d, 4); break;
                    case 8: weigh_values(a, p, vf, live, d, 8); break;
                    default:
                        for (int64_t c = 0; c < chunks; c++) weigh_values(a + c * LANES, p, vf + c * LANES, live, d, 1);
                }
            }
        }
        for (int64_t qi = 0; qi < T->count; qi++) {
            if (n[qi] <= s0) continue;
            keep_segment(P, T, query[qi], seg_max[qi], seg_sum[qi], acc + qi * d, &max[qi], &sum[qi], state + qi * d,
                         s0 == 0);
        }
    }
    if (T->split) return;
    for (int64_t qi = 0; qi < T->count; qi++) write_query(A, query[qi], state + qi * d, sum[qi], n[qi]);
}

static void grouped_part(const void *a, int64_t part, int64_t parts) {
    static __thread void *bufs[6];
    static __thread size_t caps[6];
    const grouped_args *G = a;
    const segment_pass *P = &G->P;
    const int64_t row = (P->longest + LANES - 1) / LANES * LANES;
    int64_t *shared = scratch(&bufs[0], &caps[0], sizeof(int64_t) * (size_t)(P->longest + 1));
    int64_t *tails = scratch(&bufs[1], &caps[1], sizeof(int64_t) * (size_t)(MAX_QUERIES * G->widest + 1));
    float *scores = scratch(&bufs[2], &caps[2], sizeof(float) * (size_t)(MAX_QUERIES * row));
    float *vf = scratch(&bufs[3], &caps[3], sizeof(float) * LANES * 256);
    float *acc = scratch(&bufs[4], &caps[4], sizeof(float) * MAX_QUERIES * 256);
    float *state = scratch(&bufs[5], &caps[5], sizeof(float) * MAX_QUERIES * 256);
    int64_t tail_len[MAX_QUERIES];
    __m512i kt[128];
    if (!(shared && tails && scores && vf && acc && state)) return;
    for (int64_t t = 0; t < P->num_tasks; t++)
        if (task_in_part(P->tasks, P->num_tasks, t, part, parts))
            run_task(G, P->tasks + t, shared, tails, tail_len, scores, kt, vf, acc, state);
}

/* A sequence's visible lists are prefixes of one list when it has no tree mask or its mask is the causal one. */
static int is_causal(const attention_args *A, int64_t seq) {
    if (!A->tree_mask) return 1;
    const int64_t q0 = A->query_start[seq], q_len = A->query_start[seq + 1] - q0;
    for (int64_t i = 0; i < q_len; i++)
        for (int64_t c = 0; c < q_len; c++)
            if (A->tree_mask[(q0 + i) * A->width + c] != (c <= i)) return 0;
    return 1;
}

int grouped_attention(const attention_args *A, int threads) {
    int64_t k = 0, longest = 0, widest = 1;
    /* One task per KV head and sequence first: where that leaves fewer than two a thread (decode steps, small
     * trees: 3 tasks on 2 threads left one idle a third of the time), run_split cuts them by segment. */
    task *tasks = plan_tasks(A, 1, MAX_QUERIES, &k);
    uint8_t *causal = malloc((size_t)A->num_seqs + 1);
    if (!tasks || !causal) {
        free(tasks), free(causal);
        return -1;
    }
    for (int64_t s = 0; s < A->num_seqs; s++) {
        const int64_t q_len = A->query_start[s + 1] - A->query_start[s];
        causal[s] = (uint8_t)is_causal(A, s);
        longest = A->seq_lens[s] > longest ? A->seq_lens[s] : longest;
        widest = q_len > widest ? q_len : widest;
    }
    grouped_args G = {{A, tasks, k, longest, 0, NULL, NULL}, causal, widest};
    if (!run_split(&G.P, grouped_part, threads)) {
        if (threads > 1) {
            free(tasks);
            tasks = plan_tasks(A, threads, MAX_QUERIES, &k);
            G.P.tasks = tasks, G.P.num_tasks = tasks ? k : 0;
        }
        if (G.P.num_tasks > 0) run_parallel(grouped_part, &G, (int)(k < threads ? k : threads));
    }
    const int ok = tasks != NULL;
    free(tasks), free(causal);
    return ok ? 0 : -1;
}

#endif
