/* kernels_avx2.c - x86-64 AVX2 + FMA + F16C kernels (FIC_IMPL_AVX2) and their table. Every
 * function carries the target attribute: the file is built without -mavx2 and only reached through
 * fic_kernels_avx2 (or the AVX-512 tables, which reuse some of it) once pool.c has seen the CPU has
 * AVX2, FMA and F16C. Per format, the dot and dequantize functions are one always-inline body with
 * the format a constant (dot_avx2, deq_range_avx2), so each table entry is straight-line code. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(FIC_X86)
#include <immintrin.h>

#include "exp_avx2.h"
#include "hsum_avx2.h"
#include "q1_planes.h"

static inline int fic_fmt_bw(int fmt) {
    return fmt == FIC_F32 || fmt == FIC_F16 ? 1 : fmt == FIC_Q1_0 ? QK1_0 : fmt == FIC_Q4_K || fmt == FIC_Q6_K ? QK_K : 32;
}


TGT_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TGT_AVX2 static inline float h2f_f16c(fic_half h) { return _cvtsh_ss(h); }

/* 16 nibbles -> two vectors of 8 int32 each, for weights [0,8) and [8,16) of a half block. */
TGT_AVX2 static inline __m256 cvt8_lo(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
TGT_AVX2 static inline __m256 cvt8_hi(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

/* Q1_0 x int8 activations, with sum s xq = 2 sum_{bit set} xq - sum xq per q8 block of 32. Plane j
 * of a block is x at weights 8i + j (i = 0..15), i.e. under bit j of each of the block's 16 sign
 * bytes. x is stored (kern_quantize_x_avx2) as 8 vectors of 32 bytes per 128 weights, vector j =
 * plane j in both 128-bit lanes. One nibble lookup (pshufb: bit j % 4 of the index, as a 0/1 byte)
 * turns sign bytes into 0/1 bytes in x's order, and maddubs(0/1, xq) sums x where the bit is set;
 * byte i belongs to q8 block i / 4 in every plane, so the maddubs results add in int16 (at most
 * 8 x 254 per lane) and one madd gives per 128-bit lane the 4 q8 blocks' sums.
 * Two rows (dot2_q1_avx2) run in the two 128-bit lanes: row a's sign bytes in the low lane, row b's
 * in the high, so the madd holds [a's 4 sums | b's 4 sums] and the float tail (conversion, p = sum
 * 2 dx - dx sum(xq), acc += d p) runs once for both rows, with 4 blocks' d of both rows converted
 * together. One row (dot_q1_avx2): its low nibbles in the low lane, high in the high, against
 * [plane j | plane j + 4] gathered from the layout; the correction is added in the low lane only.
 * Measured (1 thread, 4096 x 4096 in L3, thread CPU time, best of 8 alternated, load 9): 7.1 GB/s
 * for two rows each in both lanes (planes 2t | 2t + 1, one tail per row), 7.9 GB/s for this; the
 * integer part alone runs at 11 GB/s, so the float tail is still a third of the time. A layout
 * with [plane j | plane j + 4] stored (one row without gathering, two blends more per pair) ran
 * the pair at 7.1. */
#define Q1_LUTS_AVX2                                                                                   \
    /* bit t of a nibble, as a byte, in both lanes */                                                  \
    const __m256i lut0 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,             \
                                          0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);            \
    const __m256i lut1 = _mm256_setr_epi8(0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1,             \
                                          0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);            \
    const __m256i lut2 = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1,             \
                                          0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);            \
    const __m256i lut3 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,             \
                                          0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)

/* Bytes of x per 128 weights in the layout above. */
#define Q1X_BYTES 256

TGT_AVX2 static inline __m256i q1_x_avx2(const job_t *j, int64_t b, int v) {
    return _mm256_loadu_si256((const __m256i *)(j->xq + b * Q1X_BYTES + 32 * v));
}

/* int16 sums over 4 planes: index vector idx against x vectors v0..v0 + 3 (v0 = 0: the low
 * nibbles' planes, v0 = 4: the high nibbles'). */
TGT_AVX2 static inline __m256i q1_planes4_avx2(const job_t *j, int64_t b, int v0, __m256i idx, __m256i lut0,
                                               __m256i lut1, __m256i lut2, __m256i lut3) {
    __m256i s0 = _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut0, idx), q1_x_avx2(j, b, v0));
    __m256i s1 = _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut1, idx), q1_x_avx2(j, b, v0 + 1));
    __m256i s2 = _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut2, idx), q1_x_avx2(j, b, v0 + 2));
    __m256i s3 = _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut3, idx), q1_x_avx2(j, b, v0 + 3));
    return _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
}

/* [a's 4 q8-block sums | b's], int32, of block b of rows pa and pb. */
TGT_AVX2 static inline __m256i q1_pair_sums_avx2(const job_t *j, const block_q1_0 *pa, const block_q1_0 *pb,
                                                 int64_t b, __m256i lut0, __m256i lut1, __m256i lut2,
                                                 __m256i lut3) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i v = _mm256_blend_epi32(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)pa->qs)),
                                         _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)pb->qs)), 0xF0);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    const __m256i s = _mm256_add_epi16(q1_planes4_avx2(j, b, 0, lo, lut0, lut1, lut2, lut3),
                                       q1_planes4_avx2(j, b, 4, hi, lut0, lut1, lut2, lut3));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

/* p = sums * 2 dx - dx sum(xq) for block b (8 lanes as the sums). */
TGT_AVX2 static inline __m256 q1_lane_values_avx2(const job_t *j, int64_t b, __m256i h) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_loadu_ps(j->xscale16 + 8 * b), _mm256_loadu_ps(j->xcorr16 + 8 * b));
}

/* Rows row0 and row0 + j->row_bytes against one x, in the two 128-bit lanes (see above). */
TGT_AVX2 static void dot2_q1_avx2(const job_t *j, const uint8_t *row0, float *y) {
    const block_q1_0 *ba = (const block_q1_0 *)row0, *bb = (const block_q1_0 *)(row0 + j->row_bytes);
    const int64_t nb = j->k / QK1_0;
    Q1_LUTS_AVX2;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        /* d of 4 blocks of both rows in one conversion: [da0 db0 da1 db1 ... db3], then per block
         * [da x4 | db x4] by one permutation */
        const uint64_t d01 = ba[b].d | (uint64_t)bb[b].d << 16 | (uint64_t)ba[b + 1].d << 32 | (uint64_t)bb[b + 1].d << 48;
        const uint64_t d23 = ba[b + 2].d | (uint64_t)bb[b + 2].d << 16 | (uint64_t)ba[b + 3].d << 32 | (uint64_t)bb[b + 3].d << 48;
        const __m256 dd = _mm256_cvtph_ps(_mm_set_epi64x((long long)d23, (long long)d01));
        __m256i sel = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (int u = 0; u < 4; u++) {
            const __m256 p = q1_lane_values_avx2(j, b + u, q1_pair_sums_avx2(j, ba + b + u, bb + b + u, b + u, lut0, lut1, lut2, lut3));
            const __m256 d = _mm256_permutevar8x32_ps(dd, sel);
            sel = _mm256_add_epi32(sel, _mm256_set1_epi32(2));
            if (u & 1) acc1 = _mm256_fmadd_ps(d, p, acc1);
            else acc0 = _mm256_fmadd_ps(d, p, acc0);
        }
    }
    for (; b < nb; b++) {
        const __m256 p = q1_lane_values_avx2(j, b, q1_pair_sums_avx2(j, ba + b, bb + b, b, lut0, lut1, lut2, lut3));
        const __m256 d = _mm256_set_m128(_mm_set1_ps(h2f_f16c(bb[b].d)), _mm_set1_ps(h2f_f16c(ba[b].d)));
        acc0 = _mm256_fmadd_ps(d, p, acc0);
    }
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 t = _mm_hadd_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)); /* [a01 a23 b01 b23] */
    t = _mm_hadd_ps(t, t);
    y[0] = _mm_cvtss_f32(t);
    y[1] = _mm_cvtss_f32(_mm_movehdup_ps(t));
}

