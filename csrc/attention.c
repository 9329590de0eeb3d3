/* attention.c - causal GQA attention over an fp16 KV cache, with an online (streaming) softmax.
 *
 * Work is cut into items of one kv head and a block of up to ATT_QB queries (prefill) or one kv
 * head and a slice of positions (decode, t = 1: flash-decoding's split-K). An item reads its kv
 * head's K and V rows once, tile by tile (ATT_B positions), converts them to float32 into the
 * thread's tile, and uses them for every query row it owns: the g = n_heads / n_kv_heads heads
 * of each of its queries (on AVX2 a decode's single query reads the halves directly instead).
 * Per row it keeps a running max m, a running sum l of exp(s - m) and an accumulator of exp(s - m) v, rescaled when m grows; the t x n score matrix never exists.
 * Decode slices write (m, l, acc) into the workspace's partials and the caller's thread merges
 * them. The number of slices depends only on the context length, never on the thread count, so
 * results are bit-identical for any number of threads.
 *
 * Per implementation there are four pieces: fp16 -> fp32 tile conversion, a tile of scores
 * (scale * q.k), exp in place with its sum, and acc = acc * corr + sum_j p_j v_j. The reference
 * is scalar C (expf); AVX2 (+F16C, FMA) and NEON use a polynomial exp (Cephes, ~2 ulp). AVX2 also
 * takes two or three heads of one query per pass (scores2/accum2, scores3/accum3: each K/V load
 * feeds two or three FMAs). AVX-512 runs the AVX2 code with 512-bit tile conversion and prefill
 * blocks, which give the AVX2 kernels' bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "fic.h"
#include "pool.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include "exp_avx2.h"
#define ATT_X86 1
#define ATT_TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ATT_TGT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define ATT_B 32           /* positions per tile */
#define ATT_QB 8           /* queries per prefill item */
#define ATT_MAX_SPLITS 16  /* decode: most slices of one kv head's positions */
#define ATT_SPLIT_MIN 256  /* decode: fewest positions per slice */
#define ATT_ALIGN 16       /* floats: workspace regions start on 64-byte multiples */

static int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

/* Floats of one thread's tile region for `rows` query rows: K and V tiles, scores, and per row
 * (m, l, acc[head_dim]); then the AVX2 block path's (attend_block_avx2): the item's queries
 * transposed (hd x rp), a tile of scores key-major (ATT_B x rp) and per row m, l, corr, for
 * rp = rows rounded up to 16. */
#define ATT_RP(rows) round_up(rows, 16)
static int64_t thread_floats(int64_t rows, int64_t hd) {
    const int64_t rp = ATT_RP(rows);
    return round_up(2 * ATT_B * hd + rows * ATT_B + rows * (hd + 2), ATT_ALIGN) + hd * rp + ATT_B * rp + 3 * rp;
}

static int64_t partial_floats(int64_t n_heads, int64_t hd) {
    return round_up(n_heads * ATT_MAX_SPLITS * (hd + 2), ATT_ALIGN);
}

/* The next tile's K and V rows of one head, positions [p, min(p + ATT_B, p1)): a head's rows are
 * head_dim halves of every kv_stride, a pattern the hardware prefetcher follows late (long-context
 * decode ran at 9 GB/s of cache read, bench/RESULTS.md). A cursor, so the decode kernels can take
 * the rows a few at a time between their arithmetic: a whole tile's lines in one burst (256 for
 * head_dim 128) stalled on the core's line-fill buffers with the arithmetic waiting behind them. */
typedef struct {
    const uint16_t *k, *v;
    int64_t kvs, hd, left; /* rows still to prefetch */
} att_pf;

static att_pf pf_tile(const uint16_t *kh, const uint16_t *vh, int64_t kvs, int64_t hd, int64_t p, int64_t p1) {
    const int64_t end = p + ATT_B < p1 ? p + ATT_B : p1;
    att_pf c = {kh + p * kvs, vh + p * kvs, kvs, hd, end > p ? end - p : 0};
    return c;
}

static inline void pf_rows(att_pf *c, int64_t n) {
    for (; n > 0 && c->left > 0; n--, c->left--) {
        for (int64_t o = 0; o < c->hd; o += 32) { /* 32 halves: a 64-byte line */
            __builtin_prefetch(c->k + o, 0, 3);
            __builtin_prefetch(c->v + o, 0, 3);
        }
        c->k += c->kvs;
        c->v += c->kvs;
    }
}

int64_t fic_attention_ws_floats(int n_threads, int64_t t, int64_t n_heads, int64_t head_dim) {
    if (n_threads < 1 || t < 1 || n_heads < 1 || head_dim < 1) return FIC_ERR_ARG;
    int64_t rows = (t < ATT_QB ? t : ATT_QB) * n_heads;
    return partial_floats(n_heads, head_dim) + n_threads * thread_floats(rows, head_dim);
}

/* ---- reference --------------------------------------------------------------------------- */

static void cvt_tile_ref(const uint16_t *src, int64_t stride, int64_t nb, int64_t hd, float *dst) {
    for (int64_t j = 0; j < nb; j++)
        for (int64_t d = 0; d < hd; d++) dst[j * hd + d] = fic_h2f(src[j * stride + d]);
}

static void scores_ref(const float *q, const float *kt, int64_t nb, int64_t hd, float scale, float *s) {
    for (int64_t j = 0; j < nb; j++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < hd; d++) acc += q[d] * kt[j * hd + d];
        s[j] = scale * acc;
    }
}

/* s[j] = exp(s[j] - m); returns the sum. */
static float exp_sum_ref(float *s, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    return sum;
}

static void accum_ref(float *acc, float corr, const float *p, const float *vt, int64_t nb, int64_t hd) {
    for (int64_t d = 0; d < hd; d++) {
        float a = acc[d] * corr;
        for (int64_t j = 0; j < nb; j++) a += p[j] * vt[j * hd + d];
        acc[d] = a;
    }
}

static void f32_to_f16_ref(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fic_fp32_to_fp16(src[i]);
}

/* ---- AVX2 + FMA + F16C ------------------------------------------------------------------- */
#if defined(ATT_X86)

/* exp(x) for x <= 0 (softmax arguments). Below -87.3 the result would be subnormal: clamped there
 * (e^-87.3 ~ 1e-38 is nothing next to the row's max, which is 1). */
ATT_TGT_AVX2 static inline __m256 exp256(__m256 x) { return exp256_clamped(_mm256_max_ps(x, _mm256_set1_ps(-87.3f))); }

ATT_TGT_AVX2 static void cvt_tile_avx2(const uint16_t *src, int64_t stride, int64_t nb, int64_t hd, float *dst) {
    for (int64_t j = 0; j < nb; j++) {
        const uint16_t *s = src + j * stride;
        float *o = dst + j * hd;
        int64_t d = 0;
        for (; d + 16 <= hd; d += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(s + d));
            _mm256_storeu_ps(o + d, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
            _mm256_storeu_ps(o + d + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
        }
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(o + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + d))));
        for (; d < hd; d++) o[d] = _cvtsh_ss(s[d]);
    }
}

/* The same with 16 halves per conversion (AVX-512F: a 512-bit vcvtph2ps costs what a 256-bit one
 * does, and the tile conversion was most of long-context decode, bench/RESULTS.md). */
ATT_TGT_AVX512 static void cvt_tile_avx512(const uint16_t *src, int64_t stride, int64_t nb, int64_t hd, float *dst) {
    for (int64_t j = 0; j < nb; j++) {
        const uint16_t *s = src + j * stride;
        float *o = dst + j * hd;
        int64_t d = 0;
        for (; d + 16 <= hd; d += 16)
            _mm512_storeu_ps(o + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + d))));
        for (; d < hd; d++) o[d] = _cvtsh_ss(s[d]);
    }
}

/* The per-row kernels below read K and V rows either from a tile of floats or straight from the
 * fp16 cache (decode: a tile would be read once, and writing it cost more than the conversion,
 * bench/RESULTS.md): ld8 and ld1 give the same floats either way, so both give the same bits. */
