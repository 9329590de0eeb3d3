/* exp_avx2.h - e^x for x already clamped to [-87.3, 88.7], shared by the attention's softmax
 * (attention.c, clamped below only) and the FFN's silu (kernels_avx2.c): x = n ln2 + r with ln2 in
 * two parts, Cephes' degree-6 polynomial for e^r (~2 ulp), 2^n built in the exponent bits (from
 * x ~ 88.03, n = 128, that is +inf, as expf is from 88.72). x86 only, after <immintrin.h>. */
#ifndef FIC_EXP_AVX2_H
#define FIC_EXP_AVX2_H

/* The constants, one set for both widths (their outputs agree lane for lane). */
#define FIC_EXP_LOG2E 1.44269504088896341f
#define FIC_EXP_LN2_HI 0.693359375f
#define FIC_EXP_LN2_LO -2.12194440e-4f
#define FIC_EXP_P0 1.9875691500e-4f
#define FIC_EXP_P1 1.3981999507e-3f
#define FIC_EXP_P2 8.3334519073e-3f
#define FIC_EXP_P3 4.1665795894e-2f
#define FIC_EXP_P4 1.6666665459e-1f
#define FIC_EXP_P5 5.0000001201e-1f

#define FIC_EXP_TGT __attribute__((target("avx2,fma")))
#define FIC_EXP512_TGT __attribute__((target("avx512f")))

FIC_EXP_TGT static inline __m256 exp256_clamped(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(FIC_EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FIC_EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FIC_EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(FIC_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FIC_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FIC_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FIC_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FIC_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FIC_EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The same operations on 16 lanes (AVX-512F): each lane's value is exp256_clamped's. */
FIC_EXP512_TGT static inline __m512 exp512_clamped(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(FIC_EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FIC_EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FIC_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(FIC_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FIC_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FIC_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FIC_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FIC_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FIC_EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

#undef FIC_EXP_TGT
#undef FIC_EXP512_TGT
#endif /* FIC_EXP_AVX2_H */
