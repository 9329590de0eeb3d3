/* moe.c - one decode token's mixture-of-experts layer, fused: no Python between kernels.
 *
 *   logits = router xn; p = softmax(logits); top = the top_k of p among the allowed experts
 *   (ties: the lower index, as a stable sort picks them); coef = p[top] (/ their sum: norm_topk),
 *   or softmax(logits[top]) for softmax "after"; x += sum_top coef_e expert_e(xn) over arena slots;
 *   x += [sigmoid(g . xn)] down(silu(gate xn) * (up xn)) for a shared expert
 *
 * The same rules as flashinfer_cli/moe.py's route (the numpy reference, checked against it). The
 * router is a float32 fic_matvec, the experts fic_experts_ffn_slots, the shared expert three
 * fic_matvec; the softmax and the top-k (a selection over a few dozen experts) stay scalar C on the
 * calling thread. When a chosen expert is not resident the call routes only: x is left alone and
 * the caller reads the misses (streaming.py) and runs them. Every intermediate lives in the
 * caller's workspace (fic_moe_ws_bytes, sized once): nothing is allocated.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "silu.h"

#include "fic.h"

#define MOE_ALIGN 64

_Static_assert(sizeof(fic_moe_shape) == 48, "fic_moe_shape size");
_Static_assert(sizeof(fic_moe_weights) == 56, "fic_moe_weights size");

static int64_t align_up(int64_t n) { return (n + MOE_ALIGN - 1) / MOE_ALIGN * MOE_ALIGN; }

typedef struct {
    int64_t logits, sel, sel_slots, sel_n, sel_coef, tmp, h, kern; /* byte offsets */
    int64_t acc;
    int64_t kern_bytes, h_floats, total;
} moe_layout;

static int shape_ok(const fic_moe_shape *s) {
    return s && s->d_model > 0 && s->d_model <= ((int64_t)1 << 30) && s->n_routed > 0 && s->n_routed <= 65536 &&
           s->top_k > 0 && s->top_k <= s->n_routed && (s->softmax_after == 0 || s->softmax_after == 1) &&
           (s->norm_topk == 0 || s->norm_topk == 1) && s->shared_neurons >= 0 &&
           s->shared_neurons <= ((int64_t)1 << 30) && s->max_neurons > 0 && s->max_neurons <= ((int64_t)1 << 30) &&
           s->norm_eps >= 0.0f && s->reserved == 0;
}

static int layout_of(int n_threads, const fic_moe_shape *s, moe_layout *l) {
    const int64_t d = s->d_model, k = s->top_k, sh = s->shared_neurons;
    const int64_t kmax = d > sh ? d : sh;
    l->kern_bytes = fic_workspace_bytes(n_threads, 1, kmax, k, k * s->max_neurons);
    if (l->kern_bytes < 0) return FIC_ERR_ARG;
    l->h_floats = k * s->max_neurons > sh ? k * s->max_neurons : sh; /* routed h, or the shared expert's */
    int64_t off = 0;
    l->logits = off;
    off += align_up(s->n_routed * 4);
    l->sel = off;
    off += align_up(k * 4);
    l->sel_slots = off;
    off += align_up(k * 4);
    l->sel_n = off;
    off += align_up(k * 4);
    l->sel_coef = off;
    off += align_up(k * 4);
    l->tmp = off; /* the shared expert's gate and up outputs, then its down output (d floats) */
    off += align_up((2 * sh > d ? 2 * sh : d) * 4);
    l->h = off;
    off += align_up(l->h_floats * 4);
    l->acc = off; /* the routed experts' fixed-point sums (FIC_FFN_FIXED): d int64 */
    off += align_up(d * 8);
    l->kern = off;
    off += align_up(l->kern_bytes);
    l->total = off;
    return FIC_OK;
}

int64_t fic_moe_ws_bytes(int n_threads, const fic_moe_shape *shape) {
    moe_layout l;
    if (n_threads < 1 || !shape_ok(shape)) return FIC_ERR_ARG;
    int st = layout_of(n_threads, shape, &l);
    return st == FIC_OK ? l.total : st;
}

/* out[0..n) = softmax(v[0..n)) (out may be v): max, exp, a float sum, a divide, as numpy does. */
static void softmax(const float *v, int64_t n, float *out) {
    float mx = v[0];
    for (int64_t i = 1; i < n; i++) mx = v[i] > mx ? v[i] : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        out[i] = expf(v[i] - mx);
        sum += out[i];
    }
    for (int64_t i = 0; i < n; i++) out[i] = out[i] / sum;
}

/* The k largest of v[0..n) among the allowed (NULL: all), in rank order; ties go to the lower index
 * (a stable sort of -v). Returns how many were picked: min(k, allowed count). O(k n): n is an
 * MoE layer's few dozen experts. */
