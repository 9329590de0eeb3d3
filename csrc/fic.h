/* fic.h - the whole public API of fic's C core.
 *
 * Conventions: every function that can fail returns an int status (FIC_OK or a negative
 * FIC_ERR_*); nothing prints, nothing exits, no global holds state. Quantized matrices are
 * row-major: each row of K weights is K / block_weights blocks laid out back to back, rows
 * one after another (ggml's layout), so a GGUF tensor's bytes are a valid fic matrix.
 *
 * The region between the cdef markers is read by csrc/build_ffi.py as cffi's cdef: keep it free
 * of preprocessor lines and of anything pycparser cannot parse.
 */
#ifndef FIC_H
#define FIC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */

/* Status codes. */
enum fic_status {
    FIC_OK = 0,
    FIC_ERR_ARG = -1,         /* bad argument: format, shape, alignment, NULL pointer */
    FIC_ERR_NOMEM = -2,       /* an allocation failed */
    FIC_ERR_UNSUPPORTED = -3, /* the requested implementation or backend is not available here */
    FIC_ERR_OPEN = -4,        /* the file could not be opened (see the errno out-parameter) */
    FIC_ERR_IO = -5,          /* a read failed; the request's sys_errno says why */
    FIC_ERR_SHORT = -6,       /* a read returned fewer bytes than asked (end of file) */
    FIC_ERR_CRC = -7,         /* the bytes read do not match the expected CRC32C */
    FIC_ERR_THREAD = -8,      /* a thread could not be created */
    FIC_ERR_WORKSPACE = -9    /* the workspace is smaller than the call needs (fic_workspace_bytes) */
};

/* Weight formats. Block layouts are ggml's (see csrc/blocks.h). */
enum fic_fmt {
    FIC_F32 = 0,
    FIC_F16 = 1,
    FIC_Q8_0 = 2,  /* 32 weights: fp16 d, 32 x int8                         34 bytes */
    FIC_Q4_0 = 3,  /* 32 weights: fp16 d, 16 bytes of nibbles (q - 8)        18 bytes */
    FIC_Q4_1 = 4,  /* 32 weights: fp16 d, fp16 m, 16 bytes of nibbles        20 bytes */
    FIC_Q1_0 = 5,  /* 128 weights: fp16 d, 16 bytes of sign bits, LSB first  18 bytes */
    FIC_Q5_0 = 6,  /* 32 weights: fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles 22 bytes */
    FIC_Q4_K = 7,  /* 256 weights: fp16 d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles: 144 */
    FIC_Q6_K = 8,  /* 256 weights: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, fp16 d: 210 */
    FIC_FMT_COUNT = 9,
    /* Not a format but a layout of one: Q1_0's blocks with 32 rows side by side (the r32 layout,
     * below; rows a multiple of 32). fic_matvec, fic_matmul (int8 prefill: FIC_ERR_UNSUPPORTED
     * under FIC_IMPL_EXACT or where the CPU has no int8 Q1_0 kernel) and fic_decode_attn take
     * it; fic_row_bytes gives Q1_0's row bytes, so a matrix is sliced at multiples of 32 rows. */
    FIC_Q1_0R32 = 64
};

/* Kernel implementations. AUTO picks the fastest one this CPU supports. */
enum fic_impl {
    FIC_IMPL_AUTO = 0,
    FIC_IMPL_REF = 1,    /* scalar reference: the spec, portable C */
    FIC_IMPL_AVX2 = 2,   /* x86-64 AVX2 + FMA + F16C */
    FIC_IMPL_AVX512 = 3, /* x86-64 AVX-512 F/BW/VL */
    FIC_IMPL_NEON = 4,   /* AArch64 NEON */
    /* A flag OR'ed into impl for fic_matvec, fic_matmul and fic_experts_ffn(_slots): exact float
     * activations (prefill: weights dequantized, fp32 FMA; decode: float dot products) instead of
     * int8 activations and integer dot products (prefill: csrc/qdot.h; decode: Q1_0, Q4_0, Q4_1
     * and Q8_0 on AVX2, Q1_0/Q4 on AVX-512), as llama.cpp computes them. */
    FIC_IMPL_EXACT = 256,
    /* A flag OR'ed into impl for fic_experts_ffn(_slots) only: y is not float but an int64_t
     * accumulator of t x d_model fixed-point values in units of 2^-32 (fic_fixed_add): each
     * expert's contribution to each output is reduced and rounded to that grid on its own, then
     * added as an integer, so the sum does not depend on how a layer's experts are split between
     * calls or in which order the calls come (integer addition is associative). A budget that
     * streams some experts then computes bit for bit what the full model computes. fic_fixed_flush
     * adds the accumulator to the float output. Columns down layout only (rows: FIC_ERR_UNSUPPORTED). */
    FIC_FFN_FIXED = 512
};

