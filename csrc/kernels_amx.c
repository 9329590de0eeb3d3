/* kernels_amx.c - x86-64 AMX (AMX-TILE + AMX-INT8, with AVX-512 VBMI/BITALG): the r32 layout's
 * prefill as tile products (the table fic_kernels_avx512_amx in kernels_avx512.c points here).
 *
 * A group of 32 Q1_0 rows against many tokens. Per q8 block (32 weights) the group's sign bits are
 * expanded once into +-1 bytes, 8 B-tile rows of 64 bytes per half of the rows (row kk holds, for each
 * of 16 output rows, its weights 4 kk .. 4 kk + 3, the VNNI order tdpbssd reads), shared by every
 * token; two q8 blocks make one B tile of K = 64. The A tile is 16 tokens' int8 x of those 64
 * weights, loaded straight from the quantizer's rows. Two tdpbssd give the 16 x 16 exact integer
 * sums of +-xq over a Q1_0 block, the same integers the table kernels compute; then per token
 * acc = fma(d dx, sum, acc) in block order, as q1r32_ref: the same bits.
 *
 * One float step per Q1_0 block, not per q8 block, because x has one scale per 128 weights
 * (qdot.h, Q1R32_XQ_BYTES): with a scale per 32, four times the float steps and twice the tdpbssd
 * took 2x the time (bench/RESULTS.md). Why tokens in A (C rows are tokens): a C row is then 16
 * output rows of one token, scaled by one dx and the rows' d vector, and stored to y without a
 * transpose. The sign bits are expanded a slice of AMX_SLICE blocks at a time into the caller's
 * scratch (kept in L1/L2); across slices the partial sums go through y (a float stored and loaded is
 * unchanged, so the bits are too). */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(FIC_X86)
#include <immintrin.h>

#define TGT_AMX                                                                                                \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg,avx512vbmi,avx2,fma,f16c")))

/* ldtilecfg's 64-byte operand, palette 1 */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;
static_assert(sizeof(amx_cfg) == 64, "ldtilecfg reads 64 bytes");

#define AMX_SLICE Q1R32_TILES_SLICE /* q8 blocks expanded at a time: 2 x 512 bytes each */
static_assert(AMX_SLICE % (QK1_0 / 32) == 0, "a slice holds whole Q1_0 blocks");

/* tiles 0 and 3: C (n tokens x 16 int32), 1 and 4: A (n tokens x 64 int8), 2 and 5: B (16 x 64 int8) */
TGT_AMX static void tiles_config(int n) {
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 6; i += 3) {
        c.rows[i] = (uint8_t)n;
        c.colsb[i] = 64;
        c.rows[i + 1] = (uint8_t)n;
        c.colsb[i + 1] = 64;
        c.rows[i + 2] = 16;
        c.colsb[i + 2] = 64;
    }
    _tile_loadconfig(&c);
}

/* Blocks [q0, q0 + n) (q8 blocks of the group, q0 and n multiples of 4) into B tiles at bt and the
 * rows' d as floats at dfl (32 per Q1_0 block). Half h of a pair of q8 blocks q, q + 1 (q - q0 even)
 * is one B tile of K = 64 at bt + (q - q0 + h) 1024: block q's 8 rows, then block q + 1's. */
TGT_AMX static void expand_slice(const uint8_t *w, int64_t q0, int64_t n, int8_t *bt, float *dfl) {
    /* q1r32_regroup: dword r of half h = row 16 h + r's four sign bytes. B row kk, byte 4 r' + j
     * (r' = 2 p + s): bit 32 s + 4 kk + j of qword p, which holds rows 2 p (low dword) and 2 p + 1;
     * base: bytes 0, 1, 2, 3, 32, 33, 34, 35 in every qword */
    const __m512i perm0 = _mm512_load_si512((const void *)q1r32_regroup[0]),
                  perm1 = _mm512_load_si512((const void *)q1r32_regroup[1]);
    const __m512i base = _mm512_set1_epi64(0x2322212003020100ll), plus = _mm512_set1_epi8(1),
                  minus = _mm512_set1_epi8(-1);
    for (int64_t q = 0; q < n; q++) {
        const uint8_t *p = w + (q0 + q) / 4 * Q1R32_BLOCK_BYTES;
        if ((q0 + q) % 4 == 0) {
            _mm512_storeu_ps(dfl + q / 4 * 32, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
            _mm512_storeu_ps(dfl + q / 4 * 32 + 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))));
        }
        const uint8_t *s = p + 2 * Q1R32_ROWS + 128 * ((q0 + q) % 4);
        const __m512i a = _mm512_loadu_si512((const void *)s), b = _mm512_loadu_si512((const void *)(s + 64));
        const __m512i rows[2] = {_mm512_permutex2var_epi8(a, perm0, b), _mm512_permutex2var_epi8(a, perm1, b)};
        for (int h = 0; h < 2; h++) {
            int8_t *dst = bt + (q / 2 * 2 + h) * 1024 + q % 2 * 512;
            for (int kk = 0; kk < 8; kk++) {
                const __mmask64 m = _mm512_bitshuffle_epi64_mask(rows[h], _mm512_add_epi8(base, _mm512_set1_epi8((char)(4 * kk))));
                _mm512_store_si512((void *)(dst + 64 * kk), _mm512_mask_blend_epi8(m, minus, plus));
            }
        }
    }
}

