/* kernels.h - internal: what the kernels' files share. The job description (job_t), the
 * workspace sizes, the FFN call's state (ffn_t), and the table from format to kernels, ggml's
 * type traits in shape: one const fic_kernels per architecture (kernels_scalar.c, kernels_avx2.c,
 * kernels_avx512.c, kernels_neon.c), chosen per call by fic_kernels_for (kernels.c) from the CPU
 * features pool.c resolves once. Entry points (matvec.c, ffn.c) then call through the table: no
 * switch on the format per row, no CPU query per call.
 *
 * Each architecture's file is compiled on every build and is empty where its architecture is not
 * the target's; x86 fast paths carry per-function target attributes (the build has no -mavx2,
 * so one binary runs on any x86-64 CPU). */
#ifndef FIC_KERNELS_H
#define FIC_KERNELS_H

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "fic.h"
#include "pool.h"

#if defined(__x86_64__)
#define FIC_X86 1
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define TGT_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TGT_AVX512Q1 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg,avx512vbmi,avx2,fma,f16c")))
#define TGT_AVX512Q4VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")))
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define MAX_BW 256 /* largest block, in weights (a K-quant super-block) */

/* ---- shared job description ------------------------------------------------------------- */

typedef struct job_s {
    int fmt, impl;
    const uint8_t *w;
    const float *x;    /* matvec: x[k]; matmul: x[t][k] */
    const float *a;    /* accum_rows: a[n_rows] */
    float *y;
    int64_t t, m, k, row_bytes, bw, bb;
    const float *xsum; /* per-block sums of x (Q4_1, Q1_0), or NULL */
    const int8_t *xq;  /* x quantized to int8 in blocks of 32 (Q1_0 on AVX2: in bit-plane order, 2 bytes
                          per weight, see dot_q1_avx2; Q4 on VNNI), or NULL */
    const float *xscale16; /* per int32 lane of the int8 sums: the scale of its xq block (Q4 on VNNI: 16
                              lanes per 128 weights, a lane 4 low-half and 4 high-half weights of a
                              block, see q4_quad_vnni); Q1_0 on AVX2: 8 lanes per 128 weights */
    const float *xcorr16;  /* Q4 int8 path: per lane, dx * its 8 weights' sum of xq (x -8 for Q4_0);
                              Q1_0 on AVX-512: -1024 dx per lane; on AVX2 see dot_q1_avx2 */
    const uint8_t *xu;     /* Q1_0 on AVX-512: xq + 128 as u8, or x's bit planes (q1_planes) */
    int q4_int8;           /* Q4_0/Q4_1 on AVX-512 VNNI: xq is in the quad layout (see below) */
    int q1_planes;         /* Q1_0 on AVX-512 with VNNI/BITALG/VBMI: xu holds x's bit planes,
                              xscale16 2 dx and xcorr16 -dx sum(xq) per q8 block (see below) */
    int exact;             /* float activations asked for (FIC_IMPL_EXACT): prep_x skips XP_Q8 */
    int stream_pf;         /* the dot prefetches its row's stream itself (stream_prefetch; matvec's
                              long rows, where the table's dot_prefetches says it can) */
    float *scratch;    /* matmul: per-thread tile of rows */
    int64_t scratch_floats, tile_rows;
    const struct fic_kernels *kt;     /* the implementation's kernel table (fic_kernels_for) */
    const struct fic_fmt_kernels *kf; /* &kt->fmt[fmt]: this format's kernels */
} job_t;

/* The common part of a job: what every kernel reads before its own per-call preparation. kt is
 * the implementation's table (fic_kernels_for), resolved once per call by the entry point. */
static inline void init_job(job_t *j, const struct fic_kernels *kt, int fmt, const uint8_t *w, const float *x,
                            float *y, int64_t t, int64_t m, int64_t k);

static inline int fmt_ok(int fmt) { return fmt >= 0 && fmt < FIC_FMT_COUNT; }

/* ---- workspace sizes: the formulas documented in fic.h -------------------------------------- */

static_assert(sizeof(job_t) <= 256, "fic.h promises a per-expert record of at most 256 bytes");

#define WS_MAX_DIM ((int64_t)1 << 36) /* t, k, experts, neurons: keeps every product in int64 */
#define WS_MAX_THREADS (1 << 16)
#define TILE_BYTES (256 << 10) /* dequantized rows per tile: stay in L2 while tokens stream past */
#define SEG_FLOATS 512         /* a dequantized row piece, in L1 */

static inline int64_t ws_round64(int64_t b) { return (b + 63) / 64 * 64; }

