/* matvec.c - matrix-vector (decode), matrix-matrix (prefill) and row-accumulate kernels over
 * quantized weights, with a scalar reference per format and per-CPU fast paths.
 *
 * The reference (FIC_IMPL_REF) is the spec: dequantize each block to float and multiply-add in
 * float, in order. Fast paths keep weights quantized and dequantize in registers:
 *   matvec   one row per dot product, threads split rows. Float activations, except where
 *            x is quantized to int8 once per call (see prep_x): Q1_0 on AVX2/AVX-512,
 *            Q4_0/Q4_1 on AVX-512 VNNI. Identities used: Q4_1 sum (d q + m) x =
 *            d sum q x + m sum x (and Q4_K per 32-weight sub-block, d sc and dmin m); Q1_0 sum d s x with s = +-1 from the sign bits, and on
 *            AVX-512 VNNI/BITALG/VBMI sum s xq = 2 sum_{bit set} xq - sum xq with x as 8 bit
 *            planes (popcounts, see dot_q1_planes in kernels_avx512.c).
 *   matmul   T > 1 and a quantized format: int8 activations and integer dot products
 *            (qdot.h, qdot*.c); otherwise a tile of rows is dequantized to float once and
 *            multiplied by all T rows of x (register-blocked FMA kernel), threads split row
 *            tiles; exact float math.
 *   accum    threads split the columns; rows stream past an L1-resident piece of y.
 * No kernel allocates: the prepared x and the matmul tiles live in the caller's workspace, whose
 * size fic_workspace_bytes (here) gives for a set of maxima (the formulas are in fic.h).
 *
 * The per-format, per-CPU pieces are reached through the implementation's kernel table
 * (kernels.h; one file per architecture: kernels_scalar.c, kernels_avx2.c, kernels_avx512.c,
 * kernels_neon.c), chosen once per call. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

/* ---- the three kernels ------------------------------------------------------------------- */

/* Validates arguments, resolves the implementation and fills the common part of the job. */
static int setup_job(job_t *j, fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y,
                     int64_t t, int64_t m, int64_t k) {
    (void)pool;
    if (!fmt_ok(fmt) || w == NULL || x == NULL || y == NULL || t <= 0 || m <= 0 || k <= 0) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    int64_t rb = fic_row_bytes(fmt, k);
    if (rb <= 0) return FIC_ERR_ARG;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    init_job(j, kt, fmt, w, x, y, t, m, k);
    return FIC_OK;
}


#define PREFETCH_BYTES 4096      /* ahead of row pairs and short rows */
#define PREFETCH_BYTES_LONG 1024 /* ahead of rows longer than PAIR_MAX_K weights, read one at a time */
#define PAIR_MAX_K 2048          /* rows of at most this many weights go in pairs where dot2 exists */

/* The n bytes dist past p, as far as end. */
static inline void prefetch_ahead(const uint8_t *p, int64_t dist, int64_t n, const uint8_t *end) {
    for (const uint8_t *q = p + dist; q < p + dist + n && q < end; q += 64) FIC_PREFETCH(q);
}

/* Rows in pairs share x's loads, which pays while the weights come from cache (short rows); a long
 * row read alone, with the prefetch 1 KiB ahead, streams from DRAM faster (4096 x 4096 on a Xeon:
 * 1.14-1.25x for Q4_0, Q4_1, Q8_0, Q4_K and Q6_K; bench/RESULTS.md, "Long rows one at a time"). */
static void matvec_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    const job_t *j = ctx;
    (void)tid;
    const uint8_t *end = j->w + r1 * j->row_bytes;
    /* Software prefetch of the chunk's first PREFETCH_BYTES: a decode matrix is often only
     * tens of KiB per thread, largely over before the hardware prefetcher has ramped up. */
    const uint8_t *start = j->w + r0 * j->row_bytes;
    for (const uint8_t *p = start; p < end && p < start + PREFETCH_BYTES; p += 64) FIC_PREFETCH(p);
    int64_t r = r0;
    const int long_rows = j->k > PAIR_MAX_K;
    if (j->kf->dot2 && !long_rows) {
        /* Two interleaved row streams defeat the hardware prefetcher (6 GB/s instead of 15
         * from DRAM): prefetch PREFETCH_BYTES ahead in software. */
        const int nr = 2;
        for (; r + nr <= r1; r += nr) {
            const uint8_t *row = j->w + r * j->row_bytes;
            prefetch_ahead(row, PREFETCH_BYTES, nr * j->row_bytes, end);
            j->kf->dot2(j, row, j->y + r);
        }
    }
    const int64_t dist = long_rows ? PREFETCH_BYTES_LONG : PREFETCH_BYTES;
    for (; r < r1; r++) {
        const uint8_t *row = j->w + r * j->row_bytes;
        if (!j->stream_pf) prefetch_ahead(row, dist, j->row_bytes, end);
        j->y[r] = dot_row(j, row, j->x);
    }
}