#define ATT_INLINE inline __attribute__((always_inline))
ATT_TGT_AVX2 static ATT_INLINE __m256 ld8(const void *rows, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)rows + i)))
                : _mm256_loadu_ps((const float *)rows + i);
}
ATT_TGT_AVX2 static ATT_INLINE float ld1(const void *rows, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)rows)[i]) : ((const float *)rows)[i];
}

/* Four dot products at a time: four accumulators, then hadds leave the four sums in one
 * 128-bit vector (one horizontal reduction per four keys instead of one per key). K rows are
 * ks elements apart, floats or halves (half). */
ATT_TGT_AVX2 static ATT_INLINE void scores_rows(const float *q, const void *kt, int64_t ks, int half, int64_t nb,
                                                int64_t hd, float scale, float *s) {
    const int64_t hd8 = hd & ~(int64_t)7;
    const __m128 vs = _mm_set1_ps(scale);
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        const int64_t k0 = j * ks, k1 = k0 + ks, k2 = k1 + ks, k3 = k2 + ks;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < hd8; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, ld8(kt, k0 + d, half), a0);
            a1 = _mm256_fmadd_ps(qv, ld8(kt, k1 + d, half), a1);
            a2 = _mm256_fmadd_ps(qv, ld8(kt, k2 + d, half), a2);
            a3 = _mm256_fmadd_ps(qv, ld8(kt, k3 + d, half), a3);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (hd8 < hd) {
            float tail[4] = {0, 0, 0, 0};
            for (int64_t d = hd8; d < hd; d++) {
                tail[0] += q[d] * ld1(kt, k0 + d, half);
                tail[1] += q[d] * ld1(kt, k1 + d, half);
                tail[2] += q[d] * ld1(kt, k2 + d, half);
                tail[3] += q[d] * ld1(kt, k3 + d, half);
            }
            r = _mm_add_ps(r, _mm_loadu_ps(tail));
        }
        _mm_storeu_ps(s + j, _mm_mul_ps(r, vs));
    }
    for (; j < nb; j++) {
        const int64_t k = j * ks;
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), ld8(kt, k + d, half), a);
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        r = _mm_hadd_ps(r, r);
        r = _mm_hadd_ps(r, r);
        float acc = _mm_cvtss_f32(r);
        for (int64_t d = hd8; d < hd; d++) acc += q[d] * ld1(kt, k + d, half);
        s[j] = scale * acc;
    }
}

/* The one-row kernel from a tile of floats (rows hd apart) or from the cache's halves (half). */
ATT_TGT_AVX2 static void scores_avx2(const float *q, const void *kt, int64_t ks, int half, int64_t nb, int64_t hd,
                                     float scale, float *s) {
    if (half)
        scores_rows(q, kt, ks, 1, nb, hd, scale, s);
    else
        scores_rows(q, kt, ks, 0, nb, hd, scale, s);
}

ATT_TGT_AVX2 static float exp_sum_avx2(float *s, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    r = _mm_hadd_ps(r, r);
    r = _mm_hadd_ps(r, r);
    float total = _mm_cvtss_f32(r);
    if (j < n) { /* the tail through a padded vector, so every element gets the same exp */
        float buf[8] = {0};
        memcpy(buf, s + j, (size_t)(n - j) * sizeof(float));
        _mm256_storeu_ps(buf, exp256(_mm256_sub_ps(_mm256_loadu_ps(buf), vm)));
        memcpy(s + j, buf, (size_t)(n - j) * sizeof(float));
        for (int64_t i = 0; i < n - j; i++) total += buf[i];
    }
    return total;
}

/* acc = acc * corr + sum_j p[j] vt[j] over hd columns of V rows `stride` elements apart (floats
 * or halves), 32 columns (four registers) at a time over all j. */
ATT_TGT_AVX2 static ATT_INLINE void accum_rows(float *acc, float corr, const float *p, const void *vt, int64_t nb,
                                               int64_t hd, int64_t stride, int half) {
    const __m256 vc = _mm256_set1_ps(corr);
    int64_t d = 0;
    for (; d + 32 <= hd; d += 32) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + d), vc);
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 8), vc);
        __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 16), vc);
        __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 24), vc);
        for (int64_t j = 0; j < nb; j++) {
            const int64_t v = j * stride + d;
            __m256 pj = _mm256_broadcast_ss(p + j);
            a0 = _mm256_fmadd_ps(pj, ld8(vt, v, half), a0);
            a1 = _mm256_fmadd_ps(pj, ld8(vt, v + 8, half), a1);
            a2 = _mm256_fmadd_ps(pj, ld8(vt, v + 16, half), a2);
            a3 = _mm256_fmadd_ps(pj, ld8(vt, v + 24, half), a3);
        }
        _mm256_storeu_ps(acc + d, a0);
        _mm256_storeu_ps(acc + d + 8, a1);
        _mm256_storeu_ps(acc + d + 16, a2);
        _mm256_storeu_ps(acc + d + 24, a3);
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), vc);
        for (int64_t j = 0; j < nb; j++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), ld8(vt, j * stride + d, half), a);
        _mm256_storeu_ps(acc + d, a);
    }
    for (; d < hd; d++) {
        float a = acc[d] * corr;
        for (int64_t j = 0; j < nb; j++) a += p[j] * ld1(vt, j * stride + d, half);
        acc[d] = a;
    }
}

ATT_TGT_AVX2 static void accum_avx2(float *acc, float corr, const float *p, const void *vt, int64_t stride, int half,
                                    int64_t nb, int64_t hd) {
    if (half)
        accum_rows(acc, corr, p, vt, nb, hd, stride, 1);
    else
        accum_rows(acc, corr, p, vt, nb, hd, stride, 0);
}

/* Two query rows of the same query (heads sharing this kv head) at once: each K and V load
 * feeds two FMAs instead of one. K and V rows ks and vs elements apart, floats or halves (half). */
ATT_TGT_AVX2 static ATT_INLINE void scores2_rows(const float *qa, const float *qb, const void *kt, int64_t ks, int half,
                                                 int64_t nb, int64_t hd, float scale, float *sa, float *sb) {
    const int64_t hd8 = hd & ~(int64_t)7;
    if (hd8 != hd) { /* odd head_dim: the one-row kernel handles the tails */
        scores_rows(qa, kt, ks, half, nb, hd, scale, sa);
        scores_rows(qb, kt, ks, half, nb, hd, scale, sb);
        return;
    }
    const __m128 vs = _mm_set1_ps(scale);
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        const int64_t k0 = j * ks, k1 = k0 + ks, k2 = k1 + ks, k3 = k2 + ks;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t d = 0; d < hd; d += 8) {
            __m256 qva = _mm256_loadu_ps(qa + d), qvb = _mm256_loadu_ps(qb + d), k;
            k = ld8(kt, k0 + d, half); a0 = _mm256_fmadd_ps(qva, k, a0); b0 = _mm256_fmadd_ps(qvb, k, b0);
            k = ld8(kt, k1 + d, half); a1 = _mm256_fmadd_ps(qva, k, a1); b1 = _mm256_fmadd_ps(qvb, k, b1);
            k = ld8(kt, k2 + d, half); a2 = _mm256_fmadd_ps(qva, k, a2); b2 = _mm256_fmadd_ps(qvb, k, b2);
            k = ld8(kt, k3 + d, half); a3 = _mm256_fmadd_ps(qva, k, a3); b3 = _mm256_fmadd_ps(qvb, k, b3);
        }
        __m256 ha = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m256 hb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
        _mm_storeu_ps(sa + j, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(ha), _mm256_extractf128_ps(ha, 1)), vs));
        _mm_storeu_ps(sb + j, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(hb), _mm256_extractf128_ps(hb, 1)), vs));
    }
    if (j < nb) {
        scores_rows(qa, half ? (const void *)((const uint16_t *)kt + j * ks) : (const void *)((const float *)kt + j * ks), ks,
                    half, nb - j, hd, scale, sa + j);
        scores_rows(qb, half ? (const void *)((const uint16_t *)kt + j * ks) : (const void *)((const float *)kt + j * ks), ks,
                    half, nb - j, hd, scale, sb + j);
    }
}

