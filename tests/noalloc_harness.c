/* noalloc_harness.c - no kernel entry point allocates. Linked with
 *   -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=aligned_alloc,--wrap=posix_memalign
 * so every allocation the C core makes goes through the counters below. Runs fic_matvec,
 * fic_matmul, fic_accum_rows, fic_experts_ffn and fic_experts_ffn_slots for every format, t = 1
 * and t > 1, both down layouts and every implementation this CPU has, on a pool of 2 threads and
 * on none, with one workspace of fic_workspace_bytes for the maxima. Prints "allocs N calls M"
 * and exits 0 only when no kernel call allocated, every call returned FIC_OK, and the counter
 * saw the harness's own allocation (the wrapping is in effect). Built by tests/test_kernels.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fic.h"

static int counting;
static long n_allocs;

static void count(void) {
    if (__atomic_load_n(&counting, __ATOMIC_SEQ_CST)) __atomic_fetch_add(&n_allocs, 1, __ATOMIC_SEQ_CST);
}

void *__real_malloc(size_t n);
void *__real_calloc(size_t a, size_t b);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t al, size_t n);
int __real_posix_memalign(void **p, size_t al, size_t n);
void *__wrap_malloc(size_t n) { count(); return __real_malloc(n); }
void *__wrap_calloc(size_t a, size_t b) { count(); return __real_calloc(a, b); }
void *__wrap_realloc(void *p, size_t n) { count(); return __real_realloc(p, n); }
void *__wrap_aligned_alloc(size_t al, size_t n) { count(); return __real_aligned_alloc(al, n); }
int __wrap_posix_memalign(void **p, size_t al, size_t n) { count(); return __real_posix_memalign(p, al, n); }

static float rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f; }

#define D 256   /* d_model and k: a multiple of every block */
#define M 40    /* matvec / matmul rows */
#define T 5     /* tokens for matmul and t > 1 */
#define E 3     /* experts */
#define NMAX 256

static long n_calls, n_bad;

static void expect_ok(int st, const char *what, int impl, int fmt) {
    n_calls++;
    if (st != FIC_OK) {
        printf("%s impl %d fmt %d: status %d\n", what, impl, fmt, st);
        n_bad++;
    }
}

