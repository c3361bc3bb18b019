/* The CPU kernels' thread pool: run_parallel(fn, args, parts) runs fn on the caller and parts - 1 workers.
 *
 * A small pool of our own, not OpenMP. libgomp throttles its workers to a few spins and then
 * sleeps them whenever it manages more threads than there are CPUs, which is always the case when the calls
 * come from a thread other than the process's first (the engine's loop thread): every parallel region then
 * pays a futex wake-up, and a decode step has 120 of them (measured: a 3072x576 linear took 2.2x as long in
 * a second thread as in the main one).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "cpu_common.h"

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
