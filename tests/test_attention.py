"""fic_attention (csrc/attention.c): causal GQA attention over an fp16 KV cache, every
implementation against a float64 numpy reference on the same fp16-rounded K/V.

Tolerance, per output element (query i, head j, column d), with n = pos0 + i + 1 keys, u = 2^-24,
p_k = exp(s_k - max s) and L = sum p_k, all computed in float64:
  * a score s_k = scale * q.k_k is an fp32 dot of head_dim terms and one multiply: its absolute
    error is at most (head_dim + 1) u scale sum_d |q_d k_kd|. Subtracting the running max adds
    u |s_k - m|; exp adds a relative error of a few ulp (Cephes' polynomial, or expf), and every
    rescale by exp(m_old - m_new) another one, at most one per tile of 32 positions. An error e_k in
    the exponent moves the output by at most sum_k p_k e_k |v_k - o| / L (first order).
  * acc = sum p_k v_k and L are fp32 sums of n terms (and the slices' merge): relative error
    (n + 4) u of sum_k p_k |v_k| for the numerator and of L for the denominator, so
    2 (n + 4) u sum_k p_k |v_k| / L on the output.
The bound is the sum of both, times 2 for the second-order terms. It is a worst case (errors
grow like n u, not sqrt(n) u); masking bugs are still caught, because short contexts (where one
key more or less moves the output by ~1/n) are tested as well as long ones, and positions past
the last filled one are NaN (reading one poisons the output). The numpy reference bounds
|v_k - o| by |v_k| + |o| (all matmuls); the C one under qemu uses |v_k - o| itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import kernels
from flashinfer_cli._fic import ffi, lib

REPO = Path(__file__).resolve().parents[1]
U = 2.0 ** -24
TILE = 32  # ATT_B in attention.c: positions per tile (one rescale per tile)
IMPLS = kernels.available_impls()

# (n_heads, n_kv_heads, head_dim): SmolLM2-135M, Qwen2.5-1.5B, plain MHA, and an odd head_dim
# (tails of every vector loop).
CONFIGS = [(9, 3, 64), (12, 2, 128), (4, 4, 32), (3, 1, 20)]


def make_cache(rng: np.random.Generator, ctx: int, filled: int, n_kv: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    k = rng.standard_normal((ctx, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((ctx, n_kv, hd)).astype(np.float16)
    k[filled:] = np.nan  # never to be read
    v[filled:] = np.nan
    return k, v


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 causal GQA attention and the per-element error bound (see the module docstring;
    |v_k - o| is bounded by |v_k| + |o| so that everything is a matmul)."""
    t, nh, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    n_all = pos0 + t
    qg = q.astype(np.float64).reshape(t, nkv, g, hd).transpose(1, 0, 2, 3).reshape(nkv, t * g, hd)
    kk = np.ascontiguousarray(k[:n_all].astype(np.float64).transpose(1, 2, 0))  # (kv, hd, N)
    vv = np.ascontiguousarray(v[:n_all].astype(np.float64).transpose(1, 0, 2))  # (kv, N, hd)
    s = scale * (qg @ kk)                                  # (kv, t*g, N)
    s_mag = abs(scale) * (np.abs(qg) @ np.abs(kk))
    n = np.repeat(np.arange(pos0 + 1, n_all + 1), g)       # keys seen by each row
    seen = np.arange(n_all)[None, :] < n[:, None]          # (t*g, N) causal mask
    s = np.where(seen, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    L = p.sum(axis=-1, keepdims=True)
    o = (p @ vv) / L
    e = (hd + 1) * U * s_mag + U * np.where(seen, m - s, 0) + ((4 + 2 * (n // TILE + 1)) * U)[:, None]
    pe = p * e
    v_abs = np.abs(vv)
    spread = (pe @ v_abs + pe.sum(axis=-1, keepdims=True) * np.abs(o)) / L
    acc = 2 * (n[:, None] + 4) * U * (p @ v_abs) / L
    tol = 2 * (spread + acc) + 1e-30

    def back(a: np.ndarray) -> np.ndarray:  # (kv, t*g, hd) -> (t, nh, hd)
        return a.reshape(nkv, t, g, hd).transpose(1, 0, 2, 3).reshape(t, nh, hd)

    return back(o), back(tol)


def check(q, k, v, pos0, scale, impl, threads=None):
    want, tol = reference(q, k, v, pos0, scale)
    got = kernels.attention(q, k, v, pos0, scale, impl=impl)
    assert got.shape == q.shape and got.dtype == np.float32
    assert np.all(np.isfinite(got))
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert np.all(err <= tol), f"{impl}: at {worst} err {err[worst]:.3g} > tol {tol[worst]:.3g}"
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_decode(impl, cfg):
    nh, nkv, hd = cfg
    rng = np.random.default_rng(nh * 1000 + hd)
    for n in (1, 2, 31, 32, 33, 255, 257, 1000, 4096):
        k, v = make_cache(rng, n + 3, n, nkv, hd)
        q = rng.standard_normal((1, nh, hd)).astype(np.float32)
        check(q, k, v, n - 1, 1.0 / np.sqrt(hd), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", [(32, 4, 128), (20, 2, 48), (4, 1, 16), (5, 1, 64)],
                         ids=lambda c: "x".join(map(str, c)))
def test_decode_four_heads_at_once(impl, cfg):
    """AVX-512 decode takes four heads of a kv head at once (scores4/accum4 in attention.c): 8 heads a
    kv head (Qwen3-MoE, the 20B synthetic model), 10 (4 + 4 + a pair), 4 with head_dim 16 (no 64-column
    group) and 5 (4 + one), at tile-aligned and ragged context lengths."""
    nh, nkv, hd = cfg
    rng = np.random.default_rng(nh * 100 + hd)
    for n in (1, 3, 33, 257, 1000):
        k, v = make_cache(rng, n + 3, n, nkv, hd)
        q = rng.standard_normal((1, nh, hd)).astype(np.float32)
        check(q, k, v, n - 1, 1.0 / np.sqrt(hd), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_prefill(impl, cfg):
    nh, nkv, hd = cfg
    rng = np.random.default_rng(nh * 7 + hd)
    for t, pos0 in ((2, 0), (7, 0), (8, 0), (9, 3), (33, 0), (17, 100), (5, 4000), (40, 4056)):
        k, v = make_cache(rng, pos0 + t + 5, pos0 + t, nkv, hd)
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        check(q, k, v, pos0, 1.0 / np.sqrt(hd), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", [(9, 3, 64), (14, 2, 64), (2, 1, 48)], ids=lambda c: "x".join(map(str, c)))
def test_prefill_blocks_of_rows(impl, cfg):
    """AVX2 prefill runs a query block's tiles in blocks of rows (queries x heads) while every row sees
    the tile, then per row: long prompts after unaligned prefixes, 7 heads per kv head (56 rows, padded
    to 64 lanes), head_dim 48 (three 16-column groups), so both paths and the hand-over run in one item."""
    nh, nkv, hd = cfg
    rng = np.random.default_rng(nh * 31 + hd)
    for t, pos0 in ((100, 45), (64, 0), (13, 301)):
        k, v = make_cache(rng, pos0 + t + 2, pos0 + t, nkv, hd)
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        check(q, k, v, pos0, 1.0 / np.sqrt(hd), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_and_rising_scores(impl):
    """Large scores (a peaked softmax) that grow along the context: the running max changes in
    almost every tile, so every rescale path runs."""
    nh, nkv, hd = 12, 2, 128
    rng = np.random.default_rng(5)
    n = 3000
    k, v = make_cache(rng, n, n, nkv, hd)
    k[:n] *= np.linspace(0.1, 2.0, n, dtype=np.float16)[:, None, None]
    for t in (1, 11):
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        check(q, k, v, n - t, 4.0 / np.sqrt(hd), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_exact_means(impl, cfg):
    """The bound above grows like n u, so at 4096 keys it would not see one key dropped or counted
    twice. This test can: with scale 0 every weight is exp(0) = 1 exactly (expf and the
    polynomial), and with small integer values every sum is exact in fp32 (< 2^24), so each
    output is exactly sum(v[:n]) / n up to the final multiply by 1/n (2 ulp). Any key missed or
    repeated by the causal mask, a tile, a decode slice or the merge moves it by >= 1/n."""
    nh, nkv, hd = cfg
    rng = np.random.default_rng(21)
    ctx = 4096
    k = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    v = (rng.integers(1, 9, (ctx, nkv, hd)) * rng.choice([-1, 1], (ctx, nkv, hd))).astype(np.float16)
    csum = np.cumsum(v.astype(np.float64), axis=0)  # csum[p] = sum of v[0..p]
    g = nh // nkv
    for t, pos0 in ((1, 0), (1, 1), (1, 255), (1, 256), (1, 511), (1, 2500), (1, 4095), (19, 0), (9, 247), (40, 4056)):
        q = rng.standard_normal((t, nh, hd)).astype(np.float32)
        got = kernels.attention(q, k, v, pos0, 0.0, impl=impl)
        pos = np.arange(pos0, pos0 + t)
        want = np.repeat(csum[pos], g, axis=1) / (pos + 1)[:, None, None]
        assert np.all(np.abs(got - want) <= 2.5 * U * np.abs(want) + 1e-30), (t, pos0)


@pytest.mark.parametrize("impl", IMPLS)
def test_needle_keys(impl):
    """One key per query whose score dwarfs the others (by > 40): the output is that key's V.
    Needles sit at tile (32) and decode slice (256) boundaries; a K row read at the wrong place
    gives a neighbour's V (random integers below 2000)."""
    nh, nkv, hd = 12, 2, 128
    rng = np.random.default_rng(22)
    n = 4096
    k = (0.05 * rng.standard_normal((n, nkv, hd))).astype(np.float16)
    v = (rng.permutation(n * nkv * hd).reshape(n, nkv, hd) % 2000).astype(np.float16)
    q = np.zeros((1, nh, hd), np.float32)
    q[0, :, 0] = 1.0
    for p in (0, 31, 32, 33, 255, 256, 257, 1023, 1024, 2047, 4064, 4095):
        kk = k.copy()
        kk[p, :, 0] = 60.0
        got = kernels.attention(q, kk, v, n - 1, 1.0, impl=impl)
        want = np.repeat(v[p].astype(np.float32), nh // nkv, axis=0)
        assert np.allclose(got[0], want, rtol=1e-5, atol=1e-3), p
    # prefill: query i's needle at its own last position pos0 + i (the causal edge)
    t, pos0 = 12, 250
    kk = k.copy()
    kk[pos0 + np.arange(t), :, 0] = 60.0
    qs = np.repeat(q, t, axis=0)
    got = kernels.attention(qs, kk, v, pos0, 1.0, impl=impl)
    # query i sees needles pos0..pos0+i, all with equal scores: their mean
    for i in range(t):
        want = v[pos0:pos0 + i + 1].astype(np.float64).mean(axis=0)
        assert np.allclose(got[i], np.repeat(want, nh // nkv, axis=0), rtol=1e-5, atol=1e-3), i


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_cache_layer(impl):
    """A layer of a (layers, ctx, kv, hd) cache: a C-contiguous slice, as the model holds it."""
    rng = np.random.default_rng(9)
    cache = rng.standard_normal((2, 3, 300, 3, 64)).astype(np.float16)
    q = rng.standard_normal((3, 9, 64)).astype(np.float32)
    check(q, cache[1, 0], cache[1, 1], 297, 0.125, impl)


def test_thread_count_does_not_change_results():
    """Decode slices and prefill blocks are fixed by the shapes, not by the threads."""
    rng = np.random.default_rng(11)
    k, v = make_cache(rng, 4096, 4096, 2, 128)
    before = kernels.get_threads()
    try:
        for t in (1, 9):
            q = rng.standard_normal((t, 12, 128)).astype(np.float32)
            outs = []
            for threads in (1, 2, 3):
                kernels.set_threads(threads)
                outs.append(kernels.attention(q, k, v, 4096 - t, 0.1))
            assert all(np.array_equal(outs[0], o) for o in outs[1:])
    finally:
        kernels.set_threads(before)


def test_impls_agree_with_each_other():
    rng = np.random.default_rng(12)
    k, v = make_cache(rng, 2048, 2048, 3, 64)
    q = rng.standard_normal((1, 9, 64)).astype(np.float32)
    _, tol = reference(q, k, v, 2047, 0.125)
    outs = {impl: kernels.attention(q, k, v, 2047, 0.125, impl=impl) for impl in IMPLS}
    for impl, o in outs.items():
        assert np.all(np.abs(o - outs["ref"]) <= 2 * tol), impl


def test_out_parameter_and_workspace_growth():
    rng = np.random.default_rng(13)
    k, v = make_cache(rng, 64, 64, 3, 64)
    kernels.reserve_attention(kernels.get_threads(), 16, 9, 64)
    growths = kernels.attention_ws_growths()
    out = np.empty((16, 9, 64), dtype=np.float32)
    q = rng.standard_normal((16, 9, 64)).astype(np.float32)
    assert kernels.attention(q, k, v, 10, 0.125, out=out) is out
    kernels.attention(q[:1], k, v, 63, 0.125)
    assert kernels.attention_ws_growths() == growths  # reserved: no growth
    # larger than anything else in this file asks for: grows once
    kernels.attention(np.zeros((16, 64, 256), np.float32), np.zeros((64, 8, 256), np.float16),
                      np.zeros((64, 8, 256), np.float16), 0, 0.125)
    assert kernels.attention_ws_growths() == growths + 1


def test_bad_arguments():
    k = np.zeros((16, 2, 8), np.float16)
    q = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError):  # n_heads not a multiple of n_kv_heads (C: FIC_ERR_ARG)
        kernels.attention(np.zeros((1, 3, 8), np.float32), k, k, 0, 1.0)
    with pytest.raises(ValueError):  # t = 0 (C: FIC_ERR_ARG)
        kernels.attention(np.zeros((0, 4, 8), np.float32), k, k, 0, 1.0)
    with pytest.raises(ValueError):  # non-finite scale (C: FIC_ERR_ARG)
        kernels.attention(q, k, k, 0, float("nan"))
    with pytest.raises(ValueError):  # past the cache
        kernels.attention(q, k, k, 16, 1.0)
    with pytest.raises(ValueError):
        kernels.attention(q, k.astype(np.float32), k, 0, 1.0)
    with pytest.raises(ValueError):
        kernels.attention(q, k[:, :, ::2].copy()[:, :, :4], k, 0, 1.0)
    with pytest.raises(ValueError):
        kernels.attention(q, np.zeros((16, 4, 8), np.float16)[:, ::2], k, 0, 1.0)
    # The C checks directly: workspace too small, kv_stride too short, NULL pointers, bad impl.
    ws = np.zeros(lib.fic_attention_ws_floats(1, 1, 4, 8), np.float32)
    qp, kp, op = ffi.from_buffer("float[]", q), ffi.from_buffer("uint16_t[]", k), ffi.from_buffer("float[]", q.copy())
    wp = ffi.from_buffer("float[]", ws)
    assert lib.fic_attention(ffi.NULL, 1, qp, kp, kp, op, 1, 3, 4, 2, 8, 16, 1.0, wp, ws.size) == lib.FIC_OK
    assert lib.fic_attention(ffi.NULL, 1, qp, kp, kp, op, 1, 3, 4, 2, 8, 16, 1.0, wp, ws.size - 1) == lib.FIC_ERR_ARG
    assert lib.fic_attention(ffi.NULL, 1, qp, kp, kp, op, 1, 3, 4, 2, 8, 15, 1.0, wp, ws.size) == lib.FIC_ERR_ARG
    assert lib.fic_attention(ffi.NULL, 1, qp, ffi.NULL, kp, op, 1, 3, 4, 2, 8, 16, 1.0, wp, ws.size) == lib.FIC_ERR_ARG
    assert lib.fic_attention(ffi.NULL, 1, qp, kp, kp, op, 1, -1, 4, 2, 8, 16, 1.0, wp, ws.size) == lib.FIC_ERR_ARG
    assert lib.fic_attention(ffi.NULL, 99, qp, kp, kp, op, 1, 3, 4, 2, 8, 16, 1.0, wp, ws.size) == lib.FIC_ERR_ARG
    assert lib.fic_attention_ws_floats(0, 1, 4, 8) == lib.FIC_ERR_ARG
    assert lib.fic_attention_ws_floats(1, 1, 4, 0) == lib.FIC_ERR_ARG
    unsupported = [i for name, i in kernels.IMPLS.items() if name not in IMPLS and name != "auto"]
    for i in unsupported:
        assert lib.fic_attention(ffi.NULL, i, qp, kp, kp, op, 1, 3, 4, 2, 8, 16, 1.0, wp, ws.size) \
            == lib.FIC_ERR_UNSUPPORTED


# ---- f32 -> f16 --------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_f32_to_f16_matches_numpy(impl):
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.standard_normal(1001).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 1001),
        np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.0, 65520.0, -65520.0, 1e-8, 2.98e-8,
                  6.1e-5, 6.0e-5, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, np.nan], np.float32)])
    # Every halfway case between neighbouring fp16 values in [1, 2): ties go to even.
    x = np.concatenate([x, (1.0 + (np.arange(64) + 0.5) * 2 ** -10)]).astype(np.float32)
    dst = np.empty(x.size, np.float16)
    kernels.f32_to_f16(x, dst, impl=impl)
    with np.errstate(over="ignore"):  # the values past 65520 become inf, as they should
        want = x.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(dst), nan)
    assert np.array_equal(dst.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    # into a row of a cache, as uint16 bits; odd lengths exercise the tails
    cache = np.zeros((4, 3, 7), np.float16)
    row = rng.standard_normal(21).astype(np.float32)
    kernels.f32_to_f16(row, cache[2].view(np.uint16), impl=impl)
    assert np.array_equal(cache[2].reshape(-1), row.astype(np.float16))
    assert not cache[[0, 1, 3]].any()


def test_f32_to_f16_bad_arguments():
    with pytest.raises(ValueError):
        kernels.f32_to_f16(np.zeros(4, np.float32), np.zeros(5, np.float16))
    with pytest.raises(ValueError):
        kernels.f32_to_f16(np.zeros(4, np.float64), np.zeros(4, np.float16))
    with pytest.raises(ValueError):
        kernels.f32_to_f16(np.zeros(4, np.float32), np.zeros(4, np.float32))
    assert lib.fic_f32_to_f16_rows(1, ffi.NULL, ffi.NULL, 4) == lib.FIC_ERR_ARG


# ---- NEON under qemu ------------------------------------------------------------------------

# REF and NEON against a double-precision reference in C (no Python for AArch64 here), with the
# bound of the module docstring; plus f32 -> f16 NEON against the reference, bit for bit.
NEON_ATTN_C = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fic.h"

static float rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f; }

static int run(int nh, int nkv, int hd, int t, int pos0, unsigned *seed) {
    const int n = pos0 + t, g = nh / nkv, kvs = nkv * hd;
    const double u = 5.9604644775390625e-8, scale = 1.0 / sqrt(hd);
    float *q = malloc(sizeof(float) * t * nh * hd), *o[2];
    uint16_t *k = malloc(2 * (size_t)n * kvs), *v = malloc(2 * (size_t)n * kvs);
    double *s = malloc(sizeof(double) * n), *mag = malloc(sizeof(double) * n);
    int bad = 0;
    for (int i = 0; i < t * nh * hd; i++) q[i] = 2.0f * rnd(seed);
    for (int i = 0; i < n * kvs; i++) { k[i] = fic_fp32_to_fp16(2.0f * rnd(seed)); v[i] = fic_fp32_to_fp16(2.0f * rnd(seed)); }
    int64_t wsn = fic_attention_ws_floats(2, t, nh, hd);
    float *ws = malloc(sizeof(float) * wsn);
    fic_pool *pool;
    if (fic_pool_create(2, &pool) != FIC_OK) return 1;
    for (int im = 0; im < 2; im++) {
        o[im] = malloc(sizeof(float) * t * nh * hd);
        int st = fic_attention(pool, im ? FIC_IMPL_NEON : FIC_IMPL_REF, q, k, v, o[im], t, pos0, nh, nkv, hd, kvs,
                               (float)scale, ws, wsn);
        if (st != FIC_OK) { printf("status %d\n", st); bad = 1; }
    }
    for (int i = 0; i < t && !bad; i++)
        for (int h = 0; h < nh && !bad; h++) {
            const int m = pos0 + i + 1, kh = h / g;
            const float *qq = q + (i * nh + h) * hd;
            double mx = -INFINITY, l = 0;
            for (int p = 0; p < m; p++) {
                double a = 0, b = 0;
                for (int d = 0; d < hd; d++) {
                    double kd = fic_fp16_to_fp32(k[p * kvs + kh * hd + d]);
                    a += qq[d] * kd;
                    b += fabs(qq[d] * kd);
                }
                s[p] = scale * a;
                mag[p] = scale * b;
                if (s[p] > mx) mx = s[p];
            }
            for (int p = 0; p < m; p++) { /* s <- p_k, mag <- e_k, the error of its exponent */
                mag[p] = (hd + 1) * u * mag[p] + u * fabs(s[p] - mx) + (4 + 2 * (m / 32 + 1)) * u;
                s[p] = exp(s[p] - mx);
                l += s[p];
            }
            for (int d = 0; d < hd; d++) {
                double ov = 0, spread = 0, absv = 0;
                for (int p = 0; p < m; p++) ov += s[p] * fic_fp16_to_fp32(v[p * kvs + kh * hd + d]);
                ov /= l;
                for (int p = 0; p < m; p++) {
                    double vd = fic_fp16_to_fp32(v[p * kvs + kh * hd + d]);
                    spread += s[p] * mag[p] * fabs(vd - ov);
                    absv += s[p] * fabs(vd);
                }
                double tol = 2 * (spread / l + 2 * (m + 4) * u * absv / l) + 1e-30;
                for (int im = 0; im < 2; im++) {
                    double got = o[im][(i * nh + h) * hd + d];
                    if (!(fabs(got - ov) <= tol)) {
                        printf("%s nh %d nkv %d hd %d t %d pos0 %d: q %d head %d col %d: %g vs %g (tol %g)\n",
                               im ? "neon" : "ref", nh, nkv, hd, t, pos0, i, h, d, got, ov, tol);
                        bad = 1;
                        break;
                    }
                }
            }
        }
    fic_pool_destroy(pool);
    free(q); free(k); free(v); free(s); free(mag); free(ws); free(o[0]); free(o[1]);
    return bad;
}

int main(void) {
    unsigned seed = 1;
    int bad = 0;
    if (!fic_impl_available(FIC_IMPL_NEON) || fic_impl_best() != FIC_IMPL_NEON) { puts("neon unavailable"); return 1; }
    static const int cfg[][3] = {{9, 3, 64}, {12, 2, 128}, {4, 4, 32}, {3, 1, 20}};
    static const int tp[][2] = {{1, 0}, {1, 32}, {1, 600}, {1, 2047}, {9, 0}, {17, 40}, {3, 700}};
    for (int c = 0; c < 4; c++)
        for (int i = 0; i < 7; i++) bad |= run(cfg[c][0], cfg[c][1], cfg[c][2], tp[i][0], tp[i][1], &seed);
    float x[1003];
    uint16_t a[1003], b[1003];
    for (int i = 0; i < 1000; i++) x[i] = rnd(&seed) * powf(10.0f, (float)(i % 14 - 9));
    x[1000] = 65520.0f; x[1001] = 1.0f + 1.0f / 2048; x[1002] = -INFINITY;
    fic_f32_to_f16_rows(FIC_IMPL_REF, x, a, 1003);
    fic_f32_to_f16_rows(FIC_IMPL_NEON, x, b, 1003);
    if (memcmp(a, b, sizeof a) != 0) { puts("f32_to_f16 differs"); bad = 1; }
    puts(bad ? "FAIL" : "OK");
    return bad;
}
"""


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
def test_aarch64_cross_compile(tmp_path):
    cmd = ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-march=armv8-a+crc",
           "-pthread", "-I", str(REPO / "csrc"), "-c", str(REPO / "csrc" / "attention.c"),
           "-o", str(tmp_path / "attention.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_attention_matches_reference_under_qemu(tmp_path):
    src = tmp_path / "neon_attn.c"
    src.write_text(NEON_ATTN_C)
    exe = tmp_path / "neon_attn"
    csrc = REPO / "csrc"
    cmd = ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-march=armv8-a+crc", "-pthread", "-static",
           "-I", str(csrc), str(src), *(str(csrc / f) for f in ("quant.c", "pool.c", "attention.c")),
           "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
