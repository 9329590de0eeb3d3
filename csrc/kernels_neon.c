/* kernels_neon.c - AArch64 NEON kernels (FIC_IMPL_NEON) and their table. Compiled only for
 * AArch64 (empty elsewhere); here it is cross-compiled and run under qemu-aarch64 against the
 * reference (tests/test_kernels.py, test_ffn.py). NEON and fp16 conversions are baseline on
 * AArch64, so there is no run-time choice within the table. Dequantization other than F16's is
 * the reference's. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(__aarch64__)
#include <arm_neon.h>

static inline float h2f_neon(fic_half h) {
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/* 16 int8 -> four float vectors. */
static inline void cvt16_i8_neon(int8x16_t v, float32x4_t out[4]) {
    int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
    out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

static inline float32x4_t dot16_neon(int8x16_t q, const float *x) {
    float32x4_t f[4];
    cvt16_i8_neon(q, f);
    float32x4_t p = vmulq_f32(f[0], vld1q_f32(x));
    p = vfmaq_f32(p, f[1], vld1q_f32(x + 4));
    p = vfmaq_f32(p, f[2], vld1q_f32(x + 8));
    return vfmaq_f32(p, f[3], vld1q_f32(x + 12));
}

/* Q5_0, Q4_K, Q6_K: float activations, weights dequantized in registers (as the AVX2 code). */

/* 16 int8 weights times x[0..16), as a vector of 4 partial sums, scaled: acc + s * (q . x). */
static inline float32x4_t dot16s_neon(int8x16_t q, const float *x, float s, float32x4_t acc) {
    return vfmaq_n_f32(acc, dot16_neon(q, x), s);
}

/* A Q5_0 block as two int8x16 (q - 16): weights 0..15 and 16..31. Bit j of qh is weight j's
 * fifth bit: each qh byte is spread over 8 lanes and tested against its bit. */
static inline void q5_0_i8_neon(const block_q5_0 *blk, int8x16_t *lo, int8x16_t *hi) {
    static const uint8_t bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bv = vld1q_u8(bits), m4 = vdupq_n_u8(15), k16 = vdupq_n_u8(16);
    uint8x16_t h0 = vtstq_u8(vcombine_u8(vdup_n_u8(blk->qh[0]), vdup_n_u8(blk->qh[1])), bv);
    uint8x16_t h1 = vtstq_u8(vcombine_u8(vdup_n_u8(blk->qh[2]), vdup_n_u8(blk->qh[3])), bv);
    uint8x16_t v = vld1q_u8(blk->qs);
    uint8x16_t a = vorrq_u8(vandq_u8(v, m4), vandq_u8(h0, k16));
    uint8x16_t b = vorrq_u8(vshrq_n_u8(v, 4), vandq_u8(h1, k16));
    *lo = vsubq_s8(vreinterpretq_s8_u8(a), vreinterpretq_s8_u8(k16));
    *hi = vsubq_s8(vreinterpretq_s8_u8(b), vreinterpretq_s8_u8(k16));
}

static float dot_q5_0_neon(const job_t *j, const uint8_t *row, const float *x) {
    const block_q5_0 *blk = (const block_q5_0 *)row;
    const int64_t nb = j->k / QK5_0;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++, x += QK5_0) {
        int8x16_t lo, hi;
        q5_0_i8_neon(blk + b, &lo, &hi);
        const float d = h2f_neon(blk[b].d);
        acc0 = dot16s_neon(lo, x, d, acc0);
        acc1 = dot16s_neon(hi, x + 16, d, acc1);
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

/* Q4_K as on AVX2: d sc sum q x - dmin m sum x per sub-block, the sums of x prepared (XP_SUMS). */
static float dot_q4_K_neon(const job_t *j, const uint8_t *row, const float *x) {
    const block_q4_K *blk = (const block_q4_K *)row;
    const int64_t nb = j->k / QK_K;
    const uint8x16_t m4 = vdupq_n_u8(15);
    const float *xsum = j->xsum;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float mins = 0.0f;
    for (int64_t b = 0; b < nb; b++, xsum += 8) {
        const float d = h2f_neon(blk[b].d), dmin = h2f_neon(blk[b].dmin);
        for (int c = 0; c < 4; c++, x += 64) {
            uint8_t sc, m;
            q4k_scale_min(2 * c, blk[b].scales, &sc, &m);
            const float d1 = d * (float)sc;
            mins += dmin * (float)m * xsum[2 * c];
            q4k_scale_min(2 * c + 1, blk[b].scales, &sc, &m);
            const float d2 = d * (float)sc;
            mins += dmin * (float)m * xsum[2 * c + 1];
            uint8x16_t v0 = vld1q_u8(blk[b].qs + 32 * c), v1 = vld1q_u8(blk[b].qs + 32 * c + 16);
            float32x4_t p0 = vaddq_f32(dot16_neon(vreinterpretq_s8_u8(vandq_u8(v0, m4)), x),
                                       dot16_neon(vreinterpretq_s8_u8(vandq_u8(v1, m4)), x + 16));
            float32x4_t p1 = vaddq_f32(dot16_neon(vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), x + 32),
                                       dot16_neon(vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), x + 48));
            acc0 = vfmaq_n_f32(acc0, p0, d1);
            acc1 = vfmaq_n_f32(acc1, p1, d2);
        }
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1)) - mins;
}

