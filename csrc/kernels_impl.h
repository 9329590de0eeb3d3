/* kernels_impl.h - internal: the per-format, per-CPU pieces shared by the kernels of matvec.c
 * and ffn.c (block dequantization, row dot products, axpy, register-blocked GEMM tiles,
 * activation quantization, the row-accumulate range), and their run-time dispatch.
 *
 * Everything here is static: each including file gets its own copy, and unused pieces are not
 * warned about (the pragma below). Fast paths are compiled with per-function target attributes;
 * the including file is built without -mavx2 and runs on any CPU of its architecture. */
#ifndef FIC_KERNELS_IMPL_H
#define FIC_KERNELS_IMPL_H

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "fic.h"
#include "pool.h"


#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

#if defined(__x86_64__)
#include <immintrin.h>
#define FIC_X86 1
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define TGT_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TGT_AVX512Q1 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg,avx512vbmi,avx2,fma,f16c")))
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define MAX_BW 256 /* largest block, in weights (a K-quant super-block) */

/* ---- shared job description ------------------------------------------------------------- */

typedef struct {
    int fmt, impl;
    const uint8_t *w;
    const float *x;    /* matvec: x[k]; matmul: x[t][k] */
    const float *a;    /* accum_rows: a[n_rows] */
    float *y;
    int64_t t, m, k, row_bytes, bw, bb;
    const float *xsum; /* per-block sums of x (Q4_1, Q1_0), or NULL */
    const int8_t *xq;  /* x quantized to int8 in blocks of 32 (Q1_0 on AVX2; Q4 on VNNI), or NULL */
    const float *xscale16; /* per 4 weights: the scale of xq's block (16 lanes per 64 weights);
                              Q1_0 on AVX2: 8 lanes per 128 weights (see dot_q1_avx2) */
    const float *xcorr16;  /* Q4 int8 path: per 4 weights, dx * their sum of xq (x -8 for Q4_0);
                              Q1_0 on AVX-512: -1024 dx per lane; on AVX2 see dot_q1_avx2 */
    const uint8_t *xu;     /* Q1_0 on AVX-512: xq + 128 as u8, or x's bit planes (q1_planes) */
    int q4_int8;           /* Q4_0/Q4_1 on AVX-512 VNNI: xq is in the pair layout (see below) */
    int q1_planes;         /* Q1_0 on AVX-512 with VNNI/BITALG/VBMI: xu holds x's bit planes,
                              xscale16 2 dx and xcorr16 -dx sum(xq) per q8 block (see below) */
    float *scratch;    /* matmul: per-thread tile of rows */
    int64_t scratch_floats, tile_rows;
} job_t;

/* The common part of a job: what every kernel reads before its own per-call preparation. */
static inline void init_job(job_t *j, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t t,
                            int64_t m, int64_t k) {
    memset(j, 0, sizeof *j);
    j->fmt = fmt;
    j->impl = impl;
    j->w = w;
    j->x = x;
    j->y = y;
    j->t = t;
    j->m = m;
    j->k = k;
    j->row_bytes = fic_row_bytes(fmt, k);
    j->bw = fic_fmt_block_weights(fmt);
    j->bb = fic_fmt_block_bytes(fmt);
}

static int fmt_ok(int fmt) { return fmt >= 0 && fmt < FIC_FMT_COUNT; }

/* ---- workspace sizes: the formulas documented in fic.h -------------------------------------- */

static_assert(sizeof(job_t) <= 256, "fic.h promises a per-expert record of at most 256 bytes");

#define WS_MAX_DIM ((int64_t)1 << 36) /* t, k, experts, neurons: keeps every product in int64 */
#define WS_MAX_THREADS (1 << 16)
#define TILE_BYTES (256 << 10) /* dequantized rows per tile: stay in L2 while tokens stream past */
#define SEG_FLOATS 512         /* a dequantized row piece, in L1 */

static inline int64_t ws_round64(int64_t b) { return (b + 63) / 64 * 64; }

/* Rows per tile of dequantized k-weight rows: ~TILE_BYTES of floats, a multiple of the 6-row
 * register block, 6 to 60 rows. */
static int64_t clamp_tile(int64_t k) {
    int64_t tile = TILE_BYTES / (4 * k);
    return tile < 6 ? 6 : tile > 60 ? 60 : tile / 6 * 6;
}

/* F(k) of fic.h: clamp_tile(k) * k <= F(k), and F grows with k. */
static inline int64_t ws_tile_floats(int64_t k) {
    const int64_t a = 60 * k < TILE_BYTES / 4 ? 60 * k : TILE_BYTES / 4;
    return a > 6 * k ? a : 6 * k;
}

static inline int ws_dim_ok(int64_t v) { return v >= 0 && v <= WS_MAX_DIM; }

/* Bytes each kernel needs (fic.h), or -1 when a size is out of range. */
static int64_t ws_matvec(int64_t k) { return ws_dim_ok(k) ? ws_round64(3 * k) : -1; }

static int64_t ws_matmul(int n_threads, int64_t k) {
    if (n_threads < 1 || n_threads > WS_MAX_THREADS || !ws_dim_ok(k)) return -1;
    return n_threads * ws_round64(4 * ws_tile_floats(k));
}

/* experts_ffn: the bundle pointers (slots), then the per-expert tables (ffn.c). */
static inline int64_t ws_ffn_ptrs(int64_t e) { return ws_round64(8 * e); }
static inline int64_t ws_ffn_tables(int64_t e) { return ws_round64(e * (17 + (int64_t)sizeof(job_t)) + 8); }

static int64_t ws_ffn(int n_threads, int64_t t, int64_t d, int64_t e, int64_t n) {
    if (n_threads < 1 || n_threads > WS_MAX_THREADS || !ws_dim_ok(t) || !ws_dim_ok(d) || !ws_dim_ok(e) ||
        !ws_dim_ok(n))
        return -1;
    if (e == 0 || t == 0) return 0;
    const int64_t fixed = ws_ffn_ptrs(e) + ws_ffn_tables(e);
    if (t == 1) return fixed + 2 * ws_round64(3 * d) + ws_round64(3 * n) + 64 * e;
    int64_t f = ws_tile_floats(d), fn = ws_tile_floats(n);
    f = f > fn ? f : fn;
    f = f > SEG_FLOATS ? f : SEG_FLOATS;
    return fixed + n_threads * ws_round64(4 * (f + 60 * t));
}

/* FIC_OK when ws (64-byte aligned, or NULL with 0 bytes) holds need bytes. */
static int ws_check(const void *ws, int64_t ws_bytes, int64_t need) {
    if (need < 0 || ws_bytes < 0) return FIC_ERR_ARG;
    if (ws == NULL ? ws_bytes != 0 : ((uintptr_t)ws & 63) != 0) return FIC_ERR_ARG;
    return ws_bytes >= need ? FIC_OK : FIC_ERR_WORKSPACE;
}

/* ---- reference: the spec ----------------------------------------------------------------- */

/* Dequantize block `b` of a row into out[bw]. */
static void deq_block_ref(int fmt, const uint8_t *row, int64_t b, float *out) {
    switch (fmt) {
    case FIC_F32:
        memcpy(out, row + 4 * b, 4);
        return;
    case FIC_F16: {
        fic_half h;
        memcpy(&h, row + 2 * b, 2);
        out[0] = fic_h2f(h);
        return;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK8_0; j++) out[j] = d * (float)blk->qs[j];
        return;
    }
    case FIC_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            out[j] = d * (float)((blk->qs[j] & 15) - 8);
            out[j + QK4_0 / 2] = d * (float)((blk->qs[j] >> 4) - 8);
        }
        return;
    }
    case FIC_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        float d = fic_h2f(blk->d), mn = fic_h2f(blk->m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            out[j] = d * (float)(blk->qs[j] & 15) + mn;
            out[j + QK4_1 / 2] = d * (float)(blk->qs[j] >> 4) + mn;
        }
        return;
    }
    case FIC_Q1_0: {
        const block_q1_0 *blk = (const block_q1_0 *)row + b;
        float d = fic_h2f(blk->d);
        for (int j = 0; j < QK1_0; j++) out[j] = (blk->qs[j / 8] >> (j % 8)) & 1 ? d : -d;
        return;
    }
    case FIC_Q5_0:
    case FIC_Q4_K:
    case FIC_Q6_K: /* quant.c's dequantizers, ggml's dequantize_row_* (the spec) */
        fic_dequantize(fmt, row + b * fic_fmt_block_bytes(fmt), out, 1, fic_fmt_block_weights(fmt));
        return;
    }
}

static void deq_range_ref(int fmt, const uint8_t *row, int64_t b0, int64_t b1, int64_t bw, float *out) {
    for (int64_t b = b0; b < b1; b++) deq_block_ref(fmt, row, b, out + (b - b0) * bw);
}

static float dot_ref(const job_t *j, const uint8_t *row, const float *x) {
    float buf[MAX_BW], acc = 0.0f;
    int64_t nb = j->k / j->bw;
    for (int64_t b = 0; b < nb; b++) {
        deq_block_ref(j->fmt, row, b, buf);
        for (int64_t i = 0; i < j->bw; i++) acc += buf[i] * x[b * j->bw + i];
    }
    return acc;
}