/* ---- formats (quant.c) ---- */
int fic_fmt_block_weights(int fmt);         /* weights per block, or FIC_ERR_ARG */
int fic_fmt_block_bytes(int fmt);           /* bytes per block, or FIC_ERR_ARG */
int64_t fic_row_bytes(int fmt, int64_t k);  /* bytes of one row of k weights, or FIC_ERR_ARG */

/* Reference quantizer (ggml's quantize_row_*_ref; Q1_0: d = mean |w|, bit set where w >= 0).
 * Q4_K and Q6_K are only read (kept from GGUF files as they are): fic_quantize returns
 * FIC_ERR_UNSUPPORTED for them; fic_dequantize is ggml's dequantize_row_*. */
int fic_quantize(int fmt, const float *src, uint8_t *dst, int64_t n_rows, int64_t k);
int fic_dequantize(int fmt, const uint8_t *src, float *dst, int64_t n_rows, int64_t k);

/* fp16 <-> fp32, round to nearest even (IEEE binary16). */
uint16_t fic_fp32_to_fp16(float f);
float fic_fp16_to_fp32(uint16_t h);

/* ---- CPU features and the thread pool (pool.c) ---- */
int fic_impl_available(int impl);  /* 1 if impl can run on this CPU and build, else 0 */
int fic_impl_best(void);           /* the implementation AUTO resolves to */
int fic_amx_available(void);       /* 1 if AVX-512 runs the int8 prefill on AMX tiles here (the CPU
                                      has AMX-INT8, Linux granted the tile state, FIC_NO_AMX unset) */

typedef struct fic_pool fic_pool;
/* A pool of n_threads workers (the caller counts as one of them), created once and reused. */
int fic_pool_create(int n_threads, fic_pool **out);
void fic_pool_destroy(fic_pool *pool);
int fic_pool_threads(const fic_pool *pool);

/* ---- kernel workspace (matvec.c) ----
 * No kernel allocates: each takes ws, ws_bytes, a caller-owned scratch area, 64-byte aligned
 * (FIC_ERR_ARG otherwise; NULL with 0 bytes is fine where a call needs none). Too few bytes is
 * FIC_ERR_WORKSPACE, checked before anything is written. What a call needs depends only on the
 * kernel, the pool's thread count and the call's sizes, never on the format, implementation or
 * CPU. With A(b) = b rounded up to a multiple of 64, F(k) = max(min(60 k, 65536), 6 k) (floats
 * of a per-thread tile of dequantized rows) and P = fic_pool_threads(pool):
 *   fic_matvec            A(10 k)                 (x prepared once: int8 + scales, or block sums;
 *                                                  the r32 layout's tables)
 *   fic_matmul            P A(4 F(k))             (one tile per thread)
 *   fic_accum_rows        0
 *   fic_experts_ffn(_slots), E = n_experts > 0, N = sum of n_neurons, d = d_model:
 *       A(8 E) + A(E (17 + J) + 8)                (bundle pointers; per expert tables, J an
 *                                                  internal per-expert record of <= 256 bytes)
 *     + t = 1: A(3 d) + A(8 d) + A(2 N) + A(8 N) + 64 E + (P - 1) A(8 d)
 *                                                 (x prepared for gate and up, h_e for down; the
 *                                                  r32 layout's tables of x and of every h_e; the
 *                                                  other threads' fixed-point sums of phase 2)
 *       t > 1: P A(4 (max(F(d), F(N), 512) + 60 t)) (one tile per thread)
 *              + min(A(t (5 m / 4 + 8)), 2^23), m = max(d, N) (the int8 path's activations of every
 *                                                  token, so its weight rows are read once a call)
 *     (E = 0 needs nothing).
 * fic_workspace_bytes returns the most any of these needs for P <= n_threads, t <= max_t,
 * k <= max_k (matvec/matmul/accum_rows: k, the row length; experts_ffn: d_model),
 * n_experts <= max_experts and sum(n_neurons) <= max_neurons (the neurons of one call, all its
 * experts together); each term grows with each maximum, so one workspace of that size serves
 * every such call. FIC_ERR_ARG for n_threads < 1, a negative maximum, or one beyond 2^36
 * (n_threads beyond 2^16). */
