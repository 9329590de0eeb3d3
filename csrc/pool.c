/* pool.c - CPU feature detection, the kernels' thread pool, aligned allocations.
 *
 * The pool's threads are created once. A dispatch publishes a job and bumps a generation
 * counter; idle workers spin on it for a short while (decode calls kernels back to back, so
 * the next job usually arrives within microseconds) and then sleep on a futex. The caller is
 * worker 0 and takes chunks like the others, then waits for the stragglers. All state lives in
 * the fic_pool object; nothing is global. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "fic.h"
#include "pool.h"

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax(void) { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax(void) { __asm__ __volatile__("yield" ::: "memory"); }
#else
static inline void cpu_relax(void) {}
#endif

/* ---- CPU features ------------------------------------------------------------------------ */

int fic_impl_available(int impl) {
    switch (impl) {
    case FIC_IMPL_REF:
        return 1;
#if defined(__x86_64__) && defined(__GNUC__)
    case FIC_IMPL_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case FIC_IMPL_AVX512:
        /* libgcc's checks include the OS's XSAVE state (xgetbv) for AVX and AVX-512. */
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON:
        return 1; /* NEON and fp16 conversions are baseline on AArch64 */
#endif
    default:
        return 0;
    }
}

int fic_impl_best(void) {
    static const int order[] = {FIC_IMPL_AVX512, FIC_IMPL_AVX2, FIC_IMPL_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (fic_impl_available(order[i])) return order[i];
    return FIC_IMPL_REF;
}

/* ---- thread pool ------------------------------------------------------------------------- */

/* How long an idle worker spins before it sleeps: longer than the gap between a decode step's
 * kernel calls (Python runs in between), short enough not to burn a core between requests.
 * Time-based because PAUSE lasts from a few to ~140 cycles depending on the CPU. */
#define SPIN_NS 300000
#define SPIN_CHECK 64 /* pauses between clock reads */
#define CACHE_LINE 64

struct fic_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t busy; /* held by the thread dispatching a job */
    /* the job, written before `gen` is bumped */
    fic_range_fn fn;
    void *ctx;
    int64_t n, chunk;
    _Alignas(CACHE_LINE) atomic_uint gen; /* futex word: bumped per job (and on shutdown) */
    atomic_int n_sleeping;
    atomic_int stop;
    _Alignas(CACHE_LINE) atomic_llong next; /* next item to hand out */
    _Alignas(CACHE_LINE) atomic_int pending; /* workers (not counting the caller) still in the job */
};

struct worker_arg {
    fic_pool *pool;
    int tid;
};

static void futex_wait(atomic_uint *addr, unsigned expected) {
#if defined(__linux__)
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
    (void)addr; (void)expected;
    sched_yield();
#endif
}

