/* quant.c - weight formats: block geometry, reference quantizers and dequantizers, fp16.
 *
 * The quantizers reproduce ggml's quantize_row_*_ref bit for bit (and so the gguf package's
 * numpy quantizer): every step is one float32 operation in the same order as ggml's. A fused
 * multiply-add would round once instead of twice and change the bytes, so contraction is off
 * for this file whatever the target's default is. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "fic.h"

/* ---- fp16 <-> fp32 ------------------------------------------------------------------------ */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Rounds the bits dropped by a right shift: nearest, ties to even. */
static inline uint32_t shift_round_even(uint32_t x, int shift) {
    uint32_t q = x >> shift;
    uint32_t rem = x & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return q;
}

uint16_t fic_fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;

    if (a >= 0x7f800000u) {
        if (a == 0x7f800000u)
            return sign | 0x7c00u;
        /* NaN: keep the top payload bits, as numpy does; never let it become infinity. */
        uint16_t h = (uint16_t)(0x7c00u | ((a & 0x007fffffu) >> 13));
        if (h == 0x7c00u)
            h++;
        return sign | h;
    }
    if (a >= 0x477ff000u) /* >= 65520: halfway above 65504 (odd mantissa) rounds to infinity */
        return sign | 0x7c00u;
    if (a >= 0x38800000u) { /* normal half: rebias the exponent; a mantissa carry is exact */
        uint32_t h = ((a >> 23) - 112u) << 10 | ((a & 0x007fffffu) >> 13);
        uint32_t rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
            h++;
        return sign | (uint16_t)h;
    }
    if (a <= 0x33000000u) /* <= 2^-25, half the smallest subnormal: ties to even give zero */
        return sign;
    /* Subnormal half: value / 2^-24 = (1.mant * 2^23) >> (126 - e), shift in 14..24. May
     * round up to 0x400, which is the correct encoding of the smallest normal. */
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x007fffffu) | 0x00800000u;
    return sign | (uint16_t)shift_round_even(m, (int)(126u - e));
}

float fic_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;

    if (e == 0x1fu) /* inf, NaN (payload kept, signalling or not) */
        return bits_f32(sign | 0x7f800000u | m << 13);
    if (e != 0)
        return bits_f32(sign | (e + 112u) << 23 | m << 13);
    if (m == 0)
        return bits_f32(sign);
    /* Subnormal half: normalise, every one is a normal float. */
    e = 113u;
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return bits_f32(sign | e << 23 | (m & 0x3ffu) << 13);
}

/* ---- geometry ----------------------------------------------------------------------------- */

static const int BLOCK_WEIGHTS[FIC_FMT_COUNT] = {
    [FIC_F32] = 1, [FIC_F16] = 1, [FIC_Q8_0] = QK8_0,
    [FIC_Q4_0] = QK4_0, [FIC_Q4_1] = QK4_1, [FIC_Q1_0] = QK1_0,
    [FIC_Q5_0] = QK5_0, [FIC_Q4_K] = QK_K, [FIC_Q6_K] = QK_K,
};
static const int BLOCK_BYTES[FIC_FMT_COUNT] = {
    [FIC_F32] = sizeof(float), [FIC_F16] = sizeof(fic_half), [FIC_Q8_0] = sizeof(block_q8_0),
    [FIC_Q4_0] = sizeof(block_q4_0), [FIC_Q4_1] = sizeof(block_q4_1),
    [FIC_Q1_0] = sizeof(block_q1_0), [FIC_Q5_0] = sizeof(block_q5_0),
    [FIC_Q4_K] = sizeof(block_q4_K), [FIC_Q6_K] = sizeof(block_q6_K),
};

static inline int fmt_valid(int fmt) { return fmt >= 0 && fmt < FIC_FMT_COUNT; }

int fic_fmt_block_weights(int fmt) { return fmt_valid(fmt) ? BLOCK_WEIGHTS[fmt] : FIC_ERR_ARG; }

int fic_fmt_block_bytes(int fmt) { return fmt_valid(fmt) ? BLOCK_BYTES[fmt] : FIC_ERR_ARG; }

