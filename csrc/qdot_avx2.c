/* qdot_avx2.c - the int8-activation path on x86-64 AVX2 + FMA (see qdot.h): the quantizer and
 * the integer dot product, maddubs (u8 x s8 -> s16 pairs) then madd (-> s32), four tokens per
 * pass so each unpacked weight block is loaded once for four tokens. Signed weights (Q8_0, Q6_K)
 * take ggml's sign trick: |w| as the unsigned operand, x with w's sign as the signed one.
 * Built without -mavx2: every function carries the target attribute and runs only when the
 * CPU has AVX2 (fic_impl_available). */
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "hsum_avx2.h"
#include "q1_planes.h"
#include "qdot.h"

#define TGT __attribute__((target("avx2,fma,f16c")))

/* The largest |x| of 8n floats (n >= 1). */
TGT static inline float absmax(const float *x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
    for (int j = 1; j < n; j++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 32 floats times id, rounded to nearest even, stored as int8 at dst; returns their sum. */
TGT static inline int round32(const float *x, __m256 vid, uint8_t *dst) {
    const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i[4];
    for (int v = 0; v < 4; v++) i[v] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * v), vid), r));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    /* pack 32 int32 to int8 in order: packs interleave 128-bit lanes, the permute restores it */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return _mm_cvtsi128_si32(s4);
}

TGT void fic_qdot_quantize_avx2(const float *x, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QX_BLOCK;
    float *dv = (float *)(dst + k), *sv = dv + nb;
    for (int64_t b = 0; b < nb; b++) {
        const float d = absmax(x + b * QX_BLOCK, QX_BLOCK / 8) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const int sum = round32(x + b * QX_BLOCK, _mm256_set1_ps(id), dst + b * QX_BLOCK);
        dv[b] = d;
        sv[b] = d * (float)sum;
    }
}

/* Token i of a chunk into the QT layout (qdot.h): per block the same float ops as above. */
TGT void fic_qdot_quantize_tiles_avx2(const float *x, int64_t k, int64_t i, uint8_t *tiles) {
    uint8_t *tile = tiles + i / 16 * QT_TILE_BYTES(k);
    const int64_t l = i % 16;
    for (int64_t b = 0; b < k / QX_BLOCK; b++) {
        uint8_t *blk = tile + b * QT_BLOCK_BYTES;
        const float d = absmax(x + b * QX_BLOCK, QX_BLOCK / 8) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const int sum = round32(x + b * QX_BLOCK, _mm256_set1_ps(id), blk + 32 * l);
        ((float *)(blk + 512))[l] = d;
        ((float *)(blk + 576))[l] = d * (float)sum;
    }
}

/* x for the r32 layout (qdot.h, Q1R32_XQ_BYTES): the quantizer above over 128 weights a scale
 * (the same float ops as fic_q1r32_quantize_ref: a max, one division, a rounded product). */
TGT void fic_q1r32_quantize_avx2(const float *x, int64_t k, uint8_t *dst) {
    float *dv = (float *)(dst + k);
    for (int64_t b = 0; b < k / QK1_0; b++) {
        const float *xb = x + b * QK1_0;
        const float d = absmax(xb, QK1_0 / 8) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < QK1_0; j += 32) round32(xb + j, _mm256_set1_ps(id), dst + b * QK1_0 + j);
        dv[b] = d;
    }
}

TGT static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* sum_b cw_b s_b of one token */
TGT static inline float corr_dot(const float *cw, const float *sv, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(cw + b), _mm256_loadu_ps(sv + b), acc);
    float s = hsum(acc);
    for (; b < nb; b++) s += cw[b] * sv[b];
    return s;
}

#define SB 64 /* blocks per pass: the pass's per-token scales fw_b d_b sit on the stack */

/* fw_b d_b for the blocks [b0, b0 + np) of one token, 8 at a time */
TGT static inline void block_scales(const float *fw, const float *dv, int64_t b0, int64_t np, float *sc) {
    int64_t b = 0;
    for (; b + 8 <= np; b += 8)
        _mm256_store_ps(sc + b, _mm256_mul_ps(_mm256_loadu_ps(fw + b0 + b), _mm256_loadu_ps(dv + b0 + b)));
    for (; b < np; b++) sc[b] = fw[b0 + b] * dv[b0 + b];
}

