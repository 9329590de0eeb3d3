/* q1r32.c - Q1_0 matrices in groups of 32 rows (the r32 layout of fic.h) and their matvec.
 *
 * A row-major Q1_0 matvec expands each weight's bit against x (dot2_q1_avx2: a lookup and a
 * multiply per 32 weights, ~16 vector operations per 128 weights of a row). With 32 rows' sign
 * bytes side by side, the work turns around: x is prepared once per call as a table per 4 weights
 * (the 16 sums of +-xq, T-MAC's idea), and one byte shuffle looks up 32 rows' 4-weight sums at
 * once. Exact integer sums over a Q1_0 block (x quantized with one scale per 128 weights, qdot.h's
 * Q1R32_XQ_BYTES), then one float step per block.
 * The kernels are in the architecture files (q1r32_ref, q1r32_avx2), reached through the table.
 * Expert bundles in the layout (gate, up and down parts each in groups of 32 rows) run one token's
 * FFN here too (q1r32_ffn_t1); their prefill unpacks a group at a time (qdot_ffn.c). */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

#define QX_BYTES(k) ws_round64(Q1R32_XQ_BYTES(k)) /* the quantizer's output: int8 x, d per Q1_0 block */

static int shape_ok(int64_t m, int64_t k) {
    return m > 0 && k > 0 && m % Q1R32_ROWS == 0 && k % QK1_0 == 0 && m <= WS_MAX_DIM && k <= WS_MAX_DIM;
}

/* src -> dst, m x k Q1_0 weights from one layout to the other, a group at a time (a group holds the
 * same byte range in both); no overlap. */
static int convert(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int to_r32) {
    if (src == NULL || dst == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    const fic_kernels *kt = fic_kernels_for(fic_impl_best());
    const int64_t nb = k / QK1_0, group_bytes = nb * Q1R32_BLOCK_BYTES, total = m / Q1R32_ROWS * group_bytes;
    if (dst < src + total && src < dst + total) return FIC_ERR_ARG;
    for (int64_t g = 0; g < m / Q1R32_ROWS; g++) q1r32_move(kt, src + g * group_bytes, dst + g * group_bytes, nb, to_r32);
    return FIC_OK;
}

int fic_q1r32_repack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) { return convert(src, m, k, dst, 1); }
int fic_q1r32_unpack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) { return convert(src, m, k, dst, 0); }

int64_t fic_q1r32_ws_bytes(int64_t k) {
    if (k <= 0 || k % QK1_0 != 0 || k > WS_MAX_DIM) return FIC_ERR_ARG;
    return QX_BYTES(k) + ws_round64(k / 4 * Q1R32_TAB_BYTES) + ws_round64(k / 32 * 2);
}

/* Per 4 weights (bits 0..3 of a nibble, LSB first as Q1_0's), with x = 16 h + l: L[n] = sum over the
 * set bits t of n of l_t, then H[n] = 32 + the same of h_t (kern_q1r32_fn), each entry from an
 * earlier one plus one term, a group's L and H side by side; then each q8 block's 256 bytes are
 * put in q1r32_tab_at's order (in place: building there directly was 3x slower, bench/RESULTS.md);
 * per q8 block of 32, cx = 8192 + sum xq. */
void q1r32_build_tables(const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx) {
    for (int64_t grp = 0; grp < k / 4; grp++) {
        const int8_t *x = xq + 4 * grp;
        uint8_t *t = tab + grp * Q1R32_TAB_BYTES;
        t[0] = 0;
        t[16] = 32;
        for (int n = 1; n < 16; n++) {
            const int v = x[__builtin_ctz((unsigned)n)], e = n & (n - 1);
            t[n] = (uint8_t)(t[e] + (v & 15));
            t[16 + n] = (uint8_t)(t[16 + e] + (v >> 4)); /* arithmetic shift: h in -8..7 */
        }
    }
    for (int64_t b = 0; b < k / 32; b++) { /* 16-byte piece 2 g + part (L 0, H 1) -> its place */
        uint8_t side_by_side[8 * Q1R32_TAB_BYTES], *t = tab + b * sizeof side_by_side;
        memcpy(side_by_side, t, sizeof side_by_side);
        for (int g = 0; g < 8; g++) {
            memcpy(t + q1r32_tab_at(g), side_by_side + 32 * g, 16);
            memcpy(t + q1r32_tab_at(g) + Q1R32_TAB_H, side_by_side + 32 * g + 16, 16);
        }
    }
    for (int64_t b = 0; b < k / 32; b++) {
        int s = 8192;
        for (int i = 0; i < 32; i++) s += xq[32 * b + i];
        cx[b] = (int16_t)s;
    }
}

