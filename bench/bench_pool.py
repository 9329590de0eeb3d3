"""Kernel calls through the thread pool, on a quiet machine and next to a CPU hog.

Usage: PYTHONPATH=. python bench/bench_pool.py [--calls N] [--rounds R] [--threads 1,2]

Per call time of
- matvec:  Q4_1 576 x 1536 (SmolLM2-135M's down projection shape)
- ffn:     kernels.ExpertSet.ffn, d_model 576, 24 experts x 64 neurons, Q4_1, columns layout, t = 1
- tiny:    matvec Q4_1 64 x 576 split into 2 chunks (the pool's dispatch round trip plus ~1 us of work)
- step:    a decode-like step: 30 x (matvec, ffn, with small numpy work between), per step
- decode:  with --model NAME (a model already in fic's store, e.g. smollm2-135m): one real
           decode step (Model.forward of one token; the position is reset every 32 steps)
at 1 and 2 threads, quiet and with a busy process (a Python busy loop, `while True: pass` that also ends with its parent)
running. Each
figure is the median over R rounds of the mean over N back-to-back calls (the median, not the
best, since a loaded machine is what is measured); p90 of the rounds in brackets.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

from flashinfer_cli import kernels as K

# a busy loop that ends with its parent, should the parent die without killing it
HOG = "import os\np = os.getppid()\nwhile os.getppid() == p: pass"


def make_ffn(rng, d=576, n_exp=24, n=64, fmt="q4_1"):
    bundles = []
    for _ in range(n_exp):
        g = K.quantize(rng.standard_normal((n, d), dtype=np.float32) * 0.05, fmt)
        u = K.quantize(rng.standard_normal((n, d), dtype=np.float32) * 0.05, fmt)
        dn = K.quantize(rng.standard_normal((d, n), dtype=np.float32) * 0.05, fmt)
        buf = K.aligned_buffer(g.nbytes + u.nbytes + dn.nbytes)
        buf[:] = np.concatenate([g.data, u.data, dn.data])
        bundles.append(buf)
    return K.ExpertSet((fmt, fmt, fmt), d, "columns", bundles, [n] * n_exp)


def per_call(fn, calls: int, rounds: int) -> tuple[float, float]:
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--model", default=None, help="also time a real decode step of this stored model")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    wm = K.quantize(rng.standard_normal((576, 1536), dtype=np.float32), "q4_1")
    xm = rng.standard_normal(1536, dtype=np.float32)
    ym = np.empty(576, dtype=np.float32)
    wt = K.quantize(rng.standard_normal((64, 576), dtype=np.float32), "q4_1")
    xt = rng.standard_normal(576, dtype=np.float32)
    yt = np.empty(64, dtype=np.float32)
    es = make_ffn(rng)
    xf = rng.standard_normal(576, dtype=np.float32)
    yf = np.zeros(576, dtype=np.float32)
    def step():
        for _ in range(30):
            K.matvec(wm, xm, out=ym)
            np.tanh(ym, out=ym)
            es.ffn(xf, yf)
            np.multiply(yf, 0.5, out=yf)

    cases = [
        ("matvec q4_1 576x1536", lambda: K.matvec(wm, xm, out=ym)),
        ("ffn 24x64 q4_1 t=1", lambda: es.ffn(xf, yf)),
        ("tiny matvec 64x576", lambda: K.matvec(wt, xt, out=yt)),
        ("step: 30 x (matvec + ffn)", step),
    ]
    if args.model:
        from flashinfer_cli import Engine

        m = Engine.open(args.model, threads=1, ctx=256, auto_pull=False).model
        state = {"pos": 0}

        def decode():
            if state["pos"] % 32 == 0:
                m.reset()
                m.forward(list(range(100, 108)))
            m.forward([200 + state["pos"] % 32])
            state["pos"] += 1

        cases.append((f"decode step {args.model}", decode))
    threads = [int(s) for s in args.threads.split(",")]
    print(f"impl {K.best_impl()}; per call, median of {args.rounds} rounds x {args.calls} calls [p90]")
    print("| kernel | threads | quiet | with a CPU hog |")
    print("| --- | --- | --- | --- |")
    results = {}
    for load in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", HOG]) if load else None
        try:
            if hog is not None:
                time.sleep(0.5)
            for name, fn in cases:
                for t in threads:
                    K.set_threads(t)
                    calls = args.calls if name[:4] not in ("step", "deco") else max(8, args.calls // 30)
                    results[(name, t, load)] = per_call(fn, calls, args.rounds)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    for name, _ in cases:
        for t in threads:
            q, l = results[(name, t, False)], results[(name, t, True)]
            print(f"| {name} | {t} | {q[0] * 1e6:.1f} us [{q[1] * 1e6:.1f}] | {l[0] * 1e6:.1f} us [{l[1] * 1e6:.1f}] |")


if __name__ == "__main__":
    main()
