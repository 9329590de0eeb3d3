/* qdot_ffn.c - the expert FFN's prefill (t > 1) phases through the int8-activation path (qdot.h):
 *   phase 1: x quantized once per token chunk; threads split the flattened neuron list; each
 *            thread unpacks QW_ROWS gate rows, multiplies them with every token of the chunk
 *            straight into h, then the same up rows into its buffer, and forms
 *            h = coef silu(g) u (exactly 0 where coef is 0).
 *   phase 2 (down parts as columns, d_model x n_e): the experts' h_e[i] side by side quantized
 *            once per token chunk as one row of n_total; threads split the d_model output rows;
 *            each output row's pieces (one per expert, zeros for skipped experts, not read) are
 *            unpacked into one row and multiplied with every token (results do not depend on the
 *            thread count). Under FIC_FFN_FIXED (each expert's products rounded into the fixed-point
 *            sums alone) only the AMX kernels take it: expert by expert, against its blocks of h.
 * Where the kernels have AMX tiles (qdot.h's QT layout), 16 rows a call and x in 16-token tiles
 * where those fit the workspace, else token rows: the same bits.
 * Q1_0 (gate and up, or down) takes its own kernels instead (qdot.h Q1X_*): rows read as stored,
 * no unpacking; down pieces gathered as whole blocks. Bundles in the r32 layout (FIC_Q1_0R32): gate
 * and up, then down, by the matvec's tables, a token at a time per group of 32 rows (q1r32.c); on
 * NEON, which has no fast r32 kernel, by Q1_0's kernels on rows unpacked a group of 32 at a time
 * (q1r32_group_rows) into the thread's buffer: steps and chunks of 32 rows there.
 * Tokens go in chunks that fit the workspace beside each thread's unpacked rows and buffer;
 * nothing is allocated. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "qdot.h"

typedef struct {
    const qdot_ffn *a;
    const qdot_kernels *kern;
    const fic_kernels *kt;     /* a->impl's table, resolved once per call */
    int64_t i0, nt;            /* the token chunk */
    int64_t ub;                /* bytes of one unpacked row */
    int64_t rows;              /* unpacked rows per dot call (phase 1 and 2's unpacked paths) */
    int tiles;                 /* xq in the QT layout (qdot.h), not token rows */
    uint8_t *per_thread;       /* per thread: `rows` unpacked rows, then (phase 1) the up buffer */
    int64_t thread_bytes;
    uint8_t *xq;               /* nt x QX_ROW_BYTES(d) (phase 1) or QX_ROW_BYTES(n_total) (phase 2) */
} qffn_t;


/* Rows [r, r + nr) of expert e's h for the chunk's nt tokens (hr: h_e + r, rows n apart), holding
 * the gate products, become coef silu(gate) up with up's products in ubuf (nt x nr): the
 * implementation's silu_mul, as the float prefill and decode compute it. */
static void swiglu_rows(const qffn_t *q, int64_t e, float *hr, int64_t n, int64_t nr, const float *ubuf) {
    const qdot_ffn *a = q->a;
    const fic_kernels *kt = q->kt;
    for (int64_t i = 0; i < q->nt; i++) {
        const float c = a->coef == NULL ? 1.0f : a->coef[(q->i0 + i) * a->n_experts + e];
        float *hi = hr + i * n;
        if (c == 0.0f) {
            memset(hi, 0, (size_t)nr * sizeof *hi);
            continue;
        }
        silu_mul(kt, c, hi, ubuf + i * nr, nr);
    }
}

static int64_t unpack_bytes(int64_t k) { return (QW_ROW_BYTES(k) + 63) / 64 * 64; }
/* bytes of a gathered Q1_0 row of k weights, rounded to 64 */
static int64_t n_total_bytes_q1(int64_t k) { return (k / QK1_0 * (int64_t)sizeof(block_q1_0) + 63) / 64 * 64; }

/* Tokens per chunk: what fits in ws_bytes beside n_threads * fixed bytes, at per_token shared
 * bytes and per_token_thread bytes per thread; 0 when not even one token does. */
static int64_t chunk_tokens(int64_t ws_bytes, int64_t n_threads, int64_t fixed, int64_t per_token,
                            int64_t per_token_thread) {
    const int64_t avail = ws_bytes - n_threads * fixed;
    const int64_t per = per_token + n_threads * per_token_thread;
    return avail < per ? 0 : avail / per;
}

/* ---- phase 1 --------------------------------------------------------------------------------- */

