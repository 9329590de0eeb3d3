/* kernels_scalar.c - the scalar reference kernels (FIC_IMPL_REF): the spec every fast path is
 * tested against. Dequantize each block to float and multiply-add in float, in order; portable C,
 * no target attributes. Its table, fic_kernels_scalar, has no optional fast paths and prepares
 * nothing (xprep XP_NONE). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "silu.h"

#define MAX_BW 256 /* largest block, in weights (a K-quant super-block) */

/* Dequantize block `b` of a row into out[bw]. */
static ALWAYS_INLINE void deq_block_ref(const int fmt, const uint8_t *row, int64_t b, float *out) {
    switch (fmt) {
    case FIC_F32:
        memcpy(out, row + 4 * b, 4);
        return;
    case FIC_F16: {
        fic_half h;
        memcpy(&h, row + 2 * b, 2);
        out[0] = fic_h2f(h);
        return;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK8_0; j++) out[j] = d * (float)blk->qs[j];
        return;
    }
    case FIC_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            out[j] = d * (float)((blk->qs[j] & 15) - 8);
            out[j + QK4_0 / 2] = d * (float)((blk->qs[j] >> 4) - 8);
        }
        return;
    }
    case FIC_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        float d = fic_h2f(blk->d), mn = fic_h2f(blk->m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            out[j] = d * (float)(blk->qs[j] & 15) + mn;
            out[j + QK4_1 / 2] = d * (float)(blk->qs[j] >> 4) + mn;
        }
        return;
    }
    case FIC_Q1_0: {
        const block_q1_0 *blk = (const block_q1_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK1_0; j++) out[j] = (blk->qs[j / 8] >> (j % 8)) & 1 ? d : -d;
        return;
    }
    case FIC_Q5_0:
    case FIC_Q4_K:
    case FIC_Q6_K: /* quant.c's dequantizers, ggml's dequantize_row_* (the spec) */
        fic_dequantize(fmt, row + b * fic_fmt_block_bytes(fmt), out, 1, fic_fmt_block_weights(fmt));
        return;
    }
}

void kern_deq_range_ref(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    const int64_t bw = fic_fmt_block_weights(fmt);
    for (int64_t b = b0; b < b1; b++) deq_block_ref(fmt, row, b, out + (b - b0) * bw);
}

/* One dot and one deq function per format, the format a constant in each. Blocks of one weight
 * (F32, F16) are dequantized inline; the others through a block function that is not inlined: gcc
 * vectorizes the block alone but not the loops around it once inlined (measured, 1024 x 1024, 1
 * thread: reference accum_rows of Q4_0/Q4_1 2.5x slower inlined, matvec of Q4_1 1.15x). */
#define REF_FMT(name, FMT, BW, INLINE_BLOCK)                                                          \
    static __attribute__((noinline)) void deq_block_##name##_ref(const uint8_t *row, int64_t b, float *out) { \
        deq_block_ref(FMT, row, b, out);                                                             \
    }                                                                                                \
    static ALWAYS_INLINE void deq1_##name##_ref(const uint8_t *row, int64_t b, float *out) {         \
        if (INLINE_BLOCK)                                                                            \
            deq_block_ref(FMT, row, b, out);                                                         \
        else                                                                                         \
            deq_block_##name##_ref(row, b, out);                                                     \
    }                                                                                                \
    /* Row . x in float, in order: each block dequantized, then multiplied. */                       \
    static float row_dot_##name##_ref(const job_t *j, const uint8_t *row, const float *x) {          \
        float buf[MAX_BW], acc = 0.0f;                                                               \
        const int64_t nb = j->k / (BW);                                                              \
        for (int64_t b = 0; b < nb; b++) {                                                           \
            deq1_##name##_ref(row, b, buf);                                                          \
            for (int64_t i = 0; i < (BW); i++) acc += buf[i] * x[b * (BW) + i];                      \
        }                                                                                            \
        return acc;                                                                                  \
    }                                                                                                \
    void kern_deq_##name##_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out) {             \
        for (int64_t b = b0; b < b1; b++) deq1_##name##_ref(row, b, out + (b - b0) * (BW));          \
    }
REF_FMT(f32, FIC_F32, 1, 1)
REF_FMT(f16, FIC_F16, 1, 1)
REF_FMT(q8_0, FIC_Q8_0, QK8_0, 0)
REF_FMT(q4_0, FIC_Q4_0, QK4_0, 0)
REF_FMT(q4_1, FIC_Q4_1, QK4_1, 0)
REF_FMT(q1_0, FIC_Q1_0, QK1_0, 0)
REF_FMT(q5_0, FIC_Q5_0, QK5_0, 0)
REF_FMT(q4_K, FIC_Q4_K, QK_K, 0)
REF_FMT(q6_K, FIC_Q6_K, QK_K, 0)
#undef REF_FMT

static float dot_f32_ref(const float *a, const float *b, int64_t k) {
    float acc = 0.0f;
    for (int64_t i = 0; i < k; i++) acc += a[i] * b[i];
    return acc;
}

static void axpy_ref(float a, const float *w, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * w[i];
}

/* Y[t][r0 + r] = tile[r] . x[t] for a tile of nr dequantized rows. */
static void gemm_tile_ref(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    for (int64_t r = 0; r < nr; r++)
        for (int64_t t = 0; t < j->t; t++)
            j->y[t * j->m + r0 + r] = dot_f32_ref(tile + r * j->k, j->x + t * j->k, j->k);
}

/* gemm_panel's reference: gemm_tile_ref's arithmetic (one sum per output, in k order) on a tile
 * packed by pack_panels, so the packing is checked by every test of the reference. */