static float dot_f32_ref(const float *a, const float *b, int64_t k) {
    float acc = 0.0f;
    for (int64_t i = 0; i < k; i++) acc += a[i] * b[i];
    return acc;
}

static void axpy_ref(float a, const float *w, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * w[i];
}

/* Y[t][r0 + r] = tile[r] . x[t] for a tile of nr dequantized rows. */
static void gemm_tile_ref(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    for (int64_t r = 0; r < nr; r++)
        for (int64_t t = 0; t < j->t; t++)
            j->y[t * j->m + r0 + r] = dot_f32_ref(tile + r * j->k, j->x + t * j->k, j->k);
}

/* ---- AVX2 + FMA + F16C ------------------------------------------------------------------- */
#if defined(FIC_X86)

TGT_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TGT_AVX2 static inline float h2f_f16c(fic_half h) { return _cvtsh_ss(h); }

/* 16 nibbles -> two vectors of 8 int32 each, for weights [0,8) and [8,16) of a half block. */
TGT_AVX2 static inline __m256 cvt8_lo(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
TGT_AVX2 static inline __m256 cvt8_hi(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

/* Q1_0 x int8 activations, one block (128 weights) per step, with sum s xq = 2 sum_{bit set} xq -
 * sum xq. The 16 sign bytes are broadcast to both 128-bit lanes; per 32 weights (q8 block i), a
 * shuffle copies each of its 4 bytes 8 times, and + cmpeq with the bit of each byte's position
 * give byte masks, and picks xq where set, maddubs + madd sum to 8 int32. Three hadds pack the 4
 * q8 blocks into one vector [0 1 2 3 | 0 1 2 3] (halves of each block's sum), so per block and
 * row there is one int -> float conversion and two FMAs: p = lane * 2 dx - dx sum(xq) (xscale16,
 * xcorr16: 8 floats per block, the correction in the low half only), acc += d * p. */
TGT_AVX2 static inline __m256i q1_32_sum_avx2(__m256i bb, __m256i idx, const int8_t *xq) {
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i m = _mm256_and_si256(_mm256_shuffle_epi8(bb, idx), bitsel);
    m = _mm256_cmpeq_epi8(m, bitsel);
    __m256i v = _mm256_and_si256(m, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
}

TGT_AVX2 static float dot_q1_avx2(const job_t *j, const uint8_t *row) {
    const block_q1_0 *blk = (const block_q1_0 *)row;
    const int64_t nb = j->k / QK1_0;
    const __m256i idx0 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i four = _mm256_set1_epi8(4);
    const __m256i idx1 = _mm256_add_epi8(idx0, four), idx2 = _mm256_add_epi8(idx1, four);
    const __m256i idx3 = _mm256_add_epi8(idx2, four);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = j->xq + b * QK1_0;
        __m256i bb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)blk[b].qs));
        __m256i s0 = q1_32_sum_avx2(bb, idx0, xq), s1 = q1_32_sum_avx2(bb, idx1, xq + 32);
        __m256i s2 = q1_32_sum_avx2(bb, idx2, xq + 64), s3 = q1_32_sum_avx2(bb, idx3, xq + 96);
        __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
        __m256 p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_loadu_ps(j->xscale16 + 8 * b),
                                   _mm256_loadu_ps(j->xcorr16 + 8 * b));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d)), p, acc);
    }
    return hsum256(acc);
}

/* ---- Q5_0, Q4_K, Q6_K on AVX2: float activations, as Q4_0/Q8_0 (weights dequantized in
 * registers with the reference's arithmetic, then multiplied by x in float). */

/* 16 int8 weights times x[0..16): a vector of 8 partial sums. */
TGT_AVX2 static inline __m256 mul16_i8_avx2(__m128i q, const float *x) {
    return _mm256_fmadd_ps(cvt8_hi(q), _mm256_loadu_ps(x + 8), _mm256_mul_ps(cvt8_lo(q), _mm256_loadu_ps(x)));
}

/* A Q5_0 block's 32 weights as int8 (q - 16), in order. Bit j of qh is weight j's fifth bit:
 * the 4 qh bytes are spread over 8 bytes each and compared against their bit (as dot_q1_avx2);
 * q - 16 is the nibble where the bit is set and nibble | 0xF0 where it is clear. */
TGT_AVX2 static inline __m256i q5_0_i8_avx2(const block_q5_0 *blk) {
    uint32_t qh;
    memcpy(&qh, blk->qh, 4);
    const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i m = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), idx), bitsel);
    m = _mm256_cmpeq_epi8(m, bitsel);
    const __m128i mask = _mm_set1_epi8(15);
    __m128i v = _mm_loadu_si128((const __m128i *)blk->qs);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
    return _mm256_or_si256(q, _mm256_andnot_si256(m, _mm256_set1_epi8((char)0xF0)));
}

/* One Q4_K sub-block pair (64 weights, c = 0..3): 32 bytes of nibbles; the low nibbles are the
 * first 32 weights, the high the next. The weights of sub-block s are d sc_s q - dmin m_s. */
TGT_AVX2 static inline void q4k_pair_avx2(const block_q4_K *blk, int c, __m256i *lo, __m256i *hi, __m256 dm[4]) {
    const float d = h2f_f16c(blk->d), dmin = h2f_f16c(blk->dmin);
    uint8_t sc, m;
    q4k_scale_min(2 * c, blk->scales, &sc, &m);
    dm[0] = _mm256_set1_ps(d * (float)sc);
    dm[1] = _mm256_set1_ps(dmin * (float)m);
    q4k_scale_min(2 * c + 1, blk->scales, &sc, &m);
    dm[2] = _mm256_set1_ps(d * (float)sc);
    dm[3] = _mm256_set1_ps(dmin * (float)m);
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
    *lo = _mm256_and_si256(v, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

/* 8 weights of a Q4_K sub-block from 8 nibbles: d1 q - m1, rounded as the reference. */
TGT_AVX2 static inline __m256 q4k_w8_avx2(__m128i q8, __m256 d1, __m256 m1) {
    return _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8))), m1);
}

/* The 32 weights of a sub-block (nibbles in q) into out[0..32). */
TGT_AVX2 static inline void q4k_store32_avx2(__m256i q, __m256 d1, __m256 m1, float *out) {
    __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(out, q4k_w8_avx2(a, d1, m1));
    _mm256_storeu_ps(out + 8, q4k_w8_avx2(_mm_srli_si128(a, 8), d1, m1));
    _mm256_storeu_ps(out + 16, q4k_w8_avx2(b, d1, m1));
    _mm256_storeu_ps(out + 24, q4k_w8_avx2(_mm_srli_si128(b, 8), d1, m1));
}

/* One Q6_K half block (128 weights, c = 0, 1) as four vectors of 32 int8 (q - 32): vector i
 * holds weights 32 i .. 32 i + 31, whose scales are sc[8 c + 2 i] (first 16) and sc[8 c + 2 i + 1]. */
TGT_AVX2 static inline void q6k_half_avx2(const block_q6_K *blk, int c, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * c));
    __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * c + 32));
    __m256i h = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * c));
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
    for (int i = 0; i < 4; i++) q[i] = _mm256_sub_epi8(q[i], k32);
}

TGT_AVX2 static float dot_q5_0_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q5_0 *blk = (const block_q5_0 *)row;
    const int64_t nb = j->k / QK5_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x += QK5_0) {
        __m256i q = q5_0_i8_avx2(blk + b);
        __m256 p = _mm256_add_ps(mul16_i8_avx2(_mm256_castsi256_si128(q), x),
                                 mul16_i8_avx2(_mm256_extracti128_si256(q, 1), x + 16));
        if (b & 1) acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d)), p, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f_f16c(blk[b].d)), p, acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

/* Sum of q * x over 32 weights (nibbles in q) as a vector. */
TGT_AVX2 static inline __m256 q4k_qx32_avx2(__m256i q, const float *x) {
    __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), _mm256_loadu_ps(x));
    __m256 p2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))), _mm256_loadu_ps(x + 8));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_loadu_ps(x + 16), p);
    p2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), _mm256_loadu_ps(x + 24), p2);
    return _mm256_add_ps(p, p2);
}

/* Q4_K with sum (d sc q - dmin m) x = d sc sum q x - dmin m sum x per sub-block (Q4_1's identity;
 * the sums of x per sub-block are prepared once per x, XP_SUMS): per 8 weights one conversion and
 * one FMA, the scales and mins unpacked once per block. Measured (L2-hot, 1 thread): dequantizing
 * each weight first ran at 0.50x Q4_0's weights/s, summing x in the kernel at 0.65x. */
