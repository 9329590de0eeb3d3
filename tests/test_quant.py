"""The block formats of csrc/quant.c against independent references.

Q8_0, Q4_0, Q4_1, Q5_0, F16 and F32 are checked byte for byte against the `gguf` package's numpy
quantizer (which reproduces ggml's quantize_row_*_ref) and numpy's float16. gguf cannot
quantize Q1_0, so Q1_0 is checked against a numpy implementation of its spec written here.
Q4_K and Q6_K are only read by fic: their dequantization is checked against gguf's on arbitrary
blocks and on blocks from llama.cpp's own quantizer (tests/_kquant.py).
"""
from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from flashinfer_cli import kernels
from flashinfer_cli.kernels import QTensor, ffi, lib

from _kquant import K_QUANTS, ggml_quantize, quantize_any

GGUF_TYPES: dict[str, GT] = {"f32": GT.F32, "f16": GT.F16, "q8_0": GT.Q8_0, "q4_0": GT.Q4_0,
                             "q4_1": GT.Q4_1, "q1_0": GT.Q1_0, "q5_0": GT.Q5_0, "q4_k": GT.Q4_K,
                             "q6_k": GT.Q6_K}
GGUF_QUANTIZED = ["q8_0", "q4_0", "q4_1", "q5_0"]
QUANTIZABLE = [f for f in GGUF_TYPES if f not in K_QUANTS]
# Byte offsets of each block's fp16 fields (scales, mins).
HALF_OFFSETS = {"q1_0": (0,), "q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}
F32_EPS = float(np.finfo(np.float32).eps)


# ---- inputs --------------------------------------------------------------------------------

def _normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape) * 0.02


def _uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.uniform(-3.0, 3.0, shape)


def _positive(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # One-signed blocks: Q4_0's max is then negative or positive throughout.
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0])


