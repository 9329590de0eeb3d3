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
        if (nr == 1 && j->stream_pf) stream_prefetch(row + b * stride, 8 * (int)stride);
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
        if (nr == 1 && j->stream_pf) stream_prefetch(row + b * sizeof(block_q4_K), (int)sizeof(block_q4_K));
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

/* Super-block b of x as q6k_step takes it: x[c] (chunk c's int8), neg32[c] (-32 sum of each lane's
 * 4 xq: the values' offset, any row) and dxc[c] (its lanes' dx). */
TGT static ALWAYS_INLINE void q6k_x(const job_t *j, int64_t b, __m512i x[4], __m512i neg32[4], __m512 dxc[4]) {
    const __m512 dx = _mm512_castps256_ps512(_mm256_loadu_ps(j->xscale16 + 8 * b));
    for (int c = 0; c < 4; c++) {
        x[c] = _mm512_loadu_si512((const void *)(j->xq + QK_K * b + 64 * c));
        neg32[c] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(32), x[c]));
        dxc[c] = _mm512_permutexvar_ps(pair_index(c), dx);
    }
}

/* y[i] = row i . x for nr (1 or 2) rows rb bytes apart, k a multiple of 256. */
TGT static ALWAYS_INLINE void q6k_rows(const job_t *j, const uint8_t *row, int64_t rb, int nr, float *y) {
    const int64_t nsb = j->k / QK_K;
    row_acc r0, r1;
    acc_init(&r0);
    acc_init(&r1);
    for (int64_t b = 0; b < nsb; b++) {
        __m512i x[4], neg32[4];
        __m512 dxc[4];
        q6k_x(j, b, x, neg32, dxc);
        if (nr == 1 && j->stream_pf) stream_prefetch(row + b * sizeof(block_q6_K), (int)sizeof(block_q6_K));
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

/* Down pieces of 64 weights, 16 rows (nr <= 16) at w, consecutive (68 bytes a row): a dense model's
 * 64-neuron experts in Q8_0 (the K-quant files' requantized ffn_down). Each row's 64 bytes loaded
 * from its byte 4 (block 0's weights 2..31, block 1's d, block 1's weights) against x arranged to
 * match (x0[2..31], 0, 0, x1), one vpdpbusd; block 0's first two weights come with the d's gather
 * (each block's first dword: d and two weights). The 16 rows' lanes are summed in integers by one
 * tree (unpack and add twice, then 128-bit lanes), block by block; the float step is then per lane:
 * (d dx) S - 128 d s per row and block, the two blocks added. A row's bits do not depend on nr or
 * on the rows beside it. */
TGT static ALWAYS_INLINE void q8_0_rows16_k64(const job_t *j, const uint8_t *w, int nr, float *out) {
    const __m512i bias = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    const __m512i xm = _mm512_mask_loadu_epi8(_mm512_maskz_loadu_epi8((__mmask64)0x3FFFFFFFull, j->xq + 2),
                                              (__mmask64)0xFFFFFFFF00000000ull, j->xq);
    uint32_t e;
    memcpy(&e, j->xq, 4); /* x0[0], x0[1] in the bytes of the gathered dwords' weights */
    const __m512i xe = _mm512_maskz_set1_epi32((__mmask16)0x0F0F, (int)(e << 16));
    __m512i p[16];
    for (int i = 0; i < 16; i++)
        p[i] = i < nr ? _mm512_dpbusd_epi32(z, _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + 68 * i + 4)), bias), xm)
                      : z;
    __m512i u[4];
    for (int m = 0; m < 4; m++) {
        const __m512i a = p[4 * m], b = p[4 * m + 1], c = p[4 * m + 2], d = p[4 * m + 3];
        const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        u[m] = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    }
    /* lane 4 g + r of half h: g even block 0, odd block 1, of row 8 h + 4 (g / 2) + r */
    const __m512i at = _mm512_setr_epi32(0, 68, 136, 204, 34, 102, 170, 238, 272, 340, 408, 476, 306, 374, 442, 510);
    uint64_t dx2, s2;
    memcpy(&dx2, j->xscale16, 8);
    memcpy(&s2, j->xcorr16, 8);
    const __m512 dxs = _mm512_castsi512_ps(_mm512_set1_epi64((long long)dx2)), ss = _mm512_castsi512_ps(_mm512_set1_epi64((long long)s2));
    const __m512i pat = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512 dxp = _mm512_permutexvar_ps(pat, dxs), nsp = _mm512_mul_ps(_mm512_set1_ps(-128.0f), _mm512_permutexvar_ps(pat, ss));
    __m512 r[2];
    for (int h = 0; h < 2; h++) {
        const int rows = nr - 8 * h < 0 ? 0 : nr - 8 * h > 8 ? 8 : nr - 8 * h;
        const __mmask16 live = (__mmask16)((rows >= 4 ? 0x00FF : (0x0011 * ((1u << rows) - 1))) |
                                           (rows > 4 ? (0x0011 * ((1u << (rows - 4)) - 1)) << 8 : 0));
        const __m512i g = _mm512_mask_i32gather_epi32(z, live, at, (const int *)(w + 544 * h), 1);
        __m512i s = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * h], u[2 * h + 1], 0x88),
                                     _mm512_shuffle_i32x4(u[2 * h], u[2 * h + 1], 0xDD));
        s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(g, bias), xe);
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, dxp), _mm512_mul_ps(d, nsp));
        r[h] = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1)); /* rows' two blocks: lanes 0-3, 8-11 */
    }
    const __m512i pick = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    float all[16];
    _mm512_storeu_ps(all, _mm512_permutex2var_ps(r[0], pick, r[1]));
    for (int i = 0; i < nr; i++) out[i] = all[i];
}