ATT_TGT_AVX2 static ATT_INLINE void accum2_rows(float *acca, float corra, const float *pa, float *accb, float corrb,
                                                const float *pb, const void *vt, int64_t vs, int half, int64_t nb,
                                                int64_t hd) {
    const __m256 ca = _mm256_set1_ps(corra), cb = _mm256_set1_ps(corrb);
    int64_t d = 0;
    for (; d + 32 <= hd; d += 32) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acca + d), ca), b0 = _mm256_mul_ps(_mm256_loadu_ps(accb + d), cb);
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acca + d + 8), ca), b1 = _mm256_mul_ps(_mm256_loadu_ps(accb + d + 8), cb);
        __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acca + d + 16), ca), b2 = _mm256_mul_ps(_mm256_loadu_ps(accb + d + 16), cb);
        __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(acca + d + 24), ca), b3 = _mm256_mul_ps(_mm256_loadu_ps(accb + d + 24), cb);
        for (int64_t j = 0; j < nb; j++) {
            const int64_t v = j * vs + d;
            __m256 pja = _mm256_broadcast_ss(pa + j), pjb = _mm256_broadcast_ss(pb + j), x;
            x = ld8(vt, v, half); a0 = _mm256_fmadd_ps(pja, x, a0); b0 = _mm256_fmadd_ps(pjb, x, b0);
            x = ld8(vt, v + 8, half); a1 = _mm256_fmadd_ps(pja, x, a1); b1 = _mm256_fmadd_ps(pjb, x, b1);
            x = ld8(vt, v + 16, half); a2 = _mm256_fmadd_ps(pja, x, a2); b2 = _mm256_fmadd_ps(pjb, x, b2);
            x = ld8(vt, v + 24, half); a3 = _mm256_fmadd_ps(pja, x, a3); b3 = _mm256_fmadd_ps(pjb, x, b3);
        }
        _mm256_storeu_ps(acca + d, a0);
        _mm256_storeu_ps(acca + d + 8, a1);
        _mm256_storeu_ps(acca + d + 16, a2);
        _mm256_storeu_ps(acca + d + 24, a3);
        _mm256_storeu_ps(accb + d, b0);
        _mm256_storeu_ps(accb + d + 8, b1);
        _mm256_storeu_ps(accb + d + 16, b2);
        _mm256_storeu_ps(accb + d + 24, b3);
    }
    if (d < hd) { /* columns past the last 32: the one-row kernel on the rest */
        const void *rest = half ? (const void *)((const uint16_t *)vt + d) : (const void *)((const float *)vt + d);
        accum_rows(acca + d, corra, pa, rest, nb, hd - d, vs, half);
        accum_rows(accb + d, corrb, pb, rest, nb, hd - d, vs, half);
    }
}

/* Three query rows of the same query at once (an odd number of heads a kv head: SmolLM2's 3,
 * Qwen2.5's 7 as pairs and a triple), each K and V load feeding three FMAs. Per head the operations
 * of scores_rows and accum_rows in their order: the same bits. */
ATT_TGT_AVX2 static ATT_INLINE void scores3_rows(const float *const q[3], const void *kt, int64_t ks, int half, int64_t nb,
                                                 int64_t hd, float scale, float *const s[3]) {
    if (hd % 8 != 0 || nb < 4) {
        for (int h = 0; h < 3; h++) scores_rows(q[h], kt, ks, half, nb, hd, scale, s[h]);
        return;
    }
    const __m128 vs = _mm_set1_ps(scale);
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        __m256 a[3][4];
        for (int h = 0; h < 3; h++)
            for (int i = 0; i < 4; i++) a[h][i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd; d += 8)
            for (int i = 0; i < 4; i++) {
                const __m256 k = ld8(kt, (j + i) * ks + d, half);
                for (int h = 0; h < 3; h++) a[h][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + d), k, a[h][i]);
            }
        for (int h = 0; h < 3; h++) {
            const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
            _mm_storeu_ps(s[h] + j, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), vs));
        }
    }
    if (j < nb) {
        const void *rest = half ? (const void *)((const uint16_t *)kt + j * ks) : (const void *)((const float *)kt + j * ks);
        for (int h = 0; h < 3; h++) scores_rows(q[h], rest, ks, half, nb - j, hd, scale, s[h] + j);
    }
}

ATT_TGT_AVX2 static ATT_INLINE void accum3_rows(float *const acc[3], const float corr[3], const float *const p[3],
                                                const void *vt, int64_t vs, int half, int64_t nb, int64_t hd) {
    int64_t d = 0;
    for (; d + 16 <= hd; d += 16) {
        __m256 a[3][2];
        for (int h = 0; h < 3; h++)
            for (int c = 0; c < 2; c++) a[h][c] = _mm256_mul_ps(_mm256_loadu_ps(acc[h] + d + 8 * c), _mm256_set1_ps(corr[h]));
        for (int64_t jj = 0; jj < nb; jj++)
            for (int c = 0; c < 2; c++) {
                const __m256 x = ld8(vt, jj * vs + d + 8 * c, half);
                for (int h = 0; h < 3; h++) a[h][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[h] + jj), x, a[h][c]);
            }
        for (int h = 0; h < 3; h++)
            for (int c = 0; c < 2; c++) _mm256_storeu_ps(acc[h] + d + 8 * c, a[h][c]);
    }
    if (d < hd) { /* columns past the last 16: the one-row kernel on the rest */
        const void *rest = half ? (const void *)((const uint16_t *)vt + d) : (const void *)((const float *)vt + d);
        for (int h = 0; h < 3; h++) accum_rows(acc[h] + d, corr[h], p[h], rest, nb, hd - d, vs, half);
    }
}

/* The triple from a tile of floats or from the cache's halves, as scores_avx2. */
ATT_TGT_AVX2 static void scores3_avx2(const float *const q[3], const void *kt, int64_t ks, int half, int64_t nb, int64_t hd,
                                      float scale, float *const s[3]) {
    if (half)
        scores3_rows(q, kt, ks, 1, nb, hd, scale, s);
    else
        scores3_rows(q, kt, ks, 0, nb, hd, scale, s);
}
ATT_TGT_AVX2 static void accum3_avx2(float *const acc[3], const float corr[3], const float *const p[3], const void *vt,
                                     int64_t vs, int half, int64_t nb, int64_t hd) {
    if (half)
        accum3_rows(acc, corr, p, vt, vs, 1, nb, hd);
    else
        accum3_rows(acc, corr, p, vt, vs, 0, nb, hd);
}

/* The pair from a tile of floats or from the cache's halves, as scores_avx2. */
ATT_TGT_AVX2 static void scores2_avx2(const float *qa, const float *qb, const void *kt, int64_t ks, int half, int64_t nb,
                                      int64_t hd, float scale, float *sa, float *sb) {
    if (half)
        scores2_rows(qa, qb, kt, ks, 1, nb, hd, scale, sa, sb);
    else
        scores2_rows(qa, qb, kt, ks, 0, nb, hd, scale, sa, sb);
}
ATT_TGT_AVX2 static void accum2_avx2(float *acca, float corra, const float *pa, float *accb, float corrb,
                                     const float *pb, const void *vt, int64_t vs, int half, int64_t nb, int64_t hd) {
    if (half)
        accum2_rows(acca, corra, pa, accb, corrb, pb, vt, vs, 1, nb, hd);
    else
        accum2_rows(acca, corra, pa, accb, corrb, pb, vt, vs, 0, nb, hd);
}

ATT_TGT_AVX2 static void f32_to_f16_avx2(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif /* ATT_X86 */

/* ---- NEON -------------------------------------------------------------------------------- */
#if defined(__aarch64__)

static inline float32x4_t exp_neon(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(-87.3f));
    float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static inline float32x4_t h4_neon(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

static void cvt_tile_neon(const uint16_t *src, int64_t stride, int64_t nb, int64_t hd, float *dst) {
    for (int64_t j = 0; j < nb; j++) {
        const uint16_t *s = src + j * stride;
        float *o = dst + j * hd;
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8) {
            float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(s + d));
            vst1q_f32(o + d, vcvt_f32_f16(vget_low_f16(h)));
            vst1q_f32(o + d + 4, vcvt_high_f32_f16(h));
        }
        for (; d + 4 <= hd; d += 4) vst1q_f32(o + d, h4_neon(s + d));
        for (; d < hd; d++) o[d] = fic_h2f(s[d]);
    }
}

