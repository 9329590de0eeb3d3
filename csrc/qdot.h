/* qdot.h - internal: prefill (t > 1) products of quantized weights and int8 activations, as
 * llama.cpp does them: x is quantized once per call to q8 blocks of 32 and every weight block is
 * multiplied with integer dot products (AVX2 maddubs/madd, AMX tiles, NEON sdot, a scalar reference).
 *
 * Activations, per token (QX_ROW_BYTES(k) bytes, k a multiple of 32):
 *   int8 q[k] | float d[k/32] | float s[k/32]
 *   d = amax/127 of the block (fp32, where ggml rounds it to fp16), q = round-to-nearest-even(x/d),
 *   s = d * sum(q). One quantizer per architecture, all bit-identical (same float ops, same rounding).
 *   K-quants use these 32-blocks too (not q8_K's 256): their sub-blocks are 32 (Q4_K) or 16 (Q6_K)
 *   weights with their own scale, so a 32-block activation scale costs nothing in accuracy.
 *
 * Weights: a row is first unpacked (portable C, once per row and call, shared by all tokens) to
 *   int8 w[k] | float fw[k/32] | float cw[k/32] | int8 isc[2 k/32] (Q6_K only)
 * such that weight j of 32-block b is fw[b] * isc[2b + (j >= 16)] * w[j] + cw[b] (isc 1 when
 * absent); w is in 0..63 (unsigned formats) or -128..127 (Q8_0, Q6_K: `is_signed`). Then a row
 * times a token is
 *   sum_b ( fw_b d_b (isc_2b sum_{j<16} w_j q_j + isc_2b+1 sum_{j>=16} w_j q_j)  +  cw_b s_b )
 * with exact integer inner sums. The per-architecture part is only the quantizer and that sum. */
#ifndef FIC_QDOT_H
#define FIC_QDOT_H

#include <stdint.h>

#include "fic.h"
#include "kernels.h"
#include "pool.h"

#define QX_BLOCK 32
#define QX_ROW_BYTES(k) ((k) + 8 * ((k) / QX_BLOCK))
/* an unpacked weight row: w[k] padded to 32, fw, cw, isc, and slack for alignment */
#define QW_ROW_BYTES(k) ((((k) + 31) / 32 * 32) + 10 * ((k) / QX_BLOCK) + 64)
/* rows unpacked at a time per thread: each token's activations are then read once for them;
 * a kernel may take up to QW_ROWS_MAX (qdot_kernels.rows: AMX's tiles hold 16) */
#define QW_ROWS 8
#define QW_ROWS_MAX 16

typedef struct {
    const int8_t *w;
    const float *fw, *cw;
    const int8_t *isc; /* NULL: every sub-block scale is 1 */
    int64_t k;
    int is_signed;
} qw_row;

/* Quantize one token's k floats (k a multiple of 32) to dst (QX_ROW_BYTES(k)). */
typedef void (*qx_quantize_fn)(const float *x, int64_t k, uint8_t *dst);
/* For rows r < nr (all of one format and k) and tokens i < nt (token i's activations at
 * xq + i * qrow): y[i * ys + r] = row_r . x_i, plus the old value when accumulate != 0. */
typedef void (*qw_dot_fn)(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                          int64_t ys, int accumulate);

/* Q1_0's own int8 path (Q1_0 rows are read as they are, no unpacking). Activations per
 * 128-weight block, Q1X_BLOCK_BYTES: int8 q[128] | float a[8] | float c[8]. q holds the same
 * values as the quantizer above (q8 blocks of 32, bit-identical) permuted so that one nibble
 * lookup per 32 weights turns the block's sign bytes into 0/1 bytes in q's order: vector v
 * (bytes 32v..32v+31) holds in its low half weight 8i + 2v (i = 0..15), in its high half weight
 * 8i + 2v + 1, i.e. bit 2v (2v + 1) of sign byte i. Byte i belongs to q8 block i / 4 in both
 * halves, so the four maddubs(0/1, q) of a block add in int16 (at most 4 x 254) and one madd
 * gives 8 int32 lanes, lane l summing q over set bits in half of q8 block l % 4. With
 * sum s x = 2 sum_{bit set} x - sum x (s = +-1): block . x = d_w sum_l (lane_l a_l + c_l), with
 * a_l = 2 d_{l%4} and c_l = -d_l sum(q_l) for l < 4, 0 above (d and d sum(q) as the quantizer's). */
