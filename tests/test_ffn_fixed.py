"""FIC_FFN_FIXED: the expert FFN summed in fixed point, so that its output does not depend on how a
layer's experts are split between calls (a budget that streams some of them computes, bit for bit,
what the full model computes).

Checked against independent references: fix() against numpy's float64 rint; the FFN's value
against the float64 numpy FFN of test_ffn (its bound, plus the fixed grid's 2^-33 per expert);
split independence against the same kernels in one call, with every format, both decode
arithmetics, one token and several, 1 and 2 threads."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels as K
from test_ffn import Case, sizes, stable_seed
from test_kernels import assert_within

IMPLS = K.available_impls()
UNIT = 2.0 ** -32


def fix_numpy(c: np.ndarray) -> np.ndarray:
    """fic.h's fix(): c * 2^32 rounded half to even, c saturated at +-2^30, NaN as +2^30."""
    v = c.astype(np.float64)
    v = np.where(np.isnan(v), 2.0 ** 30, np.clip(v, -2.0 ** 30, 2.0 ** 30))
    return np.rint(v * 2.0 ** 32).astype(np.int64)


@pytest.mark.parametrize("impl", IMPLS)
def test_fixed_add_matches_numpy(impl):
    rng = np.random.default_rng(7)
    c = np.concatenate([
        rng.standard_normal(1001).astype(np.float32) * 10,
        np.array([0.5, 1.5, 2.5, -0.5, -2.5], np.float32) * UNIT,     # ties: half to even
        np.array([3 * 2 ** 18, 2 ** 19, -2 ** 19, 2 ** 29, 2 ** 31, -2 ** 40, np.inf, -np.inf, np.nan], np.float32),
        np.array([1e-12, -1e-30, 0.0, -0.0], np.float32),
    ])
    # the vector body, a tail alone, nothing; tails ending in the out-of-range values, in the ties
    for n in (len(c), 3, 0, 1015, 1013, 1006, 1004):
        acc = np.arange(n, dtype=np.int64) - 5
        want = acc + fix_numpy(c[:n])
        assert np.array_equal(K.fixed_add(np.ascontiguousarray(c[:n]), acc, impl=impl), want)


def test_fixed_flush_adds_and_clears():
    rng = np.random.default_rng(8)
    acc = rng.integers(-2 ** 50, 2 ** 50, 333, dtype=np.int64)
    y = rng.standard_normal(333).astype(np.float32)
    want = (y.astype(np.float64) + (acc.astype(np.float64) * UNIT).astype(np.float32).astype(np.float64))
    K.fixed_flush(acc, y)
    assert np.array_equal(y, want.astype(np.float32))
    assert not acc.any()


def run_split(case: Case, groups: list[list[int]], impl: str) -> np.ndarray:
    """The fixed-point accumulator after one experts_ffn_slots call per group of experts."""
    arena, slot_bytes, slots = case.arena()
    ns = np.array(case.ns, np.int32)
    acc = np.zeros(case.y0.shape, np.int64)
    x = case.x[0] if case.t == 1 else case.x
    acc_view = acc[0] if case.t == 1 else acc
    for g in groups:
        g = np.array(g, dtype=np.intp)
        coef = None
        if case.coef is not None:
            coef = np.ascontiguousarray(case.coef[0, g] if case.t == 1 else case.coef[:, g])
        K.experts_ffn_slots(case.layout_obj(), arena, slot_bytes, slots[g], ns[g], x, acc_view, coef=coef, impl=impl)
    return acc