int main(void) {
    static const int32_t ns_small[E] = {128, 256, 128};
    static const int32_t ns_k[E] = {256, 256, 256}; /* K-quant down columns: whole super-blocks */
    unsigned s = 3;
    int n_total = 0;
    for (int e = 0; e < E; e++) n_total += ns_k[e] > ns_small[e] ? ns_k[e] : ns_small[e];
    float *w = malloc(sizeof(float) * NMAX * D), *x = malloc(sizeof(float) * T * D);
    float *y = malloc(sizeof(float) * T * (M > D ? M : D)), *a = malloc(sizeof(float) * M);
    float *scratch = malloc(sizeof(float) * T * n_total), coef[T * E];
    uint8_t *q = malloc((size_t)M * D * 4);
    for (int i = 0; i < T * D; i++) x[i] = rnd(&s);
    for (int i = 0; i < M; i++) a[i] = rnd(&s);
    for (int i = 0; i < T * E; i++) coef[i] = i % 4 == 1 ? 0.0f : 0.5f + 0.5f * rnd(&s);
    for (int i = 0; i < NMAX * D; i++) w[i] = 0.2f * rnd(&s);

    fic_pool *pool2 = NULL;
    if (fic_pool_create(2, &pool2) != FIC_OK) return 1;
    const int64_t nws = fic_workspace_bytes(2, T, D, E, n_total);
    void *ws = nws > 0 ? aligned_alloc(64, (size_t)nws) : NULL;
    /* a slot arena: 4 slots, the experts in slots 3, 0, 2 */
    const int32_t slots[E] = {3, 0, 2};
    const int64_t slot_bytes = (int64_t)NMAX * D * 3 * 4;
    uint8_t *arena = malloc((size_t)(4 * slot_bytes));
    if (ws == NULL || arena == NULL) return 1;

    for (int impl = FIC_IMPL_REF; impl <= FIC_IMPL_NEON; impl++) {
        if (!fic_impl_available(impl)) continue;
        for (int fmt = 0; fmt < FIC_FMT_COUNT; fmt++) {
            const int32_t *ns = fic_fmt_block_weights(fmt) > 128 ? ns_k : ns_small;
            /* Q4_K/Q6_K: fic does not quantize to them; any bytes with finite scales are blocks */
            if (fic_quantize(fmt, w, q, M, D) == FIC_ERR_UNSUPPORTED) memset(q, 0x11, (size_t)M * D * 4);
            for (int rows = 0; rows < 2; rows++) {
                fic_expert_layout lay = {D, fmt, fmt, fmt, rows};
                const uint8_t *bundles[E];
                for (int e = 0; e < E; e++) {
                    uint8_t *b = arena + slots[e] * slot_bytes;
                    const int64_t rb = fic_row_bytes(fmt, D);
                    if (fic_fmt_block_weights(fmt) > 128) memset(b, 0x11, (size_t)slot_bytes);
                    fic_quantize(fmt, w, b, ns[e], D);
                    fic_quantize(fmt, w, b + ns[e] * rb, ns[e], D);
                    if (rows) fic_quantize(fmt, w, b + 2 * ns[e] * rb, ns[e], D);
                    else fic_quantize(fmt, w, b + 2 * ns[e] * rb, D, ns[e]);
                    bundles[e] = b;
                }
                for (int p = 0; p < 2; p++) {
                    fic_pool *pool = p ? pool2 : NULL;
                    __atomic_store_n(&counting, 1, __ATOMIC_SEQ_CST);
                    if (rows == 0) {
                        expect_ok(fic_matvec(pool, impl, fmt, q, x, y, M, D, ws, nws), "matvec", impl, fmt);
                        expect_ok(fic_matmul(pool, impl, fmt, q, x, y, T, M, D, ws, nws), "matmul", impl, fmt);
                        expect_ok(fic_accum_rows(pool, impl, fmt, q, a, y, M, D, NULL, 0), "accum_rows", impl, fmt);
                    }
                    for (int t = 1; t <= T; t += T - 1) {
                        memset(y, 0, sizeof(float) * T * D);
                        expect_ok(fic_experts_ffn(pool, impl, &lay, bundles, ns, E, coef, x, y, t, scratch,
                                                  (int64_t)T * n_total, ws, nws), "experts_ffn", impl, fmt);
                        expect_ok(fic_experts_ffn(pool, impl, &lay, bundles, ns, E, NULL, x, y, t, scratch,
                                                  (int64_t)T * n_total, ws, nws), "experts_ffn", impl, fmt);
                        expect_ok(fic_experts_ffn_slots(pool, impl, &lay, arena, slot_bytes, slots, ns, E, coef, x,
                                                        y, t, scratch, (int64_t)T * n_total, ws, nws),
                                  "experts_ffn_slots", impl, fmt);
                    }
                    __atomic_store_n(&counting, 0, __ATOMIC_SEQ_CST);
                }
            }
        }
    }
    const long kernel_allocs = n_allocs;
    __atomic_store_n(&counting, 1, __ATOMIC_SEQ_CST);
    void *volatile probe = malloc(16); /* must be counted: the wrapping is in effect */
    __atomic_store_n(&counting, 0, __ATOMIC_SEQ_CST);
    const int wrapped = n_allocs == kernel_allocs + 1;
    free(probe);
    printf("allocs %ld calls %ld bad %ld wrapped %d\n", kernel_allocs, n_calls, n_bad, wrapped);
    fic_pool_destroy(pool2);
    free(ws);
    free(arena);
    free(w);
    free(x);
    free(y);
    free(a);
    free(scratch);
    free(q);
    if (kernel_allocs != 0 || n_bad != 0 || !wrapped || n_calls == 0) return 1;
    puts("OK");
    return 0;
}