#define Q1X_BLOCK_BYTES 192
#define Q1X_ROW_BYTES(k) ((k) / 128 * Q1X_BLOCK_BYTES)
/* x (k floats, k a multiple of 128) -> dst (Q1X_ROW_BYTES(k)) */
typedef void (*q1x_quantize_fn)(const float *x, int64_t k, uint8_t *dst);
/* For Q1_0 rows r < nr (row r at w + r * rb, k weights) and tokens i < nt (at xq + i * qrow, as
 * q1x_quantize writes them): y[i * ys + r] = row_r . x_i, plus the old value when accumulate. */
typedef void (*q1_dot_fn)(const uint8_t *w, int64_t rb, int64_t nr, int64_t k, const uint8_t *xq, int64_t qrow,
                          int64_t nt, float *y, int64_t ys, int accumulate);

/* x for the r32 layout (q1r32.c), per token: int8 q[k] | float d[k/128], one scale per Q1_0
 * block (d = amax/127 over its 128 weights, q = round-to-nearest-even(x/d), as the quantizer above
 * but over 128): the four q8 blocks' integer sums of a Q1_0 block then add up before one float step,
 * as llama.cpp's q8_K (256) does for the K-quants. Fits in QX_ROW_BYTES(k); d at dst + k. */
#define Q1R32_XQ_BYTES(k) ((k) + 4 * ((k) / QK1_0))
/* The r32 matvec's tables of k int8 x and its k / 32 corrections (q1r32.c, kern_q1r32_fn). */
typedef void (*q1r32_tables_fn)(const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx);

/* AMX-INT8's layout of a chunk of nt tokens (QT_*): the tokens in tiles of 16 (the last one padded,
 * its padding never read), per tile and 32-block QT_BLOCK_BYTES: the 16 tokens' q as in the layout
 * above (32 bytes a token: the block's A tile, 8 cache lines), then their 16 d, then their 16 s,
 * so a tile product reads contiguous bytes and its float step broadcasts from two cache lines. */
#define QT_BLOCK_BYTES 640
#define QT_TILE_BYTES(k) ((k) / QX_BLOCK * QT_BLOCK_BYTES)
#define QT_CHUNK_BYTES(k, nt) (((nt) + 15) / 16 * QT_TILE_BYTES(k))
/* Token i of the chunk (k floats) quantized (as qx_quantize_fn, the same bits) into its places in tiles. */
typedef void (*qt_quantize_fn)(const float *x, int64_t k, int64_t i, uint8_t *tiles);
/* As qw_dot_fn with the tokens in the QT layout (rows without sub-block scales: isc NULL): the rows'
 * k weights against blocks 0 .. k / 32 of tiles tile_bytes apart (QT_TILE_BYTES of the quantized
 * rows' length, which may be longer: an expert's part of the FFN's h starts at a block of it). */
typedef void (*qt_dot_fn)(const qw_row *rows, int64_t nr, const uint8_t *tiles, int64_t tile_bytes, int64_t nt,
                          float *y, int64_t ys, int accumulate);

/* As qt_dot_fn's bits from token rows (qw_dot_fn's layout, rows of k_total weights a token), the
 * rows' k weights against the activations' blocks j0 on: where the QT layout did not fit the
 * workspace, so that the arithmetic does not depend on the workspace's size. */
typedef void (*qp_dot_fn)(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t k_total, int64_t j0,
                          int64_t nt, float *y, int64_t ys, int accumulate);

typedef struct {
    qx_quantize_fn quantize;
    qw_dot_fn dot;
    q1x_quantize_fn q1_quantize; /* NULL: Q1_0 goes through the unpacked rows like the others */
    q1_dot_fn q1_dot;
    q1r32_tables_fn q1r32_tables; /* NULL: q1r32_build_tables, the scalar builder */
    qx_quantize_fn q1r32_quantize; /* x for the r32 layout (Q1R32_XQ_BYTES) */
    int rows;                      /* unpacked rows per dot call it is best given, at most QW_ROWS_MAX */
    qt_quantize_fn tiles_quantize; /* NULL: no QT layout; else formats but Q6_K take it and tiles_dot */
    qt_dot_fn tiles_dot;
    qp_dot_fn part_dot;            /* NULL, or (with tiles_dot) the same bits from token rows */
} qdot_kernels;

