/* qdot.c - prefill matmul through the int8-activation path (qdot.h): tokens in chunks that fit the
 * caller's workspace, each chunk quantized once (threads split its tokens), then threads split the
 * weight rows; QW_ROWS rows at a time are unpacked once per chunk into the thread's buffer and
 * multiplied with every token of the chunk. Nothing is allocated. */
#include <stdint.h>

#include "blocks.h"
#include "qdot.h"

typedef struct {
    const qdot_kernels *kern;
    const fic_kernels *kt; /* the r32 layout's table kernel (q1_matmul) */
    int fmt;
    const uint8_t *w;
    const float *x;
    float *y;
    int64_t m, k, row_bytes, qrow, nt, unpack_bytes, rows; /* rows: unpacked per dot call */
    int tiles;                                               /* tokens in the QT layout (qdot.h) */
    uint8_t *xq, *unpack;
} qmm_t;

static void quantize_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qmm_t *j = ctx;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) {
        if (j->tiles) j->kern->tiles_quantize(j->x + i * j->k, j->k, i, j->xq);
        else j->kern->quantize(j->x + i * j->k, j->k, j->xq + i * j->qrow);
    }
}

static void rows_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qmm_t *j = ctx;
    uint8_t *buf = j->unpack + tid * j->rows * j->unpack_bytes;
    qw_row rows[QW_ROWS_MAX];
    for (int64_t r = r0; r < r1; r += j->rows) {
        const int64_t nr = r1 - r < j->rows ? r1 - r : j->rows;
        for (int64_t i = 0; i < nr; i++)
            fic_qdot_unpack(j->fmt, j->w + (r + i) * j->row_bytes, j->k, buf + i * j->unpack_bytes, &rows[i]);
        if (j->tiles) j->kern->tiles_dot(rows, nr, j->xq, QT_TILE_BYTES(j->k), j->nt, j->y + r, j->m, 0);
        else j->kern->dot(rows, nr, j->xq, j->qrow, j->nt, j->y + r, j->m, 0);
    }
}

/* ---- Q1_0 through its own kernels (qdot.h, Q1X_*): rows read as stored, no unpacking ---- */

static void q1_quantize_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qmm_t *j = ctx;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) j->kern->q1_quantize(j->x + i * j->k, j->k, j->xq + i * j->qrow);
}

static void q1_rows_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qmm_t *j = ctx;
    (void)tid;
    j->kern->q1_dot(j->w + r0 * j->row_bytes, j->row_bytes, r1 - r0, j->k, j->xq, j->qrow, j->nt, j->y + r0, j->m, 0);
}

/* The r32 layout (fic.h) by the matvec's tables (q1r32.c): each token tabled once per chunk, then
 * every group of 32 rows against every token, the group's weights in L1 across the tokens (or all
 * tokens at once by a tile kernel, q1r32_toks_group); each token's products are its matvec's bits,
 * at fewer operations per weight than the maddubs kernel (bench/RESULTS.md). */
static void r32_tables_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qmm_t *j = ctx;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) q1r32_toks_prep(j->kt, j->kern, j->x + i * j->k, j->k, j->xq + i * j->qrow);
}

static void r32_tables_groups(void *ctx, int64_t g0, int64_t g1, int tid) {
    const qmm_t *j = ctx;
    const int64_t gb = 32 * j->row_bytes;
    for (int64_t g = g0; g < g1; g++)
        q1r32_toks_group(j->kt, j->w + g * gb, j->k, j->xq, j->qrow, j->nt, j->y + g * 32, j->m,
                         j->unpack + tid * j->unpack_bytes);
}

/* Without a fast table kernel (NEON): each group of 32 rows back in rows in the thread's buffer,
 * then Q1_0's kernel: the same bits as the row-major matrix. */
static void q1r32_groups_range(void *ctx, int64_t g0, int64_t g1, int tid) {
    const qmm_t *j = ctx;
    uint8_t *rows = j->unpack + tid * j->unpack_bytes;
    for (int64_t g = g0; g < g1; g++) {
        q1r32_group_rows(j->w, j->k, g, rows);
        j->kern->q1_dot(rows, j->row_bytes, 32, j->k, j->xq, j->qrow, j->nt, j->y + g * 32, j->m, 0);
    }
}

#define Q1_MM_ROWS 32 /* rows per chunk: 9 KiB at k = 2048, re-read from L1/L2 by every token group */