/* [sums of block b | sums of block b + 1] of one row: the two blocks in the two lanes, x's vectors
 * blended from both blocks. */
TGT_AVX2 static inline __m256i q1_two_blocks_sums_avx2(const job_t *j, const block_q1_0 *blk, int64_t b, __m256i lut0,
                                                       __m256i lut1, __m256i lut2, __m256i lut3) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i v = _mm256_blend_epi32(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)blk[b].qs)),
                                         _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)blk[b + 1].qs)), 0xF0);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    const __m256i luts[4] = {lut0, lut1, lut2, lut3};
    __m256i s = _mm256_setzero_si256();
    for (int p = 0; p < 8; p++) {
        const __m256i x = _mm256_blend_epi32(q1_x_avx2(j, b, p), q1_x_avx2(j, b + 1, p), 0xF0);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_shuffle_epi8(luts[p & 3], p < 4 ? lo : hi), x));
    }
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

TGT_AVX2 static float dot_q1_avx2(const job_t *j, const uint8_t *row) {
    const block_q1_0 *blk = (const block_q1_0 *)row;
    const int64_t nb = j->k / QK1_0;
    Q1_LUTS_AVX2;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256 a = _mm256_blend_ps(_mm256_loadu_ps(j->xscale16 + 8 * b), _mm256_loadu_ps(j->xscale16 + 8 * b + 8), 0xF0);
        const __m256 c = _mm256_blend_ps(_mm256_loadu_ps(j->xcorr16 + 8 * b), _mm256_loadu_ps(j->xcorr16 + 8 * b + 8), 0xF0);
        const __m256 p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1_two_blocks_sums_avx2(j, blk, b, lut0, lut1, lut2, lut3)), a, c);
        const __m256 d = _mm256_set_m128(_mm_set1_ps(h2f_f16c(blk[b + 1].d)), _mm_set1_ps(h2f_f16c(blk[b].d)));
        /* two accumulators: the FMA chain's latency is not on the critical path */
        if (b & 2) acc1 = _mm256_fmadd_ps(d, p, acc1);
        else acc0 = _mm256_fmadd_ps(d, p, acc0);
    }
    float y = hsum256(_mm256_add_ps(acc0, acc1));
    if (b < nb) { /* an odd last block: as a pair of the row with itself, half of it */
        float y2[2];
        job_t one = *j;
        one.k = QK1_0;
        one.xq = j->xq + b * Q1X_BYTES;
        one.xscale16 = j->xscale16 + 8 * b;
        one.xcorr16 = j->xcorr16 + 8 * b;
        one.row_bytes = 0;
        dot2_q1_avx2(&one, (const uint8_t *)(blk + b), y2);
        y += y2[0];
    }
    return y;
}

/* Q1_0 in the r32 layout (q1r32.c): one pshufb looks up 32 rows' nibbles (lane 0 rows 0-15, lane 1
 * rows 16-31) in a 4-weight group's table (kern_q1r32_fn: the sums of l = x & 15, then of h = x >> 4
 * plus 32, each 0..60). Four groups' lookups add up in bytes (at most 240); one maddubs of the
 * interleaved L and H bytes by (2, 32) then gives 2 (L + 16 H) per row as int16, and the q8 block's
 * correction cx takes the bits' 0/1 and the bias off: the exact integer sum, four q8 blocks of it
 * added in int32, then the float scaling per Q1_0 block. About 9 vector operations per 128 weights
 * of a row (bench/RESULTS.md). The block 4 ahead is prefetched: one stream per thread, which the
 * hardware prefetcher alone follows too late on this CPU. */
#define Q1R32_PF_BLOCKS 4

/* Sign bytes i and i + 1 of 32 rows (four 4-weight groups): 2 (L + 16 H) added into A (rows 0-7 |
 * 16-23) and B (rows 8-15 | 24-31). */
TGT_AVX2 static inline void q1r32_two_bytes(const uint8_t *p, const uint8_t *t, int i, __m256i *A, __m256i *B) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256i L = _mm256_setzero_si256(), H = _mm256_setzero_si256();
    for (int j = i; j < i + 2; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 2 * Q1R32_ROWS + Q1R32_ROWS * j));
        const __m256i idx[2] = {_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)};
        for (int h = 0; h < 2; h++) {
            const uint8_t *tg = t + q1r32_tab_at(2 * j + h);
            L = _mm256_add_epi8(L, _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tg)), idx[h]));
            H = _mm256_add_epi8(H, _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tg + Q1R32_TAB_H))), idx[h]));
        }
    }
    const __m256i c = _mm256_set1_epi16(32 << 8 | 2); /* bytes (2, 32): 2 L + 32 H, at most 8,160 */
    *A = _mm256_add_epi16(*A, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(L, H), c));
    *B = _mm256_add_epi16(*B, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(L, H), c));
}

TGT_AVX2 void q1r32_avx2(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx, const float *dx, float *y,
                         int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        const uint8_t *p = w + g * nb * Q1R32_BLOCK_BYTES;
        const uint8_t *end = w + g1 * nb * Q1R32_BLOCK_BYTES;
        for (int64_t b = 0; b < nb; b++, p += Q1R32_BLOCK_BYTES) {
            const uint8_t *pf = p + Q1R32_PF_BLOCKS * Q1R32_BLOCK_BYTES;
            if (pf < end)
                for (int o = 0; o < Q1R32_BLOCK_BYTES; o += 64) FIC_PREFETCH(pf + o);
            __m256 d[4]; /* rows 0-7, 8-15, 16-23, 24-31 */
            for (int r = 0; r < 4; r++) d[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * r)));
            const uint8_t *t = tab + b * (QK1_0 / 4) * Q1R32_TAB_BYTES;
            __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                            _mm256_setzero_si256()};
            for (int q = 0; q < QK1_0 / 32; q++) { /* a q8 block in int16 (at most 8,160), then int32 */
                __m256i A = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_set1_epi16(cx[b * (QK1_0 / 32) + q])), B = A;
                q1r32_two_bytes(p, t, 4 * q, &A, &B);
                q1r32_two_bytes(p, t, 4 * q + 2, &A, &B);
                s[0] = _mm256_add_epi32(s[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(A)));
                s[1] = _mm256_add_epi32(s[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(B)));
                s[2] = _mm256_add_epi32(s[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(A, 1)));
                s[3] = _mm256_add_epi32(s[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(B, 1)));
            }
            const __m256 db = _mm256_set1_ps(dx[b]);
            for (int r = 0; r < 4; r++) acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d[r], db), _mm256_cvtepi32_ps(s[r]), acc[r]);
        }
        for (int r = 0; r < 4; r++) _mm256_storeu_ps(y + g * Q1R32_ROWS + 8 * r, acc[r]);
    }
}

/* 16 x 16 bytes transposed in each 128-bit lane: byte k of v[r] becomes byte r of v[k]. Four rounds
 * of unpacks, each pairing units twice as wide (bytes, 16, 32, 64 bits). */
TGT_AVX2 static void transpose16_lanes(__m256i v[16]) {
    __m256i a[16], b[16];
    for (int p = 0; p < 8; p++) { /* rows 2p, 2p+1: 16-bit units, a[2p] bytes 0-7, a[2p+1] bytes 8-15 */
        a[2 * p] = _mm256_unpacklo_epi8(v[2 * p], v[2 * p + 1]);
        a[2 * p + 1] = _mm256_unpackhi_epi8(v[2 * p], v[2 * p + 1]);
    }
    for (int q = 0; q < 4; q++) /* rows 4q..4q+3: b[4q + m] holds bytes 4m..4m+3 */
        for (int h = 0; h < 2; h++) {
            b[4 * q + 2 * h] = _mm256_unpacklo_epi16(a[4 * q + h], a[4 * q + 2 + h]);
            b[4 * q + 2 * h + 1] = _mm256_unpackhi_epi16(a[4 * q + h], a[4 * q + 2 + h]);
        }
    for (int o = 0; o < 2; o++) /* rows 8o..8o+7: a[8o + c] holds bytes 2c, 2c+1 */
        for (int m = 0; m < 4; m++) {
            a[8 * o + 2 * m] = _mm256_unpacklo_epi32(b[8 * o + m], b[8 * o + 4 + m]);
            a[8 * o + 2 * m + 1] = _mm256_unpackhi_epi32(b[8 * o + m], b[8 * o + 4 + m]);
        }
    for (int c = 0; c < 8; c++) { /* all 16 rows: v[k] holds byte k */
        v[2 * c] = _mm256_unpacklo_epi64(a[c], a[8 + c]);
        v[2 * c + 1] = _mm256_unpackhi_epi64(a[c], a[8 + c]);
    }
}