def splits(n_experts: int, seed: int) -> list[list[list[int]]]:
    """One call over all; one per expert in reverse; two random halves, the second first."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_experts).tolist()
    half = n_experts // 2
    return [[list(range(n_experts))], [[e] for e in reversed(range(n_experts))],
            [sorted(perm[half:]), sorted(perm[:half])]]


FORMATS = ["q4_0", "q4_1", "q8_0", "q5_0", "q1_0", "q4_k", "q6_k", "f16"]


def check_splits(case: Case, n_experts: int, seed: int, impl: str, threads: int, decode: str) -> None:
    """Every split of the experts between calls gives the same accumulator, and it is the numpy
    FFN within its bound plus the grid's 2^-33 per expert."""
    K.set_threads(threads)
    try:
        with K.decode_mode(decode), K.prefill_mode(decode):
            accs = [run_split(case, groups, impl) for groups in splits(n_experts, seed)]
            want, bound = case.want_and_bound(impl)
    finally:
        K.set_threads(K.default_threads())
    for acc in accs[1:]:
        assert np.array_equal(acc, accs[0])
    y = case.y0.copy()
    K.fixed_flush(accs[0].ravel(), y.ravel())
    assert_within(y, want, bound + n_experts * 2.0 ** -33 + np.abs(want) * 2.0 ** -23)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("decode", ["int8", "exact"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("impl", IMPLS)
def test_split_does_not_change_the_sum(fmt, t, decode, threads, impl):
    n_experts = 6
    case = Case([fmt] * 3, "columns", sizes(fmt, "columns", n_experts, seed=4), t, seed=stable_seed(fmt, t),
                coef=None if t == 1 else "uniform")
    check_splits(case, n_experts, stable_seed(fmt, t, "split"), impl, threads, decode)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [160, 576])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("impl", IMPLS)
def test_64_neuron_experts(fmt, d, threads, impl):
    """A dense model's experts (the converter's 64 neurons: down pieces of 2 blocks, which AVX-512
    VNNI takes two rows to a step (Q4) or one row to a vpdpbusd (Q8_0, the K-quant files' requantized
    down), eight rows a call): split independence and the numpy bound, int8 decode, 1 and 2 threads."""
    case = Case([fmt] * 3, "columns", [64] * 5, 1, seed=stable_seed(fmt, d, "k64"), d=d, coef=None)
    check_splits(case, 5, stable_seed(fmt, d, "split64"), impl, threads, "int8")


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q5_0", "q1_0"])
@pytest.mark.parametrize("impl", IMPLS)
def test_phase_2_split_by_experts_is_the_same_bits(fmt, impl):
    """Twelve short experts at t = 1 (64 neurons; Q1_0's 128): with 2 threads phase 2 gives each
    thread whole experts, summed into its own fixed-point accumulator and added after; with 1 thread,
    or 6 experts a call, nothing is split so. The accumulators are the same bits every way."""
    n = 128 if fmt == "q1_0" else 64
    case = Case([fmt] * 3, "columns", [n] * 12, 1, seed=stable_seed(fmt, "by-experts"), d=640, coef=None)
    accs = []
    for threads in (1, 2):
        K.set_threads(threads)
        try:
            accs.append(run_split(case, [list(range(12))], impl))
        finally:
            K.set_threads(K.default_threads())
    assert np.array_equal(accs[0], accs[1])
    check_splits(case, 12, stable_seed(fmt, "by-experts-split"), impl, 2, "int8")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [100, 108, 120])
@pytest.mark.parametrize("impl", IMPLS)
def test_64_neuron_experts_with_a_partial_last_block_of_rows(impl, d, threads):
    """f16 gate and up, Q8_0 down, d not a multiple of 16: the last 4, 12 or 8 output rows take the
    16-row kernel's partial steps (AVX-512 VNNI)."""
    case = Case(["f16", "f16", "q8_0"], "columns", [64] * 5, 1, seed=stable_seed("q8_0", d, "k64"), d=d, coef=None)
    check_splits(case, 5, stable_seed("q8_0", d, "split64"), impl, threads, "int8")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [256, 100, 120])
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
@pytest.mark.parametrize("impl", IMPLS)
def test_256_neuron_k_quant_experts(impl, fmt, d, threads):
    """A Q4_K_M file's down kept (experts of 256 neurons: one super-block a down row), which AVX-512
    VNNI takes 16 rows a step with x loaded once; d = 100 and 120 end on partial steps (4 and 8 rows).
    Split independence and the numpy bound, int8 decode, 1 and 2 threads."""
    case = Case(["f16", "f16", fmt], "columns", [256] * 4, 1, seed=stable_seed(fmt, d, "k256"), d=d, coef=None)
    check_splits(case, 4, stable_seed(fmt, d, "split256"), impl, threads, "int8")