int fic_matvec(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t m,
               int64_t k, void *ws, int64_t ws_bytes) {
    job_t j;
    if (fmt == FIC_Q1_0R32) { /* int8 only, as Q1_0: the exact flag changes nothing */
        int st = ws_check(ws, ws_bytes, ws_matvec(k));
        return st != FIC_OK ? st : fic_q1r32_matvec(pool, impl & ~FIC_IMPL_EXACT, w, x, y, m, k, ws, ws_bytes);
    }
    int st = setup_job(&j, pool, impl & ~FIC_IMPL_EXACT, fmt, w, x, y, 1, m, k);
    if (st == FIC_OK) st = ws_check(ws, ws_bytes, ws_matvec(k));
    if (st != FIC_OK) return st;
    j.exact = (impl & FIC_IMPL_EXACT) != 0;
    if ((int64_t)prep_x_bytes(&j) > ws_matvec(k)) return FIC_ERR_WORKSPACE; /* the bound of fic.h */
    prep_x(&j, ws);
    j.stream_pf = k > PAIR_MAX_K && j.kf->dot_prefetches && x_prepared_as_table(&j);
    fic_parallel_for(pool, m, row_chunk(pool, m, j.row_bytes), matvec_range, &j);
    return FIC_OK;
}

#define PACK_PIECE 256 /* floats of a row dequantized at a time before they are spread into a panel */

/* One row's blocks [b, be) dequantized into a panel column (the scalar spread). */
static void pack_row(const job_t *j, const uint8_t *row, int64_t b, int64_t be, float *piece, float *dst) {
    const int64_t n = (be - b) * j->bw;
    deq_range(j, row, b, be, piece);
    for (int64_t kk = 0; kk < n; kk++) dst[kk * PANEL_ROWS] = piece[kk];
}

const float *pack_panels(const job_t *j, const uint8_t *w, int64_t rb, int64_t r, int64_t nr, float *tile) {
    const int64_t k = j->k, per_piece = PACK_PIECE / j->bw, nb = k / j->bw;
    float piece[8][PACK_PIECE]; /* >= one block: MAX_BW <= PACK_PIECE */
    int64_t i = 0;
    /* 8 rows at a time (half a panel): their pieces dequantized, then transposed in one go */
    for (; i + 8 <= nr; i += 8) {
        float *panel = tile + (i / PANEL_ROWS) * PANEL_ROWS * k + i % PANEL_ROWS;
        for (int64_t b = 0; b < nb; b += per_piece) {
            const int64_t be = nb - b < per_piece ? nb : b + per_piece, n = (be - b) * j->bw;
            float *dst = panel + b * j->bw * PANEL_ROWS;
            for (int q = 0; q < 8; q++) deq_range(j, w + (r + i + q) * rb, b, be, piece[q]);
            const int64_t n8 = n & ~(int64_t)7;
            pack8(j->kt, piece[0], PACK_PIECE, n8, dst);
            for (int q = 0; q < 8; q++) /* a tail of fewer than 8 (f32/f16 rows only) */
                for (int64_t kk = n8; kk < n; kk++) dst[kk * PANEL_ROWS + q] = piece[q][kk];
        }
    }
    for (; i < nr; i++) {
        float *panel = tile + (i / PANEL_ROWS) * PANEL_ROWS * k + i % PANEL_ROWS;
        for (int64_t b = 0; b < nb; b += per_piece) {
            const int64_t be = nb - b < per_piece ? nb : b + per_piece;
            pack_row(j, w + (r + i) * rb, b, be, piece[0], panel + b * j->bw * PANEL_ROWS);
        }
    }
    for (; i % PANEL_ROWS != 0; i++) {
        float *panel = tile + (i / PANEL_ROWS) * PANEL_ROWS * k + i % PANEL_ROWS;
        for (int64_t kk = 0; kk < k; kk++) panel[kk * PANEL_ROWS] = 0.0f;
    }
    return tile;
}

void gemm_rows(const job_t *j, int panels, const uint8_t *w, int64_t rb, int64_t r, int64_t nr, int64_t r0,
               float *tile) {
    if (panels) {
        j->kt->gemm_panel(j, pack_panels(j, w, rb, r, nr, tile), nr, r0);
        return;
    }
    const float *rows = tile;
    if (j->fmt == FIC_F32) rows = (const float *)(w + r * rb);
    else
        for (int64_t i = 0; i < nr; i++) deq_range(j, w + (r + i) * rb, 0, j->k / j->bw, tile + i * j->k);
    gemm_tile(j, rows, nr, r0);
}

