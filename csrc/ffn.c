/* ffn.c - one layer's SwiGLU FFN over a set of expert bundles in one call (fic_experts_ffn).
 *
 * A dense model's FFN cut into experts of tens of neurons would cost three kernel calls per
 * expert, thousands of Python -> C calls per token; here a layer is one call, two phases:
 *
 *   phase 1  h_e[i][n] = coef[i][e] * silu(gate_e[n] . x[i]) * (up_e[n] . x[i]) for every
 *            neuron of every expert: threads split the flattened neuron list (all experts
 *            back to back), so the work is balanced whatever the experts' sizes.
 *            t = 1: one row dot product per neuron and matrix, x prepared once (int8 where
 *            matvec uses int8 activations), an expert's gate rows then its up rows (one
 *            forward stream, prefetched in software); t > 1: as matmul, quantized formats
 *            with int8 activations and integer dot products (qdot_ffn.c, also phase 2's
 *            columns), others a tile of rows dequantized to float once and multiplied by all
 *            t tokens.
 *   phase 2  y[i] += sum_e down_e h_e[i]. The router weight is already inside h (down is linear).
 *            columns (down_e is d_model x n_e): threads split the d_model output rows.
 *            t = 1: h_e prepared per expert (int8 where matvec would); Q4 on VNNI and Q1_0 on
 *            AVX-512 take blocks of P2_ROWS output rows, each with one vector accumulator over
 *            all experts' row pieces (one reduction per output row, the h_e loads shared by the
 *            block's rows, the pieces prefetched in software); other paths walk expert by
 *            expert with one dot product per row piece. t > 1:
 *            dequantized tiles times all tokens. rows (down_e is n_e x d_model): threads split
 *            d_model in block-aligned column ranges, as accum_rows; zero h rows are not read.
 *
 * Bundles in the r32 layout (all three formats FIC_Q1_0R32) take q1r32.c's one-token FFN, and for
 * t > 1 the int8 phases of qdot_ffn.c, which unpack a group of rows at a time (the same bits as row-major).
 *
 * An expert whose coef is 0 for every token is skipped entirely (its bundle is not touched);
 * for t > 1 a zero coef of one token makes that token's h zero (exact zero contribution).
 * Scratch holds h: expert e's block is t x n_e floats at t * (n_0 + ... + n_{e-1}), left there
 * for the caller (fic.h). Nothing is allocated: the per-expert tables, the prepared x and h_e
 * (t = 1) and the per-thread tiles (t > 1) are carved from the caller's workspace, in that
 * order after the bundle pointers of fic_experts_ffn_slots (sizes: ws_ffn, kernels.h). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

/* ffn_t, the call's state, is in kernels.h: the AVX-512 phase 2 paths (kernels_avx512.c) read it. */


static inline const uint8_t *gate_row(const ffn_t *f, int64_t e, int64_t r) {
    return f->bundles[e] + r * f->rb_g;
}
static inline const uint8_t *up_row(const ffn_t *f, int64_t e, int64_t r) {
    return f->bundles[e] + (int64_t)f->n[e] * f->rb_g + r * f->rb_u;
}
static inline float coef_of(const ffn_t *f, int64_t i, int64_t e) {
    return f->coef == NULL ? 1.0f : f->coef[i * f->n_experts + e];
}

/* ---- t = 1: memory order and the phase 2 row blocks ---------------------------------------- */

#define P1_NEXT_BYTES 4096 /* phase 1: the next expert's first bytes, prefetched as its up rows start */
/* P1_PF_BYTES, P2_ROWS, P2_PF_BLOCKS and p1_prefetch: kernels.h (the fast paths use them too). */

/* Phase 1 reads, per expert, its gate rows then its up rows: one forward stream (the two are
 * back to back in the bundle), one row at a time with a software prefetch P1_PF_BYTES ahead that
 * stays inside the bundle, and the next expert's first P1_NEXT_BYTES prefetched once as this
 * expert's up rows start (p1_prefetch_next); where a row is read alone by a kernel that prefetches
 * its own stream (job_t.stream_pf: Q4 on VNNI), that prefetch replaces the row's burst. The
 * alternatives tried and their timings are in bench/RESULTS.md ("expert FFN t=1 profile"). */
/* Rows of expert e's gate (up = 0) or up (up = 1) matrix before which p1_prefetch stays inside
 * the bundle. */