TGT_AVX2 static float dot_q4_K_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q4_K *blk = (const block_q4_K *)row;
    const int64_t nb = j->k / QK_K;
    const __m256i mask = _mm256_set1_epi8(15);
    const float *xsum = j->xsum;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t b = 0; b < nb; b++, xsum += 8) {
        const float d = h2f_f16c(blk[b].d), dmin = h2f_f16c(blk[b].dmin);
        float ds[8];
        for (int s = 0; s < 8; s++) {
            uint8_t sc, m;
            q4k_scale_min(s, blk[b].scales, &sc, &m);
            ds[s] = d * (float)sc;
            mins += dmin * (float)m * xsum[s];
        }
        for (int c = 0; c < 4; c++, x += 64) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk[b].qs + 32 * c));
            __m256 p0 = q4k_qx32_avx2(_mm256_and_si256(v, mask), x);
            __m256 p1 = q4k_qx32_avx2(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x + 32);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * c]), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * c + 1]), p1, acc1);
        }
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) - mins;
}

TGT_AVX2 static float dot_q6_K_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const block_q6_K *blk = (const block_q6_K *)row;
    const int64_t nb = j->k / QK_K;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const float d = h2f_f16c(blk[b].d);
        for (int c = 0; c < 2; c++, x += 128) {
            __m256i q[4];
            q6k_half_avx2(blk + b, c, q);
            const int8_t *sc = blk[b].scales + 8 * c;
            for (int i = 0; i < 4; i++) {
                __m256 p0 = mul16_i8_avx2(_mm256_castsi256_si128(q[i]), x + 32 * i);
                __m256 p1 = mul16_i8_avx2(_mm256_extracti128_si256(q[i], 1), x + 32 * i + 16);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[2 * i]), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[2 * i + 1]), p1, acc1);
            }
        }
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

/* Blocks [b0, b1) of a Q5_0, Q4_K or Q6_K row into out, with the reference's arithmetic. */
TGT_AVX2 static void deq_range_kq_avx2(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        if (fmt == FIC_Q5_0) {
            const block_q5_0 *blk = (const block_q5_0 *)row + b;
            __m256 d = _mm256_set1_ps(h2f_f16c(blk->d));
            __m256i q = q5_0_i8_avx2(blk);
            __m128i a = _mm256_castsi256_si128(q), c = _mm256_extracti128_si256(q, 1);
            _mm256_storeu_ps(out, _mm256_mul_ps(cvt8_lo(a), d));
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(cvt8_hi(a), d));
            _mm256_storeu_ps(out + 16, _mm256_mul_ps(cvt8_lo(c), d));
            _mm256_storeu_ps(out + 24, _mm256_mul_ps(cvt8_hi(c), d));
            out += QK5_0;
        } else if (fmt == FIC_Q4_K) {
            const block_q4_K *blk = (const block_q4_K *)row + b;
            for (int c = 0; c < 4; c++, out += 64) {
                __m256i lo, hi;
                __m256 dm[4];
                q4k_pair_avx2(blk, c, &lo, &hi, dm);
                q4k_store32_avx2(lo, dm[0], dm[1], out);
                q4k_store32_avx2(hi, dm[2], dm[3], out + 32);
            }
        } else {
            const block_q6_K *blk = (const block_q6_K *)row + b;
            const float d = h2f_f16c(blk->d);
            for (int c = 0; c < 2; c++) {
                __m256i q[4];
                q6k_half_avx2(blk, c, q);
                for (int i = 0; i < 4; i++, out += 32) {
                    __m256 s0 = _mm256_set1_ps(d * (float)blk->scales[8 * c + 2 * i]);
                    __m256 s1 = _mm256_set1_ps(d * (float)blk->scales[8 * c + 2 * i + 1]);
                    __m128i a = _mm256_castsi256_si128(q[i]), e = _mm256_extracti128_si256(q[i], 1);
                    _mm256_storeu_ps(out, _mm256_mul_ps(s0, cvt8_lo(a)));
                    _mm256_storeu_ps(out + 8, _mm256_mul_ps(s0, cvt8_hi(a)));
                    _mm256_storeu_ps(out + 16, _mm256_mul_ps(s1, cvt8_lo(e)));
                    _mm256_storeu_ps(out + 24, _mm256_mul_ps(s1, cvt8_hi(e)));
                }
            }
        }
    }
}

TGT_AVX2 static float dot_avx2(const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / j->bw;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float extra = 0.0f;
    switch (j->fmt) {
    case FIC_Q1_0:
        return dot_q1_avx2(j, row);
    case FIC_Q5_0:
        return dot_q5_0_avx2(j, row, x);
    case FIC_Q4_K:
        return dot_q4_K_avx2(j, row, x);
    case FIC_Q6_K:
        return dot_q6_K_avx2(j, row, x);
    case FIC_F32: {
        const float *w = (const float *)row;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < k; i++) extra += w[i] * x[i];
        break;
    }
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
            __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
            acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < k; i++) extra += h2f_f16c(w[i]) * x[i];
        break;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row;
        for (int64_t b = 0; b < nb; b++, x += QK8_0) {
            __m128i q0 = _mm_loadu_si128((const __m128i *)blk[b].qs);
            __m128i q1 = _mm_loadu_si128((const __m128i *)(blk[b].qs + 16));
            __m256 p = _mm256_mul_ps(cvt8_lo(q0), _mm256_loadu_ps(x));
            __m256 p2 = _mm256_mul_ps(cvt8_hi(q0), _mm256_loadu_ps(x + 8));
            p = _mm256_fmadd_ps(cvt8_lo(q1), _mm256_loadu_ps(x + 16), p);
            p2 = _mm256_fmadd_ps(cvt8_hi(q1), _mm256_loadu_ps(x + 24), p2);
            __m256 d = _mm256_set1_ps(h2f_f16c(blk[b].d));
            acc0 = _mm256_fmadd_ps(d, p, acc0);
            acc1 = _mm256_fmadd_ps(d, p2, acc1);
        }
        break;
    }
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = j->fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = 0; b < nb; b++, x += 32) {
            const uint8_t *blk = row + b * stride;
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            __m256 p = _mm256_mul_ps(cvt8_lo(lo), _mm256_loadu_ps(x));
            __m256 p2 = _mm256_mul_ps(cvt8_hi(lo), _mm256_loadu_ps(x + 8));
            p = _mm256_fmadd_ps(cvt8_lo(hi), _mm256_loadu_ps(x + 16), p);
            p2 = _mm256_fmadd_ps(cvt8_hi(hi), _mm256_loadu_ps(x + 24), p2);
            fic_half hd;
            memcpy(&hd, blk, 2);
            __m256 d = _mm256_set1_ps(h2f_f16c(hd));
            acc0 = _mm256_fmadd_ps(d, p, acc0);
            acc1 = _mm256_fmadd_ps(d, p2, acc1);
            if (is1) {
                fic_half hm;
                memcpy(&hm, blk + 2, 2);
                extra += h2f_f16c(hm) * j->xsum[b];
            }
        }
        break;
    }
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + extra;
}

/* Dequantize blocks [b0, b1) of a row into out. */
TGT_AVX2 static void deq_range_avx2(int fmt, const uint8_t *row, int64_t b0, int64_t b1, int64_t bw, float *out) {
    switch (fmt) {
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = b0;
        for (; i + 8 <= b1; i += 8)
            _mm256_storeu_ps(out + i - b0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))));
        for (; i < b1; i++) out[i - b0] = h2f_f16c(w[i]);
        return;
    }
    case FIC_Q8_0:
        for (int64_t b = b0; b < b1; b++, out += 32) {
            const block_q8_0 *blk = (const block_q8_0 *)row + b;
            __m256 d = _mm256_set1_ps(h2f_f16c(blk->d));
            __m128i q0 = _mm_loadu_si128((const __m128i *)blk->qs);
            __m128i q1 = _mm_loadu_si128((const __m128i *)(blk->qs + 16));
            _mm256_storeu_ps(out, _mm256_mul_ps(d, cvt8_lo(q0)));
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(d, cvt8_hi(q0)));
            _mm256_storeu_ps(out + 16, _mm256_mul_ps(d, cvt8_lo(q1)));
            _mm256_storeu_ps(out + 24, _mm256_mul_ps(d, cvt8_hi(q1)));
        }
        return;
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = b0; b < b1; b++, out += 32) {
            const uint8_t *blk = row + b * stride;
            fic_half hd, hm = 0;
            memcpy(&hd, blk, 2);
            if (is1) memcpy(&hm, blk + 2, 2);
            __m256 d = _mm256_set1_ps(h2f_f16c(hd)), mn = _mm256_set1_ps(h2f_f16c(hm));
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            _mm256_storeu_ps(out, _mm256_fmadd_ps(d, cvt8_lo(lo), mn));
            _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(d, cvt8_hi(lo), mn));
            _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(d, cvt8_lo(hi), mn));
            _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(d, cvt8_hi(hi), mn));
        }
        return;
    }
    case FIC_Q1_0: {
        const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (int64_t b = b0; b < b1; b++, out += QK1_0) {
            const block_q1_0 *blk = (const block_q1_0 *)row + b;
            float d = h2f_f16c(blk->d);
            __m256 pos = _mm256_set1_ps(d), neg = _mm256_set1_ps(-d);
            for (int c = 0; c < 16; c++) {
                __m256i mc = _mm256_set1_epi32(blk->qs[c]);
                mc = _mm256_cmpeq_epi32(_mm256_and_si256(mc, bits), bits);
                _mm256_storeu_ps(out + 8 * c, _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(mc)));
            }
        }
        return;
    }
    case FIC_Q5_0:
    case FIC_Q4_K:
    case FIC_Q6_K:
        deq_range_kq_avx2(fmt, row, b0, b1, out);
        return;
    default:
        deq_range_ref(fmt, row, b0, b1, bw, out);
    }
}