/* q1r32_move_ref's result: per block, rows r and r + 16 share a vector (a lane each), so one in-lane
 * 16 x 16 transpose turns 32 rows' 16 sign bytes into the block's 16 vectors of 32 rows, and back. */
TGT_AVX2 void q1r32_move_avx2(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32) {
    const int64_t bb = (int64_t)sizeof(block_q1_0), rb = nb * bb;
    const int half = Q1R32_ROWS / 2;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *g = (to_r32 ? to : from) + b * Q1R32_BLOCK_BYTES; /* the group's block */
        uint8_t *gw = to + b * Q1R32_BLOCK_BYTES;
        __m256i v[16];
        if (to_r32) {
            const uint8_t *rows = from + b * bb;
            for (int r = 0; r < half; r++) {
                memcpy(gw + 2 * r, rows + r * rb, 2);
                memcpy(gw + 2 * (r + half), rows + (r + half) * rb, 2);
                v[r] = _mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows + r * rb + 2))),
                    _mm_loadu_si128((const __m128i *)(rows + (r + half) * rb + 2)), 1);
            }
            transpose16_lanes(v);
            for (int j = 0; j < 16; j++) _mm256_storeu_si256((__m256i *)(gw + 2 * Q1R32_ROWS + Q1R32_ROWS * j), v[j]);
        } else {
            uint8_t *rows = to + b * bb;
            for (int j = 0; j < 16; j++) v[j] = _mm256_loadu_si256((const __m256i *)(g + 2 * Q1R32_ROWS + Q1R32_ROWS * j));
            transpose16_lanes(v);
            for (int r = 0; r < half; r++) {
                memcpy(rows + r * rb, g + 2 * r, 2);
                memcpy(rows + (r + half) * rb, g + 2 * (r + half), 2);
                _mm_storeu_si128((__m128i *)(rows + r * rb + 2), _mm256_castsi256_si128(v[r]));
                _mm_storeu_si128((__m128i *)(rows + (r + half) * rb + 2), _mm256_extracti128_si256(v[r], 1));
            }
        }
    }
}

/* ---- Q5_0, Q4_K, Q6_K on AVX2: float activations, as Q4_0/Q8_0 (weights dequantized in
 * registers with the reference's arithmetic, then multiplied by x in float). */

/* 16 int8 weights times x[0..16): a vector of 8 partial sums. */
TGT_AVX2 static inline __m256 mul16_i8_avx2(__m128i q, const float *x) {
    return _mm256_fmadd_ps(cvt8_hi(q), _mm256_loadu_ps(x + 8), _mm256_mul_ps(cvt8_lo(q), _mm256_loadu_ps(x)));
}

/* A Q5_0 block's 32 weights as int8 (q - 16), in order. Bit j of qh is weight j's fifth bit:
 * the 4 qh bytes are spread over 8 bytes each and compared against their bit;
 * q - 16 is the nibble where the bit is set and nibble | 0xF0 where it is clear. */
TGT_AVX2 static inline __m256i q5_0_i8_avx2(const block_q5_0 *blk) {
    uint32_t qh;
    memcpy(&qh, blk->qh, 4);
    const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i m = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), idx), bitsel);
    m = _mm256_cmpeq_epi8(m, bitsel);
    const __m128i mask = _mm_set1_epi8(15);
    __m128i v = _mm_loadu_si128((const __m128i *)blk->qs);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
    return _mm256_or_si256(q, _mm256_andnot_si256(m, _mm256_set1_epi8((char)0xF0)));
}

/* One Q4_K sub-block pair (64 weights, c = 0..3): 32 bytes of nibbles; the low nibbles are the
 * first 32 weights, the high the next. The weights of sub-block s are d sc_s q - dmin m_s. */
TGT_AVX2 static inline void q4k_pair_avx2(const block_q4_K *blk, int c, __m256i *lo, __m256i *hi, __m256 dm[4]) {
    const float d = h2f_f16c(blk->d), dmin = h2f_f16c(blk->dmin);
    uint8_t sc, m;
    q4k_scale_min(2 * c, blk->scales, &sc, &m);
    dm[0] = _mm256_set1_ps(d * (float)sc);
    dm[1] = _mm256_set1_ps(dmin * (float)m);
    q4k_scale_min(2 * c + 1, blk->scales, &sc, &m);
    dm[2] = _mm256_set1_ps(d * (float)sc);
    dm[3] = _mm256_set1_ps(dmin * (float)m);
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
    *lo = _mm256_and_si256(v, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

/* 8 weights of a Q4_K sub-block from 8 nibbles: d1 q - m1, rounded as the reference. */
TGT_AVX2 static inline __m256 q4k_w8_avx2(__m128i q8, __m256 d1, __m256 m1) {
    return _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8))), m1);
}

/* The 32 weights of a sub-block (nibbles in q) into out[0..32). */
TGT_AVX2 static inline void q4k_store32_avx2(__m256i q, __m256 d1, __m256 m1, float *out) {
    __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(out, q4k_w8_avx2(a, d1, m1));
    _mm256_storeu_ps(out + 8, q4k_w8_avx2(_mm_srli_si128(a, 8), d1, m1));
    _mm256_storeu_ps(out + 16, q4k_w8_avx2(b, d1, m1));
    _mm256_storeu_ps(out + 24, q4k_w8_avx2(_mm_srli_si128(b, 8), d1, m1));
}

/* One Q6_K half block (128 weights, c = 0, 1) as four vectors of 32 int8 (q - 32): vector i
 * holds weights 32 i .. 32 i + 31, whose scales are sc[8 c + 2 i] (first 16) and sc[8 c + 2 i + 1]. */
TGT_AVX2 static inline void q6k_half_avx2(const block_q6_K *blk, int c, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * c));
    __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * c + 32));
    __m256i h = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * c));
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
    for (int i = 0; i < 4; i++) q[i] = _mm256_sub_epi8(q[i], k32);
}

TGT_AVX2 static float dot_q5_0_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q5_0 *blk = (const block_q5_0 *)row;
    const int64_t nb = j->k / QK5_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x += QK5_0) {
        __m256i q = q5_0_i8_avx2(blk + b);
        __m256 p = _mm256_add_ps(mul16_i8_avx2(_mm256_castsi256_si128(q), x),
                                 mul16_i8_avx2(_mm256_extracti128_si256(q, 1), x + 16));
        if (b & 1) acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d)), p, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d)), p, acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

/* Sum of q * x over 32 weights (nibbles in q) as a vector. */
TGT_AVX2 static inline __m256 q4k_qx32_avx2(__m256i q, const float *x) {
    __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), _mm256_loadu_ps(x));
    __m256 p2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))), _mm256_loadu_ps(x + 8));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_loadu_ps(x + 16), p);
    p2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), _mm256_loadu_ps(x + 24), p2);
    return _mm256_add_ps(p, p2);
}

/* Q4_K with sum (d sc q - dmin m) x = d sc sum q x - dmin m sum x per sub-block (Q4_1's identity;
 * the sums of x per sub-block are prepared once per x, XP_SUMS): per 8 weights one conversion and
 * one FMA, the scales and mins unpacked once per block. Measured (L2-hot, 1 thread): dequantizing
 * each weight first ran at 0.50x Q4_0's weights/s, summing x in the kernel at 0.65x. */