/* Down pieces of one K-quant super-block (a 256-neuron expert: 144 or 210 bytes a row), 16 rows
 * (nr <= 16) at w, consecutive: x's 256 int8 and its scales loaded once for the 16; each row's step
 * leaves 16 lanes of float sums, and one tree over the rows (pairs by unpack, then 128-bit lanes)
 * sums every row's lanes at once instead of a horizontal sum per row. A row's bits do not depend on
 * nr or on the rows beside it (its lanes are added in the same order whichever rows are live). */
TGT static ALWAYS_INLINE __m512 kq_row_lanes(const int fmt, const uint8_t *blk, const __m512i x[4],
                                             const __m256 dx8, const __m256 s8, const __m512i neg32[4],
                                             const __m512 dxc[4]) {
    row_acc r;
    acc_init(&r);
    if (fmt == FIC_Q4_K) {
        q4k_step((const block_q4_K *)blk, x, dx8, s8, &r);
        return _mm512_sub_ps(_mm512_add_ps(r.a0, r.a1), _mm512_zextps256_ps512(r.off));
    }
    q6k_step((const block_q6_K *)blk, x, neg32, dxc, &r);
    return _mm512_add_ps(r.a0, r.a1);
}

TGT static ALWAYS_INLINE __m512 pair_tree(__m512 a, __m512 b) { /* per 128-bit lane: a, b, a, b */
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

TGT static ALWAYS_INLINE void kq_rows16_k256(const int fmt, const job_t *j, const uint8_t *w, int64_t rb, int nr,
                                             float *out) {
    const __m256 dx8 = _mm256_loadu_ps(j->xscale16), s8 = _mm256_loadu_ps(j->xcorr16);
    __m512i x[4], neg32[4]; /* Q4_K uses x only (the other two unused, left to the compiler) */
    __m512 dxc[4];
    q6k_x(j, 0, x, neg32, dxc);
    __m512 quad[4]; /* rows 4 m .. 4 m + 3: per 128-bit lane, their partial sums in order */
    for (int m = 0; m < 4; m++) {
        __m512 v[4];
        for (int i = 0; i < 4; i++)
            v[i] = 4 * m + i < nr ? kq_row_lanes(fmt, w + (4 * m + i) * rb, x, dx8, s8, neg32, dxc) : _mm512_setzero_ps();
        const __m512 a = pair_tree(v[0], v[1]), b = pair_tree(v[2], v[3]);
        quad[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
    }
    const __m512 h0 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    const __m512 h1 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    const __m512 all = _mm512_add_ps(_mm512_shuffle_f32x4(h0, h1, 0x88), _mm512_shuffle_f32x4(h0, h1, 0xDD));
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << nr) - 1), all);
}

#define Q2_ROWS 16 /* output rows per step of the down columns (two of P2_ROWS: fixed calls' chunks) */