static int64_t p1_prefetch_rows(const ffn_t *f, int64_t e, int up) {
    const int64_t n = f->n[e], rb = up ? f->rb_u : f->rb_g;
    const int64_t start = up ? n * f->rb_g : 0;
    const int64_t bytes = n * (f->rb_g + f->rb_u) + (f->down_rows ? n : f->d) * f->rb_d[e];
    const int64_t room = bytes - start - P1_PF_BYTES - rb; /* row r may prefetch iff r * rb <= room */
    return room < 0 ? 0 : room / rb + 1;
}

/* The first P1_NEXT_BYTES of the next expert after e that is not skipped, if it starts before
 * flattened neuron g1 (this thread's range). */
static void p1_prefetch_next(const ffn_t *f, int64_t e, int64_t g1) {
    int64_t e2 = e + 1;
    while (e2 < f->n_experts && f->skip[e2]) e2++;
    if (e2 >= f->n_experts || f->off[e2] >= g1) return;
    const int64_t gu = (int64_t)f->n[e2] * (f->rb_g + f->rb_u);
    for (int64_t o = 0; o < P1_NEXT_BYTES && o < gu; o += 64) FIC_PREFETCH(f->bundles[e2] + o);
}

/* The AVX-512 phase 1 (Q4 on VNNI) and phase 2 (columns: Q4 on VNNI, Q1_0) paths are in
 * kernels_avx512.c, reached through the table's rows and down_cols entries. */

/* ---- phase 1 ----------------------------------------------------------------------------- */

/* out[r - r0] = row r . x for rows [r0, r1) of expert e's gate (up = 0) or up (up = 1) rows. */
static void p1_rows(const ffn_t *f, int64_t e, int up, int64_t r0, int64_t r1, float *out) {
    const job_t *j = up ? &f->ju : &f->jg;
    const int64_t rb = up ? f->rb_u : f->rb_g;
    const uint8_t *base = up ? up_row(f, e, 0) : gate_row(f, e, 0);
    const int64_t r_pf = f->impl == FIC_IMPL_REF ? 0 : p1_prefetch_rows(f, e, up);
    int64_t r = r0;
    if (j->kf->rows && j->kf->rows(j, base, rb, r0, r1, r_pf, out)) return;
    if (j->kf->dot2) {
        /* two consecutive rows share the prepared x (j->row_bytes == rb) */
        for (; r + 2 <= r1; r += 2) {
            if (r + 1 < r_pf) p1_prefetch(base + r * rb, 2 * rb);
            j->kf->dot2(j, base + r * rb, out + (r - r0));
        }
    }
    for (; r < r1; r++) {
        if (r < r_pf && !j->stream_pf) p1_prefetch(base + r * rb, rb);
        out[r - r0] = dot_row(j, base + r * rb, f->x);
    }
}

#define P1_UP_ROWS 64 /* up results per piece (on the stack) */

static void phase1_t1(void *ctx, int64_t g0, int64_t g1, int tid) {
    const ffn_t *f = ctx;
    (void)tid;
    for (int64_t e = ffn_expert_of(f, g0); e < f->n_experts && f->off[e] < g1; e++) {
        int64_t r0 = g0 > f->off[e] ? g0 - f->off[e] : 0;
        int64_t r1 = g1 < f->off[e + 1] ? g1 - f->off[e] : f->n[e];
        float *h = f->h + f->off[e]; /* t = 1 */
        if (f->skip[e]) {
            memset(h + r0, 0, (size_t)(r1 - r0) * sizeof *h);
            continue;
        }
        const float c = coef_of(f, 0, e);
        p1_rows(f, e, 0, r0, r1, h + r0); /* gate values into h, then h = c silu(gate) up */
        if (f->impl != FIC_IMPL_REF) p1_prefetch_next(f, e, g1);
        for (int64_t r = r0; r < r1; r += P1_UP_ROWS) {
            const int64_t nr = r1 - r < P1_UP_ROWS ? r1 - r : P1_UP_ROWS;
            float u[P1_UP_ROWS];
            p1_rows(f, e, 1, r, r + nr, u);
            silu_mul(f->kt, c, h + r, u, nr);
        }
    }
}

