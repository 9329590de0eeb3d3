/* ffn_vs_dense.c - fic_experts_ffn against three dense kernel calls, from C (no Python between
 * calls), for A/B runs of two builds on a shared machine.
 *
 * Build (from the repo root):
 *   gcc -O3 -std=gnu11 -pthread -Icsrc bench/ffn_vs_dense.c csrc/quant.c csrc/matvec.c csrc/pool.c csrc/ffn.c \
 *       -o /tmp/ffn_vs_dense -lm
 * Run: /tmp/ffn_vs_dense FMT D N_EXPERTS N THREADS T ROUNDS   (FMT: 4 = Q4_1, 5 = Q1_0; LAYERS=k env to
 *      cycle over k layer copies instead of 30, e.g. LAYERS=1 for a hot cache)
 * Columns layout, random weights; each figure is per layer, best of ROUNDS passes over the copies. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fic.h"

#define MAX_LAYERS 30
#define MAX_EXPERTS 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static float rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static void fill_quant(int fmt, float *w, uint8_t *dst, int64_t m, int64_t k, unsigned *s) {
    for (int64_t i = 0; i < m * k; i++) w[i] = 0.05f * rnd(s);
    fic_quantize(fmt, w, dst, m, k);
}

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s FMT D N_EXPERTS N THREADS T ROUNDS\n", argv[0]);
        return 2;
    }
    const int fmt = atoi(argv[1]), d = atoi(argv[2]), n_exp = atoi(argv[3]), n = atoi(argv[4]);
    const int threads = atoi(argv[5]), t = atoi(argv[6]), rounds = atoi(argv[7]);
    int n_layers = getenv("LAYERS") ? atoi(getenv("LAYERS")) : MAX_LAYERS;
    if (n_layers < 1 || n_layers > MAX_LAYERS || n_exp < 1 || n_exp > MAX_EXPERTS) return 2;
    const int ff = n_exp * n;
    unsigned s = 1;
    fic_pool *pool = NULL;
    if (threads > 1 && fic_pool_create(threads, &pool) != FIC_OK) return 1;
    const int64_t rg = fic_row_bytes(fmt, d), rd = fic_row_bytes(fmt, n), rdf = fic_row_bytes(fmt, ff);
    float *w = malloc((size_t)ff * d * sizeof(float));
    static uint8_t *bundles[MAX_LAYERS][MAX_EXPERTS], *dg[MAX_LAYERS], *du[MAX_LAYERS], *dd[MAX_LAYERS];
    for (int l = 0; l < n_layers; l++) {
        for (int e = 0; e < n_exp; e++) {
            size_t sz = (size_t)(2 * n * rg + d * rd);
            bundles[l][e] = aligned_alloc(64, (sz + 63) / 64 * 64);
            fill_quant(fmt, w, bundles[l][e], n, d, &s);
            fill_quant(fmt, w, bundles[l][e] + n * rg, n, d, &s);
            fill_quant(fmt, w, bundles[l][e] + 2 * n * rg, d, n, &s);
        }
        dg[l] = aligned_alloc(64, (size_t)(ff * rg + 63) / 64 * 64);
        du[l] = aligned_alloc(64, (size_t)(ff * rg + 63) / 64 * 64);
        dd[l] = aligned_alloc(64, (size_t)(d * rdf + 63) / 64 * 64);
        fill_quant(fmt, w, dg[l], ff, d, &s);
        fill_quant(fmt, w, du[l], ff, d, &s);
        fill_quant(fmt, w, dd[l], d, ff, &s);
    }
    int32_t ns[MAX_EXPERTS];
    for (int e = 0; e < n_exp; e++) ns[e] = n;
    fic_expert_layout lay = {d, fmt, fmt, fmt, 0};
    float *x = malloc((size_t)t * d * 4), *y = calloc((size_t)t * d, 4), *scratch = malloc((size_t)t * ff * 4);
    float *g = malloc((size_t)t * ff * 4), *u = malloc((size_t)t * ff * 4);
    for (int i = 0; i < t * d; i++) x[i] = rnd(&s);
    /* one workspace for every call below (the kernels never allocate) */
    const int64_t nws = fic_workspace_bytes(threads, t, d > ff ? d : ff, n_exp, ff);
    void *ws = nws > 0 ? aligned_alloc(64, (size_t)nws) : NULL;
    if (nws < 0 || ws == NULL) return 1;
    double best_ffn = 1e9, best_dense = 1e9;
    for (int r = 0; r < rounds; r++) {
        double t0 = now();
        for (int l = 0; l < n_layers; l++)
            if (fic_experts_ffn(pool, FIC_IMPL_AUTO, &lay, (const uint8_t *const *)bundles[l], ns, n_exp, NULL, x, y,
                                t, scratch, (int64_t)t * ff, ws, nws) != FIC_OK)
                return 1;
        double t1 = now();
        for (int l = 0; l < n_layers; l++) {
            if (t == 1) {
                fic_matvec(pool, FIC_IMPL_AUTO, fmt, dg[l], x, g, ff, d, ws, nws);
                fic_matvec(pool, FIC_IMPL_AUTO, fmt, du[l], x, u, ff, d, ws, nws);
            } else {
                fic_matmul(pool, FIC_IMPL_AUTO, fmt, dg[l], x, g, t, ff, d, ws, nws);
                fic_matmul(pool, FIC_IMPL_AUTO, fmt, du[l], x, u, t, ff, d, ws, nws);
            }
            for (int i = 0; i < t * ff; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            if (t == 1) fic_matvec(pool, FIC_IMPL_AUTO, fmt, dd[l], g, y, d, ff, ws, nws);
            else fic_matmul(pool, FIC_IMPL_AUTO, fmt, dd[l], g, y, t, d, ff, ws, nws);
        }
        double t2 = now();
        if (t1 - t0 < best_ffn) best_ffn = t1 - t0;
        if (t2 - t1 < best_dense) best_dense = t2 - t1;
    }
    printf("fmt %d d %d %dx%d threads %d t %d: ffn %.1f us dense %.1f us ratio %.2f (best of %d, %d layers)\n", fmt, d,
           n_exp, n, threads, t, best_ffn / n_layers * 1e6, best_dense / n_layers * 1e6, best_ffn / best_dense, rounds,
           n_layers);
    fic_pool_destroy(pool);
    free(ws);
    return 0;
}
