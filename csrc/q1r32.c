/* q1r32.c - Q1_0 matrices in groups of 32 rows (the r32 layout of fic.h) and their matvec.
 *
 * A row-major Q1_0 matvec expands each weight's bit against x (dot2_q1_avx2: a lookup and a
 * multiply per 32 weights, ~16 vector operations per 128 weights of a row). With 32 rows' sign
 * bytes side by side, the work turns around: x is prepared once per call as a table per 4 weights
 * (the 16 sums of +-xq, T-MAC's idea), and one byte shuffle looks up 32 rows' 4-weight sums at
 * once. Exact integer sums, the same as the row-major path's, then the float scaling per q8 block.
 * The kernels are in the architecture files (q1r32_ref, q1r32_avx2), reached through the table. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

#define QX_BYTES(k) ws_round64(QX_ROW_BYTES(k)) /* the quantizer's output: int8 x, d and sums per q8 block */

static int shape_ok(int64_t m, int64_t k) {
    return m > 0 && k > 0 && m % Q1R32_ROWS == 0 && k % QK1_0 == 0 && m <= WS_MAX_DIM && k <= WS_MAX_DIM;
}

int fic_q1r32_repack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) {
    if (src == NULL || dst == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    const int64_t nb = k / QK1_0, rb = nb * (int64_t)sizeof(block_q1_0), total = m * rb;
    if (dst < src + total && src < dst + total) return FIC_ERR_ARG;
    for (int64_t g = 0; g < m / Q1R32_ROWS; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * Q1R32_BLOCK_BYTES;
            for (int r = 0; r < Q1R32_ROWS; r++) {
                const block_q1_0 *blk = (const block_q1_0 *)(src + (g * Q1R32_ROWS + r) * rb) + b;
                memcpy(o + 2 * r, &blk->d, 2);
                for (int i = 0; i < QK1_0 / 8; i++) o[2 * Q1R32_ROWS + Q1R32_ROWS * i + r] = blk->qs[i];
            }
        }
    return FIC_OK;
}

/* Rows 32 g .. 32 g + 31 of an r32 matrix (nb blocks per row) into 32 row-major Q1_0 rows. */
static void unpack_group(const uint8_t *w, int64_t nb, int64_t g, uint8_t *rows) {
    const int64_t rb = nb * (int64_t)sizeof(block_q1_0);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + (g * nb + b) * Q1R32_BLOCK_BYTES;
        for (int r = 0; r < Q1R32_ROWS; r++) {
            block_q1_0 *blk = (block_q1_0 *)(rows + r * rb) + b;
            memcpy(&blk->d, p + 2 * r, 2);
            for (int i = 0; i < QK1_0 / 8; i++) blk->qs[i] = p[2 * Q1R32_ROWS + Q1R32_ROWS * i + r];
        }
    }
}