/* Rows per tile of dequantized k-weight rows: ~TILE_BYTES of floats, a multiple of the 6-row
 * register block, 6 to 60 rows. */
static inline int64_t clamp_tile(int64_t k) {
    int64_t tile = TILE_BYTES / (4 * k);
    return tile < 6 ? 6 : tile > 60 ? 60 : tile / 6 * 6;
}

/* Prefill in panels (pack_panels, matvec.c): a tile's rows dequantized into panels of PANEL_ROWS
 * rows, each stored k-major (panel[kk][0..PANEL_ROWS)), so a register-blocked kernel loads a
 * column of 16 weights as two vectors and broadcasts one activation per token (outer products,
 * no horizontal sums). Used from PANEL_MIN_T tokens, where packing is paid back, and when a tile
 * holds at least one panel; its tiles are clamp_tile rounded down to whole panels, so the
 * workspace formulas of fic.h are unchanged. */
#define PANEL_ROWS 16
#define PANEL_MIN_T 4 /* uses_panels and tile_rows_for (rows per tile) are below the table */

/* F(k) of fic.h: clamp_tile(k) * k <= F(k), and F grows with k. */
static inline int64_t ws_tile_floats(int64_t k) {
    const int64_t a = 60 * k < TILE_BYTES / 4 ? 60 * k : TILE_BYTES / 4;
    return a > 6 * k ? a : 6 * k;
}

static inline int ws_dim_ok(int64_t v) { return v >= 0 && v <= WS_MAX_DIM; }

/* Bytes each kernel needs (fic.h), or -1 when a size is out of range. */
static inline int64_t ws_matvec(int64_t k) { return ws_dim_ok(k) ? ws_round64(10 * k) : -1; }

static inline int64_t ws_matmul(int n_threads, int64_t k) {
    if (n_threads < 1 || n_threads > WS_MAX_THREADS || !ws_dim_ok(k)) return -1;
    return n_threads * ws_round64(4 * ws_tile_floats(k));
}

/* experts_ffn: the bundle pointers (slots), then the per-expert tables (ffn.c). */
static inline int64_t ws_ffn_ptrs(int64_t e) { return ws_round64(8 * e); }
static inline int64_t ws_ffn_tables(int64_t e) { return ws_round64(e * (17 + (int64_t)sizeof(job_t)) + 8); }

/* t > 1: room for the int8 path's activations of t tokens of m weights (qdot.h's QX_ROW_BYTES(m) <=
 * 5 m / 4 + 8 bytes a token), so that a prefill call quantizes x, then h, once for all its tokens
 * and reads each weight row once; without it the token chunks were ~64 tokens of a 512-token call
 * and Qwen2.5-Coder-1.5B's down pieces were unpacked 8 times (bench/RESULTS.md). At most
 * WS_ACT_CAP bytes: an MoE call of many experts takes chunks instead. */
#define WS_ACT_CAP ((int64_t)8 << 20)
static inline int64_t ws_ffn_act(int64_t t, int64_t m) {
    const int64_t per = m + m / 4 + 8;
    return t > WS_ACT_CAP / per ? WS_ACT_CAP : ws_round64(t * per);
}

static inline int64_t ws_ffn(int n_threads, int64_t t, int64_t d, int64_t e, int64_t n) {
    if (n_threads < 1 || n_threads > WS_MAX_THREADS || !ws_dim_ok(t) || !ws_dim_ok(d) || !ws_dim_ok(e) ||
        !ws_dim_ok(n))
        return -1;
    if (e == 0 || t == 0) return 0;
    const int64_t fixed = ws_ffn_ptrs(e) + ws_ffn_tables(e);
    /* t = 1: row-major formats use 2 A(3 d) + A(3 n) + 64 e, and phase 2 by experts (ffn.c) the other
     * threads' fixed-point sums; the r32 layout (q1r32_ffn_t1) its four areas */
    if (t == 1)
        return fixed + ws_round64(3 * d) + ws_round64(8 * d) + ws_round64(2 * n) + ws_round64(8 * n) + 64 * e +
               (n_threads - 1) * ws_round64(8 * d);
    int64_t f = ws_tile_floats(d), fn = ws_tile_floats(n);
    f = f > fn ? f : fn;
    f = f > SEG_FLOATS ? f : SEG_FLOATS;
    return fixed + n_threads * ws_round64(4 * (f + 60 * t)) + ws_ffn_act(t, d > n ? d : n);
}