/* int32 lanes of w . x per 4 bytes: maddubs (u8 x s8 -> s16 pairs), then madd with m16 (ones, or
 * Q6_K's two sub-block scales); signed weights take the sign trick */
#define QMUL(xv) _mm256_madd_epi16(is_signed ? _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv)) \
                                             : _mm256_maddubs_epi16(wv, xv), m16)
#define XLOAD(l) _mm256_loadu_si256((const __m256i *)(xs[l] + o))
#define ACC(acc, l) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(QMUL(XLOAD(l))), _mm256_broadcast_ss(sc[l] + b), acc)
#define BLOCK_SETUP                                                                                     \
    const int64_t o = (b0 + b) * QX_BLOCK;                                                              \
    const __m256i wv = _mm256_loadu_si256((const __m256i *)(row->w + o));                             \
    const __m256i wa = is_signed ? _mm256_sign_epi8(wv, wv) : wv;                                       \
    const __m256i m16 = has_isc ? _mm256_set_m128i(_mm_set1_epi16(row->isc[2 * (b0 + b) + 1]),        \
                                                   _mm_set1_epi16(row->isc[2 * (b0 + b)]))              \
                                : ones;

/* One row times 4 tokens: per 32-block one maddubs + madd + convert + FMA per token, the weight
 * load and the sign/scale set-up shared by the 4 tokens; the scales fw_b d_b are multiplied
 * 8 blocks at a time beforehand so the inner loop only broadcasts them. Four named accumulators
 * (an array of them was kept on the stack by the compiler: a store-forwarding chain per FMA). */
TGT static inline __attribute__((always_inline)) void dot4(const qw_row *row, const uint8_t *const *xs, float *out,
                                                           const int is_signed, const int has_isc) {
    const int64_t k = row->k, nb = k / QX_BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    const float *dv[4] = {(const float *)(xs[0] + k), (const float *)(xs[1] + k), (const float *)(xs[2] + k),
                          (const float *)(xs[3] + k)};
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float sc[4][SB] __attribute__((aligned(32)));
    for (int64_t b0 = 0; b0 < nb; b0 += SB) {
        const int64_t np = nb - b0 < SB ? nb - b0 : SB;
        for (int l = 0; l < 4; l++) block_scales(row->fw, dv[l], b0, np, sc[l]);
        for (int64_t b = 0; b < np; b++) {
            BLOCK_SETUP
            ACC(a0, 0);
            ACC(a1, 1);
            ACC(a2, 2);
            ACC(a3, 3);
        }
    }
    out[0] = hsum(a0) + corr_dot(row->cw, dv[0] + nb, nb);
    out[1] = hsum(a1) + corr_dot(row->cw, dv[1] + nb, nb);
    out[2] = hsum(a2) + corr_dot(row->cw, dv[2] + nb, nb);
    out[3] = hsum(a3) + corr_dot(row->cw, dv[3] + nb, nb);
}

TGT static inline __attribute__((always_inline)) void dot1(const qw_row *row, const uint8_t *const *xs, float *out,
                                                           const int is_signed, const int has_isc) {
    const int64_t k = row->k, nb = k / QX_BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    const float *dv0 = (const float *)(xs[0] + k);
    __m256 a0 = _mm256_setzero_ps();
    float sc[1][SB] __attribute__((aligned(32)));
    for (int64_t b0 = 0; b0 < nb; b0 += SB) {
        const int64_t np = nb - b0 < SB ? nb - b0 : SB;
        block_scales(row->fw, dv0, b0, np, sc[0]);
        for (int64_t b = 0; b < np; b++) {
            BLOCK_SETUP
            ACC(a0, 0);
        }
    }
    out[0] = hsum(a0) + corr_dot(row->cw, dv0 + nb, nb);
}