TGT_AVX2 static void axpy_avx2(float a, const float *w, float *y, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * w[i];
}

/* NR rows x NT tokens of dot products, sharing loads: the inner kernel of matmul. */
TGT_AVX2 static inline __attribute__((always_inline)) void gemm_block_avx2(
        const float *w, const float *x, int64_t k, float *y, int64_t ldy, int nr, int nt) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 xv[2];
        for (int t = 0; t < nt; t++) xv[t] = _mm256_loadu_ps(x + t * k + i);
        for (int r = 0; r < nr; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * k + i);
            for (int t = 0; t < nt; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            float s = hsum256(acc[r][t]);
            for (int64_t ii = i; ii < k; ii++) s += w[r * k + ii] * x[t * k + ii];
            y[t * ldy + r] = s;
        }
}

TGT_AVX2 static void gemm_tile_avx2(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k;
    for (int64_t t = 0; t < j->t; t += 2) {
        const float *x = j->x + t * k;
        float *y = j->y + t * j->m + r0;
        int nt = j->t - t >= 2 ? 2 : 1;
        int64_t r = 0;
        for (; r + 4 <= nr; r += 4) {
            if (nt == 2) gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 4, 2);
            else gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 4, 1);
        }
        for (; r < nr; r++) {
            if (nt == 2) gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 1, 2);
            else gemm_block_avx2(tile + r * k, x, k, y + r, j->m, 1, 1);
        }
    }
}

/* ---- AVX-512 F/BW/VL --------------------------------------------------------------------- */

TGT_AVX512 static inline __m512 cvt16_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* Q1_0 x int8 activations without multiplies, for AVX-512 CPUs without VNNI/BITALG/VBMI (on
 * those dot_q1_planes below is 1.3x faster).  x is stored as u8 xu = xq + 128; the sign bits,
 * as a 64-bit mask, turn it into (-s*xq) + 128 where set (0 - xu wraps to 128 - xq), and psadbw
 * sums each 8 bytes into a u64 lane (+1024 offset). The two halves' 8 lanes are packed into one
 * vector of 16 int32 (lane L covers q8 block L / 4), so per block and row there is one int ->
 * float conversion and two FMAs: p = lane * dx - 1024 dx (xscale16, xcorr16), acc += d * p.
 * (The maddubs/vpdpbusd version was bound by the FP pipes at 15 GB/s a core.) Returns the
 * negated dot product. */
TGT_AVX512 static inline __attribute__((always_inline)) __m512 q1_block_sad(
        const block_q1_0 *blk, __m512i xu0, __m512i xu1, __m512 sc, __m512 corr, __m512 acc) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    uint64_t bits[2];
    memcpy(bits, blk->qs, 16);
    __m512i s0 = _mm512_sad_epu8(_mm512_mask_sub_epi8(xu0, _cvtu64_mask64(bits[0]), zero, xu0), zero);
    __m512i s1 = _mm512_sad_epu8(_mm512_mask_sub_epi8(xu1, _cvtu64_mask64(bits[1]), zero, xu1), zero);
    __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(s0, idx, s1)), sc, corr);
    return _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk->d)), p, acc);
}

/* n_rows (1 or 2) rows of Q1_0 against the prepared x; y[r] = row r . x. */
TGT_AVX512 static void dot_q1_avx512(const job_t *j, const uint8_t *row0, const uint8_t *row1, int n_rows, float *y) {
    const block_q1_0 *r0 = (const block_q1_0 *)row0, *r1 = (const block_q1_0 *)row1;
    const int64_t nb = j->k / QK1_0;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xu0 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0));
        __m512i xu1 = _mm512_loadu_si512((const void *)(j->xu + b * QK1_0 + 64));
        __m512 sc = _mm512_loadu_ps(j->xscale16 + 16 * b), corr = _mm512_loadu_ps(j->xcorr16 + 16 * b);
        acc0 = q1_block_sad(r0 + b, xu0, xu1, sc, corr, acc0);
        if (n_rows == 2) acc1 = q1_block_sad(r1 + b, xu0, xu1, sc, corr, acc1);
    }
    y[0] = -_mm512_reduce_add_ps(acc0);
    if (n_rows == 2) y[1] = -_mm512_reduce_add_ps(acc1);
}

/* Q1_0 x int8 activations as bit planes, four blocks (512 weights) per step, no mask registers.
 * With s = +-1 from the sign bits, sum s xq = 2 sum_{bit set} xq - sum xq, and for int8 xq in
 * two's complement sum_{bit set} xq = sum_p c_p popcount(W & plane_p), c_p = 2^p (p < 7), -128.
 * x is stored once per call as planes (quantize_x_q1_planes): per group of 4 blocks, 8 vectors,
 * 128-bit lane l of vector p = bit p of xq over block 4g+l, in the sign bits' order. The 4
 * blocks' sign bytes are gathered into one zmm W (vpermt2b); per plane one vpandq, vpopcntb and
 * vpdpbusd (counts times c_p) accumulate int32 lane 4l+i = block l's weights 32i..32i+31, i.e.
 * q8 block 16g+4l+i. Per step and row: p = lane * 2dx - dx sum(xq) (xscale16, xcorr16), and
 * acc += d * p with the 4 blocks' d spread over their lanes (vpermw + vcvtph2ps). cw[p] is c_p in
 * each byte of an int32. Measured (L2-hot, 1 thread): 22-24 GB/s a core, against 17 for
 * q1_block_sad; no gain from 3 or 4 rows per pass, nor from two steps per iteration. */
static const int32_t q1_plane_weights[8] = {0x01010101, 0x02020202, 0x04040404, 0x08080808,
                                            0x10101010, 0x20202020, 0x40404040, (int32_t)0x80808080};

TGT_AVX512Q1 static inline __attribute__((always_inline)) __m512 q1_group_planes(
        const uint8_t *base, int nrem, const __m512i pl[8], __m512 a, __m512 c, __m512 acc, const int32_t *cw) {
    const __m512i idx_w = _mm512_set_epi8(
        71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58, 57, 56,
        53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38,
        35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20,
        17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2);
    const __m512i idx_d = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                           27, 27, 27, 27, 18, 18, 18, 18, 9, 9, 9, 9, 0, 0, 0, 0);
    __m512i l0, l1;
    if (nrem >= 4) {
        l0 = _mm512_loadu_si512((const void *)base);
        l1 = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(base + 64)));
    } else { /* a last partial group: bytes past the row stay unread (masked load) */
        l0 = _mm512_maskz_loadu_epi8(((__mmask64)1 << (18 * nrem)) - 1, base);
        l1 = _mm512_setzero_si512();
    }
    __m512i w = _mm512_permutex2var_epi8(l0, idx_w, l1);
    const __m512i z = _mm512_setzero_si512();
#define Q1W(p) _mm512_set1_epi32(cw[p])
    __m512i s0 = _mm512_dpbusd_epi32(z, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[0])), Q1W(0));
    __m512i s1 = _mm512_dpbusd_epi32(z, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[4])), Q1W(4));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[1])), Q1W(1));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[5])), Q1W(5));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[2])), Q1W(2));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[6])), Q1W(6));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[3])), Q1W(3));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_popcnt_epi8(_mm512_and_si512(w, pl[7])), Q1W(7));
#undef Q1W
    __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), a, c);
    __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx_d, l0)));
    return _mm512_fmadd_ps(d, p, acc);
}

/* nr (1 or 2) rows of Q1_0 (row0, row0 + row_bytes) against x's planes; y[i] = row i . x. Two
 * rows per pass share the plane loads (three or four rows measured no faster: register spills). */
TGT_AVX512Q1 static inline __attribute__((always_inline)) void dot_q1_planes_n(const job_t *j, const uint8_t *row0,
                                                                           int nr, float *y) {
    const int64_t nb = j->k / QK1_0, ng = (nb + 3) / 4, rb = j->row_bytes;
    const int64_t gbytes = 4 * (int64_t)sizeof(block_q1_0);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const int32_t *cw = q1_plane_weights;
    /* Hide the constants from gcc: it then loads them into registers once per call instead of
     * rebuilding three of them (movl + vpbroadcastd) every step. Measured 2-4% faster. */
    __asm__("" : "+r"(cw));
    for (int64_t g = 0; g < ng; g++) {
        __m512i pl[8];
        for (int p = 0; p < 8; p++) pl[p] = _mm512_loadu_si512((const void *)(j->xu + 512 * g + 64 * p));
        __m512 a = _mm512_loadu_ps(j->xscale16 + 16 * g), c = _mm512_loadu_ps(j->xcorr16 + 16 * g);
        int nrem = (int)(nb - 4 * g);
        if (nrem >= 4) {
            for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(row0 + i * rb + g * gbytes, 4, pl, a, c, acc[i], cw);
        } else {
            for (int i = 0; i < nr; i++) acc[i] = q1_group_planes(row0 + i * rb + g * gbytes, nrem, pl, a, c, acc[i], cw);
        }
    }
    for (int i = 0; i < nr; i++) y[i] = _mm512_reduce_add_ps(acc[i]);
}