/* FIC_OK when ws (64-byte aligned, or NULL with 0 bytes) holds need bytes. */
static inline int ws_check(const void *ws, int64_t ws_bytes, int64_t need) {
    if (need < 0 || ws_bytes < 0) return FIC_ERR_ARG;
    if (ws == NULL ? ws_bytes != 0 : ((uintptr_t)ws & 63) != 0) return FIC_ERR_ARG;
    return ws_bytes >= need ? FIC_OK : FIC_ERR_WORKSPACE;
}


/* ---- the table from format to kernels ---------------------------------------------------- */

struct ffn_s;

/* Activation preparation, done once per vector x (matvec: once per call) by prep_x (kernels.c):
 *   XP_SUMS      per-block sums of x (float fast paths of Q4_1, and of Q1_0 on NEON); for Q4_K per
 *                sub-block of 32 (its mins apply per sub-block; see xsum_width)
 *   XP_Q1_AVX2   x -> int8 q8 blocks + lane scales + corrections (Q1_0 on AVX2, dot_q1_avx2)
 *   XP_Q1_AVX512 x -> u8 q8 blocks + scales + corrections (Q1_0 on AVX-512, q1_block_sad)
 *   XP_Q1_PLANES x -> bit planes of its q8 blocks + scales + corrections (Q1_0 on AVX-512 with
 *                VNNI/BITALG/VBMI, dot_q1_planes)
 *   XP_Q4_VNNI   x -> int8 in the quad layout (Q4_0/Q4_1 on AVX-512 VNNI, k >= 64)
 *   XP_Q8        x -> qdot.h's activation row, int8 q8 blocks of 32 + d + d sum(q) per block
 *                (Q4_0/Q4_1/Q8_0 on AVX2: xq, xscale16 = d, xcorr16 = d sum(q))
 * A job with `exact` set takes xprep_small instead of XP_Q8 and XP_Q4_VNNI (float activations;
 * FIC_IMPL_EXACT); Q1_0 has int8 kernels only. */
enum { XP_NONE, XP_SUMS, XP_Q1_AVX2, XP_Q1_AVX512, XP_Q1_PLANES, XP_Q4_VNNI, XP_Q8 };

typedef float (*kern_dot_fn)(const job_t *j, const uint8_t *row, const float *x);
typedef void (*kern_dot2_fn)(const job_t *j, const uint8_t *row0, float *y);
typedef void (*kern_deq_fn)(const uint8_t *row, int64_t b0, int64_t b1, float *out);
typedef int (*kern_axpy_blocks_fn)(const uint8_t *row, int64_t b0, int64_t b1, float a, float *y);
typedef void (*kern_accum_fn)(const job_t *j, int64_t b0, int64_t b1);
typedef int (*kern_rows_fn)(const job_t *j, const uint8_t *base, int64_t rb, int64_t r0, int64_t r1, int64_t r_pf,
                            float *out);
typedef int (*kern_down_cols_fn)(const struct ffn_s *f, int64_t r0, int64_t r1);
typedef void (*kern_axpy_fn)(float a, const float *w, float *y, int64_t n);
typedef void (*kern_gemm_tile_fn)(const job_t *j, const float *tile, int64_t nr, int64_t r0);
typedef void (*kern_gemm_panel_fn)(const job_t *j, const float *panels, int64_t nr, int64_t r0);
typedef void (*kern_fixed_add_fn)(const float *c, int64_t *acc, int64_t n);
/* Eight dequantized rows into a panel's half: dst[kk * PANEL_ROWS + i] = src[i * ld + kk], i < 8,
 * kk < n, n a multiple of 8 (pack_panels). */
typedef void (*kern_pack8_fn)(const float *src, int64_t ld, int64_t n, float *dst);
/* The FFN's gating: h[k] = c * silu(h[k]) * u[k], k < n (silu(g) = g / (1 + e^-g)). */
typedef void (*kern_silu_mul_fn)(float c, float *h, const float *u, int64_t n);
/* The Q1_0 r32 layout (fic.h): per group of 32 rows and per block of 128 weights, the 32 rows' d
 * (fp16, row order), then for each of the block's 16 sign bytes i the 32 rows' byte i. */
#define Q1R32_ROWS 32
#define Q1R32_BLOCK_BYTES (Q1R32_ROWS * (2 + QK1_0 / 8)) /* 576: the same bytes as 32 blocks */
#define Q1R32_TAB_BYTES 32                               /* table bytes per 4 weights */
#define Q1R32_TAB_H 128 /* from a group's L table to its H table */
/* Where 4-weight group g's L table lies in a token's tables (its H table Q1R32_TAB_H on): per q8
 * block of 32 weights (8 groups, 256 bytes) the L tables of the even groups (the low nibbles of the
 * block's 4 sign bytes), then of the odd groups (the high nibbles), then the H tables in the same
 * order, so that one 64-byte load holds the tables of one nibble of all 4 sign bytes
 * (q1r32_avx512's vpermb). */