static void scores_neon(const float *q, const float *kt, int64_t nb, int64_t hd, float scale, float *s) {
    const int64_t hd4 = hd & ~(int64_t)3;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        const float *k0 = kt + j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
        float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < hd4; d += 4) {
            float32x4_t qv = vld1q_f32(q + d);
            a0 = vfmaq_f32(a0, qv, vld1q_f32(k0 + d));
            a1 = vfmaq_f32(a1, qv, vld1q_f32(k1 + d));
            a2 = vfmaq_f32(a2, qv, vld1q_f32(k2 + d));
            a3 = vfmaq_f32(a3, qv, vld1q_f32(k3 + d));
        }
        float32x4_t r = vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3));
        for (int64_t d = hd4; d < hd; d++) {
            r = vsetq_lane_f32(vgetq_lane_f32(r, 0) + q[d] * k0[d], r, 0);
            r = vsetq_lane_f32(vgetq_lane_f32(r, 1) + q[d] * k1[d], r, 1);
            r = vsetq_lane_f32(vgetq_lane_f32(r, 2) + q[d] * k2[d], r, 2);
            r = vsetq_lane_f32(vgetq_lane_f32(r, 3) + q[d] * k3[d], r, 3);
        }
        vst1q_f32(s + j, vmulq_n_f32(r, scale));
    }
    for (; j < nb; j++) {
        const float *k = kt + j * hd;
        float32x4_t a = vdupq_n_f32(0);
        for (int64_t d = 0; d < hd4; d += 4) a = vfmaq_f32(a, vld1q_f32(q + d), vld1q_f32(k + d));
        float acc = vaddvq_f32(a);
        for (int64_t d = hd4; d < hd; d++) acc += q[d] * k[d];
        s[j] = scale * acc;
    }
}

static float exp_sum_neon(float *s, int64_t n, float m) {
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t sum = vdupq_n_f32(0);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        float32x4_t e = exp_neon(vsubq_f32(vld1q_f32(s + j), vm));
        vst1q_f32(s + j, e);
        sum = vaddq_f32(sum, e);
    }
    float total = vaddvq_f32(sum);
    if (j < n) {
        float buf[4] = {0};
        memcpy(buf, s + j, (size_t)(n - j) * sizeof(float));
        vst1q_f32(buf, exp_neon(vsubq_f32(vld1q_f32(buf), vm)));
        memcpy(s + j, buf, (size_t)(n - j) * sizeof(float));
        for (int64_t i = 0; i < n - j; i++) total += buf[i];
    }
    return total;
}

static void accum_neon(float *acc, float corr, const float *p, const float *vt, int64_t nb, int64_t hd) {
    int64_t d = 0;
    for (; d + 16 <= hd; d += 16) {
        float32x4_t a0 = vmulq_n_f32(vld1q_f32(acc + d), corr);
        float32x4_t a1 = vmulq_n_f32(vld1q_f32(acc + d + 4), corr);
        float32x4_t a2 = vmulq_n_f32(vld1q_f32(acc + d + 8), corr);
        float32x4_t a3 = vmulq_n_f32(vld1q_f32(acc + d + 12), corr);
        for (int64_t j = 0; j < nb; j++) {
            const float *v = vt + j * hd + d;
            a0 = vfmaq_n_f32(a0, vld1q_f32(v), p[j]);
            a1 = vfmaq_n_f32(a1, vld1q_f32(v + 4), p[j]);
            a2 = vfmaq_n_f32(a2, vld1q_f32(v + 8), p[j]);
            a3 = vfmaq_n_f32(a3, vld1q_f32(v + 12), p[j]);
        }
        vst1q_f32(acc + d, a0);
        vst1q_f32(acc + d + 4, a1);
        vst1q_f32(acc + d + 8, a2);
        vst1q_f32(acc + d + 12, a3);
    }
    for (; d + 4 <= hd; d += 4) {
        float32x4_t a = vmulq_n_f32(vld1q_f32(acc + d), corr);
        for (int64_t j = 0; j < nb; j++) a = vfmaq_n_f32(a, vld1q_f32(vt + j * hd + d), p[j]);
        vst1q_f32(acc + d, a);
    }
    for (; d < hd; d++) {
        float a = acc[d] * corr;
        for (int64_t j = 0; j < nb; j++) a += p[j] * vt[j * hd + d];
        acc[d] = a;
    }
}

static void f32_to_f16_neon(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    for (; i < n; i++) dst[i] = fic_fp32_to_fp16(src[i]);
}
#endif /* __aarch64__ */

/* ---- dispatch ---------------------------------------------------------------------------- */

/* impl is resolved: REF, AVX2 (also for AVX-512, then wide is set) or NEON. */
static void cvt_tile(int impl, int wide, const uint16_t *src, int64_t stride, int64_t nb, int64_t hd, float *dst) {
    (void)wide; /* x86 only */
    switch (impl) {
#if defined(ATT_X86)
    case FIC_IMPL_AVX2:
        if (wide)
            cvt_tile_avx512(src, stride, nb, hd, dst);
        else
            cvt_tile_avx2(src, stride, nb, hd, dst);
        return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: cvt_tile_neon(src, stride, nb, hd, dst); return;
#endif
    default: cvt_tile_ref(src, stride, nb, hd, dst);
    }
}

static void scores(int impl, const float *q, const float *kt, int64_t nb, int64_t hd, float scale, float *s) {
    switch (impl) {
#if defined(ATT_X86)
    case FIC_IMPL_AVX2: scores_avx2(q, kt, hd, 0, nb, hd, scale, s); return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: scores_neon(q, kt, nb, hd, scale, s); return;
#endif
    default: scores_ref(q, kt, nb, hd, scale, s);
    }
}

static float exp_sum(int impl, float *s, int64_t n, float m) {
    switch (impl) {
#if defined(ATT_X86)
    case FIC_IMPL_AVX2: return exp_sum_avx2(s, n, m);
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: return exp_sum_neon(s, n, m);
#endif
    default: return exp_sum_ref(s, n, m);
    }
}

static void accum(int impl, float *acc, float corr, const float *p, const float *vt, int64_t nb, int64_t hd) {
    switch (impl) {
#if defined(ATT_X86)
    case FIC_IMPL_AVX2: accum_avx2(acc, corr, p, vt, hd, 0, nb, hd); return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: accum_neon(acc, corr, p, vt, nb, hd); return;
#endif
    default: accum_ref(acc, corr, p, vt, nb, hd);
    }
}

static int resolve_impl(int impl) {
    if (impl == FIC_IMPL_AUTO) impl = fic_impl_best();
    if (impl == FIC_IMPL_AVX512) impl = FIC_IMPL_AVX2; /* implied by AVX-512's availability check */
    return impl;
}

/* ---- the kernel -------------------------------------------------------------------------- */

typedef struct {
    int impl, wide; /* wide: AVX-512 asked for (impl AVX2): its tile conversion */
    const float *q;
    const uint16_t *k, *v;
    float *out;
    int64_t t, pos0, nh, nkv, hd, kvs, g;
    float scale;
    float *partials;     /* decode: [head][slice] of (m, l, acc[hd]) */
    float *tiles;        /* per-thread regions of thread_floats(rows, hd) */
    int64_t tile_floats, max_rows; /* max_rows: query rows a tile region has room for */
    int64_t n_qb;        /* prefill: query blocks */
    int64_t n_split, split_len; /* decode */
} att_job;

/* The streaming softmax step for one row and one tile of scores s[0..n): the new running max m,
 * s <- exp(s - m), l <- l * corr + sum; returns corr = exp(m_old - m), the factor acc must take. */
static float online_update(int impl, float *state, float *s, int64_t n) {
    float mt = s[0];
    for (int64_t i = 1; i < n; i++) mt = s[i] > mt ? s[i] : mt;
    const float m_old = state[0], m_new = mt > m_old ? mt : m_old;
    const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
    const float sum = exp_sum(impl, s, n, m_new);
    state[0] = m_new;
    state[1] = state[1] * corr + sum;
    return corr;
}