int fic_q1r32_unpack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) {
    if (src == NULL || dst == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    const int64_t nb = k / QK1_0, total = m * nb * (int64_t)sizeof(block_q1_0);
    if (dst < src + total && src < dst + total) return FIC_ERR_ARG;
    for (int64_t g = 0; g < m / Q1R32_ROWS; g++)
        unpack_group(src, nb, g, dst + g * nb * Q1R32_BLOCK_BYTES);
    return FIC_OK;
}

int64_t fic_q1r32_ws_bytes(int64_t k) {
    if (k <= 0 || k % QK1_0 != 0 || k > WS_MAX_DIM) return FIC_ERR_ARG;
    return QX_BYTES(k) + ws_round64(k / 4 * Q1R32_TAB_BYTES);
}

/* Per 4 weights (bits 0..3 of a nibble, LSB first as Q1_0's), e[n] = sum_t (bit t of n ? xq : -xq),
 * 16 low bytes then 16 high bytes of each int16; each entry from an earlier one plus 2 xq. */
static void build_tables(const int8_t *xq, int64_t k, uint8_t *tab) {
    for (int64_t grp = 0; grp < k / 4; grp++) {
        const int8_t *x = xq + 4 * grp;
        int16_t e[16];
        e[0] = (int16_t)-(x[0] + x[1] + x[2] + x[3]);
        for (int n = 1; n < 16; n++) e[n] = (int16_t)(e[n & (n - 1)] + 2 * x[__builtin_ctz((unsigned)n)]);
        uint8_t *t = tab + grp * Q1R32_TAB_BYTES;
        for (int n = 0; n < 16; n++) {
            t[n] = (uint8_t)((uint16_t)e[n] & 0xFF);
            t[16 + n] = (uint8_t)((uint16_t)e[n] >> 8);
        }
    }
}

typedef struct {
    const fic_kernels *kt;
    const uint8_t *w, *tab;
    const float *dx;
    float *y;
    int64_t nb;
} r32_job;

static void r32_range(void *ctx, int64_t g0, int64_t g1, int tid) {
    const r32_job *j = ctx;
    (void)tid;
    q1r32(j->kt, j->w, j->nb, j->tab, j->dx, j->y, g0, g1);
}

int fic_q1r32_matvec(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t m, int64_t k,
                     void *ws, int64_t ws_bytes) {
    if (w == NULL || x == NULL || y == NULL || ws == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON || ((uintptr_t)ws % 64) != 0) return FIC_ERR_ARG;
    if (ws_bytes < fic_q1r32_ws_bytes(k)) return FIC_ERR_WORKSPACE;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const fic_kernels *kt = fic_kernels_for(impl);
    if (kt == NULL) return FIC_ERR_UNSUPPORTED;
    uint8_t *qx = ws, *tab = qx + QX_BYTES(k);
    fic_qdot_kernels(impl)->quantize(x, k, qx); /* int8 x, then the q8 blocks' d (then their sums) */
    build_tables((const int8_t *)qx, k, tab);
    const int64_t nb = k / QK1_0, n_groups = m / Q1R32_ROWS;
    r32_job j = {kt, w, tab, (const float *)(qx + k), y, nb};
    /* two chunks a thread: whole groups are big (18 KiB at k = 4096), so row_chunk's 1 MiB floor
     * left 2 threads 3 chunks, one a quarter of the others */
    const int64_t n_chunks = 2 * (int64_t)fic_pool_threads(pool);
    fic_parallel_for(pool, n_groups, (n_groups + n_chunks - 1) / n_chunks, r32_range, &j);
    return FIC_OK;
}

/* ---- prefill: each 32-row group back in rows (one thread's buffer), then Q1_0's int8 kernel ---- */

typedef struct {
    const qdot_kernels *kern;
    const uint8_t *w;
    const float *x;
    float *y;
    uint8_t *rows, *xq;
    int64_t m, k, nb, rows_bytes, qrow, nt;
} r32_mm;

static void r32_quantize_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    const r32_mm *j = ctx;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) j->kern->q1_quantize(j->x + i * j->k, j->k, j->xq + i * j->qrow);
}

static void r32_groups_range(void *ctx, int64_t g0, int64_t g1, int tid) {
    const r32_mm *j = ctx;
    uint8_t *rows = j->rows + tid * j->rows_bytes;
    const int64_t rb = j->nb * (int64_t)sizeof(block_q1_0);
    for (int64_t g = g0; g < g1; g++) {
        unpack_group(j->w, j->nb, g, rows);
        j->kern->q1_dot(rows, rb, Q1R32_ROWS, j->k, j->xq, j->qrow, j->nt, j->y + g * Q1R32_ROWS, j->m, 0);
    }
}

int q1r32_matmul(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t t, int64_t m,
                 int64_t k, void *ws, int64_t ws_bytes) {
    if (w == NULL || x == NULL || y == NULL || t <= 0 || !shape_ok(m, k)) return FIC_ERR_ARG;
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    const qdot_kernels *kern = fic_qdot_kernels(impl);
    if (kern->q1_dot == NULL || kern->q1_quantize == NULL) return FIC_ERR_UNSUPPORTED;
    const int64_t n_threads = fic_pool_threads(pool), nb = k / QK1_0;
    r32_mm j = {kern, w, NULL, NULL, ws, NULL, m, k, nb, ws_round64(Q1R32_ROWS * nb * (int64_t)sizeof(block_q1_0)),
                Q1X_ROW_BYTES(k), 0};
    const int64_t avail = ws_bytes - n_threads * j.rows_bytes;
    if (avail < j.qrow) return FIC_ERR_WORKSPACE;
    const int64_t chunk_t = avail / j.qrow;
    j.xq = (uint8_t *)ws + n_threads * j.rows_bytes;
    for (int64_t i0 = 0; i0 < t; i0 += chunk_t) {
        j.nt = t - i0 < chunk_t ? t - i0 : chunk_t;
        j.x = x + i0 * k;
        j.y = y + i0 * m;
        fic_parallel_for(pool, j.nt, (j.nt + n_threads - 1) / n_threads, r32_quantize_range, &j);
        fic_parallel_for(pool, m / Q1R32_ROWS, 1, r32_groups_range, &j);
    }
    return FIC_OK;
}