int64_t fic_workspace_bytes(int n_threads, int64_t max_t, int64_t max_k, int64_t max_experts,
                            int64_t max_neurons);

/* ---- kernels (matvec.c). pool may be NULL: runs on the calling thread. ----
 * w: m rows of k weights in fmt; k must be a multiple of the block size.
 * matvec:     y[m]    = W x[k]                        (decode)
 * matmul:     y[t][m] = x[t][k] W^T                   (prefill; W read once for all t)
 * accum_rows: y[k]   += sum_i a[i] * W[i]  (n_rows rows of k weights; a down projection
 *                                           stored as rows of its transpose) */
int fic_matvec(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y,
               int64_t m, int64_t k, void *ws, int64_t ws_bytes);
int fic_matmul(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *x, float *y,
               int64_t t, int64_t m, int64_t k, void *ws, int64_t ws_bytes);
int fic_accum_rows(fic_pool *pool, int impl, int fmt, const uint8_t *w, const float *a, float *y,
                   int64_t n_rows, int64_t k, void *ws, int64_t ws_bytes);

/* ---- expert FFN (ffn.c) ---- */
typedef struct fic_expert_layout {
    int64_t d_model;
    int32_t gate_fmt;
    int32_t up_fmt;
    int32_t down_fmt;
    int32_t down_rows; /* 0: the down part is (d_model, n), a column slice of ffn_down;
                          1: it is (n, d_model), rows of ffn_down transposed */
} fic_expert_layout;

/* One layer's SwiGLU FFN over a set of experts, for t tokens:
 *   y[i][:] += sum_e coef[i][e] * down_e (silu(gate_e x[i]) * (up_e x[i]))
 * bundles[e] points at expert e's bundle: its gate rows (n x d_model), up rows (n x d_model) and
 * down part back to back, as fmt.py writes them; n_neurons[e] is its n. coef is t x n_experts
 * (an MoE router's weights; 0 skips the expert for that token) or NULL for all ones; an expert
 * whose coef is 0 for every token is not read at all.
 * scratch holds at least t * sum(n_neurons) floats. On return (FIC_OK) it holds h: expert e's
 * block of t x n_e floats (token-major) starts at t * (n_0 + ... + n_{e-1}), and
 *   h[i][n] = coef[i][e] * silu(gate_e[n] . x[i]) * (up_e[n] . x[i])
 * (exactly 0 where coef[i][e] is 0; coef 1 when NULL), computed with the same arithmetic as y. */
int fic_experts_ffn(fic_pool *pool, int impl, const fic_expert_layout *layout,
                    const uint8_t *const *bundles, const int32_t *n_neurons, int64_t n_experts,
                    const float *coef, const float *x, float *y, int64_t t,
                    float *scratch, int64_t scratch_floats, void *ws, int64_t ws_bytes);

/* The same over bundles in an arena of slots: expert e's bundle is at
 * arena + slots[e] * slot_bytes (slots[e] >= 0, slot_bytes > 0, else FIC_ERR_ARG; the caller
 * guarantees the arena holds every bundle). The pointer array lives in the workspace. */
int fic_experts_ffn_slots(fic_pool *pool, int impl, const fic_expert_layout *layout,
                          const uint8_t *arena, int64_t slot_bytes, const int32_t *slots,
                          const int32_t *n_neurons, int64_t n_experts, const float *coef,
                          const float *x, float *y, int64_t t, float *scratch,
                          int64_t scratch_floats, void *ws, int64_t ws_bytes);

/* ---- fixed-point sums (ffn.c) ----
 * fix(c) = round-half-even(c * 2^32) as an int64, c saturated to +-2^30 (NaN to +2^30): the unit
 * of FIC_FFN_FIXED accumulators, 2.3e-10, far below a float32's resolution near the FFN's output.
 * fic_fixed_add: acc[i] += fix(c[i]) for i < n (impl: the same kernels as the FFN uses; every
 *   implementation gives the same integers).
 * fic_fixed_flush: y[i] += (float)(acc[i] * 2^-32) (through double), then acc[i] = 0. */
int fic_fixed_add(int impl, const float *c, int64_t *acc, int64_t n);
int fic_fixed_flush(int64_t *acc, float *y, int64_t n);
/* fic_silu_mul: h[k] = c * silu(h[k]) * u[k] for k < n, silu(g) = g / (1 + e^-g): the FFN's gating,
 * through impl's kernels (the reference uses expf, AVX2 a polynomial exp within ~2 ulp). */
