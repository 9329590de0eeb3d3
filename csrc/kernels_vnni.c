/* kernels_vnni.c - x86-64 AVX-512 VNNI decode kernels for the formats whose x is prepared as
 * qdot.h's activation row (XP_Q8: int8 q8 blocks of 32, d and d sum(q) per block): Q8_0, Q4_K and
 * Q6_K, the formats of the Q4_K_M files people download. The AVX-512 VNNI tables
 * (kernels_avx512.c) point their dot, dot2 and down_cols entries here; without VNNI those formats
 * keep the AVX2 int8 code.
 *
 * One vpdpbusd (u8 weights x s8 activations, four products into each int32 lane) replaces the
 * AVX2 code's maddubs + madd pair, on 64 weights at once: lanes 0-7 are one q8 block of x, lanes
 * 8-15 the next, so a block's lanes share one float factor.
 *  - Q8_0's signed weights are biased to u8 (w xor 0x80 = w + 128); the bias's share, 128 d_w dx
 *    sum(xq) = 128 d_w s per block, is subtracted once a row (as Q4_0's -8 on VNNI).
 *  - Q4_K: one 32-byte load of nibbles is two sub-blocks (low nibbles, then high), the two q8
 *    blocks of x that follow each other; a lane's factor is d sc dx, its offset dmin m s as on AVX2.
 *  - Q6_K: its 6-bit values (0..63) are u8 as they are; the -32 is started in the accumulator
 *    (-32 sum of the lane's 4 xq, the same for every row: computed once per super-block and call
 *    of up to two rows), its 16-weight sub-blocks' scales spread over their 4 lanes by vpermps.
 * Integer sums are exact; the float steps differ in order from the AVX2 code, within the same
 * bounds (tests/test_kernels.py). Rows go two at a time where matvec and FFN phase 1 pair them
 * (dot2), sharing x's loads. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(FIC_X86)
#include <immintrin.h>

#define TGT TGT_AVX512VNNI

TGT static inline float h2f_vnni(fic_half h) { return _cvtsh_ss(h); }

/* Lanes 0-7 take lane 2c of an 8-float vector, lanes 8-15 lane 2c + 1: the factors of the two q8
 * blocks (or Q4_K sub-blocks) in 64-weight chunk c of a super-block. */
TGT static inline __m512i pair_index(int c) {
    return _mm512_inserti64x4(_mm512_set1_epi32(2 * c), _mm256_set1_epi32(2 * c + 1), 1);
}

TGT static inline float reduce8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* ---- Q8_0 ----------------------------------------------------------------------------------- */

/* 64 weights of two consecutive Q8_0 blocks at blk (their qs at 2 and 36) as u8 (w + 128). */
TGT static ALWAYS_INLINE __m512i q8_pair_u8(const uint8_t *blk) {
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(blk + 2))),
                                         _mm256_loadu_si256((const __m256i *)(blk + 36)), 1);
    return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
}

/* The d of 8 consecutive Q8_0 blocks at blk, as floats (one gather of their first dwords). */
TGT static ALWAYS_INLINE __m256 q8_d8(const uint8_t *blk) {
    const __m256i off = _mm256_setr_epi32(0, 34, 68, 102, 136, 170, 204, 238);
    const __m256i dw = _mm256_i32gather_epi32((const int *)blk, off, 1);
    return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dw));
}

/* One row's accumulators: two of 16 lanes (a chain each), and 8 lanes for the offsets (Q8_0: d_w s
 * per block; Q4_K: dmin m s per sub-block), a float for Q8_0's last blocks' offsets. A struct per
 * row, so the two rows of a pair stay in registers (arrays indexed by the row went to the stack). */
typedef struct {
    __m512 a0, a1;
    __m256 off;
    float tail_off;
} row_acc;

TGT static ALWAYS_INLINE void acc_init(row_acc *r) {
    r->a0 = r->a1 = _mm512_setzero_ps();
    r->off = _mm256_setzero_ps();
    r->tail_off = 0.0f;
}

/* Eight Q8_0 blocks (256 weights) of one row at blk against x (x0..x3: its 4 x 64 int8), dx8 and s8
 * their scales and sums. */
