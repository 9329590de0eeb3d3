"""A prefill's row-wise float operations in C (csrc/rows.c): RMSNorm over rows and RoPE over tokens x
heads, against numpy in float64 (RMSNorm) and numpy's float32 formula (RoPE: the same operations, so
the same bits)."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels as K
from flashinfer_cli.model import apply_rope, rmsnorm


def rms_numpy(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (256, 2048), (5, 16, 128), (2, 3, 4, 9)])
def test_rmsnorm_rows_against_float64(shape):
    """Any leading shape, rows of any length (tails of fewer than 4 included): within a few float32
    roundings of the float64 formula (the sum is in double; then a scale and a product)."""
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    want = rms_numpy(x, w, 1e-6)
    got = K.rmsnorm_rows(x, w, 1e-6)
    assert got.dtype == np.float32 and got.shape == x.shape and got.flags.c_contiguous
    assert (np.abs(got - want) <= 4 * 2.0 ** -24 * np.abs(want) + 1e-30).all()
    # the model's rmsnorm takes the C path for float32 and numpy's for float64 (a reference)
    assert (rmsnorm(x, w, 1e-6) == got).all()
    assert np.allclose(rmsnorm(x.astype(np.float64), w, 1e-6), want, rtol=1e-6)


def test_rmsnorm_rows_strided_input_and_zeros():
    rng = np.random.default_rng(3)
    big = rng.standard_normal((6, 40)).astype(np.float32)
    x = big[:, 5:37]  # rows 40 floats apart: copied to contiguous first
    w = rng.standard_normal(32).astype(np.float32)
    assert np.allclose(K.rmsnorm_rows(x, w, 1e-5), rms_numpy(x, w, 1e-5), rtol=1e-6)
    z = np.zeros((2, 8), np.float32)
    assert (K.rmsnorm_rows(z, np.ones(8, np.float32), 1e-6) == 0).all()  # eps keeps 0/0 away


def test_rmsnorm_in_place_and_refusals():
    lib, ffi = K.lib, K.ffi
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    want = K.rmsnorm_rows(x, w, 1e-6)
    buf = x.copy()
    assert lib.fic_rmsnorm_rows(K._f32(buf), K._f32(w), 1e-6, 4, 64, K._f32(buf)) == lib.FIC_OK
    assert (buf == want).all()  # out may be x
    out = np.zeros_like(x)
    args = (K._f32(x), K._f32(w))
    assert lib.fic_rmsnorm_rows(*args, 1e-6, 4, 0, K._f32(out)) == lib.FIC_ERR_ARG
    assert lib.fic_rmsnorm_rows(*args, -1.0, 4, 64, K._f32(out)) == lib.FIC_ERR_ARG
    assert lib.fic_rmsnorm_rows(*args, float("nan"), 4, 64, K._f32(out)) == lib.FIC_ERR_ARG
    assert lib.fic_rmsnorm_rows(ffi.NULL, K._f32(w), 1e-6, 4, 64, K._f32(out)) == lib.FIC_ERR_ARG
    assert lib.fic_rmsnorm_rows(*args, 1e-6, 0, 64, K._f32(out)) == lib.FIC_OK  # no rows: nothing to do
    with pytest.raises(ValueError, match="weights of shape"):
        K.rmsnorm_rows(x, w[:32], 1e-6)


@pytest.mark.parametrize("t,heads,hd", [(1, 1, 2), (9, 16, 128), (256, 3, 64), (4, 2, 130)])
def test_rope_rows_equals_numpy(t, heads, hd):
    """The same float32 operations as the rotate-half formula in numpy: the same bits."""
    rng = np.random.default_rng(t * heads + hd)
    x = rng.standard_normal((t, heads, hd)).astype(np.float32)
    ang = rng.uniform(0, 100, (t, hd // 2)).astype(np.float32)
    cos = np.cos(np.concatenate([ang, ang], axis=1)).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang], axis=1)).astype(np.float32)
    half = hd // 2
    want = x * cos[:, None, :] + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin[:, None, :]
    got = K.rope_rows(x, cos, sin)
    assert (got == want).all()
    assert (apply_rope(x, cos, sin) == want).all()
    # other dtypes take numpy's path: float64 within float32's rounding of the same formula
    assert np.allclose(apply_rope(x.astype(np.float64), cos, sin), want, rtol=0, atol=1e-5)
    strided = np.concatenate([x, x], axis=2)[:, :, :hd]  # a view with rows 2 hd apart
    assert (K.rope_rows(strided, cos, sin) == want).all()


def test_rope_refusals():
    lib = K.lib
    x = np.zeros((2, 1, 6), np.float32)
    c = np.zeros((2, 6), np.float32)
    assert lib.fic_rope_rows(K._f32(x), 2, 1, 5, K._f32(c), K._f32(c)) == lib.FIC_ERR_ARG  # odd head_dim
    assert lib.fic_rope_rows(K._f32(x), -1, 1, 6, K._f32(c), K._f32(c)) == lib.FIC_ERR_ARG
    with pytest.raises(ValueError, match="rope of"):
        K.rope_rows(x, c[:1], c[:1])
