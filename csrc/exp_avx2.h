/* exp_avx2.h - e^x for x already clamped to [-87.3, 88.7], shared by the attention's softmax
 * (attention.c, clamped below only) and the FFN's silu (kernels_avx2.c): x = n ln2 + r with ln2 in
 * two parts, Cephes' degree-6 polynomial for e^r (~2 ulp), 2^n built in the exponent bits (from
 * x ~ 88.03, n = 128, that is +inf, as expf is from 88.72). x86 only, after <immintrin.h>. */
#ifndef FIC_EXP_AVX2_H
#define FIC_EXP_AVX2_H

#define FIC_EXP_TGT __attribute__((target("avx2,fma")))

FIC_EXP_TGT static inline __m256 exp256_clamped(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#undef FIC_EXP_TGT
#endif /* FIC_EXP_AVX2_H */