TGT static ALWAYS_INLINE void q8_0_step8(const uint8_t *blk, const __m512i x[4], __m256 dx8, __m256 s8, row_acc *r) {
    const int64_t stride = sizeof(block_q8_0);
    const __m256 dw = q8_d8(blk);
    const __m512 f = _mm512_castps256_ps512(_mm256_mul_ps(dw, dx8));
    r->off = _mm256_fmadd_ps(dw, s8, r->off);
    const __m512i z = _mm512_setzero_si512();
    const __m512i p0 = _mm512_dpbusd_epi32(z, q8_pair_u8(blk), x[0]);
    const __m512i p1 = _mm512_dpbusd_epi32(z, q8_pair_u8(blk + 2 * stride), x[1]);
    const __m512i p2 = _mm512_dpbusd_epi32(z, q8_pair_u8(blk + 4 * stride), x[2]);
    const __m512i p3 = _mm512_dpbusd_epi32(z, q8_pair_u8(blk + 6 * stride), x[3]);
    r->a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(pair_index(0), f), r->a0);
    r->a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(pair_index(1), f), r->a1);
    r->a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), _mm512_permutexvar_ps(pair_index(2), f), r->a0);
    r->a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p3), _mm512_permutexvar_ps(pair_index(3), f), r->a1);
}

/* One Q8_0 block (32 weights, the last k % 256) of one row. */
TGT static ALWAYS_INLINE void q8_0_step1(const uint8_t *blk, __m256i x, float dx, float sx, row_acc *r) {
    fic_half h;
    memcpy(&h, blk, 2);
    const float d = h2f_vnni(h);
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80));
    const __m256 p = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x));
    r->a0 = _mm512_add_ps(r->a0, _mm512_zextps256_ps512(_mm256_mul_ps(p, _mm256_set1_ps(d * dx))));
    r->tail_off += d * sx;
}

/* y[i] = row i . x for nr (1 or 2) rows rb bytes apart. */
TGT static ALWAYS_INLINE void q8_0_rows(const job_t *j, const uint8_t *row, int64_t rb, int nr, float *y) {
    const int64_t nb = j->k / QK8_0, stride = sizeof(block_q8_0);
    row_acc r0, r1;
    acc_init(&r0);
    acc_init(&r1);
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const __m256 dx8 = _mm256_loadu_ps(j->xscale16 + b), s8 = _mm256_loadu_ps(j->xcorr16 + b);
        __m512i x[4];
        for (int c = 0; c < 4; c++) x[c] = _mm512_loadu_si512((const void *)(j->xq + 32 * b + 64 * c));
        q8_0_step8(row + b * stride, x, dx8, s8, &r0);
        if (nr == 2) q8_0_step8(row + rb + b * stride, x, dx8, s8, &r1);
    }
    for (; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(j->xq + 32 * b));
        q8_0_step1(row + b * stride, x, j->xscale16[b], j->xcorr16[b], &r0);
        if (nr == 2) q8_0_step1(row + rb + b * stride, x, j->xscale16[b], j->xcorr16[b], &r1);
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(r0.a0, r0.a1)) - 128.0f * (reduce8(r0.off) + r0.tail_off);
    if (nr == 2) y[1] = _mm512_reduce_add_ps(_mm512_add_ps(r1.a0, r1.a1)) - 128.0f * (reduce8(r1.off) + r1.tail_off);
}

/* Down pieces of 64 weights (two Q8_0 blocks: a dense model's 64-neuron experts), rows [0, nr) at
 * w, consecutive (68 bytes a row), nr <= P2_ROWS, into out: the 2 nr block scales in one masked
 * gather, each row's 64 products in one vpdpbusd, eight rows reduced by one tree. A row's bits do
 * not depend on nr (every step is per lane; the tree sums each row in one fixed order). */