def test_auto_prefill_of_q4_k_gate_up_with_a_q6_k_down():
    """A Q4_K_M layer (Q4_K gate and up, Q6_K down), 12 tokens: a fixed-point call's down has no AMX
    tiles and runs in float in either mode, so its default ("auto") prefill is what gate and up have
    alone: int8 where Q4_K runs on AMX tiles (FIC_PREFILL=int8's bits), else exact; a float y's call
    (no fixed point: its Q6_K down would take the AVX2 int8 code) stays exact."""
    case = Case(["q4_k", "q4_k", "q6_k"], "columns", [256] * 3, 12, seed=21, coef=None)
    groups = [[0, 1, 2]]
    runs = {}
    for mode in ("auto", "int8", "exact"):
        with K.prefill_mode(mode):
            runs[mode] = (run_split(case, groups, "auto"), case.run_slots("auto"))
    default = "int8" if K.amx_available() and K.best_impl() == "avx512" else "exact"
    other = "exact" if default == "int8" else "int8"
    assert np.array_equal(runs["auto"][0], runs[default][0]) and not np.array_equal(runs["auto"][0], runs[other][0])
    assert np.array_equal(runs["auto"][1], runs["exact"][1]) and not np.array_equal(runs["auto"][1], runs["int8"][1])


@pytest.mark.parametrize("impl", IMPLS)
def test_fixed_matches_float_within_the_grid(impl):
    """The same call with a float32 y and with the accumulator: apart by the grid and the float sums."""
    case = Case(["q4_1"] * 3, "columns", [64] * 8, 1, seed=11, coef=None)
    with K.decode_mode("exact"):
        y_float = case.run_slots(impl)
        acc = run_split(case, [list(range(8))], impl)
    y = case.y0.copy()
    K.fixed_flush(acc.ravel(), y.ravel())
    assert np.abs(y - y_float).max() <= 1e-5 * (1 + np.abs(y_float).max())


def test_rows_layout_is_refused():
    case = Case(["q4_0"] * 3, "rows", [32, 32], 1, seed=12, coef=None)
    with pytest.raises(ValueError, match="columns down layout"):
        run_split(case, [[0, 1]], "auto")


def test_bad_accumulators_raise():
    with pytest.raises(ValueError):
        K.fixed_add(np.zeros(4, np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        K.fixed_add(np.zeros(4, np.float64), np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        K.fixed_flush(np.zeros(4, np.int64), np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        K.fixed_flush(np.zeros(4, np.int32), np.zeros(4, np.float32))


@pytest.mark.skipif("avx512" not in IMPLS or not K.amx_available(), reason="AMX tiles: their two layouts of h")
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_amx_down_is_the_same_bits_whatever_the_workspace(fmt):
    """Exact mode's int8 prefill on AMX: each expert's down product from its blocks of the quantized h,
    kept in 16-token tiles where they fit the workspace and in token rows where not (6 experts of
    2,048 neurons, 20 tokens, one thread, at exactly fic_workspace_bytes: chunks of 7 tokens). The
    accumulators are equal bit for bit, and within the numpy bound of the FFN."""
    from flashinfer_cli._fic import ffi, lib

    t, ns = 20, [2048] * 6
    case = Case([fmt] * 3, "columns", ns, t, seed=stable_seed(fmt, "amx-ws"), coef=None)
    arena, slot_bytes, slots = case.arena()
    need = lib.fic_workspace_bytes(1, t, case.d, len(ns), sum(ns))
    fid = K._fmt_id(fmt)
    lay = ffi.new("fic_expert_layout *", {"d_model": case.d, "gate_fmt": fid, "up_fmt": fid, "down_fmt": fid,
                                          "down_rows": 0})
    scratch = np.zeros(t * sum(ns), np.float32)

    def run(n_bytes):
        ws, acc = K.aligned_buffer(n_bytes), np.zeros(case.y0.shape, np.int64)
        st = lib.fic_experts_ffn_slots(ffi.NULL, K.IMPLS["avx512"] | lib.FIC_FFN_FIXED, lay,
                                       ffi.from_buffer("uint8_t[]", arena), slot_bytes,
                                       ffi.from_buffer("int32_t[]", slots), ffi.from_buffer("int32_t[]", np.array(ns, np.int32)),
                                       len(ns), ffi.NULL, ffi.from_buffer("float[]", case.x),
                                       ffi.from_buffer("float[]", acc), t, ffi.from_buffer("float[]", scratch), scratch.size,
                                       ffi.from_buffer("uint8_t[]", ws), n_bytes)
        assert st == lib.FIC_OK
        return acc

    rows, tiles = run(need), run(need + (8 << 20))
    assert np.array_equal(rows, tiles)
    with K.prefill_mode("int8"):
        want, bound = case.want_and_bound("avx512")
    y = case.y0.copy()
    K.fixed_flush(tiles.ravel(), y.ravel())
    assert_within(y, want, bound + len(ns) * 2.0 ** -33 + np.abs(want) * 2.0 ** -23)
