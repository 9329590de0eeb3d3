/* kernels_avx512.c - x86-64 AVX-512 kernels (FIC_IMPL_AVX512) and their three tables: AVX-512
 * F/BW/VL (fic_kernels_avx512); with VNNI, Q4_0/Q4_1 take int8 activations four blocks a step
 * (kernels_q4_vnni.h) and Q8_0, Q4_K and Q6_K kernels_vnni.c's int8 kernels (fic_kernels_avx512_vnni);
 * with VNNI, BITALG, VBMI and GFNI, Q1_0 also takes x as bit planes and Q4 runs that header's VBMI copy
 * (fic_kernels_avx512_q1); with AMX-INT8
 * as well, the r32 prefill runs on tiles (fic_kernels_avx512_amx, kernels_amx.c; the other formats'
 * int8 prefill reaches its tiles through qdot.h's tables). pool.c says
 * which the CPU has, once; kernels.c picks the table. Formats without a 512-bit kernel (Q5_0; Q8_0,
 * Q4_K and Q6_K without VNNI; every dequantization but Q1_0's) point at the AVX2 code.
 *
 * Also here: the FFN's AVX-512 phase 1 and phase 2 paths (ffn.c calls them through the table's
 * rows and down_cols entries). */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "qdot.h"

#if defined(FIC_X86)
#include <immintrin.h>

TGT_AVX2 static inline float h2f_f16c(fic_half h) { return _cvtsh_ss(h); }

/* ---- AVX-512 F/BW/VL --------------------------------------------------------------------- */

TGT_AVX512 static inline __m512 cvt16_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* Q1_0 x int8 activations without multiplies, for AVX-512 CPUs without VNNI/BITALG/VBMI (on
 * those dot_q1_planes below is 1.3x faster).  x is stored as u8 xu = xq + 128; the sign bits,
 * as a 64-bit mask, turn it into (-s*xq) + 128 where set (0 - xu wraps to 128 - xq), and psadbw
 * sums each 8 bytes into a u64 lane (+1024 offset). The two halves' 8 lanes are packed into one
 * vector of 16 int32 (lane L covers q8 block L / 4), so per block and row there is one int ->
 * float conversion and two FMAs: p = lane * dx - 1024 dx (xscale16, xcorr16), acc += d * p.
 * (The maddubs/vpdpbusd version was bound by the FP pipes at 15 GB/s a core.) Returns the
 * negated dot product. */
TGT_AVX512 static inline __attribute__((always_inline)) __m512 q1_block_sad(
        const block_q1_0 *blk, __m512i xu0, __m512i xu1, __m512 sc, __m512 corr, __m512 acc) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    uint64_t bits[2];
    memcpy(bits, blk->qs, 16);
    __m512i s0 = _mm512_sad_epu8(_mm512_mask_sub_epi8(xu0, _cvtu64_mask64(bits[0]), zero, xu0), zero);
    __m512i s1 = _mm512_sad_epu8(_mm512_mask_sub_epi8(xu1, _cvtu64_mask64(bits[1]), zero, xu1), zero);
    __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(s0, idx, s1)), sc, corr);
    return _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk->d)), p, acc);
}

/* n_rows (1 or 2) rows of Q1_0 against the prepared x; y[r] = row r . x. */
TGT_AVX512 static void dot_q1_avx512(const job_t *j, const uint8_t *row0, const uint8_t *row1, int n_rows, float *y) {
    const block_q1_0 *r0 = (const block_q1_0 *)row0, *r1 = (const block_q1_0 *)row1;
    const int64_t nb = j->k / QK1_0;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xu0 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0));
        __m512i xu1 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0 + 64));
        __m512 sc = _mm512_loadu_ps(j->xscale16 + 16 * b), corr = _mm512_loadu_ps(j->xcorr16 + 16 * b);
        acc0 = q1_block_sad(r0 + b, xu0, xu1, sc, corr, acc0);
        if (n_rows == 2) acc1 = q1_block_sad(r1 + b, xu0, xu1, sc, corr, acc1);
    }
    y[0] = -_mm512_reduce_add_ps(acc0);
    if (n_rows == 2) y[1] = -_mm512_reduce_add_ps(acc1);
}

/* Q1_0 x int8 activations as bit planes, four blocks (512 weights) per step, no mask registers.
 * With s = +-1 from the sign bits, sum s xq = 2 sum_{bit set} xq - sum xq, and for int8 xq in
 * two's complement sum_{bit set} xq = sum_p c_p popcount(W & plane_p), c_p = 2^p (p < 7), -128.
 * x is stored once per call as planes (quantize_x_q1_planes): per group of 4 blocks, 8 vectors,
 * 128-bit lane l of vector p = bit p of xq over block 4g+l, in the sign bits' order. The 4
 * blocks' sign bytes are gathered into one zmm W (vpermt2b); per plane one vpandq, vpopcntb and
 * vpdpbusd (counts times c_p) accumulate int32 lane 4l+i = block l's weights 32i..32i+31, i.e.
 * q8 block 16g+4l+i. Per step and row: p = lane * 2dx - dx sum(xq) (xscale16, xcorr16), and
 * acc += d * p with the 4 blocks' d spread over their lanes (vpermw + vcvtph2ps). cw[p] is c_p in
 * each byte of an int32. Measured (L2-hot, 1 thread): 22-24 GB/s a core, against 17 for
 * q1_block_sad; no gain from 3 or 4 rows per pass, nor from two steps per iteration. */
static const int32_t q1_plane_weights[8] = {0x01010101, 0x02020202, 0x04040404, 0x08080808,
                                            0x10101010, 0x20202020, 0x40404040, (int32_t)0x80808080};

TGT_AVX512Q1 static inline __attribute__((always_inline)) __m512 q1_group_planes(
        const uint8_t *base, int nrem, const __m512i pl[8], __m512 a, __m512 c, __m512 acc, const int32_t *cw) {
    const __m512i idx_w = _mm512_set_epi8(
        71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58, 57, 56,
        53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38,
        35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20,
        17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2);
    const __m512i idx_d = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                           27, 27, 27, 27, 18, 18, 18, 18, 9, 9, 9, 9, 0, 0, 0, 0);
    __m512i l0, l1;
    if (nrem >= 4) {
        l0 = _mm512_loadu_si512((const void *)base);
        l1 = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(base + 64)));
    } else { /* a last partial group: bytes past the row stay unread (masked load) */
        l0 = _mm512_maskz_loadu_epi8(((__mmask64)1 << (18 * nrem)) - 1, base);
        l1 = _mm512_setzero_si512();
    }
    __m512i w = _mm512_permutex2var_epi8(l0, idx_w, l1);
    const __m512i z = _mm512_setzero_si512();
#define Q1W(p) _mm512_set1_epi32(cw[p])
    __m512i s0 = _mm512_dpbusd_epi32(z, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[0])), Q1W(0));
    __m512i s1 = _mm512_dpbusd_epi32(z, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[4])), Q1W(4));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[1])), Q1W(1));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[5])), Q1W(5));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[2])), Q1W(2));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[6])), Q1W(6));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[3])), Q1W(3));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[7])), Q1W(7));
