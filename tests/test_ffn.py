"""fic_experts_ffn (kernels.ExpertSet) against numpy, fast paths against the reference.

The reference is numpy float64 on the dequantized weights (kernels.dequantize of kernels.quantize;
Q4_K/Q6_K, which fic does not quantize to, from llama.cpp's quantizer: tests/_kquant.py)
and the float32 x: g = Wg x, u = Wu x, h = c silu(g) u, y = y0 + sum_e Wd_e h_e.

Tolerances, per output, derived from the float32 bound of tests/test_kernels.py
(a length-K dot product summed in float32 in any order is within FLOAT_SLACK K eps sum |w x|):
- gate and up: Bg, Bu = that bound with K = d_model, plus sum |w| * half a q8 step of x where
  the kernel quantizes x to int8 (t = 1 only: the paths matvec uses, see test_kernels).
- h = c silu(g) u: |silu'| <= 1.1, so |dh| <= |c| (1.1 Bg (|u| + Bu) + |silu(g)| Bu) + 8 eps |h|
  (expf, the division and two products each round once, expf within 1 ulp).
- y: sum_n |Wd| |dh| (propagated) + the float32 bound of summing all n_total products and the
  experts' partial sums onto y0: FLOAT_SLACK (n_total + E + 1) eps (|y0| + sum |Wd h|); plus,
  where phase 2 quantizes h_e to int8 (columns layout, t = 1: Q1_0 on AVX2/AVX-512, Q4_0/Q4_1
  on AVX-512 VNNI for experts of 64+ neurons; t > 1: every quantized format, csrc/qdot.h), sum |Wd| *
  half a q8 step of h_e, the step taken from |h| + Bh (the computed h's block maximum is within Bh
  of the exact one). Gate and up take the q8 term of x likewise for t > 1 in quantized formats.
- fast vs reference: each is within its own bound of the float64 value, so they are within the
  sum of the two bounds of each other.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import kernels as K
from flashinfer_cli._fic import ffi, lib

from _kquant import quantize_any
from test_kernels import (EPS32, FLOAT_SLACK, KERNEL_SOURCES, QDOT_FORMATS, QDOT_SOURCES, assert_within,
                          int8_activation_path, int8_by_default)


@pytest.fixture(scope="module", autouse=True)
def int8_prefill_in_this_file():
    """This file bounds the int8-activation kernels (FIC_PREFILL=int8 and FIC_DECODE=int8; the
    product's defaults: exact prefill, int8 decode): every product here takes that path unless a test asks for exact."""
    with K.prefill_mode("int8"), K.decode_mode("int8"):
        yield


FORMATS = list(K.FORMATS)
IMPLS = K.available_impls()
FAST_IMPLS = [i for i in IMPLS if i != "ref"]
REPO = Path(__file__).resolve().parents[1]
D_MODEL = 256  # a multiple of every block (Q1_0: 128)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    K.set_threads(request.param)
    yield request.param
    K.set_threads(K.default_threads())


def silu(g):
    return g / (1.0 + np.exp(-g))


def q8_half_step_blocks(v: np.ndarray) -> np.ndarray:
    """Half the q8 step of each element's block of 32 along the last axis (a partial last block
    counts as its own block; a Q4 pair layout never has one)."""
    n = v.shape[-1]
    out = np.empty_like(v)
    for b in range(0, n, 32):
        out[..., b:b + 32] = np.abs(v[..., b:b + 32]).max(axis=-1, keepdims=True) / 254.0
    return out


def stable_seed(*parts) -> int:
    """A seed from strings that is the same in every process (str hashes are salted per process),
    so a failure reproduces."""
    return zlib.crc32(repr(parts).encode()) % 1000


class Case:
    """Random experts in bundle form with their float64 dequantized parts."""

    def __init__(self, fmts, layout, ns, t, seed, d=D_MODEL, coef="zeros"):
        rng = np.random.default_rng(seed)
        self.fmts, self.layout, self.ns, self.t, self.d = fmts, layout, list(ns), t, d
        self.bundles, self.parts = [], []
        for n in ns:
            g = quantize_any(rng.standard_normal((n, d), dtype=np.float32) * 0.2, fmts[0], rng)
            u = quantize_any(rng.standard_normal((n, d), dtype=np.float32) * 0.2, fmts[1], rng)
            dshape = (d, n) if layout == "columns" else (n, d)
            dn = quantize_any(rng.standard_normal(dshape, dtype=np.float32) * 0.2, fmts[2], rng)
            self.bundles.append(np.concatenate([g.data, u.data, dn.data]))
            wd = K.dequantize(dn).astype(np.float64)
            self.parts.append((K.dequantize(g).astype(np.float64), K.dequantize(u).astype(np.float64),
                               wd if layout == "columns" else wd.T))  # down as (d, n)
        self.x = rng.standard_normal((t, d), dtype=np.float32)
        self.y0 = rng.standard_normal((t, d), dtype=np.float32)
        if coef is None:
            self.coef = None
        else:
            c = rng.uniform(0.1, 1.0, (t, len(ns))).astype(np.float32)
            e = len(ns)
            if e > 1:
                c[:, 1] = 0.0           # an expert no token uses: skipped
            if t > 1:                   # zeros of single tokens, the expert still used by others:
                c[t - 1, 0] = 0.0       # the last token skips expert 0,
                c[0, 2 % e] = 0.0       # the first token expert 2 (0 when there are fewer),
                c[t // 2, e - 1] = 0.0  # a middle token (t >= 3) the last expert
            self.coef = c

    def expert_set(self):
        return K.ExpertSet(self.fmts, self.d, self.layout, self.bundles, self.ns)

    def run(self, impl, scratch=None):
        y = self.y0.copy()
        self.expert_set().ffn(self.x, y, self.coef, impl=impl, scratch=scratch)
        return y

    def layout_obj(self):
        class Layout:
            d_model, gate_fmt, up_fmt, down_fmt, down_layout = self.d, *self.fmts, self.layout
        return Layout

    def arena(self, pad=0):
        """The bundles in slots of one arena, in shuffled order with empty slots between them
        (filled with 0xFF bytes, NaN as f32/f16): (arena, slot_bytes, slots)."""
        slot_bytes = -(-max(b.nbytes for b in self.bundles) // 64) * 64 + pad
        n_slots = 2 * len(self.bundles) + 1
        slots = np.random.default_rng(len(self.bundles)).permutation(n_slots)[:len(self.bundles)].astype(np.int32)
        arena = K.aligned_buffer(n_slots * slot_bytes)
        arena[:] = 0xFF
        for b, s in zip(self.bundles, slots):
            arena[s * slot_bytes:s * slot_bytes + b.nbytes] = b
        return arena, slot_bytes, slots

    def run_slots(self, impl, scratch=None, layout=None):
        arena, slot_bytes, slots = self.arena()
        y = self.y0.copy()
        K.experts_ffn_slots(layout or self.layout_obj(), arena, slot_bytes, slots, np.array(self.ns, np.int32), self.x,
                            y, coef=self.coef, scratch=scratch, impl=impl)
        return y

    def want_and_bound(self, impl):
        want, bound, _, _ = self.reference(impl)
        return want, bound

    def reference(self, impl):
        """(y, its bound, h flattened as scratch holds it, its bound), all float64."""
        return ffn_reference(self.fmts, self.layout, self.ns, self.parts, self.x, self.y0, self.coef, impl)


def ffn_want_and_bound(fmts, layout, ns, parts, x, y0, coef, impl):
    """The float64 FFN of x (t x d) onto y0 with the dequantized parts [(gate (n, d), up (n, d),
    down (d, n)) per expert] and coef (t x experts, or None), and the bound per output derived in
    the module docstring for the kernel impl."""
    want, bound, _, _ = ffn_reference(fmts, layout, ns, parts, x, y0, coef, impl)
    return want, bound


def int8_prefill(fmt: str) -> bool:
    """t > 1 products in fmt quantize their activations to int8 (csrc/qdot.h) unless the process
    asked for exact prefill (kernels.set_prefill)."""
    return fmt in QDOT_FORMATS and K.get_prefill() == "int8"


def ffn_reference(fmts, layout, ns, parts, x, y0, coef, impl):
    """ffn_want_and_bound, and h (t x n_e per expert, token-major, flattened as the kernel's
    scratch holds it) with its bound."""
    x = np.atleast_2d(x).astype(np.float64)
    t = x.shape[0]
    ax = np.abs(x)
    t1 = t == 1
    want = np.atleast_2d(y0).astype(np.float64).copy()
    mag = np.abs(want)              # |y0| + sum |Wd h|
    prop = np.zeros_like(want)      # propagated h error and int8 terms on h
    n_total = sum(ns)
    d = x.shape[1]
    hs, hbs = [], []
    for e, (wg, wu, wd) in enumerate(parts):
        c = np.ones(t) if coef is None else np.atleast_2d(coef)[:, e].astype(np.float64)
        g, u = x @ wg.T, x @ wu.T
        bg = FLOAT_SLACK * d * EPS32 * (ax @ np.abs(wg).T)
        bu = FLOAT_SLACK * d * EPS32 * (ax @ np.abs(wu).T)
        if (t1 and int8_activation_path(fmts[0], impl)) or (not t1 and int8_prefill(fmts[0])):
            bg += q8_half_step_blocks(ax) @ np.abs(wg).T
        if (t1 and int8_activation_path(fmts[1], impl)) or (not t1 and int8_prefill(fmts[1])):
            bu += q8_half_step_blocks(ax) @ np.abs(wu).T
        s = silu(g)
        h = c[:, None] * s * u
        bh = np.abs(c)[:, None] * (1.1 * bg * (np.abs(u) + bu) + np.abs(s) * bu) + 8 * EPS32 * np.abs(h)
        hs.append(h.ravel())
        hbs.append(bh.ravel())
        want += h @ wd.T
        mag += np.abs(h) @ np.abs(wd).T
        prop += bh @ np.abs(wd).T
        n = ns[e]
        if layout == "columns" and ((t1 and int8_activation_path(fmts[2], impl) and (fmts[2] == "q1_0" or n >= 64))
                                    or (not t1 and int8_prefill(fmts[2]))):
            prop += q8_half_step_blocks(np.abs(h) + bh) @ np.abs(wd).T
    bound = prop + FLOAT_SLACK * (n_total + len(ns) + 1) * EPS32 * mag + 1e-30
    return want, bound, np.concatenate(hs), np.concatenate(hbs) + 1e-30


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", ["q4_0", "q1_0", "q4_k", "q6_k"])
def test_ffn_exact_prefill_mode(fmt, layout):
    """kernels.set_prefill("exact"): t > 1 in float, within the float bounds alone (no q8 terms)."""
    case = Case([fmt] * 3, layout, sizes(fmt, layout, 3, seed=2), 5, seed=stable_seed(fmt, layout), coef=None)
    with K.prefill_mode("exact"):
        want, bound = case.want_and_bound("auto")
        assert_within(case.run("auto"), want, bound)


@pytest.mark.parametrize("fmt", ["q1_0", "q4_1", "q6_k"])
def test_ffn_auto_prefill_is_int8_where_it_is_the_default(fmt):
    """The default prefill ("auto"): an FFN in a format int8_by_default names (Q1_0; the AMX tiles'
    formats where the CPU has them) runs int8 (same bits as FIC_PREFILL=int8), any other exact;
    through ExpertSet and through the arena's slots alike."""
    case = Case([fmt] * 3, "columns", sizes(fmt, "columns", 3, seed=4), 6, seed=stable_seed(fmt, "auto"), coef=None)
    with K.prefill_mode("auto"):
        auto, auto_slots = case.run("auto"), case.run_slots("auto")
    default = "int8" if int8_by_default(fmt, "auto") else "exact"
    with K.prefill_mode(default):
        same = case.run("auto")
    with K.prefill_mode("exact" if default == "int8" else "int8"):
        other = case.run("auto")
    assert np.array_equal(auto, same) and np.array_equal(auto_slots, same)
    assert not np.array_equal(auto, other)


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "q5_0", "q4_k", "q6_k"])
def test_ffn_exact_decode_mode(fmt, layout):
    """kernels.set_decode("exact"): one token in float, within the float
    bounds alone (no q8 terms: int8_activation_path follows the mode); int8 moves it further."""
    case = Case([fmt] * 3, layout, sizes(fmt, layout, 3, seed=3), 1, seed=stable_seed(fmt, layout), coef=None)
    with K.decode_mode("exact"):
        want, bound = case.want_and_bound("auto")
        exact = case.run("auto")
        assert_within(exact, want, bound)
    int8 = case.run("auto")
    assert np.abs(int8 - want).max() > np.abs(exact - want).max()


def sizes(fmt_down, layout, count, seed=0):
    """Unequal expert sizes: multiples of the down block in columns layout (32..256), anything
    in rows layout."""
    rng = np.random.default_rng(seed)
    if layout == "rows":
        return [int(v) for v in rng.integers(5, 200, count)]
    blk = max(K.block_weights(fmt_down), 32)
    return [int(v) * blk for v in rng.integers(1, 256 // blk + 1, count)]


# ---- against numpy --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("down", FORMATS)
@pytest.mark.parametrize("gate_up", FORMATS)
def test_ffn_matches_numpy(gate_up, down, layout, t, impl):
    """y against numpy, and the scratch contract of fic.h: on return it holds h, expert e's
    t x n_e block at t * (n_0 + ... + n_{e-1}), h = coef silu(gate x) (up x), exactly 0 where
    coef is 0 (expert 1 for every token; expert 0 for the last token when t > 1). The same for
    experts_ffn_slots over an arena, which must agree with ExpertSet bit for bit."""
    case = Case((gate_up, gate_up, down), layout, sizes(down, layout, 4, seed=t), t, seed=stable_seed(gate_up, down))
    want, bound, h_want, h_bound = case.reference(impl)
    n_total = sum(case.ns)
    scratch = np.full(t * n_total + 5, np.nan, np.float32)  # longer than needed: the tail stays untouched
    y = case.run(impl, scratch=scratch)
    assert_within(y, want, bound)
    assert_within(scratch[:t * n_total], h_want, h_bound)
    assert np.isnan(scratch[t * n_total:]).all()
    zero = h_want == 0.0
    assert zero.sum() >= t * case.ns[1] and (scratch[:t * n_total][zero] == 0.0).all()
    scratch2 = np.full_like(scratch, np.nan)
    y2 = case.run_slots(impl, scratch=scratch2)
    assert np.array_equal(y2, y)
    assert np.array_equal(scratch2, scratch, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [512, 896])
@pytest.mark.parametrize("ns", [[512, 640, 896], [512, 640, 128, 896]], ids=["planes", "mixed"])
def test_ffn_q1_bit_planes(d, ns, impl, threads):
    """Q1_0 at t = 1 with x and h_e of 4 or 7 blocks: on AVX-512 CPUs with VNNI/BITALG/VBMI these
    take the bit-plane kernel (4 blocks per step, 7 ends in a partial step), 5 blocks (640, expert
    1, skipped) and 1 block (128) the psadbw one; "mixed" has both layouts among phase 2's h_e."""
    case = Case(("q1_0", "q1_0", "q1_0"), "columns", ns, 1, seed=d + len(ns), d=d)
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_ffn_long_rows_read_alone(fmt, impl, threads):
    """t = 1 with d_model 1152 (9 quads of Q4 blocks): on VNNI, Q4's phase 1 reads such rows one at a
    time, its kernel prefetching its own stream; Q8_0 reads them in pairs, an odd last row alone."""
    case = Case((fmt, fmt, fmt), "columns", [96, 160, 64], 1, seed=1152, d=1152, coef=None)
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmts", [("q4_0", "q8_0", "f16"), ("f16", "q1_0", "q4_1"), ("q1_0", "q4_1", "q1_0"),
                                  ("f32", "q4_0", "q8_0"), ("q4_k", "q4_k", "q6_k"), ("q5_0", "q6_k", "q4_k")])
@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_ffn_mixed_gate_up_formats(fmts, layout, impl):
    case = Case(fmts, layout, sizes(fmts[2], layout, 3), 1, seed=5)
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)
    case = Case(fmts, layout, sizes(fmts[2], layout, 3), 5, seed=6)
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coef", [None, "zeros"])
@pytest.mark.parametrize("t", [1, 3, 33])
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", ["q4_1", "q1_0"])
def test_ffn_threads_and_coef(fmt, layout, t, coef, impl, threads):
    case = Case((fmt, fmt, fmt), layout, sizes(fmt, layout, 6, seed=t), t, seed=t, coef=coef)
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)