TGT_AVX512Q1 static void dot_q1_planes(const job_t *j, const uint8_t *row0, int nr, float *y) {
    if (nr == 2)
        dot_q1_planes_n(j, row0, 2, y);
    else
        dot_q1_planes_n(j, row0, 1, y);
}

TGT_AVX512VNNI static float dot_q4_vnni(const job_t *j, const uint8_t *row, const float *x);

TGT_AVX512 static float dot_avx512(const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / j->bw;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float extra = 0.0f;
    switch (j->fmt) {
    case FIC_Q1_0: {
        float y;
        if (j->q1_planes)
            dot_q1_planes(j, row, 1, &y);
        else
            dot_q1_avx512(j, row, row, 1, &y);
        return y;
    }
    case FIC_Q4_0:
    case FIC_Q4_1:
        if (j->q4_int8) return dot_q4_vnni(j, row, x);
        break;
    case FIC_Q5_0:
    case FIC_Q4_K:
    case FIC_Q6_K: /* the AVX2 code: a 512-bit version is not measured to pay yet (no AVX-512 here) */
        return dot_avx2(j, row, x);
    default:
        break;
    }
    switch (j->fmt) {
    case FIC_F32: {
        const float *w = (const float *)row;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
        }
        for (; i < k; i += 16) {
            __mmask16 mk = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + i), _mm512_maskz_loadu_ps(mk, x + i), acc0);
        }
        break;
    }
    case FIC_F16: {
        const uint16_t *w = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) {
            __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i)));
            __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
            acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc0);
            acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc1);
        }
        for (; i < k; i += 16) {
            __mmask16 mk = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
            __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w + i));
            acc0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + i), acc0);
        }
        break;
    }
    case FIC_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row;
        for (int64_t b = 0; b < nb; b++, x += QK8_0) {
            __m512 p = _mm512_mul_ps(cvt16_i8(_mm_loadu_si128((const __m128i *)blk[b].qs)), _mm512_loadu_ps(x));
            p = _mm512_fmadd_ps(cvt16_i8(_mm_loadu_si128((const __m128i *)(blk[b].qs + 16))),
                                _mm512_loadu_ps(x + 16), p);
            if (b & 1) acc1 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk[b].d)), p, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(blk[b].d)), p, acc0);
        }
        break;
    }
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = j->fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2, x += 64) {
            const uint8_t *blk0 = row + b * stride, *blk1 = blk0 + stride;
            __m128i v0 = _mm_loadu_si128((const __m128i *)(blk0 + (is1 ? 4 : 2)));
            __m128i v1 = _mm_loadu_si128((const __m128i *)(blk1 + (is1 ? 4 : 2)));
            __m128i lo0 = _mm_sub_epi8(_mm_and_si128(v0, mask), eight);
            __m128i hi0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v0, 4), mask), eight);
            __m128i lo1 = _mm_sub_epi8(_mm_and_si128(v1, mask), eight);
            __m128i hi1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v1, 4), mask), eight);
            __m512 p0 = _mm512_mul_ps(cvt16_i8(lo0), _mm512_loadu_ps(x));
            __m512 p1 = _mm512_mul_ps(cvt16_i8(lo1), _mm512_loadu_ps(x + 32));
            p0 = _mm512_fmadd_ps(cvt16_i8(hi0), _mm512_loadu_ps(x + 16), p0);
            p1 = _mm512_fmadd_ps(cvt16_i8(hi1), _mm512_loadu_ps(x + 48), p1);
            fic_half h0, h1;
            memcpy(&h0, blk0, 2);
            memcpy(&h1, blk1, 2);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h0)), p0, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h1)), p1, acc1);
            if (is1) {
                memcpy(&h0, blk0 + 2, 2);
                memcpy(&h1, blk1 + 2, 2);
                extra += h2f_f16c(h0) * j->xsum[b] + h2f_f16c(h1) * j->xsum[b + 1];
            }
        }
        if (b < nb) {
            const uint8_t *blk0 = row + b * stride;
            __m128i v0 = _mm_loadu_si128((const __m128i *)(blk0 + (is1 ? 4 : 2)));
            __m128i lo0 = _mm_sub_epi8(_mm_and_si128(v0, mask), eight);
            __m128i hi0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v0, 4), mask), eight);
            __m512 p0 = _mm512_mul_ps(cvt16_i8(lo0), _mm512_loadu_ps(x));
            p0 = _mm512_fmadd_ps(cvt16_i8(hi0), _mm512_loadu_ps(x + 16), p0);
            fic_half h0;
            memcpy(&h0, blk0, 2);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(h2f_f16c(h0)), p0, acc0);
            if (is1) {
                memcpy(&h0, blk0 + 2, 2);
                extra += h2f_f16c(h0) * j->xsum[b];
            }
        }
        break;
    }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + extra;
}

TGT_AVX512 static void deq_range_avx512(int fmt, const uint8_t *row, int64_t b0, int64_t b1, int64_t bw,
                                        float *out) {
    if (fmt != FIC_Q1_0) {
        deq_range_avx2(fmt, row, b0, b1, bw, out);
        return;
    }
    for (int64_t b = b0; b < b1; b++, out += QK1_0) {
        const block_q1_0 *blk = (const block_q1_0 *)row + b;
        float d = h2f_f16c(blk->d);
        __m512 pos = _mm512_set1_ps(d), neg = _mm512_set1_ps(-d);
        uint16_t mk[8];
        memcpy(mk, blk->qs, 16);
        for (int c = 0; c < 8; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mask_blend_ps((__mmask16)mk[c], neg, pos));
    }
}

TGT_AVX512 static void axpy_avx512(float a, const float *w, float *y, int64_t n) {
    __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 yv = _mm512_maskz_loadu_ps(mk, y + i);
        _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(mk, w + i), yv));
    }
}

/* y[0 .. (b1-b0)*bw) += a * row's blocks [b0, b1), dequantized in registers (accum_rows).
 * Returns 0 for formats it does not handle (the caller dequantizes to a buffer instead). */
TGT_AVX512 static int axpy_blocks_avx512(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float a, float *y) {
    switch (fmt) {
    case FIC_Q8_0:
        for (int64_t b = b0; b < b1; b++, y += 32) {
            const block_q8_0 *blk = (const block_q8_0 *)row + b;
            __m512 ad = _mm512_set1_ps(a * h2f_f16c(blk->d));
            __m512 q0 = cvt16_i8(_mm_loadu_si128((const __m128i *)blk->qs));
            __m512 q1 = cvt16_i8(_mm_loadu_si128((const __m128i *)(blk->qs + 16)));
            _mm512_storeu_ps(y, _mm512_fmadd_ps(q0, ad, _mm512_loadu_ps(y)));
            _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(q1, ad, _mm512_loadu_ps(y + 16)));
        }
        return 1;
    case FIC_Q4_0:
    case FIC_Q4_1: {
        const int is1 = fmt == FIC_Q4_1;
        const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0);
        const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(is1 ? 0 : 8);
        for (int64_t b = b0; b < b1; b++, y += 32) {
            const uint8_t *blk = row + b * stride;
            fic_half hd, hm = 0;
            memcpy(&hd, blk, 2);
            if (is1) memcpy(&hm, blk + 2, 2);
            __m512 ad = _mm512_set1_ps(a * h2f_f16c(hd)), am = _mm512_set1_ps(a * h2f_f16c(hm));
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (is1 ? 4 : 2)));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
            __m512 y0 = _mm512_loadu_ps(y), y1 = _mm512_loadu_ps(y + 16);
            if (is1) {
                y0 = _mm512_add_ps(y0, am);
                y1 = _mm512_add_ps(y1, am);
            }
            _mm512_storeu_ps(y, _mm512_fmadd_ps(cvt16_i8(lo), ad, y0));
            _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(cvt16_i8(hi), ad, y1));
        }
        return 1;
    }
    case FIC_Q1_0:
        for (int64_t b = b0; b < b1; b++, y += QK1_0) {
            const block_q1_0 *blk = (const block_q1_0 *)row + b;
            float ad = a * h2f_f16c(blk->d);
            __m512 pos = _mm512_set1_ps(ad), neg = _mm512_set1_ps(-ad);
            uint16_t mk[8];
            memcpy(mk, blk->qs, 16);
            for (int c = 0; c < 8; c++)
                _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(_mm512_loadu_ps(y + 16 * c),
                                                           _mm512_mask_blend_ps((__mmask16)mk[c], neg, pos)));
        }
        return 1;
    default:
        return 0;
    }
}

