"""A/B of two builds of fic's kernels: the same small, cache-resident calls timed in alternation.

Usage: python bench/kernels_ab.py REPO_A REPO_B [--rounds 6] [--reps 200]

Each REPO is a checkout whose C core is built in place (python csrc/build_ffi.py). A child process per
(round, build) imports that build and times, per format and implementation, one thread: matvec
(1024 x 1024), accum_rows (all 1024 rows active) and matmul (256 x 1024, T = 16). The matrices are
small enough to stay in L2, so the figure is the kernel's code, not the memory of a shared machine.
Builds alternate A, B, A, B...; each figure is the best (smallest) time over every round and
repetition, which other processes can only make slower. Prints B / A as a speed ratio (above 1:
B is faster) and the geometric mean per implementation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
from flashinfer_cli import kernels as K
reps = int(sys.argv[1])
K.set_threads(1)
rng = np.random.default_rng(0)
M = KD = 1024
w = rng.standard_normal((M, KD), dtype=np.float32)
x = rng.standard_normal(KD, dtype=np.float32)
xs = rng.standard_normal((16, KD), dtype=np.float32)

def weights(fmt):
    if fmt in K.QUANTIZABLE:
        return K.quantize(w, fmt)
    data = rng.integers(0, 256, M * K.row_bytes(fmt, KD), dtype=np.uint8)
    blocks = data.reshape(-1, K.block_bytes(fmt))
    for off in {"q4_k": (0, 2), "q6_k": (K.block_bytes(fmt) - 2,)}[fmt]:
        blocks[:, off:off + 2] = rng.uniform(1e-3, 4e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return K.QTensor(fmt, (M, KD), data)

def best(fn, n):
    fn()
    t = float("inf")
    for _ in range(n):
        s = time.perf_counter(); fn(); t = min(t, time.perf_counter() - s)
    return t

out = {}
for fmt in K.FORMATS:
    qt = weights(fmt)
    small = K.QTensor(fmt, (256, KD), qt.data[:256 * K.row_bytes(fmt, KD)])
    y = np.empty(M, dtype=np.float32)
    a = np.full(M, 1e-3, dtype=np.float32)
    acc = np.zeros(KD, dtype=np.float32)
    for impl in K.available_impls():
        n = reps if impl != "ref" else max(3, reps // 20)
        out[f"{fmt} {impl} matvec"] = best(lambda: K.matvec(qt, x, impl=impl, out=y), n)
        out[f"{fmt} {impl} accum_rows"] = best(lambda: K.accum_rows(qt, a, acc, impl=impl), n)
        out[f"{fmt} {impl} matmul"] = best(lambda: K.matmul(small, xs, impl=impl), max(3, n // 10))
print(json.dumps(out))
"""


def run_child(repo: str, reps: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": repo}
    res = subprocess.run([sys.executable, "-c", CHILD, str(reps)], cwd=repo, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("repo_a")
    ap.add_argument("repo_b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    best: dict[str, dict[str, float]] = {"a": {}, "b": {}}
    for _ in range(args.rounds):
        for side, repo in (("a", args.repo_a), ("b", args.repo_b)):
            for key, t in run_child(repo, args.reps).items():
                best[side][key] = min(best[side].get(key, math.inf), t)
    print("| format | impl | op | A us | B us | B / A speed |")
    print("| --- | --- | --- | --- | --- | --- |")
    logs: dict[str, list[float]] = {}
    for key, ta in best["a"].items():
        tb = best["b"].get(key)
        if tb is None:
            continue
        fmt, impl, op = key.split()
        logs.setdefault(impl, []).append(math.log(ta / tb))
        print(f"| {fmt} | {impl} | {op} | {ta * 1e6:.1f} | {tb * 1e6:.1f} | {ta / tb:.3f} |")
    for impl, ls in logs.items():
        print(f"{impl}: geometric mean of B / A speed {math.exp(sum(ls) / len(ls)):.3f} over {len(ls)} figures, "
              f"min {math.exp(min(ls)):.3f}, max {math.exp(max(ls)):.3f}")


if __name__ == "__main__":
    main()
