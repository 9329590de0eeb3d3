/* q1_planes.h - Q1_0's int8 activations in bit-plane order, shared by the matvec (kernels_avx2.c)
 * and the prefill (qdot_avx2.c) quantizers: x86 only, included after <immintrin.h>. */
#ifndef FIC_Q1_PLANES_H
#define FIC_Q1_PLANES_H

#include <stdint.h>

/* 128 int8 values q (one Q1_0 block, in order) -> out (128 bytes): plane j (bit j of the block's
 * 16 sign bytes) = column j of q seen as 16 rows of 8: rows paired into 16-bit lanes, then an 8 x 8
 * transpose of them; plane j goes to vector j / 2 (32 bytes), half j % 2. */
__attribute__((target("ssse3"))) static inline void q1_sign_planes(const uint8_t *q, uint8_t *out) {
    const __m128i pair = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m128i v[8], a[8], c[8];
    for (int i = 0; i < 8; i++) v[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(q + 16 * i)), pair);
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm_unpacklo_epi16(v[i], v[i + 1]);
        a[i + 1] = _mm_unpackhi_epi16(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        c[i] = _mm_unpacklo_epi32(a[i], a[i + 2]);
        c[i + 1] = _mm_unpackhi_epi32(a[i], a[i + 2]);
        c[i + 2] = _mm_unpacklo_epi32(a[i + 1], a[i + 3]);
        c[i + 3] = _mm_unpackhi_epi32(a[i + 1], a[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        _mm_storeu_si128((__m128i *)(out + 32 * i), _mm_unpacklo_epi64(c[i], c[i + 4]));
        _mm_storeu_si128((__m128i *)(out + 32 * i + 16), _mm_unpackhi_epi64(c[i], c[i + 4]));
    }
}

#endif /* FIC_Q1_PLANES_H */