typedef struct {
    const fic_kernels *kt;
    const uint8_t *w, *tab;
    const int16_t *cx;
    const float *dx;
    float *y;
    int64_t nb;
} r32_job;

static void r32_range(void *ctx, int64_t g0, int64_t g1, int tid) {
    const r32_job *j = ctx;
    (void)tid;
    q1r32(j->kt, j->w, j->nb, j->tab, j->cx, j->dx, j->y, g0, g1);
}

/* A token's x prepared for the tables (fic_q1r32_ws_bytes(k) bytes, the matvec's workspace and
 * prefill's per-token area): the quantizer's int8 x and d, then the tables, then the
 * corrections. */
static uint8_t *tok_tab(const uint8_t *tok, int64_t k) { return (uint8_t *)tok + QX_BYTES(k); }
static int16_t *tok_cx(const uint8_t *tok, int64_t k) {
    return (int16_t *)(tok_tab(tok, k) + ws_round64(k / 4 * Q1R32_TAB_BYTES));
}
static const float *tok_dx(const uint8_t *tok, int64_t k) { return (const float *)(tok + k); }

/* the tables through qk's builder where it has one (the same bytes), else the scalar one */
static void build_tables(const qdot_kernels *qk, const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx) {
    if (qk->q1r32_tables != NULL) qk->q1r32_tables(xq, k, tab, cx);
    else q1r32_build_tables(xq, k, tab, cx);
}

void q1r32_tok_prep(const qdot_kernels *qk, const float *x, int64_t k, uint8_t *tok) {
    qk->q1r32_quantize(x, k, tok); /* int8 x, then the Q1_0 blocks' d */
    build_tables(qk, (const int8_t *)tok, k, tok_tab(tok, k), tok_cx(tok, k));
}

int fic_q1r32_matvec(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t m, int64_t k,
                     void *ws, int64_t ws_bytes) {
    if (w == NULL || x == NULL || y == NULL || ws == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON || ((uintptr_t)ws % 64) != 0) return FIC_ERR_ARG;
    if (ws_bytes < fic_q1r32_ws_bytes(k)) return FIC_ERR_WORKSPACE;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    q1r32_tok_prep(fic_qdot_kernels(impl), x, k, ws);
    const int64_t nb = k / QK1_0, n_groups = m / Q1R32_ROWS;
    r32_job j = {kt, w, tok_tab(ws, k), tok_cx(ws, k), tok_dx(ws, k), y, nb};
    fic_parallel_for(pool, n_groups, row_chunk(pool, n_groups, nb * Q1R32_BLOCK_BYTES), r32_range, &j);
    return FIC_OK;
}

/* ---- prefill (t > 1) by the matvec's tables (qdot.c, qdot_ffn.c) ----
 * Each token's x quantized and turned into the matvec's tables, then a group of 32 rows against it
 * through the matvec's kernel: each token's outputs are its matvec's, bit for bit. */

int64_t q1r32_tok_bytes(int64_t k) { return fic_q1r32_ws_bytes(k); }

void q1r32_tok_group(const fic_kernels *kt, const uint8_t *group, int64_t k, const uint8_t *tok, float *y) {
    q1r32(kt, group, k / QK1_0, tok_tab(tok, k), tok_cx(tok, k), tok_dx(tok, k), y, 0, 1);
}

/* Prefill through kt: with a tile kernel a token needs only the quantizer's row (its tables are
 * not read), so more tokens fit a chunk and share each group's expanded bits. */
int64_t q1r32_toks_bytes(const fic_kernels *kt, int64_t k) {
    return kt->q1r32_tiles != NULL ? QX_BYTES(k) : q1r32_tok_bytes(k);
}

int64_t q1r32_toks_scratch(const fic_kernels *kt, int64_t k) {
    return kt->q1r32_tiles != NULL ? q1r32_tiles_scratch(k) : 0;
}