static void futex_wake_all(atomic_uint *addr) {
#if defined(__linux__)
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

static void run_chunks(fic_pool *p, int tid) {
    const int64_t n = p->n, chunk = p->chunk;
    for (;;) {
        int64_t begin = atomic_fetch_add_explicit(&p->next, chunk, memory_order_relaxed);
        if (begin >= n) break;
        int64_t end = begin + chunk < n ? begin + chunk : n;
        p->fn(p->ctx, begin, end, tid);
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static unsigned wait_for_job(fic_pool *p, unsigned seen) {
    const int64_t deadline = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
        if (i % SPIN_CHECK == 0 && now_ns() > deadline) break;
    }
    for (;;) {
        atomic_fetch_add(&p->n_sleeping, 1);
        futex_wait(&p->gen, seen); /* returns at once if gen already moved on */
        atomic_fetch_sub(&p->n_sleeping, 1);
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
    }
}

static void *worker_main(void *arg) {
    struct worker_arg *wa = arg;
    fic_pool *p = wa->pool;
    int tid = wa->tid;
    free(wa);
    unsigned seen = 0; /* gen's value at creation: no job can be published before create returns */
    for (;;) {
        seen = wait_for_job(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) break;
        run_chunks(p, tid);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_shutdown(fic_pool *p, int n_started) {
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    futex_wake_all(&p->gen);
    for (int i = 0; i < n_started; i++) pthread_join(p->threads[i], NULL);
}

int fic_pool_create(int n_threads, fic_pool **out) {
    if (out == NULL || n_threads < 1) return FIC_ERR_ARG;
    *out = NULL;
    fic_pool *p = aligned_alloc(CACHE_LINE, (sizeof *p + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE);
    if (p == NULL) return FIC_ERR_NOMEM;
    memset(p, 0, sizeof *p);
    p->n_threads = n_threads;
    atomic_init(&p->gen, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->next, 0);
    atomic_init(&p->pending, 0);
    if (pthread_mutex_init(&p->busy, NULL) != 0) {
        free(p);
        return FIC_ERR_THREAD;
    }
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    if (p->threads == NULL) {
        pthread_mutex_destroy(&p->busy);
        free(p);
        return FIC_ERR_NOMEM;
    }
    for (int i = 0; i < n_threads - 1; i++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        int rc = wa == NULL ? ENOMEM : 0;
        if (wa != NULL) {
            wa->pool = p;
            wa->tid = i + 1;
            rc = pthread_create(&p->threads[i], NULL, worker_main, wa);
            if (rc != 0) free(wa);
        }
        if (rc != 0) {
            pool_shutdown(p, i);
            free(p->threads);
            pthread_mutex_destroy(&p->busy);
            free(p);
            return rc == ENOMEM ? FIC_ERR_NOMEM : FIC_ERR_THREAD;
        }
    }
    *out = p;
    return FIC_OK;
}

void fic_pool_destroy(fic_pool *pool) {
    if (pool == NULL) return;
    pool_shutdown(pool, pool->n_threads - 1);
    free(pool->threads);
    pthread_mutex_destroy(&pool->busy);
    free(pool);
}

int fic_pool_threads(const fic_pool *pool) { return pool == NULL ? 1 : pool->n_threads; }

static void run_inline(int64_t n, int64_t chunk, fic_range_fn fn, void *ctx) {
    for (int64_t b = 0; b < n; b += chunk) fn(ctx, b, b + chunk < n ? b + chunk : n, 0);
}

void fic_parallel_for(fic_pool *pool, int64_t n, int64_t chunk, fic_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (chunk < 1) chunk = 1;
    /* One chunk, one thread, or a pool in use by another caller: no dispatch. */
    if (pool == NULL || pool->n_threads == 1 || n <= chunk || pthread_mutex_trylock(&pool->busy) != 0) {
        run_inline(n, chunk, fn, ctx);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n = n;
    pool->chunk = chunk;
    atomic_store_explicit(&pool->next, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->pending, pool->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: pairs with the sleepers' n_sleeping increment */
    if (atomic_load(&pool->n_sleeping) > 0) futex_wake_all(&pool->gen);
    run_chunks(pool, 0);
    /* The others finish their last chunk about when we do: spin, yielding only if one was
     * descheduled. */
    for (int spins = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; spins++) {
        if (spins < (1 << 14)) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool->busy);
}

/* ---- memory ------------------------------------------------------------------------------ */

#define SMALL_ALIGN ((size_t)4096)
#define HUGE_ALIGN ((size_t)2 << 20)

void *fic_alloc(size_t n_bytes, int huge) {
    if (n_bytes == 0) return NULL;
    size_t align = huge ? HUGE_ALIGN : SMALL_ALIGN;
    if (n_bytes > SIZE_MAX - align) return NULL;
    size_t size = (n_bytes + align - 1) / align * align;
    void *p = NULL;
    if (posix_memalign(&p, align, size) != 0) return NULL;
#if defined(MADV_HUGEPAGE)
    /* Before the first touch, so the pages fault in huge (THP is madvise-only on many hosts). */
    if (huge) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
    memset(p, 0, size);
    return p;
}

void fic_free(void *p) { free(p); }
