/* Paged attention with tasks of queries that read the same keys, for CPUs with AVX2 and FMA but not AVX-512 (the
 * grouped idea of cpu_attention_grouped.c without its bf16 dot products; the dispatch and the arithmetic contract
 * are in cpu_attention.c): up to GQ queries of one sequence and KV head, whose key and value rows are converted
 * to float32 once per block of KB list entries for every query reading them, instead of once per query. Each
 * query's arithmetic is `attend`'s AVX2 loop step for step (the same FMA chain per key, and per segment of its
 * list the same softmax8 (cpu_attention_avx2.h), weighted sum in key order and join (cpu_attention.h)): the per-query build
 * (-DSPECDESK_PER_QUERY) gives the same bits, a test says so.
 *
 * Why segments: a decode step has one task per KV head (3 for the default model), and 3 tasks on 2 threads
 * left one thread idle a third of the time while the other read two heads' pages. Where the tasks are that
 * few, each is cut by segment, the segments run as tasks of their own, and a last parallel step joins each
 * query's segments; the arithmetic is the same either way, since a query's segments are always joined one by
 * one in order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.h"
#include "cpu_attention_avx2.h"
#include "cpu_common.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__) && !defined(SPECDESK_PER_QUERY)
#define GQ 64 /* queries a task may hold: a tree of up to 21 tokens (3 heads each) stays one task per KV head, cut by
                * segment over the threads, so each key row is converted once (at 32, trees of 11 tokens and more
                * were split in two) */
#define KB 16
#define PREFETCH 2 /* blocks ahead (prefetch_block) */
#define PREFETCH_QUERIES 16 /* in tasks of at most this many queries, and in every tree verification */

typedef segment_pass group_tasks; /* cpu_attention.h */

/* The list that holds entry j (from lo) of a query's keys in a tree's task: the context part built once before
 * `own`, the query's own list from there (run_group). */
static inline const int64_t *list_at(const int64_t *shared, const int64_t *mine, int64_t own, int64_t j) {
    return j < own ? shared : mine;
}

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
    if (keys == 8)
        _mm256_storeu_ps(out, _mm256_mul_ps(hsum8x8(s), _mm256_set1_ps(scale)));
    else
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

/* Task T's queries over the segments it covers: all of them (joined here, in order, and written out), or, for a
 * split task, segment T->seg alone (its [max, sum, o] kept in G->partials for run_split's join). */
