/* ab_core.c - two builds of fic's C core in one process, timed call by call in alternation.
 *
 * On a shared VM the speed of the whole machine drifts by 1.5x over seconds (bench/RESULTS.md,
 * "In-process A/B"), so two processes run one after the other compare windows, not code. Here both
 * builds are loaded (dlopen, RTLD_LOCAL) and each call of A is followed by the same call of B on the
 * same data; the ratio of their best and of their mean times is printed (above 1: B is faster),
 * with the largest difference between their outputs. Build each checkout's core as a library:
 *
 *   SRC=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "csrc"); import build_ffi; print(*build_ffi.SOURCES)')
 *   (cd A/csrc && gcc -O3 -std=gnu11 -pthread -fPIC -shared -fno-strict-aliasing -I. $SRC -o /tmp/a.so -lm)
 *   (the same for B into /tmp/b.so)
 *   gcc -O2 -o /tmp/ab_core bench/ab_core.c -ldl
 *   /tmp/ab_core /tmp/a.so /tmp/b.so matvec q4_1 1536 576 1 3000   (fmt m k threads calls)
 *   AB_STREAM_MIB=512 /tmp/ab_core ... matvec q4_0 4096 4096 2 10      (each call of a sweep over
 *                                      copies filling 512 MiB, as bench_kernels.py: from DRAM;
 *                                      AB_IMPL=avx2 times the AVX2 tier on an AVX-512 CPU, matvec and ffn)
 *   /tmp/ab_core /tmp/a.so /tmp/b.so matmul 48 q4_1 1536 576 2 300 (tokens, then as matvec)
 *   /tmp/ab_core /tmp/a.so /tmp/b.so attention 2000 16 8 128 28 2 10  (ctx heads kv_heads head_dim
 *                                                                      layers threads calls)
 *   /tmp/ab_core /tmp/a.so /tmp/b.so attention-prefill 2000 9 3 64 1 2 10  (a prompt of ctx tokens)
 *   /tmp/ab_core /tmp/a.so /tmp/b.so ffn q4_k q8_0 1536 140 64 28 2 20  (a dense model's decode FFN:
 *                                      gate/up and down formats, d_model, experts x neurons, layers)
 * A matrix larger than the last-level cache (65536 x 4096 in Q4) measures the kernel from DRAM;
 * attention reads one cache per layer, as a model's decode step does. Each build has its own pool:
 * with 2 threads on a 2-core machine, one build's worker still spins while the other's call runs,
 * so calls of a few hundred microseconds gave ratios from 0.44x to 1.27x with the same library as
 * A and B (bench/RESULTS.md). Compare at 1 thread, or with calls of milliseconds. */
#include <dlfcn.h>
#include <math.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../csrc/fic.h"

typedef int (*matvec_fn)(fic_pool *, int, int, const uint8_t *, const float *, float *, int64_t, int64_t, void *,
                         int64_t);
typedef int (*matmul_fn)(fic_pool *, int, int, const uint8_t *, const float *, float *, int64_t, int64_t, int64_t,
                         void *, int64_t);
typedef int64_t (*workspace_fn)(int, int64_t, int64_t, int64_t, int64_t);
typedef int (*attention_fn)(fic_pool *, int, const float *, const uint16_t *, const uint16_t *, float *, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, float *, int64_t);
typedef int64_t (*attention_ws_fn)(int, int64_t, int64_t, int64_t);
typedef int (*pool_create_fn)(int, fic_pool **);
typedef int (*quantize_fn)(int, const float *, uint8_t *, int64_t, int64_t);
typedef int64_t (*row_bytes_fn)(int, int64_t);
typedef int (*repack_fn)(const uint8_t *, int64_t, int64_t, uint8_t *);
typedef int (*ffn_fn)(fic_pool *, int, const fic_expert_layout *, const uint8_t *const *, const int32_t *, int64_t,
                      const float *, const float *, float *, int64_t, float *, int64_t, void *, int64_t);

typedef struct {
    void *lib;
    fic_pool *pool;
    matvec_fn matvec;
    matmul_fn matmul;
    workspace_fn workspace;
    attention_fn attention;
    attention_ws_fn attention_ws;
    quantize_fn quantize;
    row_bytes_fn row_bytes;
    repack_fn repack;
    ffn_fn ffn;
} build_t;