#undef Q1W
    __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), a, c);
    __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx_d, l0)));
    return _mm512_fmadd_ps(d, p, acc);
}

/* nr (1 or 2) rows of Q1_0 (row0, row0 + row_bytes) against x's planes; y[i] = row i . x. Two
 * rows per pass share the plane loads (three or four rows measured no faster: register spills). */
TGT_AVX512Q1 static inline __attribute__((always_inline)) void dot_q1_planes_n(const job_t *j, const uint8_t *row0,
                                                                           int nr, float *y) {
    const int64_t nb = j->k / QK1_0, ng = (nb + 3) / 4, rb = j->row_bytes;
    const int64_t gbytes = 4 * (int64_t)sizeof(block_q1_0);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const int32_t *cw = q1_plane_weights;
    /* Hide the constants from gcc: it then loads them into registers once per call instead of
     * rebuilding three of them (movl + vpbroadcastd) every step. Measured 2-4% faster. */
    __asm__("" : "+r"(cw));
    for (int64_t g = 0; g < ng; g++) {
        __m512i pl[8];
        for (int p = 0; p < 8; p++) pl[p] = _mm512_loadu_si512((const void *)(j->xu + 512 * g + 64 * p));
        __m512 a = _mm512_loadu_ps(j->xscale16 + 16 * g), c = _mm512_loadu_ps(j->xcorr16 + 16 * g);
        int nrem = (int)(nb - 4 * g);
        if (nrem >= 4) {
            for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(row0 + i * rb + g * gbytes, 4, pl, a, c, acc[i], cw);
        } else {
            for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(row0 + i * rb + g * gbytes, nrem, pl, a, c, acc[i], cw);
        }
    }
    for (int i = 0; i < nr; i++) y[i] = _mm512_reduce_add_ps(acc[i]);
}

TGT_AVX512Q1 static void dot_q1_planes(const job_t *j, const uint8_t *row0, int nr, float *y) {
    if (nr == 2)
        dot_q1_planes_n(j, row0, 2, y);
    else
        dot_q1_planes_n(j, row0, 1, y);
}

TGT_AVX512VNNI static float dot_q4_vnni(const job_t *j, const uint8_t *row, const float *x);

TGT_AVX512 static ALWAYS_INLINE float dot_avx512(const int fmt, const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / j->bw;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float extra = 0.0f;
    switch (fmt) {
    case FIC_Q1_0: {
        float y;
        if (j->q1_planes)
            dot_q1_planes(j, row, 1, &y);
        else
            dot_q1_avx512(j, row, row, 1, &y);
        return y;
    }
    case FIC_Q4_0:
    case FIC_Q4_1:
        if (j->q4_int8) return dot_q4_vnni(j, row, x);
        break;
    default:
        break;
    }
    switch (fmt) {
    case FIC_F32: {
        const float *w = (const float *)row;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
        }
        for (; i < k; i += 16) {
            __mmask16 mk = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + i), _mm512_maskz_loadu_ps(mk, x + i), acc0);
        }
        break;
    }
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) {
            __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i)));
            __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
            acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc0);
            acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc1);
        }
        for (; i < k; i += 16) {
            __mmask16 mk = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
            __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w + i));
            acc0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + i), acc0);
        }
        break;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row;
        for (int64_t b = 0; b < nb; b++, x += QK8_0) {
            __m512 p = _mm512_mul_ps(cvt16_i8(_mm_loadu_si128((const __m128i *)blk[b].qs)), _mm512_loadu_ps(x));
            p = _mm512_fmadd_ps(cvt16_i8(_mm_loadu_si128((const __m128i *)(blk[b].qs + 16))),
                                _mm512_loadu_ps(x + 16), p);
            if (b & 1) acc1 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk[b].d)), p, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk[b].d)), p, acc0);
        }
        break;
    }
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2, x += 64) {
            const uint8_t *blk0 = row + b * stride, *blk1 = blk0 + stride;
            __m128i v0 = _mm_loadu_si128((const __m128i *)(blk0 + (is1 ? 4 : 2)));
            __m128i v1 = _mm_loadu_si128((const __m128i *)(blk1 + (is1 ? 4 : 2)));
            __m128i lo0 = _mm_sub_epi8(_mm_and_si128(v0, mask), eight);
            __m128i hi0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v0, 4), mask), eight);
            __m128i lo1 = _mm_sub_epi8(_mm_and_si128(v1, mask), eight);
            __m128i hi1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v1, 4), mask), eight);
            __m512 p0 = _mm512_mul_ps(cvt16_i8(lo0), _mm512_loadu_ps(x));
            __m512 p1 = _mm512_mul_ps(cvt16_i8(lo1), _mm512_loadu_ps(x + 32));
            p0 = _mm512_fmadd_ps(cvt16_i8(hi0), _mm512_loadu_ps(x + 16), p0);
            p1 = _mm512_fmadd_ps(cvt16_i8(hi1), _mm512_loadu_ps(x + 48), p1);
            fic_half h0, h1;
            memcpy(&h0, blk0, 2);
            memcpy(&h1, blk1, 2);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h0)), p0, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h1)), p1, acc1);
            if (is1) {
                memcpy(&h0, blk0 + 2, 2);
                memcpy(&h1, blk1 + 2, 2);
                extra += h2f_f16c(h0) * j->xsum[b] + h2f_f16c(h1) * j->xsum[b + 1];
            }
        }
        if (b < nb) {
            const uint8_t *blk0 = row + b * stride;
            __m128i v0 = _mm_loadu_si128((const __m128i *)(blk0 + (is1 ? 4 : 2)));
            __m128i lo0 = _mm_sub_epi8(_mm_and_si128(v0, mask), eight);
            __m128i hi0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v0, 4), mask), eight);
            __m512 p0 = _mm512_mul_ps(cvt16_i8(lo0), _mm512_loadu_ps(x));
            p0 = _mm512_fmadd_ps(cvt16_i8(hi0), _mm512_loadu_ps(x + 16), p0);
            fic_half h0;
            memcpy(&h0, blk0, 2);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h0)), p0, acc0);
            if (is1) {
                memcpy(&h0, blk0 + 2, 2);
                extra += h2f_f16c(h0) * j->xsum[b];
            }
        }
        break;
    }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + extra;
}

/* Q1_0 blocks [b0, b1) -> float: the sign bits are blend masks. (Other formats dequantize with
 * the AVX2 code.) */
TGT_AVX512 static void deq_q1_0_avx512(const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++, out += QK1_0) {
        const block_q1_0 *blk = (const block_q1_0 *)row + b;
        float d = h2f_f16c(blk->d);
        __m512 pos = _mm512_set1_ps(d), neg = _mm512_set1_ps(-d);
        uint16_t mk[8];
        memcpy(mk, blk->qs, 16);
        for (int c = 0; c < 8; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mask_blend_ps((__mmask16)mk[c], neg, pos));
    }
}

TGT_AVX512 static void axpy_avx512(float a, const float *w, float *y, int64_t n) {
    __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 yv = _mm512_maskz_loadu_ps(mk, y + i);
        _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(mk, w + i), yv));
    }
}