int64_t fic_row_bytes(int fmt, int64_t k) {
    if (fmt == FIC_Q1_0R32) fmt = FIC_Q1_0; /* the same bytes, 32 rows side by side */
    if (!fmt_valid(fmt) || k <= 0 || k % BLOCK_WEIGHTS[fmt] != 0)
        return FIC_ERR_ARG;
    int64_t n_blocks = k / BLOCK_WEIGHTS[fmt];
    if (n_blocks > INT64_MAX / BLOCK_BYTES[fmt])
        return FIC_ERR_ARG;
    return n_blocks * BLOCK_BYTES[fmt];
}

/* ---- quantizers (one block each) ---------------------------------------------------------- */

static inline float absf(float x) { return bits_f32(f32_bits(x) & 0x7fffffffu); }

/* C's roundf (half away from zero) for Q8_0, without libm. |x| beyond int8 (only reachable
 * with non-finite input) saturates; NaN gives 0, where ggml's cast would be undefined. */
static inline int8_t round_q8(float x) {
    float a = absf(x);
    if (!(a < 127.5f))
        return a != a ? 0 : (x < 0 ? -127 : 127);
    int t = (int)a;               /* truncation; a - t is exact */
    int r = t + (a - (float)t >= 0.5f);
    return (int8_t)(x < 0 ? -r : r);
}

/* ggml's MIN(15, (int8_t)v) for the nibble formats, with NaN/negative clamped to 0 so no
 * float-to-int conversion is undefined. Identical to ggml for every finite input. */
static inline uint8_t trunc_nibble(float v) {
    if (!(v >= 0.0f))
        return 0;
    if (v >= 15.0f)
        return 15;
    return (uint8_t)(int)v;
}

static void quantize_q8_0(const float *x, block_q8_0 *y) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; j++) {
        float v = absf(x[j]);
        amax = amax > v ? amax : v;
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fic_fp32_to_fp16(d);
    for (int j = 0; j < QK8_0; j++)
        y->qs[j] = round_q8(x[j] * id);
}

static void quantize_q4_0(const float *x, block_q4_0 *y) {
    float amax = 0.0f, max = 0.0f; /* max: the signed value of largest magnitude, first wins */
    for (int j = 0; j < QK4_0; j++) {
        float v = x[j];
        if (amax < absf(v)) {
            amax = absf(v);
            max = v;
        }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fic_fp32_to_fp16(d);
    for (int j = 0; j < QK4_0 / 2; j++) {
        uint8_t lo = trunc_nibble(x[j] * id + 8.5f);
        uint8_t hi = trunc_nibble(x[j + QK4_0 / 2] * id + 8.5f);
        y->qs[j] = (uint8_t)(lo | hi << 4);
    }
}

static void quantize_q4_1(const float *x, block_q4_1 *y) {
    float min = x[0], max = x[0];
    for (int j = 1; j < QK4_1; j++) {
        min = x[j] < min ? x[j] : min;
        max = x[j] > max ? x[j] : max;
    }
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fic_fp32_to_fp16(d);
    y->m = fic_fp32_to_fp16(min);
    for (int j = 0; j < QK4_1 / 2; j++) {
        uint8_t lo = trunc_nibble((x[j] - min) * id + 0.5f);
        uint8_t hi = trunc_nibble((x[j + QK4_1 / 2] - min) * id + 0.5f);
        y->qs[j] = (uint8_t)(lo | hi << 4);
    }
}

/* ggml's MIN(31, (int8_t)v) for Q5_0, clamped like trunc_nibble. */
static inline uint8_t trunc_5bit(float v) {
    if (!(v >= 0.0f))
        return 0;
    if (v >= 31.0f)
        return 31;
    return (uint8_t)(int)v;
}

static void quantize_q5_0(const float *x, block_q5_0 *y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK5_0; j++) {
        float v = x[j];
        if (amax < absf(v)) {
            amax = absf(v);
            max = v;
        }
    }
    const float d = max / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fic_fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_0 / 2; j++) {
        uint8_t lo = trunc_5bit(x[j] * id + 16.5f);
        uint8_t hi = trunc_5bit(x[j + QK5_0 / 2] * id + 16.5f);
        y->qs[j] = (uint8_t)((lo & 15) | (hi & 15) << 4);
        qh |= (uint32_t)(lo >> 4) << j;
        qh |= (uint32_t)(hi >> 4) << (j + QK5_0 / 2);
    }
    for (int b = 0; b < 4; b++) /* little-endian, as ggml's memcpy on x86 and ARM */
        y->qh[b] = (uint8_t)(qh >> (8 * b));
}