typedef struct {
    double best_s, total_s;
} timing_t;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The library at path with the entry points used here, and a pool of n_threads (none for 1). */
static int open_build(const char *path, int n_threads, build_t *b) {
    b->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (b->lib == NULL) {
        fprintf(stderr, "ab_core: %s\n", dlerror());
        return 0;
    }
    b->matvec = (matvec_fn)dlsym(b->lib, "fic_matvec");
    b->matmul = (matmul_fn)dlsym(b->lib, "fic_matmul");
    b->workspace = (workspace_fn)dlsym(b->lib, "fic_workspace_bytes");
    b->attention = (attention_fn)dlsym(b->lib, "fic_attention");
    b->attention_ws = (attention_ws_fn)dlsym(b->lib, "fic_attention_ws_floats");
    b->quantize = (quantize_fn)dlsym(b->lib, "fic_quantize");
    b->row_bytes = (row_bytes_fn)dlsym(b->lib, "fic_row_bytes");
    b->repack = (repack_fn)dlsym(b->lib, "fic_q1r32_repack");
    b->ffn = (ffn_fn)dlsym(b->lib, "fic_experts_ffn");
    pool_create_fn pool_create = (pool_create_fn)dlsym(b->lib, "fic_pool_create");
    if (!b->matvec || !b->matmul || !b->workspace || !b->attention || !b->attention_ws || !b->quantize || !b->row_bytes || !b->repack || !b->ffn || !pool_create) {
        fprintf(stderr, "ab_core: %s lacks an entry point\n", path);
        return 0;
    }
    b->pool = NULL;
    if (n_threads > 1 && pool_create(n_threads, &b->pool) != FIC_OK) {
        fprintf(stderr, "ab_core: %s: no pool of %d threads\n", path, n_threads);
        return 0;
    }
    return 1;
}

static void add_time(timing_t *t, double s) {
    t->total_s += s;
    if (s < t->best_s) t->best_s = s;
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
    double d = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double e = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        if (e > d) d = e;
    }
    return d;
}

static void report(const char *what, const timing_t t[2], int calls, double diff) {
    printf("%s: A best %.1f us mean %.1f | B best %.1f us mean %.1f | B/A speed best %.2fx mean %.2fx | max diff %.3g\n",
           what, t[0].best_s * 1e6, t[0].total_s / calls * 1e6, t[1].best_s * 1e6, t[1].total_s / calls * 1e6,
           t[0].best_s / t[1].best_s, t[0].total_s / t[1].total_s, diff);
}

static int fmt_of(const char *name) {
    static const struct { const char *name; int fmt; } fmts[] = {
        {"q4_0", FIC_Q4_0}, {"q4_1", FIC_Q4_1}, {"q8_0", FIC_Q8_0}, {"q1_0", FIC_Q1_0}, {"q1_0r32", FIC_Q1_0R32},
        {"q5_0", FIC_Q5_0}, {"q4_k", FIC_Q4_K}, {"q6_k", FIC_Q6_K}};
    for (size_t i = 0; i < sizeof fmts / sizeof fmts[0]; i++)
        if (strcmp(name, fmts[i].name) == 0) return fmts[i].fmt;
    return -1;
}

/* fic quantizes to neither K-quants nor Q5_0 (it keeps them from GGUF files): random bytes, every
 * block's fp16 scales set to 2^-7. */
/* Weights on transparent huge pages, as fic's arena and bench_kernels hold them: on 4 KiB pages a
 * matrix larger than the cache measured 0.6-0.8x of its huge-page speed from DRAM (TLB misses). */
static uint8_t *weights_alloc(int64_t n_bytes) {
    const size_t huge = (size_t)2 << 20, n = ((size_t)n_bytes + huge - 1) / huge * huge;
    uint8_t *w = aligned_alloc(huge, n);
    if (w != NULL) madvise(w, n, MADV_HUGEPAGE);
    return w;
}