/* 1 when kern multiplies fmt's unpacked rows through the QT layout (qdot_kernels.tiles_dot) */
static inline int qdot_tiles_for(const qdot_kernels *kern, int fmt) { return kern->tiles_dot != NULL && fmt != FIC_Q6_K; }

/* The r32 layout's prefill by the matvec's tables (q1r32.c): one token's x (k floats) quantized
 * and tabled into tok (q1r32_tok_bytes(k), 64-byte aligned), then one group of 32 rows (k weights
 * each, r32) against it: y[0..32) = the rows . x, the matvec's bits. */
int64_t q1r32_tok_bytes(int64_t k);
void q1r32_tok_prep(const qdot_kernels *qk, const float *x, int64_t k, uint8_t *tok);
/* The same for nt tokens at once, by kt's tile kernel where it has one (kern_q1r32_tiles_fn), else
 * a token at a time as above: q1r32_toks_bytes(kt, k) a token (tb, 64-byte aligned), prepared by
 * q1r32_toks_prep; y[i ys + r] for r < 32, i < nt; scratch: q1r32_toks_scratch(kt, k) bytes (or
 * more: k the longest rows the scratch serves), the calling thread's, 64-byte aligned. */
int64_t q1r32_toks_bytes(const fic_kernels *kt, int64_t k);
int64_t q1r32_toks_scratch(const fic_kernels *kt, int64_t k);
void q1r32_toks_prep(const fic_kernels *kt, const qdot_kernels *qk, const float *x, int64_t k, uint8_t *tok);
void q1r32_toks_group(const fic_kernels *kt, const uint8_t *group, int64_t k, const uint8_t *tok, int64_t tb,
                      int64_t nt, float *y, int64_t ys, uint8_t *scratch);
void q1r32_tok_group(const fic_kernels *kt, const uint8_t *group, int64_t k, const uint8_t *tok, float *y);

/* 1 for the formats with an int8 path: Q1_0, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K. */
int fic_qdot_fmt_ok(int fmt);
/* The kernels of a resolved implementation (REF, AVX2, AVX512 -> the AVX2 code, with the r32
 * tables built by AVX-512 VBMI where the CPU has it, NEON). */
const qdot_kernels *fic_qdot_kernels(int impl);
/* Rows 32 g .. 32 g + 31 of a Q1_0 matrix in the r32 layout (fic.h; k weights a row) back into 32
 * row-major rows (q1r32.c): the r32 prefill runs Q1_0's own kernel on them. */
void q1r32_group_rows(const uint8_t *w, int64_t k, int64_t g, uint8_t *rows);
/* Unpack row `src` of k weights in fmt into buf (QW_ROW_BYTES(k), 32-byte aligned). */
void fic_qdot_unpack(int fmt, const uint8_t *src, int64_t k, uint8_t *buf, qw_row *out);
/* Rows cut into pieces (an FFN's down columns, expert after expert): piece [off, off + k) of an
 * unpacked row of k_total weights in buf (off, k multiples of 32; src NULL: zeros, not read),
 * and the row's pointers once every piece is there. */
void fic_qdot_unpack_piece(int fmt, const uint8_t *src, int64_t k, uint8_t *buf, int64_t k_total, int64_t off);
void fic_qdot_row(int fmt, uint8_t *buf, int64_t k, qw_row *out);

void fic_qdot_quantize_ref(const float *x, int64_t k, uint8_t *dst);
void fic_q1r32_quantize_ref(const float *x, int64_t k, uint8_t *dst);
void fic_qdot_dot_ref(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                      int64_t ys, int accumulate);
void fic_q1x_quantize_ref(const float *x, int64_t k, uint8_t *dst);
void fic_q1_dot_ref(const uint8_t *w, int64_t rb, int64_t nr, int64_t k, const uint8_t *xq, int64_t qrow, int64_t nt,
                    float *y, int64_t ys, int accumulate);
#if defined(__x86_64__)
void fic_q1x_quantize_avx2(const float *x, int64_t k, uint8_t *dst);
void fic_q1_dot_avx2(const uint8_t *w, int64_t rb, int64_t nr, int64_t k, const uint8_t *xq, int64_t qrow, int64_t nt,
                     float *y, int64_t ys, int accumulate);
