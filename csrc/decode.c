/* decode.c - one decode token's attention block of one layer, fused: no Python between kernels.
 *
 *   xa = rmsnorm(x, attn_norm); qkv = [Wq; Wk; Wv] xa (+ bias); q/k norm (Qwen3 per head, or one
 *   norm over all heads); RoPE (rotate-half, the position's cos/sin row); k, v -> fp16 cache at pos;
 *   att = attention(q, cache); x += Wo att; xn = rmsnorm(x, ffn_norm)
 *
 * The matrix products and the attention are fic_matvec and fic_attention (their per-CPU fast paths
 * and the pool's threads: rows of each matrix, kv heads x position slices of the attention). The
 * element-wise steps between them touch a few thousand floats and stay scalar C on the calling
 * thread: a pool dispatch costs more than they do. impl reaches every kernel, so FIC_IMPL_REF is
 * the whole step's scalar reference. Every intermediate lives in the caller's workspace
 * (fic_decode_ws_bytes, sized once): nothing is allocated.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fic.h"

#define DEC_ALIGN 64

/* The API structs cross into Python through cffi: their layout is fixed. */
_Static_assert(sizeof(fic_decode_shape) == 48, "fic_decode_shape size");
_Static_assert(sizeof(fic_attn_weights) == 88, "fic_attn_weights size");

static int64_t align_up(int64_t n) { return (n + DEC_ALIGN - 1) / DEC_ALIGN * DEC_ALIGN; }

typedef struct {
    int64_t xa, qkv, att, o, mv, att_ws; /* byte offsets of each region */
    int64_t mv_bytes, att_floats, total;
} dec_layout;

static int shape_ok(const fic_decode_shape *s) {
    return s && s->d_model > 0 && s->n_heads > 0 && s->n_kv_heads > 0 && s->head_dim > 0 && s->head_dim % 2 == 0 &&
           s->n_heads % s->n_kv_heads == 0 && s->qk_norm >= 0 && s->qk_norm <= 2 && s->reserved == 0 &&
           s->norm_eps >= 0.0f && isfinite(s->scale) && s->d_model <= ((int64_t)1 << 30) &&
           s->n_heads * s->head_dim <= ((int64_t)1 << 30);
}

static int layout_of(int n_threads, const fic_decode_shape *s, dec_layout *l) {
    const int64_t nq = s->n_heads * s->head_dim, nkv = s->n_kv_heads * s->head_dim;
    const int64_t kmax = s->d_model > nq ? s->d_model : nq;
    l->mv_bytes = fic_workspace_bytes(n_threads, 1, kmax, 0, 0);
    l->att_floats = fic_attention_ws_floats(n_threads, 1, s->n_heads, s->head_dim);
    if (l->mv_bytes < 0 || l->att_floats < 0) return FIC_ERR_ARG;
    int64_t off = 0;
    l->xa = off;
    off += align_up(s->d_model * 4);
    l->qkv = off;
    off += align_up((nq + 2 * nkv) * 4);
    l->att = off;
    off += align_up(nq * 4);
    l->o = off;
    off += align_up(s->d_model * 4);
    l->mv = off;
    off += align_up(l->mv_bytes);
    l->att_ws = off;
    off += align_up(l->att_floats * 4);
    l->total = off;
    return FIC_OK;
}

int64_t fic_decode_ws_bytes(int n_threads, const fic_decode_shape *shape) {
    dec_layout l;
    if (n_threads < 1 || !shape_ok(shape)) return FIC_ERR_ARG;
    int st = layout_of(n_threads, shape, &l);
    return st == FIC_OK ? l.total : st;
}

static int fmt_matrix_ok(int fmt, const uint8_t *w, int64_t k) { return w != NULL && fic_row_bytes(fmt, k) > 0; }