#if defined(ATT_X86)
/* ---- AVX2 prefill in blocks of rows (attend_block_avx2) ------------------------------------
 * The per-row path pays, per row and tile, a horizontal reduction per key, a scalar max and a
 * call chain; here one tile is three register-blocked passes over all the item's rows at once
 * (rows = queries x heads of one kv head): scores key-major from the queries transposed once per
 * item (keys broadcast, rows in vectors), the online softmax with rows in vector lanes, and the
 * accumulators updated 6 rows x 16 columns at a time (p broadcast, V rows in vectors). Each
 * score and each accumulator column is one in-order sum, as the reference's. */

/* sT[j][rc..rc+16) = scale * q_r . k_j for NK keys from j0, rows rc..rc+16 of qT (hd x rp). */
ATT_TGT_AVX2 static inline __attribute__((always_inline)) void block_scores_nk(
        const float *qT, int64_t rp, int64_t rc, const float *k0, int64_t hd, float scale, float *sT, const int nk) {
    __m256 a0[4], a1[4];
    for (int i = 0; i < nk; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    const float *qp = qT + rc;
    for (int64_t d = 0; d < hd; d++, qp += rp) {
        const __m256 w0 = _mm256_loadu_ps(qp), w1 = _mm256_loadu_ps(qp + 8);
        for (int i = 0; i < nk; i++) {
            const __m256 b = _mm256_broadcast_ss(k0 + i * hd + d);
            a0[i] = _mm256_fmadd_ps(w0, b, a0[i]);
            a1[i] = _mm256_fmadd_ps(w1, b, a1[i]);
        }
    }
    const __m256 vs = _mm256_set1_ps(scale);
    for (int i = 0; i < nk; i++) {
        _mm256_storeu_ps(sT + i * rp + rc, _mm256_mul_ps(a0[i], vs));
        _mm256_storeu_ps(sT + i * rp + rc + 8, _mm256_mul_ps(a1[i], vs));
    }
}

ATT_TGT_AVX2 static void block_scores_avx2(const float *qT, int64_t rp, const float *kt, int64_t nb, int64_t hd,
                                           float scale, float *sT) {
    for (int64_t j0 = 0; j0 < nb; j0 += 4) {
        const float *k0 = kt + j0 * hd;
        float *s0 = sT + j0 * rp;
        for (int64_t rc = 0; rc < rp; rc += 16) {
            switch (nb - j0 < 4 ? nb - j0 : 4) { /* constant key counts: accumulators in registers */
            case 4: block_scores_nk(qT, rp, rc, k0, hd, scale, s0, 4); break;
            case 3: block_scores_nk(qT, rp, rc, k0, hd, scale, s0, 3); break;
            case 2: block_scores_nk(qT, rp, rc, k0, hd, scale, s0, 2); break;
            default: block_scores_nk(qT, rp, rc, k0, hd, scale, s0, 1); break;
            }
        }
    }
}

/* The online softmax step for rows in lanes: m, l, corr per row (rp of them); sT <- exp(sT - m). */
ATT_TGT_AVX2 static void block_softmax_avx2(float *sT, int64_t rp, int64_t nb, float *mv, float *lv, float *cv) {
    for (int64_t r = 0; r < rp; r += 8) {
        const __m256 m_old = _mm256_loadu_ps(mv + r);
        __m256 mt = _mm256_loadu_ps(sT + r);
        for (int64_t j = 1; j < nb; j++) mt = _mm256_max_ps(mt, _mm256_loadu_ps(sT + j * rp + r));
        const __m256 m_new = _mm256_max_ps(m_old, mt);
        /* m_old = -inf (a row's first tile): exp256 clamps to ~1e-38, times l = acc = 0 */
        const __m256 corr = exp256(_mm256_sub_ps(m_old, m_new));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < nb; j++) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sT + j * rp + r), m_new));
            _mm256_storeu_ps(sT + j * rp + r, e);
            sum = _mm256_add_ps(sum, e);
        }
        _mm256_storeu_ps(mv + r, m_new);
        _mm256_storeu_ps(lv + r, _mm256_fmadd_ps(_mm256_loadu_ps(lv + r), corr, sum));
        _mm256_storeu_ps(cv + r, corr);
    }
}

/* acc_r = corr_r acc_r + sum_j p[j][r] v_j for NR rows from r0, columns dc..dc+16. */
ATT_TGT_AVX2 static inline __attribute__((always_inline)) void block_accum_nr(
        float *st, int64_t stride, int64_t r0, int64_t dc, const float *cv, const float *sT, int64_t rp,
        const float *vt, int64_t nb, int64_t hd, const int nr) {
    __m256 a0[6], a1[6];
    for (int i = 0; i < nr; i++) {
        const float *acc = st + (r0 + i) * stride + 2 + dc;
        const __m256 c = _mm256_broadcast_ss(cv + r0 + i);
        a0[i] = _mm256_mul_ps(_mm256_loadu_ps(acc), c);
        a1[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8), c);
    }
    for (int64_t j = 0; j < nb; j++) {
        const __m256 v0 = _mm256_loadu_ps(vt + j * hd + dc), v1 = _mm256_loadu_ps(vt + j * hd + dc + 8);
        const float *p = sT + j * rp + r0;
        for (int i = 0; i < nr; i++) {
            const __m256 b = _mm256_broadcast_ss(p + i);
            a0[i] = _mm256_fmadd_ps(b, v0, a0[i]);
            a1[i] = _mm256_fmadd_ps(b, v1, a1[i]);
        }
    }
    for (int i = 0; i < nr; i++) {
        float *acc = st + (r0 + i) * stride + 2 + dc;
        _mm256_storeu_ps(acc, a0[i]);
        _mm256_storeu_ps(acc + 8, a1[i]);
    }
}

ATT_TGT_AVX2 static void block_accum_avx2(float *st, int64_t stride, int64_t rows, const float *cv, const float *sT,
                                          int64_t rp, const float *vt, int64_t nb, int64_t hd) {
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        for (int64_t dc = 0; dc < hd; dc += 16) {
            switch (rows - r0 < 6 ? rows - r0 : 6) {
            case 6: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 6); break;
            case 5: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 5); break;
            case 4: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 4); break;
            case 3: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 3); break;
            case 2: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 2); break;
            default: block_accum_nr(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 1); break;
            }
        }
    }
}
/* The block path's scores and accumulation with 512-bit vectors (AVX-512F): one vector holds the
 * 16 rows (scores) or 16 columns (accumulation) that two 256-bit ones hold above, so each output
 * lane goes through the same FMAs in the same order: the AVX2 kernels' bits, in half the
 * operations (the two were a fifth of a 2,000-token prefill, bench/RESULTS.md). */
ATT_TGT_AVX512 static inline __attribute__((always_inline)) void block_scores_nk_512(
        const float *qT, int64_t rp, int64_t rc, const float *k0, int64_t hd, float scale, float *sT, const int nk) {
    __m512 a[4];
    for (int i = 0; i < nk; i++) a[i] = _mm512_setzero_ps();
    const float *qp = qT + rc;
    for (int64_t d = 0; d < hd; d++, qp += rp) {
        const __m512 w = _mm512_loadu_ps(qp);
        for (int i = 0; i < nk; i++) a[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(k0[i * hd + d]), a[i]);
    }
    const __m512 vs = _mm512_set1_ps(scale);
    for (int i = 0; i < nk; i++) _mm512_storeu_ps(sT + i * rp + rc, _mm512_mul_ps(a[i], vs));
}

ATT_TGT_AVX512 static void block_scores_avx512(const float *qT, int64_t rp, const float *kt, int64_t nb, int64_t hd,
                                               float scale, float *sT) {
    for (int64_t j0 = 0; j0 < nb; j0 += 4) {
        const float *k0 = kt + j0 * hd;
        float *s0 = sT + j0 * rp;
        for (int64_t rc = 0; rc < rp; rc += 16) {
            switch (nb - j0 < 4 ? nb - j0 : 4) {
            case 4: block_scores_nk_512(qT, rp, rc, k0, hd, scale, s0, 4); break;
            case 3: block_scores_nk_512(qT, rp, rc, k0, hd, scale, s0, 3); break;
            case 2: block_scores_nk_512(qT, rp, rc, k0, hd, scale, s0, 2); break;
            default: block_scores_nk_512(qT, rp, rc, k0, hd, scale, s0, 1); break;
            }
        }
    }
}