static void quantize_q1_0(const float *x, block_q1_0 *y) {
    float sum = 0.0f; /* in order, in float32: the spec's d = mean |w| */
    for (int j = 0; j < QK1_0; j++)
        sum += absf(x[j]);
    y->d = fic_fp32_to_fp16(sum / (float)QK1_0);
    memset(y->qs, 0, sizeof y->qs);
    for (int j = 0; j < QK1_0; j++)
        if (x[j] >= 0.0f)
            y->qs[j / 8] |= (uint8_t)(1u << (j % 8));
}

/* ---- dequantizers (one block each) -------------------------------------------------------- */

static void dequantize_q8_0(const block_q8_0 *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    for (int j = 0; j < QK8_0; j++)
        y[j] = (float)x->qs[j] * d;
}

static void dequantize_q4_0(const block_q4_0 *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    for (int j = 0; j < QK4_0 / 2; j++) {
        y[j] = (float)((x->qs[j] & 0x0f) - 8) * d;
        y[j + QK4_0 / 2] = (float)((x->qs[j] >> 4) - 8) * d;
    }
}

static void dequantize_q4_1(const block_q4_1 *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    const float m = fic_fp16_to_fp32(x->m);
    for (int j = 0; j < QK4_1 / 2; j++) {
        y[j] = (float)(x->qs[j] & 0x0f) * d + m;
        y[j + QK4_1 / 2] = (float)(x->qs[j] >> 4) * d + m;
    }
}

static void dequantize_q1_0(const block_q1_0 *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    for (int j = 0; j < QK1_0; j++)
        y[j] = (x->qs[j / 8] >> (j % 8)) & 1u ? d : -d;
}

static void dequantize_q5_0(const block_q5_0 *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    const uint32_t qh = (uint32_t)x->qh[0] | (uint32_t)x->qh[1] << 8 | (uint32_t)x->qh[2] << 16 |
                        (uint32_t)x->qh[3] << 24;
    for (int j = 0; j < QK5_0 / 2; j++) {
        const int x0 = ((x->qs[j] & 0x0f) | (int)((qh >> j) << 4 & 0x10)) - 16;
        const int x1 = ((x->qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10)) - 16;
        y[j] = (float)x0 * d;
        y[j + QK5_0 / 2] = (float)x1 * d;
    }
}

/* ggml's dequantize_row_q4_K: per 64 weights, two sub-blocks (low, then high nibbles). */
static void dequantize_q4_K(const block_q4_K *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d), dmin = fic_fp16_to_fp32(x->dmin);
    const uint8_t *q = x->qs;
    for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
        uint8_t sc, m;
        q4k_scale_min(is, x->scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        q4k_scale_min(is + 1, x->scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
    }
}

/* ggml's dequantize_row_q6_K: per 128 weights, 64 bytes of ql, 32 of qh and 8 scales. */
static void dequantize_q6_K(const block_q6_K *x, float *y) {
    const float d = fic_fp16_to_fp32(x->d);
    const uint8_t *ql = x->ql, *qh = x->qh;
    const int8_t *sc = x->scales;
    for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
            const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
            const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
    }
}

/* ---- whole matrices ----------------------------------------------------------------------- */
/* Blocks go through a local copy: a row slice of a GGUF mapping need not be 2-byte aligned. */

/* Validates a (n_rows, k) call; on success *n_blocks is the total number of blocks. */
static int check_matrix(int fmt, const void *src, const void *dst, int64_t n_rows, int64_t k,
                        int64_t *n_blocks) {
    int64_t rb = fic_row_bytes(fmt, k);
    if (rb < 0 || n_rows < 0)
        return FIC_ERR_ARG;
    int64_t per_row = k / BLOCK_WEIGHTS[fmt];
    /* The whole matrix must be addressable, in bytes and in floats. */
    if (n_rows > 0 && (n_rows > INT64_MAX / rb || n_rows > INT64_MAX / 4 / k))
        return FIC_ERR_ARG;
    if (n_rows > 0 && (src == NULL || dst == NULL))
        return FIC_ERR_ARG;
    *n_blocks = n_rows * per_row;
    return FIC_OK;
}