/* accum_rows for Q1_0, four rows at a time: with w = +-d, y += sum_r a_r w_r is
 * y += C + sum_r (bit ? 2 a_r d_r : 0) with C = -sum_r a_r d_r, so each row costs one masked
 * add per 16 weights and y is loaded and stored once per four rows. Pad rows have a = 0. */
TGT_AVX512 static void accum_q1_group_avx512(const uint8_t *const rows[4], const float a[4], int64_t b0, int64_t b1,
                                             float *y) {
    for (int64_t b = b0; b < b1; b++) {
        const block_q1_0 *blk[4];
        __m512 two[4];
        float c = 0.0f;
        for (int r = 0; r < 4; r++) {
            blk[r] = (const block_q1_0 *)rows[r] + b;
            float ad = a[r] * h2f_f16c(blk[r]->d);
            c -= ad;
            two[r] = _mm512_set1_ps(2.0f * ad);
        }
        __m512 cv = _mm512_set1_ps(c);
        float *yb = y + b * QK1_0;
        for (int q = 0; q < 8; q++) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(yb + 16 * q), cv);
            for (int r = 0; r < 4; r++) {
                uint16_t m;
                memcpy(&m, blk[r]->qs + 2 * q, 2);
                v = _mm512_mask_add_ps(v, (__mmask16)m, v, two[r]);
            }
            _mm512_storeu_ps(yb + 16 * q, v);
        }
    }
}

/* 6 rows x 4 tokens of dot products: 24 accumulators in registers, 10 loads per 24 FMAs, which
 * the L2 can feed (4 x 3 needed more than it delivers). Named variables, not an array: gcc
 * kept an array of accumulators in memory. */
#define G_ACC(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, a##r##3 = a##r##0
#define G_ROW(r, LOAD)                                                               \
    do {                                                                             \
        __m512 wv = LOAD(w + r * k + i);                                             \
        a##r##0 = _mm512_fmadd_ps(wv, x0, a##r##0);                                  \
        a##r##1 = _mm512_fmadd_ps(wv, x1, a##r##1);                                  \
        a##r##2 = _mm512_fmadd_ps(wv, x2, a##r##2);                                  \
        a##r##3 = _mm512_fmadd_ps(wv, x3, a##r##3);                                  \
    } while (0)
#define G_STEP(LOAD)                                                                 \
    do {                                                                             \
        __m512 x0 = LOAD(x + i), x1 = LOAD(x + k + i), x2 = LOAD(x + 2 * k + i),     \
               x3 = LOAD(x + 3 * k + i);                                             \
        G_ROW(0, LOAD); G_ROW(1, LOAD); G_ROW(2, LOAD);                              \
        G_ROW(3, LOAD); G_ROW(4, LOAD); G_ROW(5, LOAD);                              \
    } while (0)
#define G_STORE(r)                                                                   \
    do {                                                                             \
        y[r] = _mm512_reduce_add_ps(a##r##0);                                        \
        y[ldy + r] = _mm512_reduce_add_ps(a##r##1);                                  \
        y[2 * ldy + r] = _mm512_reduce_add_ps(a##r##2);                              \
        y[3 * ldy + r] = _mm512_reduce_add_ps(a##r##3);                              \
    } while (0)

TGT_AVX512 static void gemm_6x4_avx512(const float *w, const float *x, int64_t k, float *y, int64_t ldy) {
    G_ACC(0); G_ACC(1); G_ACC(2); G_ACC(3); G_ACC(4); G_ACC(5);
    int64_t i = 0;
#define LOAD_FULL(p) _mm512_loadu_ps(p)
    for (; i + 16 <= k; i += 16) G_STEP(LOAD_FULL);
    if (i < k) {
        const __mmask16 mk = (__mmask16)((1u << (k - i)) - 1);
#define LOAD_TAIL(p) _mm512_maskz_loadu_ps(mk, p)
        G_STEP(LOAD_TAIL);
    }
    G_STORE(0); G_STORE(1); G_STORE(2); G_STORE(3); G_STORE(4); G_STORE(5);
}
#undef LOAD_FULL
#undef LOAD_TAIL
#undef G_ACC
#undef G_ROW
#undef G_STEP
#undef G_STORE

/* One row against nt <= 4 tokens: the edges of a tile. */
TGT_AVX512 static void gemm_1xn_avx512(const float *w, const float *x, int64_t k, float *y, int64_t ldy, int nt) {
    for (int t = 0; t < nt; t++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const float *xt = x + t * k;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(xt + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(xt + i + 16), acc1);
        }
        for (; i < k; i += 16) {
            __mmask16 mk = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + i), _mm512_maskz_loadu_ps(mk, xt + i), acc0);
        }
        y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}

TGT_AVX512 static void gemm_tile_avx512(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    const int64_t k = j->k;
    for (int64_t t = 0; t < j->t; t += 4) {
        const float *x = j->x + t * k;
        float *y = j->y + t * j->m + r0;
        int nt = j->t - t >= 4 ? 4 : (int)(j->t - t);
        int64_t r = 0;
        if (nt == 4)
            for (; r + 6 <= nr; r += 6) gemm_6x4_avx512(tile + r * k, x, k, y + r, j->m);
        for (; r < nr; r++) gemm_1xn_avx512(tile + r * k, x, k, y + r, j->m, nt);
    }
}
#endif /* FIC_X86 */

#if defined(FIC_X86)
/* Q4_0/Q4_1 x int8 activations with VNNI, two blocks (64 weights) per step. The 16 nibble
 * bytes of blocks b and b+1 become one zmm [lo_b | lo_b+1 | hi_b | hi_b+1] (unsigned 0..15);
 * x is quantized into the same "pair layout" once per call, so one vpdpbusd gives 16 int32
 * lanes of 4 products each (lanes 0-3, 8-11 block b; 4-7, 12-15 block b+1). Per lane:
 * p = isum * dx + corr (corr = -8 dx sum xq for Q4_0's offset), y += d * p, and for Q4_1
 * y += m * (dx sum xq). A last odd block runs in float. */
TGT_AVX512VNNI static float dot_q4_vnni(const job_t *j, const uint8_t *row, const float *x) {
    const int is1 = j->fmt == FIC_Q4_1;
    const int64_t stride = is1 ? sizeof(block_q4_1) : sizeof(block_q4_0), off = is1 ? 4 : 2;
    const int64_t nb = j->k / 32, np = nb / 2;
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i idx_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
    const __m512i idx_m = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3);
    __m512 acc = _mm512_setzero_ps(), accm = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        const uint8_t *b0 = row + 2 * p * stride, *b1 = b0 + stride;
        __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + off))),
                                            _mm_loadu_si128((const __m128i *)(b1 + off)), 1);
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
        q = _mm512_and_si512(q, nib);
        __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q,
                                           _mm512_loadu_si512((const void *)(j->xq + 64 * p)));
        /* d (and m) of both blocks: [d0, m0, d1, m1] as fp16 -> fp32, spread over the lanes */
        uint32_t h0, h1;
        memcpy(&h0, b0, 4);
        memcpy(&h1, b1, 4);
        __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(_mm_cvtsi32_si128((int)h0), _mm_cvtsi32_si128((int)h1)));
        __m512 dm512 = _mm512_castps128_ps512(dm);
        __m512 dv = _mm512_permutexvar_ps(idx_d, dm512);
        __m512 corr = _mm512_loadu_ps(j->xcorr16 + 16 * p);
        if (is1) {
            __m512 pv = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_loadu_ps(j->xscale16 + 16 * p));
            acc = _mm512_fmadd_ps(pv, dv, acc);
            accm = _mm512_fmadd_ps(corr, _mm512_permutexvar_ps(idx_m, dm512), accm);
        } else {
            __m512 pv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_loadu_ps(j->xscale16 + 16 * p), corr);
            acc = _mm512_fmadd_ps(pv, dv, acc);
        }
    }
    float extra = 0.0f;
    if (nb & 1) { /* the odd last block, in float */
        const uint8_t *blk = row + (nb - 1) * stride;
        const float *xb = x + (nb - 1) * 32;
        fic_half hd, hm = 0;
        memcpy(&hd, blk, 2);
        if (is1) memcpy(&hm, blk + 2, 2);
        float d = _cvtsh_ss(hd), mn = _cvtsh_ss(hm);
        for (int i = 0; i < 16; i++) {
            int lo = blk[off + i] & 15, hi = blk[off + i] >> 4;
            extra += (is1 ? d * lo + mn : d * (lo - 8)) * xb[i] + (is1 ? d * hi + mn : d * (hi - 8)) * xb[i + 16];
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc, accm)) + extra;
}

/* x -> int8 in the pair layout of dot_q4_vnni (q8_0 rounding, as quantize_x_avx2), with its
 * per-lane scales and the per-lane dx * sum xq (times -8 for Q4_0). */