/* y[0 .. (b1-b0)*bw) += a * row's blocks [b0, b1), dequantized in registers (accum_rows).
 * Returns 0 for formats it does not handle (the caller dequantizes to a buffer instead). */
TGT_AVX512 static int axpy_blocks_avx512(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float a, float *y) {
    switch (fmt) {
    case FIC_Q8_0:
        for (int64_t b = b0; b < b1; b++, y += 32) {
            const block_q8_0 *blk = (const block_q8_0 *)row + b;
            __m512 ad = _mm512_set1_ps(a * h2f_f16c(blk->d));
            __m512 q0 = cvt16_i8(_mm_loadu_si128((const __m128i *)blk->qs));
            __m512 q1 = cvt16_i8(_mm_loadu_si128((const __m128i *)(blk->qs + 16)));
            _mm512_storeu_ps(y, _mm512_fmadd_ps(q0, ad, _mm512_loadu_ps(y)));
            _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(q1, ad, _mm512_loadu_ps(y + 16)));
        }
        return 1;
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = b0; b < b1; b++, y += 32) {
            const uint8_t *blk = row + b * stride;
            fic_half hd, hm = 0;
            memcpy(&hd, blk, 2);
            if (is1) memcpy(&hm, blk + 2, 2);
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            __m512 y0 = _mm512_loadu_ps(y), y1 = _mm512_loadu_ps(y + 16);
            if (is1) { /* w = d q + m in one rounding, then y += a w: a m and a d q added apart could
                        * cancel, an error the float bound on |w| does not cover */
                const __m512 dv = _mm512_set1_ps(h2f_f16c(hd)), mv = _mm512_set1_ps(h2f_f16c(hm)), av = _mm512_set1_ps(a);
                _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_fmadd_ps(cvt16_i8(lo), dv, mv), av, y0));
                _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(_mm512_fmadd_ps(cvt16_i8(hi), dv, mv), av, y1));
                continue;
            }
            const __m512 ad = _mm512_set1_ps(a * h2f_f16c(hd));
            _mm512_storeu_ps(y, _mm512_fmadd_ps(cvt16_i8(lo), ad, y0));
            _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(cvt16_i8(hi), ad, y1));
        }
        return 1;
    }
    case FIC_Q1_0:
        for (int64_t b = b0; b < b1; b++, y += QK1_0) {
            const block_q1_0 *blk = (const block_q1_0 *)row + b;
            float ad = a * h2f_f16c(blk->d);
            __m512 pos = _mm512_set1_ps(ad), neg = _mm512_set1_ps(-ad);
            uint16_t mk[8];
            memcpy(mk, blk->qs, 16);
            for (int c = 0; c < 8; c++)
                _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(_mm512_loadu_ps(y + 16 * c),
                                                           _mm512_mask_blend_ps((__mmask16)mk[c], neg, pos)));
        }
        return 1;
    default:
        return 0;
    }
}

/* accum_rows for Q1_0, four rows at a time: with w = +-d, y += sum_r a_r w_r is
 * y += C + sum_r (bit ? 2 a_r d_r : 0) with C = -sum_r a_r d_r, so each row costs one masked
 * add per 16 weights and y is loaded and stored once per four rows. Pad rows have a = 0. */
TGT_AVX512 static void accum_q1_group_avx512(const uint8_t *const rows[4], const float a[4], int64_t b0, int64_t b1,
                                             float *y) {
    for (int64_t b = b0; b < b1; b++) {
        const block_q1_0 *blk[4];
        __m512 two[4];
        float c = 0.0f;
        for (int r = 0; r < 4; r++) {
            blk[r] = (const block_q1_0 *)rows[r] + b;
            float ad = a[r] * h2f_f16c(blk[r]->d);
            c -= ad;
            two[r] = _mm512_set1_ps(2.0f * ad);
        }
        __m512 cv = _mm512_set1_ps(c);
        float *yb = y + b * QK1_0;
        for (int q = 0; q < 8; q++) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(yb + 16 * q), cv);
            for (int r = 0; r < 4; r++) {
                uint16_t m;
                memcpy(&m, blk[r]->qs + 2 * q, 2);
                v = _mm512_mask_add_ps(v, (__mmask16)m, v, two[r]);
            }
            _mm512_storeu_ps(yb + 16 * q, v);
        }
    }
}

/* 6 rows x 4 tokens of dot products: 24 accumulators in registers, 10 loads per 24 FMAs, which
 * the L2 can feed (4 x 3 needed more than it delivers). Named variables, not an array: gcc
 * kept an array of accumulators in memory. */
#define G_ACC(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, a##r##3 = a##r##0
#define G_ROW(r, LOAD)                                                               \
    do {                                                                             \
        __m512 wv = LOAD(w + r * k + i);                                             \
        a##r##0 = _mm512_fmadd_ps(wv, x0, a##r##0);                                  \
        a##r##1 = _mm512_fmadd_ps(wv, x1, a##r##1);                                  \
        a##r##2 = _mm512_fmadd_ps(wv, x2, a##r##2);                                  \
        a##r##3 = _mm512_fmadd_ps(wv, x3, a##r##3);                                  \
    } while (0)
#define G_STEP(LOAD)                                                                 \
    do {                                                                             \
        __m512 x0 = LOAD(x + i), x1 = LOAD(x + k + i), x2 = LOAD(x + 2 * k + i),     \
               x3 = LOAD(x + 3 * k + i);                                             \
        G_ROW(0, LOAD); G_ROW(1, LOAD); G_ROW(2, LOAD);                              \
        G_ROW(3, LOAD); G_ROW(4, LOAD); G_ROW(5, LOAD);                              \
    } while (0)
#define G_STORE(r)                                                                   \
    do {                                                                             \
        y[r] = _mm512_reduce_add_ps(a##r##0);                                        \
        y[ldy + r] = _mm512_reduce_add_ps(a##r##1);                                  \
        y[2 * ldy + r] = _mm512_reduce_add_ps(a##r##2);                              \
        y[3 * ldy + r] = _mm512_reduce_add_ps(a##r##3);                              \
    } while (0)

TGT_AVX512 static void gemm_6x4_avx512(const float *w, const float *x, int64_t k, float *y, int64_t ldy) {
    G_ACC(0); G_ACC(1); G_ACC(2); G_ACC(3); G_ACC(4); G_ACC(5);
    int64_t i = 0;
#define LOAD_FULL(p) _mm512_loadu_ps(p)
    for (; i + 16 <= k; i += 16) G_STEP(LOAD_FULL);
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
#define LOAD_TAIL(p) _mm512_maskz_loadu_ps(mk, p)
        G_STEP(LOAD_TAIL);
    }
    G_STORE(0); G_STORE(1); G_STORE(2); G_STORE(3); G_STORE(4); G_STORE(5);
}
#undef LOAD_FULL
#undef LOAD_TAIL
#undef G_ACC
#undef G_ROW
#undef G_STEP
#undef G_STORE

/* One row against nt <= 4 tokens: the edges of a tile. Each (row, token) sums in gemm_6x4_avx512's
 * order (one accumulator over k in steps of 16, a masked tail, one reduction), so a row's result
 * does not depend on where a tile's edge falls: the FFN's fixed-point sums rely on that when a call
 * holds other experts (tests/test_budget.py, exact mode streaming). */
TGT_AVX512 static void gemm_1xn_avx512(const float *w, const float *x, int64_t k, float *y, int64_t ldy, int nt) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m512 wv = _mm512_loadu_ps(w + i);
        for (int t = 0; t < nt; t++) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * k + i), acc[t]);
    }
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
        const __m512 wv = _mm512_maskz_loadu_ps(mk, w + i);
        for (int t = 0; t < nt; t++) acc[t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + t * k + i), acc[t]);
    }
    for (int t = 0; t < nt; t++) y[t * ldy] = _mm512_reduce_add_ps(acc[t]);
}