int fic_decode_attn(fic_pool *pool, int impl, const fic_decode_shape *s, const fic_attn_weights *w,
                    const float *cos_table, const float *sin_table, uint16_t *k_cache, uint16_t *v_cache,
                    int64_t pos, float *x, float *xn, void *ws, int64_t ws_bytes) {
    if (!shape_ok(s) || !w || !cos_table || !sin_table || !k_cache || !v_cache || !x || !xn || !ws) return FIC_ERR_ARG;
    if (pos < 0 || ((uintptr_t)ws % DEC_ALIGN) != 0) return FIC_ERR_ARG;
    if (!w->attn_norm || !w->ffn_norm || (s->qk_norm && (!w->q_norm || !w->k_norm))) return FIC_ERR_ARG;
    const int64_t d = s->d_model, hd = s->head_dim, nh = s->n_heads, nkv_h = s->n_kv_heads;
    const int64_t nq = nh * hd, nkv = nkv_h * hd;
    if (!fmt_matrix_ok(w->q_fmt, w->wq, d) || !fmt_matrix_ok(w->k_fmt, w->wk, d) ||
        !fmt_matrix_ok(w->v_fmt, w->wv, d) || !fmt_matrix_ok(w->o_fmt, w->wo, nq))
        return FIC_ERR_ARG;
    const int n_threads = pool ? fic_pool_threads(pool) : 1;
    dec_layout l;
    int st = layout_of(n_threads, s, &l);
    if (st != FIC_OK) return st;
    if (ws_bytes < l.total) return FIC_ERR_WORKSPACE;
    uint8_t *base = ws;
    float *xa = (float *)(base + l.xa), *qkv = (float *)(base + l.qkv), *att = (float *)(base + l.att);
    float *o = (float *)(base + l.o), *att_ws = (float *)(base + l.att_ws);
    void *mv = base + l.mv;

    fic_rmsnorm_rows(x, w->attn_norm, s->norm_eps, 1, d, xa); /* rows.c, as prefill's */
    /* q, k, v: one matvec when the three matrices are one block of rows of one format */
    const int64_t rq = fic_row_bytes(w->q_fmt, d);
    if (w->q_fmt == w->k_fmt && w->k_fmt == w->v_fmt && w->wk == w->wq + nq * rq && w->wv == w->wk + nkv * rq) {
        st = fic_matvec(pool, impl, w->q_fmt, w->wq, xa, qkv, nq + 2 * nkv, d, mv, l.mv_bytes);
    } else {
        st = fic_matvec(pool, impl, w->q_fmt, w->wq, xa, qkv, nq, d, mv, l.mv_bytes);
        if (st == FIC_OK) st = fic_matvec(pool, impl, w->k_fmt, w->wk, xa, qkv + nq, nkv, d, mv, l.mv_bytes);
        if (st == FIC_OK) st = fic_matvec(pool, impl, w->v_fmt, w->wv, xa, qkv + nq + nkv, nkv, d, mv, l.mv_bytes);
    }
    if (st != FIC_OK) return st;
    if (w->qkv_bias)
        for (int64_t i = 0; i < nq + 2 * nkv; i++) qkv[i] += w->qkv_bias[i];
    if (s->qk_norm == 1) { /* per head (Qwen3) */
        fic_rmsnorm_rows(qkv, w->q_norm, s->norm_eps, nh, hd, qkv);
        fic_rmsnorm_rows(qkv + nq, w->k_norm, s->norm_eps, nkv_h, hd, qkv + nq);
    } else if (s->qk_norm == 2) { /* one norm over all heads (OLMoE) */
        fic_rmsnorm_rows(qkv, w->q_norm, s->norm_eps, 1, nq, qkv);
        fic_rmsnorm_rows(qkv + nq, w->k_norm, s->norm_eps, 1, nkv, qkv + nq);
    }
    fic_rope_rows(qkv, 1, nh + nkv_h, hd, cos_table + pos * hd, sin_table + pos * hd);
    const int impl_f = impl & ~FIC_IMPL_EXACT; /* the flag is the matvecs'; the rest is float anyway */
    st = fic_f32_to_f16_rows(impl_f, qkv + nq, k_cache + pos * nkv, nkv);
    if (st == FIC_OK) st = fic_f32_to_f16_rows(impl_f, qkv + nq + nkv, v_cache + pos * nkv, nkv);
    if (st == FIC_OK)
        st = fic_attention(pool, impl_f, qkv, k_cache, v_cache, att, 1, pos, nh, nkv_h, hd, nkv, s->scale, att_ws,
                           l.att_floats);
    if (st == FIC_OK) st = fic_matvec(pool, impl, w->o_fmt, w->wo, att, o, d, nq, mv, l.mv_bytes);
    if (st != FIC_OK) return st;
    for (int64_t i = 0; i < d; i++) x[i] += o[i];
    fic_rmsnorm_rows(x, w->ffn_norm, s->norm_eps, 1, d, xn);
    return FIC_OK;
}

