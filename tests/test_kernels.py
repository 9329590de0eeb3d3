"""Kernels against numpy, fast paths against the reference, and the C core's argument checks.

References are numpy float64 products on the dequantized weights (kernels.dequantize of
kernels.quantize), so the kernels are checked against an independent computation, not themselves.

Tolerances:
- float32 accumulation: a dot product of length K summed in float32 in any order is within
  K * 2^-24 * sum_j |w_j x_j| of the exact value (the classic gamma_K bound; K * 2^-24 << 1 here).
  FLOAT_SLACK doubles it to cover the fp32 rounding of the result and of d*q products.
- int8 activations (matvec for Q1_0 on AVX2/AVX-512, every quantized format on AVX2 and Q4_0/Q4_1 on AVX-512 VNNI quantizes x to
  q8 blocks of 32, as llama.cpp does):
  each x_j moves by at most dx_b / 2 = amax_b / 254, so the result moves by at most
  sum_j |w_j| * amax_b(j) / 254 on top of the float bound. Measured on Gaussian data the RMS error
  is 0.5% of |y| and the worst case reaches under a tenth of this bound.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import kernels as K

from _kquant import quantize_any

FORMATS = list(K.FORMATS)
IMPLS = K.available_impls()
FAST_IMPLS = [i for i in IMPLS if i != "ref"]
EPS32 = 2.0 ** -24
FLOAT_SLACK = 2.0
REPO = Path(__file__).resolve().parents[1]
# The kernels' files (csrc/build_ffi.py's SOURCES): shared code and one file per architecture.
KERNEL_SOURCES = ("kernels.c", "kernels_scalar.c", "kernels_avx2.c", "kernels_avx512.c", "kernels_vnni.c", "kernels_amx.c",
                  "kernels_neon.c")
# The int8-activation C files linked wherever matvec.c is: the prefill path (csrc/qdot.h) and the
# r32 layout's matvec and prefill (q1r32.c, which reuses qdot's quantizers).
QDOT_SOURCES = ("qdot.c", "qdot_ffn.c", "qdot_scalar.c", "qdot_avx2.c", "qdot_neon.c", "q1r32.c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return set(next(line for line in text.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


CPU_FLAGS = _cpu_flags()


def int8_activation_path(fmt: str, impl: str) -> bool:
    """matvec kernels that quantize x to int8 (see matvec.c): Q1_0 on AVX2 and AVX-512 always; with
    FIC_DECODE=int8 also every other quantized format on AVX2 and AVX-512 (Q4_0/Q4_1 through VNNI
    where the CPU has it, else through the AVX2 kernels, as Q8_0, Q5_0 and the K-quants)."""
    resolved = K.best_impl() if impl == "auto" else impl
    if fmt == "q1_0":
        return resolved in ("avx2", "avx512")
    if K.get_decode() != "int8":
        return False
    return fmt in QDOT_FORMATS and resolved in ("avx2", "avx512")


def q8_rounded(x: np.ndarray) -> np.ndarray:
    """x as the int8 path sees it, q8 as matvec.c computes it in float32: per block of 32,
    q = rint(x * (127 / amax)), times dx = amax / 127 (in float64)."""
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    q = np.rint(x.reshape(-1, 32) * (np.float32(127) / amax))
    return (q.astype(np.float64) * (amax / np.float32(127))).reshape(-1)


def q8_half_step(x: np.ndarray) -> np.ndarray:
    """Per element, half the q8_0 step of its block of 32: the most rounding can move it."""
    amax = np.abs(x.reshape(-1, 32)).max(axis=1)
    return np.repeat(amax / 254.0, 32)


def make(fmt: str, m: int, k: int, seed: int) -> tuple[K.QTensor, np.ndarray, np.random.Generator]:
    """A random quantized (m, k) matrix and its dequantized float64 values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k), dtype=np.float32)
    qt = quantize_any(w, fmt, rng)  # Q4_K/Q6_K: llama.cpp's quantizer (fic has none), tests/_kquant.py
    return qt, K.dequantize(qt).astype(np.float64), rng


def dot_bound(wd: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Float32 accumulation bound of wd @ x (x a vector or (T, K) rows): one per output."""
    k = wd.shape[1]
    mag = np.abs(x) @ np.abs(wd).T if x.ndim == 2 else np.abs(wd) @ np.abs(x)
    return FLOAT_SLACK * k * EPS32 * mag + 1e-30


def matvec_bound(fmt: str, impl: str, wd: np.ndarray, x: np.ndarray, n_float: int = 1) -> np.ndarray:
    """matvec's tolerance: n_float float32 bounds, plus the q8 term where x is quantized."""
    bound = n_float * dot_bound(wd, x)
    if int8_activation_path(fmt, impl):
        bound = bound + np.abs(wd) @ q8_half_step(x)
    return bound


# Formats whose prefill (T > 1) products quantize x to int8 on every implementation (csrc/qdot.h).
QDOT_FORMATS = ("q1_0", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k")


def matmul_bound(fmt: str, wd: np.ndarray, x: np.ndarray) -> np.ndarray:
    """matmul's tolerance: the float32 bound, plus for T > 1 in a quantized format the q8 term
    (sum_j |w_j| * half a q8 step of x_j) of the int8-activation path. The integer sums are exact,
    so the float part is the same gamma_K bound as elsewhere."""
    bound = dot_bound(wd, x)
    if x.shape[0] > 1 and fmt in QDOT_FORMATS:
        bound = bound + np.stack([q8_half_step(r) for r in x]) @ np.abs(wd).T
    return bound


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@pytest.fixture(scope="module", autouse=True)
def int8_prefill_in_this_file():
    """This file bounds the int8-activation kernels (FIC_PREFILL=int8 and FIC_DECODE=int8; the
    product's defaults: exact prefill, int8 decode): every product here takes that path unless a test asks for exact."""
    with K.prefill_mode("int8"), K.decode_mode("int8"):
        yield


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    K.set_threads(request.param)
    yield request.param
    K.set_threads(K.default_threads())


# (m, k in blocks of 128). AVX-512 Q1_0 with bit planes takes 4 blocks per step, used where the
# steps are at least 80% full: k_units 7 ends in a partial step, 4 and 32 in none; 1-3 take the
# psadbw kernel. Rows of more than 2,048 weights (17 and 32 units) are read one at a time, the fast
# kernels prefetching their own row stream.
SHAPES = [(1, 1), (3, 1), (17, 1), (1, 2), (333, 3), (64, 4), (6, 7), (9, 17), (5, 32)]


def k_of(fmt: str, k_units: int) -> int:
    """k for fmt: one unit is 128 weights (a Q1_0 block, four Q4/Q8 blocks), 256 for the K-quants
    (one super-block); f32/f16 get an odd extra weight so vector tails run too."""
    return max(128, K.block_weights(fmt)) * k_units + (7 if K.block_weights(fmt) == 1 else 0)


# ---- matvec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,k_units", SHAPES)
def test_matvec_matches_numpy(fmt, impl, m, k_units, threads):
    qt, wd, rng = make(fmt, m, k_of(fmt, k_units), seed=m * 31 + k_units)
    x = rng.standard_normal(qt.shape[1], dtype=np.float32)
    assert_within(K.matvec(qt, x, impl=impl), wd @ x, matvec_bound(fmt, impl, wd, x))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if K.block_weights(f) in (1, 32)])  # q1_0's block is 128