static void matmul_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    const job_t *j = ctx;
    float *tile = j->scratch + tid * j->scratch_floats;
    const int panels = uses_panels(j->kt, j->t, j->k);
    for (int64_t r = r0; r < r1; r += j->tile_rows) {
        int64_t nr = r1 - r < j->tile_rows ? r1 - r : j->tile_rows;
        gemm_rows(j, panels, j->w, j->row_bytes, r, nr, r, tile);
    }
}

int fic_matmul(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t t,
               int64_t m, int64_t k, void *ws, int64_t ws_bytes) {
    job_t j;
    const int n_threads = fic_pool_threads(pool), exact = impl & FIC_IMPL_EXACT;
    if (fmt == FIC_Q1_0R32) { /* the int8 path only (a float prefill reads rows: FIC_ERR_UNSUPPORTED) */
        const int st = ws_check(ws, ws_bytes, ws_matmul(n_threads, k));
        if (st != FIC_OK) return st;
        return exact && t > 1 ? FIC_ERR_UNSUPPORTED : q1r32_matmul(pool, impl & ~FIC_IMPL_EXACT, w, x, y, t, m, k, ws, ws_bytes);
    }
    int st = setup_job(&j, pool, impl & ~FIC_IMPL_EXACT, fmt, w, x, y, t, m, k);
    if (st == FIC_OK) st = ws_check(ws, ws_bytes, ws_matmul(n_threads, k));
    if (st != FIC_OK) return st;
    /* Prefill of a quantized format: int8 activations and integer dot products (qdot.h) */
    if (t > 1 && !exact && fic_qdot_fmt_ok(fmt)) return fic_qdot_matmul(pool, j.impl, fmt, w, x, y, t, m, k, ws, ws_bytes);
    /* Rows dequantized per tile (clamp_tile), so the tile stays in L2 while every token's row
     * of x streams past it; one tile per thread in the workspace. */
    const int64_t tile = tile_rows_for(j.kt, t, k);
    j.tile_rows = tile;
    j.scratch_floats = (tile * k + 15) & ~(int64_t)15;
    j.scratch = ws;
    int64_t chunk = (m + 4 * n_threads - 1) / (4 * n_threads);
    chunk = (chunk + tile - 1) / tile * tile;
    /* Panels: one tile per chunk. Every tile streams all of x whatever the chunk, so small chunks
     * cost nothing and balance the threads (960 rows in 48-row tiles: 20 chunks, not 7 of 144). */
    if (uses_panels(j.kt, t, k)) chunk = tile;
    fic_parallel_for(pool, m, chunk, matmul_range, &j);
    return FIC_OK;
}


int fic_accum_rows(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *a, float *y, int64_t n_rows,
                   int64_t k, void *ws, int64_t ws_bytes) {
    job_t j;
    if (a == NULL) return FIC_ERR_ARG;
    int st = setup_job(&j, pool, impl, fmt, w, a, y, 1, n_rows, k);
    if (st == FIC_OK) st = ws_check(ws, ws_bytes, 0); /* needs none; checked for alignment */
    if (st != FIC_OK) return st;
    j.a = a;
    j.x = NULL;
    /* One column range per thread (at least 256 weights each), block aligned: no two threads
     * write the same y. */
    int64_t nb = k / j.bw, n_threads = fic_pool_threads(pool);
    int64_t chunk = (nb + n_threads - 1) / n_threads;
    int64_t min_blocks = (256 + j.bw - 1) / j.bw;
    fic_parallel_for(pool, nb, chunk < min_blocks ? min_blocks : chunk, accum_range, &j);
    return FIC_OK;
}

int64_t fic_workspace_bytes(int n_threads, int64_t max_t, int64_t max_k, int64_t max_experts, int64_t max_neurons) {
    const int64_t mv = ws_matvec(max_k), mm = ws_matmul(n_threads, max_k);
    const int64_t f1 = ws_ffn(n_threads, max_t < 1 ? max_t : 1, max_k, max_experts, max_neurons);
    const int64_t ft = ws_ffn(n_threads, max_t, max_k, max_experts, max_neurons);
    if (mv < 0 || mm < 0 || f1 < 0 || ft < 0) return FIC_ERR_ARG;
    int64_t need = mv > mm ? mv : mm;
    need = need > f1 ? need : f1;
    return need > ft ? need : ft;
}