ATT_TGT_AVX512 static inline __attribute__((always_inline)) void block_accum_nr_512(
        float *st, int64_t stride, int64_t r0, int64_t dc, const float *cv, const float *sT, int64_t rp,
        const float *vt, int64_t nb, int64_t hd, const int nr) {
    __m512 a[6];
    for (int i = 0; i < nr; i++)
        a[i] = _mm512_mul_ps(_mm512_loadu_ps(st + (r0 + i) * stride + 2 + dc), _mm512_set1_ps(cv[r0 + i]));
    for (int64_t j = 0; j < nb; j++) {
        const __m512 v = _mm512_loadu_ps(vt + j * hd + dc);
        const float *p = sT + j * rp + r0;
        for (int i = 0; i < nr; i++) a[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), v, a[i]);
    }
    for (int i = 0; i < nr; i++) _mm512_storeu_ps(st + (r0 + i) * stride + 2 + dc, a[i]);
}

ATT_TGT_AVX512 static void block_accum_avx512(float *st, int64_t stride, int64_t rows, const float *cv, const float *sT,
                                              int64_t rp, const float *vt, int64_t nb, int64_t hd) {
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        for (int64_t dc = 0; dc < hd; dc += 16) {
            switch (rows - r0 < 6 ? rows - r0 : 6) {
            case 6: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 6); break;
            case 5: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 5); break;
            case 4: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 4); break;
            case 3: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 3); break;
            case 2: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 2); break;
            default: block_accum_nr_512(st, stride, r0, dc, cv, sT, rp, vt, nb, hd, 1); break;
            }
        }
    }
}
/* Decode on AVX-512F, four heads of one kv head at once straight from the cache's halves: each K
 * and V row is converted once (16 halves a vcvtph2ps) for four heads' FMAs, where the AVX2 pair
 * converts it once per two (GQA models with 8 heads a kv head convert it four times). Needs head_dim
 * a multiple of 16. Other sums' order than the AVX2 kernels: the same bound (tests). */
ATT_TGT_AVX512 static ATT_INLINE __m512 ld16h(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* The four sums of a0..a3's lanes, in that order. */
ATT_TGT_AVX512 static ATT_INLINE __m128 sum4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

ATT_TGT_AVX512 static void scores4_avx512(const float *const q[4], const uint16_t *kt, int64_t ks, int64_t nb,
                                          int64_t hd, float scale, float *const s[4], att_pf *pf) {
    const __m128 vs = _mm_set1_ps(scale);
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        pf_rows(pf, 1);
        __m512 a[4][4];
        for (int h = 0; h < 4; h++)
            for (int i = 0; i < 4; i++) a[h][i] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 16) {
            __m512 k[4];
            for (int i = 0; i < 4; i++) k[i] = ld16h(kt + (j + i) * ks + d);
            for (int h = 0; h < 4; h++) {
                const __m512 qv = _mm512_loadu_ps(q[h] + d);
                for (int i = 0; i < 4; i++) a[h][i] = _mm512_fmadd_ps(qv, k[i], a[h][i]);
            }
        }
        for (int h = 0; h < 4; h++) _mm_storeu_ps(s[h] + j, _mm_mul_ps(sum4_512(a[h][0], a[h][1], a[h][2], a[h][3]), vs));
    }
    for (; j < nb; j++) {
        __m512 a[4];
        for (int h = 0; h < 4; h++) a[h] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 16) {
            const __m512 k = ld16h(kt + j * ks + d);
            for (int h = 0; h < 4; h++) a[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q[h] + d), k, a[h]);
        }
        const __m128 r = _mm_mul_ps(sum4_512(a[0], a[1], a[2], a[3]), vs);
        float out[4];
        _mm_storeu_ps(out, r);
        for (int h = 0; h < 4; h++) s[h][j] = out[h];
    }
}

/* exp256 on 16 lanes (exp_avx2.h): the same values lane for lane. */
ATT_TGT_AVX512 static ATT_INLINE __m512 exp512(__m512 x) { return exp512_clamped(_mm512_max_ps(x, _mm512_set1_ps(-87.3f))); }

/* online_update for the four heads of scores4 (n <= ATT_B scores each) in vectors: the same m and
 * p values (max is exact, exp512 is exp256 per lane); l's sum in another order. */
ATT_TGT_AVX512 static void online_update4_avx512(float *state, int64_t st_stride, float *const s[4], int64_t n,
                                                 float corr[4]) {
    const __mmask16 m0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1),
                    m1 = n >= 32 ? (__mmask16)0xFFFF : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int h = 0; h < 4; h++) {
        float *st = state + h * st_stride;
        const __m512 v0 = _mm512_mask_loadu_ps(ninf, m0, s[h]), v1 = _mm512_mask_loadu_ps(ninf, m1, s[h] + 16);
        const float mt = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
        const float m_old = st[0], m_new = mt > m_old ? mt : m_old;
        corr[h] = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
        const __m512 vm = _mm512_set1_ps(m_new);
        const __m512 e0 = exp512(_mm512_sub_ps(v0, vm)), e1 = exp512(_mm512_sub_ps(v1, vm));
        _mm512_mask_storeu_ps(s[h], m0, e0);
        _mm512_mask_storeu_ps(s[h] + 16, m1, e1);
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_maskz_mov_ps(m0, e0), _mm512_maskz_mov_ps(m1, e1)));
        st[0] = m_new;
        st[1] = st[1] * corr[h] + sum;
    }
}

/* acc_h = acc_h * corr_h + sum_j p_h[j] v_j for the four heads, 64 columns (16 accumulators) at a
 * time, then 16. */
ATT_TGT_AVX512 static void accum4_avx512(float *const acc[4], const float corr[4], const float *const p[4],
                                         const uint16_t *vt, int64_t vs, int64_t nb, int64_t hd, att_pf *pf) {
    int64_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m512 a[4][4];
        for (int h = 0; h < 4; h++)
            for (int c = 0; c < 4; c++) a[h][c] = _mm512_mul_ps(_mm512_loadu_ps(acc[h] + d + 16 * c), _mm512_set1_ps(corr[h]));
        for (int64_t jj = 0; jj < nb; jj++) {
            if ((jj & 3) == 0) pf_rows(pf, 1);
            __m512 x[4];
            for (int c = 0; c < 4; c++) x[c] = ld16h(vt + jj * vs + d + 16 * c);
            for (int h = 0; h < 4; h++) {
                const __m512 pj = _mm512_set1_ps(p[h][jj]);
                for (int c = 0; c < 4; c++) a[h][c] = _mm512_fmadd_ps(pj, x[c], a[h][c]);
            }
        }
        for (int h = 0; h < 4; h++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc[h] + d + 16 * c, a[h][c]);
    }
    for (; d < hd; d += 16) {
        __m512 a[4];
        for (int h = 0; h < 4; h++) a[h] = _mm512_mul_ps(_mm512_loadu_ps(acc[h] + d), _mm512_set1_ps(corr[h]));
        for (int64_t jj = 0; jj < nb; jj++) {
            const __m512 x = ld16h(vt + jj * vs + d);
            for (int h = 0; h < 4; h++) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h][jj]), x, a[h]);
        }
        for (int h = 0; h < 4; h++) _mm512_storeu_ps(acc[h] + d, a[h]);
    }
}
#endif

/* Runs queries [i0, i0 + nq) of kv head h over positions [p0, p1) (each query also stops at its
 * causal limit), updating per row r = query * g + head-in-group the state st + r * st_stride:
 * st[0] = m, st[1] = l, st[2..] = acc. The state must start as (-inf, 0, 0...). While a tile runs,
 * the next one's rows are prefetched, up to pf_end (the slice's end where the caller runs one tile
 * of it at a time). */
