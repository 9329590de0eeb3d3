/* blocks.h - internal: ggml-compatible block structs and fp16 helpers shared by the C core.
 * Byte layouts follow ggml-common.h so GGUF tensors are used as they are. */
#ifndef FIC_BLOCKS_H
#define FIC_BLOCKS_H

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "fic.h"

#define QK8_0 32
#define QK4_0 32
#define QK4_1 32
#define QK1_0 128
#define QK5_0 32
#define QK_K 256 /* K-quant super-block */

typedef uint16_t fic_half; /* IEEE binary16 bits */

typedef struct {
    fic_half d;          /* scale */
    int8_t qs[QK8_0];    /* w = d * q */
} block_q8_0;
static_assert(sizeof(block_q8_0) == 2 + QK8_0, "block_q8_0 size");

typedef struct {
    fic_half d;             /* scale */
    uint8_t qs[QK4_0 / 2];  /* byte j: low nibble weight j, high nibble weight j + 16; w = d * (q - 8) */
} block_q4_0;
static_assert(sizeof(block_q4_0) == 2 + QK4_0 / 2, "block_q4_0 size");

typedef struct {
    fic_half d;             /* scale */
    fic_half m;             /* minimum */
    uint8_t qs[QK4_1 / 2];  /* as q4_0; w = d * q + m */
} block_q4_1;
static_assert(sizeof(block_q4_1) == 4 + QK4_1 / 2, "block_q4_1 size");

typedef struct {
    fic_half d;             /* scale: mean |w| of the block */
    uint8_t qs[QK1_0 / 8];  /* bit j of byte j/8 (LSB first) is weight j: 1 -> +d, 0 -> -d */
} block_q1_0;
static_assert(sizeof(block_q1_0) == 2 + QK1_0 / 8, "block_q1_0 size");

typedef struct {
    fic_half d;             /* scale */
    uint8_t qh[4];          /* bit j of the little-endian uint32: the fifth bit of weight j */
    uint8_t qs[QK5_0 / 2];  /* as q4_0; w = d * ((nibble | fifth bit << 4) - 16) */
} block_q5_0;
static_assert(sizeof(block_q5_0) == 2 + 4 + QK5_0 / 2, "block_q5_0 size");

/* Q4_K: 8 sub-blocks of 32 weights, each with a 6-bit scale and a 6-bit min packed in scales[12]
 * (ggml's get_scale_min_k4); w = d * sc * q - dmin * m. qs: per 64 weights, 32 bytes whose low
 * nibbles are the first 32 weights and high nibbles the next 32. */
typedef struct {
    fic_half d;               /* super-block scale of the scales */
    fic_half dmin;            /* super-block scale of the mins */
    uint8_t scales[12];       /* 8 scales and 8 mins, 6 bits each */
    uint8_t qs[QK_K / 2];     /* 4-bit quants */
} block_q4_K;
static_assert(sizeof(block_q4_K) == 2 * 2 + 12 + QK_K / 2, "block_q4_K size");

/* Q6_K: 16 sub-blocks of 16 weights, each with an int8 scale; w = d * sc * (q - 32), q 6 bits:
 * low 4 bits in ql, high 2 in qh (see deq_block_ref for the order). */
typedef struct {
    uint8_t ql[QK_K / 2];     /* lower 4 bits */
    uint8_t qh[QK_K / 4];     /* upper 2 bits */
    int8_t scales[QK_K / 16]; /* sub-block scales */
    fic_half d;               /* super-block scale */
} block_q6_K;
static_assert(sizeof(block_q6_K) == QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, "block_q6_K size");

/* Scale j (0..7) and min j of a Q4_K block's 12 packed bytes (ggml's get_scale_min_k4). */
static inline void q4k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* All eight at once, as q4k_scale_min gives them: byte j of *sc and *m (little-endian) is scale j
 * and min j, from the 12 bytes as three 32-bit words (the high two bits of bytes 0-7 complete
 * scales and mins 4-7). */
static inline void q4k_scales_mins_u64(const uint8_t *q, uint64_t *sc, uint64_t *m) {
    uint32_t u[3];
    memcpy(u, q, 12);
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, low2 = 0x03030303u;
    *sc = (uint64_t)(u[0] & low6) | (uint64_t)((u[2] & low4) | ((u[0] >> 6) & low2) << 4) << 32;
    *m = (uint64_t)(u[1] & low6) | (uint64_t)(((u[2] >> 4) & low4) | ((u[1] >> 6) & low2) << 4) << 32;
}

/* The same as two byte arrays: sc[j] and m[j] for j < 8. */
static inline void q4k_scales_mins(const uint8_t *q, uint8_t sc[8], uint8_t m[8]) {
    uint64_t s, n;
    q4k_scales_mins_u64(q, &s, &n);
    memcpy(sc, &s, 8); /* x86-64 and AArch64 Linux: little-endian */
    memcpy(m, &n, 8);
}

static_assert(sizeof(fic_half) == 2, "fp16 size");

/* Scalar fp16 conversions (bit-exact, round to nearest even); defined in quant.c. */
static inline float fic_h2f(fic_half h) { return fic_fp16_to_fp32(h); }
static inline fic_half fic_f2h(float f) { return fic_fp32_to_fp16(f); }

#endif /* FIC_BLOCKS_H */