static void p1_quantize(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    (void)tid;
    const int64_t d = q->a->d, qrow = QX_ROW_BYTES(d);
    for (int64_t i = i0; i < i1; i++) {
        if (q->tiles) q->kern->tiles_quantize(q->a->x + (q->i0 + i) * d, d, i, q->xq);
        else q->kern->quantize(q->a->x + (q->i0 + i) * d, d, q->xq + i * qrow);
    }
}

/* One expert's part of phase 1's neuron range [g0, g1): its rows [r0, r1), the chunk's rows of
 * h_e (t x n) and its gate and up rows. */
typedef struct {
    int64_t e, n, r0, r1;
    float *h;
    const uint8_t *gate, *up;
} p1_piece;

/* The next expert of [g0, g1) after p->e (start from p->e = -1) that is not skipped, into *p; a
 * skipped expert's rows of h are zeroed on the way. 0 when none is left. */
static int p1_next(const qffn_t *q, int64_t g0, int64_t g1, p1_piece *p) {
    const qdot_ffn *a = q->a;
    int64_t e = p->e + 1;
    if (p->e < 0)
        while (a->off[e + 1] <= g0) e++;
    for (; e < a->n_experts && a->off[e] < g1; e++) {
        const int64_t n = a->n[e];
        const int64_t r0 = g0 > a->off[e] ? g0 - a->off[e] : 0, r1 = g1 < a->off[e + 1] ? g1 - a->off[e] : n;
        float *h = a->h + a->t * a->off[e] + q->i0 * n;
        if (a->skip[e]) {
            for (int64_t i = 0; i < q->nt; i++) memset(h + i * n + r0, 0, (size_t)(r1 - r0) * sizeof *h);
            continue;
        }
        *p = (p1_piece){e, n, r0, r1, h, a->bundles[e], a->bundles[e] + n * a->rb_g};
        return 1;
    }
    return 0;
}

static void p1_rows(void *ctx, int64_t g0, int64_t g1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    uint8_t *buf = q->per_thread + tid * q->thread_bytes;
    float *ubuf = (float *)(buf + q->rows * q->ub); /* nt x q->rows */
    const int64_t d = a->d, qrow = QX_ROW_BYTES(d), nt = q->nt;
    qw_row rows[QW_ROWS_MAX];
    p1_piece p = {.e = -1};
    while (p1_next(q, g0, g1, &p)) {
        for (int64_t r = p.r0; r < p.r1; r += q->rows) {
            const int64_t nr = p.r1 - r < q->rows ? p.r1 - r : q->rows;
            for (int64_t l = 0; l < nr; l++) fic_qdot_unpack(a->gate_fmt, p.gate + (r + l) * a->rb_g, d, buf + l * q->ub, &rows[l]);
            if (q->tiles) q->kern->tiles_dot(rows, nr, q->xq, QT_TILE_BYTES(d), nt, p.h + r, p.n, 0);
            else q->kern->dot(rows, nr, q->xq, qrow, nt, p.h + r, p.n, 0);
            for (int64_t l = 0; l < nr; l++) fic_qdot_unpack(a->up_fmt, p.up + (r + l) * a->rb_u, d, buf + l * q->ub, &rows[l]);
            if (q->tiles) q->kern->tiles_dot(rows, nr, q->xq, QT_TILE_BYTES(d), nt, ubuf, nr, 0);
            else q->kern->dot(rows, nr, q->xq, qrow, nt, ubuf, nr, 0);
            swiglu_rows(q, p.e, p.h + r, p.n, nr, ubuf);
        }
    }
}

/* ---- phase 1, Q1_0 gate and up through Q1_0's own kernels (qdot.h, Q1X_*) ------------------ */

#define Q1_FFN_ROWS 16 /* gate then up rows per step: the up results, nt x 16 floats, in the thread's buffer */

static void p1_q1_quantize(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    (void)tid;
    const int64_t d = q->a->d, qrow = Q1X_ROW_BYTES(d);
    for (int64_t i = i0; i < i1; i++) q->kern->q1_quantize(q->a->x + (q->i0 + i) * d, d, q->xq + i * qrow);
}

#define R32_ROWS 32 /* the r32 layout's group */

/* Rows [r, r + nr) of an r32 matrix of k columns (r and nr multiples of 32) unpacked into buf. */
static const uint8_t *r32_rows(const uint8_t *w, int64_t k, int64_t r, int64_t nr, int64_t rb, uint8_t *buf) {
    for (int64_t l = 0; l < nr; l += R32_ROWS) q1r32_group_rows(w, k, (r + l) / R32_ROWS, buf + l * rb);
    return buf;
}