int fic_silu_mul(int impl, float c, float *h, const float *u, int64_t n);

/* ---- Q1_0 in groups of 32 rows (q1r32.c) ----
 * The r32 layout holds a Q1_0 matrix (m x k; m a multiple of 32, k of 128) reordered so that one
 * 32-byte load gives 32 rows' sign byte: per group of 32 rows, per block b of 128 weights, the 32
 * rows' d (fp16, 64 bytes), then for i < 16 the 32 rows' sign byte i of block b (32 bytes each):
 * 576 bytes, as many as the 32 blocks it holds, so a matrix keeps its size.
 * fic_q1r32_repack: src (row-major Q1_0) -> dst (r32); they must not overlap.
 * fic_q1r32_unpack: the reverse, src (r32) -> dst (row-major Q1_0).
 * fic_q1r32_ws_bytes: the workspace fic_q1r32_matvec needs for k (any number of threads).
 * fic_q1r32_matvec: y = W x with x quantized to q8 blocks of 32 as fic_matmul's int8 path does
 *   (fic_qdot_quantize), and per 4 weights a table of the 16 sums of +-xq that the kernel looks
 *   up; every implementation, and any number of threads, gives the same bits. */
int fic_q1r32_repack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst);
int fic_q1r32_unpack(const uint8_t *src, int64_t m, int64_t k, uint8_t *dst);
int64_t fic_q1r32_ws_bytes(int64_t k);
int fic_q1r32_matvec(fic_pool *pool, int impl, const uint8_t *w, const float *x, float *y, int64_t m, int64_t k,
                     void *ws, int64_t ws_bytes);
/* Expert bundles of Q1_0 weights in the columns down layout (bundle b: gate n x d, up n x d, down
 * d x n with n = n_neurons[b]; n and d multiples of 128) repacked in place, each part into the r32
 * layout (to_r32 = 1; 0: from it back to rows, for a model that stores its bundles in r32 order
 * read where rows are wanted), the bundles split between the pool's threads: what fic_experts_ffn(_slots) reads with all
 * three formats FIC_Q1_0R32 (one token: the r32 tables; t > 1: rows unpacked a group at a time for
 * Q1_0's int8 prefill, the same bits; the exact float prefill: FIC_ERR_UNSUPPORTED). ws holds
 * fic_q1r32_bundles_ws_bytes(threads of pool, largest n, d) bytes (a group per thread); every impl
 * gives the same bytes. */
int64_t fic_q1r32_bundles_ws_bytes(int n_threads, int64_t n_max, int64_t d);
int fic_q1r32_bundles(fic_pool *pool, int impl, uint8_t *const *bundles, const int32_t *n_neurons, int64_t count,
                      int64_t d, int to_r32, void *ws, int64_t ws_bytes);

/* ---- attention over an fp16 KV cache (attention.c) ----
 * Causal GQA attention of t queries at positions pos0..pos0+t-1 (q: t x n_heads x head_dim
 * float32, RoPE applied; out: the same shape) over one layer's cache. k_cache and v_cache hold
 * IEEE binary16 bits, position-major: position p, kv head h starts at element
 * p * kv_stride + h * head_dim (kv_stride = n_kv_heads * head_dim when dense); positions
 * 0..pos0+t-1 must be filled. Query i attends to positions 0..pos0+i; head j reads kv head
 * j / (n_heads / n_kv_heads); out = softmax(scale * q.k) v, with a streaming softmax (no score
 * matrix). ws: at least fic_attention_ws_floats(threads of pool, t, n_heads, head_dim) floats
 * (per-thread tiles and decode's per-slice partial results; nothing is allocated). Results do
 * not depend on the thread count. AVX512 runs the AVX2 code. */
int fic_attention(fic_pool *pool, int impl, const float *q, const uint16_t *k_cache,
                  const uint16_t *v_cache, float *out, int64_t t, int64_t pos0, int64_t n_heads,
                  int64_t n_kv_heads, int64_t head_dim, int64_t kv_stride, float scale, float *ws,
                  int64_t ws_floats);
int64_t fic_attention_ws_floats(int n_threads, int64_t t, int64_t n_heads, int64_t head_dim);
/* dst[i] = src[i] as IEEE binary16 bits, round to nearest even (new K/V rows into the cache). */
int fic_f32_to_f16_rows(int impl, const float *src, uint16_t *dst, int64_t n);