/* Token groups of 4 outermost: their activations stay in L1 while the nr unpacked rows pass. */
TGT static inline __attribute__((always_inline)) void dot_rows(const qw_row *rows, int64_t nr, const uint8_t *xq,
                                                               int64_t qrow, int64_t nt, float *y, int64_t ys,
                                                               int accumulate, const int is_signed,
                                                               const int has_isc) {
    float v[4];
    for (int64_t i = 0; i < nt;) {
        const int n = nt - i >= 4 ? 4 : 1;
        const uint8_t *xs[4] = {xq + i * qrow, xq + (i + 1) * qrow, xq + (i + 2) * qrow, xq + (i + 3) * qrow};
        for (int64_t r = 0; r < nr; r++) {
            if (n == 4)
                dot4(&rows[r], xs, v, is_signed, has_isc);
            else
                dot1(&rows[r], xs, v, is_signed, has_isc);
            for (int l = 0; l < n; l++) {
                float *yo = y + (i + l) * ys + r;
                *yo = v[l] + (accumulate ? *yo : 0.0f);
            }
        }
        i += n;
    }
}

TGT static void dot_u(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                      int64_t ys, int accumulate) {
    dot_rows(rows, nr, xq, qrow, nt, y, ys, accumulate, 0, 0);
}

TGT static void dot_s(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                      int64_t ys, int accumulate) {
    dot_rows(rows, nr, xq, qrow, nt, y, ys, accumulate, 1, 0);
}

TGT static void dot_s_isc(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                          int64_t ys, int accumulate) {
    dot_rows(rows, nr, xq, qrow, nt, y, ys, accumulate, 1, 1);
}

TGT void fic_qdot_dot_avx2(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                           int64_t ys, int accumulate) {
    if (rows[0].isc != NULL)
        dot_s_isc(rows, nr, xq, qrow, nt, y, ys, accumulate);
    else if (rows[0].is_signed)
        dot_s(rows, nr, xq, qrow, nt, y, ys, accumulate);
    else
        dot_u(rows, nr, xq, qrow, nt, y, ys, accumulate);
}

/* ---- Q1_0's own path (qdot.h, Q1X_*): rows read as they are, tokens in groups sharing each
 * block's 0/1 expansion ----------------------------------------------------------------------- */

/* x -> the permuted layout: the common quantizer (bit-identical q and d), then per block the
 * 16 x 8 bytes transposed so plane j (bit j of the 16 sign bytes) is vector j / 2, half j % 2. */
TGT void fic_q1x_quantize_avx2(const float *x, int64_t k, uint8_t *dst) {
    uint8_t tmp[QX_ROW_BYTES(128)] __attribute__((aligned(32)));
    for (int64_t b = 0; b < k / 128; b++) {
        fic_qdot_quantize_avx2(x + b * 128, 128, tmp);
        const float *dv = (const float *)(tmp + 128), *sv = dv + 4;
        uint8_t *out = dst + b * Q1X_BLOCK_BYTES;
        q1_sign_planes(tmp, out);
        const __m128 d4 = _mm_loadu_ps(dv), s4 = _mm_loadu_ps(sv);
        const __m128 a4 = _mm_add_ps(d4, d4), c4 = _mm_sub_ps(_mm_setzero_ps(), s4);
        _mm256_storeu_ps((float *)(out + 128), _mm256_set_m128(a4, a4));
        _mm256_storeu_ps((float *)(out + 160), _mm256_set_m128(_mm_setzero_ps(), c4));
    }
}

#define Q1_ROWS 8 /* rows per transposed reduction (hsum8_avx2) */
#define Q1_NT 6 /* tokens per pass: 4 weight vectors + 6 accumulators + temporaries fit 16 ymm (8 spilled
                     * two accumulators: 62-70 against 70-74 us/token, 2048 x 2048, T 256, 1 thread) */

/* One row times NT tokens: per block the sign bytes become four 0/1 vectors once (nibble
 * lookups), then per token 4 maddubs (x straight from memory), 3 int16 adds, 1 madd, 1 convert
 * and 2 FMAs, against 16 FMAs per token for float weights. Token t's 8 partial sums go to
 * acc[t * Q1_ROWS], unreduced: the caller reduces Q1_ROWS rows at once. */