def test_matvec_block_of_32_for_q4_q8(fmt):
    """K of a single 32-weight block (and an odd number of them) for the formats that allow it."""
    bw = K.block_weights(fmt)
    for k in (bw * 1, bw * 3, 32 * 2, 32 * 5, 32 * 6, 32 * 18, 32 * 67):  # 67 blocks: a long row, a last partial quad
        qt, wd, rng = make(fmt, 19, k, seed=k)
        x = rng.standard_normal(k, dtype=np.float32)
        for impl in IMPLS:
            assert_within(K.matvec(qt, x, impl=impl), wd @ x, matvec_bound(fmt, impl, wd, x))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_matvec_matches_reference(fmt, impl):
    """Fast path == reference within the sum of both float bounds (plus int8's where used)."""
    qt, wd, rng = make(fmt, 257, 1024, seed=7)
    x = rng.standard_normal(1024, dtype=np.float32)
    bound = matvec_bound(fmt, impl, wd, x, n_float=2)
    ref = K.matvec(qt, x, impl="ref").astype(np.float64)
    assert_within(K.matvec(qt, x, impl=impl), ref, bound)


INT8_CASES = [(f, i) for f in FORMATS for i in FAST_IMPLS if int8_activation_path(f, i)]


@pytest.mark.parametrize("fmt,impl", INT8_CASES)
def test_int8_activation_error_is_small_in_practice(fmt, impl):
    """The q8 path's typical error: RMS under 1% of |y| on Gaussian data (measured 0.5%), and
    the result is W times the q8-rounded x up to float rounding (so rounding is the only loss)."""
    qt, wd, rng = make(fmt, 512, 2048, seed=3)
    x = rng.standard_normal(2048, dtype=np.float32)
    exact = wd @ x
    y = K.matvec(qt, x, impl=impl)
    err = y - exact
    assert np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2)) < 0.01
    assert_within(y, wd @ q8_rounded(x), 2 * dot_bound(wd, x))


@pytest.mark.parametrize("n_blocks", [2, 3, 5, 6, 7, 18])
@pytest.mark.parametrize("fmt,impl", [(f, i) for f, i in INT8_CASES if K.block_weights(f) == 32])
def test_int8_activation_any_number_of_blocks(fmt, impl, n_blocks):
    """Rows of any number of 32-weight blocks (Q4 on VNNI takes 4 blocks a step, a last partial
    step masked): still W times the q8-rounded x up to float rounding."""
    k = 32 * n_blocks
    qt, wd, rng = make(fmt, 37, k, seed=n_blocks)
    x = rng.standard_normal(k, dtype=np.float32)
    y = K.matvec(qt, x, impl=impl)
    assert_within(y, wd @ q8_rounded(x), 2 * dot_bound(wd, x))


@pytest.mark.parametrize("fmt,impl", [(f, i) for f, i in INT8_CASES if f != "q1_0"])
def test_exact_decode_keeps_float_activations(fmt, impl):
    """FIC_DECODE=exact (FIC_IMPL_EXACT on matvec) takes the float-activation kernels of every
    quantized format but Q1_0 (int8 kernels only: its float paths were 1.6-3x slower): within the
    float32 bound alone, and a different result from the int8 one."""
    qt, wd, rng = make(fmt, 257, 1024, seed=11)
    x = rng.standard_normal(1024, dtype=np.float32)
    with K.decode_mode("exact"):
        exact = K.matvec(qt, x, impl=impl)
    assert_within(exact, wd @ x, dot_bound(wd, x))
    int8 = K.matvec(qt, x, impl=impl)
    assert_within(int8, wd @ x, matvec_bound(fmt, impl, wd, x))
    assert np.abs(int8 - wd @ x).max() > np.abs(exact - wd @ x).max()


def test_decode_mode_is_checked():
    with pytest.raises(ValueError, match="unknown decode mode"):
        K.set_decode("fp8")
    assert K.get_decode() == "int8"  # this file's fixture (and the product's default)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_zero_blocks_of_x(fmt, impl):
    """All-zero stretches of x (amax = 0 in the q8 path) give exact zeros, not NaNs."""
    qt, wd, rng = make(fmt, 9, 256, seed=1)
    x = rng.standard_normal(256, dtype=np.float32)
    x[:128] = 0.0
    y = K.matvec(qt, x, impl=impl)
    bound = matvec_bound(fmt, impl, wd, x)
    assert_within(y, wd @ x, bound)
    np.testing.assert_array_equal(K.matvec(qt, np.zeros(256, np.float32), impl=impl), np.zeros(9, np.float32))


# ---- matmul ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 2, 3, 8])
@pytest.mark.parametrize("m,k_units", [(1, 1), (17, 2), (70, 3)])
def test_matmul_matches_numpy(fmt, impl, t, m, k_units, threads):
    qt, wd, rng = make(fmt, m, k_of(fmt, k_units), seed=t * 100 + m)
    x = rng.standard_normal((t, qt.shape[1]), dtype=np.float32)
    y = K.matmul(qt, x, impl=impl)
    assert y.shape == (t, m)
    assert_within(y, x.astype(np.float64) @ wd.T, matmul_bound(fmt, wd, x))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("fmt", ["q4_0", "q1_0", "f16", "q4_k", "q6_k", "q5_0"])
