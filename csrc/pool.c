/* pool.c - CPU feature detection, the kernels' thread pool, aligned allocations.
 *
 * The pool's threads are created once. A dispatch publishes a job (a chunk count and a chunk
 * counter in one word) and bumps a generation counter; the caller is worker 0 and takes chunks
 * like the others. It returns once every chunk is finished, whoever ran it, so a worker the OS
 * has not scheduled yet costs nothing (the running threads take its share). Idle workers spin
 * for a short while, then yield, then sleep on a futex. The protocol is described at the pool's
 * code below. All state lives in the fic_pool object; the one global is the CPU's features, set
 * once (pthread_once) and read-only afterwards. */
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

/* What the CPU has, asked once (pthread_once) and read-only afterwards: the kernels pick their
 * table from it on every call (kernels.c), so no call asks the CPU again. */
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;
static fic_cpu_features cpu_features;

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
/* AMX-TILE and AMX-INT8 (CPUID.7.0:EDX bits 24, 25), and Linux's permission for the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18; Linux 5.16 on): without it the first tile load
 * faults. Asked once, for the whole process. FIC_NO_AMX=1 in the environment leaves the tiles off
 * (to compare against the AVX-512 kernels in one build). */
static int amx_granted(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    const char *off = getenv("FIC_NO_AMX");
    if (off != NULL && off[0] != '\0' && off[0] != '0') return 0;
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((lo >> 17) & 3) == 3; /* XCR0: tile config and tile data enabled */
#else
    return 0;
#endif
}
#endif

static void cpu_detect(void) {
    fic_cpu_features c = {0, 0, 0, 0, 0, 0};
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    /* libgcc's checks include the OS's XSAVE state (xgetbv) for AVX and AVX-512. */
    c.avx512 = c.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    c.avx512_vnni = c.avx512 && __builtin_cpu_supports("avx512vnni");
    c.avx512_q1 = c.avx512_vnni && __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("avx512vbmi") &&
                  __builtin_cpu_supports("gfni"); /* the tier's Q4 code (kernels_q4_vnni.h) takes GFNI */
    c.amx_int8 = c.avx512_q1 && amx_granted();
    /* FIC_CPU_CAP=avx2|avx512|avx512_vnni|avx512_q1 caps the features at that tier, so a lesser
     * CPU's tables run here (tests compare each tier's copy of a kernel on one machine). */
    const char *cap = getenv("FIC_CPU_CAP");
    if (cap != NULL && cap[0] != '\0') {
        const int avx512 = strcmp(cap, "avx2") != 0, vnni = avx512 && strcmp(cap, "avx512") != 0,
                  q1 = vnni && strcmp(cap, "avx512_vnni") != 0;
        c.avx512 &= avx512;
        c.avx512_vnni &= vnni;
        c.avx512_q1 &= q1;
        c.amx_int8 &= q1 && strcmp(cap, "avx512_q1") != 0;
    }
#endif
#if defined(__aarch64__)
    c.neon = 1; /* NEON and fp16 conversions are baseline on AArch64 */
#endif
    cpu_features = c;
}

const fic_cpu_features *fic_cpu_features_get(void) {
    pthread_once(&cpu_once, cpu_detect);
    return &cpu_features;
}

int fic_impl_available(int impl) {
    const fic_cpu_features *c = fic_cpu_features_get();
    switch (impl) {
    case FIC_IMPL_REF: return 1;
    case FIC_IMPL_AVX2: return c->avx2;
    case FIC_IMPL_AVX512: return c->avx512;
    case FIC_IMPL_NEON: return c->neon;
    default: return 0;
    }
}

int fic_amx_available(void) { return fic_cpu_features_get()->amx_int8; }

