/* kernels_amx.c - x86-64 AMX (AMX-TILE + AMX-INT8, with AVX-512 VBMI/BITALG): the int8 prefill as
 * tile products. Two kernels: the r32 layout's (the table fic_kernels_avx512_amx in kernels_avx512.c
 * points here), and the unpacked rows' of the other formats (qdot.h's QT layout; qdot_scalar.c's
 * QDOT_AVX512_AMX table points there), below.
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
#include "qdot.h"

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

/* ldtilecfg telling the compiler it reads all 64 bytes: GCC 12's _tile_loadconfig says 8 (an "m"
 * operand of one pointer), so at -O2 the stores of the rest could be, and were, dropped */
TGT_AMX static inline void load_config(const amx_cfg *c) { __asm__ volatile("ldtilecfg %0" ::"m"(*c)); }

#define AMX_SLICE Q1R32_TILES_SLICE /* q8 blocks expanded at a time: 2 x 512 bytes each */
static_assert(AMX_SLICE % (QK1_0 / 32) == 0, "a slice holds whole Q1_0 blocks");

/* Two sets of tiles: 0 and 3 C (n tokens x 16 int32), 1 and 4 A (n tokens x a_bytes int8), 2 and 5
 * B (b_rows x 64 int8: b_rows = a_bytes / 4, the VNNI order) */
TGT_AMX static void config_pairs(int n, int a_bytes) {
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 6; i += 3) {
        c.rows[i] = (uint8_t)n;
        c.colsb[i] = 64;
        c.rows[i + 1] = (uint8_t)n;
        c.colsb[i + 1] = (uint16_t)a_bytes;
        c.rows[i + 2] = (uint8_t)(a_bytes / 4);
        c.colsb[i + 2] = 64;
    }
    load_config(&c);
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
                config_pairs(n, 64); /* K = 64: a pair of q8 blocks */
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

/* ---- the int8 prefill of unpacked rows (qdot.h's qw_row) on tiles ---------------------------
 * Up to 16 unpacked rows (int8 w per 32-block, its float scale fw and offset cw) against nt tokens
 * in the QT layout (qdot.h: per tile of 16 tokens and 32-block, their int8 q, d and s = d sum q).
 * Per 32-block the rows' bytes become one B tile of K = 32 (row kk: for each of the 16 rows its
 * weights 4 kk .. 4 kk + 3, the VNNI order), shared by every token tile; the A tile is the 16
 * tokens' q of the block, 512 contiguous bytes. One tdpbsud (unsigned weights) or tdpbssd (signed:
 * Q8_0) gives the 16 x 16 exact integer sums, then per token acc = fma(sum, fw d, acc),
 * acc = fma(cw, s, acc) in block order: the integers of fic_qdot_dot_ref, the float steps fused and
 * ordered otherwise, so within the float32 bound of it, not its bits. A slice of at most QA_SLICE
 * blocks is expanded at a time on the stack (16 KiB of B tiles; partial sums cross slices through y). */
#define QA_SLICE 32 /* at most; a row's blocks are cut into equal slices (18 blocks: one, not 16 + 2) */
#define QA_B_BYTES 512 /* a block's B tile: 8 rows of 64 bytes */

/* Blocks [b0, b0 + ns) of the rows into B tiles at bt and their fw, cw as 16-float vectors (rows
 * past nr: zero weights and scales). Per block the 16 rows' 32 bytes, two rows a zmm, are
 * transposed as dwords (B row kk = dword kk of every row) in three rounds of unpacks and lane
 * permutes. */
TGT_AMX static void qa_expand(const qw_row *rows, int64_t nr, int64_t b0, int64_t ns, int8_t *bt, float *fwv,
                              float *cwv) {
    const __m512i i0 = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), i1 = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int64_t b = 0; b < ns; b++) {
        const int64_t o = (b0 + b) * 32;
        __m512i z[8], u[8], v[8];
        /* z[i]: rows i (low 256 bits) and i + 8 (high) */
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m256i lo = i < nr ? _mm256_loadu_si256((const __m256i *)(rows[i].w + o)) : _mm256_setzero_si256();
            const __m256i hi = i + 8 < nr ? _mm256_loadu_si256((const __m256i *)(rows[i + 8].w + o)) : _mm256_setzero_si256();
            z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        /* rows i, i + 1 interleaved by dword, then pairs of those by qword: lane L of v[i + c]
         * holds dword 4 (L % 2) + c of rows 4 (i / 4) + 8 (L / 2) + 0..3 */
#pragma GCC unroll 4
        for (int i = 0; i < 8; i += 2) {
            u[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
            u[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
        }
#pragma GCC unroll 2
        for (int i = 0; i < 8; i += 4) {
            v[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]);
            v[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
            v[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]);
            v[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
        }
        /* then lanes in row order: dword c and 4 + c of rows 0-3, 4-7, 8-11, 12-15 */
        int8_t *dst = bt + b * QA_B_BYTES;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            _mm512_store_si512((void *)(dst + 64 * c), _mm512_permutex2var_epi64(v[c], i0, v[4 + c]));
            _mm512_store_si512((void *)(dst + 64 * (4 + c)), _mm512_permutex2var_epi64(v[c], i1, v[4 + c]));
        }
        for (int64_t r = 0; r < 16; r++) {
            fwv[16 * b + r] = r < nr ? rows[r].fw[b0 + b] : 0.0f;
            cwv[16 * b + r] = r < nr ? rows[r].cw[b0 + b] : 0.0f;
        }
    }
}