TGT_AVX2 static float dot_q4_K_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q4_K *blk = (const block_q4_K *)row;
    const int64_t nb = j->k / QK_K;
    const __m256i mask = _mm256_set1_epi8(15);
    const float *xsum = j->xsum;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t b = 0; b < nb; b++, xsum += 8) {
        const float d = h2f_f16c(blk[b].d), dmin = h2f_f16c(blk[b].dmin);
        float ds[8];
        for (int s = 0; s < 8; s++) {
            uint8_t sc, m;
            q4k_scale_min(s, blk[b].scales, &sc, &m);
            ds[s] = d * (float)sc;
            mins += dmin * (float)m * xsum[s];
        }
        for (int c = 0; c < 4; c++, x += 64) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk[b].qs + 32 * c));
            __m256 p0 = q4k_qx32_avx2(_mm256_and_si256(v, mask), x);
            __m256 p1 = q4k_qx32_avx2(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x + 32);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * c]), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * c + 1]), p1, acc1);
        }
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) - mins;
}

TGT_AVX2 static float dot_q6_K_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q6_K *blk = (const block_q6_K *)row;
    const int64_t nb = j->k / QK_K;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const float d = h2f_f16c(blk[b].d);
        for (int c = 0; c < 2; c++, x += 128) {
            __m256i q[4];
            q6k_half_avx2(blk + b, c, q);
            const int8_t *sc = blk[b].scales + 8 * c;
            for (int i = 0; i < 4; i++) {
                __m256 p0 = mul16_i8_avx2(_mm256_castsi256_si128(q[i]), x + 32 * i);
                __m256 p1 = mul16_i8_avx2(_mm256_extracti128_si256(q[i], 1), x + 32 * i + 16);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[2 * i]), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[2 * i + 1]), p1, acc1);
            }
        }
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

/* Blocks [b0, b1) of a Q5_0, Q4_K or Q6_K row into out, with the reference's arithmetic. */
TGT_AVX2 static ALWAYS_INLINE void deq_range_kq_avx2(const int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        if (fmt == FIC_Q5_0) {
            const block_q5_0 *blk = (const block_q5_0 *)row + b;
            __m256 d = _mm256_set1_ps(h2f_f16c(blk->d));
            __m256i q = q5_0_i8_avx2(blk);
            __m128i a = _mm256_castsi256_si128(q), c = _mm256_extracti128_si256(q, 1);
            _mm256_storeu_ps(out, _mm256_mul_ps(cvt8_lo(a), d));
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(cvt8_hi(a), d));
            _mm256_storeu_ps(out + 16, _mm256_mul_ps(cvt8_lo(c), d));
            _mm256_storeu_ps(out + 24, _mm256_mul_ps(cvt8_hi(c), d));
            out += QK5_0;
        } else if (fmt == FIC_Q4_K) {
            const block_q4_K *blk = (const block_q4_K *)row + b;
            for (int c = 0; c < 4; c++, out += 64) {
                __m256i lo, hi;
                __m256 dm[4];
                q4k_pair_avx2(blk, c, &lo, &hi, dm);
                q4k_store32_avx2(lo, dm[0], dm[1], out);
                q4k_store32_avx2(hi, dm[2], dm[3], out + 32);
            }
        } else {
            const block_q6_K *blk = (const block_q6_K *)row + b;
            const float d = h2f_f16c(blk->d);
            for (int c = 0; c < 2; c++) {
                __m256i q[4];
                q6k_half_avx2(blk, c, q);
                for (int i = 0; i < 4; i++, out += 32) {
                    __m256 s0 = _mm256_set1_ps(d * (float)blk->scales[8 * c + 2 * i]);
                    __m256 s1 = _mm256_set1_ps(d * (float)blk->scales[8 * c + 2 * i + 1]);
                    __m128i a = _mm256_castsi256_si128(q[i]), e = _mm256_extracti128_si256(q[i], 1);
                    _mm256_storeu_ps(out, _mm256_mul_ps(s0, cvt8_lo(a)));
                    _mm256_storeu_ps(out + 8, _mm256_mul_ps(s0, cvt8_hi(a)));
                    _mm256_storeu_ps(out + 16, _mm256_mul_ps(s1, cvt8_lo(e)));
                    _mm256_storeu_ps(out + 24, _mm256_mul_ps(s1, cvt8_hi(e)));
                }
            }
        }
    }
}

TGT_AVX2 static ALWAYS_INLINE float dot_avx2(const int fmt, const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / fic_fmt_bw(fmt);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float extra = 0.0f;
    switch (fmt) {
    case FIC_Q1_0:
        return dot_q1_avx2(j, row);
    case FIC_Q5_0:
        return dot_q5_0_avx2(j, row, x);
    case FIC_Q4_K:
        return dot_q4_K_avx2(j, row, x);
    case FIC_Q6_K:
        return dot_q6_K_avx2(j, row, x);
    case FIC_F32: {
        const float *w = (const float *)row;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < k; i++) extra += w[i] * x[i];
        break;
    }
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
            __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
            acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < k; i++) extra += h2f_f16c(w[i]) * x[i];
        break;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row;
        for (int64_t b = 0; b < nb; b++, x += QK8_0) {
            __m128i q0 = _mm_loadu_si128((const __m128i *)blk[b].qs);
            __m128i q1 = _mm_loadu_si128((const __m128i *)(blk[b].qs + 16));
            __m256 p = _mm256_mul_ps(cvt8_lo(q0), _mm256_loadu_ps(x));
            __m256 p2 = _mm256_mul_ps(cvt8_hi(q0), _mm256_loadu_ps(x + 8));
            p = _mm256_fmadd_ps(cvt8_lo(q1), _mm256_loadu_ps(x + 16), p);
            p2 = _mm256_fmadd_ps(cvt8_hi(q1), _mm256_loadu_ps(x + 24), p2);
            __m256 d = _mm256_set1_ps(h2f_f16c(blk[b].d));
            acc0 = _mm256_fmadd_ps(d, p, acc0);
            acc1 = _mm256_fmadd_ps(d, p2, acc1);
        }
        break;
    }
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = 0; b < nb; b++, x += 32) {
            const uint8_t *blk = row + b * stride;
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            __m256 p = _mm256_mul_ps(cvt8_lo(lo), _mm256_loadu_ps(x));
            __m256 p2 = _mm256_mul_ps(cvt8_hi(lo), _mm256_loadu_ps(x + 8));
            p = _mm256_fmadd_ps(cvt8_lo(hi), _mm256_loadu_ps(x + 16), p);
            p2 = _mm256_fmadd_ps(cvt8_hi(hi), _mm256_loadu_ps(x + 24), p2);
            fic_half hd;
            memcpy(&hd, blk, 2);
            __m256 d = _mm256_set1_ps(h2f_f16c(hd));
            acc0 = _mm256_fmadd_ps(d, p, acc0);
            acc1 = _mm256_fmadd_ps(d, p2, acc1);
            if (is1) {
                fic_half hm;
                memcpy(&hm, blk + 2, 2);
                extra += h2f_f16c(hm) * j->xsum[b];
            }
        }
        break;
    }
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + extra;
}