void fic_qdot_quantize_avx2(const float *x, int64_t k, uint8_t *dst);
void fic_q1r32_quantize_avx2(const float *x, int64_t k, uint8_t *dst);
void q1r32_build_tables_avx512(const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx); /* VBMI */
void fic_qdot_dot_avx2(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                       int64_t ys, int accumulate);
void fic_qdot_quantize_tiles_avx2(const float *x, int64_t k, int64_t i, uint8_t *tiles);
/* AMX-INT8 tiles (kernels_amx.c), nr <= QW_ROWS_MAX; only where fic_cpu_features says amx_int8. The
 * three give the same bits; rows with sub-block scales (Q6_K, isc) go to fic_qdot_dot_avx2 from dot
 * (and from part_dot when j0 is 0), and are never given to tiles_dot. */
void fic_qdot_tiles_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *tiles, int64_t tile_bytes, int64_t nt,
                            float *y, int64_t ys, int accumulate);
void fic_qdot_part_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t k_total, int64_t j0,
                           int64_t nt, float *y, int64_t ys, int accumulate);
void fic_qdot_dot_amx(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                      int64_t ys, int accumulate);
#endif
#if defined(__aarch64__)
void fic_qdot_quantize_neon(const float *x, int64_t k, uint8_t *dst);
void fic_qdot_dot_neon(const qw_row *rows, int64_t nr, const uint8_t *xq, int64_t qrow, int64_t nt, float *y,
                       int64_t ys, int accumulate);
#endif

/* y[t][m] = x[t][k] W^T through the int8 path (fmt must pass fic_qdot_fmt_ok, arguments checked
 * by the caller). Uses only ws (ws_bytes >= qdot_matmul_ws_min(n_threads, k)): tokens are taken
 * in chunks that fit beside one unpacked row per thread. FIC_ERR_WORKSPACE if not even one does. */
int fic_qdot_matmul(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y, int64_t t,
                    int64_t m, int64_t k, void *ws, int64_t ws_bytes);


/* ---- the expert FFN's prefill phases (ffn.c's t > 1 path, qdot_ffn.c) ----
 * The arguments ffn.c has already checked and laid out (see ffn.c for their meaning). */
typedef struct {
    int impl, gate_fmt, up_fmt, down_fmt;
    int64_t d, t, n_experts, n_total, n_max;
    const uint8_t *const *bundles;
    const int32_t *n;
    const int64_t *off;   /* off[e] = n_0 + ... + n_{e-1} */
    const uint8_t *skip;  /* coef is 0 for every token */
    const int64_t *rb_d;  /* down row bytes per expert (columns) */
    int64_t rb_g, rb_u;
    const float *coef, *x;
    float *y, *h;
    int64_t *acc; /* FIC_FFN_FIXED: y's fixed-point sums instead (fic.h), each expert added alone */
    void (*fixed_add)(const float *c, int64_t *acc, int64_t n); /* acc[i] += fix(c[i]) (kernels.h) */
} qdot_ffn;

/* Phase 1, h_e[i][n] = coef silu(gate_e[n] . x_i) (up_e[n] . x_i) (gate and up formats must pass
 * fic_qdot_fmt_ok), and phase 2 with the down parts as columns, y[i] += sum_e down_e h_e[i]
 * (down format likewise). ws: the FFN's per-call workspace after its tables. */
int fic_qdot_ffn_phase1(fic_pool *pool, const qdot_ffn *a, uint8_t *ws, int64_t ws_bytes);
/* 1 when fic_qdot_ffn_down_cols can sum into a->acc (each expert's products alone): Q1_0 through its
 * own kernels, the formats of the QT layout (AMX) expert by expert; the others multiply one row of
 * all experts at once. down_cols may still answer FIC_ERR_UNSUPPORTED for the QT formats (a
 * workspace of fewer than 16 tokens): the caller then multiplies in float. */
int fic_qdot_down_fixed_ok(const qdot_ffn *a);
int fic_qdot_ffn_down_cols(fic_pool *pool, const qdot_ffn *a, uint8_t *ws, int64_t ws_bytes);

#endif /* FIC_QDOT_H */
