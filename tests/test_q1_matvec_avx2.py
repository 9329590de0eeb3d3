"""Q1_0 matvec on AVX2 (two rows in the two 128-bit lanes, one row as two blocks in them): every
shape its loops split differently (1-9 blocks: the 4-block loop, its tail, an odd last block; 1-5
rows: pairs and a single row) against numpy.

Reference: the dequantized weights (float64) times x rounded to q8_0 as the kernel rounds it
(q = rint(x * 127 / amax) per 32, dx = amax / 127). The kernel's only other error is float32
rounding, so the tolerance is two float32 accumulation bounds (tests/test_kernels.py's dot_bound),
not the looser int8 bound: a wrong plane, lane or scale moves y by far more.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels as K

from test_kernels import assert_within, dot_bound

pytestmark = pytest.mark.skipif("avx2" not in K.available_impls(), reason="needs AVX2")


@pytest.fixture(autouse=True)
def one_thread():
    """One chunk of rows: an odd row count ends in the single-row kernel."""
    before = K.get_threads()
    K.set_threads(1)
    yield
    K.set_threads(before)


def x_q8(x: np.ndarray) -> np.ndarray:
    """x rounded to q8 blocks of 32, in float64, as kern_quantize_x_avx2 rounds it."""
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    q = np.rint(x.reshape(-1, 32) * (np.float32(127) / amax))
    return (q.astype(np.float64) * (amax / np.float32(127))).reshape(-1)


@pytest.mark.parametrize("n_blocks", range(1, 10))
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_q1_avx2_matvec_is_w_times_q8_x(m, n_blocks):
    rng = np.random.default_rng(100 * m + n_blocks)
    k = 128 * n_blocks
    qt = K.quantize(rng.standard_normal((m, k), dtype=np.float32), "q1_0")
    wd = K.dequantize(qt).astype(np.float64)
    x = rng.standard_normal(k, dtype=np.float32)
    y = K.matvec(qt, x, impl="avx2")
    assert_within(y, wd @ x_q8(x), 2 * dot_bound(wd, x))


def test_q1_avx2_single_and_pair_rows_agree_with_reference():
    """The AVX2 kernels against the scalar reference (float activations) within the int8 bound."""
    rng = np.random.default_rng(5)
    qt = K.quantize(rng.standard_normal((7, 1152), dtype=np.float32), "q1_0")
    wd = K.dequantize(qt).astype(np.float64)
    x = rng.standard_normal(1152, dtype=np.float32)
    ref = K.matvec(qt, x, impl="ref").astype(np.float64)
    half_step = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1) / 254.0, 32)
    bound = 2 * dot_bound(wd, x) + np.abs(wd) @ half_step
    assert_within(K.matvec(qt, x, impl="avx2"), ref, bound)
    # the reference itself is the dequantized product up to float rounding
    assert_within(ref, wd @ x.astype(np.float64), dot_bound(wd, x))