/* Dequantize blocks [b0, b1) of a row into out. */
TGT_AVX2 static ALWAYS_INLINE void deq_range_avx2(const int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    switch (fmt) {
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = b0;
        for (; i + 8 <= b1; i += 8)
            _mm256_storeu_ps(out + i - b0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))));
        for (; i < b1; i++) out[i - b0] = h2f_f16c(w[i]);
        return;
    }
    case FIC_Q8_0:
        for (int64_t b = b0; b < b1; b++, out += 32) {
            const block_q8_0 *blk = (const block_q8_0 *)row + b;
            __m256 d = _mm256_set1_ps(h2f_f16c(blk->d));
            __m128i q0 = _mm_loadu_si128((const __m128i *)blk->qs);
            __m128i q1 = _mm_loadu_si128((const __m128i *)(blk->qs + 16));
            _mm256_storeu_ps(out, _mm256_mul_ps(d, cvt8_lo(q0)));
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(d, cvt8_hi(q0)));
            _mm256_storeu_ps(out + 16, _mm256_mul_ps(d, cvt8_lo(q1)));
            _mm256_storeu_ps(out + 24, _mm256_mul_ps(d, cvt8_hi(q1)));
        }
        return;
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = b0; b < b1; b++, out += 32) {
            const uint8_t *blk = row + b * stride;
            fic_half hd, hm = 0;
            memcpy(&hd, blk, 2);
            if (is1) memcpy(&hm, blk + 2, 2);
            __m256 d = _mm256_set1_ps(h2f_f16c(hd)), mn = _mm256_set1_ps(h2f_f16c(hm));
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            _mm256_storeu_ps(out, _mm256_fmadd_ps(d, cvt8_lo(lo), mn));
            _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(d, cvt8_hi(lo), mn));
            _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(d, cvt8_lo(hi), mn));
            _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(d, cvt8_hi(hi), mn));
        }
        return;
    }
    case FIC_Q1_0: {
        const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (int64_t b = b0; b < b1; b++, out += QK1_0) {
            const block_q1_0 *blk = (const block_q1_0 *)row + b;
            float d = h2f_f16c(blk->d);
            __m256 pos = _mm256_set1_ps(d), neg = _mm256_set1_ps(-d);
            for (int c = 0; c < 16; c++) {
                __m256i mc = _mm256_set1_epi32(blk->qs[c]);
                mc = _mm256_cmpeq_epi32(_mm256_and_si256(mc, bits), bits);
                _mm256_storeu_ps(out + 8 * c, _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(mc)));
            }
        }
        return;
    }
    case FIC_Q5_0:
    case FIC_Q4_K:
    case FIC_Q6_K:
        deq_range_kq_avx2(fmt, row, b0, b1, out);
        return;
    default:
        kern_deq_range_ref(fmt, row, b0, b1, out);
    }
}

TGT_AVX2 static void axpy_avx2(float a, const float *w, float *y, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * w[i];
}

/* NR rows x NT tokens of dot products, sharing loads: the inner kernel of matmul. */
TGT_AVX2 static inline __attribute__((always_inline)) void gemm_block_avx2(
        const float *w, const float *x, int64_t k, float *y, int64_t ldy, int nr, int nt) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 xv[2];
        for (int t = 0; t < nt; t++) xv[t] = _mm256_loadu_ps(x + t * k + i);
        for (int r = 0; r < nr; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * k + i);
            for (int t = 0; t < nt; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            float s = hsum256(acc[r][t]);
            for (int64_t ii = i; ii < k; ii++) s += w[r * k + ii] * x[t * k + ii];
            y[t * ldy + r] = s;
        }
}

TGT_AVX2 static void gemm_tile_avx2(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k;
    for (int64_t t = 0; t < j->t; t += 2) {
        const float *x = j->x + t * k;
        float *y = j->y + t * j->m + r0;
        int nt = j->t - t >= 2 ? 2 : 1;
        int64_t r = 0;
        for (; r + 4 <= nr; r += 4) {
            if (nt == 2) gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 4, 2);
            else gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 4, 1);
        }
        for (; r < nr; r++) {
            if (nt == 2) gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 1, 2);
            else gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 1, 1);
        }
    }
}

/* Prefill's register block on packed panels (pack_panels): 16 rows x NT <= 6 tokens, 12 vector
 * accumulators. Per weight column: 2 loads of the panel, one broadcast per token, 2 NT FMAs; no
 * horizontal sums. Each output is one in-order sum over k, as the reference's. */
TGT_AVX2 static ALWAYS_INLINE void panel_block_avx2(const float *p, int64_t k, const float *x, float *y,
                                                     int64_t ldy, const int nt, int rows) {
    __m256 c0[6], c1[6];
    const float *xr[6];
    for (int i = 0; i < nt; i++) {
        c0[i] = c1[i] = _mm256_setzero_ps();
        xr[i] = x + i * k;
    }
    for (int64_t kk = 0; kk < k; kk++, p += PANEL_ROWS) {
        const __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);
        for (int i = 0; i < nt; i++) {
            const __m256 b = _mm256_broadcast_ss(xr[i] + kk);
            c0[i] = _mm256_fmadd_ps(w0, b, c0[i]);
            c1[i] = _mm256_fmadd_ps(w1, b, c1[i]);
        }
    }
    for (int i = 0; i < nt; i++) {
        if (rows == PANEL_ROWS) {
            _mm256_storeu_ps(y + i * ldy, c0[i]);
            _mm256_storeu_ps(y + i * ldy + 8, c1[i]);
        } else { /* the last panel of a tile: only its real rows */
            float out[PANEL_ROWS];
            _mm256_storeu_ps(out, c0[i]);
            _mm256_storeu_ps(out + 8, c1[i]);
            memcpy(y + i * ldy, out, (size_t)rows * sizeof *out);
        }
    }
}

/* Y[t][r0 + r] = tile row r . x[t]: tokens in groups of 6 (their x in L1), every panel of the
 * tile (in L2) per group. */
TGT_AVX2 static void gemm_panel_avx2(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k, m = j->m;
    for (int64_t t0 = 0; t0 < j->t; t0 += 6) {
        const int nt = j->t - t0 < 6 ? (int)(j->t - t0) : 6;
        const float *x = j->x + t0 * k;
        float *y = j->y + t0 * m + r0;
        for (int64_t r = 0; r < nr; r += PANEL_ROWS) {
            const int rows = nr - r < PANEL_ROWS ? (int)(nr - r) : PANEL_ROWS;
            const float *p = tile + r * k;
            switch (nt) { /* constant token counts: the accumulators stay in registers */
            case 6: panel_block_avx2(p, k, x, y + r, m, 6, rows); break;
            case 5: panel_block_avx2(p, k, x, y + r, m, 5, rows); break;
            case 4: panel_block_avx2(p, k, x, y + r, m, 4, rows); break;
            case 3: panel_block_avx2(p, k, x, y + r, m, 3, rows); break;
            case 2: panel_block_avx2(p, k, x, y + r, m, 2, rows); break;
            default: panel_block_avx2(p, k, x, y + r, m, 1, rows); break;
            }
        }
    }
}

/* 32 floats -> q8_0 int8 (ggml's: dx = amax / 127, q = round(x / dx), ties to even here) into q,
 * in order; returns dx and the sum of the q in *sum. */
TGT_AVX2 static inline float q8_block_avx2(const float *x, int8_t *q, int32_t *sum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m256i qi[4];
    for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    /* packs interleave 128-bit lanes; the permute puts the 32 bytes back in order */
    __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p8);
    /* sum of the 32 int8: sign-extend pairs with maddubs(1, q), then madd to int32 */
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p8), _mm256_set1_epi16(1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *sum = _mm_cvtsi128_si32(s4);
    return amax / 127.0f;
}

/* x -> int8 in q8 blocks of 32, stored in dot_q1_avx2's plane layout (Q1X_BYTES per 128 weights),
 * and per 128 weights the 8 lane scales and corrections it reads, the same in both 128-bit lanes:
 * a8 = 2 dx and c8 = -dx sum(xq) of q8 block l % 4. k is a multiple of 128. */
TGT_AVX2 void kern_quantize_x_avx2(const float *x, int64_t k, int8_t *xq, float *a8, float *c8) {
    for (int64_t b = 0; b < k / QK1_0; b++) {
        int8_t tmp[QK1_0], planes[QK1_0];
        for (int i = 0; i < 4; i++) {
            int32_t sum;
            const float dx = q8_block_avx2(x + QK1_0 * b + 32 * i, tmp + 32 * i, &sum);
            a8[8 * b + i] = a8[8 * b + 4 + i] = 2.0f * dx;
            c8[8 * b + i] = c8[8 * b + 4 + i] = -dx * (float)sum;
        }
        q1_sign_planes((const uint8_t *)tmp, (uint8_t *)planes); /* plane j at 16 j */
        for (int p = 0; p < 8; p++) /* plane p in both lanes of vector p */
            _mm256_storeu_si256((__m256i *)(xq + Q1X_BYTES * b + 32 * p),
                                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(planes + 16 * p))));
    }
}