static void phase1_tiles(void *ctx, int64_t g0, int64_t g1, int tid) {
    const ffn_t *f = ctx;
    float *tile = f->tiles + tid * f->tile_floats;
    float *ubuf = tile + f->tile1_rows * f->d; /* t x tile1_rows */
    const int64_t t = f->t;
    const int panels = uses_panels(f->kt, t, f->d); /* as tile1_rows was chosen */
    for (int64_t e = ffn_expert_of(f, g0); e < f->n_experts && f->off[e] < g1; e++) {
        const int64_t n = f->n[e];
        int64_t r0 = g0 > f->off[e] ? g0 - f->off[e] : 0;
        int64_t r1 = g1 < f->off[e + 1] ? g1 - f->off[e] : n;
        float *h = f->h + t * f->off[e]; /* t x n */
        if (f->skip[e]) {
            for (int64_t i = 0; i < t; i++) memset(h + i * n + r0, 0, (size_t)(r1 - r0) * sizeof *h);
            continue;
        }
        for (int64_t r = r0; r < r1; r += f->tile1_rows) {
            int64_t nr = r1 - r < f->tile1_rows ? r1 - r : f->tile1_rows;
            job_t jg = f->jg, ju = f->ju;
            jg.y = h;  /* gate: straight into h (t x n, rows r..r+nr) */
            jg.m = n;
            gemm_rows(&jg, panels, gate_row(f, e, 0), f->rb_g, r, nr, r, tile);
            ju.y = ubuf; /* up: t x nr */
            ju.m = nr;
            gemm_rows(&ju, panels, up_row(f, e, 0), f->rb_u, r, nr, 0, tile);
            for (int64_t i = 0; i < t; i++) {
                const float c = coef_of(f, i, e);
                float *hi = h + i * n + r;
                const float *ui = ubuf + i * nr;
                if (c == 0.0f) {
                    memset(hi, 0, (size_t)nr * sizeof *hi);
                    continue;
                }
                silu_mul(f->kt, c, hi, ui, nr);
            }
        }
    }
}

/* ---- phase 2: down part as columns (d_model x n_e) --------------------------------------- */

#define P2_CHUNK 64 /* generic phase 2, columns: output rows per pass of one expert (on the stack) */

/* out[r - r0] = row r of expert e's down piece . h_e, rows [r0, r1), r1 - r0 <= P2_CHUNK. Two rows
 * per pass where the table has dot2 (Q1_0 on AVX2): an expert's column piece is often one block,
 * where the shared x loads and interleaved chains measured 1.25-1.5x. */
static void down_piece_dots(const ffn_t *f, const fic_fmt_kernels *kf, int64_t e, int64_t r0, int64_t r1, float *out) {
    const job_t *j = &f->jd[e];
    const int64_t rb = f->rb_d[e];
    const uint8_t *w = down_part(f, e);
    int64_t r = r0;
    if (kf->dot2)
        for (; r + 2 <= r1; r += 2) kf->dot2(j, w + r * rb, out + (r - r0)); /* j->row_bytes == rb */
    for (; r < r1; r++) out[r - r0] = dot_row(j, w + r * rb, j->x);
}

static void down_cols_t1(void *ctx, int64_t r0, int64_t r1, int tid) {
    const ffn_t *f = ctx;
    (void)tid;
    const fic_fmt_kernels *kf = &f->kt->fmt[f->down_fmt];
    if (kf->down_cols && kf->down_cols(f, r0, r1)) return;
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        for (int64_t c0 = r0; c0 < r1; c0 += P2_CHUNK) {
            const int64_t c1 = r1 - c0 < P2_CHUNK ? r1 : c0 + P2_CHUNK;
            float out[P2_CHUNK];
            down_piece_dots(f, kf, e, c0, c1, out);
            if (f->acc != NULL) {
                fixed_add(f->kt, out, f->acc + c0, c1 - c0);
            } else {
                for (int64_t r = c0; r < c1; r++) f->y[r] += out[r - c0];
            }
        }
    }
}

/* Phase 2 at t = 1 in fixed point, over short down rows (a dense model's 64-neuron experts: 36 bytes a
 * row in Q4_0): the pool splits the experts, not the rows, so each expert's down piece is read as one
 * stream of d rows rather than one short stream per chunk of rows; each thread adds into its own
 * fixed-point sums (thread 0 the call's, the others the workspace's, added in after). Integer sums:
 * the same bits however the experts are split. From DRAM, a dense 8B's FFN 1.09-1.13x, 1.16-1.19x with
 * P2_PF_BLOCKS 8 (bench/RESULTS.md, "Phase 2 by experts"); 256-neuron K-quant experts 0.97-1.01x, so
 * they keep the split by rows. */
#define P2_SPLIT_ROW_BYTES 128 /* down rows of at most this many bytes on average: split by experts */

typedef struct {
    const ffn_t *f;
    int64_t *accs;      /* threads 1..P-1: acc_stride int64 each */
    int64_t acc_stride;
} p2_split_t;