TGT_AVX512 static void gemm_tile_avx512(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k;
    for (int64_t t = 0; t < j->t; t += 4) {
        const float *x = j->x + t * k;
        float *y = j->y + t * j->m + r0;
        int nt = j->t - t >= 4 ? 4 : (int)(j->t - t);
        int64_t r = 0;
        if (nt == 4)
            for (; r + 6 <= nr; r += 6) gemm_6x4_avx512(tile + r * k, x, k, y + r, j->m);
        for (; r < nr; r++) gemm_1xn_avx512(tile + r * k, x, k, y + r, j->m, nt);
    }
}

/* x -> int8 in the quad layout of q4_quad_vnni (q8_0 rounding, as quantize_x_avx2), with its
 * per-lane scales and the per-lane dx * sum xq (times -8 for Q4_0); a last partial quad padded
 * with zeros (kern_q4_quad_weights). */
TGT_AVX512 void kern_quantize_x_quads_avx512(const float *x, int64_t k, int q4_0, int8_t *xq, float *xscale16,
                                               float *xcorr16) {
    const int64_t nb = k / 32, nq = (nb + 3) / 4;
    memset(xq + 128 * (nq - 1), 0, 128);
    memset(xscale16 + 16 * (nq - 1), 0, 16 * sizeof(float));
    memset(xcorr16 + 16 * (nq - 1), 0, 16 * sizeof(float));
    for (int64_t b = 0; b < nb; b++) {
        const int64_t q = b / 4, h = b % 4;
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        _mm_storeu_si128((__m128i *)(xq + 128 * q + 16 * h), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + 128 * q + 64 + 16 * h), _mm512_cvtsepi32_epi8(q1));
        /* lane 4h + l of this quad: weights 4l..4l+3 and 16+4l..16+4l+3 of block b */
        const int8_t *lo = xq + 128 * q + 16 * h, *hi = lo + 64;
        const float f = q4_0 ? -8.0f * dx : dx;
        for (int l = 0; l < 4; l++) {
            int32_t s = 0;
            for (int i = 0; i < 4; i++) s += lo[4 * l + i] + hi[4 * l + i];
            xscale16[16 * q + 4 * h + l] = dx;
            xcorr16[16 * q + 4 * h + l] = f * (float)s;
        }
    }
}

/* x -> q8 blocks of 32 stored as u8 (xq + 128) for q1_block_sad, with per-lane dx and -1024 dx
 * (16 lanes per 128 weights, lane L -> q8 block L / 4). */
TGT_AVX512 void kern_quantize_x_q1_avx512(const float *x, int64_t k, uint8_t *xu, float *xscale16, float *xcorr16) {
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        const __m128i bias = _mm_set1_epi8((char)0x80);
        _mm_storeu_si128((__m128i *)(xu + 32 * b), _mm_xor_si128(_mm512_cvtsepi32_epi8(q0), bias));
        _mm_storeu_si128((__m128i *)(xu + 32 * b + 16), _mm_xor_si128(_mm512_cvtsepi32_epi8(q1), bias));
        for (int l = 0; l < 4; l++) {
            xscale16[4 * b + l] = dx;
            xcorr16[4 * b + l] = -1024.0f * dx;
        }
    }
}

/* x -> q8 blocks of 32 (as above) stored as bit planes for dot_q1_planes, with 2 dx and
 * -dx sum(xq) per q8 block (lane L of group g is q8 block 16 g + L). planes: 512 bytes per
 * group of 4 blocks, a16/c16: 16 floats per group, a last partial group zero-padded; xq: k bytes
 * of scratch. */
TGT_AVX512Q1 void kern_quantize_x_q1_planes(const float *x, int64_t k, uint8_t *planes, float *a16, float *c16,
                                              int8_t *xq) {
    const int64_t nb = k / QK1_0, ng = (nb + 3) / 4;
    memset(planes, 0, (size_t)ng * 512);
    memset(a16, 0, (size_t)ng * 16 * sizeof *a16);
    memset(c16, 0, (size_t)ng * 16 * sizeof *c16);
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        _mm_storeu_si128((__m128i *)(xq + 32 * b), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)); /* |q| <= 127: no saturation */
        a16[b] = 2.0f * dx;
        c16[b] = -dx * (float)sum;
    }
    for (int64_t h = 0; h < k / 64; h++) { /* 64 weights: half h % 2 of block h / 2 */
        const int64_t blk = h / 2, g = blk / 4, l = blk % 4;
        __m512i v = _mm512_loadu_si512((const void *)(xq + 64 * h));
        for (int p = 0; p < 8; p++) {
            uint64_t bits = _cvtmask64_u64(_mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1u << p))));
            memcpy(planes + 512 * g + 64 * p + 16 * l + 8 * (h % 2), &bits, 8);
        }
    }
}

/* accum_rows for Q1_0: rows outer, this thread's columns inner, four rows per pass
 * (accum_q1_group_avx512); each row piece prefetched ACCUM_PF_ROWS rows ahead. */
TGT_AVX512 static void accum_q1_avx512(const job_t *j, int64_t b0, int64_t b1) {
    const uint8_t *rows[4];
    float a[4];
    int n = 0;
    const int64_t piece = (b1 - b0) * j->bb;
    for (int64_t i = 0; i < j->m; i++) {
        if (i + ACCUM_PF_ROWS < j->m) {
            const uint8_t *ahead = j->w + (i + ACCUM_PF_ROWS) * j->row_bytes + b0 * j->bb;
            for (int64_t off = 0; off < piece; off += 64) FIC_PREFETCH(ahead + off);
        }
        if (j->a[i] == 0.0f) continue;
        rows[n] = j->w + i * j->row_bytes;
        a[n++] = j->a[i];
        if (n == 4) {
            accum_q1_group_avx512(rows, a, b0, b1, j->y);
            n = 0;
        }
    }
    if (n > 0) {
        for (int r = n; r < 4; r++) {
            rows[r] = rows[0];
            a[r] = 0.0f;
        }
        accum_q1_group_avx512(rows, a, b0, b1, j->y);
    }
}

/* ---- FFN phase 1 and phase 2 fast paths (ffn.c) ------------------------------------------ */