TGT static inline __attribute__((always_inline)) void q1_row_tokens(const uint8_t *row, int64_t nb, const uint8_t *xq,
                                                                    int64_t qrow, __m256 *out, const int nt) {
    const __m256i lut01 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                           0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);
    const __m256i lut23 = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1,
                                           0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i m4 = _mm256_set1_epi8(15), one16 = _mm256_set1_epi16(1);
    __m256 acc[Q1_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 18;
        const __m256i bb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
        const __m256i lo = _mm256_and_si256(bb, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bb, 4), m4);
        const __m256i w0 = _mm256_shuffle_epi8(lut01, lo), w1 = _mm256_shuffle_epi8(lut23, lo);
        const __m256i w2 = _mm256_shuffle_epi8(lut01, hi), w3 = _mm256_shuffle_epi8(lut23, hi);
        uint16_t dh;
        memcpy(&dh, blk, 2);
        const __m256 dw = _mm256_set1_ps(_cvtsh_ss(dh));
        const uint8_t *xb = xq + b * Q1X_BLOCK_BYTES;
        for (int t = 0; t < nt; t++) {
            const uint8_t *xt = xb + t * qrow;
            const __m256i s0 = _mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)xt));
            const __m256i s1 = _mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(xt + 32)));
            const __m256i s2 = _mm256_maddubs_epi16(w2, _mm256_loadu_si256((const __m256i *)(xt + 64)));
            const __m256i s3 = _mm256_maddubs_epi16(w3, _mm256_loadu_si256((const __m256i *)(xt + 96)));
            const __m256i h = _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3)), one16);
            const __m256 p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_loadu_ps((const float *)(xt + 128)),
                                             _mm256_loadu_ps((const float *)(xt + 160)));
            acc[t] = _mm256_fmadd_ps(dw, p, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t * Q1_ROWS] = acc[t];
}

/* Rows r0..r0 + nr (nr <= Q1_ROWS) times n tokens into y: each row's partial sums, then one
 * transposed reduction per token for all the rows (hsum8_avx2; missing rows are zeros, so a row's
 * value does not depend on its group). One reduction per row and token ended every row before:
 * with experts of one block (the fixed-point down rows) it cost as much as the block's products. */
TGT static void q1_rows_tokens(const uint8_t *w, int64_t rb, int64_t nr, int64_t nb, const uint8_t *xq, int64_t qrow,
                               int64_t n, float *y, int64_t ys, int accumulate) {
    __m256 acc[Q1_NT * Q1_ROWS];
    for (int64_t r = 0; r < nr; r++) {
        switch (n) {
        case 6: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 6); break;
        case 5: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 5); break;
        case 4: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 4); break;
        case 3: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 3); break;
        case 2: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 2); break;
        default: q1_row_tokens(w + r * rb, nb, xq, qrow, acc + r, 1); break;
        }
    }
    for (int64_t t = 0; t < n; t++) {
        for (int64_t r = nr; r < Q1_ROWS; r++) acc[t * Q1_ROWS + r] = _mm256_setzero_ps();
        __m256 s = hsum8_avx2(acc + t * Q1_ROWS);
        float *yt = y + t * ys;
        if (nr == Q1_ROWS) {
            if (accumulate) s = _mm256_add_ps(s, _mm256_loadu_ps(yt));
            _mm256_storeu_ps(yt, s);
        } else {
            float sums[Q1_ROWS];
            _mm256_storeu_ps(sums, s);
            for (int64_t r = 0; r < nr; r++) yt[r] = sums[r] + (accumulate ? yt[r] : 0.0f);
        }
    }
}

/* Token groups outermost: a group's activations (NT x k x 1.5 bytes) stay in L1/L2 while the
 * nr rows (k / 128 x 18 bytes each) pass. */
TGT void fic_q1_dot_avx2(const uint8_t *w, int64_t rb, int64_t nr, int64_t k, const uint8_t *xq, int64_t qrow,
                         int64_t nt, float *y, int64_t ys, int accumulate) {
    const int64_t nb = k / 128;
    for (int64_t i = 0; i < nt; i += Q1_NT) {
        const int64_t n = nt - i < Q1_NT ? nt - i : Q1_NT;
        for (int64_t r = 0; r < nr; r += Q1_ROWS)
            q1_rows_tokens(w + r * rb, rb, nr - r < Q1_ROWS ? nr - r : Q1_ROWS, nb, xq + i * qrow, qrow, n,
                           y + i * ys + r, ys, accumulate);
    }
}

#endif /* __x86_64__ */