TGT static ALWAYS_INLINE void q8_0_rows_k64(const job_t *j, const uint8_t *w, int nr, float *out) {
    const __m512i x = _mm512_loadu_si512((const void *)j->xq);
    /* lane m = 2 i + b: row i's block b, 34 m bytes on */
    const __m512i at = _mm512_setr_epi32(0, 34, 68, 102, 136, 170, 204, 238, 272, 306, 340, 374, 408, 442, 476, 510);
    const __mmask16 live = (__mmask16)((1u << (2 * nr)) - 1);
    const __m512i dw32 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, (const int *)w, 1);
    const __m512 d16 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw32));
    uint64_t dx2, s2; /* x's two blocks: dx and s, repeated in lanes m % 2 */
    memcpy(&dx2, j->xscale16, 8);
    memcpy(&s2, j->xcorr16, 8);
    const __m512 dxi = _mm512_castsi512_ps(_mm512_set1_epi64((long long)dx2));
    const __m512 si = _mm512_castsi512_ps(_mm512_set1_epi64((long long)s2));
    const __m512 f16 = _mm512_mul_ps(d16, dxi), c16 = _mm512_mul_ps(d16, si);
    __m256 h[P2_ROWS];
    for (int i = 0; i < P2_ROWS; i++) {
        if (i >= nr) {
            h[i] = _mm256_setzero_ps();
            continue;
        }
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q8_pair_u8(w + i * 2 * sizeof(block_q8_0)), x);
        const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(2 * i), _mm256_set1_epi32(2 * i + 1), 1);
        const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, f16));
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    }
    /* per row: its 8 lanes summed in one tree, minus 128 (d_0 s_0 + d_1 s_1) */
    const __m256 a0 = _mm256_hadd_ps(h[0], h[1]), a1 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 a2 = _mm256_hadd_ps(h[4], h[5]), a3 = _mm256_hadd_ps(h[6], h[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256 corr = _mm256_add_ps(_mm512_castps512_ps256(_mm512_permutexvar_ps(even, c16)),
                                      _mm512_castps512_ps256(_mm512_permutexvar_ps(odd, c16)));
    float all[P2_ROWS];
    _mm256_storeu_ps(all, _mm256_fnmadd_ps(_mm256_set1_ps(128.0f), corr, sums));
    for (int i = 0; i < nr; i++) out[i] = all[i];
}

/* ---- Q4_K ----------------------------------------------------------------------------------- */

/* One super-block of one row against x's 256 int8 (x[c]: chunk c), dx8 and s8. */
TGT static ALWAYS_INLINE void q4k_step(const block_q4_K *blk, const __m512i x[4], __m256 dx8, __m256 s8, row_acc *r) {
    const __m512i m4 = _mm512_set1_epi8(15), shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
    uint64_t sc, mn;
    q4k_scales_mins_u64(blk->scales, &sc, &mn);
    const __m256 scv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
    const __m256 mv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)));
    /* (d sc) dx per sub-block, as the AVX2 code rounds it; dmin m s into 8 lanes */
    const __m512 f = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(h2f_vnni(blk->d)), scv), dx8));
    r->off = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(h2f_vnni(blk->dmin)), mv), s8, r->off);
    for (int c = 0; c < 4; c++) {
        /* 32 bytes in both halves; the high half shifted by 4: sub-blocks 2c and 2c + 1 */
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c)));
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi64(v, shift), m4);
        const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x[c]));
        const __m512 fc = _mm512_permutexvar_ps(pair_index(c), f);
        if (c & 1)
            r->a1 = _mm512_fmadd_ps(p, fc, r->a1);
        else
            r->a0 = _mm512_fmadd_ps(p, fc, r->a0);
    }
}

/* y[i] = row i . x for nr (1 or 2) rows rb bytes apart, k a multiple of 256. */
TGT static ALWAYS_INLINE void q4k_rows(const job_t *j, const uint8_t *row, int64_t rb, int nr, float *y) {
    const int64_t nsb = j->k / QK_K;
    row_acc r0, r1;
    acc_init(&r0);
    acc_init(&r1);
    for (int64_t b = 0; b < nsb; b++) {
        const __m256 dx8 = _mm256_loadu_ps(j->xscale16 + 8 * b), s8 = _mm256_loadu_ps(j->xcorr16 + 8 * b);
        __m512i x[4];
        for (int c = 0; c < 4; c++) x[c] = _mm512_loadu_si512((const void *)(j->xq + QK_K * b + 64 * c));
        q4k_step((const block_q4_K *)row + b, x, dx8, s8, &r0);
        if (nr == 2) q4k_step((const block_q4_K *)(row + rb) + b, x, dx8, s8, &r1);
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(r0.a0, r0.a1)) - reduce8(r0.off);
    if (nr == 2) y[1] = _mm512_reduce_add_ps(_mm512_add_ps(r1.a0, r1.a1)) - reduce8(r1.off);
}