/* ---- Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K with int8 activations (XP_Q8) ---------------------
 * x is quantized once per vector to qdot.h's activation row: int8 q[k] | float d[k/32] |
 * float s[k/32] with s = d sum(q) (j->xq, j->xscale16 = d, j->xcorr16 = s). Per 32-weight block
 * one maddubs (u8 weights x s8 activations; Q8_0 takes ggml's sign trick), one madd, one
 * conversion and one FMA by d_w d_x (signed weights: Q8_0, Q5_0, Q6_K, ggml's sign trick; Q4_K and
 * Q6_K fold their sub-block scales in: Q4_K's sub-blocks are 32 weights, one q8 block, Q6_K's 16,
 * half of one); the offsets of Q4_0 (-8 d_w), Q4_1 (m_w) and Q4_K (-dmin m) multiply s,
 * so the only error beyond float rounding is x's rounding to q8 (the bound of tests/test_kernels.py).
 * Measured: the float path ran Q4_1 at 4.3 GB/s a core, under half this VM's 2-thread bandwidth. */

/* The 16 bytes broadcast to both halves, the high half shifted by 4 (one variable shift), masked:
 * 3 instructions where the two halves built apart and joined took 5. */
TGT_AVX2 static inline __m256i q4_nibbles_avx2(const uint8_t *qs) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* The 8 int32 lanes of block blk's sum w q, as floats. */
TGT_AVX2 static ALWAYS_INLINE __m256 q8x_block_avx2(const int fmt, const uint8_t *blk, const int8_t *xq) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)xq);
    __m256i p;
    if (fmt == FIC_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
    } else {
        p = _mm256_maddubs_epi16(q4_nibbles_avx2(blk + (fmt == FIC_Q4_1 ? 4 : 2)), q);
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* The 8 fp16 values at p, p + stride, ..., p + 7 stride (a field of 8 consecutive blocks). */
TGT_AVX2 static inline __m128i halves8_avx2(const uint8_t *p, int64_t stride) {
    uint16_t h[8];
    for (int i = 0; i < 8; i++) memcpy(&h[i], p + i * stride, 2);
    return _mm_set_epi16((short)h[7], (short)h[6], (short)h[5], (short)h[4], (short)h[3], (short)h[2], (short)h[1],
                         (short)h[0]);
}

TGT_AVX2 static ALWAYS_INLINE int64_t q8x_stride(const int fmt) {
    return fmt == FIC_Q8_0 ? (int64_t)sizeof(block_q8_0) : fmt == FIC_Q4_1 ? (int64_t)sizeof(block_q4_1)
                                                                           : (int64_t)sizeof(block_q4_0);
}

/* Signed int8 weights w (32) against q8 block xq: int32 lanes (ggml's sign trick), times m16's
 * int16 factors (ones, or Q6_K's two sub-block scales). */
TGT_AVX2 static inline __m256i q8x_signed_avx2(__m256i w, const int8_t *xq, __m256i m16) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w)), m16);
}

/* Unsigned nibbles u (32) against q8 block xq: int32 lanes as floats. */
TGT_AVX2 static inline __m256 q8x_unsigned_avx2(__m256i u, const int8_t *xq) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)));
}

/* One 256-weight K-quant super-block against q8 blocks xq[0..8) (scales dv, sums sv). */
TGT_AVX2 static ALWAYS_INLINE void q8x_kquant_avx2(const int fmt, const uint8_t *blk8, const int8_t *xq,
                                                   const float *dv, const float *sv, __m256 *a0, __m256 *a1,
                                                   __m256 *mins) {
    if (fmt == FIC_Q4_K) {
        /* the eight sub-blocks' factors d sc dx in one multiply (the same roundings as one at a time:
         * (d sc) dx), then broadcast from memory; the offsets dmin m s into an 8-lane *mins */
        const block_q4_K *blk = (const block_q4_K *)blk8;
        const __m256i mask = _mm256_set1_epi8(15);
        uint64_t sc8, m8;
        q4k_scales_mins_u64(blk->scales, &sc8, &m8);
        const __m256 scv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc8)));
        const __m256 mv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m8)));
        float f[8];
        _mm256_storeu_ps(f, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(h2f_f16c(blk->d)), scv), _mm256_loadu_ps(dv)));
        *mins = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(h2f_f16c(blk->dmin)), mv), _mm256_loadu_ps(sv), *mins);
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
            __m256 p0 = q8x_unsigned_avx2(_mm256_and_si256(v, mask), xq + 64 * c);
            __m256 p1 = q8x_unsigned_avx2(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), xq + 64 * c + 32);
            *a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(f + 2 * c), p0, *a0);
            *a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(f + 2 * c + 1), p1, *a1);
        }
    } else { /* Q6_K: q - 32 as int8, a scale per 16 weights */
        const block_q6_K *blk = (const block_q6_K *)blk8;
        const float d = h2f_f16c(blk->d);
        for (int c = 0; c < 2; c++) {
            __m256i q[4];
            q6k_half_avx2(blk, c, q);
            const int8_t *sc = blk->scales + 8 * c;
            for (int i = 0; i < 4; i++) {
                const __m256i m16 = _mm256_set_m128i(_mm_set1_epi16(sc[2 * i + 1]), _mm_set1_epi16(sc[2 * i]));
                const __m256 p = _mm256_cvtepi32_ps(q8x_signed_avx2(q[i], xq + 128 * c + 32 * i, m16));
                if (i & 1) *a1 = _mm256_fmadd_ps(_mm256_set1_ps(d * dv[4 * c + i]), p, *a1);
                else *a0 = _mm256_fmadd_ps(_mm256_set1_ps(d * dv[4 * c + i]), p, *a0);
            }
        }
    }
}

/* A row of k weights against prepared x (xq, dv, sv): vector part into *acc, the offset part
 * (Q4_0: -8 d_w s, Q4_1: m_w s, Q4_K: -dmin m s) into *corr. Two accumulators for the FMA latency. */