/* Rows per step: a group in the r32 layout. */
static int64_t q1_step(int r32) { return r32 ? R32_ROWS : Q1_FFN_ROWS; }

static void p1_q1_rows(void *ctx, int64_t g0, int64_t g1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    const int64_t d = a->d, qrow = Q1X_ROW_BYTES(d), nt = q->nt, r32 = a->gate_fmt == FIC_Q1_0R32, step = q1_step(r32);
    float *ubuf = (float *)(q->per_thread + tid * q->thread_bytes); /* nt x step */
    uint8_t *rows = (uint8_t *)ubuf + q->thread_bytes - step * a->rb_g; /* r32: a group unpacked */
    p1_piece p = {.e = -1};
    while (p1_next(q, g0, g1, &p)) {
        for (int64_t r = p.r0; r < p.r1; r += step) {
            const int64_t nr = p.r1 - r < step ? p.r1 - r : step;
            const uint8_t *gate = r32 ? r32_rows(p.gate, d, r, nr, a->rb_g, rows) : p.gate + r * a->rb_g;
            q->kern->q1_dot(gate, a->rb_g, nr, d, q->xq, qrow, nt, p.h + r, p.n, 0);
            const uint8_t *up = r32 ? r32_rows(p.up, d, r, nr, a->rb_u, rows) : p.up + r * a->rb_u;
            q->kern->q1_dot(up, a->rb_u, nr, d, q->xq, qrow, nt, ubuf, nr, 0);
            swiglu_rows(q, p.e, p.h + r, p.n, nr, ubuf);
        }
    }
}

/* ---- phase 1, r32 gate and up by the matvec's tables (q1r32.c) --------------------------------
 * Each token's x tabled once per chunk (q->xq: q1r32_tok_bytes(d) a token); per group of 32 gate
 * rows, every token through the matvec's kernel (the group in L1 across the tokens), the same for
 * up into the thread's buffer (nt x 32), then h = coef silu(g) u. */

static void p1_r32_prep(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    (void)tid;
    const fic_kernels *kt = q->kt;
    const int64_t d = q->a->d, tb = q1r32_toks_bytes(kt, d);
    for (int64_t i = i0; i < i1; i++) q1r32_toks_prep(kt, q->kern, q->a->x + (q->i0 + i) * d, d, q->xq + i * tb);
}

static void p1_r32_rows(void *ctx, int64_t g0, int64_t g1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    const fic_kernels *kt = q->kt;
    const int64_t d = a->d, tb = q1r32_toks_bytes(kt, d), gb = R32_ROWS * a->rb_g;
    float *ubuf = (float *)(q->per_thread + tid * q->thread_bytes); /* nt x 32 */
    uint8_t *scratch = q->per_thread + (tid + 1) * q->thread_bytes - q1r32_toks_scratch(kt, d);
    p1_piece p = {.e = -1};
    while (p1_next(q, g0, g1, &p)) {
        for (int64_t r = p.r0; r < p.r1; r += R32_ROWS) {
            const uint8_t *gate = p.gate + r / R32_ROWS * gb, *up = p.up + r / R32_ROWS * gb;
            q1r32_toks_group(kt, gate, d, q->xq, tb, q->nt, p.h + r, p.n, scratch);
            q1r32_toks_group(kt, up, d, q->xq, tb, q->nt, ubuf, R32_ROWS, scratch);
            swiglu_rows(q, p.e, p.h + r, p.n, R32_ROWS, ubuf);
        }
    }
}

/* A Q1_0 phase token chunk by chunk: prep prepares a chunk's tokens (tok_bytes each), then threads
 * split n_rows rows (phase 1: the neurons; phase 2: d_model) in steps of `step`, each thread with
 * tok_thread bytes a token (nt x step floats of products, and more where the phase says) and
 * `gather` bytes (unpacked rows, or a kernel's scratch) at the end of its area. */