/* Where a token tile's activations are: the QT layout (qt: the tile's bytes at x, its block j at
 * x + j QT_BLOCK_BYTES) or token rows (x: the tile's first token's row, qrow apart; q[k_total], then
 * d[k_total / 32], then s). The rows' block b is the activations' block j0 + b. Both give the same
 * integers and the same float steps in the same order, so the same bits. */
typedef struct {
    const uint8_t *x;
    int64_t qrow, k_total, j0;
} qa_src;

/* the A tile of the rows' block b and its stride */
#define QA_A_AT(src, b, qt) ((qt) ? (src).x + ((src).j0 + (b)) * QT_BLOCK_BYTES : (src).x + 32 * ((src).j0 + (b)))
#define QA_A_STRIDE(src, qt) ((qt) ? 32 : (src).qrow)

/* block b (of the rows, from the slice's b0) on tiles C, A, B, stored at cb */
#define QA_BLOCK(C, A, B, b, cb, SIGNED)                                                                   \
    do {                                                                                                   \
        _tile_zero(C);                                                                                     \
        _tile_loadd(A, QA_A_AT(src, b0 + (b), qt), QA_A_STRIDE(src, qt));                                 \
        _tile_loadd(B, bt + (b) * QA_B_BYTES, 64);                                                         \
        if (SIGNED) _tile_dpbssd(C, A, B);                                                                 \
        else _tile_dpbsud(C, A, B);                                                                        \
        _tile_stored(C, cb, 64);                                                                           \
    } while (0)

/* acc[t] = fma(C[t], fw d_t, acc[t]); acc[t] = fma(cw, s_t, acc[t]) for tokens t < n of the rows'
 * block gb; signed weights (Q8_0) have no offset (cw = 0): their second step is left out, which
 * leaves acc as it was (s is finite) */
TGT_AMX static ALWAYS_INLINE void qa_combine(__m512 *acc, const int32_t *c, const float *fwv, const float *cwv,
                                             qa_src src, int64_t gb, int n, const int qt, const int is_signed) {
    const __m512 fw = _mm512_load_ps(fwv), cw = _mm512_load_ps(cwv);
    const int64_t j = src.j0 + gb, nbt = src.k_total / 32;
    const float *dq = (const float *)(src.x + j * QT_BLOCK_BYTES + 512); /* QT: d[16], then s[16] */
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) {
        if (t >= n) break;
        const float *dr = (const float *)(src.x + t * src.qrow + src.k_total); /* rows: d[], then s[] */
        const float d = qt ? dq[t] : dr[j], sv = qt ? dq[16 + t] : dr[nbt + j];
        const __m512 sc = _mm512_mul_ps(fw, _mm512_set1_ps(d));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 16 * t))), sc, acc[t]);
        if (!is_signed) acc[t] = _mm512_fmadd_ps(cw, _mm512_set1_ps(sv), acc[t]);
    }
}

/* One token tile (n tokens at src) over a slice's ns blocks from b0, into y (rows live). Pairs of
 * blocks on tiles 0-2 and 3-5, stored to alternate halves of cbuf: a pair's float steps come after
 * the next pair's products are issued. */