TGT_AVX2 static ALWAYS_INLINE void q8x_row_avx2(const int fmt, const uint8_t *row, int64_t k, const int8_t *xq,
                                                const float *dv, const float *sv, __m256 *acc, float *corr,
                                                const int pf) {
    __m256 a0 = *acc, a1 = _mm256_setzero_ps();
    float c0 = 0.0f, c1 = 0.0f;
    if (fmt == FIC_Q4_K || fmt == FIC_Q6_K) {
        const int64_t bb = fmt == FIC_Q4_K ? (int64_t)sizeof(block_q4_K) : (int64_t)sizeof(block_q6_K);
        __m256 mins = _mm256_setzero_ps(); /* Q4_K: sum of dmin m s, subtracted once */
        for (int64_t b = 0; b < k / QK_K; b++) {
            if (pf) stream_prefetch(row + b * bb, (int)bb);
            q8x_kquant_avx2(fmt, row + b * bb, xq + QK_K * b, dv + 8 * b, sv + 8 * b, &a0, &a1, &mins);
        }
        *acc = _mm256_add_ps(a0, a1);
        if (fmt == FIC_Q4_K) *corr -= hsum256(mins);
        return;
    }
    if (fmt == FIC_Q5_0) {
        const block_q5_0 *blk = (const block_q5_0 *)row;
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t b = 0; b < k / QK5_0; b++) {
            if (pf && b % 4 == 0) stream_prefetch((const uint8_t *)(blk + b), 4 * (int)sizeof(block_q5_0));
            const __m256 p = _mm256_cvtepi32_ps(q8x_signed_avx2(q5_0_i8_avx2(blk + b), xq + 32 * b, ones));
            if (b & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d) * dv[b]), p, a1);
            else a0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d) * dv[b]), p, a0);
        }
        *acc = _mm256_add_ps(a0, a1);
        return;
    }
    const int64_t stride = q8x_stride(fmt), nb = k / 32;
    int64_t b = 0;
    if (nb >= 8) {
        /* groups of 8 blocks: their fp16 scales (and Q4_1's mins) converted at once, the products
         * with x's block scales in one multiply, the offset part in one FMA; each block's scale is
         * then a broadcast from memory (a load, not a shuffle). Measured 1 core from L2 below. */
        __m256 cv = _mm256_setzero_ps();
        float sc[8];
        for (; b + 8 <= nb; b += 8) {
            const uint8_t *blk = row + b * stride;
            if (pf) stream_prefetch(blk, 8 * (int)stride);
            const __m256 dw = _mm256_cvtph_ps(halves8_avx2(blk, stride));
            _mm256_storeu_ps(sc, _mm256_mul_ps(dw, _mm256_loadu_ps(dv + b)));
            if (fmt == FIC_Q4_1)
                cv = _mm256_fmadd_ps(_mm256_cvtph_ps(halves8_avx2(blk + 2, stride)), _mm256_loadu_ps(sv + b), cv);
            else if (fmt == FIC_Q4_0)
                cv = _mm256_fmadd_ps(dw, _mm256_loadu_ps(sv + b), cv);
            for (int i = 0; i < 8; i += 2) {
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + i), q8x_block_avx2(fmt, blk + i * stride, xq + 32 * (b + i)),
                                     a0);
                a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + i + 1),
                                     q8x_block_avx2(fmt, blk + (i + 1) * stride, xq + 32 * (b + i + 1)), a1);
            }
        }
        c0 += fmt == FIC_Q4_0 ? -8.0f * hsum256(cv) : fmt == FIC_Q4_1 ? hsum256(cv) : 0.0f;
    }
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *k0 = row + b * stride, *k1 = k0 + stride;
        fic_half h0, h1;
        memcpy(&h0, k0, 2);
        memcpy(&h1, k1, 2);
        const float d0 = h2f_f16c(h0), d1 = h2f_f16c(h1);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dv[b]), q8x_block_avx2(fmt, k0, xq + 32 * b), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * dv[b + 1]), q8x_block_avx2(fmt, k1, xq + 32 * b + 32), a1);
        if (fmt == FIC_Q4_1) {
            fic_half m0, m1;
            memcpy(&m0, k0 + 2, 2);
            memcpy(&m1, k1 + 2, 2);
            c0 += h2f_f16c(m0) * sv[b];
            c1 += h2f_f16c(m1) * sv[b + 1];
        } else if (fmt == FIC_Q4_0) {
            c0 -= 8.0f * d0 * sv[b];
            c1 -= 8.0f * d1 * sv[b + 1];
        }
    }
    for (; b < nb; b++) {
        const uint8_t *k0 = row + b * stride;
        fic_half h0;
        memcpy(&h0, k0, 2);
        const float d0 = h2f_f16c(h0);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dv[b]), q8x_block_avx2(fmt, k0, xq + 32 * b), a0);
        if (fmt == FIC_Q4_1) {
            fic_half m0;
            memcpy(&m0, k0 + 2, 2);
            c0 += h2f_f16c(m0) * sv[b];
        } else if (fmt == FIC_Q4_0) {
            c0 -= 8.0f * d0 * sv[b];
        }
    }
    *acc = _mm256_add_ps(a0, a1);
    *corr += c0 + c1;
}

/* row . x: int8 when x was prepared so (j->xq), else the float path (an exact request). */
TGT_AVX2 static ALWAYS_INLINE float q8x_dot_avx2(const int fmt, const job_t *j, const uint8_t *row, const float *x) {
    if (j->xq == NULL) return dot_avx2(fmt, j, row, x);
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    q8x_row_avx2(fmt, row, j->k, j->xq, j->xscale16, j->xcorr16, &acc, &corr, j->stream_pf);
    return hsum256(acc) + corr;
}

/* acc[i] += fix(c[i]): with |c| < 2^19, c * 2^32 + 1.5 * 2^52 rounds c * 2^32 to an integer (half to
 * even, as llrint) in the low bits of a double in [2^52, 2^53); groups of 4 with a larger value or a
 * NaN take fix_ref. */
TGT_AVX2 static inline __m256i fix4_avx2(__m128 c) {
    const __m256d magic = _mm256_set1_pd(0x1.8p52);
    const __m256d v = _mm256_fmadd_pd(_mm256_cvtps_pd(c), _mm256_set1_pd(0x1p32), magic);
    return _mm256_sub_epi64(_mm256_castpd_si256(v), _mm256_castpd_si256(magic));
}

TGT_AVX2 static inline int fix4_ok(__m128 c) {
    const __m128 a = _mm_andnot_ps(_mm_set1_ps(-0.0f), c);
    return _mm_movemask_ps(_mm_cmplt_ps(a, _mm_set1_ps(0x1p19f))) == 0xf; /* NaN compares false */
}

TGT_AVX2 void fixed_add_avx2(const float *c, int64_t *acc, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m128 v = _mm_loadu_ps(c + i);
        if (!fix4_ok(v)) {
            fixed_add_ref(c + i, acc + i, 4);
            continue;
        }
        __m256i *a = (__m256i *)(acc + i);
        _mm256_storeu_si256(a, _mm256_add_epi64(_mm256_loadu_si256(a), fix4_avx2(v)));
    }
    fixed_add_ref(c + i, acc + i, n - i);
}

/* pack8_ref's transpose, 8 x 8 floats at a time: 8 loads, 24 shuffles, 8 stores where the
 * reference stores one float at a time. */
TGT_AVX2 void pack8_avx2(const float *src, int64_t ld, int64_t n, float *dst) {
    for (int64_t kk = 0; kk < n; kk += 8) {
        __m256 r[8], t[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld + kk);
        for (int i = 0; i < 8; i += 2) { /* rows i, i+1 interleaved per 128-bit lane */
            t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) { /* four rows' column c in one 128-bit lane */
            r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
            r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
            r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
            r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
        }
        /* r[c] (c < 4) holds column c (low lane) and c + 4 (high lane) of rows 0..3; r[c + 4] rows 4..7 */
        for (int c = 0; c < 4; c++) {
            _mm256_storeu_ps(dst + (kk + c) * PANEL_ROWS, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
            _mm256_storeu_ps(dst + (kk + c + 4) * PANEL_ROWS, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
        }
    }
}

/* e^x over the whole float range, clamped to exp256_clamped's (exp_avx2.h): a NaN x gives a finite
 * value; silu's g / (1 + e) is NaN anyway. */
TGT_AVX2 static inline __m256 exp256_full(__m256 x) {
    return exp256_clamped(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f)));
}

TGT_AVX2 static inline __m256 silu_mul8_avx2(__m256 c, __m256 g, __m256 u) {
    const __m256 e = exp256_full(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_mul_ps(c, _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e))), u);
}

/* silu_mul_ref with the polynomial exp; the tail through a padded vector, so every element gets
 * the same arithmetic wherever it sits. */
TGT_AVX2 void silu_mul_avx2(float c, float *h, const float *u, int64_t n) {
    const __m256 vc = _mm256_set1_ps(c);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(h + k, silu_mul8_avx2(vc, _mm256_loadu_ps(h + k), _mm256_loadu_ps(u + k)));
    if (k < n) {
        float hb[8] = {0}, ub[8] = {0};
        memcpy(hb, h + k, (size_t)(n - k) * sizeof *hb);
        memcpy(ub, u + k, (size_t)(n - k) * sizeof *ub);
        _mm256_storeu_ps(hb, silu_mul8_avx2(vc, _mm256_loadu_ps(hb), _mm256_loadu_ps(ub)));
        memcpy(h + k, hb, (size_t)(n - k) * sizeof *hb);
    }
}

/* FIC_FFN_FIXED: as q8x_down_block_avx2, but every expert's row sums are reduced and rounded into
 * the fixed-point accumulator on their own (fic.h), whatever other experts the call holds: an
 * expert with h_e in int8 through q8x_row, one prepared as float (a short or exact h_e) through
 * dot_row. A row's value does not depend on whether it falls in a block of P2_ROWS or the tail. */