static int32_t top_k(const float *v, int64_t n, int32_t k, const uint8_t *allowed, int32_t *out) {
    int32_t got = 0;
    for (; got < k; got++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++) {
            if (allowed && !allowed[i]) continue;
            int taken = 0;
            for (int32_t j = 0; j < got && !taken; j++) taken = out[j] == i;
            if (taken) continue;
            if (best < 0 || v[i] > v[best]) best = i;
        }
        if (best < 0) break;
        out[got] = (int32_t)best;
    }
    return got;
}

/* The routing of one token into probs (n_routed), coef (n_routed, 0 outside the top) and top (rank
 * order); logits is the router's output. Returns the count picked. */
static int32_t route(const fic_moe_shape *s, const float *logits, const uint8_t *allowed, float *probs, float *coef,
                     int32_t *top) {
    const int64_t e = s->n_routed;
    softmax(logits, e, probs);
    const int32_t k = top_k(probs, e, s->top_k, allowed, top);
    memset(coef, 0, (size_t)e * sizeof(float));
    if (k == 0) return 0;
    if (s->softmax_after) {
        float mx = logits[top[0]], sum = 0.0f;
        for (int32_t j = 1; j < k; j++) mx = logits[top[j]] > mx ? logits[top[j]] : mx;
        for (int32_t j = 0; j < k; j++) {
            coef[top[j]] = expf(logits[top[j]] - mx);
            sum += coef[top[j]];
        }
        for (int32_t j = 0; j < k; j++) coef[top[j]] = coef[top[j]] / sum;
    } else {
        float sum = 0.0f;
        for (int32_t j = 0; j < k; j++) sum += probs[top[j]];
        for (int32_t j = 0; j < k; j++) coef[top[j]] = s->norm_topk ? probs[top[j]] / sum : probs[top[j]];
    }
    return k;
}

static int carve(fic_pool *pool, const fic_moe_shape *s, void *ws, int64_t ws_bytes, moe_layout *l) {
    if (!shape_ok(s) || !ws || ((uintptr_t)ws % MOE_ALIGN) != 0) return FIC_ERR_ARG;
    int st = layout_of(pool ? fic_pool_threads(pool) : 1, s, l);
    if (st != FIC_OK) return st;
    return ws_bytes < l->total ? FIC_ERR_WORKSPACE : FIC_OK;
}

int fic_moe_route(fic_pool *pool, int impl, const fic_moe_shape *s, const float *router, const float *xn,
                  const uint8_t *allowed, float *probs, float *coef, int32_t *top, void *ws, int64_t ws_bytes) {
    moe_layout l;
    if (!router || !xn || !probs || !coef || !top) return FIC_ERR_ARG;
    int st = carve(pool, s, ws, ws_bytes, &l);
    if (st != FIC_OK) return st;
    uint8_t *base = ws;
    float *logits = (float *)(base + l.logits);
    st = fic_matvec(pool, impl, FIC_F32, (const uint8_t *)router, xn, logits, s->n_routed, s->d_model,
                    base + l.kern, l.kern_bytes);
    if (st != FIC_OK) return st;
    return route(s, logits, allowed, probs, coef, top);
}

int fic_moe_guess(fic_pool *pool, int impl, const fic_moe_shape *s, const float *router, const float *ffn_norm,
                  const float *x, int32_t *top, void *ws, int64_t ws_bytes) {
    moe_layout l;
    if (!router || !ffn_norm || !x || !top) return FIC_ERR_ARG;
    int st = carve(pool, s, ws, ws_bytes, &l);
    if (st != FIC_OK) return st;
    uint8_t *base = ws;
    float *logits = (float *)(base + l.logits), *xn = (float *)(base + l.tmp);
    const int64_t d = s->d_model;
    double ss = 0.0;
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    const float r = (float)(1.0 / sqrt(ss / (double)d + (double)s->norm_eps));
    for (int64_t i = 0; i < d; i++) xn[i] = (x[i] * r) * ffn_norm[i];
    st = fic_matvec(pool, impl, FIC_F32, (const uint8_t *)router, xn, logits, s->n_routed, d, base + l.kern,
                    l.kern_bytes);
    if (st != FIC_OK) return st;
    return top_k(logits, s->n_routed, s->top_k, NULL, top);
}