@pytest.mark.parametrize("n_threads", [3, 5])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q1_0", "q8_0"])
def test_ffn_columns_uneven_row_ranges(fmt, n_threads):
    """Thread row ranges that are not multiples of phase 2's row block (8 rows at t = 1)."""
    K.set_threads(n_threads)
    try:
        for seed in (1, 2):
            case = Case((fmt, fmt, fmt), "columns", sizes(fmt, "columns", 5, seed=seed), 1, seed=seed)
            for impl in IMPLS:
                want, bound = case.want_and_bound(impl)
                assert_within(case.run(impl), want, bound)
    finally:
        K.set_threads(K.default_threads())


@pytest.mark.parametrize("n_experts", [1, 2, 5, 17, 30])
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", ["q4_1", "q1_0", "q8_0"])
def test_ffn_expert_counts(fmt, layout, n_experts, threads):
    for t in (1, 4):
        case = Case((fmt, fmt, fmt), layout, sizes(fmt, layout, n_experts, seed=n_experts), t, seed=n_experts)
        want, bound = case.want_and_bound("auto")
        assert_within(case.run("auto"), want, bound)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_matches_reference(fmt, layout, t, impl):
    case = Case((fmt, fmt, fmt), layout, sizes(fmt, layout, 5, seed=3), t, seed=11)
    _, b_fast = case.want_and_bound(impl)
    _, b_ref = case.want_and_bound("ref")
    assert_within(case.run(impl), case.run("ref").astype(np.float64), b_fast + b_ref)