static inline int64_t q1r32_tab_at(int64_t g) { return (g >> 3) * 256 + (g & 1) * 64 + ((g >> 1) & 3) * 16; }
/* Q1_0 rows in groups of 32 (q1r32.c): y[32 g + r] for groups g0 <= g < g1 of w (nb blocks of 128
 * weights per row), by lookups in tab scaled by dx (per 128 weights). With x = 16 h + l (l = x & 15,
 * h = x >> 4 in -8..7), tab holds per 4 weights the 16 sums over the set bits t of n of l_t (16
 * bytes, 0..60, at q1r32_tab_at), and of h_t plus 32 (16 bytes, 0..60, Q1R32_TAB_H on): four
 * lookups of either add up in a byte.
 * cx[b] = 8192 + sum of q8 block b's xq undoes the bits' 0/1 (a weight is -1 or +1) and the bias. */
typedef void (*kern_q1r32_fn)(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx, const float *dx,
                              float *y, int64_t g0, int64_t g1);
/* One group of 32 Q1_0 rows of nb blocks between the layouts (q1r32.c): from row-major rows to the
 * r32 group (to_r32 != 0), or back; from and to do not overlap. */
typedef void (*kern_q1r32_move_fn)(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32);
/* Prefill: one group of 32 r32 rows (w, nb blocks of 128) against nt tokens (token i at tok + i tb,
 * tb a multiple of 64: k int8 x, then k / 128 float dx, as qdot.h's q1r32_quantize writes them):
 * y[i ys + r] for r < 32, each token's matvec bits (q1r32_ref's). scratch: q1r32_tiles_scratch(k)
 * bytes, 64-byte aligned, the calling thread's. */
typedef void (*kern_q1r32_tiles_fn)(const uint8_t *w, int64_t nb, const uint8_t *tok, int64_t tb, int64_t nt,
                                    float *y, int64_t ys, uint8_t *scratch);
#define Q1R32_TILES_SLICE 16 /* q8 blocks of sign bits expanded at a time (16 KiB of B tiles) */
/* kern_q1r32_tiles_fn's scratch for rows of k weights: a slice's B tiles (1 KiB a q8 block), its
 * rows' d (128 bytes a Q1_0 block) and two C tiles; it grows with k up to 18,944 bytes, so small
 * matrices fit the workspace formulas of fic.h */
static inline int64_t q1r32_tiles_scratch(int64_t k) {
    const int64_t s = k / 32 < Q1R32_TILES_SLICE ? k / 32 : Q1R32_TILES_SLICE;
    return s * 1024 + s / 4 * 128 + 2048;
}

/* One format's kernels on one implementation. dot and deq are always set; the others are
 * optional fast paths (NULL: the generic code in kernels.c, matvec.c and ffn.c). */
typedef struct fic_fmt_kernels {
    int block_weights, block_bytes; /* the format's block (fic_fmt_block_weights / _bytes) */
    int xprep;                      /* XP_*: how dot wants x prepared */
    int xprep_small;                /* XP_* when x is too short for xprep (see prep_x_mode) */
    kern_dot_fn dot;                /* row . x, x prepared as xprep says */
    kern_dot2_fn dot2;              /* rows row0 and row0 + j->row_bytes against one x, into y[0..2) */
    kern_deq_fn deq;                /* blocks [b0, b1) of a row -> float */
    kern_axpy_blocks_fn axpy_blocks; /* y += a * blocks [b0, b1), dequantized in registers; 0: not done */
    kern_accum_fn accum;            /* accum_rows over block columns [b0, b1) of every row */
    kern_rows_fn rows;              /* FFN phase 1 rows [r0, r1) with the phase's prefetch; 0: not done */
    kern_down_cols_fn down_cols;    /* FFN phase 2, columns, t = 1, output rows [r0, r1); 0: not done */
    int dot_prefetches;             /* with x prepared as xprep says, dot (nr 1) honours job_t.stream_pf */
} fic_fmt_kernels;