/* ---- Q6_K ----------------------------------------------------------------------------------- */

/* Lane l takes lane 4c + l / 4 of a 16-float vector: the scales of chunk c's four sub-blocks. */
TGT static inline __m512i quad_index(int c) {
    return _mm512_add_epi32(_mm512_set1_epi32(4 * c),
                            _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2));
}

/* One super-block of one row. Chunk c (64 weights) of a super-block: c = 2 h (low nibbles of
 * ql[64 h..]) or 2 h + 1 (high nibbles), each with two bits of qh[32 h..] per byte (bits 0-1 / 2-3
 * for chunk 2 h's two halves, 4-5 / 6-7 for 2 h + 1). x[c], neg32[c], dxc[c]: chunk c's int8 x, its
 * -32 sum per lane, and its lanes' dx. */
TGT static ALWAYS_INLINE void q6k_step(const block_q6_K *blk, const __m512i x[4], const __m512i neg32[4],
                                       const __m512 dxc[4], row_acc *r) {
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    const __m512i up = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2), down = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    const __m512 g = _mm512_mul_ps(_mm512_set1_ps(h2f_vnni(blk->d)),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)blk->scales))));
    for (int h = 0; h < 2; h++) {
        const __m512i l = _mm512_loadu_si512((const void *)(blk->ql + 64 * h));
        const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h)));
        /* (l & 15) | (hi & 0x30): vpternlog 0xF8 is a | (b & c) with a = hi, b = l, c = 15 */
        const __m512i q0 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_sllv_epi64(hb, up), m30), l, m4, 0xF8);
        const __m512i q1 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srlv_epi64(hb, down), m30),
                                                     _mm512_srli_epi16(l, 4), m4, 0xF8);
        const __m512 p0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg32[2 * h], q0, x[2 * h]));
        const __m512 p1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg32[2 * h + 1], q1, x[2 * h + 1]));
        r->a0 = _mm512_fmadd_ps(_mm512_mul_ps(p0, dxc[2 * h]), _mm512_permutexvar_ps(quad_index(2 * h), g), r->a0);
        r->a1 = _mm512_fmadd_ps(_mm512_mul_ps(p1, dxc[2 * h + 1]), _mm512_permutexvar_ps(quad_index(2 * h + 1), g),
                                r->a1);
    }
}

/* y[i] = row i . x for nr (1 or 2) rows rb bytes apart, k a multiple of 256. */
TGT static ALWAYS_INLINE void q6k_rows(const job_t *j, const uint8_t *row, int64_t rb, int nr, float *y) {
    const int64_t nsb = j->k / QK_K;
    row_acc r0, r1;
    acc_init(&r0);
    acc_init(&r1);
    for (int64_t b = 0; b < nsb; b++) {
        const __m512 dx = _mm512_castps256_ps512(_mm256_loadu_ps(j->xscale16 + 8 * b));
        __m512i x[4], neg32[4]; /* -32 sum of each lane's 4 xq: the values' offset, any row */
        __m512 dxc[4];
        for (int c = 0; c < 4; c++) {
            x[c] = _mm512_loadu_si512((const void *)(j->xq + QK_K * b + 64 * c));
            neg32[c] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(32), x[c]));
            dxc[c] = _mm512_permutexvar_ps(pair_index(c), dx);
        }
        q6k_step((const block_q6_K *)row + b, x, neg32, dxc, &r0);
        if (nr == 2) q6k_step((const block_q6_K *)(row + rb) + b, x, neg32, dxc, &r1);
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(r0.a0, r0.a1));
    if (nr == 2) y[1] = _mm512_reduce_add_ps(_mm512_add_ps(r1.a0, r1.a1));
}