/* Q6_K: per 128 weights, 16 weights at a time (l = 16 h .. 16 h + 15, h = 0, 1) of the four
 * groups i = 0..3 at weights 32 i + l, scale sc[2 i + h]. */
static float dot_q6_K_neon(const job_t *j, const uint8_t *row, const float *x) {
    const block_q6_K *blk = (const block_q6_K *)row;
    const int64_t nb = j->k / QK_K;
    const uint8x16_t m4 = vdupq_n_u8(15), m3 = vdupq_n_u8(3);
    const int8x16_t k32 = vdupq_n_s8(32);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        const float d = h2f_neon(blk[b].d);
        for (int c = 0; c < 2; c++, x += 128) {
            const uint8_t *ql = blk[b].ql + 64 * c, *qh = blk[b].qh + 32 * c;
            const int8_t *sc = blk[b].scales + 8 * c;
            for (int h = 0; h < 2; h++) {
                uint8x16_t l0 = vld1q_u8(ql + 16 * h), l1 = vld1q_u8(ql + 32 + 16 * h), hb = vld1q_u8(qh + 16 * h);
                uint8x16_t q[4];
                q[0] = vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(hb, m3), 4));
                q[1] = vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 2), m3), 4));
                q[2] = vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 4), m3), 4));
                q[3] = vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(hb, 6), 4));
                for (int i = 0; i < 4; i++) {
                    int8x16_t qi = vsubq_s8(vreinterpretq_s8_u8(q[i]), k32);
                    if (i & 1) acc1 = dot16s_neon(qi, x + 32 * i + 16 * h, d * (float)sc[2 * i + h], acc1);
                    else acc0 = dot16s_neon(qi, x + 32 * i + 16 * h, d * (float)sc[2 * i + h], acc0);
                }
            }
        }
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

static ALWAYS_INLINE float dot_neon(const int fmt, const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / j->bw;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float extra = 0.0f;
    switch (fmt) {
    case FIC_Q5_0:
        return dot_q5_0_neon(j, row, x);
    case FIC_Q4_K:
        return dot_q4_K_neon(j, row, x);
    case FIC_Q6_K:
        return dot_q6_K_neon(j, row, x);
    case FIC_F32: {
        const float *w = (const float *)row;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            acc0 = vfmaq_f32(acc0, vld1q_f32(w + i), vld1q_f32(x + i));
            acc1 = vfmaq_f32(acc1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
        }
        for (; i < k; i++) extra += w[i] * x[i];
        break;
    }
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(w + i));
            acc0 = vfmaq_f32(acc0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(x + i));
            acc1 = vfmaq_f32(acc1, vcvt_high_f32_f16(h), vld1q_f32(x + i + 4));
        }
        for (; i < k; i++) extra += h2f_neon(w[i]) * x[i];
        break;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row;
        for (int64_t b = 0; b < nb; b++, x += QK8_0) {
            float32x4_t p = vaddq_f32(dot16_neon(vld1q_s8(blk[b].qs), x), dot16_neon(vld1q_s8(blk[b].qs + 16), x + 16));
            acc0 = vfmaq_n_f32(acc0, p, h2f_neon(blk[b].d));
        }
        break;
    }
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const uint8x16_t mask = vdupq_n_u8(15);
        const int8x16_t eight = vdupq_n_s8(is1 ? 0 : 8);
        for (int64_t b = 0; b < nb; b++, x += 32) {
            const uint8_t *blk = row + b * stride;
            uint8x16_t v = vld1q_u8(blk + (is1 ? 4 : 2));
            int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, mask)), eight);
            int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
            fic_half hd;
            memcpy(&hd, blk, 2);
            float32x4_t p = vaddq_f32(dot16_neon(lo, x), dot16_neon(hi, x + 16));
            acc0 = vfmaq_n_f32(acc0, p, h2f_neon(hd));
            if (is1) {
                memcpy(&hd, blk + 2, 2);
                extra += h2f_neon(hd) * j->xsum[b];
            }
        }
        break;
    }
    case FIC_Q1_0: {
        const block_q1_0 *blk = (const block_q1_0 *)row;
        const uint32x4_t bit_lo = {1, 2, 4, 8}, bit_hi = {16, 32, 64, 128};
        for (int64_t b = 0; b < nb; b++, x += QK1_0) {
            float d = h2f_neon(blk[b].d);
            for (int c = 0; c < 16; c++) {
                uint32x4_t byte = vdupq_n_u32(blk[b].qs[c]);
                uint32x4_t m0 = vtstq_u32(byte, bit_lo), m1 = vtstq_u32(byte, bit_hi);
                float32x4_t x0 = vreinterpretq_f32_u32(vandq_u32(m0, vreinterpretq_u32_f32(vld1q_f32(x + 8 * c))));
                float32x4_t x1 = vreinterpretq_f32_u32(vandq_u32(m1, vreinterpretq_u32_f32(vld1q_f32(x + 8 * c + 4))));
                acc0 = vfmaq_n_f32(acc0, x0, 2.0f * d);
                acc1 = vfmaq_n_f32(acc1, x1, 2.0f * d);
            }
            extra -= d * j->xsum[b];
        }
        break;
    }
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1)) + extra;
}