/* Experts [e0, e1) over all d rows, into this thread's sums. */
static void down_experts_t1(void *ctx, int64_t e0, int64_t e1, int tid) {
    const p2_split_t *s = ctx;
    ffn_t g = *s->f;
    g.bundles += e0;
    g.n += e0;
    g.off += e0;
    g.rb_d += e0;
    g.jd += e0;
    g.skip += e0;
    g.n_experts = e1 - e0;
    if (tid > 0) g.acc = s->accs + (tid - 1) * s->acc_stride;
    down_cols_t1(&g, 0, g.d, tid);
}

/* Phase 2 split by experts when it pays and the workspace at accs (avail bytes) holds the other
 * threads' sums; 0: the caller splits the rows. */
static int down_by_experts(fic_pool *pool, const ffn_t *f, int64_t rb_sum, uint8_t *accs, int64_t avail) {
    const int64_t n_threads = fic_pool_threads(pool), stride = ws_round64(8 * f->d) / 8;
    if (f->acc == NULL || n_threads < 2 || f->n_experts < 4 * n_threads || rb_sum > P2_SPLIT_ROW_BYTES * f->n_experts)
        return 0;
    if ((n_threads - 1) * stride * 8 > avail) return 0;
    p2_split_t s = {f, (int64_t *)accs, stride};
    memset(accs, 0, (size_t)((n_threads - 1) * stride * 8));
    fic_parallel_for(pool, f->n_experts, (f->n_experts + 4 * n_threads - 1) / (4 * n_threads), down_experts_t1, &s);
    for (int64_t i = 0; i < n_threads - 1; i++)
        for (int64_t r = 0; r < f->d; r++) f->acc[r] += s.accs[i * stride + r];
    return 1;
}

static void down_cols_tiles(void *ctx, int64_t r0, int64_t r1, int tid) {
    const ffn_t *f = ctx;
    float *tile = f->tiles + tid * f->tile_floats;
    const int64_t t = f->t, d = f->d;
    int64_t n_max = 0;
    for (int64_t e = 0; e < f->n_experts; e++) n_max = f->n[e] > n_max ? f->n[e] : n_max;
    const int panels = uses_panels(f->kt, t, n_max); /* as tile2_rows was chosen: every expert's tile fits */
    for (int64_t r = r0; r < r1; r += f->tile2_rows) {
        const int64_t nr = r1 - r < f->tile2_rows ? r1 - r : f->tile2_rows;
        float *obuf = tile + f->tile_floats - t * f->tile2_rows; /* t x nr */
        for (int64_t e = 0; e < f->n_experts; e++) {
            if (f->skip[e]) continue;
            job_t j = f->jd[e]; /* x = h_e (t x n_e), k = n_e */
            j.y = obuf;
            j.m = nr;
            gemm_rows(&j, panels, down_part(f, e), f->rb_d[e], r, nr, 0, tile);
            for (int64_t i = 0; i < t; i++) {
                const float *oi = obuf + i * nr;
                if (f->acc != NULL) {
                    fixed_add(f->kt, oi, f->acc + i * d + r, nr);
                    continue;
                }
                float *yi = f->y + i * d + r;
                for (int64_t k = 0; k < nr; k++) yi[k] += oi[k];
            }
        }
    }
}

/* ---- phase 2: down part as rows (n_e x d_model) ------------------------------------------ */

static void down_rows_t1(void *ctx, int64_t b0, int64_t b1, int tid) {
    const ffn_t *f = ctx;
    for (int64_t e = 0; e < f->n_experts; e++)
        if (!f->skip[e]) accum_range((void *)&f->jd[e], b0, b1, tid);
}

static void down_rows_tiles(void *ctx, int64_t b0, int64_t b1, int tid) {
    const ffn_t *f = ctx;
    const int64_t t = f->t, d = f->d;
    float *buf = f->tiles + tid * f->tile_floats; /* SEG_FLOATS */
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t n = f->n[e], seg_blocks = SEG_FLOATS / j->bw, piece = (b1 - b0) * j->bb;
        const float *h = f->h + t * f->off[e];
        for (int64_t r = 0; r < n; r++) {
            if (r + ACCUM_PF_ROWS < n) {
                const uint8_t *ahead = j->w + (r + ACCUM_PF_ROWS) * j->row_bytes + b0 * j->bb;
                for (int64_t o = 0; o < piece; o += 64) FIC_PREFETCH(ahead + o);
            }
            int64_t i0 = 0;
            while (i0 < t && h[i0 * n + r] == 0.0f) i0++;
            if (i0 == t) continue; /* every token's h is zero: the row need not be read */
            const uint8_t *row = j->w + r * j->row_bytes;
            for (int64_t s = b0; s < b1; s += seg_blocks) {
                const int64_t se = b1 - s < seg_blocks ? b1 : s + seg_blocks;
                const float *wv = j->fmt == FIC_F32 ? (const float *)row + s : buf;
                if (j->fmt != FIC_F32) deq_range(j, row, s, se, buf);
                for (int64_t i = i0; i < t; i++) {
                    const float a = h[i * n + r];
                    if (a != 0.0f) axpy(j, a, wv, f->y + i * d + s * j->bw, (se - s) * j->bw);
                }
            }
        }
    }
}