/* ---- a prefill's row-wise float operations (rows.c) ----
 * out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for n_rows rows of n floats (the mean in double; out
 * may be x). RoPE in place on n_tok x n_heads rows of hd floats (hd even), token t's cos and sin
 * rows (hd floats each) at cos_t + t hd, sin_t + t hd: Hugging Face's rotate-half convention,
 * x' = x cos + rotate_half(x) sin, rotate_half(x) = (-x[hd/2:], x[:hd/2]). */
int fic_rmsnorm_rows(const float *x, const float *w, float eps, int64_t n_rows, int64_t n, float *out);
int fic_rope_rows(float *x, int64_t n_tok, int64_t n_heads, int64_t hd, const float *cos_t, const float *sin_t);

/* ---- one decode token's attention block, fused (decode.c) ----
 * For one layer and one token at position pos:
 *   xa = rmsnorm(x, attn_norm); q|k|v = W xa (+ qkv_bias); q/k norm; RoPE; k, v -> the fp16 cache
 *   at pos; att = fic_attention(q); x += Wo att; xn = rmsnorm(x, ffn_norm)
 * qk_norm: 0 none, 1 per head (q_norm, k_norm: head_dim floats each, Qwen3), 2 one norm over all
 * heads (q_norm n_heads*head_dim floats, k_norm n_kv_heads*head_dim, OLMoE). RoPE is rotate-half
 * (Hugging Face's): cos_table and sin_table hold head_dim floats per position, row pos is used.
 * k_cache, v_cache: this layer's cache, position-major, n_kv_heads*head_dim halves per position,
 * positions 0..pos-1 filled (the caller checks pos against its length). wq, wk, wv: rows of
 * d_model weights (n_heads*head_dim, n_kv*head_dim, n_kv*head_dim rows); when they lie back to
 * back in one format they run as one matvec. wo: d_model rows of n_heads*head_dim. x: d_model
 * floats, updated in place; xn: d_model floats out (the FFN's input). ws: 64-byte aligned, at
 * least fic_decode_ws_bytes(threads of pool, shape) bytes; nothing is allocated. impl reaches
 * every kernel of the step (FIC_IMPL_REF: the scalar reference throughout). */
typedef struct fic_decode_shape {
    int64_t d_model;
    int64_t n_heads;
    int64_t n_kv_heads;
    int64_t head_dim;
    float norm_eps;
    float scale;       /* attention's score scale, 1/sqrt(head_dim) */
    int32_t qk_norm;
    int32_t reserved;  /* 0 */
} fic_decode_shape;
typedef struct fic_attn_weights {
    const float *attn_norm;
    const uint8_t *wq;
    const uint8_t *wk;
    const uint8_t *wv;
    const float *qkv_bias;  /* NULL, or (n_heads + 2 n_kv_heads) head_dim floats */
    const float *q_norm;    /* NULL when qk_norm is 0 */
    const float *k_norm;
    const uint8_t *wo;
    const float *ffn_norm;
    int32_t q_fmt;
    int32_t k_fmt;
    int32_t v_fmt;
    int32_t o_fmt;
} fic_attn_weights;
int64_t fic_decode_ws_bytes(int n_threads, const fic_decode_shape *shape);
int fic_decode_attn(fic_pool *pool, int impl, const fic_decode_shape *shape, const fic_attn_weights *w,
                    const float *cos_table, const float *sin_table, uint16_t *k_cache, uint16_t *v_cache,
                    int64_t pos, float *x, float *xn, void *ws, int64_t ws_bytes);

/* ---- a decode token through every layer, fused (decode.c) ----
 * For l = 0 .. n_layers-1: fic_decode_attn(attn[l], k_cache[l], v_cache[l]) on x and xn, then
 * x += FFN_l(xn) over layer l's experts in the arena (ffn[l]: fic_experts_ffn_slots of one token,
 * coef 1, h into scratch): with acc (d_model int64, zero on entry) into acc with FIC_FFN_FIXED,
 * then fic_fixed_flush(acc, x); without, straight into x (rows down layout). The same calls in
 * the same order as a caller making them layer by layer: the same bits. The caller guarantees
 * that every slot holds its bundle (the experts are resident). attn_ws: fic_decode_ws_bytes;
 * ffn_ws: fic_workspace_bytes for one token of the largest layer. impl must not carry
 * FIC_FFN_FIXED (acc says it). A failure leaves x, xn, the cache at pos and acc part-way. */