static int q1_chunks(fic_pool *pool, qffn_t *q, uint8_t *ws, int64_t ws_bytes, int64_t n_rows, int64_t step,
                     int64_t gather, int64_t tok_bytes, int64_t tok_thread, fic_range_fn prep, fic_range_fn rows) {
    const qdot_ffn *a = q->a;
    const int64_t n_threads = fic_pool_threads(pool);
    const int64_t tc = chunk_tokens(ws_bytes, n_threads, 64 + gather, tok_bytes, tok_thread);
    if (tc < 1) return FIC_ERR_WORKSPACE;
    q->thread_bytes = (tok_thread * tc + gather + 63) / 64 * 64;
    q->per_thread = ws;
    q->xq = ws + n_threads * q->thread_bytes;
    int64_t chunk = (n_rows + 4 * n_threads - 1) / (4 * n_threads);
    chunk = (chunk + step - 1) / step * step;
    for (q->i0 = 0; q->i0 < a->t; q->i0 += tc) {
        q->nt = a->t - q->i0 < tc ? a->t - q->i0 : tc;
        fic_parallel_for(pool, q->nt, (q->nt + n_threads - 1) / n_threads, prep, q);
        fic_parallel_for(pool, n_rows, chunk, rows, q);
    }
    return FIC_OK;
}

static int q1_phase1(fic_pool *pool, qffn_t *q, uint8_t *ws, int64_t ws_bytes) {
    const qdot_ffn *a = q->a;
    const fic_kernels *kt = q->kt;
    if (a->gate_fmt == FIC_Q1_0R32 && kt->q1r32 != NULL)
        return q1_chunks(pool, q, ws, ws_bytes, a->n_total, R32_ROWS, q1r32_toks_scratch(kt, a->d), q1r32_toks_bytes(kt, a->d),
                         4 * R32_ROWS, p1_r32_prep, p1_r32_rows);
    const int r32 = a->gate_fmt == FIC_Q1_0R32;
    const int64_t step = q1_step(r32), gather = r32 ? step * a->rb_g : 0; /* r32: a group unpacked */
    return q1_chunks(pool, q, ws, ws_bytes, a->n_total, step, gather, Q1X_ROW_BYTES(a->d), 4 * step, p1_q1_quantize,
                     p1_q1_rows);
}

int fic_qdot_ffn_phase1(fic_pool *pool, const qdot_ffn *a, uint8_t *ws, int64_t ws_bytes) {
    const int64_t n_threads = fic_pool_threads(pool), d = a->d;
    qffn_t q = {.a = a, .kern = fic_qdot_kernels(a->impl), .kt = fic_kernels_for(a->impl), .ub = unpack_bytes(d)};
    if (a->gate_fmt == FIC_Q1_0R32) /* with up and down: ffn.c checked the layout */
        return q.kern->q1_dot != NULL ? q1_phase1(pool, &q, ws, ws_bytes) : FIC_ERR_UNSUPPORTED;
    if (a->gate_fmt == FIC_Q1_0 && a->up_fmt == FIC_Q1_0 && q.kern->q1_dot != NULL) return q1_phase1(pool, &q, ws, ws_bytes);
    /* + the up buffer, nt x q.rows floats, below */
    int64_t tc = 0;
    for (q.rows = q.kern->rows;; q.rows = QW_ROWS) {
        tc = chunk_tokens(ws_bytes, n_threads, q.rows * q.ub + 64, QX_ROW_BYTES(d), 4 * q.rows);
        if (q.rows == QW_ROWS || tc >= (a->t < 16 ? a->t : 16)) break; /* else 8: fewer tokens than a tile */
    }
    if (tc < 1) return FIC_ERR_WORKSPACE;
    /* the QT layout takes whole tiles of 16 tokens (QX_ROW_BYTES(d) a token, as rows) */
    const int64_t tiles16 = chunk_tokens(ws_bytes, n_threads, q.rows * q.ub + 64, 16 * QX_ROW_BYTES(d), 64 * q.rows);
    q.tiles = qdot_tiles_for(q.kern, a->gate_fmt) && qdot_tiles_for(q.kern, a->up_fmt) && tiles16 >= 1;
    if (q.tiles) tc = 16 * tiles16;
    q.thread_bytes = (q.rows * q.ub + 4 * q.rows * tc + 63) / 64 * 64;
    q.per_thread = ws;
    q.xq = ws + n_threads * q.thread_bytes;
    int64_t chunk = (a->n_total + 4 * n_threads - 1) / (4 * n_threads);
    chunk = (chunk + q.rows - 1) / q.rows * q.rows;
    for (q.i0 = 0; q.i0 < a->t; q.i0 += tc) {
        q.nt = a->t - q.i0 < tc ? a->t - q.i0 : tc;
        fic_parallel_for(pool, q.nt, (q.nt + n_threads - 1) / n_threads, p1_quantize, &q);
        fic_parallel_for(pool, a->n_total, chunk, p1_rows, &q);
    }
    return FIC_OK;
}