# ---- behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("t", [1, 4])
def test_zero_coef_expert_is_not_read(layout, t, impl):
    """An expert with coef 0 for every token is skipped: NaN weights there change nothing."""
    case = Case(("f32", "f32", "f32"), layout, [64, 32, 96], t, seed=2)
    want = case.run(impl)
    case.bundles[1] = np.frombuffer(np.full(case.bundles[1].nbytes // 4, np.nan, np.float32).tobytes(),
                                    dtype=np.uint8).copy()
    got = case.run(impl)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmt", ["f32", "q4_1"])
@pytest.mark.parametrize("zero_token", [0, 2, 4], ids=["first", "middle", "last"])
def test_zero_coef_of_one_token(zero_token, fmt, layout, impl):
    """One token's coef is 0 for an expert the other tokens use (MoE routing does this all the
    time): that token gets nothing from the expert, the others all of it. Tokens 0, 2 and 4 of 5."""
    case = Case((fmt, fmt, fmt), layout, sizes(fmt, layout, 3, seed=zero_token), 5, seed=40 + zero_token, coef=None)
    c = np.random.default_rng(zero_token).uniform(0.5, 1.0, (5, 3)).astype(np.float32)
    c[zero_token, 1] = 0.0
    case.coef = c
    want, bound = case.want_and_bound(impl)
    assert_within(case.run(impl), want, bound)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_single_token_shapes_agree(layout, impl):
    case = Case(("q4_1", "q4_1", "q4_1"), layout, sizes("q4_1", layout, 3), 1, seed=4)
    es = case.expert_set()
    y2 = case.y0.copy()
    es.ffn(case.x, y2, case.coef, impl=impl)
    y1 = case.y0[0].copy()
    es.ffn(case.x[0], y1, case.coef[0], impl=impl)
    assert np.array_equal(y1, y2[0])


def test_scratch_grows_and_results_repeat():
    case = Case(("q8_0", "q8_0", "q8_0"), "columns", [64, 128], 1, seed=1, coef=None)
    es = case.expert_set()
    y = np.zeros(D_MODEL, np.float32)
    es.ffn(case.x[0], y)
    big = np.random.default_rng(0).standard_normal((40, D_MODEL), dtype=np.float32)
    yb = np.zeros_like(big)
    es.ffn(big, yb)
    assert es._scratch.size >= 40 * 192
    y_again = np.zeros(D_MODEL, np.float32)
    es.ffn(case.x[0], y_again)
    assert np.array_equal(y, y_again)


def test_from_layout_and_no_experts():
    class Layout:
        d_model, gate_fmt, up_fmt, down_fmt, down_layout = D_MODEL, "q4_0", "q4_0", "q4_0", "rows"
    case = Case(("q4_0", "q4_0", "q4_0"), "rows", [40], 2, seed=9)
    es = K.ExpertSet.from_layout(Layout, case.bundles, case.ns)
    y = case.y0.copy()
    es.ffn(case.x, y, case.coef)
    want, bound = case.want_and_bound("auto")
    assert_within(y, want, bound)
    empty = K.ExpertSet(("q4_0", "q4_0", "q4_0"), D_MODEL, "rows", [], [])
    y = case.y0.copy()
    empty.ffn(case.x, y)
    assert np.array_equal(y, case.y0)


# ---- arena slots (experts_ffn_slots) ----------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coef", [None, "zeros"])
@pytest.mark.parametrize("t", [1, 3, 33])
@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("fmts", [("q4_1",) * 3, ("q1_0",) * 3, ("q4_0", "q8_0", "f16")])
def test_slots_match_numpy_and_expert_set(fmts, layout, t, coef, impl, threads):
    case = Case(fmts, layout, sizes(fmts[2], layout, 6, seed=t), t, seed=t + 40, coef=coef)
    want, bound = case.want_and_bound(impl)
    y = case.run_slots(impl)
    assert_within(y, want, bound)
    assert np.array_equal(y, case.run(impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1, 4])
def test_slots_zero_coef_expert_is_not_read(t, impl):
    case = Case(("f32", "f32", "f32"), "rows", [64, 32, 96], t, seed=2)
    arena, slot_bytes, slots = case.arena()
    ns = np.array(case.ns, np.int32)
    want = case.y0.copy()
    K.experts_ffn_slots(case.layout_obj(), arena, slot_bytes, slots, ns, case.x, want, coef=case.coef, impl=impl)
    s1 = int(slots[1]) * slot_bytes
    arena[s1:s1 + case.bundles[1].nbytes] = np.frombuffer(np.full(case.bundles[1].nbytes // 4, np.nan, np.float32)
                                                          .tobytes(), dtype=np.uint8)
    got = case.y0.copy()
    K.experts_ffn_slots(case.layout_obj(), arena, slot_bytes, slots, ns, case.x, got, coef=case.coef, impl=impl)
    assert np.array_equal(got, want)


def test_slots_layout_forms_and_one_token():
    case = Case(("q8_0", "q4_1", "q4_0"), "columns", [64, 128, 32], 1, seed=12)
    want, bound = case.want_and_bound("auto")
    lay = case.layout_obj()
    as_tuple = (case.d, *case.fmts, case.layout)
    y_obj, y_tuple = case.run_slots("auto", layout=lay), case.run_slots("auto", layout=as_tuple)
    assert_within(y_obj, want, bound)
    assert np.array_equal(y_obj, y_tuple)
    arena, slot_bytes, slots = case.arena()
    y1 = case.y0[0].copy()  # (d_model,) x, y and (n_experts,) coef
    K.experts_ffn_slots(as_tuple, arena, slot_bytes, slots, np.array(case.ns, np.int32), case.x[0], y1,
                        coef=case.coef[0])
    assert np.array_equal(y1, y_obj[0])
    y0 = case.y0.copy()  # no experts: y unchanged
    K.experts_ffn_slots(as_tuple, arena, slot_bytes, np.zeros(0, np.int32), np.zeros(0, np.int32), case.x, y0)
    assert np.array_equal(y0, case.y0)


def test_slots_bounds_and_bad_arguments():
    """The binding checks every bundle lies inside the arena (the C core trusts the caller)."""
    case = Case(("q4_0", "q4_0", "q4_0"), "rows", [40, 24], 2, seed=3)
    lay = case.layout_obj()
    ns = np.array(case.ns, np.int32)
    need = [b.nbytes for b in case.bundles]  # rows layout: exactly the bundle bytes
    slot_bytes = max(need)
    arena = np.zeros(slot_bytes + need[0], np.uint8)  # slot 1 holds expert 0 with no byte to spare
    arena[slot_bytes:] = case.bundles[0]
    arena[:need[1]] = case.bundles[1]
    slots = np.array([1, 0], np.int32)
    want, bound = case.want_and_bound("auto")
    y = case.y0.copy()
    K.experts_ffn_slots(lay, arena, slot_bytes, slots, ns, case.x, y, coef=case.coef)
    assert_within(y, want, bound)

    def call(**kw):
        args = {"layout": lay, "arena": arena, "slot_bytes": slot_bytes, "slots": slots, "n_neurons": ns,
                "x": case.x, "y": case.y0.copy(), "coef": case.coef}
        args.update(kw)
        return K.experts_ffn_slots(args.pop("layout"), args.pop("arena"), args.pop("slot_bytes"),
                                   args.pop("slots"), args.pop("n_neurons"), args.pop("x"), args.pop("y"), **args)

    for bad in [dict(arena=arena[:-1]),                       # expert 0 one byte short
                dict(slots=np.array([2, 0], np.int32)),       # beyond the arena
                dict(slots=np.array([1, -1], np.int32)),
                dict(slots=np.array([1, 0], np.int64)),       # wrong dtype
                dict(slots=np.array([1], np.int32)),          # lengths differ
                dict(n_neurons=np.array([40, 24], np.int64)),
                dict(n_neurons=np.array([40, 0], np.int32)),  # the C core rejects 0 neurons
                dict(slot_bytes=0),
                dict(arena=arena.view(np.int8)),
                dict(x=case.x.astype(np.float64)),
                dict(coef=np.ones((2, 3), np.float32)),
                dict(scratch=np.zeros(2 * 64 - 1, np.float32)),
                dict(layout=(D_MODEL, "q4_0", "q4_0", "q4_0", "diagonal")),
                dict(layout=(D_MODEL, "q4_0", "q9_9", "q4_0", "rows")),
                dict(impl="sse9")]:
        with pytest.raises(ValueError):
            call(**bad)
    call(scratch=np.zeros(2 * 64, np.float32))  # exactly t * n_total floats is enough


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("fmt,layout", [(f, lay) for f in ("q4_1", "q1_0", "f32") for lay in ("columns", "rows")]
                         + [("q1_0r32", "columns")])
def test_c_ffn_runs_in_exactly_fic_workspace_bytes(fmt, layout, t, threads):
    """fic_experts_ffn_slots with a workspace of exactly fic_workspace_bytes(P, t, d, E, N) for
    its own sizes works and writes nothing past it; 64 bytes are too few (FIC_ERR_WORKSPACE, y
    untouched). q1_0r32: Q1_0 bundles repacked in their slots (the r32 layout's tables)."""
    stored = K.LAYOUT_OF.get(fmt, fmt)
    case = Case((stored,) * 3, layout, sizes(stored, layout, 5, seed=t), t, seed=21)
    arena, slot_bytes, slots = case.arena()
    if fmt != stored:
        for s, n in zip(slots, case.ns):
            K.q1r32_bundle(arena[s * slot_bytes:(s + 1) * slot_bytes], n, D_MODEL)
    n_total = sum(case.ns)
    need = lib.fic_workspace_bytes(threads, t, D_MODEL, len(case.ns), n_total)
    ws = K.aligned_buffer(need + 4096)
    ws[need:] = 0x5A
    fid = K._fmt_id(fmt)
    lay = ffi.new("fic_expert_layout *", {"d_model": D_MODEL, "gate_fmt": fid, "up_fmt": fid, "down_fmt": fid,
                                          "down_rows": int(layout == "rows")})
    scratch = np.zeros(t * n_total, np.float32)
    coef = case.coef

    def call(n_bytes):
        y = case.y0.copy()
        st = lib.fic_experts_ffn_slots(K._POOL.get(), K._math_impl("auto", t), lay, ffi.from_buffer("uint8_t[]", arena),
                                       slot_bytes, ffi.from_buffer("int32_t[]", slots),
                                       ffi.from_buffer("int32_t[]", np.array(case.ns, np.int32)), len(case.ns),
                                       ffi.from_buffer("float[]", coef), ffi.from_buffer("float[]", case.x),
                                       ffi.from_buffer("float[]", y), t, ffi.from_buffer("float[]", scratch),
                                       scratch.size, ffi.from_buffer("uint8_t[]", ws), n_bytes)
        return st, y

    st, y = call(64)
    assert st == lib.FIC_ERR_WORKSPACE and np.array_equal(y, case.y0)
    st, y = call(need)
    assert st == lib.FIC_OK
    assert (ws[need:] == 0x5A).all()
    want, bound = case.want_and_bound("auto" if fmt == stored else "avx2")  # r32: int8 in every impl
    assert_within(y, want, bound)


def test_no_workspace_growth_after_reserve():
    """Once reserved for a plan's maxima, FFN calls within them never grow the workspace."""
    cases = [Case(("q4_1",) * 3, "columns", [64, 128, 256], 1, seed=1),
             Case(("q1_0",) * 3, "columns", [128, 256], 9, seed=2),
             Case(("q8_0",) * 3, "rows", [40, 80, 120, 30], 16, seed=3)]
    K.reserve_workspace(max_t=16, max_k=D_MODEL, max_experts=4, max_neurons=448)
    grows, n_bytes = K.workspace_grows(), K.workspace_bytes()
    for case in cases:
        want, bound = case.want_and_bound("auto")
        assert_within(case.run("auto"), want, bound)
        assert_within(case.run_slots("auto"), want, bound)
    assert K.workspace_grows() == grows and K.workspace_bytes() == n_bytes
    n_exp = 4  # a call needing more than the workspace holds, whatever earlier tests reserved
    while K.workspace_bytes_for(n_threads=K.get_threads(), max_t=20, max_k=D_MODEL, max_experts=n_exp,
                                max_neurons=128 * n_exp) <= n_bytes:
        n_exp *= 2
    big = Case(("q4_0",) * 3, "columns", [128] * n_exp, 20, seed=4)
    want, bound = big.want_and_bound("auto")
    assert_within(big.run_slots("auto"), want, bound)
    assert K.workspace_grows() == grows + 1 and K.workspace_bytes() > n_bytes


# ---- bad arguments --------------------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    case = Case(("q4_1", "q4_1", "q4_1"), "columns", [64, 32], 2, seed=0)
    es = case.expert_set()
    x, y = case.x, case.y0.copy()
    with pytest.raises(ValueError):
        es.ffn(x.astype(np.float64), y)
    with pytest.raises(ValueError):
        es.ffn(x, y[:1])
    with pytest.raises(ValueError):
        es.ffn(x[:, :128], y[:, :128])
    with pytest.raises(ValueError):
        es.ffn(x, np.asfortranarray(y))
    with pytest.raises(ValueError):
        es.ffn(x, y, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError):
        es.ffn(x, y, np.ones((2, 2), np.float64))
    with pytest.raises(ValueError):
        es.ffn(x, y, impl="sse9")
    with pytest.raises(ValueError):  # bundle too short
        K.ExpertSet(("q4_1",) * 3, D_MODEL, "columns", [case.bundles[0][:-1]], [64])
    with pytest.raises(ValueError):  # columns: n must be a multiple of the down block
        K.ExpertSet(("q4_1",) * 3, D_MODEL, "columns", [case.bundles[0]], [40])
    with pytest.raises(ValueError):  # d_model not a multiple of the Q1_0 block
        K.ExpertSet(("q1_0", "q4_1", "q4_1"), 96, "rows", [case.bundles[0]], [8])
    with pytest.raises(ValueError):
        K.ExpertSet(("q4_1",) * 3, D_MODEL, "diagonal", case.bundles, case.ns)
    with pytest.raises(ValueError):
        K.ExpertSet(("q4_1",) * 3, D_MODEL, "columns", case.bundles, [64])
    with pytest.raises(ValueError):
        K.ExpertSet(("q4_1",) * 3, D_MODEL, "columns", [case.bundles[0].astype(np.int8)], [64])


def test_c_core_rejects_bad_arguments():
    case = Case(("q8_0", "q8_0", "q8_0"), "columns", [32, 64], 1, seed=0)
    keep = [ffi.from_buffer("uint8_t[]", b) for b in case.bundles]
    bundles = ffi.new("const uint8_t *[]", keep)
    n = ffi.new("int32_t[]", [32, 64])
    x = ffi.from_buffer("float[]", case.x)
    y = ffi.from_buffer("float[]", case.y0.copy())
    scratch = ffi.new("float[]", 96)
    ws_arr = K.aligned_buffer(1 << 16)
    ws = ffi.from_buffer("uint8_t[]", ws_arr)
    ok = {"d_model": D_MODEL, "gate_fmt": lib.FIC_Q8_0, "up_fmt": lib.FIC_Q8_0, "down_fmt": lib.FIC_Q8_0,
          "down_rows": 0}

    def call(layout=ok, impl=lib.FIC_IMPL_REF, b=bundles, nn=n, ne=2, xx=x, yy=y, t=1, s=scratch, sf=96, w=ws,
             wb=ws_arr.nbytes):
        lay = ffi.new("fic_expert_layout *", layout) if layout is not None else ffi.NULL
        return lib.fic_experts_ffn(ffi.NULL, impl, lay, b, nn, ne, ffi.NULL, xx, yy, t, s, sf, w, wb)

    assert call() == lib.FIC_OK
    assert call(layout=None) == lib.FIC_ERR_ARG
    assert call(layout={**ok, "gate_fmt": 99}) == lib.FIC_ERR_ARG
    assert call(layout={**ok, "down_rows": 2}) == lib.FIC_ERR_ARG
    assert call(layout={**ok, "d_model": 100}) == lib.FIC_ERR_ARG
    assert call(layout={**ok, "down_fmt": lib.FIC_Q1_0}) == lib.FIC_ERR_ARG  # n = 32 not a Q1_0 block
    assert call(impl=99) == lib.FIC_ERR_ARG
    assert call(b=ffi.NULL) == lib.FIC_ERR_ARG
    assert call(nn=ffi.NULL) == lib.FIC_ERR_ARG
    assert call(nn=ffi.new("int32_t[]", [32, 0])) == lib.FIC_ERR_ARG
    assert call(b=ffi.new("const uint8_t *[]", [keep[0], ffi.NULL])) == lib.FIC_ERR_ARG
    assert call(ne=-1) == lib.FIC_ERR_ARG
    assert call(xx=ffi.NULL) == lib.FIC_ERR_ARG
    assert call(yy=ffi.NULL) == lib.FIC_ERR_ARG
    assert call(t=0) == lib.FIC_ERR_ARG
    assert call(s=ffi.NULL) == lib.FIC_ERR_ARG
    assert call(sf=95) == lib.FIC_ERR_ARG
    assert call(w=ws + 8) == lib.FIC_ERR_ARG        # workspace not 64-byte aligned
    assert call(w=ffi.NULL) == lib.FIC_ERR_ARG      # NULL with bytes
    assert call(w=ffi.NULL, wb=0) == lib.FIC_ERR_WORKSPACE
    assert call(wb=64) == lib.FIC_ERR_WORKSPACE
    assert call(wb=-64) == lib.FIC_ERR_ARG
    assert call(ne=0, b=ffi.NULL, nn=ffi.NULL, s=ffi.NULL, sf=0, w=ffi.NULL, wb=0) == lib.FIC_OK

    arena_arr = np.concatenate(case.bundles)
    arena = ffi.from_buffer("uint8_t[]", arena_arr)
    slots = ffi.new("int32_t[]", [0, 1])

    def call_slots(ar=arena, sb=case.bundles[0].nbytes, sl=slots, ne=2, w=ws, wb=ws_arr.nbytes, t=1):
        lay = ffi.new("fic_expert_layout *", ok)
        return lib.fic_experts_ffn_slots(ffi.NULL, lib.FIC_IMPL_REF, lay, ar, sb, sl, n, ne, ffi.NULL, x, y, t,
                                         scratch, 96, w, wb)

    assert call_slots() == lib.FIC_OK
    assert call_slots(ar=ffi.NULL) == lib.FIC_ERR_ARG
    assert call_slots(sl=ffi.NULL) == lib.FIC_ERR_ARG
    assert call_slots(sl=ffi.new("int32_t[]", [0, -1])) == lib.FIC_ERR_ARG
    assert call_slots(sb=0) == lib.FIC_ERR_ARG
    assert call_slots(w=ws + 32) == lib.FIC_ERR_ARG
    assert call_slots(wb=128) == lib.FIC_ERR_WORKSPACE
    assert call_slots(ne=0, ar=ffi.NULL, sl=ffi.NULL, w=ffi.NULL, wb=0) == lib.FIC_OK


@pytest.mark.parametrize("impl", [i for i in ("avx2", "avx512", "neon") if i not in IMPLS])
def test_unavailable_impl_raises(impl):
    case = Case(("q8_0", "q8_0", "q8_0"), "columns", [32], 1, seed=0)
    with pytest.raises(NotImplementedError):
        case.run(impl)


# ---- NEON under qemu ------------------------------------------------------------------------

# REF against NEON for a few format sets, both layouts, t = 1 and 3, with router weights (one
# zero). Tolerance per output: 4 (n_total + d_model) eps times a magnitude computed in double:
# sum |Wd| |h| + sum |Wd| (1.1 |u| sum |Wg x| + |silu(g)| sum |Wu x|), the float32 bounds of
# phase 1 propagated through h plus phase 2's own (NEON has no int8 activation path).
NEON_FFN_C = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fic.h"

static float rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f; }

#define D 256
#define E 3
#define T 3

int main(void) {
    static const int sets[][3] = {{FIC_Q4_1, FIC_Q4_1, FIC_Q4_1}, {FIC_Q1_0, FIC_Q1_0, FIC_Q1_0},
                                  {FIC_Q4_0, FIC_Q8_0, FIC_F16}, {FIC_F32, FIC_F16, FIC_Q4_0}};
    const int32_t ns[E] = {128, 256, 128};
    unsigned s = 7;
    int bad = 0;
    if (!fic_impl_available(FIC_IMPL_NEON) || fic_impl_best() != FIC_IMPL_NEON) { puts("neon unavailable"); return 1; }
    float *w = malloc(256 * D * 4), *wd[3], *x = malloc(T * D * 4), coef[T * E];
    for (int p = 0; p < 3; p++) wd[p] = malloc(256 * D * 4);
    for (int i = 0; i < T * D; i++) x[i] = rnd(&s);
    for (int i = 0; i < T * E; i++) coef[i] = 0.5f + 0.5f * rnd(&s);
    coef[1 * E + 2] = 0.0f;
    for (size_t si = 0; si < sizeof sets / sizeof sets[0]; si++)
    for (int rows = 0; rows < 2; rows++)
    for (int t = 1; t <= T; t += 2) {
        fic_expert_layout lay = {D, sets[si][0], sets[si][1], sets[si][2], rows};
        uint8_t *bundles[E];
        double mag[T * D];
        memset(mag, 0, sizeof mag);
        for (int e = 0; e < E; e++) {
            int64_t n = ns[e], rg = fic_row_bytes(lay.gate_fmt, D), ru = fic_row_bytes(lay.up_fmt, D);
            int64_t bd = rows ? n * fic_row_bytes(lay.down_fmt, D) : D * fic_row_bytes(lay.down_fmt, n);
            bundles[e] = malloc(n * (rg + ru) + bd);
            for (int p = 0; p < 3; p++) {
                int fmt = p == 0 ? lay.gate_fmt : p == 1 ? lay.up_fmt : lay.down_fmt;
                int64_t m = p < 2 || rows ? n : D, k = p < 2 || rows ? D : n;
                uint8_t *dst = bundles[e] + (p >= 1 ? n * rg : 0) + (p == 2 ? n * ru : 0);
                for (int64_t i = 0; i < m * k; i++) w[i] = 0.2f * rnd(&s);
                fic_quantize(fmt, w, dst, m, k);
                fic_dequantize(fmt, dst, wd[p], m, k);
            }
            for (int i = 0; i < t; i++)
                for (int64_t j = 0; j < n; j++) {
                    double g = 0, u = 0, gm = 0, um = 0;
                    for (int c = 0; c < D; c++) {
                        g += (double)wd[0][j * D + c] * x[i * D + c];
                        u += (double)wd[1][j * D + c] * x[i * D + c];
                        gm += fabs((double)wd[0][j * D + c] * x[i * D + c]);
                        um += fabs((double)wd[1][j * D + c] * x[i * D + c]);
                    }
                    double sg = g / (1 + exp(-g)), cf = fabs(coef[i * E + e]);
                    double hm = cf * (fabs(sg * u) + 1.1 * fabs(u) * gm + fabs(sg) * um);
                    for (int r = 0; r < D; r++) {
                        double wv = rows ? wd[2][j * D + r] : wd[2][r * n + j];
                        mag[i * D + r] += fabs(wv) * hm;
                    }
                }
        }
        float y1[T * D], y2[T * D], scratch[T * 512];
        int64_t nws = fic_workspace_bytes(1, T, D, E, 512);
        void *ws = aligned_alloc(64, (size_t)nws);
        for (int i = 0; i < T * D; i++) y1[i] = y2[i] = rnd(&s);
        for (int i = 0; i < t * D; i++) mag[i] += fabs(y1[i]);
        int a = fic_experts_ffn(NULL, FIC_IMPL_REF, &lay, (const uint8_t *const *)bundles, ns, E, coef, x, y1, t, scratch, T * 512, ws, nws);
        int b = fic_experts_ffn(NULL, FIC_IMPL_NEON, &lay, (const uint8_t *const *)bundles, ns, E, coef, x, y2, t, scratch, T * 512, ws, nws);
        if (a != FIC_OK || b != FIC_OK || ws == NULL) { printf("status %d %d\n", a, b); bad = 1; }
        for (int i = 0; i < t * D; i++)
            if (fabs((double)y1[i] - y2[i]) > 4.0 * (512 + D) * 5.97e-8 * mag[i] + 1e-30) {
                printf("set %zu rows %d t %d: out %d ref %g neon %g\n", si, rows, t, i, y1[i], y2[i]);
                bad = 1;
                break;
            }
        for (int e = 0; e < E; e++) free(bundles[e]);
        free(ws);
    }
    puts(bad ? "FAIL" : "OK");
    return bad;
}
"""


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_ffn_matches_reference_under_qemu(tmp_path):
    src = tmp_path / "neon_ffn.c"
    src.write_text(NEON_FFN_C)
    exe = tmp_path / "neon_ffn"
    csrc = REPO / "csrc"
    cmd = ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-march=armv8-a+crc", "-pthread", "-static",
           "-I", str(csrc), str(src), *(str(csrc / f) for f in ("quant.c", "matvec.c", "pool.c", "ffn.c", *KERNEL_SOURCES, *QDOT_SOURCES)),
           "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