typedef struct fic_ffn_slots_call {
    const fic_expert_layout *layout;
    const int32_t *slots;      /* n_experts slot indices */
    const int32_t *n_neurons;  /* n_experts sizes */
    int64_t n_experts;
} fic_ffn_slots_call;
int fic_decode_layers(fic_pool *pool, int impl, const fic_decode_shape *shape, int64_t n_layers,
                      const fic_attn_weights *const *attn, const fic_ffn_slots_call *ffn, const uint8_t *arena,
                      int64_t slot_bytes, const float *cos_table, const float *sin_table, uint16_t *const *k_cache,
                      uint16_t *const *v_cache, int64_t pos, float *x, float *xn, int64_t *acc, float *scratch,
                      int64_t scratch_floats, void *attn_ws, int64_t attn_ws_bytes, void *ffn_ws,
                      int64_t ffn_ws_bytes);

/* ---- one decode token's mixture-of-experts layer, fused (moe.c) ----
 * Routing, as flashinfer_cli/moe.py's route: logits = router xn (router: n_routed x d_model
 * float32); probs = softmax(logits); top = the top_k of probs among the allowed experts (allowed:
 * n_routed bytes, nonzero = may run; NULL: all), ties to the lower index, in rank order, min(top_k,
 * allowed count) of them; coef (n_routed floats, 0 outside top) = probs[top], divided by their sum
 * when norm_topk; softmax_after: coef = softmax(logits[top]) instead.
 * fic_moe_route returns the count picked (>= 0) or a status. fic_moe_guess: the top_k of
 * router (rmsnorm(x, ffn_norm)) (a next layer's experts, guessed from this layer's residual; no
 * allowed mask), returns the count. fic_moe_shared: x += [sigmoid(shared_gate . xn)] *
 * down(silu(gate xn) * (up xn)) (nothing when shared_neurons is 0). fic_moe_decode: the routing,
 * then, when every expert with a nonzero coef is resident (slot_of[e] >= 0, the layer's row of the
 * arena's table; n_neurons[e] its size), x += sum_e coef_e expert_e(xn) over them
 * (fic_experts_ffn_slots, in fixed point with the columns down layout, FIC_FFN_FIXED: the bits
 * streaming.py's runner gives whichever experts it reads) and the shared expert; returns FIC_OK (*n_top = the count picked), or the
 * number of experts not resident (> 0: only probs, coef, top and *n_top are written, x is not), or a
 * status. ws: 64-byte aligned, at least fic_moe_ws_bytes(threads of pool, shape) bytes. */
typedef struct fic_moe_shape {
    int64_t d_model;
    int32_t n_routed;
    int32_t top_k;
    int32_t softmax_after;   /* 0: softmax over every expert, then the top-k; 1: top-k logits, then softmax */
    int32_t norm_topk;       /* softmax before: the top-k probabilities renormalised to sum 1 */
    int64_t shared_neurons;  /* 0: no shared expert */
    int64_t max_neurons;     /* the largest routed expert's neurons */
    float norm_eps;          /* fic_moe_guess's rmsnorm */
    int32_t reserved;        /* 0 */
} fic_moe_shape;
typedef struct fic_moe_weights {
    const float *router;          /* n_routed x d_model */
    const uint8_t *shared_w_gate; /* shared_neurons rows of d_model (NULL without a shared expert) */
    const uint8_t *shared_w_up;
    const uint8_t *shared_w_down; /* d_model rows of shared_neurons */
    const float *shared_gate;     /* d_model floats: the sigmoid gate, or NULL */
    int32_t gate_fmt;
    int32_t up_fmt;
    int32_t down_fmt;
    int32_t reserved;             /* 0 */
} fic_moe_weights;
int64_t fic_moe_ws_bytes(int n_threads, const fic_moe_shape *shape);
int fic_moe_route(fic_pool *pool, int impl, const fic_moe_shape *shape, const float *router, const float *xn,
                  const uint8_t *allowed, float *probs, float *coef, int32_t *top, void *ws, int64_t ws_bytes);
int fic_moe_guess(fic_pool *pool, int impl, const fic_moe_shape *shape, const float *router, const float *ffn_norm,
                  const float *x, int32_t *top, void *ws, int64_t ws_bytes);
int fic_moe_shared(fic_pool *pool, int impl, const fic_moe_shape *shape, const fic_moe_weights *w, const float *xn,
                   float *x, void *ws, int64_t ws_bytes);
int fic_moe_decode(fic_pool *pool, int impl, const fic_moe_shape *shape, const fic_moe_weights *w,
                   const fic_expert_layout *layout, const uint8_t *arena, int64_t slot_bytes, const int32_t *slot_of,
                   const int32_t *n_neurons, const uint8_t *allowed, const float *xn, float *x, float *probs,
                   float *coef, int32_t *top, int32_t *n_top, void *ws, int64_t ws_bytes);