/* ---- phase 2, columns ------------------------------------------------------------------------ */
/* All experts' down rows side by side are one row of n_total weights, and all h_e[i] side by side
 * one activation row (expert sizes are multiples of 32 here, so the q8 blocks do not straddle
 * experts): one unpacked row and one dot product of length n_total per output row and token. */

static void p2_quantize(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    const int64_t n_total = a->n_total;
    float *row = (float *)(q->per_thread + tid * q->thread_bytes + q->rows * q->ub); /* n_total floats */
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t e = 0; e < a->n_experts; e++) {
            const int64_t n = a->n[e];
            memcpy(row + a->off[e], a->h + a->t * a->off[e] + (q->i0 + i) * n, (size_t)n * sizeof *row);
        }
        if (q->tiles) q->kern->tiles_quantize(row, n_total, i, q->xq);
        else q->kern->quantize(row, n_total, q->xq + i * QX_ROW_BYTES(n_total));
    }
}

static void p2_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    uint8_t *buf = q->per_thread + tid * q->thread_bytes;
    const int64_t n_total = a->n_total;
    qw_row rows[QW_ROWS_MAX];
    for (int64_t r = r0; r < r1; r += q->rows) {
        const int64_t nr = r1 - r < q->rows ? r1 - r : q->rows;
        for (int64_t l = 0; l < nr; l++) {
            for (int64_t e = 0; e < a->n_experts; e++) {
                const int64_t n = a->n[e];
                const uint8_t *down = a->skip[e] ? NULL : a->bundles[e] + n * (a->rb_g + a->rb_u) + (r + l) * a->rb_d[e];
                fic_qdot_unpack_piece(a->down_fmt, down, n, buf + l * q->ub, n_total, a->off[e]);
            }
            fic_qdot_row(a->down_fmt, buf + l * q->ub, n_total, &rows[l]);
        }
        if (q->tiles) q->kern->tiles_dot(rows, nr, q->xq, QT_TILE_BYTES(n_total), q->nt, a->y + q->i0 * a->d + r, a->d, 1);
        else q->kern->dot(rows, nr, q->xq, QX_ROW_BYTES(n_total), q->nt, a->y + q->i0 * a->d + r, a->d, 1);
    }
}

/* FIC_FFN_FIXED through the AMX kernels: expert by expert, its down rows' piece unpacked on its own
 * against its blocks of each token's quantized h (blocks off_e / 32 on: of the QT tiles, or of the
 * token rows where the tiles did not fit, the same bits), QT_FIXED_ROWS output rows' products (nt x
 * QT_FIXED_ROWS, after the unpacked rows in the thread's buffer) rounded into acc on their own: one
 * fixed_add call a token per 64 rows, not per 16 (a dense model's experts are 64 neurons). */
#define QT_FIXED_ROWS 64

static void p2_rows_fixed(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    uint8_t *buf = q->per_thread + tid * q->thread_bytes;
    float *out = (float *)(buf + q->rows * q->ub); /* nt x QT_FIXED_ROWS */
    const int64_t n_total = a->n_total;
    qw_row rows[QW_ROWS_MAX];
    for (int64_t r = r0; r < r1; r += QT_FIXED_ROWS) {
        const int64_t nf = r1 - r < QT_FIXED_ROWS ? r1 - r : QT_FIXED_ROWS;
        for (int64_t e = 0; e < a->n_experts; e++) {
            if (a->skip[e]) continue;
            const uint8_t *down = a->bundles[e] + a->n[e] * (a->rb_g + a->rb_u);
            const int64_t j0 = a->off[e] / QX_BLOCK;
            for (int64_t g = 0; g < nf; g += q->rows) {
                const int64_t nr = nf - g < q->rows ? nf - g : q->rows;
                for (int64_t l = 0; l < nr; l++)
                    fic_qdot_unpack(a->down_fmt, down + (r + g + l) * a->rb_d[e], a->n[e], buf + l * q->ub, &rows[l]);
                if (q->tiles)
                    q->kern->tiles_dot(rows, nr, q->xq + j0 * QT_BLOCK_BYTES, QT_TILE_BYTES(n_total), q->nt, out + g, nf, 0);
                else
                    q->kern->part_dot(rows, nr, q->xq, QX_ROW_BYTES(n_total), n_total, j0, q->nt, out + g, nf, 0);
            }
            for (int64_t i = 0; i < q->nt; i++) a->fixed_add(out + i * nf, a->acc + (q->i0 + i) * a->d + r, nf);
        }
    }
}

/* ---- phase 2, Q1_0 columns: each output row's pieces gathered as whole Q1_0 blocks ----------
 * (a Q1_0 piece is n_e / 128 blocks; a skipped expert's blocks are zeros: d = 0 adds exactly 0) */