TGT_AVX512 static void quantize_x_pairs_avx512(const float *x, int64_t k, int q4_0, int8_t *xq, float *xscale16,
                                               float *xcorr16) {
    for (int64_t b = 0; b < k / 64 * 2; b++) { /* whole pairs; an odd last block runs in float */
        const int64_t p = b / 2, h = b % 2;
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        _mm_storeu_si128((__m128i *)(xq + 64 * p + 16 * h), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + 64 * p + 32 + 16 * h), _mm512_cvtsepi32_epi8(q1));
        /* lanes of this block: 4h..4h+3 (weights 0-15) and 8+4h..8+4h+3 (weights 16-31) */
        for (int l = 0; l < 4; l++) {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < 4; i++) {
                lo += xq[64 * p + 16 * h + 4 * l + i];
                hi += xq[64 * p + 32 + 16 * h + 4 * l + i];
            }
            float f = q4_0 ? -8.0f * dx : dx;
            xscale16[16 * p + 4 * h + l] = dx;
            xscale16[16 * p + 8 + 4 * h + l] = dx;
            xcorr16[16 * p + 4 * h + l] = f * (float)lo;
            xcorr16[16 * p + 8 + 4 * h + l] = f * (float)hi;
        }
    }
}

/* x -> int8 in blocks of 32 (ggml's q8_0: dx = amax / 127, q = round(x / dx), ties to even here)
 * and, per 128 weights, the 8 lane scales and corrections dot_q1_avx2 reads: lane l holds half of
 * q8 block l % 4, so a8 = 2 dx of that block and c8 = -dx sum(xq) in lanes 0-3, 0 in lanes 4-7. */
TGT_AVX2 static void quantize_x_avx2(const float *x, int64_t k, int8_t *xq, float *a8, float *c8) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / 32; b++) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        /* packs interleave 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + 32 * b), p8);
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) sum += xq[32 * b + i];
        const int64_t l = 8 * (b / 4) + b % 4;
        a8[l] = a8[l + 4] = 2.0f * dx;
        c8[l] = -dx * (float)sum;
        c8[l + 4] = 0.0f;
    }
}

/* x -> q8 blocks of 32 stored as u8 (xq + 128) for q1_block_sad, with per-lane dx and -1024 dx
 * (16 lanes per 128 weights, lane L -> q8 block L / 4). */
TGT_AVX512 static void quantize_x_q1_avx512(const float *x, int64_t k, uint8_t *xu, float *xscale16, float *xcorr16) {
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        const __m128i bias = _mm_set1_epi8((char)0x80);
        _mm_storeu_si128((__m128i *)(xu + 32 * b), _mm_xor_si128(_mm512_cvtsepi32_epi8(q0), bias));
        _mm_storeu_si128((__m128i *)(xu + 32 * b + 16), _mm_xor_si128(_mm512_cvtsepi32_epi8(q1), bias));
        for (int l = 0; l < 4; l++) {
            xscale16[4 * b + l] = dx;
            xcorr16[4 * b + l] = -1024.0f * dx;
        }
    }
}

/* x -> q8 blocks of 32 (as above) stored as bit planes for dot_q1_planes, with 2 dx and
 * -dx sum(xq) per q8 block (lane L of group g is q8 block 16 g + L). planes: 512 bytes per
 * group of 4 blocks, a16/c16: 16 floats per group, a last partial group zero-padded; xq: k bytes
 * of scratch. */
TGT_AVX512Q1 static void quantize_x_q1_planes(const float *x, int64_t k, uint8_t *planes, float *a16, float *c16,
                                              int8_t *xq) {
    const int64_t nb = k / QK1_0, ng = (nb + 3) / 4;
    memset(planes, 0, (size_t)ng * 512);
    memset(a16, 0, (size_t)ng * 16 * sizeof *a16);
    memset(c16, 0, (size_t)ng * 16 * sizeof *c16);
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
        _mm_storeu_si128((__m128i *)(xq + 32 * b), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)); /* |q| <= 127: no saturation */
        a16[b] = 2.0f * dx;
        c16[b] = -dx * (float)sum;
    }
    for (int64_t h = 0; h < k / 64; h++) { /* 64 weights: half h % 2 of block h / 2 */
        const int64_t blk = h / 2, g = blk / 4, l = blk % 4;
        __m512i v = _mm512_loadu_si512((const void *)(xq + 64 * h));
        for (int p = 0; p < 8; p++) {
            uint64_t bits = _cvtmask64_u64(_mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1u << p))));
            memcpy(planes + 512 * g + 64 * p + 16 * l + 8 * (h % 2), &bits, 8);
        }
    }
}
#endif /* FIC_X86 */

/* ---- NEON (AArch64) ---------------------------------------------------------------------- */
#if defined(__aarch64__)

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