/* ---- a decode token through a mixture of experts' layers, fused (decode.c) ----
 * For l = l0 .. n_layers-1: fic_decode_attn(attn[l], k_cache[l], v_cache[l]) on x and xn, then
 * fic_moe_decode(moe[l]) (probs and coef: scratch, n_routed floats of the largest layer; top:
 * moe[l].top, its count n_top[l]). Returns the first layer whose picked experts are not all
 * resident (its attention done, its routing written, x without its FFN: the caller reads and runs
 * them, then calls again from l + 1), n_layers when every layer ran, or a status. The same calls in
 * the same order as a caller making them layer by layer: the same bits. */
typedef struct fic_moe_layer_call {
    const fic_moe_shape *shape;
    const fic_moe_weights *w;
    const fic_expert_layout *layout; /* the layer's bundles (ffn_down's format may differ by layer) */
    const int32_t *slot_of;    /* the layer's row of the arena's slot table */
    const int32_t *n_neurons;  /* the layer's row of expert sizes */
    const uint8_t *allowed;    /* NULL: every expert may run */
    int32_t *top;              /* out: the picks, top_k ints */
} fic_moe_layer_call;
int fic_decode_moe_layers(fic_pool *pool, int impl, const fic_decode_shape *shape, int64_t l0, int64_t n_layers,
                          const fic_attn_weights *const *attn, const fic_moe_layer_call *moe,
                          const uint8_t *arena, int64_t slot_bytes, const float *cos_table, const float *sin_table,
                          uint16_t *const *k_cache, uint16_t *const *v_cache, int64_t pos, float *x, float *xn,
                          float *probs, float *coef, int32_t *n_top, void *attn_ws, int64_t attn_ws_bytes,
                          void *moe_ws, int64_t moe_ws_bytes);

/* ---- memory (pool.c) ---- */
/* n_bytes zeroed, 4 KiB aligned; with huge != 0, 2 MiB aligned and madvise(MADV_HUGEPAGE).
 * NULL on failure. Free with fic_free. */
void *fic_alloc(size_t n_bytes, int huge);
void fic_free(void *p);

/* ---- expert streaming (stream.c) ---- */
enum fic_io {
    FIC_IO_AUTO = 0,   /* io_uring if the kernel allows it, else pread */
    FIC_IO_URING = 1,
    FIC_IO_PREAD = 2
};
enum fic_open_flags {
    FIC_OPEN_NO_DIRECT = 1 /* never try O_DIRECT (buffered reads, pages dropped after) */
};

typedef struct fic_read_req {
    int64_t offset;     /* in: file offset */
    int64_t length;     /* in: bytes to read */
    void *dst;          /* in: destination, at least length bytes */
    uint32_t crc32c;    /* in: expected CRC32C of the bytes, checked when check_crc != 0 */
    int32_t check_crc;  /* in */
    int32_t status;     /* out: FIC_OK, FIC_ERR_IO, FIC_ERR_SHORT, FIC_ERR_CRC or FIC_ERR_ARG */
    int32_t sys_errno;  /* out: errno behind FIC_ERR_IO */
    int64_t n_read;     /* out: bytes actually read */
} fic_read_req;

/* Fault injection, for tests (kernels.Reader fills it from FIC_FAULTS). A reader counts its read
 * operations while any rule is on: each pread call and each io_uring completion, retries included,
 * numbered 1, 2, ... from the open (or the last fic_reader_set_faults). A rule hits operation n when
 * n > after and (n + phase) % every == 0, phase = a hash of (seed, kind) mod every (0 when seed is
 * 0), until it has hit `count` times (0: no limit). A hit replaces the operation's result after the
 * real read: EIO fails the request (FIC_ERR_IO, sys_errno EIO) and scribbles over the bytes the
 * operation read (a failed read promises nothing about them); EAGAIN and EINTR are retried, as
 * real ones are, up to a bound of consecutive retries without progress (then FIC_ERR_IO with that
 * errno); SHORT returns about half of what the operation asked (4096-aligned under O_DIRECT, where
 * a request of one block cannot be shortened and is not hit), and the remainder is read again;
 * SLOW delays the operation by arg microseconds (and may come with another kind's hit). When
 * several of EIO, EAGAIN, EINTR and SHORT hit one operation, the first in that order wins and the
 * others neither apply nor count. */