void q1r32_toks_prep(const fic_kernels *kt, const qdot_kernels *qk, const float *x, int64_t k, uint8_t *tok) {
    if (kt->q1r32_tiles != NULL) qk->q1r32_quantize(x, k, tok);
    else q1r32_tok_prep(qk, x, k, tok);
}

void q1r32_toks_group(const fic_kernels *kt, const uint8_t *group, int64_t k, const uint8_t *tok, int64_t tb,
                      int64_t nt, float *y, int64_t ys, uint8_t *scratch) {
    if (kt->q1r32_tiles != NULL) {
        kt->q1r32_tiles(group, k / QK1_0, tok, tb, nt, y, ys, scratch);
        return;
    }
    for (int64_t i = 0; i < nt; i++) q1r32_tok_group(kt, group, k, tok + i * tb, y + i * ys);
}

int q1r32_matmul(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t t, int64_t m,
                 int64_t k, void *ws, int64_t ws_bytes) {
    if (w == NULL || x == NULL || y == NULL || t <= 0 || !shape_ok(m, k)) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    if (!fic_impl_available(impl)) return FIC_ERR_UNSUPPORTED;
    if (t == 1) return fic_q1r32_matvec(pool, impl, w, x, y, m, k, ws, ws_bytes);
    return fic_qdot_matmul(pool, impl, FIC_Q1_0R32, w, x, y, t, m, k, ws, ws_bytes);
}

void q1r32_group_rows(const uint8_t *w, int64_t k, int64_t g, uint8_t *rows) {
    const int64_t nb = k / QK1_0;
    q1r32_move(fic_kernels_for(fic_impl_best()), w + g * nb * Q1R32_BLOCK_BYTES, rows, nb, 0);
}

/* ---- an expert bundle in place ------------------------------------------------------------ */

/* A bundle's three parts: gate (n x d), up (n x d), down (d x n: the columns layout). */
static int bundle_shape_ok(int64_t n, int64_t d) {
    return n > 0 && d > 0 && n % QK1_0 == 0 && d % QK1_0 == 0 && n <= WS_MAX_DIM && d <= WS_MAX_DIM;
}

/* One group of the longer rows: a thread's temporary copy. */
static int64_t group_bytes_of(int64_t n, int64_t d) { return ws_round64((n > d ? n : d) / QK1_0 * Q1R32_BLOCK_BYTES); }

int64_t fic_q1r32_bundles_ws_bytes(int n_threads, int64_t n_max, int64_t d) {
    if (n_threads < 1 || n_threads > WS_MAX_THREADS || !bundle_shape_ok(n_max, d)) return FIC_ERR_ARG;
    return n_threads * group_bytes_of(n_max, d);
}

/* m x k in place, a group at a time through tmp: into the r32 layout (to_r32) or back to rows. */
static void move_in_place(const fic_kernels *kt, uint8_t *w, int64_t m, int64_t k, uint8_t *tmp, int to_r32) {
    const int64_t nb = k / QK1_0, group_bytes = nb * Q1R32_BLOCK_BYTES;
    for (int64_t g = 0; g < m / Q1R32_ROWS; g++) {
        memcpy(tmp, w + g * group_bytes, (size_t)group_bytes);
        q1r32_move(kt, tmp, w + g * group_bytes, nb, to_r32);
    }
}

typedef struct {
    const fic_kernels *kt;
    uint8_t *const *bundles;
    const int32_t *n;
    int64_t d, tmp_bytes;
    uint8_t *ws;
    int to_r32;
} bundles_job;

static void bundles_range(void *ctx, int64_t b0, int64_t b1, int tid) {
    const bundles_job *j = ctx;
    uint8_t *tmp = j->ws + tid * j->tmp_bytes;
    const int64_t d = j->d, rb = d / QK1_0 * (int64_t)sizeof(block_q1_0);
    for (int64_t b = b0; b < b1; b++) {
        uint8_t *w = j->bundles[b];
        const int64_t n = j->n[b];
        move_in_place(j->kt, w, n, d, tmp, j->to_r32);
        move_in_place(j->kt, w + n * rb, n, d, tmp, j->to_r32);
        move_in_place(j->kt, w + 2 * n * rb, d, n, tmp, j->to_r32);
    }
}