static uint8_t *random_blocks(int fmt, int64_t n_bytes) {
    const int64_t bb = fmt == FIC_Q4_K ? 144 : fmt == FIC_Q6_K ? 210 : 22;
    const int64_t at[2] = {fmt == FIC_Q6_K ? 208 : 0, fmt == FIC_Q4_K ? 2 : -1};
    uint8_t *w = weights_alloc(n_bytes);
    if (w == NULL) return NULL;
    for (int64_t i = 0; i < n_bytes; i++) w[i] = (uint8_t)rand();
    for (int64_t o = 0; o + bb <= n_bytes; o += bb)
        for (int f = 0; f < 2; f++)
            if (at[f] >= 0) {
                w[o + at[f]] = 0x00;
                w[o + at[f] + 1] = 0x20;
            }
    return w;
}

static int is_kept_only(int fmt) { return fmt == FIC_Q4_K || fmt == FIC_Q6_K || fmt == FIC_Q5_0; }

/* m x k weights of fmt, quantized by build A from uniform floats (r32: Q1_0 rows repacked). */
static uint8_t *make_weights(const build_t *a, int fmt, int64_t m, int64_t k) {
    const int base_fmt = fmt == FIC_Q1_0R32 ? FIC_Q1_0 : fmt;
    const int64_t rb = a->row_bytes(base_fmt, k);
    if (is_kept_only(fmt)) return rb <= 0 ? NULL : random_blocks(fmt, m * rb);
    float *src = malloc((size_t)(k * 64) * sizeof(float));
    uint8_t *w = weights_alloc(m * rb), *tmp = NULL;
    if (rb <= 0 || src == NULL || w == NULL) return NULL;
    for (int64_t i = 0; i < k * 64; i++) src[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (int64_t r = 0; r < m; r += 64) /* 64 distinct rows, repeated */
        if (a->quantize(base_fmt, src, w + r * rb, m - r < 64 ? m - r : 64, k) != FIC_OK)
            return NULL;
    free(src);
    if (fmt == FIC_Q1_0R32) {
        tmp = weights_alloc(m * rb);
        if (tmp == NULL || a->repack(w, m, k, tmp) != FIC_OK) return NULL;
        free(w);
        w = tmp;
    }
    return w;
}

/* AB_IMPL=avx2 (avx512, ref): the matvec's and the FFN's tier, other than the CPU's best. */
static int impl_of_env(void) {
    const char *name = getenv("AB_IMPL");
    if (name == NULL) return FIC_IMPL_AUTO;
    if (strcmp(name, "avx2") == 0) return FIC_IMPL_AVX2;
    if (strcmp(name, "avx512") == 0) return FIC_IMPL_AVX512;
    return strcmp(name, "ref") == 0 ? FIC_IMPL_REF : FIC_IMPL_AUTO;
}

/* matvec (n_tok 0) or matmul of n_tok tokens: fmt m k threads calls. A matmul takes the product's
 * default prefill arithmetic: float (FIC_IMPL_EXACT) but for Q1_0, whose prefill is int8; with
 * AB_PREFILL=int8 (exact) in the environment, int8 (float) whatever the format, and AB_PREFILL_B
 * the same for B alone (one build's two arithmetics side by side). */
static int prefill_impl(const char *mode, int fmt) {
    const int exact = mode != NULL ? strcmp(mode, "exact") == 0 : !(fmt == FIC_Q1_0 || fmt == FIC_Q1_0R32);
    return FIC_IMPL_AUTO | (exact ? FIC_IMPL_EXACT : 0);
}

static int run_products(build_t b[2], char **arg, int n_tok) {
    const int fmt = fmt_of(arg[0]), n_threads = atoi(arg[3]), calls = atoi(arg[4]);
    const int64_t m = atoll(arg[1]), k = atoll(arg[2]), t = n_tok > 0 ? n_tok : 1;
    const char *mode = getenv("AB_PREFILL"), *mode_b = getenv("AB_PREFILL_B");
    const int impls[2] = {prefill_impl(mode, fmt), prefill_impl(mode_b != NULL ? mode_b : mode, fmt)};
    const int mv_impl = impl_of_env();
    int64_t ws_bytes = 16 * k + 4096;
    for (int i = 0; i < 2 && n_tok > 0; i++) {
        const int64_t n = b[i].workspace(n_threads, t, k, 1, 64);
        ws_bytes = n > ws_bytes ? n : ws_bytes;
    }
    uint8_t *w = fmt < 0 ? NULL : make_weights(&b[0], fmt, m, k);
    /* AB_STREAM_MIB=N (matvec): copies of the matrix filling N MiB, one call per copy in turn, as
     * bench_kernels.py streams them: every call reads its weights from DRAM and pays its own start. */
    const int64_t rb = w == NULL ? 0 : b[0].row_bytes(fmt == FIC_Q1_0R32 ? FIC_Q1_0 : fmt, k);
    const int64_t stream_bytes = getenv("AB_STREAM_MIB") != NULL && n_tok == 0 ? atoll(getenv("AB_STREAM_MIB")) << 20 : 0;
    const int64_t n_copies = stream_bytes > 0 ? (stream_bytes + m * rb - 1) / (m * rb) : 1;
    if (n_copies > 1) {
        uint8_t *all = weights_alloc(n_copies * m * rb);
        if (all == NULL) return 2;
        for (int64_t c = 0; c < n_copies; c++) memcpy(all + c * m * rb, w, (size_t)(m * rb));
        free(w);
        w = all;
    }
    float *x = malloc((size_t)(t * k) * sizeof(float));
    float *y[2] = {malloc((size_t)(t * m) * sizeof(float)), malloc((size_t)(t * m) * sizeof(float))};
    void *ws = aligned_alloc(64, (size_t)(ws_bytes + 63) / 64 * 64);
    if (w == NULL || x == NULL || y[0] == NULL || y[1] == NULL || ws == NULL || calls < 1) {
        fprintf(stderr, "ab_core: bad arguments (fmt q4_0|q4_1|q8_0|q1_0|q1_0r32|q5_0|q4_k|q6_k, m, k, threads, calls)\n");
        return 2;
    }
    for (int64_t i = 0; i < t * k; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    timing_t tm[2] = {{1e30, 0.0}, {1e30, 0.0}};
    for (int c = 0; c < calls; c++)
        for (int i = 0; i < 2; i++) {
            const double t0 = now_s();
            int st = FIC_OK;
            for (int64_t cp = 0; cp < n_copies && st == FIC_OK; cp++) {
                const uint8_t *wc = w + cp * m * rb;
                st = n_tok > 0 ? b[i].matmul(b[i].pool, impls[i], fmt, wc, x, y[i], t, m, k, ws, ws_bytes)
                               : b[i].matvec(b[i].pool, mv_impl, fmt, wc, x, y[i], m, k, ws, ws_bytes);
            }
            add_time(&tm[i], (now_s() - t0) / (double)n_copies);
            if (st != FIC_OK) {
                fprintf(stderr, "ab_core: build %c: status %d\n", 'A' + i, st);
                return 1;
            }
        }
    char what[128];
    snprintf(what, sizeof what, "%s %s %lldx%lld, %d token(s)%s", n_tok > 0 ? "matmul" : "matvec", arg[0], (long long)m,
             (long long)k, (int)t, n_copies > 1 ? ", streamed (time per copy)" : "");
    report(what, tm, calls, max_abs_diff(y[0], y[1], t * m));
    return 0;
}

/* One decode step at position ctx of every layer's cache (prefill 0), or a prefill of ctx tokens
 * from position 0 (prefill 1). */
static int run_attention(build_t b[2], char **arg, int prefill) {
    const int64_t ctx = atoll(arg[0]), nh = atoll(arg[1]), nkv = atoll(arg[2]), hd = atoll(arg[3]), layers = atoll(arg[4]);
    const int n_threads = atoi(arg[5]), calls = atoi(arg[6]);
    if (ctx < 1 || nh < 1 || nkv < 1 || nh % nkv != 0 || hd < 1 || layers < 1 || calls < 1) {
        fprintf(stderr, "ab_core: bad attention arguments (ctx heads kv_heads head_dim layers threads calls)\n");
        return 2;
    }
    const int64_t t = prefill ? ctx : 1, pos0 = prefill ? 0 : ctx;
    int64_t ws_floats = 0;
    for (int i = 0; i < 2; i++) {
        const int64_t n = b[i].attention_ws(n_threads, t, nh, hd);
        ws_floats = n > ws_floats ? n : ws_floats;
    }
    const int64_t kvs = nkv * hd, per_layer = (ctx + 1) * kvs;
    uint16_t *kc = malloc((size_t)(per_layer * layers) * 2), *vc = malloc((size_t)(per_layer * layers) * 2);
    float *q = malloc((size_t)(t * nh * hd) * sizeof(float)), *out[2] = {malloc((size_t)(t * nh * hd) * sizeof(float)),
                                                                        malloc((size_t)(t * nh * hd) * sizeof(float))};
    float *ws = aligned_alloc(64, (size_t)((ws_floats * 4 + 63) / 64 * 64));
    if (kc == NULL || vc == NULL || q == NULL || out[0] == NULL || out[1] == NULL || ws == NULL) return 1;
    for (int64_t i = 0; i < per_layer * layers; i++) { /* fp16 in [0.125, 0.5) */
        kc[i] = (uint16_t)(0x3000 + rand() % 0x800);
        vc[i] = (uint16_t)(0x3000 + rand() % 0x800);
    }
    for (int64_t i = 0; i < t * nh * hd; i++) q[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    timing_t tm[2] = {{1e30, 0.0}, {1e30, 0.0}};
    for (int c = 0; c < calls; c++)
        for (int i = 0; i < 2; i++) {
            const double t0 = now_s();
            for (int64_t l = 0; l < layers; l++)
                if (b[i].attention(b[i].pool, FIC_IMPL_AUTO, q, kc + l * per_layer, vc + l * per_layer, out[i], t, pos0, nh, nkv, hd,
                        kvs, 0.088f, ws, ws_floats) != FIC_OK) {
                    fprintf(stderr, "ab_core: attention of build %c failed\n", 'A' + i);
                    return 1;
                }
            add_time(&tm[i], now_s() - t0);
        }
    char what[160];
    snprintf(what, sizeof what, "attention %s ctx %lld, %lld layers (%.0f MB of K and V)", prefill ? "prefill" : "decode",
             (long long)ctx, (long long)layers, 4.0 * (double)(ctx * kvs * layers) / 1e6);
    report(what, tm, calls, max_abs_diff(out[0], out[1], t * nh * hd));
    return 0;
}

/* One token through LAYERS copies of a dense layer cut into experts (as the converter cuts one), the
 * exact mode's call: fixed-point sums (FIC_FFN_FIXED), int8 activations; with AB_FFN_SUM set, prune
 * mode's (one float sum over the experts). Arguments: gate/up format, down format, d_model, experts,
 * neurons each, layers, threads, calls. */
static int run_ffn(build_t b[2], char **arg) {
    const int gfmt = fmt_of(arg[0]), dfmt = fmt_of(arg[1]), n_threads = atoi(arg[6]), calls = atoi(arg[7]);
    const int64_t d = atoll(arg[2]), ne = atoll(arg[3]), n = atoll(arg[4]), layers = atoll(arg[5]);
    const int64_t rbg = gfmt < 0 ? -1 : b[0].row_bytes(gfmt, d), rbd = dfmt < 0 ? -1 : b[0].row_bytes(dfmt, n);
    if (rbg <= 0 || rbd <= 0 || ne < 1 || layers < 1 || calls < 1) {
        fprintf(stderr, "ab_core: bad ffn arguments (gate_fmt down_fmt d_model experts neurons layers threads calls)\n");
        return 2;
    }
    const int64_t bundle = 2 * n * rbg + d * rbd, n_bundles = ne * layers;
    const uint8_t **bundles = malloc((size_t)n_bundles * sizeof *bundles);
    int32_t *ns = malloc((size_t)ne * sizeof *ns);
    float *x = malloc((size_t)d * sizeof(float)), *scratch = aligned_alloc(64, (size_t)((ne * n * 4 + 63) / 64 * 64));
    int64_t *acc[2] = {calloc((size_t)d, 8), calloc((size_t)d, 8)};
    int64_t ws_bytes = 0;
    for (int i = 0; i < 2; i++) {
        const int64_t w = b[i].workspace(n_threads, 1, d, ne, ne * n);
        ws_bytes = w > ws_bytes ? w : ws_bytes;
    }
    void *ws = aligned_alloc(64, (size_t)((ws_bytes + 63) / 64 * 64));
    if (bundles == NULL || ns == NULL || x == NULL || scratch == NULL || acc[0] == NULL || acc[1] == NULL || ws == NULL)
        return 1;
    for (int64_t e = 0; e < n_bundles; e++) { /* one allocation per expert, as an arena's slots */
        uint8_t *g = make_weights(&b[0], gfmt, 2 * n, d), *dn = make_weights(&b[0], dfmt, d, n);
        uint8_t *one = aligned_alloc(64, (size_t)((bundle + 63) / 64 * 64));
        if (g == NULL || dn == NULL || one == NULL) return 1;
        memcpy(one, g, (size_t)(2 * n * rbg));
        memcpy(one + 2 * n * rbg, dn, (size_t)(d * rbd));
        free(g);
        free(dn);
        bundles[e] = one;
    }
    for (int64_t e = 0; e < ne; e++) ns[e] = (int32_t)n;
    for (int64_t i = 0; i < d; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    const fic_expert_layout lay = {d, gfmt, gfmt, dfmt, 0};
    const int fixed = getenv("AB_FFN_SUM") == NULL, impl = impl_of_env() | (fixed ? FIC_FFN_FIXED : 0);
    timing_t tm[2] = {{1e30, 0.0}, {1e30, 0.0}};
    for (int c = 0; c < calls; c++)
        for (int i = 0; i < 2; i++) {
            memset(acc[i], 0, (size_t)d * 8);
            const double t0 = now_s();
            for (int64_t l = 0; l < layers; l++)
                if (b[i].ffn(b[i].pool, impl, &lay, bundles + l * ne, ns, ne, NULL, x,
                             (float *)acc[i], 1, scratch, ne * n, ws, ws_bytes) != FIC_OK) {
                    fprintf(stderr, "ab_core: ffn of build %c failed\n", 'A' + i);
                    return 1;
                }
            add_time(&tm[i], now_s() - t0);
        }
    double diff = 0.0, top = 0.0; /* fixed point: units of 2^-32 */
    for (int64_t i = 0; i < d; i++) {
        const double a = fixed ? (double)acc[0][i] * 0x1p-32 : (double)((const float *)acc[0])[i],
                     c = fixed ? (double)acc[1][i] * 0x1p-32 : (double)((const float *)acc[1])[i];
        diff = fabs(a - c) > diff ? fabs(a - c) : diff;
        top = fabs(a) > top ? fabs(a) : top;
    }
    char what[200];
    snprintf(what, sizeof what, "ffn %s/%s d %lld, %lld x %lld neurons, %lld layers (%.0f MB; max |y| %.3g)%s", arg[0],
             arg[1], (long long)d, (long long)ne, (long long)n, (long long)layers, (double)(bundle * n_bundles) / 1e6,
             top, fixed ? "" : ", float sum");
    report(what, tm, calls, diff);
    return 0;
}

int main(int argc, char **argv) {
    build_t b[2];
    const int matvec = argc == 9 && strcmp(argv[3], "matvec") == 0;
    const int matmul = argc == 10 && strcmp(argv[3], "matmul") == 0;
    const int prefill = argc == 11 && strcmp(argv[3], "attention-prefill") == 0;
    const int attention = prefill || (argc == 11 && strcmp(argv[3], "attention") == 0);
    const int ffn = argc == 12 && strcmp(argv[3], "ffn") == 0;
    if (!matvec && !matmul && !attention && !ffn) {
        fprintf(stderr, "usage: ab_core A.so B.so matvec FMT M K THREADS CALLS\n"
                        "       ab_core A.so B.so matmul TOKENS FMT M K THREADS CALLS\n"
                        "       ab_core A.so B.so attention|attention-prefill CTX HEADS KV_HEADS HEAD_DIM LAYERS THREADS CALLS\n"
                        "       ab_core A.so B.so ffn GATE_FMT DOWN_FMT D_MODEL EXPERTS NEURONS LAYERS THREADS CALLS\n");
        return 2;
    }
    const int n_threads = atoi(matvec ? argv[7] : matmul ? argv[8] : ffn ? argv[10] : argv[9]);
    if (n_threads < 1 || !open_build(argv[1], n_threads, &b[0]) || !open_build(argv[2], n_threads, &b[1])) return 2;
    srand(1);
    if (attention) return run_attention(b, argv + 4, prefill);
    if (ffn) return run_ffn(b, argv + 4);
    if (matmul) return atoi(argv[4]) < 1 ? 2 : run_products(b, argv + 5, atoi(argv[4]));
    return run_products(b, argv + 4, 0);
}