/* The same for Q1_0 on AVX-512 (h_e as u8 q8 blocks, q1_block_sad; sums come out negated). */
TGT_AVX512 static inline __attribute__((always_inline)) void down_cols_q1_block(const ffn_t *f, int64_t r, int nr,
                                                                                int64_t r_end) {
    __m512 acc[P2_ROWS];
    for (int i = 0; i < nr; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        const uint8_t *w = down_part(f, e) + r * rb;
        p2_prefetch(w, rb, r, nr, r_end);
        for (int64_t b = 0; b < j->k / QK1_0; b++) {
            __m512i xu0 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0));
            __m512i xu1 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0 + 64));
            __m512 sc = _mm512_loadu_ps(j->xscale16 + 16 * b), corr = _mm512_loadu_ps(j->xcorr16 + 16 * b);
            for (int i = 0; i < nr; i++)
                acc[i] = q1_block_sad((const block_q1_0 *)(w + i * rb) + b, xu0, xu1, sc, corr, acc[i]);
        }
    }
    for (int i = 0; i < nr; i++) f->y[r + i] -= _mm512_reduce_add_ps(acc[i]);
}

/* The same with h_e as bit planes (q1_planes: CPUs with VNNI/BITALG/VBMI), q1_group_planes per
 * group of 4 blocks; sums come out with their sign. */
TGT_AVX512Q1 static inline __attribute__((always_inline)) void down_cols_q1_planes_block(const ffn_t *f, int64_t r,
                                                                                      int nr, int64_t r_end) {
    __m512 acc[P2_ROWS];
    for (int i = 0; i < nr; i++) acc[i] = _mm512_setzero_ps();
    const int32_t *cw = q1_plane_weights;
    __asm__("" : "+r"(cw)); /* as dot_q1_planes_n: the plane weights stay loads, not rebuilt */
    const int64_t gbytes = 4 * (int64_t)sizeof(block_q1_0);
    for (int64_t e = 0; e < f->n_experts; e++) {
        if (f->skip[e]) continue;
        const job_t *j = &f->jd[e];
        const int64_t rb = f->rb_d[e];
        const uint8_t *w = down_part(f, e) + r * rb;
        p2_prefetch(w, rb, r, nr, r_end);
        const int64_t nb = j->k / QK1_0, ng = (nb + 3) / 4;
        for (int64_t g = 0; g < ng; g++) {
            __m512i pl[8];
            for (int p = 0; p < 8; p++) pl[p] = _mm512_loadu_si512((const void *)(j->xu + 512 * g + 64 * p));
            __m512 a = _mm512_loadu_ps(j->xscale16 + 16 * g), c = _mm512_loadu_ps(j->xcorr16 + 16 * g);
            const int nrem = (int)(nb - 4 * g);
            if (nrem >= 4) {
                for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(w + i * rb + g * gbytes, 4, pl, a, c, acc[i], cw);
            } else {
                for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(w + i * rb + g * gbytes, nrem, pl, a, c, acc[i], cw);
            }
        }
    }
    for (int i = 0; i < nr; i++) f->y[r + i] += _mm512_reduce_add_ps(acc[i]);
}

TGT_AVX512 static void down_cols_q1_avx512(const ffn_t *f, int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + P2_ROWS <= r1; r += P2_ROWS) down_cols_q1_block(f, r, P2_ROWS, r1);
    for (; r < r1; r++) down_cols_q1_block(f, r, 1, r1);
}

TGT_AVX512Q1 static void down_cols_q1_planes(const ffn_t *f, int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + P2_ROWS <= r1; r += P2_ROWS) down_cols_q1_planes_block(f, r, P2_ROWS, r1);
    for (; r < r1; r++) down_cols_q1_planes_block(f, r, 1, r1);
}

/* fixed_add_avx2's arithmetic 8 at a time: c * 2^32 + 1.5 * 2^52 in a double rounds c * 2^32 to an
 * integer (half to even) in its low bits while |c| < 2^19; groups with a larger value or a NaN take
 * fixed_add_ref. The same bits as fixed_add_avx2 in half the operations (prefill adds every
 * expert's t x d_model piece into the accumulator, 7% of a 2,000-token SmolLM2 prefill). */
TGT_AVX512 static void fixed_add_avx512(const float *c, int64_t *acc, int64_t n) {
    const __m512d magic = _mm512_set1_pd(0x1.8p52), scale = _mm512_set1_pd(0x1p32);
    const __m256 limit = _mm256_set1_ps(0x1p19f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(c + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), limit, _CMP_LT_OQ)) != 0xff) {
            fixed_add_ref(c + i, acc + i, 8); /* NaN compares false */
            continue;
        }
        const __m512d r = _mm512_fmadd_pd(_mm512_cvtps_pd(v), scale, magic);
        const __m512i f = _mm512_sub_epi64(_mm512_castpd_si512(r), _mm512_castpd_si512(magic));
        _mm512_storeu_si512((void *)(acc + i), _mm512_add_epi64(_mm512_loadu_si512((const void *)(acc + i)), f));
    }
    if (i == n) return;
    /* the last n - i < 8 through masks (rows of 54 or 60 a call end in one): the lanes past n load
     * 0, which is in range, and are not stored */
    const __mmask8 m = (__mmask8)((1u << (n - i)) - 1);
    const __m256 v = _mm256_maskz_loadu_ps(m, c + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), limit, _CMP_LT_OQ)) != 0xff) {
        fixed_add_ref(c + i, acc + i, n - i);
        return;
    }
    const __m512d r = _mm512_fmadd_pd(_mm512_cvtps_pd(v), scale, magic);
    const __m512i f = _mm512_sub_epi64(_mm512_castpd_si512(r), _mm512_castpd_si512(magic));
    _mm512_mask_storeu_epi64(acc + i, m, _mm512_add_epi64(_mm512_maskz_loadu_epi64(m, acc + i), f));
}

/* ---- table entries built from the pieces above --------------------------------------------- */

/* Two consecutive rows against one prepared x (matvec and FFN phase 1 pair rows). */
TGT_AVX512 static void dot2_q1_0_avx512(const job_t *j, const uint8_t *row0, float *y) {
    if (j->q1_planes)
        dot_q1_planes(j, row0, 2, y);
    else
        dot_q1_avx512(j, row0, row0 + j->row_bytes, 2, y);
}

_Static_assert(P2_ROWS == 8, "sum8_rows and q4_rows_k64 take 8 rows");

/* out[i] = the sum of h[i]'s 8 lanes, i < 8, by one tree of horizontal adds (a fixed order for each
 * h[i], whatever the others hold). */
TGT_AVX512 static ALWAYS_INLINE void sum8_rows(const __m256 h[8], float *out) {
    const __m256 a0 = _mm256_hadd_ps(h[0], h[1]), a1 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 a2 = _mm256_hadd_ps(h[4], h[5]), a3 = _mm256_hadd_ps(h[6], h[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3); /* rows 0-3 | 0-3, 4-7 | 4-7 */
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31)));
}

/* FFN phase 1 takes rows this short (in weights) two at a time (1.15x at 576 in L2); its longer
 * rows, prefetched in software, ran the same one at a time or two (bench/RESULTS.md). */