/* The layout's blocks are independent and no block straddles two experts: each h_e[i] is quantized
 * where its blocks go, with no copy into one row first. */
static void p2_q1_quantize(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) {
        uint8_t *xi = q->xq + i * Q1X_ROW_BYTES(a->n_total);
        for (int64_t e = 0; e < a->n_experts; e++) {
            const int64_t n = a->n[e];
            q->kern->q1_quantize(a->h + a->t * a->off[e] + (q->i0 + i) * n, n, xi + Q1X_ROW_BYTES(a->off[e]));
        }
    }
}

static void p2_q1_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    const int r32 = a->down_fmt == FIC_Q1_0R32;
    const int64_t n_total = a->n_total, bb = (int64_t)sizeof(block_q1_0), step = q1_step(r32);
    uint8_t *buf = q->per_thread + tid * q->thread_bytes; /* step gathered rows of ub bytes */
    uint8_t *group = buf + step * q->ub;                  /* r32: an expert's group of down rows */
    for (int64_t r = r0; r < r1; r += step) {
        const int64_t nr = r1 - r < step ? r1 - r : step;
        for (int64_t e = 0; e < a->n_experts; e++) { /* expert by expert: its rows are adjacent */
            const int64_t nb = a->n[e] / QK1_0, rbd = a->rb_d[e];
            const uint8_t *down = a->bundles[e] + a->n[e] * (a->rb_g + a->rb_u);
            const uint8_t *src = a->skip[e] ? NULL : r32 ? r32_rows(down, a->n[e], r, nr, rbd, group) : down + r * rbd;
            for (int64_t l = 0; l < nr; l++) {
                uint8_t *dst = buf + l * q->ub + a->off[e] / QK1_0 * bb;
                if (a->skip[e]) memset(dst, 0, (size_t)(nb * bb));
                else if (nb == 1) memcpy(dst, src + l * rbd, sizeof(block_q1_0)); /* inlined: experts of 128 */
                else memcpy(dst, src + l * rbd, (size_t)rbd);
            }
        }
        q->kern->q1_dot(buf, q->ub, nr, n_total, q->xq, Q1X_ROW_BYTES(n_total), q->nt, a->y + q->i0 * a->d + r, a->d, 1);
    }
}

#define Q1_FIXED_ROWS 64 /* fixed: output rows per q1_dot call of one expert */

/* Bytes a thread needs for Q1_FIXED_ROWS down rows of the largest expert gathered (r32), else 0. */
static int64_t q1_fixed_gather(const qdot_ffn *a) {
    return a->down_fmt == FIC_Q1_0R32 ? (Q1_FIXED_ROWS * (a->n_max / QK1_0) * (int64_t)sizeof(block_q1_0) + 63) / 64 * 64 : 0;
}

/* FIC_FFN_FIXED: expert by expert, its down rows as stored (rb_d apart) against its part of each
 * token's quantized h, the products (nt x nr, the thread's buffer) rounded into acc on their own. */
static void p2_q1_rows_fixed(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    float *out = (float *)(q->per_thread + tid * q->thread_bytes); /* nt x Q1_FIXED_ROWS */
    uint8_t *rows = q->per_thread + (tid + 1) * q->thread_bytes - q1_fixed_gather(a); /* r32: rows gathered */
    const int64_t qrow = Q1X_ROW_BYTES(a->n_total);
    for (int64_t r = r0; r < r1; r += Q1_FIXED_ROWS) {
        const int64_t nr = r1 - r < Q1_FIXED_ROWS ? r1 - r : Q1_FIXED_ROWS;
        for (int64_t e = 0; e < a->n_experts; e++) {
            if (a->skip[e]) continue;
            const int64_t rbd = a->rb_d[e];
            const uint8_t *down = a->bundles[e] + a->n[e] * (a->rb_g + a->rb_u);
            const uint8_t *src = a->down_fmt == FIC_Q1_0R32 ? r32_rows(down, a->n[e], r, nr, rbd, rows) : down + r * rbd;
            q->kern->q1_dot(src, rbd, nr, a->n[e], q->xq + Q1X_ROW_BYTES(a->off[e]), qrow, q->nt, out, nr, 0);
            for (int64_t i = 0; i < q->nt; i++) a->fixed_add(out + i * nr, a->acc + (q->i0 + i) * a->d + r, nr);
        }
    }
}

