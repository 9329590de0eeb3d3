/* qdot_scalar.c - the int8-activation path's portable parts (see qdot.h): the format table, the
 * weight-row unpacking every architecture shares, and the scalar reference of the quantizer and
 * the integer dot product (the spec the fast paths are tested against). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "qdot.h"

int fic_qdot_fmt_ok(int fmt) {
    switch (fmt) {
    case FIC_Q1_0: case FIC_Q4_0: case FIC_Q4_1: case FIC_Q5_0: case FIC_Q8_0: case FIC_Q4_K: case FIC_Q6_K:
        return 1;
    default:
        return 0;
    }
}

static const qdot_kernels QDOT_REF = {fic_qdot_quantize_ref, fic_qdot_dot_ref, fic_q1x_quantize_ref, fic_q1_dot_ref, NULL,
                                       fic_q1r32_quantize_ref, QW_ROWS, NULL, NULL, NULL};
#if defined(__x86_64__)
static const qdot_kernels QDOT_AVX2 = {fic_qdot_quantize_avx2, fic_qdot_dot_avx2, fic_q1x_quantize_avx2, fic_q1_dot_avx2,
                                        NULL, fic_q1r32_quantize_avx2, QW_ROWS, NULL, NULL, NULL};
static const qdot_kernels QDOT_AVX512_Q1 = {fic_qdot_quantize_avx2, fic_qdot_dot_avx2, fic_q1x_quantize_avx2,
                                            fic_q1_dot_avx2, q1r32_build_tables_avx512, fic_q1r32_quantize_avx2, QW_ROWS,
                                            NULL, NULL, NULL};
/* + AMX-INT8: the unpacked rows' products on tiles, 16 rows a call, tokens in the QT layout */
static const qdot_kernels QDOT_AVX512_AMX = {fic_qdot_quantize_avx2, fic_qdot_dot_amx, fic_q1x_quantize_avx2,
                                             fic_q1_dot_avx2, q1r32_build_tables_avx512, fic_q1r32_quantize_avx2,
                                             QW_ROWS_MAX, fic_qdot_quantize_tiles_avx2, fic_qdot_tiles_dot_amx,
                                             fic_qdot_part_dot_amx};
#endif
#if defined(__aarch64__)
static const qdot_kernels QDOT_NEON = {fic_qdot_quantize_neon, fic_qdot_dot_neon, NULL, NULL, NULL, fic_q1r32_quantize_ref,
                                        QW_ROWS, NULL, NULL, NULL};
#endif

const qdot_kernels *fic_qdot_kernels(int impl) {
#if defined(__x86_64__)
    /* AVX-512 machines run the AVX2 code (no VNNI variant yet) */
    if (impl == FIC_IMPL_AVX512 && fic_cpu_features_get()->amx_int8) return &QDOT_AVX512_AMX;
    if (impl == FIC_IMPL_AVX512 && fic_cpu_features_get()->avx512_q1) return &QDOT_AVX512_Q1;
    if (impl == FIC_IMPL_AVX2 || impl == FIC_IMPL_AVX512) return &QDOT_AVX2;
#endif
#if defined(__aarch64__)
    if (impl == FIC_IMPL_NEON) return &QDOT_NEON;
#endif
    return &QDOT_REF;
}

/* ---- weight rows ---------------------------------------------------------------------------- */

/* fic_h2f with its common case (a normal half) inline: the unpacking of a prefill's rows called
 * the library function for every block, a tenth of an AMX prefill (bench/RESULTS.md) */