TGT_AMX static ALWAYS_INLINE void qa_tile_slice(const int8_t *bt, const float *fwv, const float *cwv, int32_t *cbuf,
                                                qa_src src, int64_t b0, int64_t ns, int first, __mmask16 live,
                                                float *y, int64_t ys, int n, const int is_signed, const int qt) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
        acc[t] = first || t >= n ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(live, y + t * ys);
    int64_t b = 0;
    for (; b + 2 <= ns; b += 2) {
        int32_t *cb = cbuf + (b & 2) * 256;
        QA_BLOCK(0, 1, 2, b, cb, is_signed);
        QA_BLOCK(3, 4, 5, b + 1, cb + 256, is_signed);
        if (b >= 2) {
            const int32_t *pb = cbuf + ((b - 2) & 2) * 256;
            qa_combine(acc, pb, fwv + 16 * (b - 2), cwv + 16 * (b - 2), src, b0 + b - 2, n, qt, is_signed);
            qa_combine(acc, pb + 256, fwv + 16 * (b - 1), cwv + 16 * (b - 1), src, b0 + b - 1, n, qt, is_signed);
        }
    }
    if (b >= 2) {
        const int32_t *pb = cbuf + ((b - 2) & 2) * 256;
        qa_combine(acc, pb, fwv + 16 * (b - 2), cwv + 16 * (b - 2), src, b0 + b - 2, n, qt, is_signed);
        qa_combine(acc, pb + 256, fwv + 16 * (b - 1), cwv + 16 * (b - 1), src, b0 + b - 1, n, qt, is_signed);
    }
    if (b < ns) {
        QA_BLOCK(0, 1, 2, b, cbuf, is_signed);
        qa_combine(acc, cbuf, fwv + 16 * b, cwv + 16 * b, src, b0 + b, n, qt, is_signed);
    }
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
        if (t < n) _mm512_mask_storeu_ps(y + t * ys, live, acc[t]);
}

/* The rows against nt tokens: src for the first token tile, the next one step bytes on. */
TGT_AMX static ALWAYS_INLINE void qa_dot(const qw_row *rows, int64_t nr, qa_src src, int64_t step, int64_t nt,
                                         float *y, int64_t ys, int accumulate, const int is_signed, const int qt) {
    const int64_t nb = rows[0].k / 32;
    int8_t bt[QA_SLICE * QA_B_BYTES] __attribute__((aligned(64)));
    float fwv[QA_SLICE * 16] __attribute__((aligned(64))), cwv[QA_SLICE * 16] __attribute__((aligned(64)));
    int32_t cbuf[1024] __attribute__((aligned(64)));
    const __mmask16 live = (__mmask16)((1u << nr) - 1);
    int configured = 0;
    const int64_t n_slices = (nb + QA_SLICE - 1) / QA_SLICE, per = (nb + n_slices - 1) / n_slices;
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
        const int64_t ns = nb - b0 < per ? nb - b0 : per;
        qa_expand(rows, nr, b0, ns, bt, fwv, cwv);
        for (int64_t t0 = 0; t0 < nt; t0 += 16) {
            const int n = nt - t0 < 16 ? (int)(nt - t0) : 16, first = b0 == 0 && !accumulate;
            qa_src tile = src;
            tile.x += t0 / 16 * step;
            if (n != configured) {
                config_pairs(n, 32); /* K = 32: one block */
                configured = n;
            }
            if (n == 16) qa_tile_slice(bt, fwv, cwv, cbuf, tile, b0, ns, first, live, y + t0 * ys, ys, 16, is_signed, qt);
            else qa_tile_slice(bt, fwv, cwv, cbuf, tile, b0, ns, first, live, y + t0 * ys, ys, n, is_signed, qt);
        }
    }
    if (configured) _tile_release();
}

TGT_AMX void fic_qdot_tiles_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *tiles, int64_t tile_bytes,
                                    int64_t nt, float *y, int64_t ys, int accumulate) {
    const qa_src src = {tiles, 0, 0, 0};
    if (rows[0].is_signed) qa_dot(rows, nr, src, tile_bytes, nt, y, ys, accumulate, 1, 1);
    else qa_dot(rows, nr, src, tile_bytes, nt, y, ys, accumulate, 0, 1);
}

TGT_AMX void fic_qdot_part_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t k_total,
                                   int64_t j0, int64_t nt, float *y, int64_t ys, int accumulate) {
    const qa_src src = {xq, qrow, k_total, j0};
    if (rows[0].isc != NULL) fic_qdot_dot_avx2(rows, nr, xq, qrow, nt, y, ys, accumulate); /* j0 0: the whole row */
    else if (rows[0].is_signed) qa_dot(rows, nr, src, 16 * qrow, nt, y, ys, accumulate, 1, 0);
    else qa_dot(rows, nr, src, 16 * qrow, nt, y, ys, accumulate, 0, 0);
}

TGT_AMX void fic_qdot_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                              int64_t ys, int accumulate) {
    fic_qdot_part_dot_amx(rows, nr, xq, qrow, rows[0].k, 0, nt, y, ys, accumulate);
}

#endif /* FIC_X86 */