TGT_AVX2 static ALWAYS_INLINE void q8x_down_fixed_avx2(const int fmt, const ffn_t *f, int64_t r, int nr, int64_t r_end) {
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        const uint8_t *w = down_part(f, e) + r * rb;
        p2_prefetch(w, rb, r, nr, r_end);
        float sums[P2_ROWS];
        if (j->xq == NULL) {
            for (int i = 0; i < nr; i++) sums[i] = dot_row(j, w + i * rb, j->x);
        } else {
            __m256 acc[P2_ROWS];
            float corr[P2_ROWS];
            for (int i = 0; i < nr; i++) {
                acc[i] = _mm256_setzero_ps();
                corr[i] = 0.0f;
                q8x_row_avx2(fmt, w + i * rb, j->k, j->xq, j->xscale16, j->xcorr16, &acc[i], &corr[i], 0);
            }
            if (nr == P2_ROWS) {
                _mm256_storeu_ps(sums, _mm256_add_ps(hsum8_avx2(acc), _mm256_loadu_ps(corr)));
            } else {
                for (int i = 0; i < nr; i++) sums[i] = hsum_pairs_avx2(acc[i]) + corr[i];
            }
        }
        fixed_add_avx2(sums, f->acc + r, nr);
    }
}

/* FFN phase 2, columns, t = 1: P2_ROWS output rows at a time, every expert's row pieces against
 * its h_e prepared as int8, one reduction per output row over all experts (a dot_row per row
 * piece of n_e weights cost a reduction and a call per 2 blocks). */
TGT_AVX2 static ALWAYS_INLINE void q8x_down_block_avx2(const int fmt, const ffn_t *f, int64_t r, int nr, int64_t r_end) {
    __m256 acc[P2_ROWS];
    float corr[P2_ROWS];
    for (int i = 0; i < nr; i++) {
        acc[i] = _mm256_setzero_ps();
        corr[i] = 0.0f;
    }
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        const uint8_t *w = down_part(f, e) + r * rb;
        p2_prefetch(w, rb, r, nr, r_end);
        for (int i = 0; i < nr; i++)
            q8x_row_avx2(fmt, w + i * rb, j->k, j->xq, j->xscale16, j->xcorr16, &acc[i], &corr[i], 0);
    }
    for (int i = 0; i < nr; i++) f->y[r + i] += hsum256(acc[i]) + corr[i];
}

/* 0 (the generic loop) unless every h_e was prepared as int8. */
TGT_AVX2 static ALWAYS_INLINE int q8x_down_cols_avx2(const int fmt, const ffn_t *f, int64_t r0, int64_t r1) {
    if (f->acc != NULL) {
        int64_t r = r0;
        for (; r + P2_ROWS <= r1; r += P2_ROWS) q8x_down_fixed_avx2(fmt, f, r, P2_ROWS, r1);
        if (r < r1) q8x_down_fixed_avx2(fmt, f, r, (int)(r1 - r), r1);
        return 1;
    }
    for (int64_t e = 0; e < f->n_experts; e++)
        if (!f->skip[e] && f->jd[e].xq == NULL) return 0;
    int64_t r = r0;
    for (; r + P2_ROWS <= r1; r += P2_ROWS) q8x_down_block_avx2(fmt, f, r, P2_ROWS, r1);
    for (; r < r1; r++) q8x_down_block_avx2(fmt, f, r, 1, r1);
    return 1;
}

/* Not static: the AVX-512 tables take them too (kernels_avx512.c). */
#define Q8X_FMT(name, FMT)                                                                           \
    TGT_AVX2 float kern_q8x_dot_##name##_avx2(const job_t *j, const uint8_t *row, const float *x) {  \
        return q8x_dot_avx2(FMT, j, row, x);                                                         \
    }                                                                                                \
    TGT_AVX2 int kern_q8x_down_##name##_avx2(const ffn_t *f, int64_t r0, int64_t r1) {               \
        return q8x_down_cols_avx2(FMT, f, r0, r1);                                                   \
    }
Q8X_FMT(q8_0, FIC_Q8_0)
Q8X_FMT(q4_0, FIC_Q4_0)
Q8X_FMT(q4_1, FIC_Q4_1)
Q8X_FMT(q5_0, FIC_Q5_0)
Q8X_FMT(q4_K, FIC_Q4_K)
Q8X_FMT(q6_K, FIC_Q6_K)
#undef Q8X_FMT


/* ---- per-format entry points and the table ----------------------------------------------- */

#define AVX2_FMT(name, FMT)                                                                          \
    TGT_AVX2 static float row_dot_##name##_avx2(const job_t *j, const uint8_t *row, const float *x) {     \
        return dot_avx2(FMT, j, row, x);                                                             \
    }                                                                                                \
    TGT_AVX2 void kern_deq_##name##_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out) {   \
        deq_range_avx2(FMT, row, b0, b1, out);                                                       \
    }
#define AVX2_DEQ(name, FMT)                                                                        \
    TGT_AVX2 void kern_deq_##name##_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out) { \
        deq_range_avx2(FMT, row, b0, b1, out);                                                     \
    }
AVX2_FMT(f32, FIC_F32)
AVX2_FMT(f16, FIC_F16)
AVX2_DEQ(q8_0, FIC_Q8_0) /* their dot: q8x_dot_*_avx2 */
AVX2_DEQ(q4_0, FIC_Q4_0)
AVX2_DEQ(q4_1, FIC_Q4_1)
AVX2_DEQ(q5_0, FIC_Q5_0)
AVX2_DEQ(q4_K, FIC_Q4_K)
AVX2_DEQ(q6_K, FIC_Q6_K)
#undef AVX2_DEQ
AVX2_FMT(q1_0, FIC_Q1_0)
#undef AVX2_FMT


/* Every quantized format takes int8 activations (XP_Q1_AVX2, XP_Q8); exact requests take the
 * float kernels with x as is (Q4_1 and Q4_K with its sums per block / sub-block); Q1_0 has a
 * two-row dot. */
#define AVX2_ENTRY(name, KT, XP) {KT, XP, XP, row_dot_##name##_avx2, NULL, kern_deq_##name##_avx2, NULL, NULL, NULL, NULL}
/* Q4_0, Q4_1, Q8_0: int8 activations (XP_Q8), the float preparation XPF for an exact request; PF: the
 * dot prefetches a long row's stream itself (not Q8_0: 0.95-0.99x against the row's burst). */
#define AVX2_Q8X_ENTRY(name, KT, XPF, PF) \
    {KT, XP_Q8, XPF, kern_q8x_dot_##name##_avx2, NULL, kern_deq_##name##_avx2, NULL, NULL, NULL, kern_q8x_down_##name##_avx2, PF}
const fic_kernels fic_kernels_avx2 = {
    FIC_IMPL_AVX2,
    axpy_avx2,
    gemm_tile_avx2,
    {
        [FIC_F32] = AVX2_ENTRY(f32, KT_F32, XP_NONE),
        [FIC_F16] = AVX2_ENTRY(f16, KT_F16, XP_NONE),
        [FIC_Q8_0] = AVX2_Q8X_ENTRY(q8_0, KT_Q8_0, XP_NONE, 0),
        [FIC_Q4_0] = AVX2_Q8X_ENTRY(q4_0, KT_Q4_0, XP_NONE, 1),
        [FIC_Q4_1] = AVX2_Q8X_ENTRY(q4_1, KT_Q4_1, XP_SUMS, 1),
        [FIC_Q1_0] = {KT_Q1_0, XP_Q1_AVX2, XP_Q1_AVX2, row_dot_q1_0_avx2, dot2_q1_avx2, kern_deq_q1_0_avx2, NULL, NULL, NULL, NULL},
        [FIC_Q5_0] = AVX2_Q8X_ENTRY(q5_0, KT_Q5_0, XP_NONE, 1),
        [FIC_Q4_K] = AVX2_Q8X_ENTRY(q4_K, KT_Q4_K, XP_SUMS, 1),
        [FIC_Q6_K] = AVX2_Q8X_ENTRY(q6_K, KT_Q6_K, XP_NONE, 1),
    },
    gemm_panel_avx2,
    fixed_add_avx2,
    pack8_avx2,
    silu_mul_avx2,
    q1r32_avx2,
    q1r32_move_avx2,
    NULL, /* q1r32_tiles: a token at a time */
};
#endif /* FIC_X86 */