static void attend(const att_job *j, float *tile, int64_t h, int64_t i0, int64_t nq, int64_t p0, int64_t p1,
                   int64_t pf_end, float *st, int64_t st_stride) {
    const int64_t hd = j->hd, g = j->g, rows = nq * j->g;
    float *kt = tile, *vt = kt + ATT_B * hd, *sc = vt + ATT_B * hd;
    const uint16_t *kh = j->k + h * hd, *vh = j->v + h * hd;
#if defined(ATT_X86)
    /* Prefill on AVX2: whole tiles in blocks of rows (above); the block region follows the
     * per-row one (thread_floats). */
    int block = j->impl == FIC_IMPL_AVX2 && j->t > 1 && hd % 16 == 0; /* cleared at the first per-row tile */
    const int64_t rp = ATT_RP(rows), rpm = ATT_RP(j->max_rows);
    float *qT = tile + round_up(2 * ATT_B * hd + j->max_rows * ATT_B + j->max_rows * (hd + 2), ATT_ALIGN);
    float *sT = qT + hd * rpm, *mv = sT + ATT_B * rpm, *lv = mv + rpm, *cv = lv + rpm;
    if (block) {
        for (int64_t r = 0; r < rp; r++) {
            const float *q = j->q + ((i0 + r / g) * j->nh + h * g + r % g) * hd;
            for (int64_t d = 0; d < hd; d++) qT[d * rp + r] = r < rows ? q[d] : 0.0f;
            mv[r] = r < rows ? st[r * st_stride] : 0.0f;
            lv[r] = r < rows ? st[r * st_stride + 1] : 0.0f;
        }
    }
#endif
    for (int64_t p = p0; p < p1; p += ATT_B) {
        const int64_t nb = p1 - p < ATT_B ? p1 - p : ATT_B;
        att_pf pf = pf_tile(kh, vh, j->kvs, hd, p + ATT_B, pf_end);
#if defined(ATT_X86)
        /* One query (decode) on AVX2: each K and V row is read once, so the per-row kernels read
         * the cache's halves themselves (ld8), the same floats as a tile's. */
        const int direct = j->impl == FIC_IMPL_AVX2 && nq == 1 && !block;
        const void *kr = direct ? (const void *)(kh + p * j->kvs) : kt, *vr = direct ? (const void *)(vh + p * j->kvs) : vt;
        const int64_t rs = direct ? j->kvs : hd; /* elements from one K (V) row to the next */
        const int heads4 = direct && j->wide && hd % 16 == 0; /* the AVX-512 four-head kernels apply */
        /* they take the next tile's rows as they go; every other path has them at once */
        if (!(heads4 && g >= 4)) pf_rows(&pf, pf.left);
#else
        const int direct = 0;
        pf_rows(&pf, pf.left);
#endif
        if (!direct) { /* K and V rows of this tile: read from the cache once, for every row of the item */
            cvt_tile(j->impl, j->wide, kh + p * j->kvs, j->kvs, nb, hd, kt);
            cvt_tile(j->impl, j->wide, vh + p * j->kvs, j->kvs, nb, hd, vt);
        }
#if defined(ATT_X86)
        if (block && p <= j->pos0 + i0) { /* every row sees at least this tile's first position */
            if (j->wide)
                block_scores_avx512(qT, rp, kt, nb, hd, j->scale, sT);
            else
                block_scores_avx2(qT, rp, kt, nb, hd, j->scale, sT);
            for (int64_t r = 0; r < rows; r++) { /* causal: -inf past each row's last position */
                const int64_t valid = j->pos0 + i0 + r / g + 1 - p;
                for (int64_t jj = valid; jj < nb; jj++) sT[jj * rp + r] = -INFINITY;
            }
            block_softmax_avx2(sT, rp, nb, mv, lv, cv);
            for (int64_t r = 0; r < rows; r++) { /* p exactly 0 where masked (exp256 clamps at ~1e-38; l >= 1) */
                const int64_t valid = j->pos0 + i0 + r / g + 1 - p;
                for (int64_t jj = valid; jj < nb; jj++) sT[jj * rp + r] = 0.0f;
            }
            if (j->wide)
                block_accum_avx512(st, st_stride, rows, cv, sT, rp, vt, nb, hd);
            else
                block_accum_avx2(st, st_stride, rows, cv, sT, rp, vt, nb, hd);
            continue;
        }
        if (block) { /* per-row tiles from here on (p only grows): m and l back into st */
            for (int64_t r = 0; r < rows; r++) st[r * st_stride] = mv[r], st[r * st_stride + 1] = lv[r];
            block = 0;
        }
#endif
        for (int64_t r = 0; r < rows;) {
            const int64_t qi = i0 + r / g;
            int64_t valid = j->pos0 + qi + 1 - p; /* causal: query qi sees positions <= pos0 + qi */
            if (valid <= 0) {
                r++;
                continue;
            }
            if (valid > nb) valid = nb;
            const float *q = j->q + (qi * j->nh + h * g + r % g) * hd;
            float *s = sc + r * ATT_B, *state = st + r * st_stride;
#if defined(ATT_X86)
            if (heads4 && g - r % g >= 4) { /* four heads of one query */
                const float *qs[4] = {q, q + hd, q + 2 * hd, q + 3 * hd};
                float *ss[4] = {s, s + ATT_B, s + 2 * ATT_B, s + 3 * ATT_B}, *accs[4], corr[4];
                scores4_avx512(qs, (const uint16_t *)kr, rs, valid, hd, j->scale, ss, &pf);
                online_update4_avx512(state, st_stride, ss, valid, corr);
                for (int i = 0; i < 4; i++) accs[i] = state + i * st_stride + 2;
                accum4_avx512(accs, corr, (const float *const *)ss, (const uint16_t *)vr, rs, valid, hd, &pf);
                r += 4;
                continue;
            }
            if (j->impl == FIC_IMPL_AVX2 && g - r % g == 3) { /* the last three heads of one query */
                const float *qs[3] = {q, q + hd, q + 2 * hd};
                float *ss[3] = {s, s + ATT_B, s + 2 * ATT_B}, *accs[3], corr[3];
                scores3_avx2(qs, kr, rs, direct, valid, hd, j->scale, ss);
                for (int i = 0; i < 3; i++) {
                    corr[i] = online_update(j->impl, state + i * st_stride, ss[i], valid);
                    accs[i] = state + i * st_stride + 2;
                }
                accum3_avx2(accs, corr, (const float *const *)ss, vr, rs, direct, valid, hd);
                r += 3;
                continue;
            }
            if (j->impl == FIC_IMPL_AVX2 && r % g + 1 < g) { /* two heads of one query */
                float *state_b = state + st_stride;
                scores2_avx2(q, q + hd, kr, rs, direct, valid, hd, j->scale, s, s + ATT_B);
                const float ca = online_update(j->impl, state, s, valid);
                const float cb = online_update(j->impl, state_b, s + ATT_B, valid);
                accum2_avx2(state + 2, ca, s, state_b + 2, cb, s + ATT_B, vr, rs, direct, valid, hd);
                r += 2;
                continue;
            }
            if (j->impl == FIC_IMPL_AVX2) {
                scores_avx2(q, kr, rs, direct, valid, hd, j->scale, s);
                const float corr = online_update(j->impl, state, s, valid);
                accum_avx2(state + 2, corr, s, vr, rs, direct, valid, hd);
                r++;
                continue;
            }
#endif
            scores(j->impl, q, kt, valid, hd, j->scale, s);
            const float corr = online_update(j->impl, state, s, valid);
            accum(j->impl, state + 2, corr, s, vt, valid, hd);
            r++;
        }
        pf_rows(&pf, pf.left); /* what the kernels left: fewer than four heads a kv head, a short tile */
    }
#if defined(ATT_X86)
    if (block)
        for (int64_t r = 0; r < rows; r++) st[r * st_stride] = mv[r], st[r * st_stride + 1] = lv[r];
#endif
}

