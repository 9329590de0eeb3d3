/* qdot_neon.c - the int8-activation path on AArch64 NEON (see qdot.h): the quantizer and the
 * integer dot product, SDOT (vdotq_s32, ARMv8.2 dotprod, chosen at run time from HWCAP) or the
 * ARMv8.0 fallback vmull_s8 + pairwise adds. Unpacked weights are -128..127 or 0..63, so both
 * operands are signed bytes and no sign trick is needed. Four tokens per pass share each weight
 * block's loads. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <stdint.h>
#include <sys/auxv.h>

#include "qdot.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

void fic_qdot_quantize_neon(const float *x, int64_t k, uint8_t *dst) {
    const int64_t nb = k / QX_BLOCK;
    float *dv = (float *)(dst + k), *sv = dv + nb;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QX_BLOCK;
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int l = 0; l < 8; l++) {
            v[l] = vld1q_f32(xb + 4 * l);
            m = vmaxq_f32(m, vabsq_f32(v[l]));
        }
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t sum = vdupq_n_s32(0);
        int16x8_t h[4];
        for (int l = 0; l < 4; l++) {
            int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(v[2 * l], id)); /* round to nearest even */
            int32x4_t c = vcvtnq_s32_f32(vmulq_n_f32(v[2 * l + 1], id));
            sum = vaddq_s32(sum, vaddq_s32(a, c));
            h[l] = vcombine_s16(vqmovn_s32(a), vqmovn_s32(c));
        }
        vst1q_s8((int8_t *)dst + b * QX_BLOCK, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
        vst1q_s8((int8_t *)dst + b * QX_BLOCK + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
        dv[b] = d;
        sv[b] = d * (float)vaddvq_s32(sum);
    }
}

static inline float corr_dot(const float *cw, const float *sv, int64_t nb) {
    float s = 0.0f;
    for (int64_t b = 0; b < nb; b++) s += cw[b] * sv[b];
    return s;
}

/* int32 lanes: bytes 4l..4l+3 of w . x (the layout of SDOT) */
static inline int32x4_t mul16_v80(int8x16_t w, int8x16_t x) {
    int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(x)), p1 = vmull_high_s8(w, x);
    return vpaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
}

/* One row times n (1 or 4) tokens; sub-block scales (Q6_K) multiply the two int32 halves. */
#define DOT_ROW(MUL)                                                                                       \
    const int64_t k = row->k, nb = k / QX_BLOCK;                                                           \
    const float *ds[4];                                                                                    \
    float32x4_t acc[4];                                                                                    \
    for (int l = 0; l < n; l++) {                                                                          \
        ds[l] = (const float *)(xs[l] + k);                                                                \
        acc[l] = vdupq_n_f32(0.0f);                                                                        \
    }                                                                                                      \
    for (int64_t b = 0; b < nb; b++) {                                                                     \
        const int8x16_t w0 = vld1q_s8(row->w + b * QX_BLOCK), w1 = vld1q_s8(row->w + b * QX_BLOCK + 16);  \
        const int32x4_t s0 = vdupq_n_s32(row->isc ? row->isc[2 * b] : 1);                                  \
        const int32x4_t s1 = vdupq_n_s32(row->isc ? row->isc[2 * b + 1] : 1);                              \
        for (int l = 0; l < n; l++) {                                                                      \
            const int8_t *xb = (const int8_t *)xs[l] + b * QX_BLOCK;                                       \
            int32x4_t p = vmlaq_s32(vmulq_s32(MUL(w0, vld1q_s8(xb)), s0), MUL(w1, vld1q_s8(xb + 16)), s1); \
            acc[l] = vfmaq_n_f32(acc[l], vcvtq_f32_s32(p), row->fw[b] * ds[l][b]);                         \
        }                                                                                                  \
    }                                                                                                      \
    for (int l = 0; l < n; l++) out[l] = vaddvq_f32(acc[l]) + corr_dot(row->cw, ds[l] + nb, nb);

static inline void row_v80(const qw_row *row, const uint8_t *const *xs, float *out, const int n) {
    DOT_ROW(mul16_v80)
}

#define SDOT(w, x) vdotq_s32(vdupq_n_s32(0), w, x)
__attribute__((target("arch=armv8.2-a+dotprod"))) static inline void row_sdot(const qw_row *row,
                                                                              const uint8_t *const *xs,
                                                                              float *out, const int n) {
    DOT_ROW(SDOT)
}

void fic_qdot_dot_neon(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                       int64_t ys, int accumulate) {
    /* getauxval reads the process's auxiliary vector: no state of ours, once per call */
    const int sdot = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    float v[4];
    for (int64_t i = 0; i < nt;) {
        const int n = nt - i >= 4 ? 4 : 1;
        const uint8_t *xs[4] = {xq + i * qrow, xq + (i + 1) * qrow, xq + (i + 2) * qrow, xq + (i + 3) * qrow};
        for (int64_t r = 0; r < nr; r++) {
            if (sdot)
                row_sdot(&rows[r], xs, v, n);
            else
                row_v80(&rows[r], xs, v, n);
            for (int l = 0; l < n; l++) {
                float *yo = y + (i + l) * ys + r;
                *yo = v[l] + (accumulate ? *yo : 0.0f);
            }
        }
        i += n;
    }
}

#endif /* __aarch64__ */
