"""The fused decode step (csrc/decode.c, kernels.DecodeAttention): one layer's attention block of one
token in one C call, against a numpy reference written here from the definitions (rmsnorm, rotate-half
RoPE, GQA softmax attention over an fp16 cache). Whole models (the fused decode against the numpy
decode step and transformers): tests/test_decode_model.py.

Tolerances, measured on AVX2 (max |fused - numpy| / max |numpy| over x and xn): f32 weights, the
scalar reference impl 1.5e-7 to 1.9e-6, auto (AVX2 polynomial exp, FMA sums) 1.1e-7 to 5.6e-6 (the
largest on the 576-wide shape, where a k or v element's fp16 rounding can fall the other way of
float64's); bound 2e-5. Quantized weights (q4_0, q8_0; the numpy side dequantizes with the gguf
package): 1.9e-7 to 6.3e-7 here; bound 2e-5 for the reference, 2e-2 for auto, whose matvec may round
activations to 8 bits on other CPUs (Q4_0 on AVX-512 VNNI), about 1% of a dot product.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels
from flashinfer_cli.kernels import AttnBlockWeights, DecodeAttention, DecodeShape, QTensor

RNG = np.random.default_rng(7)


def weights(m: int, k: int) -> np.ndarray:
    """Rows whose products with a unit-variance x have a standard deviation of 1.6, whatever k
    (scores of a realistic sharpness: the softmax neither flat nor one-hot)."""
    return (RNG.standard_normal((m, k)) * (1.6 / np.sqrt(k))).astype(np.float32)


def f32_matrix(m: int, k: int) -> QTensor:
    w = weights(m, k)
    return QTensor("f32", (m, k), w.reshape(-1).view(np.uint8).copy())


def dense(qt: QTensor) -> np.ndarray:
    """The matrix as float64, decoded by the gguf package (independent of fic's dequantizer)."""
    if qt.fmt == "f32":
        return qt.data.view(np.float32).reshape(qt.shape).astype(np.float64)
    gguf = pytest.importorskip("gguf")
    kind = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[qt.fmt]
    raw = qt.data.reshape(qt.shape[0], -1)
    return gguf.quants.dequantize(raw, kind).reshape(qt.shape).astype(np.float64)


def rope_tables(ctx: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(ctx), inv)
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_block(shape: DecodeShape, lw: AttnBlockWeights, cos, sin, k_cache, v_cache, pos, x):
    """numpy float64, from the definitions; k_cache/v_cache (ctx, kv, hd) float16 are updated at pos.
    Returns (new x, xn)."""
    nh, nkv, hd, eps = shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.norm_eps
    xa = rmsnorm(x.astype(np.float64), lw.attn_norm, eps)
    q, k, v = dense(lw.wq) @ xa, dense(lw.wk) @ xa, dense(lw.wv) @ xa
    if lw.qkv_bias is not None:
        b = lw.qkv_bias.astype(np.float64)
        q, k, v = q + b[:nh * hd], k + b[nh * hd:(nh + nkv) * hd], v + b[(nh + nkv) * hd:]
    if shape.qk_norm == "full":
        q, k = rmsnorm(q, lw.q_norm, eps), rmsnorm(k, lw.k_norm, eps)
    q, k = q.reshape(nh, hd), k.reshape(nkv, hd)
    if shape.qk_norm == "head":
        q, k = rmsnorm(q, lw.q_norm, eps), rmsnorm(k, lw.k_norm, eps)
    half = hd // 2
    c, s = cos[pos].astype(np.float64), sin[pos].astype(np.float64)

    def rot(a):
        return a * c + np.concatenate([-a[:, half:], a[:, :half]], axis=1) * s

    q, k = rot(q), rot(k)
    k_cache[pos], v_cache[pos] = k.astype(np.float16), v.reshape(nkv, hd).astype(np.float16)
    keys, vals = k_cache[:pos + 1].astype(np.float64), v_cache[:pos + 1].astype(np.float64)
    g = nh // nkv
    out = np.empty((nh, hd))
    for h in range(nh):
        sc = keys[:, h // g] @ q[h] * shape.scale
        p = np.exp(sc - sc.max())
        out[h] = p @ vals[:, h // g] / p.sum()
    x_new = x.astype(np.float64) + dense(lw.wo) @ out.reshape(-1)
    return x_new, rmsnorm(x_new, lw.ffn_norm, eps)


def make_layer(shape: DecodeShape, *, bias: bool, fmt: str = "f32", packed: bool = True) -> AttnBlockWeights:
    d, nq, nkv = shape.d_model, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    vec = lambda n: (1.0 + 0.3 * RNG.standard_normal(n)).astype(np.float32)  # noqa: E731
    if fmt == "f32":
        w = f32_matrix(nq + 2 * nkv, d)
        wo = f32_matrix(d, nq)
    else:
        w = kernels.quantize(weights(nq + 2 * nkv, d), fmt)
        wo = kernels.quantize(weights(d, nq), fmt)
    wq, wk, wv = w.rows(0, nq), w.rows(nq, nq + nkv), w.rows(nq + nkv, nq + 2 * nkv)
    if not packed:  # three separate buffers: three matvecs
        wq, wk, wv = (QTensor(t.fmt, t.shape, t.data.copy()) for t in (wq, wk, wv))
    norms = {"head": (shape.head_dim, shape.head_dim), "full": (nq, nkv)}.get(shape.qk_norm)
    return AttnBlockWeights(vec(d), wq, wk, wv, wo, vec(d),
                            qkv_bias=(RNG.standard_normal(nq + 2 * nkv) * 0.5).astype(np.float32) if bias else None,
                            q_norm=vec(norms[0]) if norms else None, k_norm=vec(norms[1]) if norms else None)


def run_both(shape: DecodeShape, lw: AttnBlockWeights, *, steps: int, ctx: int, impl: str, start: int = 0):
    """`steps` tokens at positions start.. through the fused block and the reference, each with its
    own cache (positions before start filled with the same random fp16 rows); returns the largest
    relative differences of x and xn, and of the caches."""
    nkv, hd = shape.n_kv_heads, shape.head_dim
    cos, sin = rope_tables(ctx, hd)
    k = np.zeros((1, ctx, nkv, hd), np.float16)
    v = np.zeros_like(k)
    k[0, :start] = RNG.standard_normal((start, nkv, hd)).astype(np.float16)
    v[0, :start] = RNG.standard_normal((start, nkv, hd)).astype(np.float16)
    rk, rv = k[0].copy(), v[0].copy()
    x = np.zeros(shape.d_model, np.float32)
    xn = np.zeros_like(x)
    block = DecodeAttention(shape, [lw], cos, sin, k, v, x, xn)
    worst = 0.0
    for pos in range(start, start + steps):
        x[:] = RNG.standard_normal(shape.d_model).astype(np.float32)
        want_x, want_xn = reference_block(shape, lw, cos, sin, rk, rv, pos, x.copy())
        block.run(0, pos, impl=impl)
        for got, want in ((x, want_x), (xn, want_xn)):
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    cache = max(float(np.abs(k[0].astype(np.float32) - rk.astype(np.float32)).max()),
                float(np.abs(v[0].astype(np.float32) - rv.astype(np.float32)).max()))
    return worst, cache, block


SHAPES = {
    "llama": DecodeShape(64, 4, 2, 16, 1e-6, 0.25),
    "mha": DecodeShape(96, 3, 3, 32, 1e-5, 32 ** -0.5),
    "qwen3": DecodeShape(64, 4, 2, 32, 1e-6, 32 ** -0.5, "head"),
    "olmoe": DecodeShape(64, 4, 4, 16, 1e-5, 0.25, "full"),
    "smollm2-like": DecodeShape(576, 9, 3, 64, 1e-5, 0.125),
}


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("bias", [False, True])
def test_fused_block_matches_numpy(name, bias, impl):
    shape = SHAPES[name]
    worst, cache, _ = run_both(shape, make_layer(shape, bias=bias), steps=6, ctx=320, impl=impl, start=300)
    assert worst < 2e-5
    assert cache < 2e-2  # k and v rows: the same fp16 rounding on both sides, up to one ulp of ~4


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_block_quantized_weights(fmt, packed):
    """Quantized matrices, packed q|k|v (one matvec) or three buffers (three): against numpy on the
    gguf package's dequantization. The exact decode measures < 1e-6; FIC_DECODE=int8 (the default)
    rounds activations to 8 bits (as llama.cpp), about 1% of a dot product: 4e-2 of the largest
    value covers that (measured up to 2.1e-2)."""
    shape = SHAPES["llama"]
    with kernels.decode_mode("exact"):
        for impl in ("ref", "auto"):
            worst, _, _ = run_both(shape, make_layer(shape, bias=True, fmt=fmt, packed=packed), steps=4, ctx=64,
                                   impl=impl, start=20)
            assert worst < 2e-5
    with kernels.decode_mode("int8"):
        worst, _, _ = run_both(shape, make_layer(shape, bias=True, fmt=fmt, packed=packed), steps=4, ctx=64,
                               impl="auto", start=20)
        assert worst < 4e-2


def test_threads_do_not_change_the_result_and_workspace_grows_only_for_more_threads():
    shape = SHAPES["qwen3"]
    lw = make_layer(shape, bias=False)
    before = kernels.get_threads()
    try:
        results = []
        for n in (1, 2, 3):
            kernels.set_threads(n)
            _, _, block = run_both(shape, lw, steps=1, ctx=600, impl="auto", start=520)
            results.append(block)
        grown = results[0]
        kernels.set_threads(1)
        assert grown.growths == 0
        kernels.set_threads(3)
        x_before = grown._keep[4].copy()
        grown.run(0, 521)
        assert grown.growths == 1 and grown.n_threads == 3
        assert not np.array_equal(grown._keep[4], x_before)  # it ran
    finally:
        kernels.set_threads(before)


def test_bad_arguments_are_errors_not_crashes():
    shape = SHAPES["llama"]
    lw = make_layer(shape, bias=False)
    _, _, block = run_both(shape, lw, steps=1, ctx=8, impl="ref")
    with pytest.raises(ValueError, match="outside the cache"):
        block.run(0, 8)
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        block.run(0, 1, impl="sse9")
    cos, sin = rope_tables(8, 16)
    k = np.zeros((1, 8, 2, 16), np.float16)
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="float16"):
        DecodeAttention(shape, [lw], cos, sin, k.astype(np.float32), k, x, x.copy())
    with pytest.raises(ValueError, match="wo is"):
        DecodeAttention(shape, [AttnBlockWeights(lw.attn_norm, lw.wq, lw.wk, lw.wv, lw.wk, lw.ffn_norm)],
                        cos, sin, k, k.copy(), x, x.copy())
    odd = DecodeShape(64, 4, 2, 15, 1e-6, 0.25)  # RoPE needs an even head_dim: the C core says no
    with pytest.raises(ValueError, match="decode shape"):
        DecodeAttention(odd, [], np.ones((8, 15), np.float32), np.zeros((8, 15), np.float32),
                        np.zeros((0, 8, 2, 15), np.float16), np.zeros((0, 8, 2, 15), np.float16), x, x.copy())