static inline float half_to_float(fic_half h) {
    const uint32_t e = (h >> 10) & 0x1fu;
    if (e == 0 || e == 0x1fu) return fic_h2f(h);
    const uint32_t u = (uint32_t)(h & 0x8000u) << 16 | (e + 112u) << 23 | (uint32_t)(h & 0x3ffu) << 13;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One 32-block of Q4-like nibbles: byte l's low nibble is weight l, high nibble weight l + 16. */
static void unpack_nibbles16(const uint8_t *qs, int8_t *w) {
    for (int l = 0; l < 16; l++) {
        w[l] = (int8_t)(qs[l] & 15);
        w[l + 16] = (int8_t)(qs[l] >> 4);
    }
}

/* The half at p (rows of a GGUF mapping need not be aligned) */
static inline float half_at(const uint8_t *p) {
    fic_half h;
    memcpy(&h, p, sizeof h);
    return half_to_float(h);
}

/* One weight block (bw weights: bw / 32 activation blocks) into w, fw, cw (and isc for Q6_K). The
 * small formats are read in place: a copy of the block to the stack first was then read back
 * across its stores' boundaries, a stall per block (bench/RESULTS.md). */
static inline __attribute__((always_inline)) void unpack_block(int fmt, const uint8_t *src, int8_t *w, float *fw, float *cw,
                                                               int8_t *isc) {
    switch (fmt) {
    case FIC_Q8_0: /* d, qs[32] */
        static_assert(offsetof(block_q8_0, qs) == 2, "Q8_0: d, then qs");
        memcpy(w, src + 2, 32);
        fw[0] = half_at(src);
        cw[0] = 0.0f;
        return;
    case FIC_Q4_0: /* d, qs[16] */
        static_assert(offsetof(block_q4_0, qs) == 2, "Q4_0: d, then qs");
        unpack_nibbles16(src + 2, w);
        fw[0] = half_at(src);
        cw[0] = -8.0f * fw[0];
        return;
    case FIC_Q4_1: /* d, m, qs[16] */
        static_assert(offsetof(block_q4_1, m) == 2 && offsetof(block_q4_1, qs) == 4, "Q4_1: d, m, then qs");
        unpack_nibbles16(src + 4, w);
        fw[0] = half_at(src);
        cw[0] = half_at(src + 2);
        return;
    case FIC_Q5_0: {
        block_q5_0 b;
        memcpy(&b, src, sizeof b);
        uint32_t qh;
        memcpy(&qh, b.qh, 4);
        unpack_nibbles16(b.qs, w);
        for (int j = 0; j < 32; j++) w[j] = (int8_t)(w[j] | (int)((qh >> j) & 1) << 4);
        fw[0] = half_to_float(b.d);
        cw[0] = -16.0f * fw[0];
        return;
    }
    case FIC_Q1_0: { /* w = 2d bit - d: four 32-blocks per 128-weight block */
        block_q1_0 b;
        memcpy(&b, src, sizeof b);
        const float d = half_to_float(b.d);
        for (int j = 0; j < QK1_0; j++) w[j] = (int8_t)((b.qs[j / 8] >> (j % 8)) & 1);
        for (int s = 0; s < 4; s++) {
            fw[s] = 2.0f * d;
            cw[s] = -d;
        }
        return;
    }
    case FIC_Q4_K: { /* eight 32-blocks: d sc_s q - dmin m_s; read in place, as the small formats */
        static_assert(offsetof(block_q4_K, dmin) == 2 && offsetof(block_q4_K, scales) == 4 &&
                          offsetof(block_q4_K, qs) == 16, "Q4_K: d, dmin, scales, then qs");
        const float d = half_at(src), dmin = half_at(src + 2);
        const uint8_t *qs = src + 16;
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                w[64 * c + l] = (int8_t)(qs[32 * c + l] & 15);
                w[64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
            }
        }
        uint8_t sc[8], mn[8];
        q4k_scales_mins(src + 4, sc, mn);
        for (int s = 0; s < 8; s++) {
            fw[s] = d * (float)sc[s];
            cw[s] = -dmin * (float)mn[s];
        }
        return;
    }
    case FIC_Q6_K: { /* sixteen 16-weight sub-blocks, signed q - 32, int8 scale j / 16, fw = d */
        block_q6_K b;
        memcpy(&b, src, sizeof b);
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = b.ql + 64 * half, *qh = b.qh + 32 * half;
            int8_t *o = w + 128 * half;
            for (int l = 0; l < 32; l++) {
                o[l] = (int8_t)(((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32);
                o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32);
                o[l + 64] = (int8_t)(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
                o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
            }
        }
        memcpy(isc, b.scales, 16);
        for (int s = 0; s < 8; s++) {
            fw[s] = half_to_float(b.d);
            cw[s] = 0.0f;
        }
        return;
    }
    }
}

/* The pointers of an unpacked row of k weights in buf (QW_ROW_BYTES(k)). */
static qw_row row_at(int fmt, uint8_t *buf, int64_t k) {
    const int64_t nb = k / QX_BLOCK;
    qw_row r;
    r.w = (const int8_t *)buf;
    r.fw = (const float *)(buf + (k + 31) / 32 * 32);
    r.cw = r.fw + nb;
    r.isc = fmt == FIC_Q6_K ? (const int8_t *)(r.cw + nb) : NULL;
    r.k = k;
    r.is_signed = fmt == FIC_Q8_0 || fmt == FIC_Q6_K;
    return r;
}

/* x86-64: an AVX2 clone beside the baseline one, chosen once at load (an ifunc): the same bytes and
 * floats (byte moves, nibble masks, exact products), its loops 32 bytes a step. */
#if defined(__x86_64__)
#define UNPACK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define UNPACK_CLONES
#endif

UNPACK_CLONES void fic_qdot_unpack_piece(int fmt, const uint8_t *src, int64_t k, uint8_t *buf, int64_t k_total,
                                         int64_t off) {
    const qw_row r = row_at(fmt, buf, k_total);
    int8_t *w = (int8_t *)r.w + off;
    float *fw = (float *)r.fw + off / QX_BLOCK, *cw = (float *)r.cw + off / QX_BLOCK;
    int8_t *isc = (int8_t *)(r.fw + 2 * (k_total / QX_BLOCK)) + 2 * (off / QX_BLOCK);
    if (src == NULL) { /* a piece of zeros: contributes exactly 0, its weights are not read */
        memset(w, 0, (size_t)k);
        memset(fw, 0, (size_t)(k / QX_BLOCK) * sizeof *fw);
        memset(cw, 0, (size_t)(k / QX_BLOCK) * sizeof *cw);
        memset(isc, 0, (size_t)(2 * (k / QX_BLOCK)));
        return;
    }
    /* one loop per format, each with its block's code inlined and its block's size a constant: a
     * dense model's down pieces are 64 weights, so a switch and a call per block were a tenth of a
     * Qwen2.5-1.5B prefill, and the format's sizes asked per piece (two calls, three divisions) a
     * few percent more (bench/RESULTS.md) */
#define UNPACK_BLOCKS(FMT, BW, BB)                                                                         \
    for (int64_t b = 0; b < k / (BW); b++)                                                                 \
        unpack_block(FMT, src + b * (BB), w + b * (BW), fw + (BW) / QX_BLOCK * b, cw + (BW) / QX_BLOCK * b,   \
                     isc + 2 * ((BW) / QX_BLOCK) * b)
    switch (fmt) {
    case FIC_Q8_0: UNPACK_BLOCKS(FIC_Q8_0, QK8_0, (int64_t)sizeof(block_q8_0)); break;
    case FIC_Q4_0: UNPACK_BLOCKS(FIC_Q4_0, QK4_0, (int64_t)sizeof(block_q4_0)); break;
    case FIC_Q4_1: UNPACK_BLOCKS(FIC_Q4_1, QK4_1, (int64_t)sizeof(block_q4_1)); break;
    case FIC_Q5_0: UNPACK_BLOCKS(FIC_Q5_0, QK5_0, (int64_t)sizeof(block_q5_0)); break;
    case FIC_Q4_K: UNPACK_BLOCKS(FIC_Q4_K, QK_K, (int64_t)sizeof(block_q4_K)); break;
    case FIC_Q6_K: UNPACK_BLOCKS(FIC_Q6_K, QK_K, (int64_t)sizeof(block_q6_K)); break;
    case FIC_Q1_0: UNPACK_BLOCKS(FIC_Q1_0, QK1_0, (int64_t)sizeof(block_q1_0)); break;
    default: break; /* fic_qdot_fmt_ok's formats only */
    }
#undef UNPACK_BLOCKS
}

void fic_qdot_row(int fmt, uint8_t *buf, int64_t k, qw_row *out) { *out = row_at(fmt, buf, k); }

void fic_qdot_unpack(int fmt, const uint8_t *src, int64_t k, uint8_t *buf, qw_row *out) {
    fic_qdot_unpack_piece(fmt, src, k, buf, k, 0);
    *out = row_at(fmt, buf, k);
}

/* ---- the reference -------------------------------------------------------------------------- */

/* n floats (one block) to int8 at q with d = amax/127, round to nearest even (as the SIMD paths);
 * returns d, and the sum of the q at *sum */
static float quantize_block(const float *xb, int n, int8_t *q, int *sum) {
    float amax = 0.0f;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(xb[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int s = 0;
    for (int j = 0; j < n; j++) {
        const int v = (int)nearbyintf(xb[j] * id);
        q[j] = (int8_t)v;
        s += v;
    }
    *sum = s;
    return d;
}

void fic_qdot_quantize_ref(const float *x, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QX_BLOCK;
    float *dv = (float *)(dst + k), *sv = dv + nb;
    for (int64_t b = 0; b < nb; b++) {
        int sum;
        dv[b] = quantize_block(x + b * QX_BLOCK, QX_BLOCK, (int8_t *)dst + b * QX_BLOCK, &sum);
        sv[b] = dv[b] * (float)sum;
    }
}

void fic_q1r32_quantize_ref(const float *x, int64_t k, uint8_t *dst) {
    float *dv = (float *)(dst + k);
    int sum;
    for (int64_t b = 0; b < k / QK1_0; b++) dv[b] = quantize_block(x + b * QK1_0, QK1_0, (int8_t *)dst + b * QK1_0, &sum);
}

void fic_qdot_dot_ref(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                      int64_t ys, int accumulate) {
    for (int64_t r = 0; r < nr; r++) {
        const qw_row *row = &rows[r];
        const int64_t k = row->k, nb = k / QX_BLOCK;
        for (int64_t i = 0; i < nt; i++) {
            const int8_t *q = (const int8_t *)(xq + i * qrow);
            const float *dv = (const float *)(xq + i * qrow + k), *sv = dv + nb;
            float acc = 0.0f, corr = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *wb = row->w + b * QX_BLOCK, *qb = q + b * QX_BLOCK;
                int32_t lo = 0, hi = 0;
                for (int j = 0; j < 16; j++) lo += (int32_t)wb[j] * qb[j];
                for (int j = 16; j < 32; j++) hi += (int32_t)wb[j] * qb[j];
                const int32_t isum = row->isc ? row->isc[2 * b] * lo + row->isc[2 * b + 1] * hi : lo + hi;
                acc += row->fw[b] * dv[b] * (float)isum;
                corr += row->cw[b] * sv[b];
            }
            float *yo = y + i * ys + r;
            *yo = acc + corr + (accumulate ? *yo : 0.0f);
        }
    }
}

/* ---- Q1_0's own path: the reference (qdot.h, Q1X_*) ------------------------------------------ */

/* Weight index (0..127 in its block) of byte p of the permuted block: vector p / 32, half, byte i. */
static inline int q1x_weight(int p) {
    const int v = p / 32, half = (p % 32) / 16, i = p % 16;
    return 8 * i + 2 * v + half;
}

void fic_q1x_quantize_ref(const float *x, int64_t k, uint8_t *dst) {
    uint8_t tmp[QX_ROW_BYTES(QK1_0)]; /* one block in the common layout: q[128] | d[4] | s[4] */
    for (int64_t b = 0; b < k / QK1_0; b++) {
        fic_qdot_quantize_ref(x + b * QK1_0, QK1_0, tmp);
        const float *dv = (const float *)(tmp + QK1_0), *sv = dv + 4;
        uint8_t *o = dst + b * Q1X_BLOCK_BYTES;
        for (int p = 0; p < QK1_0; p++) o[p] = tmp[q1x_weight(p)];
        float a[8], c[8];
        for (int l = 0; l < 8; l++) {
            a[l] = 2.0f * dv[l % 4];
            c[l] = l < 4 ? -sv[l] : 0.0f;
        }
        memcpy(o + QK1_0, a, sizeof a);
        memcpy(o + QK1_0 + sizeof a, c, sizeof c);
    }
}

void fic_q1_dot_ref(const uint8_t *w, int64_t rb, int64_t nr, int64_t k, const uint8_t *xq, int64_t qrow, int64_t nt,
                    float *y, int64_t ys, int accumulate) {
    for (int64_t r = 0; r < nr; r++) {
        for (int64_t i = 0; i < nt; i++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < k / QK1_0; b++) {
                block_q1_0 blk;
                memcpy(&blk, w + r * rb + b * (int64_t)sizeof blk, sizeof blk);
                const uint8_t *xb = xq + i * qrow + b * Q1X_BLOCK_BYTES;
                float a[8], c[8];
                memcpy(a, xb + QK1_0, sizeof a);
                memcpy(c, xb + QK1_0 + sizeof a, sizeof c);
                int32_t lane[8] = {0};
                for (int p = 0; p < QK1_0; p++) { /* lane of byte p: its half, then its byte i / 4 */
                    const int wi = q1x_weight(p), bit = (blk.qs[wi / 8] >> (wi % 8)) & 1;
                    lane[4 * ((p % 32) / 16) + (p % 16) / 4] += bit * (int8_t)xb[p];
                }
                float blk_sum = 0.0f;
                for (int l = 0; l < 8; l++) blk_sum += (float)lane[l] * a[l] + c[l];
                acc += fic_h2f(blk.d) * blk_sum;
            }
            float *yo = y + i * ys + r;
            *yo = acc + (accumulate ? *yo : 0.0f);
        }
    }
}