#define Q4_PAIR_MAX_K 1024

/* The nibble bytes of a whole quad (Q4_0, Q4_1) as vpermt2b indices into its first 64 bytes and
 * the 16 bytes that end it (indices from 64 pick those: byte 4 stride - 16 + (i - 64)). */
static const uint8_t q4_nibble_idx[2][64] __attribute__((aligned(64))) = {
    {2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 24, 25,
     26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49,
     50, 51, 52, 53, 56, 57, 58, 59, 60, 61, 62, 63, 72, 73, 74, 75, 76, 77, 78, 79},
    {4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 24, 25, 26, 27, 28, 29,
     30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
     56, 57, 58, 59, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79}};

#define Q4V_CAT2(a, b) a##_##b
#define Q4V_CAT(a, b) Q4V_CAT2(a, b)
#define Q4V(name) Q4V_CAT(name, Q4V_SFX)

#define Q4V_VBMI 0
#define Q4V_TGT TGT_AVX512VNNI
#define Q4V_SFX vnni
#include "kernels_q4_vnni.h"
#undef Q4V_VBMI
#undef Q4V_TGT
#undef Q4V_SFX

#define Q4V_VBMI 1
#define Q4V_TGT TGT_AVX512Q4VBMI
#define Q4V_SFX vbmi
#include "kernels_q4_vnni.h"
#undef Q4V_VBMI
#undef Q4V_TGT
#undef Q4V_SFX

/* The float dot's int8 branch (a row alone: matvec's odd last row, the generic FFN loops). */
TGT_AVX512VNNI static float dot_q4_vnni(const job_t *j, const uint8_t *row, const float *x) {
    (void)x;
    return q4_row_vnni(j, row);
}

/* h_e's layout depends on n_e (prep_x_mode): mixed layouts take the generic loop (0). */
TGT_AVX512 static int down_cols_q1(const ffn_t *f, int64_t r0, int64_t r1) {
    if (f->acc != NULL) return 0;
    if (f->q1_layout == Q1_ALL_PLANES) {
        down_cols_q1_planes(f, r0, r1);
        return 1;
    }
    if (f->q1_layout == Q1_ALL_SAD) {
        down_cols_q1_avx512(f, r0, r1);
        return 1;
    }
    return 0;
}

TGT_AVX512 static int axpy_blocks_q8_0(const uint8_t *row, int64_t b0, int64_t b1, float a, float *y) {
    return axpy_blocks_avx512(FIC_Q8_0, row, b0, b1, a, y);
}
TGT_AVX512 static int axpy_blocks_q4_0(const uint8_t *row, int64_t b0, int64_t b1, float a, float *y) {
    return axpy_blocks_avx512(FIC_Q4_0, row, b0, b1, a, y);
}
TGT_AVX512 static int axpy_blocks_q4_1(const uint8_t *row, int64_t b0, int64_t b1, float a, float *y) {
    return axpy_blocks_avx512(FIC_Q4_1, row, b0, b1, a, y);
}

#define AVX512_DOT(name, FMT)                                                                        \
    TGT_AVX512 static float dot_##name##_avx512(const job_t *j, const uint8_t *row, const float *x) { \
        return dot_avx512(FMT, j, row, x);                                                           \
    }
AVX512_DOT(f32, FIC_F32)
AVX512_DOT(f16, FIC_F16)
AVX512_DOT(q4_0, FIC_Q4_0)
AVX512_DOT(q4_1, FIC_Q4_1)
AVX512_DOT(q1_0, FIC_Q1_0)
#undef AVX512_DOT

/* Q8_0: int8 activations (FIC_DECODE's default) through the AVX2 kernel, or with VNNI through
 * kernels_vnni.c's, both faster here than the 512-bit float one (bench/RESULTS.md, "An AVX-512
 * machine"), which exact requests keep. Q5_0 takes the AVX2 int8 kernel outright, as do Q4_K and
 * Q6_K without VNNI. */
TGT_AVX512 static float dot_q8_0_x512(const job_t *j, const uint8_t *row, const float *x) {
    return j->xq != NULL ? kern_q8x_dot_q8_0_avx2(j, row, x) : dot_avx512(FIC_Q8_0, j, row, x);
}
TGT_AVX512VNNI static float dot_q8_0_vnni(const job_t *j, const uint8_t *row, const float *x) {
    return j->xq != NULL ? kern_vnni_dot_q8_0(j, row, x) : dot_avx512(FIC_Q8_0, j, row, x);
}

/* The rows every AVX-512 table shares; Q8_0, Q4_K, Q6_K (VNNI or not), Q4_0, Q4_1 and Q1_0 differ
 * between them (below). Columns: traits, xprep, xprep_small, dot, dot2, deq, axpy_blocks, accum,
 * rows, down_cols, dot_prefetches. */
#define AVX512_COMMON                                                                                          \
    [FIC_F32] = {KT_F32, XP_NONE, XP_NONE, dot_f32_avx512, NULL, kern_deq_f32_ref, NULL, NULL, NULL, NULL},     \
    [FIC_F16] = {KT_F16, XP_NONE, XP_NONE, dot_f16_avx512, NULL, kern_deq_f16_avx2, NULL, NULL, NULL, NULL},    \
    [FIC_Q5_0] = {KT_Q5_0, XP_Q8, XP_NONE, kern_q8x_dot_q5_0_avx2, NULL, kern_deq_q5_0_avx2, NULL, NULL, NULL,  \
                  kern_q8x_down_q5_0_avx2, 1}

/* Without VNNI: Q8_0, Q4_K and Q6_K's int8 decode on the AVX2 kernels. */
#define AVX512_Q8X_AVX2                                                                                        \
    [FIC_Q8_0] = {KT_Q8_0, XP_Q8, XP_NONE, dot_q8_0_x512, NULL, kern_deq_q8_0_avx2, axpy_blocks_q8_0, NULL,     \
                  NULL, kern_q8x_down_q8_0_avx2},                                                              \
    [FIC_Q4_K] = {KT_Q4_K, XP_Q8, XP_SUMS, kern_q8x_dot_q4_K_avx2, NULL, kern_deq_q4_K_avx2, NULL, NULL, NULL,  \
                  kern_q8x_down_q4_K_avx2, 1},                                                                 \
    [FIC_Q6_K] = {KT_Q6_K, XP_Q8, XP_NONE, kern_q8x_dot_q6_K_avx2, NULL, kern_deq_q6_K_avx2, NULL, NULL, NULL,  \
                  kern_q8x_down_q6_K_avx2, 1}