typedef struct fic_kernels {
    int impl;                       /* FIC_IMPL_* */
    kern_axpy_fn axpy;              /* y += a * w, float */
    kern_gemm_tile_fn gemm_tile;    /* Y[t][r0 + r] = tile[r] . x[t], a tile of dequantized rows */
    fic_fmt_kernels fmt[FIC_FMT_COUNT];
    kern_gemm_panel_fn gemm_panel;  /* as gemm_tile, the tile packed by pack_panels; NULL: none */
    kern_fixed_add_fn fixed_add;    /* acc[i] += fix(c[i]) (fic.h); NULL: fixed_add_ref (last: tables
                                       that omit it leave it NULL) */
    kern_pack8_fn pack8;            /* pack_panels' transpose of 8 rows; NULL: pack8_ref */
    kern_silu_mul_fn silu_mul;      /* NULL: silu_mul_ref (expf) */
    kern_q1r32_fn q1r32;            /* NULL: q1r32_ref */
    kern_q1r32_move_fn q1r32_move;  /* NULL: q1r32_move_ref */
    kern_q1r32_tiles_fn q1r32_tiles; /* NULL: prefill a token at a time through q1r32 */
} fic_kernels;

/* The traits columns every table repeats: block weights and bytes of each format. */
#define KT_F32 1, 4
#define KT_F16 1, 2
#define KT_Q8_0 QK8_0, (int)sizeof(block_q8_0)
#define KT_Q4_0 QK4_0, (int)sizeof(block_q4_0)
#define KT_Q4_1 QK4_1, (int)sizeof(block_q4_1)
#define KT_Q1_0 QK1_0, (int)sizeof(block_q1_0)
#define KT_Q5_0 QK5_0, (int)sizeof(block_q5_0)
#define KT_Q4_K QK_K, (int)sizeof(block_q4_K)
#define KT_Q6_K QK_K, (int)sizeof(block_q6_K)

/* The per-architecture tables: const, defined in their files. */
extern const fic_kernels fic_kernels_scalar;
#if defined(FIC_X86)
extern const fic_kernels fic_kernels_avx2;
extern const fic_kernels fic_kernels_avx512;      /* AVX-512 F/BW/VL */
extern const fic_kernels fic_kernels_avx512_vnni; /* + VNNI: Q4 with int8 activations */
extern const fic_kernels fic_kernels_avx512_q1;   /* + VNNI, BITALG, VBMI, GFNI: Q1_0 as bit planes too */
extern const fic_kernels fic_kernels_avx512_amx;  /* + AMX-INT8: the r32 prefill as tile products */
#endif
#if defined(__aarch64__)
extern const fic_kernels fic_kernels_neon;
#endif

/* The table of impl (not AUTO) on this CPU, or NULL when it cannot run here (kernels.c). */
const fic_kernels *fic_kernels_for(int impl);

static inline void init_job(job_t *j, const fic_kernels *kt, int fmt, const uint8_t *w, const float *x, float *y,
                            int64_t t, int64_t m, int64_t k) {
    memset(j, 0, sizeof *j);
    j->fmt = fmt;
    j->impl = kt->impl;
    j->kt = kt;
    j->kf = &kt->fmt[fmt];
    j->w = w;
    j->x = x;
    j->y = y;
    j->t = t;
    j->m = m;
    j->k = k;
    j->row_bytes = fic_row_bytes(fmt, k);
    j->bw = j->kf->block_weights;
    j->bb = j->kf->block_bytes;
}

/* Calls through the table (what the switches on impl and format used to be). */
static inline float dot_row(const job_t *j, const uint8_t *row, const float *x) { return j->kf->dot(j, row, x); }
static inline void deq_range(const job_t *j, const uint8_t *row, int64_t b0, int64_t b1, float *out) {
    j->kf->deq(row, b0, b1, out);
}
static inline void axpy(const job_t *j, float a, const float *w, float *y, int64_t n) { j->kt->axpy(a, w, y, n); }
static inline void gemm_tile(const job_t *j, const float *tile, int64_t nr, int64_t r0) {
    j->kt->gemm_tile(j, tile, nr, r0);
}
static inline int uses_panels(const fic_kernels *kt, int64_t t, int64_t k) {
    return kt->gemm_panel != NULL && t >= PANEL_MIN_T && clamp_tile(k) >= PANEL_ROWS;
}
static inline int64_t tile_rows_for(const fic_kernels *kt, int64_t t, int64_t k) {
    const int64_t tile = clamp_tile(k);
    return uses_panels(kt, t, k) ? tile / PANEL_ROWS * PANEL_ROWS : tile;
}
/* Rows [r, r + nr) of w (row bytes rb, j's format, j->k weights each) into tile as panels (above):
 * row i at tile[(i / 16) 16 k + kk 16 + i % 16]; the last panel's missing rows are zero. matvec.c. */
const float *pack_panels(const job_t *j, const uint8_t *w, int64_t rb, int64_t r, int64_t nr, float *tile);
/* Y[t][r0 + i] = row r + i of w . x[t] for i < nr, every token of j: the rows dequantized into tile,
 * then gemm_panel (panels: packed, decided once per call by uses_panels, so that a call's tiles
 * all fit its tile_rows_for) or gemm_tile. matvec.c. */