int fic_qdot_down_fixed_ok(const qdot_ffn *a) {
    const qdot_kernels *kern = fic_qdot_kernels(a->impl);
    return ((a->down_fmt == FIC_Q1_0 || a->down_fmt == FIC_Q1_0R32) && kern->q1_dot != NULL) ||
           (qdot_tiles_for(kern, a->down_fmt) && kern->part_dot != NULL);
}

/* ---- phase 2, r32 down by the matvec's tables (q1r32.c) -------------------------------------
 * Per token, each expert's h_e[i] tabled (q1r32_tok_bytes(n_e) each, expert after expert); per
 * group of 32 output rows, expert by expert, every token through the matvec's kernel (the expert's
 * group in L1 across the tokens), the products (nt x 32, the thread's buffer) added into y, or
 * rounded into acc on their own (FIC_FFN_FIXED). */

static int64_t r32_down_tok_bytes(const fic_kernels *kt, const qdot_ffn *a) {
    int64_t b = 0;
    for (int64_t e = 0; e < a->n_experts; e++) b += q1r32_toks_bytes(kt, a->n[e]);
    return b;
}

static void p2_r32_prep(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    (void)tid;
    const fic_kernels *kt = q->kt;
    const int64_t tb = r32_down_tok_bytes(kt, a);
    for (int64_t i = i0; i < i1; i++) {
        uint8_t *tok = q->xq + i * tb;
        for (int64_t e = 0; e < a->n_experts; tok += q1r32_toks_bytes(kt, a->n[e]), e++)
            if (!a->skip[e]) q1r32_toks_prep(kt, q->kern, a->h + a->t * a->off[e] + (q->i0 + i) * a->n[e], a->n[e], tok);
    }
}

static void p2_r32_rows(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qffn_t *q = ctx;
    const qdot_ffn *a = q->a;
    const fic_kernels *kt = q->kt;
    const int64_t tb = r32_down_tok_bytes(kt, a), d = a->d;
    float *out = (float *)(q->per_thread + tid * q->thread_bytes); /* nt x 32 */
    int64_t *sums = (int64_t *)(out + q->nt * R32_ROWS); /* FIC_FFN_FIXED: nt x 32, the group's */
    uint8_t *scratch = q->per_thread + (tid + 1) * q->thread_bytes - q1r32_toks_scratch(kt, a->n_max);
    for (int64_t r = r0; r < r1; r += R32_ROWS) {
        const uint8_t *tok = q->xq;
        if (a->acc != NULL) memset(sums, 0, (size_t)(q->nt * R32_ROWS) * sizeof *sums);
        for (int64_t e = 0; e < a->n_experts; tok += q1r32_toks_bytes(kt, a->n[e]), e++) {
            if (a->skip[e]) continue;
            const uint8_t *group = a->bundles[e] + a->n[e] * (a->rb_g + a->rb_u) + r * a->rb_d[e]; /* 32 rows of rb_d */
            q1r32_toks_group(kt, group, a->n[e], tok, tb, q->nt, out, R32_ROWS, scratch);
            if (a->acc != NULL) { /* each expert's products rounded on their own, added as integers */
                a->fixed_add(out, sums, q->nt * R32_ROWS);
                continue;
            }
            for (int64_t i = 0; i < q->nt; i++) {
                float *y = a->y + (q->i0 + i) * d + r;
                for (int64_t l = 0; l < R32_ROWS; l++) y[l] += out[i * R32_ROWS + l];
            }
        }
        /* then once into acc: its rows are d apart (a power of two, often), so adding every expert
         * there thrashed the caches' sets (9.8% of a 1-bit 1.7B's prefill, bench/RESULTS.md) */
        for (int64_t i = 0; a->acc != NULL && i < q->nt; i++) {
            int64_t *acc = a->acc + (q->i0 + i) * d + r;
            for (int64_t l = 0; l < R32_ROWS; l++) acc[l] += sums[i * R32_ROWS + l];
        }
    }
}