int fic_moe_shared(fic_pool *pool, int impl, const fic_moe_shape *s, const fic_moe_weights *w, const float *xn,
                   float *x, void *ws, int64_t ws_bytes) {
    moe_layout l;
    if (!w || !xn || !x) return FIC_ERR_ARG;
    int st = carve(pool, s, ws, ws_bytes, &l);
    if (st != FIC_OK) return st;
    const int64_t d = s->d_model, n = s->shared_neurons;
    if (n == 0) return FIC_OK;
    if (!w->shared_w_gate || !w->shared_w_up || !w->shared_w_down) return FIC_ERR_ARG;
    uint8_t *base = ws;
    float *g = (float *)(base + l.tmp), *u = g + n, *out = (float *)(base + l.tmp);
    void *kern = base + l.kern;
    const int64_t rg = fic_row_bytes(w->gate_fmt, d);
    if (rg < 0) return FIC_ERR_ARG;
    if (w->gate_fmt == w->up_fmt && w->shared_w_up == w->shared_w_gate + n * rg) {
        /* gate and up back to back in one format (the engine's dense buffer): one matvec, one
         * dispatch to the pool; its rows are the same dot products */
        st = fic_matvec(pool, impl, w->gate_fmt, w->shared_w_gate, xn, g, 2 * n, d, kern, l.kern_bytes);
    } else {
        st = fic_matvec(pool, impl, w->gate_fmt, w->shared_w_gate, xn, g, n, d, kern, l.kern_bytes);
        if (st == FIC_OK) st = fic_matvec(pool, impl, w->up_fmt, w->shared_w_up, xn, u, n, d, kern, l.kern_bytes);
    }
    if (st != FIC_OK) return st;
    for (int64_t i = 0; i < n; i++) g[i] = fic_silu(g[i]) * u[i];
    float *h = (float *)(base + l.h); /* down's input must not alias its output (tmp) */
    memcpy(h, g, (size_t)n * sizeof(float));
    st = fic_matvec(pool, impl, w->down_fmt, w->shared_w_down, h, out, d, n, kern, l.kern_bytes);
    if (st != FIC_OK) return st;
    if (w->shared_gate) {
        float dot = 0.0f;
        for (int64_t i = 0; i < d; i++) dot += xn[i] * w->shared_gate[i];
        const float sg = 1.0f / (1.0f + expf(-dot));
        for (int64_t i = 0; i < d; i++) out[i] *= sg;
    }
    for (int64_t i = 0; i < d; i++) x[i] += out[i];
    return FIC_OK;
}

int fic_moe_decode(fic_pool *pool, int impl, const fic_moe_shape *s, const fic_moe_weights *w,
                   const fic_expert_layout *layout, const uint8_t *arena, int64_t slot_bytes, const int32_t *slot_of,
                   const int32_t *n_neurons, const uint8_t *allowed, const float *xn, float *x, float *probs,
                   float *coef, int32_t *top, int32_t *n_top, void *ws, int64_t ws_bytes) {
    moe_layout l;
    if (!w || !layout || !arena || !slot_of || !n_neurons || !n_top || slot_bytes <= 0) return FIC_ERR_ARG;
    if (layout->d_model != s->d_model) return FIC_ERR_ARG;
    int st = fic_moe_route(pool, impl, s, w->router, xn, allowed, probs, coef, top, ws, ws_bytes);
    if (st < 0) return st;
    const int32_t k = st;
    *n_top = k;
    carve(pool, s, ws, ws_bytes, &l); /* checked by fic_moe_route */
    uint8_t *base = ws;
    int32_t *sel = (int32_t *)(base + l.sel), *sel_slots = (int32_t *)(base + l.sel_slots);
    int32_t *sel_n = (int32_t *)(base + l.sel_n);
    float *sel_coef = (float *)(base + l.sel_coef);
    /* the chosen experts in index order (the order streaming.py runs them in: the same sums) */
    int32_t n_sel = 0, missing = 0;
    for (int64_t e = 0; e < s->n_routed && n_sel < k; e++) {
        if (coef[e] == 0.0f) continue; /* streaming.py runs the experts some token weighs, no others */
        if (n_neurons[e] <= 0 || n_neurons[e] > s->max_neurons) return FIC_ERR_ARG;
        sel[n_sel] = (int32_t)e;
        sel_slots[n_sel] = slot_of[e];
        sel_n[n_sel] = n_neurons[e];
        sel_coef[n_sel] = coef[e];
        missing += slot_of[e] < 0;
        n_sel++;
    }
    if (missing) return missing;
    if (n_sel && layout->down_rows) {
        st = fic_experts_ffn_slots(pool, impl, layout, arena, slot_bytes, sel_slots, sel_n, n_sel, sel_coef, xn, x, 1,
                                   (float *)(base + l.h), l.h_floats, base + l.kern, l.kern_bytes);
        if (st != FIC_OK) return st;
    } else if (n_sel) {
        /* summed in fixed point as streaming.py sums them: the same bits whichever experts were
         * resident (fic.h, FIC_FFN_FIXED) */
        int64_t *acc = (int64_t *)(base + l.acc);
        memset(acc, 0, (size_t)s->d_model * sizeof *acc);
        st = fic_experts_ffn_slots(pool, impl | FIC_FFN_FIXED, layout, arena, slot_bytes, sel_slots, sel_n, n_sel,
                                   sel_coef, xn, (float *)acc, 1, (float *)(base + l.h), l.h_floats, base + l.kern,
                                   l.kern_bytes);
        if (st != FIC_OK) return st;
        fic_fixed_flush(acc, x, s->d_model);
    }
    st = fic_moe_shared(pool, impl, s, w, xn, x, ws, ws_bytes);
    return st;
}