int fic_quantize(int fmt, const float *src, uint8_t *dst, int64_t n_rows, int64_t k) {
    int64_t nb;
    int status = check_matrix(fmt, src, dst, n_rows, k, &nb);
    if (status != FIC_OK)
        return status;
    switch (fmt) {
    case FIC_F32:
        if (nb > 0)
            memcpy(dst, src, (size_t)nb * sizeof(float));
        break;
    case FIC_F16:
        for (int64_t i = 0; i < nb; i++) {
            fic_half h = fic_fp32_to_fp16(src[i]);
            memcpy(dst + 2 * i, &h, sizeof h);
        }
        break;
    case FIC_Q8_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q8_0 b;
            quantize_q8_0(src + i * QK8_0, &b);
            memcpy(dst + i * (int64_t)sizeof b, &b, sizeof b);
        }
        break;
    case FIC_Q4_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q4_0 b;
            quantize_q4_0(src + i * QK4_0, &b);
            memcpy(dst + i * (int64_t)sizeof b, &b, sizeof b);
        }
        break;
    case FIC_Q4_1:
        for (int64_t i = 0; i < nb; i++) {
            block_q4_1 b;
            quantize_q4_1(src + i * QK4_1, &b);
            memcpy(dst + i * (int64_t)sizeof b, &b, sizeof b);
        }
        break;
    case FIC_Q1_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q1_0 b;
            quantize_q1_0(src + i * QK1_0, &b);
            memcpy(dst + i * (int64_t)sizeof b, &b, sizeof b);
        }
        break;
    case FIC_Q5_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q5_0 b;
            quantize_q5_0(src + i * QK5_0, &b);
            memcpy(dst + i * (int64_t)sizeof b, &b, sizeof b);
        }
        break;
    case FIC_Q4_K:
    case FIC_Q6_K: /* read only: fic keeps K-quants from GGUF files, never makes them */
        return FIC_ERR_UNSUPPORTED;
    default:
        return FIC_ERR_ARG;
    }
    return FIC_OK;
}

int fic_dequantize(int fmt, const uint8_t *src, float *dst, int64_t n_rows, int64_t k) {
    int64_t nb;
    int status = check_matrix(fmt, src, dst, n_rows, k, &nb);
    if (status != FIC_OK)
        return status;
    switch (fmt) {
    case FIC_F32:
        if (nb > 0)
            memcpy(dst, src, (size_t)nb * sizeof(float));
        break;
    case FIC_F16:
        for (int64_t i = 0; i < nb; i++) {
            fic_half h;
            memcpy(&h, src + 2 * i, sizeof h);
            dst[i] = fic_fp16_to_fp32(h);
        }
        break;
    case FIC_Q8_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q8_0 b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q8_0(&b, dst + i * QK8_0);
        }
        break;
    case FIC_Q4_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q4_0 b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q4_0(&b, dst + i * QK4_0);
        }
        break;
    case FIC_Q4_1:
        for (int64_t i = 0; i < nb; i++) {
            block_q4_1 b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q4_1(&b, dst + i * QK4_1);
        }
        break;
    case FIC_Q1_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q1_0 b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q1_0(&b, dst + i * QK1_0);
        }
        break;
    case FIC_Q5_0:
        for (int64_t i = 0; i < nb; i++) {
            block_q5_0 b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q5_0(&b, dst + i * QK5_0);
        }
        break;
    case FIC_Q4_K:
        for (int64_t i = 0; i < nb; i++) {
            block_q4_K b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q4_K(&b, dst + i * QK_K);
        }
        break;
    case FIC_Q6_K:
        for (int64_t i = 0; i < nb; i++) {
            block_q6_K b;
            memcpy(&b, src + i * (int64_t)sizeof b, sizeof b);
            dequantize_q6_K(&b, dst + i * QK_K);
        }
        break;
    default:
        return FIC_ERR_ARG;
    }
    return FIC_OK;
}