int fic_impl_best(void) {
    static const int order[] = {FIC_IMPL_AVX512, FIC_IMPL_AVX2, FIC_IMPL_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (fic_impl_available(order[i])) return order[i];
    return FIC_IMPL_REF;
}

/* ---- thread pool ------------------------------------------------------------------------- */

/* Protocol (one job at a time; `busy` serializes callers):
 *
 * - claim: one 64-bit word, [total chunks : 32 | next chunk : 32]. The caller writes the job
 *   (fn, ctx, n, chunk), sets done = 0, then stores claim = total << 32 with release. Anyone
 *   (caller or worker) takes a chunk with fetch_add(claim, 1): the old value says how many
 *   chunks the *current* job has and which one was taken, atomically, so a taker with
 *   next < total owns a chunk of a live job, and one with next >= total owns nothing and reads
 *   nothing else. A worker that wakes late, or after the caller returned, only bumps `next`
 *   past the end of a finished job (or takes a chunk of the next job, which is as valid).
 * - done: chunks finished. The caller returns once done == total, so it never waits for a
 *   worker that has not started (or never wakes): only for chunks actually taken. A taker
 *   reads the job fields only between its successful claim and its done increment, and the
 *   job cannot complete (so its caller cannot return, and no caller can rewrite the fields)
 *   in between: no late worker touches a returned caller's ctx.
 * - gen: futex word bumped per job to wake workers. Idle workers spin with PAUSE briefly, then
 *   spin with sched_yield (so a busy machine's other threads, including our own caller, get
 *   the core), then sleep on the futex.
 * - The caller, once no chunk is left to take, spins briefly on done, then sleeps on it (a
 *   taker that was preempted mid-chunk then gets the caller's core). */

/* Idle workers: PAUSE-spin for SPIN_NS, then sched_yield-spin up to YIELD_NS (longer than the
 * gap between a decode step's kernel calls, with Python in between), then sleep. Time-based
 * because PAUSE lasts from a few to ~140 cycles depending on the CPU. */
#define SPIN_NS 30000
#define YIELD_NS 300000
#define WAIT_SPIN_NS 20000 /* the caller's spin on the last chunks before it sleeps */
#define SPIN_CHECK 32      /* pauses between clock reads */
#define CACHE_LINE 64
#define MAX_CHUNKS ((int64_t)1 << 30)

struct fic_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t busy; /* held by the thread dispatching a job */
    /* the job: written by the caller before `claim` is published, read by a taker only while
     * it holds a chunk */
    fic_range_fn fn;
    void *ctx;
    int64_t n, chunk;
    _Alignas(CACHE_LINE) atomic_uint gen; /* futex word: bumped per job (and on shutdown) */
    atomic_int n_sleeping;
    atomic_int stop;
    _Alignas(CACHE_LINE) atomic_ullong claim; /* [total : 32 | next : 32] */
    _Alignas(CACHE_LINE) atomic_uint done;    /* chunks finished; futex word for the caller */
    atomic_int caller_sleeping;
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

/* Takes and runs chunks of the current job until none is left. */
static void run_chunks(fic_pool *p, int tid) {
    for (;;) {
        uint64_t c = atomic_fetch_add_explicit(&p->claim, 1, memory_order_acquire);
        uint64_t total = c >> 32, i = c & 0xffffffffu;
        if (i >= total) return; /* nothing of a live job: touch nothing else */
        const int64_t n = p->n, chunk = p->chunk;
        int64_t begin = (int64_t)i * chunk;
        int64_t end = n - begin > chunk ? begin + chunk : n;
        p->fn(p->ctx, begin, end, tid);
        /* seq_cst: pairs with the caller's caller_sleeping store (Dekker) */
        unsigned d = atomic_fetch_add(&p->done, 1) + 1;
        if (d == (unsigned)total && atomic_load(&p->caller_sleeping)) futex_wake_all(&p->done);
        /* from here the job may be over: only the pool itself is touched */
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static unsigned wait_for_job(fic_pool *p, unsigned seen) {
    const int64_t start = now_ns();
    for (int i = 1;; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
        if (i % SPIN_CHECK == 0 && now_ns() - start > SPIN_NS) break;
    }
    for (int i = 1;; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        sched_yield();
        if (i % 4 == 0 && now_ns() - start > YIELD_NS) break;
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
    atomic_init(&p->claim, 0); /* total 0: nothing to take */
    atomic_init(&p->done, 0);
    atomic_init(&p->caller_sleeping, 0);
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
    for (int64_t b = 0; b < n; b += chunk) fn(ctx, b, n - b > chunk ? b + chunk : n, 0);
}

void fic_parallel_for(fic_pool *pool, int64_t n, int64_t chunk, fic_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (chunk < 1) chunk = 1;
    /* One chunk, one thread, or a pool in use by another caller: no dispatch. */
    if (pool == NULL || pool->n_threads == 1 || n <= chunk || pthread_mutex_trylock(&pool->busy) != 0) {
        run_inline(n, chunk, fn, ctx);
        return;
    }
    int64_t total = (n - 1) / chunk + 1;
    if (total > MAX_CHUNKS) {
        chunk = (n - 1) / MAX_CHUNKS + 1;
        total = (n - 1) / chunk + 1;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n = n;
    pool->chunk = chunk;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->claim, (uint64_t)total << 32, memory_order_release);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: pairs with the sleepers' n_sleeping increment */
    if (atomic_load(&pool->n_sleeping) > 0) futex_wake_all(&pool->gen);
    run_chunks(pool, 0);
    /* Only chunks other threads took are left; they finish about when we do unless one was
     * preempted: then sleep, so it can have this core. */
    const unsigned want = (unsigned)total;
    unsigned d = atomic_load_explicit(&pool->done, memory_order_acquire);
    if (d != want) {
        const int64_t start = now_ns();
        for (int i = 1; d != want; i++) {
            cpu_relax();
            d = atomic_load_explicit(&pool->done, memory_order_acquire);
            if (i % SPIN_CHECK == 0 && now_ns() - start > WAIT_SPIN_NS) break;
        }
        while (d != want) {
            atomic_store(&pool->caller_sleeping, 1); /* seq_cst: see run_chunks */
            d = atomic_load(&pool->done);
            if (d != want) futex_wait(&pool->done, d);
            atomic_store(&pool->caller_sleeping, 0);
            d = atomic_load_explicit(&pool->done, memory_order_acquire);
        }
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