void gemm_rows(const job_t *j, int panels, const uint8_t *w, int64_t rb, int64_t r, int64_t nr, int64_t r0,
               float *tile);

/* ---- shared by the generic code and the fast paths ------------------------------------------ */

/* Software prefetches of weights the kernels read next, into every cache level: a non-temporal
 * prefetch slowed a row stream on a Xeon (bench/RESULTS.md, "An AVX-512 machine"). Build with
 * -DFIC_PF_LOCALITY=0 to compare. */
#ifndef FIC_PF_LOCALITY
#define FIC_PF_LOCALITY 3
#endif
#define FIC_PREFETCH(p) __builtin_prefetch((p), 0, FIC_PF_LOCALITY)
/* A row read alone from DRAM (matvec's rows longer than PAIR_MAX_K): a kernel whose table sets
 * dot_prefetches issues, at each step of n bytes at p, the prefetches of the lines STREAM_PF_BYTES
 * ahead (one per 64 bytes, so none is skipped), spread over the row instead of a row's burst
 * before it: 1.12-1.16x for Q4 from DRAM on a Xeon (bench/RESULTS.md, "Prefetches spread over the
 * row"). */
#ifndef STREAM_PF_BYTES
#define STREAM_PF_BYTES 3072
#endif
static inline void stream_prefetch(const uint8_t *p, int n) {
    for (int o = 0; o < n; o += 64) FIC_PREFETCH(p + STREAM_PF_BYTES + o);
}
#define ACCUM_PF_ROWS 4  /* accum_rows: rows ahead to prefetch: each row piece is its own short stream */
#define P1_PF_BYTES 4096 /* FFN phase 1 prefetch distance, bytes ahead in the gate+up stream */
#define P2_ROWS 8        /* FFN phase 2 (columns): output rows per block, one accumulator each */
#ifndef P2_PF_BLOCKS
#define P2_PF_BLOCKS 8   /* FFN phase 2: row blocks ahead to prefetch, per expert (2 before the split by experts: RESULTS) */
#endif

/* Phase 2 (columns) reads P2_ROWS output rows of an expert's down piece per step (w: the piece of
 * row r, rb bytes a row): prefetch the rows P2_PF_BLOCKS steps ahead, as far as r_end. */
static inline void p2_prefetch(const uint8_t *w, int64_t rb, int64_t r, int nr, int64_t r_end) {
    const int64_t pf_r = r + P2_PF_BLOCKS * P2_ROWS;
    if (pf_r >= r_end) return;
    const uint8_t *pf = w + P2_PF_BLOCKS * P2_ROWS * rb;
    const int64_t pf_bytes = (r_end - pf_r < nr ? r_end - pf_r : nr) * rb;
    for (int64_t o = 0; o < pf_bytes; o += 64) FIC_PREFETCH(pf + o);
}

/* Phase 1 reads one row at a time with a software prefetch P1_PF_BYTES ahead (ffn.c). */
static inline void p1_prefetch(const uint8_t *row, int64_t rb) {
    for (int64_t o = 0; o < rb; o += 64) FIC_PREFETCH(row + P1_PF_BYTES + o);
}

enum { Q1_ALL_SAD, Q1_ALL_PLANES, Q1_MIXED }; /* ffn_t.q1_layout */

/* One experts_ffn call (ffn.c), shared with the phase 2 fast paths. */
typedef struct ffn_s {
    int impl, t_is_1;
    const fic_kernels *kt;   /* the implementation's table */
    int64_t d, t, n_experts, n_total;
    const uint8_t *const *bundles;
    const int32_t *n;
    const int64_t *off;      /* off[e] = n_0 + ... + n_{e-1}; off[n_experts] = n_total */
    const uint8_t *skip;     /* skip[e]: coef is 0 for every token */
    const float *coef;       /* t x n_experts or NULL */
    const float *x;
    float *y, *h;
    int64_t rb_g, rb_u;      /* gate / up row bytes (d_model weights) */
    int64_t *rb_d;           /* down row bytes per expert (columns: n_e weights; rows: d_model) */
    int gate_fmt, up_fmt, down_fmt, down_rows;
    int q1_layout;           /* t = 1, columns, Q1_0 on AVX-512: the prepared h_e's layouts */
    job_t jg, ju;            /* t = 1: gate and up jobs with x prepared */
    job_t *jd;               /* per expert down job (t = 1: h_e prepared for columns) */
    int64_t *acc;            /* FIC_FFN_FIXED: t x d fixed-point sums instead of y; else NULL */
    float *tiles;            /* per thread: tile_floats */
    int64_t tile_floats, tile1_rows, tile2_rows;
} ffn_t;