static void run_group(const group_tasks *G, const attention_task *T, int64_t *slots, float *scores, float *rows,
                      float *acc, float *state) {
    const attention_args *A = G->A;
    const int64_t d = A->head_dim, per_group = A->heads / A->kv_heads, stride = A->kv_heads * d;
    const int64_t seq = T->seq, group = T->group, first = T->first, count = T->count;
    const int64_t list = G->longest + 1, q_start = A->query_start[seq];
    const int64_t lo = T->split ? T->seg * SEGMENT : 0, hi = T->split ? lo + SEGMENT : INT64_MAX;
    int64_t n[GQ], most = 0, longest = 0; /* longest: the query whose list is longest (its entries are prefetched) */
    int64_t query[GQ]; /* token * heads + head: the query's row of the output and of the partials */
    const uint16_t *qh[GQ];
    const int64_t *keys[GQ]; /* each query's visible list from entry lo (page slots); a token's heads share it */
    /* Without a tree mask each token's list is the start of the task's last token's: one list serves all. */
    const int64_t last = q_start + (first + count - 1) / per_group;
    const int64_t n_last = A->tree_mask ? 0 : visible_range(A, last, lo, hi, slots);
    /* With one, every token's list starts with the same context keys: that part is built once (`shared`, after
     * the GQ lists), and a token's own list holds entries from `own` on (the block where the context ends),
     * so its blocks before `own` read `shared`: no context walked per token, no block compared per query. */
    int64_t *shared = slots + GQ * list, own = 0;
    if (A->tree_mask) {
        const int64_t context = A->seq_lens[seq] - (A->query_start[seq + 1] - q_start);
        const int64_t in_context = (context < hi ? context : hi) - lo;
        if (in_context > 0) {
            visible_range(A, q_start, lo, lo + in_context, shared);
            own = in_context / KB * KB;
        }
    }
    for (int64_t qi = 0; qi < count; qi++) {
        const int64_t token = q_start + (first + qi) / per_group, h = group * per_group + (first + qi) % per_group;
        query[qi] = token * A->heads + h;
        qh[qi] = A->q + token * A->q_stride + h * d;
        if (!A->tree_mask) {
            keys[qi] = slots, n[qi] = n_last - (last - token);
        } else if (qi > 0 && (first + qi) % per_group != 0) {
            keys[qi] = keys[qi - 1], n[qi] = n[qi - 1];
        } else {
            keys[qi] = slots + qi * list;
            n[qi] = visible_range(A, token, lo + own, hi, slots + qi * list + own);
        }
        if (n[qi] > most) most = n[qi], longest = qi;
        if (T->split && T->seg == 0) G->counts[query[qi]] = n[qi];
    }
    const int64_t end = most < hi ? most : hi, row = (T->split ? SEGMENT : G->longest) + 8;
    /* Prefetching pays where few queries share a block (decode, small trees) and in a tree verification, whose
     * keys come from memory (a step's weights have pushed them out of the caches) while its queries, up to 3 per
     * node, hide too little of that (a tree of 17 on 1000 keys, 30 layers' pages: 1.2-1.5x with it,
     * benchmarks.attention_ab); in a prefill chunk's many queries the prefetches only cost instructions. */
    const int prefetch = count <= PREFETCH_QUERIES || A->tree_mask;
    const int64_t *ahead = keys[longest]; /* list entries lo .. end, from 0 */
    const uint16_t *kb = A->k_cache + group * d, *vb = A->v_cache + group * d;
    float seg_max[GQ], seg_sum[GQ], max[GQ], sum[GQ];
    for (int64_t b = 0; prefetch && b < PREFETCH; b++)
        prefetch_block(kb, stride, list_at(shared, ahead, own, b * KB), b * KB, end - lo, d);
    /* The scores of every entry, then, segment by segment, its softmax, its weighted sum of V and the join: each
     * stream read front to back as one (the hardware's prefetchers follow it). */
    for (int pass = 0; pass < 2; pass++) {
        const uint16_t *base = pass ? vb : kb;
        for (int64_t s0 = lo; s0 < end; s0 += SEGMENT) {
            const int64_t s_end = s0 + SEGMENT < end ? s0 + SEGMENT : end;
            for (int64_t qi = 0; pass == 1 && qi < count; qi++) {
                if (n[qi] <= s0) continue;
                float *sc = scores + qi * row + (s0 - lo);
                const int64_t live = (n[qi] < s_end ? n[qi] : s_end) - s0;
                seg_max[qi] = max8(sc, live);
                seg_sum[qi] = softmax8(sc, live, seg_max[qi]);
                memset(acc + qi * d, 0, sizeof(float) * (size_t)d);
            }
            for (int64_t j0 = s0; j0 < s_end; j0 += KB) { /* a block of list entries at a time, in list order */
                if (prefetch && j0 + PREFETCH * KB < end) { /* else the values' first blocks, after the keys */
                    const int64_t next = j0 - lo + PREFETCH * KB;
                    prefetch_block(base, stride, list_at(shared, ahead, own, next), next, end - lo, d);
                } else if (prefetch && pass == 0) {
                    const int64_t next = (j0 + PREFETCH * KB - end) / KB * KB;
                    prefetch_block(vb, stride, list_at(shared, ahead, own, next), next, end - lo, d);
                }
                const int64_t *have = NULL; /* the slots `rows` holds, for have_live entries */
                int64_t have_live = 0;
                for (int64_t qi = 0; qi < count; qi++) {
                    if (n[qi] <= j0) continue;
                    const int64_t live = n[qi] - j0 < KB ? n[qi] - j0 : KB;
                    const int64_t *sl = list_at(shared, keys[qi], own, j0 - lo) + (j0 - lo);
                    if (!have || have_live < live || (have != sl && memcmp(have, sl, sizeof(int64_t) * (size_t)live))) {
                        convert_rows(base, stride, sl, live, d, rows);
                        have = sl, have_live = live;
                    }
                    if (pass == 0)
                        score_rows(qh[qi], rows, live, d, A->scale, scores + qi * row + (j0 - lo));
                    else
                        weigh_rows(scores + qi * row + (j0 - lo), rows, live, d, acc + qi * d);
                }
            }
            for (int64_t qi = 0; pass == 1 && qi < count; qi++) {
                if (n[qi] <= s0) continue;
                keep_segment(G, T, query[qi], seg_max[qi], seg_sum[qi], acc + qi * d, &max[qi], &sum[qi],
                             state + qi * d, s0 == 0);
            }
        }
    }
    if (T->split) return;
    for (int64_t qi = 0; qi < count; qi++) write_query(A, query[qi], state + qi * d, sum[qi], n[qi]);
}

static void group_part(const void *a, int64_t part, int64_t parts) {
    static __thread void *bufs[5];
    static __thread size_t caps[5];
    const group_tasks *G = a;
    const int64_t d = G->A->head_dim;
    int64_t *slots = scratch(&bufs[0], &caps[0], sizeof(int64_t) * (size_t)((GQ + 1) * (G->longest + 1)));
    float *scores = scratch(&bufs[1], &caps[1], sizeof(float) * (size_t)(GQ * (G->longest + 8)));
    float *rows = scratch(&bufs[2], &caps[2], sizeof(float) * (size_t)(KB * d));
    float *acc = scratch(&bufs[3], &caps[3], sizeof(float) * (size_t)(GQ * d));
    float *state = scratch(&bufs[4], &caps[4], sizeof(float) * (size_t)(GQ * d));
    if (!(slots && scores && rows && acc && state)) return;
    for (int64_t t = 0; t < G->num_tasks; t++)
        if (task_in_part(G->tasks, G->num_tasks, t, part, parts))
            run_group(G, G->tasks + t, slots, scores, rows, acc, state);
}

/* The pass: where one task per KV head and sequence (plan_tasks for one thread) leaves fewer than two a thread
 * (decode steps, small trees), those tasks cut by segment (run_split), so that each key is still read once; else
 * tasks of plan_tasks for the threads. Returns -1 if out of memory. */
int grouped_avx2(const attention_args *A, int threads) {
    int64_t k = 0, longest = 0;
    for (int64_t s = 0; s < A->num_seqs; s++) longest = A->seq_lens[s] > longest ? A->seq_lens[s] : longest;
    attention_task *tasks = plan_tasks(A, 1, GQ, &k);
    if (!tasks) return -1;
    group_tasks G = {A, tasks, k, longest, 0, NULL, NULL};
    if (run_split(&G, group_part, threads)) {
        free(tasks);
        return 0;
    }
    if (threads > 1) {
        free(tasks);
        if (!(tasks = plan_tasks(A, threads, GQ, &k))) return -1;
        G.tasks = tasks;
    }
    G.num_tasks = k;
    if (k > 0) run_parallel(group_part, &G, (int)(k < threads ? k : threads));
    free(tasks);
    return 0;
}
#endif