_Static_assert(sizeof(fic_ffn_slots_call) == 32, "fic_ffn_slots_call size");

int fic_decode_layers(fic_pool *pool, int impl, const fic_decode_shape *s, int64_t n_layers,
                      const fic_attn_weights *const *attn, const fic_ffn_slots_call *ffn, const uint8_t *arena,
                      int64_t slot_bytes, const float *cos_table, const float *sin_table, uint16_t *const *k_cache,
                      uint16_t *const *v_cache, int64_t pos, float *x, float *xn, int64_t *acc, float *scratch,
                      int64_t scratch_floats, void *attn_ws, int64_t attn_ws_bytes, void *ffn_ws,
                      int64_t ffn_ws_bytes) {
    if (n_layers < 0 || (n_layers > 0 && (!attn || !ffn || !k_cache || !v_cache))) return FIC_ERR_ARG;
    if (!s || impl & FIC_FFN_FIXED) return FIC_ERR_ARG; /* acc says fixed point */
    /* x += FFN(xn): as a caller's fic_experts_ffn_slots into acc (each expert rounded on its own)
     * and fic_fixed_flush, or straight into x */
    float *ffn_y = acc ? (float *)acc : x;
    const int ffn_impl = impl | (acc ? FIC_FFN_FIXED : 0);
    for (int64_t l = 0; l < n_layers; l++) {
        int st = fic_decode_attn(pool, impl, s, attn[l], cos_table, sin_table, k_cache[l], v_cache[l], pos, x, xn,
                                 attn_ws, attn_ws_bytes);
        if (st != FIC_OK) return st;
        const fic_ffn_slots_call *f = &ffn[l];
        if (f->layout == NULL || f->layout->d_model != s->d_model) return FIC_ERR_ARG;
        st = fic_experts_ffn_slots(pool, ffn_impl, f->layout, arena, slot_bytes, f->slots, f->n_neurons, f->n_experts,
                                   NULL, xn, ffn_y, 1, scratch, scratch_floats, ffn_ws, ffn_ws_bytes);
        if (st != FIC_OK) return st;
        if (acc) fic_fixed_flush(acc, x, s->d_model);
    }
    return FIC_OK;
}

_Static_assert(sizeof(fic_moe_layer_call) == 56, "fic_moe_layer_call size");

int fic_decode_moe_layers(fic_pool *pool, int impl, const fic_decode_shape *s, int64_t l0, int64_t n_layers,
                          const fic_attn_weights *const *attn, const fic_moe_layer_call *moe,
                          const uint8_t *arena, int64_t slot_bytes, const float *cos_table, const float *sin_table,
                          uint16_t *const *k_cache, uint16_t *const *v_cache, int64_t pos, float *x, float *xn,
                          float *probs, float *coef, int32_t *n_top, void *attn_ws, int64_t attn_ws_bytes,
                          void *moe_ws, int64_t moe_ws_bytes) {
    if (!s || l0 < 0 || n_layers < l0 || (n_layers > l0 && (!attn || !moe || !k_cache || !v_cache || !n_top)))
        return FIC_ERR_ARG;
    for (int64_t l = l0; l < n_layers; l++) {
        int st = fic_decode_attn(pool, impl, s, attn[l], cos_table, sin_table, k_cache[l], v_cache[l], pos, x, xn,
                                 attn_ws, attn_ws_bytes);
        if (st != FIC_OK) return st;
        const fic_moe_layer_call *m = &moe[l];
        if (m->shape == NULL || m->shape->d_model != s->d_model) return FIC_ERR_ARG;
        st = fic_moe_decode(pool, impl, m->shape, m->w, m->layout, arena, slot_bytes, m->slot_of, m->n_neurons,
                            m->allowed, xn, x, probs, coef, m->top, &n_top[l], moe_ws, moe_ws_bytes);
        if (st < 0) return st;
        if (st > 0) return (int)l; /* experts to read: the caller runs this layer's FFN, then goes on */
    }
    return (int)n_layers;
}