static int q1_matmul(fic_pool *pool, qmm_t *j, int64_t t, void *ws, int64_t ws_bytes) {
    const int64_t n_threads = fic_pool_threads(pool), r32 = j->fmt == FIC_Q1_0R32, tables = r32 && j->kt->q1r32 != NULL;
    j->qrow = tables ? q1r32_toks_bytes(j->kt, j->k) : Q1X_ROW_BYTES(j->k);
    /* a thread's scratch: a group's rows (no table kernel), or the tile kernel's */
    j->unpack_bytes = r32 && !tables ? (32 * j->row_bytes + 63) / 64 * 64 : tables ? q1r32_toks_scratch(j->kt, j->k) : 0;
    const int64_t avail = ws_bytes - n_threads * j->unpack_bytes;
    if (avail < j->qrow) return FIC_ERR_WORKSPACE;
    const int64_t chunk_t = avail / j->qrow;
    const float *x = j->x;
    float *y = j->y;
    j->unpack = ws;
    j->xq = (uint8_t *)ws + n_threads * j->unpack_bytes;
    /* small matrices: still at least 2 chunks a thread */
    int64_t rows = (j->m + 2 * n_threads - 1) / (2 * n_threads);
    rows = rows < Q1_MM_ROWS ? rows : Q1_MM_ROWS;
    for (int64_t i0 = 0; i0 < t; i0 += chunk_t) {
        j->nt = t - i0 < chunk_t ? t - i0 : chunk_t;
        j->x = x + i0 * j->k;
        j->y = y + i0 * j->m;
        fic_parallel_for(pool, j->nt, (j->nt + n_threads - 1) / n_threads, tables ? r32_tables_range : q1_quantize_range,
                         j);
        if (r32)
            fic_parallel_for(pool, j->m / 32, (j->m / 32 + 2 * n_threads - 1) / (2 * n_threads),
                             tables ? r32_tables_groups : q1r32_groups_range, j);
        else
            fic_parallel_for(pool, j->m, rows, q1_rows_range, j);
    }
    return FIC_OK;
}

int fic_qdot_matmul(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t t,
                    int64_t m, int64_t k, void *ws, int64_t ws_bytes) {
    const int64_t n_threads = fic_pool_threads(pool);
    qmm_t j = {.kern = fic_qdot_kernels(impl), .kt = fic_kernels_for(impl), .fmt = fmt, .w = w, .m = m, .k = k,
               .row_bytes = fic_row_bytes(fmt, k), .qrow = QX_ROW_BYTES(k),
               .unpack_bytes = (QW_ROW_BYTES(k) + 63) / 64 * 64};
    if (fmt == FIC_Q1_0R32 && j.kern->q1_dot == NULL) return FIC_ERR_UNSUPPORTED;
    if ((fmt == FIC_Q1_0 || fmt == FIC_Q1_0R32) && j.kern->q1_dot != NULL) {
        j.x = x;
        j.y = y;
        return q1_matmul(pool, &j, t, ws, ws_bytes);
    }
    /* the kernel's rows per call, unless their buffers would leave a chunk of fewer tokens than its tile */
    j.rows = j.kern->rows;
    if (j.rows > QW_ROWS && (ws_bytes - n_threads * j.rows * j.unpack_bytes) / j.qrow < (t < 16 ? t : 16)) j.rows = QW_ROWS;
    const int64_t avail = ws_bytes - n_threads * j.rows * j.unpack_bytes;
    if (avail < j.qrow) return FIC_ERR_WORKSPACE;
    int64_t chunk_t = avail / j.qrow;
    /* the QT layout: whole tiles of 16 tokens (a chunk of fewer tokens fits their tile or goes without) */
    j.tiles = qdot_tiles_for(j.kern, fmt) && avail >= QT_CHUNK_BYTES(k, t < 16 ? t : 16);
    if (j.tiles) chunk_t = avail / QT_TILE_BYTES(k) * 16;
    j.unpack = ws;
    j.xq = (uint8_t *)ws + n_threads * j.rows * j.unpack_bytes;
    int64_t row_chunk = (m + 4 * n_threads - 1) / (4 * n_threads);
    row_chunk = (row_chunk + j.rows - 1) / j.rows * j.rows;
    for (int64_t i0 = 0; i0 < t; i0 += chunk_t) {
        j.nt = t - i0 < chunk_t ? t - i0 : chunk_t;
        j.x = x + i0 * k;
        j.y = y + i0 * m;
        fic_parallel_for(pool, j.nt, (j.nt + n_threads - 1) / n_threads, quantize_range, &j);
        fic_parallel_for(pool, m, row_chunk, rows_range, &j);
    }
    return FIC_OK;
}