enum fic_fault_kind {
    FIC_FAULT_EIO = 0,
    FIC_FAULT_EAGAIN = 1,
    FIC_FAULT_EINTR = 2,
    FIC_FAULT_SHORT = 3,
    FIC_FAULT_SLOW = 4,
    FIC_FAULT_KINDS = 5
};
typedef struct fic_fault_rule {
    int64_t every; /* 0: the rule is off */
    int64_t count; /* most hits (0: no limit) */
    int64_t after; /* operations 1..after are never hit */
    int64_t arg;   /* FIC_FAULT_SLOW: the delay in microseconds */
} fic_fault_rule;
typedef struct fic_faults {
    fic_fault_rule rules[5];   /* indexed by enum fic_fault_kind */
    uint64_t seed;
    int32_t uring_setup_errno; /* != 0: io_uring_setup is refused with this errno (EPERM as under a
                                  seccomp policy, ENOSYS): FIC_IO_AUTO falls back to pread */
    int32_t reserved;          /* 0 */
} fic_faults;

typedef struct fic_reader fic_reader;
/* Opens path for batched reads. With O_DIRECT (tried first unless FIC_OPEN_NO_DIRECT), every
 * request's offset, length and dst must be 4096-aligned. faults: NULL for none (the normal case),
 * else copied into the reader (FIC_ERR_ARG for a negative field or reserved != 0). *out_errno gets
 * errno on FIC_ERR_OPEN, and io_uring's refusal on FIC_ERR_UNSUPPORTED for FIC_IO_URING. */
int fic_reader_open(const char *path, int backend, int queue_depth, int n_threads, int flags,
                    const fic_faults *faults, fic_reader **out, int *out_errno);
/* Replaces the fault rules (NULL: none) and restarts the operation count; the hit counts are kept.
 * FIC_ERR_ARG while a batch runs or waits to be collected, or for a bad rule.
 * (uring_setup_errno only matters at open.) */
int fic_reader_set_faults(fic_reader *r, const fic_faults *faults);
/* Hits of one fault kind since the open; kind FIC_FAULT_KINDS: read operations counted while
 * rules were on. FIC_ERR_ARG for a bad kind. */
int64_t fic_reader_fault_hits(const fic_reader *r, int kind);
/* Why the reader is not on io_uring: the errno io_uring_setup (or its ring mappings) failed with,
 * injected or real (EPERM: refused by a seccomp policy; ENOSYS: no io_uring in this kernel or this
 * build); 0 when the reader uses io_uring or FIC_IO_PREAD was asked for. */
int fic_reader_uring_errno(const fic_reader *r);
/* Reads every request; returns FIC_OK when all succeeded, else the first failing status.
 * Each request's own status says what happened to it. Runs on the caller, once any other
 * caller's read and any submitted batch's I/O are over (concurrent calls take turns). */
int fic_reader_read(fic_reader *r, fic_read_req *reqs, int64_t n_reqs);
/* Non-blocking read: hands the batch to the reader's I/O thread and returns at once. FIC_ERR_ARG
 * for bad arguments or when a batch is already in flight (submitted and not yet waited for, or a
 * fic_reader_read running). reqs and every dst stay the caller's to keep valid, and untouched,
 * until fic_reader_wait returns. */
int fic_reader_submit(fic_reader *r, fic_read_req *reqs, int64_t n_reqs);
/* Blocks until the submitted batch has finished (CRC checked where asked); returns FIC_OK or its
 * first failing status, each request's status filled in as by fic_reader_read. FIC_OK when
 * nothing was submitted. One wait collects a batch; the next submit may follow. */
int fic_reader_wait(fic_reader *r);
/* 1 while a submitted batch's I/O is still running (fic_reader_wait would block), else 0. */
int fic_reader_busy(const fic_reader *r);
int fic_reader_backend(const fic_reader *r);  /* FIC_IO_URING or FIC_IO_PREAD */
int fic_reader_direct(const fic_reader *r);   /* 1 when reads bypass the page cache via O_DIRECT */
int64_t fic_reader_size(const fic_reader *r); /* file size in bytes */
void fic_reader_close(fic_reader *r);  /* waits for a submitted batch's I/O to finish first */

/* CRC32C (Castagnoli): hardware instruction where present, and the table reference. */
uint32_t fic_crc32c(uint32_t crc, const uint8_t *buf, size_t n);
uint32_t fic_crc32c_ref(uint32_t crc, const uint8_t *buf, size_t n);

/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* FIC_H */