/* ---- t > 1 in quantized formats: the int8-activation path (qdot.h, qdot_ffn.c) ------------ */

static qdot_ffn qdot_args(const ffn_t *f, int64_t n_max) {
    qdot_ffn a = {.impl = f->impl, .gate_fmt = f->gate_fmt, .up_fmt = f->up_fmt, .down_fmt = f->down_fmt,
                  .d = f->d, .t = f->t, .n_experts = f->n_experts, .n_total = f->n_total, .n_max = n_max,
                  .bundles = f->bundles, .n = f->n, .off = f->off, .skip = f->skip, .rb_d = f->rb_d,
                  .rb_g = f->rb_g, .rb_u = f->rb_u, .coef = f->coef, .x = f->x, .y = f->y, .h = f->h,
                  .acc = f->acc, .fixed_add = f->kt->fixed_add ? f->kt->fixed_add : fixed_add_ref};
    return a;
}

/* ---- the entry points --------------------------------------------------------------------- */

static int is_r32(const fic_expert_layout *lay) {
    return lay->gate_fmt == FIC_Q1_0R32 || lay->up_fmt == FIC_Q1_0R32 || lay->down_fmt == FIC_Q1_0R32;
}

/* Validates everything but the bundles, resolves impl, fills n_total and checks the workspace. */
static int check_args(fic_pool *pool, int *impl, const fic_expert_layout *lay, const int32_t *n_neurons,
                      int64_t n_experts, const float *x, float *y, int64_t t, const float *scratch,
                      int64_t scratch_floats, const void *ws, int64_t ws_bytes, int64_t *n_total) {
    if (lay == NULL || x == NULL || y == NULL || t <= 0 || n_experts < 0) return FIC_ERR_ARG;
    const int64_t d = lay->d_model;
    if (d <= 0 || (lay->down_rows != 0 && lay->down_rows != 1)) return FIC_ERR_ARG;
    if (is_r32(lay)) { /* all three parts in the layout, down as columns, d a multiple of 128 */
        if (lay->gate_fmt != FIC_Q1_0R32 || lay->up_fmt != FIC_Q1_0R32 || lay->down_fmt != FIC_Q1_0R32 ||
            lay->down_rows)
            return FIC_ERR_ARG;
    } else if (!fmt_ok(lay->gate_fmt) || !fmt_ok(lay->up_fmt) || !fmt_ok(lay->down_fmt)) {
        return FIC_ERR_ARG;
    }
    if (fic_row_bytes(lay->gate_fmt, d) <= 0 || fic_row_bytes(lay->up_fmt, d) <= 0) return FIC_ERR_ARG;
    if (lay->down_rows && fic_row_bytes(lay->down_fmt, d) <= 0) return FIC_ERR_ARG;
    if (n_experts > 0 && n_neurons == NULL) return FIC_ERR_ARG;
    int64_t total = 0;
    for (int64_t e = 0; e < n_experts; e++) {
        if (n_neurons[e] <= 0) return FIC_ERR_ARG;
        if (!lay->down_rows && fic_row_bytes(lay->down_fmt, n_neurons[e]) <= 0) return FIC_ERR_ARG;
        total += n_neurons[e];
    }
    if (total > 0 && (scratch == NULL || scratch_floats < 0 || total > INT64_MAX / t || scratch_floats < t * total))
        return FIC_ERR_ARG;
    if (*impl < FIC_IMPL_AUTO || *impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (*impl == FIC_IMPL_AUTO) *impl = fic_impl_best();
    if (fic_kernels_for(*impl) == NULL) return FIC_ERR_UNSUPPORTED;
    int st = ws_check(ws, ws_bytes, ws_ffn(fic_pool_threads(pool), t, d, n_experts, total));
    if (st != FIC_OK) return st;
    *n_total = total;
    return FIC_OK;
}

/* The FFN once the arguments are checked; ws (ws_bytes) starts after the bundle pointers. */
static int ffn_run(fic_pool *pool, int impl, const fic_expert_layout *layout, const uint8_t *const *bundles,
                   const int32_t *n_neurons, int64_t n_experts, int64_t n_total, const float *coef, const float *x,
                   float *y, int64_t t, float *scratch, uint8_t *ws, int64_t ws_bytes) {
    ffn_t f;
    memset(&f, 0, sizeof f);
    const int exact = impl & FIC_IMPL_EXACT, fixed = impl & FIC_FFN_FIXED;
    impl &= ~(FIC_IMPL_EXACT | FIC_FFN_FIXED);
    if (fixed && layout->down_rows) return FIC_ERR_UNSUPPORTED;
    const fic_kernels *kt = fic_kernels_for(impl); /* not NULL: check_args */
    f.impl = impl;
    f.kt = kt;
    f.d = layout->d_model;
    f.t = t;
    f.n_experts = n_experts;
    f.n_total = n_total;
    f.bundles = bundles;
    f.n = n_neurons;
    f.coef = coef;
    f.x = x;
    f.y = fixed ? NULL : y;
    f.acc = fixed ? (int64_t *)y : NULL; /* the caller's int64_t accumulator (fic.h) */
    f.h = scratch;
    f.gate_fmt = layout->gate_fmt;
    f.up_fmt = layout->up_fmt;
    f.down_fmt = layout->down_fmt;
    f.down_rows = layout->down_rows;
    f.rb_g = fic_row_bytes(f.gate_fmt, f.d);
    f.rb_u = fic_row_bytes(f.up_fmt, f.d);

    /* the small per-call tables: ws_ffn_tables(n_experts) bytes */
    const size_t ne = (size_t)n_experts;
    int64_t *off = (int64_t *)ws;
    f.rb_d = off + ne + 1;
    f.jd = (job_t *)(f.rb_d + ne);
    uint8_t *skip = (uint8_t *)(f.jd + ne);
    f.off = off;
    f.skip = skip;
    uint8_t *rest = ws + ws_ffn_tables(n_experts); /* 64-byte aligned */
    const int64_t rest_bytes = ws_bytes - ws_ffn_tables(n_experts);
    int64_t n_max = 0;
    off[0] = 0;
    for (size_t e = 0; e < ne; e++) {
        off[e + 1] = off[e] + n_neurons[e];
        n_max = n_neurons[e] > n_max ? n_neurons[e] : n_max;
        f.rb_d[e] = fic_row_bytes(f.down_fmt, layout->down_rows ? f.d : n_neurons[e]);
        skip[e] = 0;
        if (coef != NULL) {
            int64_t i = 0;
            while (i < t && coef[i * n_experts + (int64_t)e] == 0.0f) i++;
            skip[e] = i == t;
        }
    }

    const int n_threads = fic_pool_threads(pool);
    if (is_r32(layout)) { /* int8 only, as Q1_0 (t = 1 ignores the exact flag, as Q1_0's matvec does) */
        if (t == 1) return q1r32_ffn_t1(pool, &f, rest, rest_bytes);
        if (exact || fic_qdot_kernels(impl)->q1_dot == NULL) return FIC_ERR_UNSUPPORTED; /* rows in float */
        const qdot_ffn qa = qdot_args(&f, n_max);
        int st = fic_qdot_ffn_phase1(pool, &qa, rest, rest_bytes);
        return st != FIC_OK ? st : fic_qdot_ffn_down_cols(pool, &qa, rest, rest_bytes);
    }
    if (t == 1) {
        /* phase 1: x prepared once for gate and once for up */
        init_job(&f.jg, kt, f.gate_fmt, NULL, x, NULL, 1, 1, f.d);
        init_job(&f.ju, kt, f.up_fmt, NULL, x, NULL, 1, 1, f.d);
        f.jg.exact = f.ju.exact = exact != 0;
        size_t bg = prep_x_bytes(&f.jg), bu = prep_x_bytes(&f.ju), bd = 0;
        for (size_t e = 0; e < ne; e++) {
            if (layout->down_rows) continue;
            init_job(&f.jd[e], kt, f.down_fmt, NULL, scratch + off[e], NULL, 1, 1, n_neurons[e]);
            f.jd[e].exact = exact != 0;
            bd += prep_x_bytes(&f.jd[e]);
        }
        if ((int64_t)(bg + bu + bd) > rest_bytes) return FIC_ERR_WORKSPACE; /* the bound of fic.h */
        prep_x(&f.jg, rest);
        prep_x(&f.ju, rest + bg);
        /* a row read alone prefetches its own stream (rows in pairs keep the bursts: Q4_K's
         * pairs without them ran 0.80x) */
        f.jg.stream_pf = f.jg.kf->dot_prefetches && x_prepared_as_table(&f.jg);
        f.ju.stream_pf = f.ju.kf->dot_prefetches && x_prepared_as_table(&f.ju);
        fic_parallel_for(pool, n_total, row_chunk(pool, n_total, f.rb_g + f.rb_u), phase1_t1, &f);
        if (!layout->down_rows) {
            int64_t rb_sum = 0, n_planes = 0, n_prepared = 0;
            uint8_t *p = rest + bg + bu;
            for (size_t e = 0; e < ne; e++) {
                f.rb_d[e] = f.jd[e].row_bytes;
                rb_sum += f.rb_d[e];
                if (skip[e]) continue;
                prep_x(&f.jd[e], p); /* h_e prepared once for all d_model rows */
                p += prep_x_bytes(&f.jd[e]);
                n_planes += f.jd[e].q1_planes;
                n_prepared++;
            }
            f.q1_layout = n_planes == 0 ? Q1_ALL_SAD : n_planes == n_prepared ? Q1_ALL_PLANES : Q1_MIXED;
            int64_t c2 = row_chunk(pool, f.d, rb_sum);
            /* fixed: chunks start at multiples of P2_ROWS whatever the call's experts, so a row's
             * kernel (a P2_ROWS block or the tail, dot2 or dot) is the same in every call */
            if (fixed) c2 = (c2 + P2_ROWS - 1) / P2_ROWS * P2_ROWS;
            if (!down_by_experts(pool, &f, rb_sum, p, rest_bytes - (p - rest)))
                fic_parallel_for(pool, f.d, c2, down_cols_t1, &f);
        }
    } else {
        init_job(&f.jg, kt, f.gate_fmt, NULL, x, NULL, t, 1, f.d);
        init_job(&f.ju, kt, f.up_fmt, NULL, x, NULL, t, 1, f.d);
        f.tile1_rows = tile_rows_for(kt, t, f.d);
        f.tile2_rows = tile_rows_for(kt, t, n_max);
        int64_t need1 = f.tile1_rows * f.d + t * f.tile1_rows;
        int64_t need2 = layout->down_rows ? SEG_FLOATS : f.tile2_rows * n_max + t * f.tile2_rows;
        f.tile_floats = ((need1 > need2 ? need1 : need2) + 15) & ~(int64_t)15;
        if (f.tile_floats * n_threads * (int64_t)sizeof(float) > rest_bytes) return FIC_ERR_WORKSPACE;
        f.tiles = (float *)rest;
        int64_t chunk = (n_total + 4 * n_threads - 1) / (4 * n_threads);
        chunk = (chunk + f.tile1_rows - 1) / f.tile1_rows * f.tile1_rows;
        if (!exact && fic_qdot_fmt_ok(f.gate_fmt) && fic_qdot_fmt_ok(f.up_fmt)) { /* int8 activations */
            const qdot_ffn qa = qdot_args(&f, n_max);
            int st = fic_qdot_ffn_phase1(pool, &qa, rest, rest_bytes);
            if (st != FIC_OK) return st;
        } else {
            fic_parallel_for(pool, n_total, chunk, phase1_tiles, &f);
        }
        if (!layout->down_rows) {
            for (size_t e = 0; e < ne; e++) {
                init_job(&f.jd[e], kt, f.down_fmt, NULL, scratch + t * off[e], NULL, t, 1, n_neurons[e]);
                f.rb_d[e] = f.jd[e].row_bytes;
            }
            int64_t c2 = (f.d + 4 * n_threads - 1) / (4 * n_threads);
            c2 = (c2 + f.tile2_rows - 1) / f.tile2_rows * f.tile2_rows;
            const qdot_ffn qa = qdot_args(&f, n_max);
            int st = FIC_ERR_UNSUPPORTED; /* until the int8 path takes the call */
            if (!exact && fic_qdot_fmt_ok(f.down_fmt) && (!fixed || fic_qdot_down_fixed_ok(&qa))) /* int8 */
                st = fic_qdot_ffn_down_cols(pool, &qa, rest, rest_bytes);
            if (st == FIC_ERR_UNSUPPORTED) fic_parallel_for(pool, f.d, c2, down_cols_tiles, &f);
            else if (st != FIC_OK) return st;
        }
    }
    if (layout->down_rows) {
        /* one block-aligned column range per thread (at least 256 weights), as accum_rows */
        for (size_t e = 0; e < ne; e++) {
            init_job(&f.jd[e], kt, f.down_fmt, down_part(&f, (int64_t)e), NULL, y, 1, n_neurons[e], f.d);
            f.jd[e].a = scratch + off[e]; /* t = 1 only */
            f.rb_d[e] = f.jd[e].row_bytes;
        }
        const int64_t bw = fic_fmt_block_weights(f.down_fmt), nb = f.d / bw;
        int64_t chunk = (nb + n_threads - 1) / n_threads, min_blocks = (256 + bw - 1) / bw;
        fic_parallel_for(pool, nb, chunk < min_blocks ? min_blocks : chunk, t == 1 ? down_rows_t1 : down_rows_tiles,
                         &f);
    }
    return FIC_OK;
}

int fic_experts_ffn(fic_pool *pool, int impl, const fic_expert_layout *layout, const uint8_t *const *bundles,
                    const int32_t *n_neurons, int64_t n_experts, const float *coef, const float *x, float *y,
                    int64_t t, float *scratch, int64_t scratch_floats, void *ws, int64_t ws_bytes) {
    int64_t n_total = 0;
    const int flags = impl & (FIC_IMPL_EXACT | FIC_FFN_FIXED); /* passed on to ffn_run */
    impl &= ~(FIC_IMPL_EXACT | FIC_FFN_FIXED);
    int st = check_args(pool, &impl, layout, n_neurons, n_experts, x, y, t, scratch, scratch_floats, ws, ws_bytes,
                        &n_total);
    if (st != FIC_OK) return st;
    if (n_experts == 0) return FIC_OK;
    if (bundles == NULL) return FIC_ERR_ARG;
    for (int64_t e = 0; e < n_experts; e++)
        if (bundles[e] == NULL) return FIC_ERR_ARG;
    const int64_t skip = ws_ffn_ptrs(n_experts); /* unused here: the same workspace serves _slots */
    return ffn_run(pool, impl | flags, layout, bundles, n_neurons, n_experts, n_total, coef, x, y, t, scratch,
                   (uint8_t *)ws + skip, ws_bytes - skip);
}

int fic_experts_ffn_slots(fic_pool *pool, int impl, const fic_expert_layout *layout, const uint8_t *arena,
                          int64_t slot_bytes, const int32_t *slots, const int32_t *n_neurons, int64_t n_experts,
                          const float *coef, const float *x, float *y, int64_t t, float *scratch,
                          int64_t scratch_floats, void *ws, int64_t ws_bytes) {
    int64_t n_total = 0;
    const int flags = impl & (FIC_IMPL_EXACT | FIC_FFN_FIXED); /* passed on to ffn_run */
    impl &= ~(FIC_IMPL_EXACT | FIC_FFN_FIXED);
    int st = check_args(pool, &impl, layout, n_neurons, n_experts, x, y, t, scratch, scratch_floats, ws, ws_bytes,
                        &n_total);
    if (st != FIC_OK) return st;
    if (n_experts == 0) return FIC_OK;
    if (arena == NULL || slots == NULL || slot_bytes <= 0 || slot_bytes > INT64_MAX / INT32_MAX) return FIC_ERR_ARG;
    const uint8_t **bundles = ws; /* ws_ffn_ptrs(n_experts) bytes */
    for (int64_t e = 0; e < n_experts; e++) {
        if (slots[e] < 0) return FIC_ERR_ARG;
        bundles[e] = arena + (int64_t)slots[e] * slot_bytes;
    }
    const int64_t skip = ws_ffn_ptrs(n_experts);
    return ffn_run(pool, impl | flags, layout, bundles, n_neurons, n_experts, n_total, coef, x, y, t, scratch,
                   (uint8_t *)ws + skip, ws_bytes - skip);
}

int fic_fixed_add(int impl, const float *c, int64_t *acc, int64_t n) {
    if (n < 0 || (n > 0 && (c == NULL || acc == NULL))) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    fixed_add(kt, c, acc, n);
    return FIC_OK;
}

int fic_silu_mul(int impl, float c, float *h, const float *u, int64_t n) {
    if (n < 0 || (n > 0 && (h == NULL || u == NULL))) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    silu_mul(kt, c, h, u, n);
    return FIC_OK;
}

int fic_fixed_flush(int64_t *acc, float *y, int64_t n) {
    if (n < 0 || (n > 0 && (acc == NULL || y == NULL))) return FIC_ERR_ARG;
    for (int64_t i = 0; i < n; i++) {
        y[i] += (float)((double)acc[i] * 0x1p-32);
        acc[i] = 0;
    }
    return FIC_OK;
}