/* With VNNI: kernels_vnni.c's, rows in pairs. */
#define AVX512_Q8X_VNNI                                                                                        \
    [FIC_Q8_0] = {KT_Q8_0, XP_Q8, XP_NONE, dot_q8_0_vnni, kern_vnni_dot2_q8_0, kern_deq_q8_0_avx2,             \
                  axpy_blocks_q8_0, NULL, NULL, kern_vnni_down_q8_0, 1},                                       \
    [FIC_Q4_K] = {KT_Q4_K, XP_Q8, XP_SUMS, kern_vnni_dot_q4_K, kern_vnni_dot2_q4_K, kern_deq_q4_K_avx2, NULL,   \
                  NULL, NULL, kern_vnni_down_q4_K, 1},                                                         \
    [FIC_Q6_K] = {KT_Q6_K, XP_Q8, XP_NONE, kern_vnni_dot_q6_K, kern_vnni_dot2_q6_K, kern_deq_q6_K_avx2, NULL,   \
                  NULL, NULL, kern_vnni_down_q6_K, 1}

/* Q1_0 in the r32 layout (q1r32.c) with VBMI and VNNI: the same integer sums and float steps as
 * q1r32_avx2, so the same bits, in about a third of its vector operations. Per q8 block of 32
 * weights the group's 4 sign bytes of 32 rows (128 bytes, two loads) are regrouped by one vpermt2b
 * per 16 rows so that dword r holds row r's 4 bytes. One vpermb per nibble then looks up all 4
 * bytes at once in a 64-byte load of their 4 tables (q1r32_tab_at: nibble | 16 x byte position),
 * and one vpdpbusd per L and H adds a row's 4 bytes of lookups, times 2 and 32, straight into its
 * int32 sum (started at -cx of the Q1_0 block's four q8 blocks): no unpacking, no int16 stage, no
 * lanes to add up; one float step per Q1_0 block. */
#define Q1R32_PF_BLOCKS_512 2 /* blocks ahead to prefetch: from DRAM 1.27x over 8 on a Xeon (RESULTS.md) */

TGT_AVX512Q1 static ALWAYS_INLINE __m512i q1r32_sum16(__m512i v, __m512i sum, const __m512i tab[4]) {
    const __m512i nib = _mm512_set1_epi8(15), pos = _mm512_set1_epi32(0x30201000); /* 16 x byte position */
    const __m512i lo = _mm512_ternarylogic_epi32(v, nib, pos, 0xEA),                /* (v & 15) | pos */
        hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, pos, 0xEA);
    const __m512i L = _mm512_add_epi8(_mm512_permutexvar_epi8(lo, tab[0]), _mm512_permutexvar_epi8(hi, tab[1]));
    const __m512i H = _mm512_add_epi8(_mm512_permutexvar_epi8(lo, tab[2]), _mm512_permutexvar_epi8(hi, tab[3]));
    sum = _mm512_dpbusd_epi32(sum, L, _mm512_set1_epi8(2)); /* L, H <= 120 a byte */
    return _mm512_dpbusd_epi32(sum, H, _mm512_set1_epi8(32));
}

/* byte 4r + i of the regrouped vector of rows 16h..16h+15: row 16h + r's sign byte i of four,
 * from loads a (bytes 0, 1 of the q8 block, 32 rows each) and b (bytes 2, 3: indices 64 on) */
#define Q1R32_ROW(h, r) 16 * h + r, 32 + 16 * h + r, 64 + 16 * h + r, 96 + 16 * h + r
#define Q1R32_HALF(h)                                                                                          \
    Q1R32_ROW(h, 0), Q1R32_ROW(h, 1), Q1R32_ROW(h, 2), Q1R32_ROW(h, 3), Q1R32_ROW(h, 4), Q1R32_ROW(h, 5),      \
        Q1R32_ROW(h, 6), Q1R32_ROW(h, 7), Q1R32_ROW(h, 8), Q1R32_ROW(h, 9), Q1R32_ROW(h, 10), Q1R32_ROW(h, 11), \
        Q1R32_ROW(h, 12), Q1R32_ROW(h, 13), Q1R32_ROW(h, 14), Q1R32_ROW(h, 15)
const uint8_t q1r32_regroup[2][64] __attribute__((aligned(64))) = {{Q1R32_HALF(0)}, {Q1R32_HALF(1)}};
#undef Q1R32_HALF
#undef Q1R32_ROW

TGT_AVX512Q1 static void q1r32_avx512(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx,
                                      const float *dx, float *y, int64_t g0, int64_t g1) {
    const __m512i perm0 = _mm512_load_si512((const void *)q1r32_regroup[0]),
                  perm1 = _mm512_load_si512((const void *)q1r32_regroup[1]);
    const uint8_t *end = w + g1 * nb * Q1R32_BLOCK_BYTES;
    for (int64_t g = g0; g < g1; g++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(); /* rows 0-15, 16-31 */
        const uint8_t *p = w + g * nb * Q1R32_BLOCK_BYTES;
        for (int64_t b = 0; b < nb; b++, p += Q1R32_BLOCK_BYTES) {
            const uint8_t *pf = p + Q1R32_PF_BLOCKS_512 * Q1R32_BLOCK_BYTES;
            if (pf < end)
                for (int o = 0; o < Q1R32_BLOCK_BYTES; o += 64) FIC_PREFETCH(pf + o);
            const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)),
                         d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
            const int16_t *c = cx + b * (QK1_0 / 32);
            __m512i s0 = _mm512_set1_epi32(-((int32_t)c[0] + c[1] + c[2] + c[3])), s1 = s0;
            for (int q = 0; q < QK1_0 / 32; q++) {
                /* the q8 block's tables: L of the low nibbles, L of the high ones, then H of each */
                const uint8_t *t = tab + q1r32_tab_at(8 * (b * (QK1_0 / 32) + q)), *s = p + 2 * Q1R32_ROWS + 128 * q;
                const __m512i tq[4] = {_mm512_loadu_si512((const void *)t),
                                       _mm512_loadu_si512((const void *)(t + q1r32_tab_at(1))),
                                       _mm512_loadu_si512((const void *)(t + Q1R32_TAB_H)),
                                       _mm512_loadu_si512((const void *)(t + Q1R32_TAB_H + q1r32_tab_at(1)))};
                const __m512i a = _mm512_loadu_si512((const void *)s), bb = _mm512_loadu_si512((const void *)(s + 64));
                s0 = q1r32_sum16(_mm512_permutex2var_epi8(a, perm0, bb), s0, tq);
                s1 = q1r32_sum16(_mm512_permutex2var_epi8(a, perm1, bb), s1, tq);
            }
            const __m512 db = _mm512_set1_ps(dx[b]);
            acc0 = _mm512_fmadd_ps(_mm512_mul_ps(d0, db), _mm512_cvtepi32_ps(s0), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_mul_ps(d1, db), _mm512_cvtepi32_ps(s1), acc1);
        }
        _mm512_storeu_ps(y + g * Q1R32_ROWS, acc0);
        _mm512_storeu_ps(y + g * Q1R32_ROWS + 16, acc1);
    }
}

/* q1r32_build_tables with VBMI (the same bytes): per q8 block, for each parity o of its eight
 * 4-weight groups, lane 16 j + n of a vector is entry n of group 2 j + o, where q1r32_tab_at puts
 * it. Entry n sums term t of the group where bit t of n is set: a zero-masked vpermb per t picks
 * byte 4 (2 j + o) + t of the block's low nibbles (L) or arithmetic high nibbles (H, from 32). */
