"""Q1_0 in the r32 layout (fic.h; csrc/q1r32.c): 32 rows' sign bytes side by side, matvec by table
lookups. Checked against numpy's integer arithmetic of the same int8 activations (an independent
reference: ggml's q8_0 rounding over 128 values, sum of +-xq per 128 weights, then d_w dx in
float64) and against W x within the rounding of x, every
implementation against the scalar reference bit for bit, and prefill against the row-major Q1_0
kernels it reuses."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from flashinfer_cli import kernels as K

IMPLS = K.available_impls()
SHAPES = [(32, 128), (64, 256), (96, 4096), (2048, 2048), (4160, 512)]


def q1_matrix(m: int, k: int, seed: int) -> tuple[K.QTensor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return K.quantize(rng.standard_normal((m, k), dtype=np.float32), "q1_0"), rng


def q8_numpy(x: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """ggml's q8_0 rounding of x over blocks of `block` values (the r32 layout's x: 128, one scale
    per Q1_0 block; the row-major Q1_0 kernels': 32): d = amax / 127 and q = round-half-even(x / d),
    in float32."""
    xb = x.reshape(-1, block).astype(np.float32)
    d = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    return np.rint(xb * inv[:, None]).astype(np.int64).reshape(-1), d


def q1_parts(qt: K.QTensor) -> tuple[np.ndarray, np.ndarray]:
    """The rows' d per Q1_0 block (m, nb) in float64 and their signs +-1 (m, nb, 128)."""
    m, k = qt.shape
    blk = qt.data.reshape(m, k // 128, 18)
    d = blk[:, :, :2].copy().view(np.float16).astype(np.float64)[:, :, 0]
    return d, 2 * np.unpackbits(blk[:, :, 2:], axis=2, bitorder="little").astype(np.int64) - 1


def reference(qt: K.QTensor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W x over the layout's int8 activations (one scale per 128), the integer sums exact, in
    float64; and the bound of the kernels' float32 part (a product and a fused multiply-add per
    Q1_0 block: 3 roundings each, summed)."""
    m, k = qt.shape
    nb = k // 128
    d, signs = q1_parts(qt)
    q, dx = q8_numpy(x)
    sums = (signs * q.reshape(nb, 128)[None]).sum(axis=2)  # (m, nb)
    terms = sums * d * dx[None].astype(np.float64)
    bound = 3 * 2.0 ** -24 * (np.abs(terms).sum(axis=1) * nb)  # gamma_n over n block terms
    return terms.sum(axis=1), bound + 1e-30


def quantization_bound(qt: K.QTensor, x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """W x in float64 (the dequantized weights, x unrounded) and how far an int8 product with x in
    blocks of `block` may be from it: each x_j moves by at most half its block's step, so a row by at
    most sum_j |w_j| d_x(j) / 2, plus the float part's bound (an ulp of the largest term a block)."""
    d, signs = q1_parts(qt)
    m, k = qt.shape
    w = (signs * d[:, :, None]).reshape(m, k)
    _, dx = q8_numpy(x, block)
    step = np.repeat(dx.astype(np.float64), block)
    exact = w @ x.astype(np.float64)
    return exact, np.abs(w) @ (step / 2) * (1 + 1e-5) + 1e-5 * (np.abs(w) @ np.abs(x.astype(np.float64)))


@pytest.mark.parametrize("m,k", SHAPES)
def test_repack_round_trips(m, k):
    qt, _ = q1_matrix(m, k, seed=m + k)
    r = K.q1r32_repack(qt)
    assert r.fmt == "q1_0r32" and r.shape == qt.shape and r.nbytes == qt.nbytes
    assert (K.q1r32_rows(r, 0, m).data == qt.data).all()
    assert (K.q1r32_rows(r, 3, min(m, 40)).data == qt.rows(3, min(m, 40)).data).all()
    in_place = K.q1r32_repack(K.QTensor("q1_0", qt.shape, qt.data.copy()), in_place=True)
    assert (in_place.data == r.data).all()
    assert (r.rows(0, 32).data == r.data[:r.nbytes * 32 // m]).all()  # a group is a contiguous range
    assert (K.dequantize(r) == K.dequantize(qt)).all()


@pytest.mark.parametrize("m,k", SHAPES)
def test_matvec_matches_integer_reference(m, k):
    qt, rng = q1_matrix(m, k, seed=2 * m + k)
    x = (3 * rng.standard_normal(k)).astype(np.float32)
    r = K.q1r32_repack(qt)
    want, bound = reference(qt, x)
    ys = {impl: K.matvec(r, x, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        err = np.abs(y.astype(np.float64) - want)
        assert (err <= bound).all(), f"{impl}: error {err.max():.3g} over its bound"
        assert (y == ys["ref"]).all(), f"{impl} differs from the scalar reference"
    # against W x itself: the layout within its rounding of x (128 a scale), the row-major Q1_0
    # kernel (32 a scale) within its own
    for y, block in ((ys["ref"], 128), (K.matvec(qt, x), 32)):
        exact, qbound = quantization_bound(qt, x, block)
        assert (np.abs(y.astype(np.float64) - exact) <= qbound).all(), block


@pytest.mark.parametrize("bits", [0x00, 0xFF, 0x0F, 0xAA])
@pytest.mark.parametrize("value", [1.0, -1.0])
def test_the_byte_sums_at_their_limits(bits, value):
    """The kernels add four table lookups in a byte and the q8 block's correction in int16: with
    every activation at +-127 (its low and high nibbles at their extremes: 15 and 7, or 1 and -8)
    and rows of all-set, all-clear and mixed bits, every sum stays exact."""
    m, k = 64, 512
    blocks = np.zeros((m, k // 128, 18), np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blocks[:, :, 2:] = bits
    blocks[1::2, :, 2:] = 0xFF - bits  # the complement in every other row
    qt = K.QTensor("q1_0", (m, k), blocks.reshape(-1))
    x = np.full(k, value, np.float32)
    x[256:] *= -1  # both signs in one call
    r = K.q1r32_repack(qt)
    want, bound = reference(qt, x)
    for impl in IMPLS:
        y = K.matvec(r, x, impl=impl)
        assert (np.abs(y.astype(np.float64) - want) <= bound).all(), impl


def test_threads_give_the_same_bits():
    qt, rng = q1_matrix(4096, 1024, seed=5)
    x = rng.standard_normal(1024).astype(np.float32)
    r = K.q1r32_repack(qt)
    before = K.get_threads()
    try:
        K.set_threads(1)
        y1 = K.matvec(r, x)
        K.set_threads(2)
        y2 = K.matvec(r, x)
    finally:
        K.set_threads(before)
    assert (y1 == y2).all()


def test_prefill_exact_equals_the_row_major_kernels():
    """The float prefill reads rows: the r32 matrix's rows gathered back give its bits."""
    qt, rng = q1_matrix(320, 512, seed=7)
    r = K.q1r32_repack(qt)
    x = rng.standard_normal((9, 512), dtype=np.float32)
    with K.prefill_mode("exact"):
        assert (K.matmul(r, x) == K.matmul(qt, x)).all()


# t 40 and 33: full tiles of 16 tokens and a partial one (AMX); k 4096 and 1664: several slices of
# 16 q8 blocks, the last one partial at 1664 (one Q1_0 block: the kernel's odd block, as at k 128);
# t 16: one tile exactly
@pytest.mark.parametrize("m,k,t", [(320, 512, 9), (64, 4096, 40), (4160, 512, 3), (96, 1664, 33), (32, 128, 16)])
def test_prefill_is_the_matvec_token_by_token(m, k, t):
    """T > 1 (int8) runs the matvec's tables for each token: every row of the product is that
    token's matvec bit for bit, on every implementation and thread count, including token chunks
    split by a small workspace (k 4096: a few tokens a chunk); within the integer reference's bound."""
    qt, rng = q1_matrix(m, k, seed=m + k + t)
    r = K.q1r32_repack(qt)
    x = (2 * rng.standard_normal((t, k))).astype(np.float32)
    want = np.stack([K.matvec(r, xi) for xi in x])
    before = K.get_threads()
    try:
        for n_threads in (1, 2):
            K.set_threads(n_threads)
            with K.prefill_mode("auto"):
                for impl in IMPLS:
                    if impl == "neon":  # NEON keeps Q1_0's sdot kernel on unpacked rows (within its bound below)
                        continue
                    assert (K.matmul(r, x, impl=impl) == want).all(), (impl, n_threads)
    finally:
        K.set_threads(before)
    for i in range(t):
        ref, bound = reference(qt, x[i])
        assert (np.abs(want[i].astype(np.float64) - ref) <= bound).all()
    # the row-major int8 prefill answers the same question within its rounding of x
    rows = K.matmul(qt, x)
    for i in range(t):
        exact, qbound = quantization_bound(qt, x[i], 32)
        assert (np.abs(rows[i].astype(np.float64) - exact) <= qbound).all()


def test_bad_shapes_and_arguments_are_refused():
    lib, ffi = K.lib, K.ffi
    qt, rng = q1_matrix(48, 256, seed=9)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.q1r32_repack(qt)
    with pytest.raises(ValueError, match="q1_0"):
        K.q1r32_repack(K.quantize(rng.standard_normal((32, 256), dtype=np.float32), "q4_0"))
    r = K.q1r32_repack(qt.rows(0, 32))
    with pytest.raises(ValueError, match="multiples of 32"):
        r.rows(0, 16)
    src = np.zeros(32 * 36, np.uint8)
    assert lib.fic_q1r32_repack(K._u8(src), 32, 256, K._u8(src)) == lib.FIC_ERR_ARG  # overlap
    assert lib.fic_q1r32_repack(K._u8(src), 32, 200, K._u8(np.zeros_like(src))) == lib.FIC_ERR_ARG
    x = np.ones(256, np.float32)
    y = np.full(32, np.nan, np.float32)
    need = lib.fic_q1r32_ws_bytes(256)
    ws = K.aligned_buffer(need)
    args = (ffi.NULL, lib.FIC_IMPL_AUTO, K._u8(r.data), K._f32(x), K._f32(y))
    assert lib.fic_q1r32_matvec(*args, 32, 256, K._u8(ws), need - 64) == lib.FIC_ERR_WORKSPACE
    assert lib.fic_q1r32_matvec(*args, 16, 256, K._u8(ws), need) == lib.FIC_ERR_ARG
    assert lib.fic_q1r32_matvec(*args, 32, 192, K._u8(ws), need) == lib.FIC_ERR_ARG
    assert np.isnan(y).all()
    ws_mv = K.aligned_buffer(10 * 256)  # fic_matvec's A(10 k) covers the layout's tables
    assert lib.fic_matvec(ffi.NULL, lib.FIC_IMPL_AUTO, lib.FIC_Q1_0R32, K._u8(r.data), K._f32(x), K._f32(y), 40, 256,
                          K._u8(ws_mv), ws_mv.nbytes) == lib.FIC_ERR_ARG
    assert lib.fic_q1r32_matvec(*args, 32, 256, K._u8(ws), need) == lib.FIC_OK
    # fic_matmul: the float prefill reads rows, which the layout has not (Python gathers them first)
    xt = np.ones((2, 256), np.float32)
    yt = np.zeros((2, 32), np.float32)
    ws_mm = K.aligned_buffer(K.workspace_bytes_for(n_threads=1, max_t=2, max_k=256))
    mm = (ffi.NULL, lib.FIC_IMPL_REF | lib.FIC_IMPL_EXACT, lib.FIC_Q1_0R32, K._u8(r.data), K._f32(xt), K._f32(yt))
    assert lib.fic_matmul(*mm, 2, 32, 256, K._u8(ws_mm), ws_mm.nbytes) == lib.FIC_ERR_UNSUPPORTED
    assert lib.fic_matmul(*mm, 1, 32, 256, K._u8(ws_mm), ws_mm.nbytes) == lib.FIC_OK
    assert lib.fic_matmul(*mm[:1], lib.FIC_IMPL_REF, *mm[2:], 2, 48, 256, K._u8(ws_mm), ws_mm.nbytes) == lib.FIC_ERR_ARG
    assert lib.fic_row_bytes(lib.FIC_Q1_0R32, 256) == lib.fic_row_bytes(lib.FIC_Q1_0, 256)


def test_the_layout_switch(monkeypatch):
    monkeypatch.setenv("FIC_Q1R32", "0")
    assert not K.q1r32_wanted()
    monkeypatch.setenv("FIC_Q1R32", "1")
    assert K.q1r32_wanted()
    monkeypatch.setenv("FIC_Q1R32", "auto")
    assert K.q1r32_wanted() == (K.best_impl() in ("avx2", "avx512"))
    monkeypatch.setenv("FIC_Q1R32", "yes")
    with pytest.raises(ValueError, match="FIC_Q1R32"):
        K.q1r32_wanted()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


AMX_FLAGS = {"amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bitalg", "avx512vbmi"}

_PREFILL_CHILD = """
import sys, numpy as np
from flashinfer_cli import kernels as K
d = np.load(sys.argv[1])
qt = K.QTensor("q1_0", tuple(int(v) for v in d["shape"]), d["data"])
r = K.q1r32_repack(qt)
with K.prefill_mode("auto"):
    y = K.matmul(r, d["x"])
np.save(sys.argv[2], y)
print(int(K.amx_available()))
"""


def test_amx_tiles_follow_the_cpu_and_give_the_tables_bits(tmp_path):
    """AMX is used exactly where the CPU has it (Linux granting the tile state) and FIC_NO_AMX is
    unset; a process without the tiles computes the same prefill bits as this one."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    if not AMX_FLAGS <= flags:
        assert not K.amx_available()
        return
    qt, rng = q1_matrix(96, 1536, seed=11)
    x = (2 * rng.standard_normal((37, 1536))).astype(np.float32)
    np.savez(tmp_path / "in.npz", data=qt.data, shape=np.array(qt.shape), x=x)
    out = {}
    for off in ("0", "1"):
        env = dict(os.environ, FIC_NO_AMX=off)
        run = subprocess.run([sys.executable, "-c", _PREFILL_CHILD, str(tmp_path / "in.npz"), str(tmp_path / f"y{off}.npy")],
                             env=env, capture_output=True, text=True, check=True)
        out[off] = (run.stdout.strip(), np.load(tmp_path / f"y{off}.npy"))
    assert out["0"][0] == "1" and out["1"][0] == "0"  # a Linux without the permission would say 0: see csrc/pool.c
    assert (out["0"][1] == out["1"][1]).all()
    r = K.q1r32_repack(qt)
    assert (out["0"][1] == np.stack([K.matvec(r, xi) for xi in x])).all()


@pytest.mark.parametrize("k", [128, 256, 1536])
def test_prefill_runs_in_the_documented_workspace(k):
    """fic_matmul of the layout with exactly fic_workspace_bytes' matmul term, small k included: what
    a call needs does not depend on the implementation or the CPU (the AMX path's scratch fits)."""
    lib, ffi = K.lib, K.ffi
    qt, rng = q1_matrix(64, k, seed=k)
    r = K.q1r32_repack(qt)
    x = rng.standard_normal((20, k)).astype(np.float32)
    need = lib.fic_workspace_bytes(1, 20, k, 0, 0)
    ws = K.aligned_buffer(need)
    want = np.stack([K.matvec(r, xi) for xi in x])
    for impl in IMPLS:
        if impl == "neon":
            continue
        y = np.full((20, 64), np.nan, np.float32)
        assert lib.fic_matmul(ffi.NULL, K.IMPLS[impl], lib.FIC_Q1_0R32, K._u8(r.data), K._f32(x), K._f32(y), 20, 64, k,
                              K._u8(ws), need) == lib.FIC_OK, impl
        assert (y == want).all(), impl