int fic_q1r32_bundles(fic_pool *pool, int impl, uint8_t *const *bundles, const int32_t *n_neurons, int64_t count,
                      int64_t d, int to_r32, void *ws, int64_t ws_bytes) {
    if (count < 0 || (count > 0 && (bundles == NULL || n_neurons == NULL || ws == NULL))) return FIC_ERR_ARG;
    if (to_r32 != 0 && to_r32 != 1) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    int64_t n_max = 0;
    for (int64_t b = 0; b < count; b++) {
        if (bundles[b] == NULL || !bundle_shape_ok(n_neurons[b], d)) return FIC_ERR_ARG;
        n_max = n_neurons[b] > n_max ? n_neurons[b] : n_max;
    }
    if (count == 0) return FIC_OK;
    if (ws_bytes < fic_q1r32_bundles_ws_bytes(fic_pool_threads(pool), n_max, d)) return FIC_ERR_WORKSPACE;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    bundles_job j = {kt, bundles, n_neurons, d, group_bytes_of(n_max, d), ws, to_r32};
    fic_parallel_for(pool, count, 1, bundles_range, &j);
    return FIC_OK;
}

/* ---- one token's expert FFN over r32 bundles (ffn.c's t = 1 path for FIC_Q1_0R32) -----------
 *   phase 1: x quantized and tabled once for every expert's gate and up rows; threads split the
 *            experts' 32-row groups (all experts back to back); for an expert's groups, the gate
 *            rows into h, then the up rows R32_STEP_GROUPS groups at a time, h = coef silu(gate) up.
 *   phase 2: each expert's h_e quantized and tabled once (threads split the experts); threads
 *            split d_model's 32-row groups; per R32_STEP_GROUPS groups, each expert's down rows add
 *            into y (expert order) or, fixed, are rounded into acc on their own.
 * A row's value depends only on its group's bytes and the tables: the same bits whatever the
 * threads, the chunks, or which other experts share the call. */

#define R32_STEP_GROUPS 2 /* groups per step of the up rows and of phase 2: 64 floats on the stack */

typedef struct {
    const ffn_t *f;
    const qdot_kernels *qk;
    uint8_t *qx, *tab;   /* phase 1: x quantized, its tables */
    uint8_t *qh, *tabh;  /* phase 2: h_e quantized at Q1R32_XQ_BYTES(off[e]), its tables at 8 off[e] */
    int16_t *cx, *cxh;   /* the tables' corrections: x's, and h_e's at off[e] / 32 (in qx's and qh's slack) */
} r32ffn_t;

static const uint8_t *up_part(const ffn_t *f, int64_t e) { return f->bundles[e] + (int64_t)f->n[e] * f->rb_g; }

static void r32_phase1(void *ctx, int64_t g0, int64_t g1, int tid) {
    const r32ffn_t *q = ctx;
    const ffn_t *f = q->f;
    (void)tid;
    const int64_t nb = f->d / QK1_0, gb = nb * Q1R32_BLOCK_BYTES;
    const float *dx = (const float *)(q->qx + f->d);
    for (int64_t e = ffn_expert_of(f, g0 * Q1R32_ROWS); e < f->n_experts && f->off[e] < g1 * Q1R32_ROWS; e++) {
        const int64_t o = f->off[e] / Q1R32_ROWS, n_groups = f->n[e] / Q1R32_ROWS;
        const int64_t a = g0 > o ? g0 - o : 0, b = g1 - o < n_groups ? g1 - o : n_groups;
        float *h = f->h + f->off[e];
        if (f->skip[e]) {
            memset(h + a * Q1R32_ROWS, 0, (size_t)((b - a) * Q1R32_ROWS) * sizeof *h);
            continue;
        }
        const float c = f->coef == NULL ? 1.0f : f->coef[e];
        q1r32(f->kt, f->bundles[e], nb, q->tab, q->cx, dx, h, a, b); /* gate values into h */
        for (int64_t g = a; g < b; g += R32_STEP_GROUPS) {
            const int64_t ng = b - g < R32_STEP_GROUPS ? b - g : R32_STEP_GROUPS;
            float u[R32_STEP_GROUPS * Q1R32_ROWS];
            q1r32(f->kt, up_part(f, e) + g * gb, nb, q->tab, q->cx, dx, u, 0, ng);
            silu_mul(f->kt, c, h + g * Q1R32_ROWS, u, ng * Q1R32_ROWS);
        }
    }
}