static void gemm_panel_ref(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k;
    for (int64_t r = 0; r < nr; r++) {
        const float *p = tile + r / PANEL_ROWS * PANEL_ROWS * k + r % PANEL_ROWS;
        for (int64_t t = 0; t < j->t; t++) {
            const float *x = j->x + t * k;
            float acc = 0.0f;
            for (int64_t kk = 0; kk < k; kk++) acc += p[kk * PANEL_ROWS] * x[kk];
            j->y[t * j->m + r0 + r] = acc;
        }
    }
}

void fixed_add_ref(const float *c, int64_t *acc, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += fix_ref(c[i]);
}

void pack8_ref(const float *src, int64_t ld, int64_t n, float *dst) {
    for (int64_t kk = 0; kk < n; kk++)
        for (int i = 0; i < 8; i++) dst[kk * PANEL_ROWS + i] = src[i * ld + kk];
}

void silu_mul_ref(float c, float *h, const float *u, int64_t n) {
    for (int64_t k = 0; k < n; k++) h[k] = c * fic_silu(h[k]) * u[k];
}

/* The r32 matvec's reference: per row, per Q1_0 block of 128 weights, the integer sum of +-xq from
 * the same tables as the fast paths (a q8 block's correction at a time), then acc = fma(d dx, sum,
 * acc) in block order, dx the block's activation scale (fmaf: the fast paths' fused multiply-add,
 * so both give the same bits). */
void q1r32_ref(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx, const float *dx, float *y, int64_t g0,
               int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        float acc[Q1R32_ROWS] = {0};
        const uint8_t *p = w + g * nb * Q1R32_BLOCK_BYTES;
        for (int64_t b = 0; b < nb; b++, p += Q1R32_BLOCK_BYTES) {
            const uint8_t *t = tab + b * (QK1_0 / 4) * Q1R32_TAB_BYTES;
            int32_t s[Q1R32_ROWS] = {0};
            for (int q = 0; q < QK1_0 / 32; q++) {
                for (int r = 0; r < Q1R32_ROWS; r++) s[r] -= cx[b * (QK1_0 / 32) + q];
                for (int i = 4 * q; i < 4 * q + 4; i++) { /* sign byte i: weights 8i..8i+7 */
                    const uint8_t *tl = t + q1r32_tab_at(2 * i), *th = t + q1r32_tab_at(2 * i + 1);
                    for (int r = 0; r < Q1R32_ROWS; r++) {
                        const uint8_t v = p[2 * Q1R32_ROWS + Q1R32_ROWS * i + r], lo = v & 15, hi = v >> 4;
                        s[r] += 2 * (tl[lo] + th[hi]) + 32 * (tl[Q1R32_TAB_H + lo] + th[Q1R32_TAB_H + hi]);
                    }
                }
            }
            for (int r = 0; r < Q1R32_ROWS; r++) {
                fic_half h;
                memcpy(&h, p + 2 * r, 2);
                acc[r] = fmaf(fic_h2f(h) * dx[b], (float)s[r], acc[r]);
            }
        }
        memcpy(y + g * Q1R32_ROWS, acc, sizeof acc);
    }
}

/* One group of 32 rows (nb blocks each) between the layouts: from row-major rows to an r32 group
 * (to_r32), or from an r32 group back to rows. A row's block is read (or written) whole, its 16
 * sign bytes 32 apart in the group (a byte at a time with its offset computed was 4x slower:
 * bench/RESULTS.md). */
void q1r32_move_ref(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32) {
    const int64_t bb = (int64_t)sizeof(block_q1_0), rb = nb * bb;
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < Q1R32_ROWS; r++) {
            const int64_t row_at = r * rb + b * bb;
            uint8_t *g = (to_r32 ? to : (uint8_t *)from) + b * Q1R32_BLOCK_BYTES; /* the group's block */
            if (to_r32) {
                const uint8_t *s = from + row_at;
                g[2 * r] = s[0];
                g[2 * r + 1] = s[1];
                for (int j = 0; j < QK1_0 / 8; j++) g[2 * Q1R32_ROWS + Q1R32_ROWS * j + r] = s[2 + j];
            } else {
                uint8_t *d = to + row_at;
                d[0] = g[2 * r];
                d[1] = g[2 * r + 1];
                for (int j = 0; j < QK1_0 / 8; j++) d[2 + j] = g[2 * Q1R32_ROWS + Q1R32_ROWS * j + r];
            }
        }
    }
}

/* Plain reference table: every optional entry NULL (generic code), x never prepared. */
#define REF_ENTRY(name, KT) {KT, XP_NONE, XP_NONE, row_dot_##name##_ref, NULL, kern_deq_##name##_ref, NULL, NULL, NULL, NULL}
const fic_kernels fic_kernels_scalar = {
    FIC_IMPL_REF,
    axpy_ref,
    gemm_tile_ref,
    {
        [FIC_F32] = REF_ENTRY(f32, KT_F32),
        [FIC_F16] = REF_ENTRY(f16, KT_F16),
        [FIC_Q8_0] = REF_ENTRY(q8_0, KT_Q8_0),
        [FIC_Q4_0] = REF_ENTRY(q4_0, KT_Q4_0),
        [FIC_Q4_1] = REF_ENTRY(q4_1, KT_Q4_1),
        [FIC_Q1_0] = REF_ENTRY(q1_0, KT_Q1_0),
        [FIC_Q5_0] = REF_ENTRY(q5_0, KT_Q5_0),
        [FIC_Q4_K] = REF_ENTRY(q4_K, KT_Q4_K),
        [FIC_Q6_K] = REF_ENTRY(q6_K, KT_Q6_K),
    },
    gemm_panel_ref,
    fixed_add_ref,
    pack8_ref,
    silu_mul_ref,
    q1r32_ref,
    q1r32_move_ref,
    NULL, /* q1r32_tiles: a token at a time */
};