TGT_AVX512Q1 void q1r32_build_tables_avx512(const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx) {
    static const __mmask64 bit_set[4] = {0xAAAAAAAAAAAAAAAAull, 0xCCCCCCCCCCCCCCCCull, 0xF0F0F0F0F0F0F0F0ull,
                                         0xFF00FF00FF00FF00ull};
    /* byte 8 j in lane j (16 bytes), then + 4 o + t */
    const __m512i lanes = _mm512_set_epi32(0x18181818, 0x18181818, 0x18181818, 0x18181818, 0x10101010, 0x10101010,
                                           0x10101010, 0x10101010, 0x08080808, 0x08080808, 0x08080808, 0x08080808, 0, 0,
                                           0, 0);
    __m512i idx[2][4];
    for (int o = 0; o < 2; o++)
        for (int t = 0; t < 4; t++) idx[o][t] = _mm512_add_epi8(lanes, _mm512_set1_epi8((char)(4 * o + t)));
    const __m512i low4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8), bias = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < k / 32; b++) {
        const __m256i x8 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        const __m512i x = _mm512_castsi256_si512(x8); /* indices stay below 32 */
        const __m512i lo = _mm512_and_si512(x, low4);
        /* x >> 4 rounded down: ((x + 128) >> 4) - 8 on unsigned bytes */
        const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(_mm512_xor_si512(x, bias), 4), low4), eight);
        uint8_t *t = tab + b * 256;
        for (int o = 0; o < 2; o++) {
            __m512i L = _mm512_setzero_si512(), H = _mm512_set1_epi8(32);
            for (int i = 0; i < 4; i++) {
                L = _mm512_add_epi8(L, _mm512_maskz_permutexvar_epi8(bit_set[i], idx[o][i], lo));
                H = _mm512_add_epi8(H, _mm512_maskz_permutexvar_epi8(bit_set[i], idx[o][i], hi));
            }
            _mm512_storeu_si512((void *)(t + 64 * o), L);
            _mm512_storeu_si512((void *)(t + Q1R32_TAB_H + 64 * o), H);
        }
        /* cx = 8192 + sum xq: psadbw of x + 128 sums 8 bytes a lane */
        const __m256i s = _mm256_sad_epu8(_mm256_xor_si256(x8, _mm256_set1_epi8((char)0x80)), _mm256_setzero_si256());
        const int64_t sum = _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
                            _mm256_extract_epi64(s, 3) - 32 * 128;
        cx[b] = (int16_t)(8192 + sum);
    }
}

/* Q1_0: int8 activations as u8 for psadbw (XP_Q1_AVX512), or as bit planes where the CPU has
 * VNNI/BITALG/VBMI and the row fills its groups of 4 blocks (prep_x_mode). */
#define AVX512_Q1(XP)                                                                                          \
    [FIC_Q1_0] = {KT_Q1_0, XP, XP_Q1_AVX512, dot_q1_0_avx512, dot2_q1_0_avx512, deq_q1_0_avx512, NULL,          \
                  accum_q1_avx512, NULL, down_cols_q1}

const fic_kernels fic_kernels_avx512 = {
    FIC_IMPL_AVX512,
    axpy_avx512,
    gemm_tile_avx512,
    {
        AVX512_COMMON,
        AVX512_Q8X_AVX2,
        /* no VNNI: int8 activations through the AVX2 kernels, as the AVX2 table */
        [FIC_Q4_0] = {KT_Q4_0, XP_Q8, XP_NONE, kern_q8x_dot_q4_0_avx2, NULL, kern_deq_q4_0_avx2, axpy_blocks_q4_0,
                      NULL, NULL, kern_q8x_down_q4_0_avx2, 1},
        [FIC_Q4_1] = {KT_Q4_1, XP_Q8, XP_SUMS, kern_q8x_dot_q4_1_avx2, NULL, kern_deq_q4_1_avx2, axpy_blocks_q4_1,
                      NULL, NULL, kern_q8x_down_q4_1_avx2, 1},
        AVX512_Q1(XP_Q1_AVX512),
    },
    NULL, /* gemm_panel: not measured on AVX-512 (gemm_tile_avx512's 6 x 4 blocks) */
    fixed_add_avx512,
    NULL, /* pack8: no panels here */
    silu_mul_avx2,
    q1r32_avx2,
    q1r32_move_avx2,
    NULL, /* q1r32_tiles: a token at a time */
};

/* VNNI: Q4_0/Q4_1 with x in the quad layout when k >= 64 (else float, as without VNNI); S names
 * the copy of kernels_q4_vnni.h (vnni, or vbmi where the CPU has VBMI and GFNI too). */
#define AVX512_Q4_VNNI(S)                                                                                        \
    [FIC_Q4_0] = {KT_Q4_0, XP_Q4_VNNI, XP_NONE, dot_q4_0_avx512, dot2_q4_##S, kern_deq_q4_0_avx2,                \
                  axpy_blocks_q4_0, NULL, rows_q4_##S, down_cols_q4_##S, 1},                                     \
    [FIC_Q4_1] = {KT_Q4_1, XP_Q4_VNNI, XP_SUMS, dot_q4_1_avx512, dot2_q4_##S, kern_deq_q4_1_avx2,                \
                  axpy_blocks_q4_1, NULL, rows_q4_##S, down_cols_q4_##S, 1}

const fic_kernels fic_kernels_avx512_vnni = {
    FIC_IMPL_AVX512,
    axpy_avx512,
    gemm_tile_avx512,
    {AVX512_COMMON, AVX512_Q8X_VNNI, AVX512_Q4_VNNI(vnni), AVX512_Q1(XP_Q1_AVX512)},
    NULL,
    fixed_add_avx512,
    NULL, /* pack8: no panels here */
    silu_mul_avx2,
    q1r32_avx2,
    q1r32_move_avx2,
    NULL, /* q1r32_tiles: a token at a time */
};

/* VNNI, BITALG, VBMI and GFNI: Q1_0 as bit planes, the r32 kernel on VBMI and Q4's VBMI copy; with
 * AMX-INT8 on top (Sapphire Rapids on) the r32 prefill as tile products (kernels_amx.c): pool.c has
 * asked Linux for the tile state before saying the CPU has it. */
#define AVX512_Q1_TABLE(TILES)                                                                                 \
    {                                                                                                          \
        FIC_IMPL_AVX512, axpy_avx512, gemm_tile_avx512,                                                       \
            {AVX512_COMMON, AVX512_Q8X_VNNI, AVX512_Q4_VNNI(vbmi), AVX512_Q1(XP_Q1_PLANES)},                   \
            NULL, /* gemm_panel */                                                                             \
            fixed_add_avx512, NULL /* pack8: no panels here */, silu_mul_avx2, q1r32_avx512, q1r32_move_avx2,   \
            TILES                                                                                              \
    }

const fic_kernels fic_kernels_avx512_q1 = AVX512_Q1_TABLE(NULL /* q1r32_tiles: a token at a time */);
const fic_kernels fic_kernels_avx512_amx = AVX512_Q1_TABLE(q1r32_tiles_amx);
#endif /* FIC_X86 */