static void init_state(float *st, int64_t rows, int64_t stride, int64_t hd) {
    for (int64_t r = 0; r < rows; r++) {
        st[r * stride] = -INFINITY;
        memset(st + r * stride + 1, 0, (size_t)(hd + 1) * sizeof(float));
    }
}

/* Prefill item: a query block of one kv head, most expensive (last) blocks handed out first. */
static void prefill_range(void *ctx, int64_t begin, int64_t end, int tid) {
    const att_job *j = ctx;
    float *tile = j->tiles + tid * j->tile_floats;
    const int64_t hd = j->hd, g = j->g;
    for (int64_t it = begin; it < end; it++) {
        const int64_t h = it % j->nkv, qb = j->n_qb - 1 - it / j->nkv;
        const int64_t i0 = qb * ATT_QB, nq = j->t - i0 < ATT_QB ? j->t - i0 : ATT_QB;
        float *st = tile + 2 * ATT_B * hd + j->max_rows * ATT_B;
        const int64_t rows = nq * g, stride = hd + 2;
        init_state(st, rows, stride, hd);
        attend(j, tile, h, i0, nq, 0, j->pos0 + i0 + nq, j->pos0 + i0 + nq, st, stride);
        for (int64_t r = 0; r < rows; r++) {
            const float *state = st + r * stride;
            const float inv = 1.0f / state[1];
            float *o = j->out + ((i0 + r / g) * j->nh + h * g + r % g) * hd;
            for (int64_t d = 0; d < hd; d++) o[d] = state[2 + d] * inv;
        }
    }
}

/* Decode: the state (m, l, acc) of kv head h's first query row over slice sp; its next rows are
 * n_split * (hd + 2) floats apart. */
static float *partial_state(const att_job *j, int64_t h, int64_t sp) {
    return j->partials + (h * j->g * j->n_split + sp) * (j->hd + 2);
}

/* Decode item: one slice of one kv head's positions, into the partials. */
static void decode_range(void *ctx, int64_t begin, int64_t end, int tid) {
    const att_job *j = ctx;
    float *tile = j->tiles + tid * j->tile_floats;
    const int64_t hd = j->hd, n = j->pos0 + 1;
    for (int64_t it = begin; it < end; it++) {
        const int64_t h = it / j->n_split, sp = it % j->n_split;
        const int64_t p0 = sp * j->split_len, p1 = p0 + j->split_len < n ? p0 + j->split_len : n;
        const int64_t stride = j->n_split * (hd + 2);
        float *st = partial_state(j, h, sp);
        init_state(st, j->g, stride, hd);
        if (p0 < p1) attend(j, tile, h, 0, 1, p0, p1, p1, st, stride);
    }
}

/* Decode item at long contexts: one slice of every kv head's positions, a tile at a time for every
 * head in turn, so the cache's rows (all heads side by side) are read in order; a head's own rows
 * are head_dim halves of every kv_stride, which the hardware prefetcher follows late. Each head's
 * state sees the same tiles in the same order as in decode_range: the same bits. */
static void decode_range_tiles(void *ctx, int64_t begin, int64_t end, int tid) {
    const att_job *j = ctx;
    float *tile = j->tiles + tid * j->tile_floats;
    const int64_t hd = j->hd, n = j->pos0 + 1, stride = j->n_split * (hd + 2);
    for (int64_t sp = begin; sp < end; sp++) {
        const int64_t p0 = sp * j->split_len, p1 = p0 + j->split_len < n ? p0 + j->split_len : n;
        for (int64_t h = 0; h < j->nkv; h++) init_state(partial_state(j, h, sp), j->g, stride, hd);
        for (int64_t p = p0; p < p1; p += ATT_B) {
            const int64_t pe = p + ATT_B < p1 ? p + ATT_B : p1;
            for (int64_t h = 0; h < j->nkv; h++) /* each head's next tile prefetched as it goes */
                attend(j, tile, h, 0, 1, p, pe, p1, partial_state(j, h, sp), stride);
        }
    }
}

/* out[head] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M the largest m_s. */
static void decode_merge(const att_job *j) {
    const int64_t hd = j->hd, ns = j->n_split;
    for (int64_t hh = 0; hh < j->nh; hh++) {
        const float *part = j->partials + hh * ns * (hd + 2);
        float *o = j->out + hh * hd;
        float mx = -INFINITY, l = 0.0f;
        for (int64_t s = 0; s < ns; s++) mx = part[s * (hd + 2)] > mx ? part[s * (hd + 2)] : mx;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t s = 0; s < ns; s++) {
            const float *ps = part + s * (hd + 2);
            if (ps[1] == 0.0f) continue; /* an empty slice */
            const float w = expf(ps[0] - mx);
            l += w * ps[1];
            for (int64_t d = 0; d < hd; d++) o[d] += w * ps[2 + d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < hd; d++) o[d] *= inv;
    }
}

int fic_attention(fic_pool *pool, int impl, const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                  float *out, int64_t t, int64_t pos0, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                  int64_t kv_stride, float scale, float *ws, int64_t ws_floats) {
    if (!q || !k_cache || !v_cache || !out || !ws) return FIC_ERR_ARG;
    if (t < 1 || pos0 < 0 || n_heads < 1 || n_kv_heads < 1 || head_dim < 1 || n_heads % n_kv_heads != 0)
        return FIC_ERR_ARG;
    if (kv_stride < n_kv_heads * head_dim || !isfinite(scale)) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (impl != FIC_IMPL_AUTO && !fic_impl_available(impl)) return FIC_ERR_UNSUPPORTED;
    const int n_threads = pool ? fic_pool_threads(pool) : 1;
    if (ws_floats < fic_attention_ws_floats(n_threads, t, n_heads, head_dim)) return FIC_ERR_ARG;

    att_job j;
    memset(&j, 0, sizeof j);
    j.impl = resolve_impl(impl);
    j.wide = (impl == FIC_IMPL_AUTO ? fic_impl_best() : impl) == FIC_IMPL_AVX512;
    j.q = q;
    j.k = k_cache;
    j.v = v_cache;
    j.out = out;
    j.t = t;
    j.pos0 = pos0;
    j.nh = n_heads;
    j.nkv = n_kv_heads;
    j.hd = head_dim;
    j.kvs = kv_stride;
    j.g = n_heads / n_kv_heads;
    j.scale = scale;
    j.partials = ws;
    j.tiles = ws + partial_floats(n_heads, head_dim);
    j.max_rows = (t < ATT_QB ? t : ATT_QB) * n_heads;
    j.tile_floats = thread_floats(j.max_rows, head_dim);
    if (t == 1) {
        const int64_t n = pos0 + 1;
        int64_t ns = (n + ATT_SPLIT_MIN - 1) / ATT_SPLIT_MIN;
        ns = ns > ATT_MAX_SPLITS ? ATT_MAX_SPLITS : ns;
        j.n_split = ns;
        j.split_len = round_up((n + ns - 1) / ns, ATT_B); /* whole tiles per slice */
        if (ns >= 2 * n_threads) /* enough slices to share out: every head's rows read together */
            fic_parallel_for(pool, ns, 1, decode_range_tiles, &j);
        else
            fic_parallel_for(pool, n_kv_heads * ns, 1, decode_range, &j);
        decode_merge(&j);
    } else {
        j.n_qb = (t + ATT_QB - 1) / ATT_QB;
        fic_parallel_for(pool, n_kv_heads * j.n_qb, 1, prefill_range, &j);
    }
    return FIC_OK;
}

int fic_f32_to_f16_rows(int impl, const float *src, uint16_t *dst, int64_t n) {
    if (!src || !dst || n < 0) return FIC_ERR_ARG;
    if (impl < FIC_IMPL_AUTO || impl > FIC_IMPL_NEON) return FIC_ERR_ARG;
    if (impl != FIC_IMPL_AUTO && !fic_impl_available(impl)) return FIC_ERR_UNSUPPORTED;
    switch (resolve_impl(impl)) {
#if defined(ATT_X86)
    case FIC_IMPL_AVX2: f32_to_f16_avx2(src, dst, n); return FIC_OK;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: f32_to_f16_neon(src, dst, n); return FIC_OK;
#endif
    default: f32_to_f16_ref(src, dst, n); return FIC_OK;
    }
}