static void deq_f16_neon(const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    const uint16_t *w = (const uint16_t *)row;
    for (int64_t i = b0; i < b1; i++) out[i - b0] = h2f_neon(w[i]);
}

static void axpy_neon(float a, const float *w, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(w + i), a));
    for (; i < n; i++) y[i] += a * w[i];
}

static float dot_f32_neon(const float *a, const float *b, int64_t k) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < k; i++) s += a[i] * b[i];
    return s;
}

static void gemm_tile_neon(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    for (int64_t r = 0; r < nr; r++)
        for (int64_t t = 0; t < j->t; t++)
            j->y[t * j->m + r0 + r] = dot_f32_neon(tile + r * j->k, j->x + t * j->k, j->k);
}

#define NEON_DOT(name, FMT)                                                                           \
    static float row_dot_##name##_neon(const job_t *j, const uint8_t *row, const float *x) {              \
        return dot_neon(FMT, j, row, x);                                                              \
    }
NEON_DOT(f32, FIC_F32)
NEON_DOT(f16, FIC_F16)
NEON_DOT(q8_0, FIC_Q8_0)
NEON_DOT(q4_0, FIC_Q4_0)
NEON_DOT(q4_1, FIC_Q4_1)
NEON_DOT(q1_0, FIC_Q1_0)
NEON_DOT(q5_0, FIC_Q5_0)
NEON_DOT(q4_K, FIC_Q4_K)
NEON_DOT(q6_K, FIC_Q6_K)
#undef NEON_DOT

/* Q4_1, Q4_K and Q1_0 take the sums of x per block (Q4_K: per sub-block). */
#define NEON_ENTRY(name, KT, XP, DEQ) {KT, XP, XP, row_dot_##name##_neon, NULL, DEQ, NULL, NULL, NULL, NULL}
const fic_kernels fic_kernels_neon = {
    FIC_IMPL_NEON,
    axpy_neon,
    gemm_tile_neon,
    {
        [FIC_F32] = NEON_ENTRY(f32, KT_F32, XP_NONE, kern_deq_f32_ref),
        [FIC_F16] = NEON_ENTRY(f16, KT_F16, XP_NONE, deq_f16_neon),
        [FIC_Q8_0] = NEON_ENTRY(q8_0, KT_Q8_0, XP_NONE, kern_deq_q8_0_ref),
        [FIC_Q4_0] = NEON_ENTRY(q4_0, KT_Q4_0, XP_NONE, kern_deq_q4_0_ref),
        [FIC_Q4_1] = NEON_ENTRY(q4_1, KT_Q4_1, XP_SUMS, kern_deq_q4_1_ref),
        [FIC_Q1_0] = NEON_ENTRY(q1_0, KT_Q1_0, XP_SUMS, kern_deq_q1_0_ref),
        [FIC_Q5_0] = NEON_ENTRY(q5_0, KT_Q5_0, XP_NONE, kern_deq_q5_0_ref),
        [FIC_Q4_K] = NEON_ENTRY(q4_K, KT_Q4_K, XP_SUMS, kern_deq_q4_K_ref),
        [FIC_Q6_K] = NEON_ENTRY(q6_K, KT_Q6_K, XP_NONE, kern_deq_q6_K_ref),
    },
    NULL, /* gemm_panel: not written for NEON yet */
    NULL, /* fixed_add: fixed_add_ref */
    NULL, /* pack8: no panels here */
    NULL, /* silu_mul: silu_mul_ref */
    NULL, /* q1r32: q1r32_ref */
    NULL, /* q1r32_move: q1r32_move_ref */
    NULL, /* q1r32_tiles: a token at a time */
};
#endif /* __aarch64__ */
