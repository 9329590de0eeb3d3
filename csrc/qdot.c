/* qdot.c - prefill matmul through the int8-activation path (qdot.h): tokens in chunks that fit the
 * caller's workspace, each chunk quantized once (threads split its tokens), then threads split the
 * weight rows; QW_ROWS rows at a time are unpacked once per chunk into the thread's buffer and
 * multiplied with every token of the chunk. Nothing is allocated. */
#include <stdint.h>

#include "blocks.h"
#include "qdot.h"

typedef struct {
    const qdot_kernels *kern;
    int fmt;
    const uint8_t *w;
    const float *x;
    float *y;
    int64_t m, k, row_bytes, qrow, nt, unpack_bytes;
    uint8_t *xq, *unpack;
} qmm_t;

static void quantize_range(void *ctx, int64_t i0, int64_t i1, int tid) {
    const qmm_t *j = ctx;
    (void)tid;
    for (int64_t i = i0; i < i1; i++) j->kern->quantize(j->x + i * j->k, j->k, j->xq + i * j->qrow);
}

static void rows_range(void *ctx, int64_t r0, int64_t r1, int tid) {
    const qmm_t *j = ctx;
    uint8_t *buf = j->unpack + tid * QW_ROWS * j->unpack_bytes;
    qw_row rows[QW_ROWS];
    for (int64_t r = r0; r < r1; r += QW_ROWS) {
        const int64_t nr = r1 - r < QW_ROWS ? r1 - r : QW_ROWS;
        for (int64_t i = 0; i < nr; i++)
            fic_qdot_unpack(j->fmt, j->w + (r + i) * j->row_bytes, j->k, buf + i * j->unpack_bytes, &rows[i]);
        j->kern->dot(rows, nr, j->xq, j->qrow, j->nt, j->y + r, j->m, 0);
    }
}

int fic_qdot_matmul(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t t,
                    int64_t m, int64_t k, void *ws, int64_t ws_bytes) {
    const int64_t n_threads = fic_pool_threads(pool);
    qmm_t j = {.kern = fic_qdot_kernels(impl), .fmt = fmt, .w = w, .m = m, .k = k,
               .row_bytes = fic_row_bytes(fmt, k), .qrow = QX_ROW_BYTES(k),
               .unpack_bytes = (QW_ROW_BYTES(k) + 63) / 64 * 64};
    const int64_t avail = ws_bytes - n_threads * QW_ROWS * j.unpack_bytes;
    if (avail < j.qrow) return FIC_ERR_WORKSPACE;
    const int64_t chunk_t = avail / j.qrow;
    j.unpack = ws;
    j.xq = (uint8_t *)ws + n_threads * QW_ROWS * j.unpack_bytes;
    const int64_t row_chunk = (m + 4 * n_threads - 1) / (4 * n_threads);
    for (int64_t i0 = 0; i0 < t; i0 += chunk_t) {
        j.nt = t - i0 < chunk_t ? t - i0 : chunk_t;
        j.x = x + i0 * k;
        j.y = y + i0 * m;
        fic_parallel_for(pool, j.nt, (j.nt + n_threads - 1) / n_threads, quantize_range, &j);
        fic_parallel_for(pool, m, row_chunk, rows_range, &j);
    }
    return FIC_OK;
}
