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

static_assert(sizeof(fic_half) == 2, "fp16 size");

/* Scalar fp16 conversions (bit-exact, round to nearest even); defined in quant.c. */
static inline float fic_h2f(fic_half h) { return fic_fp16_to_fp32(h); }
static inline fic_half fic_f2h(float f) { return fic_fp32_to_fp16(f); }

#endif /* FIC_BLOCKS_H */