def _with_zeros(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Scattered zeros and whole zero rows: every block of a zero row has d == 0.
    w = rng.standard_normal(shape)
    w[rng.random(shape) < 0.3] = 0.0
    w[rng.random(shape[0]) < 0.3, :] = 0.0
    return w


def _outliers(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    w = rng.standard_normal(shape) * 0.01
    mask = rng.random(shape) < 0.01
    w[mask] = rng.standard_normal(mask.sum()) * 300.0
    return w


def _tiny(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Scales land in fp16's subnormal range (below 6.1e-5) and underflow to zero.
    return rng.standard_normal(shape) * 10.0 ** rng.uniform(-9, -4, (shape[0], 1))


def _grid(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Small integers and halves: many products w * id sit exactly on rounding ties.
    return rng.integers(-16, 17, shape) / 2.0


def _repeated_max(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # +a and -a both present: Q4_0 must pick the first of equal magnitudes.
    w = rng.uniform(-1.0, 1.0, shape)
    w[:, ::7] = 4.0
    w[:, 3::11] = -4.0
    return w


def _huge(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Beyond fp16's range: stored scales overflow to infinity as they do in ggml.
    return rng.standard_normal(shape) * 1e6


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "normal": _normal, "uniform": _uniform, "positive": _positive, "zeros": _with_zeros,
    "outliers": _outliers, "tiny": _tiny, "grid": _grid, "repeated_max": _repeated_max,
}
SHAPES = [(1, 32), (3, 64), (7, 96), (16, 128), (33, 256), (5, 1024), (64, 384)]


def _weights(dist: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return DISTRIBUTIONS[dist](rng, shape).astype(np.float32)


def _seed(*parts: object) -> int:
    # str hashes are salted per process; a CRC keeps every failure reproducible.
    return zlib.crc32(repr(parts).encode())


def _random_blocks(fmt: str, n_blocks: int, seed: int) -> np.ndarray:
    """Arbitrary block bytes with finite fp16 scales (every nibble / bit pattern occurs)."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[GGUF_TYPES[fmt]]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in HALF_OFFSETS[fmt]:
        blocks[:, off:off + 2] = rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks


# ---- geometry ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_block_geometry_matches_gguf(fmt: str) -> None:
    weights, size = GGML_QUANT_SIZES[GGUF_TYPES[fmt]]
    assert kernels.block_weights(fmt) == weights
    assert kernels.block_bytes(fmt) == size
    assert kernels.row_bytes(fmt, 7 * weights) == 7 * size


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_row_bytes_rejects_partial_blocks(fmt: str) -> None:
    weights = kernels.block_weights(fmt)
    bad = [0, -weights] + ([weights + 1, weights // 2] if weights > 1 else [])
    for k in bad:
        with pytest.raises(ValueError):
            kernels.row_bytes(fmt, k)


def test_unknown_format_rejected() -> None:
    for fn in (kernels.block_weights, kernels.block_bytes):
        with pytest.raises(ValueError):
            fn("q3_0")
    with pytest.raises(ValueError):
        kernels.row_bytes("q3_0", 32)
    for fmt_id in (-1, lib.FIC_FMT_COUNT, 99):
        assert lib.fic_fmt_block_weights(fmt_id) == lib.FIC_ERR_ARG
        assert lib.fic_fmt_block_bytes(fmt_id) == lib.FIC_ERR_ARG
        assert lib.fic_row_bytes(fmt_id, 128) == lib.FIC_ERR_ARG


# ---- Q8_0, Q4_0, Q4_1 against gguf ---------------------------------------------------------

@pytest.mark.parametrize("fmt", GGUF_QUANTIZED)
@pytest.mark.parametrize("dist", [*DISTRIBUTIONS, "huge"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_gguf(fmt: str, dist: str, shape: tuple[int, int]) -> None:
    gen = DISTRIBUTIONS.get(dist, _huge)
    w = gen(np.random.default_rng(_seed(fmt, dist, shape)), shape).astype(np.float32)
    with np.errstate(over="ignore"):  # "huge": gguf's fp16 cast of d overflows, like ggml's
        expected = gguf_quantize(w, GGUF_TYPES[fmt])
    qt = kernels.quantize(w, fmt)
    assert qt.shape == shape
    np.testing.assert_array_equal(qt.data, expected.reshape(-1))


def _boundary_blocks(fmt: str) -> np.ndarray:
    """Blocks whose scale is exactly 1, filled with the floats nearest to each rounding
    threshold (k + 1/2 and k, one float32 ulp either side), including 0.5 - 2^-25 where
    floor(a + 0.5f) and roundf disagree."""
    lo, hi, anchors = {"q8_0": (-127.0, 127.0, [127.0]),      # d = 127 / 127
                       "q4_0": (-8.0, 7.0, [-8.0]),          # d = -8 / -8
                       "q4_1": (0.0, 15.0, [0.0, 15.0]),     # d = (15 - 0) / 15, m = 0
                       "q5_0": (-16.0, 15.0, [-16.0])}[fmt]  # d = -16 / -16
    points = np.arange(lo, hi + 0.5, 0.5, dtype=np.float32)
    values = np.concatenate([np.nextafter(points, -np.inf), points, np.nextafter(points, np.inf)])
    values = values[(values >= lo) & (values <= hi)]
    per_block = 32 - len(anchors)
    values = np.resize(values, -(-values.size // per_block) * per_block).reshape(-1, per_block)
    fixed = np.broadcast_to(np.array(anchors, np.float32), (values.shape[0], len(anchors)))
    return np.concatenate([fixed, values], axis=1).astype(np.float32)


@pytest.mark.parametrize("fmt", GGUF_QUANTIZED)
def test_quantize_matches_gguf_on_rounding_thresholds(fmt: str) -> None:
    w = _boundary_blocks(fmt)
    expected = gguf_quantize(w, GGUF_TYPES[fmt])
    scales = expected.reshape(-1, kernels.block_bytes(fmt))[:, :2].copy().view(np.float16)
    assert np.all(scales == 1.0)  # precondition: w * id is w itself, thresholds are hit exactly
    np.testing.assert_array_equal(kernels.quantize(w, fmt).data, expected.reshape(-1))


@pytest.mark.parametrize("fmt", GGUF_QUANTIZED)
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_dequantize_matches_gguf(fmt: str, dist: str) -> None:
    w = _weights(dist, (24, 512), _seed("deq", fmt, dist))
    qt = kernels.quantize(w, fmt)
    expected = gguf_dequantize(qt.data.reshape(24, -1), GGUF_TYPES[fmt])
    _assert_same_floats(kernels.dequantize(qt), expected)


@pytest.mark.parametrize("fmt", [*GGUF_QUANTIZED, *K_QUANTS])
def test_dequantize_arbitrary_blocks_matches_gguf(fmt: str) -> None:
    # Bytes no quantizer would write (every nibble value, any scale and minimum).
    blocks = _random_blocks(fmt, 4096, _seed("blocks", fmt))
    qt = QTensor(fmt, (64, 64 * kernels.block_weights(fmt)), blocks.reshape(-1))
    expected = gguf_dequantize(blocks.reshape(64, -1), GGUF_TYPES[fmt])
    _assert_same_floats(kernels.dequantize(qt), expected)


@pytest.mark.parametrize("fmt", K_QUANTS)
@pytest.mark.parametrize("dist", ["normal", "uniform", "positive", "zeros", "outliers", "tiny"])
def test_k_quant_dequantize_of_llama_cpp_blocks_matches_gguf(fmt: str, dist: str) -> None:
    """Blocks as llama.cpp's quantize_row_*_ref writes them (via llama-cpp-python's libggml-base),
    dequantized by fic and by gguf: the same floats, and close to the weights they came from."""
    w = _weights(dist, (24, 1024), _seed("kdeq", fmt, dist))
    qt = ggml_quantize(w, fmt)
    if qt is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    got = kernels.dequantize(qt)
    _assert_same_floats(got, gguf_dequantize(qt.data.reshape(24, -1), GGUF_TYPES[fmt]))
    if dist in ("normal", "uniform"):  # the bytes mean the weights: 4- and 6-bit RMS error
        assert np.sqrt(np.mean((got - w) ** 2) / np.mean(w ** 2)) < 0.15


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_k_quants_are_read_only(fmt: str) -> None:
    with pytest.raises(NotImplementedError, match="does not quantize"):
        kernels.quantize(np.zeros((2, 256), np.float32), fmt)
    src, dst = np.zeros(256, np.float32), np.zeros(256, np.uint8)
    assert lib.fic_quantize(kernels.FORMATS[fmt], ffi.from_buffer("float[]", src),
                            ffi.from_buffer("uint8_t[]", dst), 1, 256) == lib.FIC_ERR_UNSUPPORTED


@pytest.mark.parametrize("fmt", [*GGUF_TYPES])
def test_dequantize_unaligned_buffer(fmt: str) -> None:
    # A row slice of a mapped file may start at an odd address; results must not depend on it.
    k = 4 * kernels.block_weights(fmt) * (32 if fmt in ("f32", "f16") else 1)
    w = _weights("normal", (3, k), 7)
    qt = quantize_any(w, fmt, np.random.default_rng(7))
    storage = np.zeros(qt.nbytes + 1, dtype=np.uint8)
    storage[1:] = qt.data
    shifted = QTensor(fmt, qt.shape, storage[1:])
    _assert_same_floats(kernels.dequantize(shifted), kernels.dequantize(qt))
    assert int(ffi.cast("uintptr_t", ffi.from_buffer(shifted.data))) % 2 == 1


def _assert_same_floats(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


# ---- round-trip error bounds ---------------------------------------------------------------
# The quantizer picks q with the float32 scale d; the block stores fp16(d) (and fp16(min)), so
# each bound is: half a step, plus |q| times the scale's fp16 rounding, plus float32 slack.

def _blocks(w: np.ndarray, size: int) -> np.ndarray:
    return w.astype(np.float64).reshape(-1, size)


def _stored_halves(qt: QTensor, offset: int) -> np.ndarray:
    size = kernels.block_bytes(qt.fmt)
    raw = qt.data.reshape(-1, size)[:, offset:offset + 2].copy()
    return raw.view(np.float16).astype(np.float64)


@pytest.mark.parametrize("dist", ["normal", "uniform", "outliers", "grid", "repeated_max", "zeros"])
def test_q8_0_error_within_half_step(dist: str) -> None:
    w = _weights(dist, (32, 1024), _seed("err8", dist))
    qt = kernels.quantize(w, "q8_0")
    x = _blocks(w, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    d16 = _stored_halves(qt, 0)
    err = np.abs(x - _blocks(kernels.dequantize(qt), 32))
    bound = d / 2 + 127 * np.abs(d - d16) + 8 * F32_EPS * np.abs(x).max(axis=1, keepdims=True)
    assert np.all(err <= bound)


@pytest.mark.parametrize("dist", ["normal", "uniform", "outliers", "grid", "repeated_max", "zeros"])
def test_q4_0_error_within_half_step(dist: str) -> None:
    # Levels run -8d..7d with -8d on the block's largest magnitude, so weights of the other
    # sign beyond 7.5 steps clip to 7d: those may be off by a whole step (at most |d|).
    w = _weights(dist, (32, 1024), _seed("err40", dist))
    qt = kernels.quantize(w, "q4_0")
    x = _blocks(w, 32)
    big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = np.abs(big) / 8
    d16 = np.abs(_stored_halves(qt, 0))
    steps = np.where(d > 0, -x * np.sign(big) / np.where(d > 0, d, 1), 0)  # q - 8, unclipped
    clipped = steps > 7.5
    err = np.abs(x - _blocks(kernels.dequantize(qt), 32))
    slack = 8 * np.abs(d - d16) + 8 * F32_EPS * np.abs(big)
    assert np.all(err[~clipped] <= np.broadcast_to(d / 2 + slack, err.shape)[~clipped])
    assert np.all(err[clipped] <= np.broadcast_to(d + slack, err.shape)[clipped])
    if dist == "repeated_max":
        assert clipped.any()  # the whole-step case is exercised, not just allowed


@pytest.mark.parametrize("dist", ["normal", "uniform", "positive", "outliers", "grid", "zeros"])
def test_q4_1_error_within_half_step(dist: str) -> None:
    w = _weights(dist, (32, 1024), _seed("err41", dist))
    qt = kernels.quantize(w, "q4_1")
    x = _blocks(w, 32)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    d16, m16 = _stored_halves(qt, 0), _stored_halves(qt, 2)
    err = np.abs(x - _blocks(kernels.dequantize(qt), 32))
    bound = d / 2 + 15 * np.abs(d - d16) + np.abs(lo - m16) + 8 * F32_EPS * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(err <= bound)


# ---- Q1_0 against a numpy implementation of its spec ---------------------------------------
# 128 weights per block: fp16 d = mean |w| (float32, summed in order), then 16 bytes of sign
# bits, weight j in bit j % 8 of byte j // 8; bit 1 means +d (w >= 0), 0 means -d.

def q1_0_quantize_spec(w: np.ndarray) -> np.ndarray:
    blocks = w.astype(np.float32).reshape(-1, 128)
    total = np.cumsum(np.abs(blocks), axis=1, dtype=np.float32)[:, -1]  # sequential, not pairwise
    d = (total / np.float32(128)).astype(np.float16)
    bits = np.packbits(blocks >= 0, axis=1, bitorder="little")
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), bits], axis=1).reshape(-1)


def q1_0_dequantize_spec(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    signs = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(bool)
    return np.where(signs, d, -d).astype(np.float32).reshape(shape)


Q1_SHAPES = [(1, 128), (3, 256), (17, 640), (32, 1024)]


@pytest.mark.parametrize("dist", [*DISTRIBUTIONS, "huge"])
@pytest.mark.parametrize("shape", Q1_SHAPES)
def test_q1_0_quantize_matches_spec(dist: str, shape: tuple[int, int]) -> None:
    gen = DISTRIBUTIONS.get(dist, _huge)
    w = gen(np.random.default_rng(_seed("q1", dist, shape)), shape).astype(np.float32)
    w[0, :5] = [0.0, -0.0, 1e-30, -1e-30, 0.0]  # sign of zeros: w >= 0 holds for -0.0 too
    with np.errstate(over="ignore"):
        expected = q1_0_quantize_spec(w)
    np.testing.assert_array_equal(kernels.quantize(w, "q1_0").data, expected)


def test_q1_0_dequantize_matches_spec() -> None:
    blocks = _random_blocks("q1_0", 2048, _seed("q1blocks"))
    qt = QTensor("q1_0", (16, 128 * 128), blocks.reshape(-1))
    _assert_same_floats(kernels.dequantize(qt), q1_0_dequantize_spec(qt.data, qt.shape))


@pytest.mark.parametrize("dist", ["normal", "uniform", "outliers", "zeros", "tiny"])
def test_q1_0_round_trip_is_signed_mean(dist: str) -> None:
    # Each weight comes back as exactly +-d, d within one fp16 rounding of the float64 mean |w|.
    w = _weights(dist, (16, 1024), _seed("q1rt", dist))
    out = _blocks(kernels.dequantize(kernels.quantize(w, "q1_0")), 128)
    x = _blocks(w, 128)
    d = np.abs(out[:, :1])
    np.testing.assert_array_equal(out, np.where(x >= 0, d, -d))
    mean = np.abs(x).mean(axis=1, keepdims=True)
    half_ulp = np.spacing(mean.astype(np.float16)).astype(np.float64)  # fp16 spacing at the mean
    assert np.all(np.abs(d - mean) <= half_ulp * 0.5 + 128 * F32_EPS * mean)


# ---- F16 and F32 formats -------------------------------------------------------------------

def _float32_specials() -> np.ndarray:
    bits = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
            0x7F800001, 0x7FA00000, 0xFF802000, 0x00000001, 0x807FFFFF, 0x477FE000,
            0x477FEFFF, 0x477FF000, 0x477FF001, 0x7F7FFFFF, 0x38800000, 0x387FFFFF,
            0x33000000, 0x33000001, 0x32FFFFFF, 0xB3000000, 0x33800000, 0x337FFFFF]
    return np.array(bits, dtype=np.uint32).view(np.float32)


def _float32_rounding_edges() -> np.ndarray:
    """For every finite half h: the float32 halfway to the next half, and one ulp either side.

    Halfway points are where round-half-to-even decides; they cover normal and subnormal halves,
    the subnormal/normal border and the overflow threshold."""
    h = np.arange(0x0000, 0x7C00, dtype=np.uint16).view(np.float16)
    lo = h.astype(np.float64)
    hi = np.append(lo[1:], 65536.0)
    mid = ((lo + hi) / 2).astype(np.float32)  # exact: a half plus half its step fits in float32
    mid_bits = mid.view(np.uint32)
    edges = np.concatenate([mid_bits - 1, mid_bits, mid_bits + 1])
    both_signs = np.concatenate([edges, edges | np.uint32(0x80000000)])
    return both_signs.view(np.float32)


def _numpy_f16_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).view(np.uint16)


def test_f16_format_matches_numpy_on_rounding_edges() -> None:
    x = np.concatenate([_float32_rounding_edges(), _float32_specials()])
    x = x.reshape(1, -1)
    got = kernels.quantize(x, "f16").data.view(np.uint16)
    np.testing.assert_array_equal(got, _numpy_f16_bits(x.reshape(-1)))


def test_f16_format_matches_numpy_on_random_bit_patterns() -> None:
    rng = np.random.default_rng(_seed("f16bits"))
    x = rng.integers(0, 2**32, size=(64, 1 << 16), dtype=np.uint64).astype(np.uint32).view(np.float32)
    got = kernels.quantize(x, "f16").data.view(np.uint16)
    np.testing.assert_array_equal(got, _numpy_f16_bits(x.reshape(-1)))


def test_f16_ties_round_to_even() -> None:
    # 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: even mantissa 1 wins; 1 + 3 * 2^-11
    # lies between odd 1 + 2^-10 and even 1 + 2^-9 and rounds up.
    x = np.array([[1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 65520.0, -65519.99]], np.float32)
    got = kernels.quantize(x, "f16").data.view(np.uint16)
    np.testing.assert_array_equal(got, [0x3C00, 0x3C02, 0x0000, 0x0002, 0x7C00, 0xFBFF])


def test_f16_format_decodes_every_half() -> None:
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    qt = QTensor("f16", (1, 65536), halves.view(np.uint8).copy())
    expected = halves.view(np.float16).astype(np.float32)
    _assert_same_floats(kernels.dequantize(qt), expected.reshape(1, -1))


def test_f32_format_is_identity() -> None:
    x = np.resize(_float32_specials(), (4, 96)).astype(np.float32)
    qt = kernels.quantize(x, "f32")
    np.testing.assert_array_equal(qt.data, gguf_quantize(x, GT.F32).view(np.uint8).reshape(-1))
    _assert_same_floats(kernels.dequantize(qt), x)


# ---- scalar fp16 conversions ---------------------------------------------------------------

def _quieted(bits: np.ndarray, quiet_bit: int, exp_mask: int, mant_mask: int) -> np.ndarray:
    """NaN bit patterns with the quiet bit set.

    The scalar binding carries values as Python floats (doubles); the float<->double conversion
    on the way quiets a signalling NaN, so the scalar calls can only see or return quiet NaNs.
    The F16 format tests above compare signalling NaNs bit for bit through arrays."""
    nan = (bits & exp_mask == exp_mask) & (bits & mant_mask != 0)
    return np.where(nan, bits | quiet_bit, bits).astype(bits.dtype)


def test_fp16_to_fp32_exhaustive() -> None:
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = np.array([kernels.fp16_bits_to_fp32(int(h)) for h in halves], dtype=np.float32)
    expected = halves.view(np.float16).astype(np.float32).view(np.uint32)
    quiet = _quieted(expected, 0x00400000, 0x7F800000, 0x007FFFFF)
    np.testing.assert_array_equal(got.view(np.uint32), quiet)


def test_fp32_to_fp16_matches_numpy() -> None:
    rng = np.random.default_rng(_seed("fp32scalar"))
    random = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    edges = _float32_rounding_edges()[::3].view(np.uint32)  # one in three of each kind, for time
    bits = _quieted(np.concatenate([random, edges, _float32_specials().view(np.uint32)]),
                    0x00400000, 0x7F800000, 0x007FFFFF)
    x = bits.view(np.float32)
    got = np.array([kernels.fp32_to_fp16_bits(float(v)) for v in x], dtype=np.uint16)
    np.testing.assert_array_equal(got, _numpy_f16_bits(x))


def test_f16_format_keeps_nan_a_nan() -> None:
    # A NaN whose payload lives only in bits fp16 drops must not turn into infinity.
    bits = np.array([[0x7F800001, 0xFF800FFF, 0x7FC00000, 0x7F801FFF]], np.uint32)
    h = kernels.quantize(bits.view(np.float32), "f16").data.view(np.uint16).astype(np.uint32)
    assert np.all(h & 0x7C00 == 0x7C00) and np.all(h & 0x03FF != 0)
    np.testing.assert_array_equal(h >> 15, bits.reshape(-1) >> 31)


# ---- bad inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", QUANTIZABLE)
def test_quantize_rejects_bad_arrays(fmt: str) -> None:
    k = 128
    good = np.zeros((2, k), np.float32)
    bad_arrays = [good.astype(np.float64), good.astype(np.float16), good.reshape(-1),
                  good.reshape(1, 2, k), good.tolist()]
    for bad in bad_arrays:
        with pytest.raises(ValueError):
            kernels.quantize(bad, fmt)  # type: ignore[arg-type]
    if kernels.block_weights(fmt) > 1:
        with pytest.raises(ValueError):
            kernels.quantize(np.zeros((2, k + kernels.block_weights(fmt) // 2), np.float32), fmt)
    with pytest.raises(ValueError):
        kernels.quantize(good, "q2_0")


def test_q1_0_rejects_rows_of_32() -> None:
    # A row of 32 is whole blocks for Q4/Q8 but a quarter block for Q1_0.
    with pytest.raises(ValueError):
        kernels.quantize(np.zeros((4, 96), np.float32), "q1_0")
    with pytest.raises(ValueError):
        kernels.row_bytes("q1_0", 96)


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_dequantize_rejects_mismatched_bytes(fmt: str) -> None:
    k = max(128, kernels.block_weights(fmt))
    n = 2 * kernels.row_bytes(fmt, k)
    for data in (np.zeros(n - 1, np.uint8), np.zeros(n + 2, np.uint8), np.zeros(n // 2, np.uint16),
                 np.zeros((2, n // 2), np.uint8)):
        with pytest.raises(ValueError):
            kernels.dequantize(QTensor(fmt, (2, k), data))
    with pytest.raises(ValueError):
        kernels.dequantize(QTensor(fmt, (2, k + 1), np.zeros(n, np.uint8)))


def test_c_core_rejects_bad_calls_itself() -> None:
    # kernels.py checks first; the C core must still refuse what would read or write out of bounds.
    src = np.zeros(256, np.float32)
    dst = np.zeros(1024, np.uint8)
    s, d = ffi.from_buffer("float[]", src), ffi.from_buffer("uint8_t[]", dst)
    bad_calls = [(lib.FIC_Q8_0, s, d, 1, 33), (lib.FIC_Q1_0, s, d, 1, 64), (lib.FIC_Q4_0, s, d, -1, 32),
                 (lib.FIC_Q4_1, s, d, 1, 0), (lib.FIC_FMT_COUNT, s, d, 1, 128),
                 (lib.FIC_Q8_0, ffi.NULL, d, 1, 32), (lib.FIC_Q8_0, s, ffi.NULL, 1, 32),
                 (lib.FIC_Q4_0, s, d, 2**62, 2**40)]
    for fmt, a, b, m, k in bad_calls:
        assert lib.fic_quantize(fmt, a, b, m, k) == lib.FIC_ERR_ARG
        assert lib.fic_dequantize(fmt, ffi.cast("uint8_t *", a), ffi.cast("float *", b), m, k) == lib.FIC_ERR_ARG
    assert not dst.any()  # nothing was written by a refused call
    assert lib.fic_quantize(lib.FIC_Q8_0, s, d, 0, 32) == lib.FIC_OK  # zero rows is a valid no-op