static int q1_down_cols(fic_pool *pool, qffn_t *q, uint8_t *ws, int64_t ws_bytes) {
    const qdot_ffn *a = q->a;
    const int64_t n_threads = fic_pool_threads(pool);
    const int r32 = a->down_fmt == FIC_Q1_0R32;
    const int64_t step = q1_step(r32), group = r32 ? step * (a->n_max / QK1_0) * (int64_t)sizeof(block_q1_0) : 0;
    q->ub = n_total_bytes_q1(a->n_total);
    q->thread_bytes = (step * q->ub + group + 63) / 64 * 64; /* r32: + an expert's group of down rows */
    const int fixed = a->acc != NULL;
    int64_t tc;
    if (fixed) { /* per thread: nt x Q1_FIXED_ROWS products */
        tc = chunk_tokens(ws_bytes, n_threads, 64 + q1_fixed_gather(a), Q1X_ROW_BYTES(a->n_total), 4 * Q1_FIXED_ROWS);
        q->thread_bytes = (4 * Q1_FIXED_ROWS * tc + 63) / 64 * 64 + q1_fixed_gather(a);
    } else {
        tc = chunk_tokens(ws_bytes, n_threads, q->thread_bytes, Q1X_ROW_BYTES(a->n_total), 0);
    }
    if (tc < 1) return FIC_ERR_WORKSPACE;
    q->per_thread = ws;
    q->xq = ws + n_threads * q->thread_bytes;
    int64_t chunk = (a->d + 4 * n_threads - 1) / (4 * n_threads);
    chunk = (chunk + step - 1) / step * step;
    for (q->i0 = 0; q->i0 < a->t; q->i0 += tc) {
        q->nt = a->t - q->i0 < tc ? a->t - q->i0 : tc;
        fic_parallel_for(pool, q->nt, (q->nt + n_threads - 1) / n_threads, p2_q1_quantize, q);
        fic_parallel_for(pool, a->d, chunk, fixed ? p2_q1_rows_fixed : p2_q1_rows, q);
    }
    return FIC_OK;
}

int fic_qdot_ffn_down_cols(fic_pool *pool, const qdot_ffn *a, uint8_t *ws, int64_t ws_bytes) {
    const int64_t n_threads = fic_pool_threads(pool);
    qffn_t q = {.a = a, .kern = fic_qdot_kernels(a->impl), .kt = fic_kernels_for(a->impl), .ub = unpack_bytes(a->n_total)};
    const fic_kernels *kt = q.kt;
    if (a->down_fmt == FIC_Q1_0R32 && kt->q1r32 != NULL)
        return q1_chunks(pool, &q, ws, ws_bytes, a->d, R32_ROWS, q1r32_toks_scratch(kt, a->n_max), r32_down_tok_bytes(kt, a),
                         (4 + (a->acc != NULL ? 8 : 0)) * R32_ROWS, p2_r32_prep, p2_r32_rows);
    if (a->down_fmt == FIC_Q1_0R32) return q.kern->q1_dot != NULL ? q1_down_cols(pool, &q, ws, ws_bytes) : FIC_ERR_UNSUPPORTED;
    if (a->down_fmt == FIC_Q1_0 && q.kern->q1_dot != NULL) return q1_down_cols(pool, &q, ws, ws_bytes);
    const int fixed = a->acc != NULL; /* each expert's products alone: the AMX kernels only (down_fixed_ok) */
    int64_t tc = 0;
    for (q.rows = q.kern->rows;; q.rows = QW_ROWS) {
        q.thread_bytes = (q.rows * q.ub + 4 * a->n_total + 63) / 64 * 64;
        tc = chunk_tokens(ws_bytes, n_threads, q.thread_bytes, QX_ROW_BYTES(a->n_total), fixed ? 4 * QT_FIXED_ROWS : 0);
        if (q.rows == QW_ROWS || tc >= (a->t < 16 ? a->t : 16)) break; /* else 8: fewer tokens than a tile */
    }
    q.tiles = qdot_tiles_for(q.kern, a->down_fmt) && tc >= 16;
    if (fixed && !(qdot_tiles_for(q.kern, a->down_fmt) && q.kern->part_dot != NULL)) return FIC_ERR_UNSUPPORTED;
    if (tc < 1) return FIC_ERR_WORKSPACE;
    if (q.tiles) tc = tc / 16 * 16;
    if (fixed) q.thread_bytes = (q.thread_bytes + 4 * QT_FIXED_ROWS * tc + 63) / 64 * 64; /* + out */
    q.per_thread = ws;
    q.xq = ws + n_threads * q.thread_bytes;
    int64_t chunk = (a->d + 4 * n_threads - 1) / (4 * n_threads);
    chunk = (chunk + q.rows - 1) / q.rows * q.rows;
    for (q.i0 = 0; q.i0 < a->t; q.i0 += tc) {
        q.nt = a->t - q.i0 < tc ? a->t - q.i0 : tc;
        fic_parallel_for(pool, q.nt, (q.nt + n_threads - 1) / n_threads, p2_quantize, &q);
        fic_parallel_for(pool, a->d, chunk, fixed ? p2_rows_fixed : p2_rows, &q);
    }
    return FIC_OK;
}
