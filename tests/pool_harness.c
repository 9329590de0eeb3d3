/* pool_harness.c - the thread pool alone, without Python: a stress test (run under
 * ThreadSanitizer) and the round trip of an empty fic_parallel_for.
 *
 *   gcc -O1 -g -fsanitize=thread -pthread -Icsrc tests/pool_harness.c csrc/pool.c -o /tmp/pool_tsan
 *   /tmp/pool_tsan stress [iterations]      # every thread count 2..8, ctx on the caller's stack
 *   gcc -O2 -pthread -Icsrc tests/pool_harness.c csrc/pool.c -o /tmp/pool_rt
 *   /tmp/pool_rt rt [calls] [threads]       # ns per empty parallel_for (2 chunks)
 *
 * Exit status 0 on success; prints one summary line. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fic.h"
#include "pool.h"

typedef struct {
    int64_t *out; /* out[i] = i * mul + add; each item written by exactly one chunk */
    int64_t mul, add;
    int n_threads;
    int bad_tid;
} stress_ctx;

static void stress_fn(void *vctx, int64_t begin, int64_t end, int tid) {
    stress_ctx *c = vctx;
    if (tid < 0 || tid >= c->n_threads) c->bad_tid = 1; /* only tid 0 (the caller) can race here */
    for (int64_t i = begin; i < end; i++) c->out[i] += i * c->mul + c->add;
}

static void empty_fn(void *ctx, int64_t begin, int64_t end, int tid) {
    (void)ctx; (void)begin; (void)end; (void)tid;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int stress(int iters) {
    uint64_t rng = 88172645463325252ull;
    int64_t checked = 0;
    for (int nt = 2; nt <= 8; nt++) {
        fic_pool *pool;
        if (fic_pool_create(nt, &pool) != FIC_OK) return fprintf(stderr, "create %d failed\n", nt), 1;
        for (int it = 0; it < iters; it++) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            int64_t n = 1 + (int64_t)(rng % 3000), chunk = 1 + (int64_t)((rng >> 20) % 257);
            int64_t buf[3000]; /* on this stack frame: a late worker must never write it */
            memset(buf, 0, sizeof buf);
            stress_ctx c = {buf, (int64_t)(rng >> 40) % 1000, it, nt, 0};
            fic_parallel_for(pool, n, chunk, stress_fn, &c);
            for (int64_t i = 0; i < n; i++)
                if (buf[i] != i * c.mul + c.add) {
                    fprintf(stderr, "threads %d iter %d n %lld chunk %lld: item %lld wrong\n", nt, it, (long long)n,
                            (long long)chunk, (long long)i);
                    return 1;
                }
            if (c.bad_tid) return fprintf(stderr, "bad tid\n"), 1;
            checked += n;
            if (it % 64 == 0) fic_parallel_for(pool, 5, 1, empty_fn, NULL); /* tiny jobs too */
        }
        fic_pool_destroy(pool);
    }
    printf("stress ok: threads 2..8, %d calls each, %lld items checked\n", iters, (long long)checked);
    return 0;
}

static int round_trip(int calls, int nt) {
    fic_pool *pool;
    if (fic_pool_create(nt, &pool) != FIC_OK) return 1;
    for (int i = 0; i < 1000; i++) fic_parallel_for(pool, 2, 1, empty_fn, NULL);
    int64_t best = INT64_MAX;
    for (int r = 0; r < 5; r++) {
        int64_t t0 = now_ns();
        for (int i = 0; i < calls; i++) fic_parallel_for(pool, 2, 1, empty_fn, NULL);
        int64_t dt = now_ns() - t0;
        best = dt < best ? dt : best;
    }
    fic_pool_destroy(pool);
    printf("empty parallel_for, %d threads, 2 chunks: %.0f ns per call (best of 5 x %d)\n", nt,
           (double)best / calls, calls);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "stress";
    if (strcmp(mode, "stress") == 0) return stress(argc > 2 ? atoi(argv[2]) : 2000);
    if (strcmp(mode, "rt") == 0) return round_trip(argc > 2 ? atoi(argv[2]) : 100000, argc > 3 ? atoi(argv[3]) : 2);
    fprintf(stderr, "usage: %s stress [iters] | rt [calls] [threads]\n", argv[0]);
    return 2;
}
