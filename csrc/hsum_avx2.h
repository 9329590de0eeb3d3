/* hsum_avx2.h - lane sums of __m256 in one fixed order, shared by the FFN's fixed-point down rows
 * (kernels_avx2.c) and the Q1_0 prefill (qdot_avx2.c): x86 only, included after <immintrin.h>.
 * One order for one row alone and for a row among eight, so a row's value does not depend on how
 * rows were grouped (FIC_FFN_FIXED's split independence). */
#ifndef FIC_HSUM_AVX2_H
#define FIC_HSUM_AVX2_H

#define FIC_HSUM_TGT __attribute__((target("avx2,fma")))

/* The sum of v's lanes as hsum8_avx2 sums each of its vectors: ((v0+v1)+(v2+v3))+((v4+v5)+(v6+v7)). */
FIC_HSUM_TGT static inline float hsum_pairs_avx2(__m256 v) {
    const __m256 h = _mm256_hadd_ps(v, v);
    const __m256 q = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}

/* Lane i: the sum of v[i]'s lanes, in hsum_pairs_avx2's order. */
FIC_HSUM_TGT static inline __m256 hsum8_avx2(const __m256 *v) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

#undef FIC_HSUM_TGT
#endif /* FIC_HSUM_AVX2_H */