static float dot_neon(const job_t *j, const uint8_t *row, const float *x) {
    const int64_t k = j->k, nb = k / j->bw;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float extra = 0.0f;
    switch (j->fmt) {
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
        const int is1 = j->fmt == FIC_Q4_1;
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

static void deq_range_neon(int fmt, const uint8_t *row, int64_t b0, int64_t b1, int64_t bw, float *out) {
    if (fmt == FIC_F16) {
        const uint16_t *w = (const uint16_t *)row;
        for (int64_t i = b0; i < b1; i++) out[i - b0] = h2f_neon(w[i]);
        return;
    }
    deq_range_ref(fmt, row, b0, b1, bw, out);
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
#endif /* __aarch64__ */

/* ---- dispatch ---------------------------------------------------------------------------- */

static float dot_row(const job_t *j, const uint8_t *row, const float *x) {
    switch (j->impl) {
#if defined(FIC_X86)
    case FIC_IMPL_AVX2: return dot_avx2(j, row, x);
    case FIC_IMPL_AVX512: return dot_avx512(j, row, x);
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: return dot_neon(j, row, x);
#endif
    default: return dot_ref(j, row, x);
    }
}

static void deq_range(const job_t *j, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    switch (j->impl) {
#if defined(FIC_X86)
    case FIC_IMPL_AVX2: deq_range_avx2(j->fmt, row, b0, b1, j->bw, out); return;
    case FIC_IMPL_AVX512: deq_range_avx512(j->fmt, row, b0, b1, j->bw, out); return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: deq_range_neon(j->fmt, row, b0, b1, j->bw, out); return;
#endif
    default: deq_range_ref(j->fmt, row, b0, b1, j->bw, out);
    }
}

static void axpy(const job_t *j, float a, const float *w, float *y, int64_t n) {
    switch (j->impl) {
#if defined(FIC_X86)
    case FIC_IMPL_AVX2: axpy_avx2(a, w, y, n); return;
    case FIC_IMPL_AVX512: axpy_avx512(a, w, y, n); return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: axpy_neon(a, w, y, n); return;
#endif
    default: axpy_ref(a, w, y, n);
    }
}

static void gemm_tile(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    switch (j->impl) {
#if defined(FIC_X86)
    case FIC_IMPL_AVX2: gemm_tile_avx2(j, tile, nr, r0); return;
    case FIC_IMPL_AVX512: gemm_tile_avx512(j, tile, nr, r0); return;
#endif
#if defined(__aarch64__)
    case FIC_IMPL_NEON: gemm_tile_neon(j, tile, nr, r0); return;
#endif
    default: gemm_tile_ref(j, tile, nr, r0);
    }
}


#if defined(FIC_X86)
static int cpu_has_avx512vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}
static int cpu_has_q1_planes(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bitalg") &&
           __builtin_cpu_supports("avx512vbmi");
}
#endif


/* matvec quantizes x to int8 (q8 blocks of 32, once per call) where measurement said it pays:
 * Q1_0 on AVX-512 and AVX2 (the float paths were bound by mask moves, ~5 GB/s a core, and by
 * bit expansion, ~3 GB/s; int8 is 3x and 1.6x faster; stored as bit planes where the CPU has
 * VNNI, BITALG and VBMI, 22 instead of 17 GB/s a core) and Q4_0/Q4_1 on AVX-512 with VNNI
 * (the float path ran at 16 GB/s a core, under half the 2-thread bandwidth; VNNI doubles it).
 * The added error is bounded and measured in tests/test_kernels.py and bench/RESULTS.md. */

/* Activation preparation, done once per vector x (matvec: once per call):
 *   XP_SUMS      per-block sums of x (float fast paths of Q4_1, and of Q1_0 on NEON); for Q4_K per
 *                sub-block of 32 (its mins apply per sub-block; see xsum_width)
 *   XP_Q1_AVX2   x -> int8 q8 blocks + lane scales + corrections (Q1_0 on AVX2, dot_q1_avx2)
 *   XP_Q1_AVX512 x -> u8 q8 blocks + scales + corrections (Q1_0 on AVX-512, q1_block_sad)
 *   XP_Q1_PLANES x -> bit planes of its q8 blocks + scales + corrections (Q1_0 on AVX-512 with
 *                VNNI/BITALG/VBMI, dot_q1_planes)
 *   XP_Q4_VNNI   x -> int8 in the pair layout (Q4_0/Q4_1 on AVX-512 VNNI, k >= 64) */
enum { XP_NONE, XP_SUMS, XP_Q1_AVX2, XP_Q1_AVX512, XP_Q1_PLANES, XP_Q4_VNNI };

/* Weights per sum of x in XP_SUMS: the block, or a Q4_K sub-block. */
static int64_t xsum_width(const job_t *j) { return j->fmt == FIC_Q4_K ? 32 : j->bw; }

static int prep_x_mode(const job_t *j) {
    if (j->impl == FIC_IMPL_REF) return XP_NONE;
#if defined(FIC_X86)
    if (j->fmt == FIC_Q1_0 && j->impl == FIC_IMPL_AVX512) {
        /* Planes take 4 blocks per step, a last partial group padded: they pay when the groups
         * are at least 80% full (measured, 1 thread, L2: 4, 7, 8, 10 blocks faster than psadbw,
         * 6 and 9 even, 1-3 and 5 slower, e.g. 12 vs 14 GB/s at 5). */
        const int64_t nb = j->k / QK1_0, ng = (nb + 3) / 4;
        return cpu_has_q1_planes() && 5 * nb >= 16 * ng ? XP_Q1_PLANES : XP_Q1_AVX512;
    }
    if (j->fmt == FIC_Q1_0 && j->impl == FIC_IMPL_AVX2) return XP_Q1_AVX2;
    if ((j->fmt == FIC_Q4_0 || j->fmt == FIC_Q4_1) && j->impl == FIC_IMPL_AVX512 && j->k >= 64 &&
        cpu_has_avx512vnni())
        return XP_Q4_VNNI;
#endif
    if (j->fmt == FIC_Q4_1 || j->fmt == FIC_Q4_K || (j->fmt == FIC_Q1_0 && j->impl == FIC_IMPL_NEON)) return XP_SUMS;
    return XP_NONE;
}

/* Bytes prep_x needs for job j (0: nothing to prepare); a multiple of 64. */
static size_t prep_x_bytes(const job_t *j) {
    size_t n;
    switch (prep_x_mode(j)) {
    case XP_SUMS: n = (size_t)(j->k / xsum_width(j)) * sizeof(float); break;
    case XP_Q1_AVX2: n = (size_t)j->k + (size_t)j->k / 2; break; /* k int8 + 2 x k/16 floats */
    case XP_Q1_AVX512: n = (size_t)j->k * 2; break; /* k int8 + k/4 floats */
    case XP_Q1_PLANES: /* 512 bytes + 32 floats per group of 4 blocks, k bytes of scratch */
        n = (size_t)((j->k / QK1_0 + 3) / 4) * (512 + 32 * sizeof(float)) + (size_t)j->k;
        break;
    case XP_Q4_VNNI: n = (size_t)j->k * 3; break;   /* k int8 + 2 x k/4 floats */
    default: n = 0;
    }
    return (n + 63) / 64 * 64;
}

/* Prepares j->x into mem (prep_x_bytes(j) bytes, 64-byte aligned) and points j's activation
 * fields (xsum, xq, xu, xscale16, xcorr16, q4_int8) at it. */
static void prep_x(job_t *j, void *mem) {
    j->xsum = NULL;
    j->xq = NULL;
    j->xu = NULL;
    j->xscale16 = j->xcorr16 = NULL;
    j->q4_int8 = 0;
    j->q1_planes = 0;
    switch (prep_x_mode(j)) {
    case XP_SUMS: {
        float *s = mem;
        const int64_t sw = xsum_width(j);
        for (int64_t b = 0; b < j->k / sw; b++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < sw; i++) acc += j->x[b * sw + i];
            s[b] = acc;
        }
        j->xsum = s;
        return;
    }
#if defined(FIC_X86)
    case XP_Q1_AVX512: {
        float *sc = (float *)((uint8_t *)mem + j->k), *corr = sc + j->k / 8;
        quantize_x_q1_avx512(j->x, j->k, (uint8_t *)mem, sc, corr);
        j->xu = (const uint8_t *)mem;
        j->xscale16 = sc;
        j->xcorr16 = corr;
        return;
    }
    case XP_Q1_PLANES: {
        const int64_t ng = (j->k / QK1_0 + 3) / 4;
        uint8_t *pl = mem;
        float *a16 = (float *)(pl + 512 * ng), *c16 = a16 + 16 * ng;
        quantize_x_q1_planes(j->x, j->k, pl, a16, c16, (int8_t *)(c16 + 16 * ng));
        j->xu = pl;
        j->xscale16 = a16;
        j->xcorr16 = c16;
        j->q1_planes = 1;
        return;
    }
    case XP_Q1_AVX2: {
        float *a8 = (float *)((uint8_t *)mem + j->k), *c8 = a8 + j->k / 16;
        quantize_x_avx2(j->x, j->k, (int8_t *)mem, a8, c8);
        j->xq = (const int8_t *)mem;
        j->xscale16 = a8;
        j->xcorr16 = c8;
        return;
    }
    case XP_Q4_VNNI: {
        int8_t *xq = mem;
        float *sc = (float *)(xq + j->k), *corr = sc + j->k / 4;
        quantize_x_pairs_avx512(j->x, j->k, j->fmt == FIC_Q4_0, xq, sc, corr);
        j->xq = xq;
        j->xscale16 = sc;
        j->xcorr16 = corr;
        j->q4_int8 = 1;
        return;
    }
#endif
    default:
        return;
    }
}


/* Rows per chunk: one chunk per thread for a small matrix (each chunk is a fresh memory
 * stream that must ramp up), about four per thread once chunks reach 1 MiB (load balance). */
static int64_t row_chunk(fic_pool *pool, int64_t m, int64_t row_bytes) {
    int64_t n_threads = fic_pool_threads(pool);
    int64_t per_thread = (m + n_threads - 1) / n_threads;
    int64_t c = (m + 4 * n_threads - 1) / (4 * n_threads);
    int64_t min_rows = ((int64_t)1 << 20) / row_bytes + 1;
    c = c < min_rows ? min_rows : c;
    return c > per_thread ? per_thread : c;
}

#define ACCUM_PF_ROWS 4 /* rows ahead to prefetch: each row piece is its own short stream */

/* Rows outer, this thread's columns inner: y's range stays in L1/L2 while the rows stream
 * past; each row piece is prefetched a few rows ahead since the hardware prefetcher does not
 * follow one piece per row. */
#if defined(FIC_X86)
static void accum_q1_avx512(const job_t *j, int64_t b0, int64_t b1) {
    const uint8_t *rows[4];
    float a[4];
    int n = 0;
    const int64_t piece = (b1 - b0) * j->bb;
    for (int64_t i = 0; i < j->m; i++) {
        if (i + ACCUM_PF_ROWS < j->m) {
            const uint8_t *ahead = j->w + (i + ACCUM_PF_ROWS) * j->row_bytes + b0 * j->bb;
            for (int64_t off = 0; off < piece; off += 64) __builtin_prefetch(ahead + off, 0, 0);
        }
        if (j->a[i] == 0.0f) continue;
        rows[n] = j->w + i * j->row_bytes;
        a[n++] = j->a[i];
        if (n == 4) {
            accum_q1_group_avx512(rows, a, b0, b1, j->y);
            n = 0;
        }
    }
    if (n > 0) {
        for (int r = n; r < 4; r++) {
            rows[r] = rows[0];
            a[r] = 0.0f;
        }
        accum_q1_group_avx512(rows, a, b0, b1, j->y);
    }
}
#endif

static void accum_range(void *ctx, int64_t b0, int64_t b1, int tid) {
    const job_t *j = ctx;
    (void)tid;
#if defined(FIC_X86)
    if (j->fmt == FIC_Q1_0 && j->impl == FIC_IMPL_AVX512) {
        accum_q1_avx512(j, b0, b1);
        return;
    }
#endif
    float buf[SEG_FLOATS];
    const int64_t seg_blocks = SEG_FLOATS / j->bw, piece = (b1 - b0) * j->bb;
    for (int64_t i = 0; i < j->m; i++) {
        if (i + ACCUM_PF_ROWS < j->m) {
            const uint8_t *ahead = j->w + (i + ACCUM_PF_ROWS) * j->row_bytes + b0 * j->bb;
            for (int64_t off = 0; off < piece; off += 64) __builtin_prefetch(ahead + off, 0, 0);
        }
        if (j->a[i] == 0.0f) continue; /* pruned neuron: its row need not be read */
        const uint8_t *row = j->w + i * j->row_bytes;
        for (int64_t s = b0; s < b1; s += seg_blocks) {
            int64_t e = b1 - s < seg_blocks ? b1 : s + seg_blocks;
            float *y = j->y + s * j->bw;
            if (j->fmt == FIC_F32) {
                axpy(j, j->a[i], (const float *)row + s, y, (e - s) * j->bw);
#if defined(FIC_X86)
            } else if (j->impl == FIC_IMPL_AVX512 && axpy_blocks_avx512(j->fmt, row, s, e, j->a[i], y)) {
                continue;
#endif
            } else {
                deq_range(j, row, s, e, buf);
                axpy(j, j->a[i], buf, y, (e - s) * j->bw);
            }
        }
    }
}
#pragma GCC diagnostic pop

#endif /* FIC_KERNELS_IMPL_H */
