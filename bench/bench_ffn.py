"""One layer's expert FFN in one C call (kernels.ExpertSet.ffn) against the same work done as
three kernel calls per expert from Python, and against dense kernels on the whole FFN.

Usage: PYTHONPATH=. python bench/bench_ffn.py [--rounds N]

Shapes: SmolLM2-135M (d_model 576, ffn 1536) cut into 24 experts of 64 neurons, Q4_1 gate, up
and down (columns layout); and Q1_0 with 12 experts of 128 neurons, at d_model 640 (Q1_0 rows
need a multiple of 128 weights, 576 is not). Each figure cycles over 30 layer copies (one
model's worth: 50 MB of Q4_1, more than the 32 MiB L3, so weights come from DRAM as in decode)
and reports time per layer; the best of N rounds is kept, since the machine is shared.

- ffn:        ExpertSet.ffn, one call per layer
- per expert: kernels.matvec (t = 1) or kernels.matmul (t > 1) for gate, up and down of each
              expert, numpy silu * up between, y += down h
- dense:      the same three calls on the whole (1536 x d) gate / up and (d x 1536) down
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from flashinfer_cli import kernels as K

N_LAYERS = 30
CONFIGS = [("q4_1", 576, 24, 64), ("q1_0", 640, 12, 128)]


def make_layer(fmt: str, d: int, n_exp: int, n: int, rng):
    ff = n_exp * n
    wg = K.quantize(rng.standard_normal((ff, d), dtype=np.float32) * 0.05, fmt)
    wu = K.quantize(rng.standard_normal((ff, d), dtype=np.float32) * 0.05, fmt)
    wd_full = rng.standard_normal((d, ff), dtype=np.float32) * 0.05
    wd = K.quantize(wd_full, fmt)
    experts = []
    bundles = []
    for e in range(n_exp):
        g, u = wg.rows(e * n, (e + 1) * n), wu.rows(e * n, (e + 1) * n)
        dn = K.quantize(np.ascontiguousarray(wd_full[:, e * n:(e + 1) * n]), fmt)
        buf = K.aligned_buffer(g.nbytes + u.nbytes + dn.nbytes, huge=False)
        buf[:] = np.concatenate([g.data, u.data, dn.data])
        lay = np.frombuffer(buf, np.uint8)
        experts.append((K.QTensor(fmt, g.shape, lay[:g.nbytes]),
                        K.QTensor(fmt, u.shape, lay[g.nbytes:g.nbytes + u.nbytes]),
                        K.QTensor(fmt, dn.shape, lay[g.nbytes + u.nbytes:])))
        bundles.append(buf)
    es = K.ExpertSet((fmt, fmt, fmt), d, "columns", bundles, [n] * n_exp)
    return es, experts, (wg, wu, wd)


def silu(g):
    return g / (1.0 + np.exp(-g))


def run_ffn(layers, x, y):
    for es, _, _ in layers:
        es.ffn(x, y)


def run_per_expert(layers, x, y):
    t1 = x.ndim == 1
    for _, experts, _ in layers:
        for g, u, dn in experts:
            if t1:
                h = silu(K.matvec(g, x)) * K.matvec(u, x)
                y += K.matvec(dn, h)
            else:
                h = silu(K.matmul(g, x)) * K.matmul(u, x)
                y += K.matmul(dn, np.ascontiguousarray(h))


def run_dense(layers, x, y):
    t1 = x.ndim == 1
    for _, _, (g, u, dn) in layers:
        if t1:
            y += K.matvec(dn, silu(K.matvec(g, x)) * K.matvec(u, x))
        else:
            y += K.matmul(dn, np.ascontiguousarray(silu(K.matmul(g, x)) * K.matmul(u, x)))


def best_per_layer(fn, layers, x, rounds: int) -> float:
    y = np.zeros_like(x)
    fn(layers, x, y)  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(layers, x, y)
        best = min(best, time.perf_counter() - start)
    return best / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"impl {K.best_impl()}, best of {args.rounds} rounds over {N_LAYERS} layer copies; time per layer")
    print("| format | d_model | experts | t | threads | ffn (1 call) | per expert (3 calls each) | dense (3 calls) "
          "| per expert / ffn | ffn / dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fmt, d, n_exp, n in CONFIGS:
        layers = [make_layer(fmt, d, n_exp, n, rng) for _ in range(N_LAYERS)]
        for t in (1, 128):
            x = rng.standard_normal(d if t == 1 else (t, d), dtype=np.float32)
            for threads in (1, 2):
                K.set_threads(threads)
                rounds = args.rounds if t == 1 else max(2, args.rounds // 2)
                a = best_per_layer(run_ffn, layers, x, rounds)
                b = best_per_layer(run_per_expert, layers, x, rounds)
                c = best_per_layer(run_dense, layers, x, rounds)
                print(f"| {fmt} | {d} | {n_exp} x {n} | {t} | {threads} | {a * 1e6:.1f} us | {b * 1e6:.1f} us "
                      f"| {c * 1e6:.1f} us | {b / a:.1f}x | {a / c:.2f} |", flush=True)


if __name__ == "__main__":
    main()
