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

/* Offset in an r32 block of row r's byte j of its Q1_0 block (j < 2: d, then sign byte j - 2). */
static inline int r32_offset(int r, int j) {
    return j < 2 ? 2 * r + j : 2 * Q1R32_ROWS + Q1R32_ROWS * (j - 2) + r;
}

/* One group of 32 rows (nb blocks each) between the layouts: from row-major rows to an r32 group
 * (to_r32), or from an r32 group back to rows. */
static void move_group(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32) {
    const int64_t bb = (int64_t)sizeof(block_q1_0), rb = nb * bb;
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < Q1R32_ROWS; r++)
            for (int jb = 0; jb < (int)bb; jb++) {
                const int64_t row_at = r * rb + b * bb + jb, group_at = b * Q1R32_BLOCK_BYTES + r32_offset(r, jb);
                if (to_r32) to[group_at] = from[row_at];
                else to[row_at] = from[group_at];
            }
}

/* src -> dst, m x k Q1_0 weights from one layout to the other, a group at a time (a group holds the
 * same byte range in both); no overlap. */
static int convert(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst, int to_r32) {
    if (src == NULL || dst == NULL || !shape_ok(m, k)) return FIC_ERR_ARG;
    const int64_t nb = k / QK1_0, group_bytes = nb * Q1R32_BLOCK_BYTES, total = m / Q1R32_ROWS * group_bytes;
    if (dst < src + total && src < dst + total) return FIC_ERR_ARG;
    for (int64_t g = 0; g < m / Q1R32_ROWS; g++) move_group(src + g * group_bytes, dst + g * group_bytes, nb, to_r32);
    return FIC_OK;
}

int fic_q1r32_repack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) { return convert(src, m, k, dst, 1); }
int fic_q1r32_unpack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst) { return convert(src, m, k, dst, 0); }

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
    fic_parallel_for(pool, n_groups, row_chunk(pool, n_groups, nb * Q1R32_BLOCK_BYTES), r32_range, &j);
    return FIC_OK;
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
    move_group(w + g * nb * Q1R32_BLOCK_BYTES, rows, nb, 0);
}