/* The rows two steps past r of a down piece (w: its row 0, rb bytes a row), as far as r1, into L2
 * (locality 1: one stream per expert; 1.01-1.07x over every level, ab_core ffn). */
TGT static ALWAYS_INLINE void down_prefetch(const uint8_t *w, int64_t rb, int64_t r, int64_t r1) {
    const int64_t pf_r = r + 2 * Q2_ROWS;
    if (pf_r >= r1) return;
    const int64_t pf_bytes = (r1 - pf_r < Q2_ROWS ? r1 - pf_r : Q2_ROWS) * rb;
    for (int64_t o = 0; o < pf_bytes + 63; o += 64) __builtin_prefetch(w + pf_r * rb + o, 0, 1);
}

/* Rows [r, r + nr) of expert e's down piece against h_e, nr <= Q2_ROWS, into out. */
TGT static ALWAYS_INLINE void down_piece_vnni(const int fmt, const ffn_t *f, int64_t e, int64_t r, int nr, float *out) {
    const job_t *j = &f->jd[e];
    const int64_t rb = f->rb_d[e];
    const uint8_t *w = down_part(f, e) + r * rb;
    if (j->xq == NULL) {
        for (int i = 0; i < nr; i++) out[i] = dot_row(j, w + i * rb, j->x);
    } else if (fmt == FIC_Q8_0 && j->k == 2 * QK8_0) {
        q8_0_rows16_k64(j, w, nr, out);
    } else if (fmt != FIC_Q8_0 && j->k == QK_K) {
        kq_rows16_k256(fmt, j, w, rb, nr, out);
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
}

/* FFN phase 2 (columns), t = 1: output rows [r0, r1), Q2_ROWS at a time: each expert's row pieces
 * (prefetched two steps ahead) against h_e (int8 where prepared so, else the float dot), then into
 * the fixed-point sums (FIC_FFN_FIXED: each expert rounded on its own; experts outer) or into a float
 * sum per row over the experts (experts inner), added to y once. */
TGT static ALWAYS_INLINE int down_cols_vnni(const int fmt, const ffn_t *f, int64_t r0, int64_t r1) {
    if (f->acc != NULL) {
        /* fixed point: each expert's products rounded on their own, so experts may go outer (the
         * same steps and bits): each expert's rows [r0, r1) are one forward stream (ab_core ffn, mean
         * of 20 calls: 1.02-1.05x with K-quant down, 0.99-1.03x with 64-neuron Q8_0) */
        for (int64_t e = 0; e < f->n_experts; e++) {
            if (f->skip[e]) continue;
            const int64_t rb = f->rb_d[e];
            const uint8_t *w = down_part(f, e);
            for (int64_t r = r0; r < r1; r += Q2_ROWS) {
                const int nr = r1 - r < Q2_ROWS ? (int)(r1 - r) : Q2_ROWS;
                down_prefetch(w, rb, r, r1);
                float out[Q2_ROWS];
                down_piece_vnni(fmt, f, e, r, nr, out);
                fixed_add(f->kt, out, f->acc + r, nr);
            }
        }
        return 1;
    }
    for (int64_t r = r0; r < r1; r += Q2_ROWS) { /* float y: a sum per row over the experts, in order */
        const int nr = r1 - r < Q2_ROWS ? (int)(r1 - r) : Q2_ROWS;
        float total[Q2_ROWS] = {0};
        for (int64_t e = 0; e < f->n_experts; e++) {
            if (f->skip[e]) continue;
            down_prefetch(down_part(f, e), f->rb_d[e], r, r1);
            float out[Q2_ROWS];
            down_piece_vnni(fmt, f, e, r, nr, out);
            for (int i = 0; i < nr; i++) total[i] += out[i];
        }
        for (int i = 0; i < nr; i++) f->y[r + i] += total[i];
    }
    return 1;
}

TGT int kern_vnni_down_q8_0(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q8_0, f, r0, r1); }
TGT int kern_vnni_down_q4_K(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q4_K, f, r0, r1); }
TGT int kern_vnni_down_q6_K(const ffn_t *f, int64_t r0, int64_t r1) { return down_cols_vnni(FIC_Q6_K, f, r0, r1); }

#endif /* FIC_X86 */