def test_matmul_many_tokens_and_rows(fmt, impl):
    """More rows than one tile and T not a multiple of the register block."""
    K.set_threads(2)
    qt, wd, rng = make(fmt, 203, k_of(fmt, 4), seed=11)
    x = rng.standard_normal((37, qt.shape[1]), dtype=np.float32)
    assert_within(K.matmul(qt, x, impl=impl), x.astype(np.float64) @ wd.T, matmul_bound(fmt, wd, x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["f32", "f16", "q4_1", "q8_0", "q1_0", "q4_k"])
@pytest.mark.parametrize("t,m", [(4, 16), (5, 33), (6, 100), (7, 47), (13, 161)])
def test_matmul_panels_exact(fmt, impl, t, m, threads):
    """Exact prefill from 4 tokens runs on packed 16-row panels (pack_panels, gemm_panel: the AVX2
    register block and its scalar reference): token counts around the 6-token block, row counts
    with a partial last panel and tiles past the first, rows longer than one 256-weight packing
    piece. Within the float32 bound alone, against numpy."""
    qt, wd, rng = make(fmt, m, k_of(fmt, 5), seed=t * 1000 + m)
    x = rng.standard_normal((t, qt.shape[1]), dtype=np.float32)
    with K.prefill_mode("exact"):
        y = K.matmul(qt, x, impl=impl)
    assert y.shape == (t, m)
    assert_within(y, x.astype(np.float64) @ wd.T, dot_bound(wd, x))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("fmt", QDOT_FORMATS)
@pytest.mark.parametrize("t", [2, 5, 37])
def test_int8_prefill_fast_matches_scalar_reference(fmt, impl, t, threads):
    """The int8 path's fast kernels against its scalar reference (qdot_scalar.c): every quantizer
    rounds alike and the integer sums are exact, so they differ only by float summation order,
    within two float32 bounds (far below the q8 term, ~1e-2 relative, a differing quantization
    would show)."""
    qt, wd, rng = make(fmt, 41, k_of(fmt, 3), seed=t)
    x = rng.standard_normal((t, qt.shape[1]), dtype=np.float32)
    ref = K.matmul(qt, x, impl="ref").astype(np.float64)
    assert_within(K.matmul(qt, x, impl=impl), ref, 2 * dot_bound(wd, x))


def int8_by_default(fmt: str, impl: str) -> bool:
    """The product's rule for the default prefill ("auto"; README, FIC_PREFILL): int8 for Q1_0 always,
    and for Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K where AVX-512 runs them on AMX tiles; exact otherwise."""
    resolved = K.best_impl() if impl == "auto" else impl
    on_tiles = resolved == "avx512" and K.amx_available()
    return fmt == "q1_0" or (fmt in ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k") and on_tiles)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", QDOT_FORMATS)
def test_auto_prefill_is_int8_where_it_is_the_default(fmt, impl):
    """The product's default prefill ("auto"): int8 where int8_by_default says (the arithmetic Q1_0's
    decode has; the AMX tiles' formats, where it is twice the fp32 speed), exact elsewhere; same bits
    as the mode it stands for."""
    qt, _, rng = make(fmt, 19, k_of(fmt, 2), seed=5)
    x = rng.standard_normal((7, qt.shape[1]), dtype=np.float32)
    with K.prefill_mode("auto"):
        auto = K.matmul(qt, x, impl=impl)
    default = "int8" if int8_by_default(fmt, impl) else "exact"
    with K.prefill_mode(default):
        same = K.matmul(qt, x, impl=impl)
    with K.prefill_mode("exact" if default == "int8" else "int8"):
        other = K.matmul(qt, x, impl=impl)
    assert np.array_equal(auto, same)
    assert not np.array_equal(auto, other)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", QDOT_FORMATS)
def test_exact_prefill_mode_is_float(fmt, impl):
    """kernels.set_prefill("exact") (FIC_IMPL_EXACT): matmul T > 1 dequantizes and multiplies in
    float, within the float32 bound alone; back in "int8" mode the result moves by the q8 term."""
    qt, wd, rng = make(fmt, 23, k_of(fmt, 2), seed=3)
    x = rng.standard_normal((6, qt.shape[1]), dtype=np.float32)
    want = x.astype(np.float64) @ wd.T
    with K.prefill_mode("exact"):
        exact = K.matmul(qt, x, impl=impl)
    assert_within(exact, want, dot_bound(wd, x))
    int8 = K.matmul(qt, x, impl=impl)
    assert_within(int8, want, matmul_bound(fmt, wd, x))
    assert np.abs(int8 - want).max() > np.abs(exact - want).max()  # it is a different path
    with pytest.raises(ValueError, match="prefill mode"):
        K.set_prefill("int4")


# ---- accum_rows -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_rows,k_units", [(1, 1), (3, 2), (17, 5), (64, 12)])
def test_accum_rows_matches_numpy(fmt, impl, n_rows, k_units, threads):
    qt, wd, rng = make(fmt, n_rows, k_of(fmt, k_units), seed=n_rows + 1000 * k_units)
    a = rng.standard_normal(n_rows, dtype=np.float32)
    a[::4] = 0.0  # pruned neurons contribute nothing
    y0 = rng.standard_normal(qt.shape[1], dtype=np.float32)
    y = y0.copy()
    K.accum_rows(qt, a, y, impl=impl)
    # n_rows + 1 terms per output, accumulated in float32. The AVX-512 Q1_0 path adds each row
    # in two steps (-a*d on every lane, then 2*a*d where the bit is set), so partial sums reach
    # up to 3x sum |a w|: hence 2 * FLOAT_SLACK.
    bound = 2 * FLOAT_SLACK * (n_rows + 1) * EPS32 * (np.abs(y0) + 3 * np.abs(a) @ np.abs(wd)) + 1e-30
    assert_within(y, y0 + a.astype(np.float64) @ wd, bound)


# ---- dispatch and argument checks -----------------------------------------------------------

def test_reference_always_available_and_auto_is_best():
    assert IMPLS[0] == "ref"
    assert K.best_impl() in IMPLS
    qt, _, rng = make("q4_0", 33, 256, seed=5)
    x = rng.standard_normal(256, dtype=np.float32)
    # AUTO runs the same code as the best implementation: bit-identical results.
    np.testing.assert_array_equal(K.matvec(qt, x, impl="auto"), K.matvec(qt, x, impl=K.best_impl()))


def test_best_impl_follows_cpu_flags():
    flags = CPU_FLAGS
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        assert K.best_impl() == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert K.best_impl() == "avx2"
    assert ("avx2" in IMPLS) == ({"avx2", "fma", "f16c"} <= flags)


@pytest.mark.parametrize("impl", [i for i in ("avx2", "avx512", "neon") if i not in IMPLS])  # absent here
def test_unavailable_impl_raises(impl):
    qt, _, _ = make("q4_0", 4, 32, seed=0)
    with pytest.raises(NotImplementedError):
        K.matvec(qt, np.zeros(32, np.float32), impl=impl)
    with pytest.raises(NotImplementedError):
        K.matmul(qt, np.zeros((2, 32), np.float32), impl=impl)
    with pytest.raises(NotImplementedError):
        K.accum_rows(qt, np.zeros(4, np.float32), np.zeros(32, np.float32), impl=impl)


def test_bad_arguments_raise_value_error():
    qt, _, _ = make("q4_0", 4, 64, seed=0)
    with pytest.raises(ValueError):
        K.matvec(qt, np.zeros(63, np.float32))  # wrong length
    with pytest.raises(ValueError):
        K.matvec(qt, np.zeros(64, np.float64))  # wrong dtype
    with pytest.raises(ValueError):
        K.matmul(qt, np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError):
        K.matmul(qt, np.zeros((2, 64), np.int32))
    with pytest.raises(ValueError):
        K.accum_rows(qt, np.zeros(4, np.float32), np.zeros(63, np.float32))
    with pytest.raises(ValueError):
        K.matvec(qt, np.zeros(64, np.float32), impl="sse9")
    with pytest.raises(ValueError):
        K.quantize(np.zeros((2, 48), np.float32), "q4_0")  # k not a multiple of 32


def test_c_core_rejects_bad_shapes_and_pointers():
    """The C entry points themselves validate (the binding is not the only caller)."""
    lib, ffi = K.lib, K.ffi
    w = ffi.new("uint8_t[]", 4 * 18)
    x = ffi.new("float[]", 64)
    y = ffi.new("float[]", 8)
    ws_arr = K.aligned_buffer(1 << 20)
    ws, nws = ffi.from_buffer("uint8_t[]", ws_arr), ws_arr.nbytes
    q4, auto = lib.FIC_Q4_0, lib.FIC_IMPL_AUTO
    assert lib.fic_matvec(ffi.NULL, auto, q4, w, x, y, 2, 64, ws, nws) == lib.FIC_OK
    assert lib.fic_matvec(ffi.NULL, auto, q4, w, x, y, 2, 48, ws, nws) == lib.FIC_ERR_ARG  # k % 32
    assert lib.fic_matvec(ffi.NULL, auto, q4, w, x, y, 0, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matvec(ffi.NULL, auto, q4, w, x, y, 2, 0, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matvec(ffi.NULL, auto, q4, ffi.NULL, x, y, 2, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matvec(ffi.NULL, auto, q4, w, ffi.NULL, y, 2, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matvec(ffi.NULL, auto, 99, w, x, y, 2, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matvec(ffi.NULL, 42, q4, w, x, y, 2, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matmul(ffi.NULL, auto, q4, w, x, y, 0, 2, 32, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_matmul(ffi.NULL, auto, q4, w, x, ffi.NULL, 1, 2, 32, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_accum_rows(ffi.NULL, auto, q4, w, ffi.NULL, y, 2, 32, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_accum_rows(ffi.NULL, auto, lib.FIC_Q1_0, w, x, y, 1, 64, ws, nws) == lib.FIC_ERR_ARG
    assert lib.fic_pool_create(0, ffi.new("fic_pool **")) == lib.FIC_ERR_ARG


def test_null_pool_runs_on_calling_thread():
    lib, ffi = K.lib, K.ffi
    qt, wd, rng = make("q8_0", 9, 64, seed=2)
    x = rng.standard_normal(64, dtype=np.float32)
    y = np.empty(9, np.float32)
    ws = K.aligned_buffer(lib.fic_workspace_bytes(1, 1, 64, 0, 0))
    st = lib.fic_matvec(ffi.NULL, lib.FIC_IMPL_AUTO, lib.FIC_Q8_0, ffi.from_buffer("uint8_t[]", qt.data),
                        ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y), 9, 64,
                        ffi.from_buffer("uint8_t[]", ws), ws.nbytes)
    assert st == lib.FIC_OK
    assert_within(y, wd @ x, matvec_bound("q8_0", "auto", wd, x))


# ---- threads --------------------------------------------------------------------------------

def test_pool_threads_and_many_dispatches():
    """Thousands of back-to-back dispatches (decode's pattern) stay correct."""
    K.set_threads(2)
    assert K.get_threads() == 2
    qt, wd, rng = make("q4_0", 512, 256, seed=9)
    x = rng.standard_normal(256, dtype=np.float32)
    want = K.matvec(qt, x)
    for _ in range(2000):
        np.testing.assert_array_equal(K.matvec(qt, x), want)
    assert_within(want, wd @ x, matvec_bound("q4_0", "auto", wd, x))


def test_gil_released_concurrent_calls():
    """Two Python threads share the pool: both get correct results (a busy pool runs the
    second caller inline), and both make progress while the other is inside C."""
    K.set_threads(2)
    qt, wd, rng = make("q4_1", 2048, 1024, seed=4)
    xs = [rng.standard_normal(1024, dtype=np.float32) for _ in range(2)]
    wants = [wd @ x for x in xs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(50):
            y = K.matvec(qt, xs[i])
            bound = matvec_bound("q4_1", "auto", wd, xs[i])
            if not np.all(np.abs(y - wants[i]) <= bound):
                errors.append(f"thread {i}: wrong result")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def test_gil_released_during_kernel():
    """Another Python thread runs while a kernel is inside C: it sees the output half written
    (rows are filled in order over a slow reference matvec), impossible if the GIL were held."""
    K.set_threads(1)
    qt, wd, rng = make("f16", 3000, 2048, seed=8)
    x = rng.standard_normal(2048, dtype=np.float32)
    y = np.full(3000, np.nan, dtype=np.float32)
    started = threading.Event()

    def work() -> None:
        started.set()
        for _ in range(5):
            y[:] = np.nan
            K.matvec(qt, x, impl="ref", out=y)

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    seen_partial = False
    while th.is_alive() and not seen_partial:
        done = ~np.isnan(y)
        seen_partial = bool(done.any() and not done.all())
    th.join()
    assert seen_partial
    assert_within(y, wd @ x, dot_bound(wd, x))


def test_pool_create_destroy_many():
    lib, ffi = K.lib, K.ffi
    for n in (1, 2, 3, 8):
        out = ffi.new("fic_pool **")
        assert lib.fic_pool_create(n, out) == lib.FIC_OK
        assert lib.fic_pool_threads(out[0]) == n
        lib.fic_pool_destroy(out[0])


# ---- memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("huge", [False, True])
def test_aligned_buffer_zeroed_and_aligned(huge):
    buf = K.aligned_buffer(3 << 20, huge=huge)
    assert buf.ctypes.data % ((2 << 20) if huge else 4096) == 0
    assert not buf.any()
    buf[:] = 7  # writable over its whole length
    assert buf.sum(dtype=np.int64) == 7 * (3 << 20)


# ---- the workspace (kernels never allocate) ---------------------------------------------------

def ws_round64(b: int) -> int:
    return -(-b // 64) * 64


def tile_floats(k: int) -> int:
    """F(k) of fic.h: the floats of one thread's matmul tile."""
    return max(min(60 * k, 65536), 6 * k)


def test_workspace_bytes_grows_with_every_maximum():
    """fic_workspace_bytes: a multiple of 64, at least the matvec and matmul terms of fic.h,
    never smaller when any maximum grows; FIC_ERR_ARG outside the documented ranges."""
    lib = K.lib
    rng = np.random.default_rng(0)
    for _ in range(300):
        args = [int(rng.integers(1, 9)), int(rng.integers(0, 80)), int(rng.integers(0, 20000)),
                int(rng.integers(0, 64)), int(rng.integers(0, 30000))]
        n_bytes = lib.fic_workspace_bytes(*args)
        assert n_bytes >= 0 and n_bytes % 64 == 0
        assert n_bytes >= max(ws_round64(3 * args[2]), args[0] * ws_round64(4 * tile_floats(args[2])))
        for i in range(5):
            bigger = list(args)
            bigger[i] += int(rng.integers(1, 3000))
            assert lib.fic_workspace_bytes(*bigger) >= n_bytes, (args, bigger)
    assert lib.fic_workspace_bytes(1, 0, 0, 0, 0) == 0
    for bad in [(0, 1, 64, 1, 64), (1, -1, 64, 1, 64), (1, 1, -64, 1, 64), (1, 1, 64, -1, 64), (1, 1, 64, 1, -1),
                (1, 1, (1 << 36) + 1, 1, 64), ((1 << 16) + 1, 1, 64, 1, 64)]:
        assert lib.fic_workspace_bytes(*bad) == lib.FIC_ERR_ARG, bad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_use_only_the_documented_workspace(fmt, impl, threads):
    """matvec needs A(10k) bytes and matmul P A(4 F(k)) (fic.h; P = the pool's threads): with exactly
    that much they compute the right result and write nothing past it; with 64 bytes less they
    return FIC_ERR_WORKSPACE before writing y. accum_rows needs none."""
    lib, ffi = K.lib, K.ffi
    pool, impl_id, fmt_id = K._POOL.get(), K.IMPLS[impl], K.FORMATS[fmt]
    for m, k_units, t in [(9, 1, 3), (20, 3, 2), (13, 12, 7), (7, 100, 2)]:  # F(k) = 60k, 60k, 65536, 6k
        k = k_of(fmt, k_units)
        qt, wd, rng = make(fmt, m, k, seed=k_units)
        x = rng.standard_normal((t, k), dtype=np.float32)
        for name, need, n_out in [("matvec", ws_round64(10 * k), m),
                                  ("matmul", threads * ws_round64(4 * tile_floats(k)), t * m)]:
            ws = K.aligned_buffer(need + 4096)
            ws[need:] = 0xA5
            wsp = ffi.from_buffer("uint8_t[]", ws)
            y = np.full(n_out, np.nan, np.float32)

            def call(n_bytes):
                args = (pool, impl_id, fmt_id, K._u8(qt.data), K._f32(x), K._f32(y))
                if name == "matvec":
                    return lib.fic_matvec(*args, m, k, wsp, n_bytes)
                return lib.fic_matmul(*args, t, m, k, wsp, n_bytes)

            assert call(need - 64) == lib.FIC_ERR_WORKSPACE
            assert np.isnan(y).all()  # nothing written
            assert call(need) == lib.FIC_OK
            assert (ws[need:] == 0xA5).all(), f"{name} wrote past its workspace"
            if name == "matvec":
                assert_within(y, wd @ x[0], matvec_bound(fmt, impl, wd, x[0]))
            else:
                assert_within(y.reshape(t, m), x.astype(np.float64) @ wd.T, matmul_bound(fmt, wd, x))
        a = rng.standard_normal(m, dtype=np.float32)
        acc = np.zeros(k, np.float32)
        assert lib.fic_accum_rows(pool, impl_id, fmt_id, K._u8(qt.data), K._f32(a), K._f32(acc), m, k,
                                  ffi.NULL, 0) == lib.FIC_OK
        assert_within(acc, a.astype(np.float64) @ wd, FLOAT_SLACK * m * EPS32 * (np.abs(a) @ np.abs(wd)) + 1e-30)


def test_workspace_alignment_and_null():
    lib, ffi = K.lib, K.ffi
    qt, _, rng = make("q8_0", 4, 128, seed=1)
    x = rng.standard_normal(128, dtype=np.float32)
    y = np.zeros(4, np.float32)
    ws = K.aligned_buffer(8192)
    wsp = ffi.from_buffer("uint8_t[]", ws)
    args = (ffi.NULL, lib.FIC_IMPL_REF, lib.FIC_Q8_0, K._u8(qt.data), K._f32(x), K._f32(y), 4, 128)
    assert lib.fic_matvec(*args, wsp, 8192) == lib.FIC_OK
    assert lib.fic_matvec(*args, wsp + 16, 8000) == lib.FIC_ERR_ARG      # not 64-byte aligned
    assert lib.fic_matvec(*args, ffi.NULL, 8192) == lib.FIC_ERR_ARG      # NULL with bytes
    assert lib.fic_matvec(*args, ffi.NULL, 0) == lib.FIC_ERR_WORKSPACE   # needs A(10k) = 1280
    assert lib.fic_matvec(*args, wsp, -64) == lib.FIC_ERR_ARG
    assert lib.fic_accum_rows(*args[:4], K._f32(np.ones(4, np.float32)), K._f32(x), 4, 128, wsp + 8,
                              64) == lib.FIC_ERR_ARG


def test_process_workspace_reserve_grow_and_threads():
    """kernels.py keeps one workspace: calls within the reserved maxima neither grow nor
    reallocate it, a call beyond grows it once (counted), set_threads re-sizes it for the new
    thread count without counting growth; results are right throughout."""
    K.set_threads(2)
    try:
        with pytest.raises(ValueError):
            K.reserve_workspace(max_t=-1, max_k=64)
        n_bytes = K.reserve_workspace(max_t=8, max_k=1024, max_experts=4, max_neurons=512)
        assert n_bytes == K.workspace_bytes() > 0
        assert n_bytes >= K.workspace_bytes_for(n_threads=2, max_t=8, max_k=1024, max_experts=4, max_neurons=512)
        grows = K.workspace_grows()
        qt, wd, rng = make("q4_1", 70, 1024, seed=5)
        x = rng.standard_normal((8, 1024), dtype=np.float32)
        for _ in range(3):
            assert_within(K.matvec(qt, x[0]), wd @ x[0], matvec_bound("q4_1", "auto", wd, x[0]))
            assert_within(K.matmul(qt, x), x.astype(np.float64) @ wd.T, matmul_bound("q4_1", wd, x))
        assert K.workspace_grows() == grows and K.workspace_bytes() == n_bytes
        big_k = 1 << 15  # matmul tile 6k floats per thread: more than reserved (earlier tests' FFN
        while 2 * ws_round64(4 * tile_floats(big_k)) <= K.workspace_bytes():  # calls may have reserved more)
            big_k *= 2
        qb, wb, rng = make("q8_0", 12, big_k, seed=6)
        xb = rng.standard_normal((3, big_k), dtype=np.float32)
        assert_within(K.matmul(qb, xb), xb.astype(np.float64) @ wb.T, matmul_bound("q8_0", wb, xb))
        assert K.workspace_grows() == grows + 1
        two = K.workspace_bytes()
        assert two >= 2 * ws_round64(4 * tile_floats(big_k)) > n_bytes
        K.matmul(qb, xb)
        assert K.workspace_grows() == grows + 1 and K.workspace_bytes() == two
        K.set_threads(1)
        one = K.workspace_bytes()
        assert ws_round64(4 * tile_floats(big_k)) <= one < two
        assert_within(K.matmul(qb, xb), xb.astype(np.float64) @ wb.T, matmul_bound("q8_0", wb, xb))
        K.set_threads(2)
        assert K.workspace_bytes() == two and K.workspace_grows() == grows + 1
    finally:
        K.set_threads(K.default_threads())


def test_concurrent_callers_get_their_own_workspace():
    """While one Python thread is inside a kernel with the process workspace, another's call
    uses a private one: both results are right (a shared one would corrupt the prepared x)."""
    K.set_threads(1)
    qt, wd, rng = make("q1_0", 512, 2048, seed=9)  # Q1_0 prepares x in the workspace (AVX2/AVX-512)
    xs = [rng.standard_normal(2048, dtype=np.float32) for _ in range(2)]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(40):
            y = K.matvec(qt, xs[i], impl="auto")
            if not np.all(np.abs(y - wd @ xs[i]) <= matvec_bound("q1_0", "auto", wd, xs[i])):
                errors.append(f"thread {i}: wrong result")
                return

    ths = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    K.set_threads(K.default_threads())
    assert errors == []


def test_busy_workspace_is_not_shared():
    """A call made while the process workspace is held (another thread inside a kernel) neither
    waits nor touches it: it runs on a private one and is right."""
    qt, wd, rng = make("q1_0", 64, 1024, seed=10)
    x = rng.standard_normal(1024, dtype=np.float32)
    K.matvec(qt, -x)  # the process workspace exists, holding -x prepared (Q1_0 on AVX2/AVX-512)
    got: list[np.ndarray] = []
    with K._WS.lock:
        before = K._WS.buf.copy()
        th = threading.Thread(target=lambda: got.append(K.matvec(qt, x)))
        th.start()
        th.join(timeout=60)
        assert not th.is_alive(), "the call waited for the busy workspace"
        assert np.array_equal(K._WS.buf, before)
    assert_within(got[0], wd @ x, matvec_bound("q1_0", "auto", wd, x))


@pytest.mark.parametrize("arch", ["native", "aarch64"])
def test_kernels_never_allocate(arch, tmp_path):
    """tests/noalloc_harness.c wraps malloc and friends and runs every kernel entry point over
    every format, t = 1 and t > 1, both layouts and every implementation: no call allocates."""
    if arch == "native":
        cc, run = shutil.which("gcc") or shutil.which("cc"), []
        flags = []
    else:
        cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
        if cc is None or qemu is None:
            pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
        run, flags = [qemu], ["-march=armv8-a+crc", "-static"]
    if cc is None:
        pytest.skip("no C compiler")
    csrc = REPO / "csrc"
    exe = tmp_path / "noalloc"
    wrap = "-Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=aligned_alloc,--wrap=posix_memalign"
    cmd = [cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags, "-pthread", "-I", str(csrc),
           str(REPO / "tests" / "noalloc_harness.c"), *(str(csrc / f) for f in ("quant.c", "matvec.c", "pool.c", "ffn.c", *KERNEL_SOURCES, *QDOT_SOURCES)),
           wrap, "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr
    out = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert "allocs 0 " in out.stdout and "wrapped 1" in out.stdout


# ---- NEON keeps compiling -------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
@pytest.mark.parametrize("src", ["matvec.c", "pool.c", "ffn.c", *KERNEL_SOURCES, *QDOT_SOURCES])
def test_aarch64_cross_compile(src, tmp_path):
    cmd = ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-Wall", "-Wextra",
           "-Werror", "-march=armv8-a+crc", "-pthread", "-I", str(REPO / "csrc"), "-c",
           str(REPO / "csrc" / src), "-o", str(tmp_path / (src + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr


# Runs under qemu: NEON against the reference for every kernel and format, in C (no Python for
# AArch64 here). The tolerance is the float32 bound of the tests above, per output, computed
# from sum |w| |x| in double.
NEON_CHECK_C = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fic.h"

static float rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f; }

#define CHK(call) do { if ((call) != FIC_OK) { printf("status: %s, fmt %d\n", #call, fmt); bad = 1; } } while (0)

/* Random valid blocks for the formats fic_quantize does not make (Q4_K, Q6_K): random bytes with
 * finite fp16 scales of a realistic size. */
static void random_blocks(int fmt, uint8_t *q, int64_t n_blocks, unsigned *s) {
    const int bb = fic_fmt_block_bytes(fmt);
    for (int64_t i = 0; i < n_blocks * bb; i++) q[i] = (uint8_t)(rnd(s) * 128.0f + 128.0f);
    for (int64_t b = 0; b < n_blocks; b++) {
        uint16_t h0 = fic_fp32_to_fp16(0.011f + 0.01f * rnd(s)), h1 = fic_fp32_to_fp16(0.011f + 0.01f * rnd(s));
        uint8_t *blk = q + b * bb;
        if (fmt == FIC_Q4_K) { memcpy(blk, &h0, 2); memcpy(blk + 2, &h1, 2); }
        else memcpy(blk + bb - 2, &h0, 2); /* Q6_K: d is last */
    }
}

static int close_enough(const float *a, const float *b, const double *mag, int64_t n, int64_t k) {
    for (int64_t i = 0; i < n; i++)
        if (fabs((double)a[i] - b[i]) > 4.0 * k * 5.97e-8 * mag[i] + 1e-30) return 0;
    return 1;
}

int main(void) {
    const int64_t m = 37, k = 512, t = 5; /* k: a multiple of every block (K-quants: 256) */
    unsigned s = 1;
    float *w = malloc(m * k * 4), *x = malloc(t * k * 4), *wd = malloc(m * k * 4);
    float *y1 = malloc(t * m * 4), *y2 = malloc(t * m * 4), *a1 = malloc(k * 4), *a2 = malloc(k * 4);
    double *mag = malloc(t * m * 8), *amag = malloc(k * 8);
    uint8_t *q = malloc(m * k * 4);
    int64_t nws = fic_workspace_bytes(1, t, k, 0, 0);
    void *ws = aligned_alloc(64, (size_t)nws);
    int bad = 0;
    if (!fic_impl_available(FIC_IMPL_NEON) || fic_impl_best() != FIC_IMPL_NEON) { puts("neon unavailable"); return 1; }
    for (int64_t i = 0; i < m * k; i++) w[i] = rnd(&s);
    for (int64_t i = 0; i < t * k; i++) x[i] = rnd(&s);
    for (int fmt = 0; fmt < FIC_FMT_COUNT; fmt++) {
        if (fic_quantize(fmt, w, q, m, k) == FIC_ERR_UNSUPPORTED)
            random_blocks(fmt, q, m * k / fic_fmt_block_weights(fmt), &s);
        fic_dequantize(fmt, q, wd, m, k);
        for (int64_t tt = 0; tt < t; tt++)
            for (int64_t r = 0; r < m; r++) {
                double acc = 0;
                for (int64_t i = 0; i < k; i++) acc += fabs((double)wd[r * k + i] * x[tt * k + i]);
                mag[tt * m + r] = acc;
            }
        for (int64_t i = 0; i < k; i++) {
            double acc = 0;
            for (int64_t r = 0; r < m; r++) acc += fabs((double)wd[r * k + i] * x[r]);
            amag[i] = acc;
        }
        CHK(fic_matvec(NULL, FIC_IMPL_REF, fmt, q, x, y1, m, k, ws, nws));
        CHK(fic_matvec(NULL, FIC_IMPL_NEON, fmt, q, x, y2, m, k, ws, nws));
        if (!close_enough(y1, y2, mag, m, k)) { printf("matvec fmt %d\n", fmt); bad = 1; }
        CHK(fic_matmul(NULL, FIC_IMPL_REF, fmt, q, x, y1, t, m, k, ws, nws));
        CHK(fic_matmul(NULL, FIC_IMPL_NEON, fmt, q, x, y2, t, m, k, ws, nws));
        if (!close_enough(y1, y2, mag, t * m, k)) { printf("matmul fmt %d\n", fmt); bad = 1; }
        for (int64_t i = 0; i < k; i++) a1[i] = a2[i] = 0.0f;
        CHK(fic_accum_rows(NULL, FIC_IMPL_REF, fmt, q, x, a1, m, k, ws, nws));
        CHK(fic_accum_rows(NULL, FIC_IMPL_NEON, fmt, q, x, a2, m, k, ws, nws));
        if (!close_enough(a1, a2, amag, k, m)) { printf("accum_rows fmt %d\n", fmt); bad = 1; }
    }
    puts(bad ? "FAIL" : "OK");
    return bad;
}
"""


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_matches_reference_under_qemu(tmp_path):
    src = tmp_path / "neon_check.c"
    src.write_text(NEON_CHECK_C)
    exe = tmp_path / "neon_check"
    csrc = REPO / "csrc"
    cmd = ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-march=armv8-a+crc", "-pthread", "-static",
           "-I", str(csrc), str(src), *(str(csrc / f) for f in ("quant.c", "matvec.c", "pool.c", *KERNEL_SOURCES, *QDOT_SOURCES)),
           "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr


# ---- the kernel tables (csrc/kernels.h) ------------------------------------------------------

KERNEL_TABLES_C = r"""
#include <stdio.h>
#include "kernels.h"

/* Every table an implementation can pick: its impl, and per format the block traits of quant.c and
 * the two kernels every format must have. Reading a table runs none of its code, so the AVX-512
 * tables are checked here too, on CPUs that could not run them. */
static int check(const char *name, const fic_kernels *kt, int impl) {
    int bad = 0;
    if (kt->impl != impl || kt->axpy == NULL || kt->gemm_tile == NULL) { printf("%s: impl/axpy/gemm\n", name); bad = 1; }
    for (int f = 0; f < FIC_FMT_COUNT; f++) {
        const fic_fmt_kernels *k = &kt->fmt[f];
        if (k->block_weights != fic_fmt_block_weights(f) || k->block_bytes != fic_fmt_block_bytes(f) ||
            k->dot == NULL || k->deq == NULL) { printf("%s: fmt %d\n", name, f); bad = 1; }
    }
    return bad;
}

int main(void) {
    int bad = check("scalar", &fic_kernels_scalar, FIC_IMPL_REF), n = 1;
#if defined(FIC_X86)
    bad |= check("avx2", &fic_kernels_avx2, FIC_IMPL_AVX2);
    bad |= check("avx512", &fic_kernels_avx512, FIC_IMPL_AVX512);
    bad |= check("avx512_vnni", &fic_kernels_avx512_vnni, FIC_IMPL_AVX512);
    bad |= check("avx512_q1", &fic_kernels_avx512_q1, FIC_IMPL_AVX512);
    n += 4;
#endif
#if defined(__aarch64__)
    bad |= check("neon", &fic_kernels_neon, FIC_IMPL_NEON);
    n += 1;
#endif
    /* fic_kernels_for gives a table exactly for the implementations the CPU has */
    for (int impl = FIC_IMPL_REF; impl <= FIC_IMPL_NEON; impl++) {
        const fic_kernels *kt = fic_kernels_for(impl);
        if ((kt != NULL) != fic_impl_available(impl) || (kt != NULL && kt->impl != impl)) {
            printf("fic_kernels_for(%d)\n", impl);
            bad = 1;
        }
    }
    printf("tables %d\n", n);
    puts(bad ? "FAIL" : "OK");
    return bad;
}
"""


@pytest.mark.parametrize("arch", ["native", "aarch64"])
def test_kernel_tables_are_complete(arch, tmp_path):
    """Each architecture's const tables (kernels_*.c) carry quant.c's block traits, a dot and a
    dequantize kernel for every format, and fic_kernels_for picks one exactly where the CPU can run it."""
    if arch == "native":
        cc, run, flags, expect = shutil.which("gcc") or shutil.which("cc"), [], [], "tables 5"
    else:
        cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
        if cc is None or qemu is None:
            pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
        run, flags, expect = [qemu], ["-march=armv8-a+crc", "-static"], "tables 2"
    if cc is None:
        pytest.skip("no C compiler")
    src, exe, csrc = tmp_path / "tables.c", tmp_path / "tables", REPO / "csrc"
    src.write_text(KERNEL_TABLES_C)
    cmd = [cc, "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags, "-pthread", "-I", str(csrc), str(src),
           *(str(csrc / f) for f in ("quant.c", "pool.c", "qdot_avx2.c", *KERNEL_SOURCES)), "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr
    out = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert expect in out.stdout


@pytest.mark.parametrize("cap", ["avx512_vnni", "avx512"])
def test_a_lesser_x86_tier_passes_the_q4_tests(cap):
    """fic runs one table per CPU tier (kernels.c): on a CPU with VBMI and GFNI the VNNI tier's copy
    of the Q4 code (kernels_q4_vnni.h) and the AVX-512 float tier would never run. FIC_CPU_CAP caps
    the tier: the Q4 kernel and FFN tests run again under it, against their own references."""
    if "avx512" not in K.available_impls():
        pytest.skip("no AVX-512 here: no tier above AVX2 to cap")
    env = {**os.environ, "FIC_CPU_CAP": cap}
    probe = subprocess.run([sys.executable, "-c", "from flashinfer_cli import kernels as K; print(K.amx_available())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr  # the cap is read
    tests = [str(REPO / "tests" / f) for f in ("test_kernels.py", "test_ffn.py", "test_ffn_fixed.py")]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests,
                          "-k", "(q4_0 or q4_1) and not lesser_x86_tier"], env=env, capture_output=True, text=True,
                         timeout=1200, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout.splitlines()[-1], res.stdout[-500:]


# ---- the FFN's gating -------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 1000])
def test_silu_mul_matches_numpy(impl, n):
    """h = c silu(h) u (fic_silu_mul): the reference's expf and AVX2's polynomial exp within a few
    float32 roundings of numpy's float64, every length (the vector tail is padded, not scalar),
    gates far in both tails, and NaN where the float64 formula gives NaN."""
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 12).astype(np.float32)
    g[: min(n, 4)] = np.array([0.0, -95.0, 95.0, -30.0], np.float32)[: min(n, 4)]
    u = rng.standard_normal(n).astype(np.float32)
    c = np.float32(0.75)
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):
        want = c * (g64 / (1.0 + np.exp(-g64))) * u
    got = K.silu_mul(float(c), g.copy(), u, impl=impl)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("impl", IMPLS)
def test_silu_mul_special_values(impl):
    g = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0], np.float32)
    got = K.silu_mul(1.0, g.copy(), np.ones_like(g), impl=impl)
    assert np.isnan(got[0]) and got[1] == np.inf and np.isnan(got[2])  # -inf / (1 + inf), as expf gives
    assert got[3] == np.float32(1e30) and got[4] == 0.0 and got[5] == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_silu_mul_refuses_bad_arrays(impl):
    with pytest.raises(ValueError):
        K.silu_mul(1.0, np.zeros(4, np.float64), np.zeros(4, np.float32), impl=impl)
    with pytest.raises(ValueError):
        K.silu_mul(1.0, np.zeros(4, np.float32), np.zeros(5, np.float32), impl=impl)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "q1_0", "f32"])
def test_prepared_matvec_is_matvec(fmt):
    """The prepared call (bench_kernels' timing) gives matvec's bits, again on each call, with the
    pool it was made with after the thread count changes."""
    rng = np.random.default_rng(11)
    qt = K.quantize(rng.standard_normal((96, 512), dtype=np.float32), fmt)
    if fmt == "q1_0":
        qt = K.q1r32_repack(qt)
    x = rng.standard_normal(512).astype(np.float32)
    y = np.full(96, np.nan, np.float32)
    before = K.get_threads()
    try:
        K.set_threads(2)
        call = K.PreparedMatvec(qt, x, y)
        call()
        assert (y == K.matvec(qt, x)).all()
        shared = K.aligned_buffer(K.lib.fic_workspace_bytes(2, 1, 512, 0, 0))
        y2 = np.full(96, np.nan, np.float32)
        K.PreparedMatvec(qt, x, y2, workspace=shared)()  # a workspace shared by calls (bench_kernels)
        assert (y2 == y).all()
        x[:] = rng.standard_normal(512)  # the call reads x in place
        K.set_threads(1)
        call()
        assert (y == K.matvec(qt, x)).all()
    finally:
        K.set_threads(before)
    with pytest.raises(ValueError, match="contiguous"):
        K.PreparedMatvec(qt, x, np.zeros(192, np.float32)[::2])
    with pytest.raises(ValueError, match="shape"):
        K.PreparedMatvec(qt, x[:256], y)


@pytest.mark.skipif("avx512" not in IMPLS or not K.amx_available(), reason="AMX tiles: their two layouts of x")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k"])
def test_amx_prefill_is_the_same_bits_whatever_the_workspace(fmt):
    """The int8 prefill on AMX keeps x in 16-token tiles (qdot.h's QT layout) where they fit the
    workspace and in token rows where not (k 16,384 at exactly fic_workspace_bytes: chunks of 10
    tokens, 8 rows a call); both give the same bits, so the arithmetic does not depend on the
    workspace, and within two float32 bounds of the scalar reference."""
    lib, ffi = K.lib, K.ffi
    k, m, t = 16384, 40, 37
    qt, wd, rng = make(fmt, m, k, seed=13)
    x = rng.standard_normal((t, k), dtype=np.float32)
    need = lib.fic_workspace_bytes(1, t, k, 0, 0)
    impl = K.IMPLS["avx512"]  # int8: the exact flag off

    def run(n_bytes):
        ws, y = K.aligned_buffer(n_bytes), np.zeros((t, m), np.float32)
        st = lib.fic_matmul(ffi.NULL, impl, K._fmt_id(fmt), ffi.from_buffer("uint8_t[]", qt.data),
                            ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y), t, m, k,
                            ffi.from_buffer("uint8_t[]", ws), n_bytes)
        assert st == lib.FIC_OK
        return y

    rows, tiles = run(need), run(need + (4 << 20))
    assert np.array_equal(rows, tiles)
    with K.prefill_mode("int8"):
        ref = K.matmul(qt, x, impl="ref").astype(np.float64)
    assert_within(tiles, ref, 2 * dot_bound(wd, x))