/* acc[t] = fma(d dx_t, C[t], acc[t]) for tokens t < n of the C tile stored at c */
TGT_AMX static ALWAYS_INLINE void combine(__m512 *acc, const int32_t *c, __m512 dv, const uint8_t *dxp, int64_t tb,
                                          int n) {
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) {
        if (t >= n) break;
        const __m512 sc = _mm512_mul_ps(dv, _mm512_set1_ps(*(const float *)(dxp + t * tb)));
        acc[t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 16 * t))), acc[t]);
    }
}

/* Q1_0 block qb (q8 blocks 4 qb.., q0 + q = 4 qb) of the slice on tiles C, A, B: its two pairs of
 * q8 blocks, K = 64 each, into one C tile of int32 sums, stored at cb */
#define AMX_BLOCK(C, A, B, q, cb)                                                                          \
    do {                                                                                                   \
        _tile_zero(C);                                                                                     \
        _tile_loadd(A, tok + 32 * (q0 + (q)), tb);                                                         \
        _tile_loadd(B, bt + ((q) + h) * 1024, 64);                                                         \
        _tile_dpbssd(C, A, B);                                                                             \
        _tile_loadd(A, tok + 32 * (q0 + (q) + 2), tb);                                                     \
        _tile_loadd(B, bt + ((q) + 2 + h) * 1024, 64);                                                     \
        _tile_dpbssd(C, A, B);                                                                             \
        _tile_stored(C, cb, 64);                                                                           \
    } while (0)

/* One token tile (n tokens from tok, tb bytes apart) and half h of the group over a slice (ns a
 * multiple of 4). Two Q1_0 blocks a step on their own tiles (0-2 and 3-5) and buffers: tiles are not
 * renamed, so with one set each block's product waited for the last one's store and float steps. */
TGT_AMX static ALWAYS_INLINE void tile_slice(const int8_t *bt, const float *dfl, int32_t *cbuf, const uint8_t *tok,
                                             int64_t tb, int64_t k, int64_t q0, int64_t ns, int h, float *y,
                                             int64_t ys, int n) {
    __m512 acc[16];
    const uint8_t *dxp = tok + k + 4 * (q0 / 4); /* the Q1_0 blocks' activation scales */
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
        acc[t] = q0 == 0 || t >= n ? _mm512_setzero_ps() : _mm512_loadu_ps(y + t * ys + 16 * h);
    int64_t q = 0;
    for (; q + 8 <= ns; q += 8) {
        AMX_BLOCK(0, 1, 2, q, cbuf);
        AMX_BLOCK(3, 4, 5, q + 4, cbuf + 256);
        combine(acc, cbuf, _mm512_loadu_ps(dfl + q / 4 * 32 + 16 * h), dxp + q, tb, n);
        combine(acc, cbuf + 256, _mm512_loadu_ps(dfl + (q / 4 + 1) * 32 + 16 * h), dxp + q + 4, tb, n);
    }
    if (q < ns) {
        AMX_BLOCK(0, 1, 2, q, cbuf);
        combine(acc, cbuf, _mm512_loadu_ps(dfl + q / 4 * 32 + 16 * h), dxp + q, tb, n);
    }
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
        if (t < n) _mm512_storeu_ps(y + t * ys + 16 * h, acc[t]);
}

TGT_AMX void q1r32_tiles_amx(const uint8_t *w, int64_t nb, const uint8_t *tok, int64_t tb, int64_t nt, float *y,
                             int64_t ys, uint8_t *scratch) {
    const int64_t k = nb * QK1_0, nq = k / 32, s = nq < AMX_SLICE ? nq : AMX_SLICE; /* q1r32_tiles_scratch */
    int8_t *bt = (int8_t *)scratch;
    float *dfl = (float *)(scratch + s * 1024);
    int32_t *cbuf = (int32_t *)(dfl + s / 4 * 32);
    int configured = 0;
    for (int64_t q0 = 0; q0 < nq; q0 += AMX_SLICE) {
        const int64_t ns = nq - q0 < AMX_SLICE ? nq - q0 : AMX_SLICE;
        expand_slice(w, q0, ns, bt, dfl);
        for (int64_t t0 = 0; t0 < nt; t0 += 16) {
            const int n = nt - t0 < 16 ? (int)(nt - t0) : 16;
            if (n != configured) {
                tiles_config(n);
                configured = n;
            }
            const uint8_t *tk = tok + t0 * tb;
            float *yt = y + t0 * ys;
            for (int h = 0; h < 2; h++) {
                if (n == 16) tile_slice(bt, dfl, cbuf, tk, tb, k, q0, ns, h, yt, ys, 16);
                else tile_slice(bt, dfl, cbuf, tk, tb, k, q0, ns, h, yt, ys, n);
            }
        }
    }
    if (configured) _tile_release();
}

#endif /* FIC_X86 */