/* The expert holding flattened neuron index g (binary search over off). */
static inline int64_t ffn_expert_of(const ffn_t *f, int64_t g) {
    int64_t lo = 0, hi = f->n_experts - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (f->off[mid] <= g) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static inline const uint8_t *down_part(const ffn_t *f, int64_t e) {
    return f->bundles[e] + (int64_t)f->n[e] * (f->rb_g + f->rb_u);
}

/* ---- kernels.c: activation preparation, row chunks, the accum_rows range ------------------- */

/* Q4 on VNNI: x (k a multiple of 32) in quads of 4 blocks, the last one padded: kq = k rounded up to
 * 128 int8, then kq / 4 lane scales and kq / 4 corrections. */
static inline int64_t kern_q4_quad_weights(int64_t k) { return (k + 127) / 128 * 128; }
size_t prep_x_bytes(const job_t *j);    /* bytes prep_x needs for j (0: none); a multiple of 64 */
int x_prepared_as_table(const job_t *j); /* prep_x used the table's xprep (not xprep_small) */
/* fix(c) of fic.h: c * 2^32 rounded half to even, c saturated to +-2^30 (NaN: +2^30). */
static inline int64_t fix_ref(float c) {
    double v = (double)c;
    if (!(v <= 0x1p30)) v = 0x1p30; /* NaN too */
    else if (v < -0x1p30) v = -0x1p30;
    return (int64_t)__builtin_llrint(v * 0x1p32); /* exact product; the default rounding: half to even */
}
void fixed_add_ref(const float *c, int64_t *acc, int64_t n);
/* acc[i] += fix(c[i]) through kt's fast path when it has one (same integers either way). */
static inline void fixed_add(const fic_kernels *kt, const float *c, int64_t *acc, int64_t n) {
    if (kt->fixed_add) kt->fixed_add(c, acc, n);
    else fixed_add_ref(c, acc, n);
}
#if defined(FIC_X86)
void fixed_add_avx2(const float *c, int64_t *acc, int64_t n);
void pack8_avx2(const float *src, int64_t ld, int64_t n, float *dst);
#endif
void pack8_ref(const float *src, int64_t ld, int64_t n, float *dst);
void silu_mul_ref(float c, float *h, const float *u, int64_t n);
#if defined(FIC_X86)
void silu_mul_avx2(float c, float *h, const float *u, int64_t n);
#endif
static inline void silu_mul(const fic_kernels *kt, float c, float *h, const float *u, int64_t n) {
    if (kt->silu_mul) kt->silu_mul(c, h, u, n);
    else silu_mul_ref(c, h, u, n);
}
/* q1r32.c: fic_matmul of an r32 matrix (t = 1: its matvec; t > 1: qdot.c's Q1_0 prefill, a group
 * unpacked at a time). The workspace is fic_matmul's. */
int q1r32_matmul(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t t, int64_t m,
                 int64_t k, void *ws, int64_t ws_bytes);
void q1r32_ref(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx, const float *dx, float *y, int64_t g0,
               int64_t g1);
#if defined(FIC_X86)
void q1r32_avx2(const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx, const float *dx, float *y, int64_t g0,
                int64_t g1);
#endif
void q1r32_move_ref(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32);
#if defined(FIC_X86)
void q1r32_move_avx2(const uint8_t *from, uint8_t *to, int64_t nb, int to_r32);
void q1r32_tiles_amx(const uint8_t *w, int64_t nb, const uint8_t *tok, int64_t tb, int64_t nt, float *y, int64_t ys,
                     uint8_t *scratch);
/* vpermt2b's indices that regroup a q8 block's 4 sign bytes of 32 rows (two 64-byte loads) so that
 * dword r of half h holds row 16 h + r's 4 bytes (kernels_avx512.c; q1r32_avx512, kernels_amx.c) */
extern const uint8_t q1r32_regroup[2][64];
#endif
static inline void q1r32_move(const fic_kernels *kt, const uint8_t *from, uint8_t *to, int64_t nb, int to_r32) {
    if (kt->q1r32_move) kt->q1r32_move(from, to, nb, to_r32);
    else q1r32_move_ref(from, to, nb, to_r32);
}
static inline void q1r32(const fic_kernels *kt, const uint8_t *w, int64_t nb, const uint8_t *tab, const int16_t *cx,
                         const float *dx, float *y, int64_t g0, int64_t g1) {
    if (kt->q1r32) kt->q1r32(w, nb, tab, cx, dx, y, g0, g1);
    else q1r32_ref(w, nb, tab, cx, dx, y, g0, g1);
}
/* q1r32.c: the tables of x quantized (k int8, QX_ROW_BYTES(k)), 32 bytes per 4 weights, and its
 * k / 32 corrections (kern_q1r32_fn); one token's
 * FFN over r32 bundles (ffn.c's t = 1 path; ws holds the four areas of ws_ffn's t = 1 bound after
 * the tables). */
void q1r32_build_tables(const int8_t *xq, int64_t k, uint8_t *tab, int16_t *cx);
int q1r32_ffn_t1(fic_pool *pool, const ffn_t *f, uint8_t *ws, int64_t ws_bytes);
static inline void pack8(const fic_kernels *kt, const float *src, int64_t ld, int64_t n, float *dst) {
    if (kt->pack8) kt->pack8(src, ld, n, dst);
    else pack8_ref(src, ld, n, dst);
}
void prep_x(job_t *j, void *mem);       /* prepares j->x into mem and points j's activation fields at it */
int64_t row_chunk(fic_pool *pool, int64_t m, int64_t row_bytes);
void accum_range(void *ctx, int64_t b0, int64_t b1, int tid); /* fic_range_fn over a job_t */

/* Shared float kernels of the reference (kernels_scalar.c), which fast tables reuse where they
 * have nothing faster. */
void kern_deq_range_ref(int fmt, const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_f32_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_f16_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q8_0_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_0_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_1_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q1_0_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q5_0_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_K_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q6_K_ref(const uint8_t *row, int64_t b0, int64_t b1, float *out);

/* x86: the activation quantizers (prep_x) and the AVX2 kernels the AVX-512 tables reuse. */
#if defined(FIC_X86)
void kern_quantize_x_avx2(const float *x, int64_t k, int8_t *xq, float *a8, float *c8);
void kern_quantize_x_quads_avx512(const float *x, int64_t k, int q4_0, int8_t *xq, float *xscale16, float *xcorr16);
void kern_quantize_x_q1_avx512(const float *x, int64_t k, uint8_t *xu, float *xscale16, float *xcorr16);
void kern_quantize_x_q1_planes(const float *x, int64_t k, uint8_t *planes, float *a16, float *c16, int8_t *xq);
/* int8 activations (XP_Q8), or the AVX2 float kernel when x is not prepared (an exact request) */
float kern_q8x_dot_q8_0_avx2(const job_t *j, const uint8_t *row, const float *x);
float kern_q8x_dot_q4_0_avx2(const job_t *j, const uint8_t *row, const float *x);
float kern_q8x_dot_q4_1_avx2(const job_t *j, const uint8_t *row, const float *x);
float kern_q8x_dot_q5_0_avx2(const job_t *j, const uint8_t *row, const float *x);
float kern_q8x_dot_q4_K_avx2(const job_t *j, const uint8_t *row, const float *x);
float kern_q8x_dot_q6_K_avx2(const job_t *j, const uint8_t *row, const float *x);
int kern_q8x_down_q8_0_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_q8x_down_q4_0_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_q8x_down_q4_1_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_q8x_down_q5_0_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_q8x_down_q4_K_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_q8x_down_q6_K_avx2(const struct ffn_s *f, int64_t r0, int64_t r1);
/* AVX-512 VNNI (kernels_vnni.c): the same formats' int8 decode, 64 weights a vpdpbusd; for an exact
 * request (x not prepared) dot falls back to the AVX2 float kernel, dot2 to the table's own dot */
float kern_vnni_dot_q8_0(const job_t *j, const uint8_t *row, const float *x);
float kern_vnni_dot_q4_K(const job_t *j, const uint8_t *row, const float *x);
float kern_vnni_dot_q6_K(const job_t *j, const uint8_t *row, const float *x);
void kern_vnni_dot2_q8_0(const job_t *j, const uint8_t *row0, float *y);
void kern_vnni_dot2_q4_K(const job_t *j, const uint8_t *row0, float *y);
void kern_vnni_dot2_q6_K(const job_t *j, const uint8_t *row0, float *y);
int kern_vnni_down_q8_0(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_vnni_down_q4_K(const struct ffn_s *f, int64_t r0, int64_t r1);
int kern_vnni_down_q6_K(const struct ffn_s *f, int64_t r0, int64_t r1);
void kern_deq_f16_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q8_0_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_0_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_1_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q5_0_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q4_K_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
void kern_deq_q6_K_avx2(const uint8_t *row, int64_t b0, int64_t b1, float *out);
#endif

#endif /* FIC_KERNELS_H */