static void r32_prep_h(void *ctx, int64_t e0, int64_t e1, int tid) {
    const r32ffn_t *q = ctx;
    const ffn_t *f = q->f;
    (void)tid;
    for (int64_t e = e0; e < e1; e++) {
        if (f->skip[e]) continue;
        uint8_t *qh = q->qh + Q1R32_XQ_BYTES(f->off[e]);
        q->qk->q1r32_quantize(f->h + f->off[e], f->n[e], qh);
        build_tables(q->qk, (const int8_t *)qh, f->n[e], q->tabh + 8 * f->off[e], q->cxh + f->off[e] / 32);
    }
}

static void r32_phase2(void *ctx, int64_t g0, int64_t g1, int tid) {
    const r32ffn_t *q = ctx;
    const ffn_t *f = q->f;
    (void)tid;
    for (int64_t g = g0; g < g1; g += R32_STEP_GROUPS) {
        const int64_t ng = g1 - g < R32_STEP_GROUPS ? g1 - g : R32_STEP_GROUPS, nr = ng * Q1R32_ROWS;
        for (int64_t e = 0; e < f->n_experts; e++) {
            if (f->skip[e]) continue;
            const int64_t n = f->n[e], nb = n / QK1_0;
            const float *dx = (const float *)(q->qh + Q1R32_XQ_BYTES(f->off[e]) + n);
            float out[R32_STEP_GROUPS * Q1R32_ROWS];
            q1r32(f->kt, down_part(f, e) + g * nb * Q1R32_BLOCK_BYTES, nb, q->tabh + 8 * f->off[e], q->cxh + f->off[e] / 32,
                  dx, out, 0, ng);
            if (f->acc != NULL) {
                fixed_add(f->kt, out, f->acc + g * Q1R32_ROWS, nr);
            } else {
                float *y = f->y + g * Q1R32_ROWS;
                for (int64_t r = 0; r < nr; r++) y[r] += out[r];
            }
        }
    }
}

int q1r32_ffn_t1(fic_pool *pool, const ffn_t *f, uint8_t *ws, int64_t ws_bytes) {
    const int64_t d = f->d, n_total = f->n_total;
    const int64_t need = ws_round64(3 * d) + ws_round64(8 * d) + ws_round64(2 * n_total) + ws_round64(8 * n_total);
    if (ws_bytes < need) return FIC_ERR_WORKSPACE; /* within fic.h's bound for t = 1 */
    r32ffn_t q = {.f = f, .qk = fic_qdot_kernels(f->impl), .qx = ws};
    q.tab = q.qx + ws_round64(3 * d);
    q.qh = q.tab + ws_round64(8 * d);
    q.tabh = q.qh + ws_round64(2 * n_total);
    q.cx = (int16_t *)(q.qx + QX_BYTES(d));        /* d / 16 bytes: 1.04 d + 63 + d / 16 <= 3 d */
    q.cxh = (int16_t *)(q.qh + QX_BYTES(n_total)); /* the same within 2 N */
    q.qk->q1r32_quantize(f->x, d, q.qx);
    build_tables(q.qk, (const int8_t *)q.qx, d, q.tab, q.cx);
    const int64_t n_groups = n_total / Q1R32_ROWS, rb = d / QK1_0 * (int64_t)sizeof(block_q1_0);
    fic_parallel_for(pool, n_groups, row_chunk(pool, n_groups, Q1R32_ROWS * 2 * rb), r32_phase1, &q);
    fic_parallel_for(pool, f->n_experts, 1, r32_prep_h, &q);
    int64_t rb_sum = 0;
    for (int64_t e = 0; e < f->n_experts; e++) rb_sum += f->skip[e] ? 0 : f->rb_d[e];
    const int64_t d_groups = d / Q1R32_ROWS;
    int64_t c2 = row_chunk(pool, d_groups, Q1R32_ROWS * (rb_sum > 0 ? rb_sum : 1));
    fic_parallel_for(pool, d_groups, c2, r32_phase2, &q);
    return FIC_OK;
}