/* ---- the table's entries ---------------------------------------------------------------------
 * dot and dot2 take the float path where x was not prepared as int8 (an exact request): the AVX2
 * kernels' own fallback. */

#define VNNI_FMT(name, ROWS)                                                                             \
    TGT float kern_vnni_dot_##name(const job_t *j, const uint8_t *row, const float *x) {                  \
        if (j->xq == NULL) return kern_q8x_dot_##name##_avx2(j, row, x);                                 \
        float y;                                                                                         \
        ROWS(j, row, 0, 1, &y);                                                                          \
        return y;                                                                                        \
    }                                                                                                    \
    TGT void kern_vnni_dot2_##name(const job_t *j, const uint8_t *row0, float *y) {                       \
        if (j->xq == NULL) { /* the table's own dot */                                                   \
            y[0] = dot_row(j, row0, j->x);                                                               \
            y[1] = dot_row(j, row0 + j->row_bytes, j->x);                                                \
            return;                                                                                      \
        }                                                                                                \
        ROWS(j, row0, j->row_bytes, 2, y);                                                               \
    }
VNNI_FMT(q8_0, q8_0_rows)
VNNI_FMT(q4_K, q4k_rows)
VNNI_FMT(q6_K, q6k_rows)
#undef VNNI_FMT

/* FFN phase 2 (columns), t = 1: output rows [r0, r1), P2_ROWS at a time; per expert its row pieces
 * against h_e (int8 where prepared so, else the float dot), then into the fixed-point sums
 * (FIC_FFN_FIXED: each expert rounded on its own, chunks starting at multiples of P2_ROWS) or into
 * a float accumulator per row, added to y once. */
TGT static ALWAYS_INLINE int down_cols_vnni(const int fmt, const ffn_t *f, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += P2_ROWS) {
        const int nr = r1 - r < P2_ROWS ? (int)(r1 - r) : P2_ROWS;
        float total[P2_ROWS] = {0};
        for (int64_t e = 0; e < f->n_experts; e++) {
            if (f->skip[e]) continue;
            const job_t *j = &f->jd[e];
            const int64_t rb = f->rb_d[e];
            const uint8_t *w = down_part(f, e) + r * rb;
            float out[P2_ROWS];
            p2_prefetch(w, rb, r, nr, r1);
            if (j->xq == NULL) {
                for (int i = 0; i < nr; i++) out[i] = dot_row(j, w + i * rb, j->x);
            } else if (fmt == FIC_Q8_0 && j->k == 2 * QK8_0) {
                q8_0_rows_k64(j, w, nr, out);
            } else {
                int i = 0;
                for (; i + 2 <= nr; i += 2) {
                    if (fmt == FIC_Q8_0) q8_0_rows(j, w + i * rb, rb, 2, out + i);
                    else if (fmt == FIC_Q4_K) q4k_rows(j, w + i * rb, rb, 2, out + i);
                    else q6k_rows(j, w + i * rb, rb, 2, out + i);
                }
                for (; i < nr; i++) {
                    if (fmt == FIC_Q8_0) q8_0_rows(j, w + i * rb, rb, 1, out + i);
                    else if (fmt == FIC_Q4_K) q4k_rows(j, w + i * rb, rb, 1, out + i);
                    else q6k_rows(j, w + i * rb, rb, 1, out + i);
                }
            }
            if (f->acc != NULL) {
                fixed_add(f->kt, out, f->acc + r, nr);
            } else {
                for (int i = 0; i < nr; i++) total[i] += out[i];
            }
        }
        if (f->acc == NULL)
            for (int i = 0; i < nr; i++) f->y[r + i] += total[i];
    }
    return 1;
}

TGT int kern_vnni_down_q8_0(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q8_0, f, r0, r1); }
TGT int kern_vnni_down_q4_K(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q4_K, f, r0, r1); }
TGT int kern_vnni_down_q6_K(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q6_K, f, r0, r1); }

#endif /* FIC_X86 */
