"""A/B of two builds' Q1_0 matvec from DRAM (4096 x 4096, as bench_kernels.py), in one run.

Usage: python bench/q1_matvec_ab.py REPO_A REPO_B [--rounds 4] [--impl avx2]

Each REPO is a checkout whose C core is built in place. A child process per (round, build) imports that
build and measures, with 1 and 2 threads, the memory read bandwidth (bench_kernels.measure_bandwidth:
numpy reductions and fic's f32 matvec stream, the larger) and the Q1_0 matvec over >= 512 MiB of copies
of one matrix (so the weights come from DRAM). Builds alternate A, B, A, B...; every figure is the best
over rounds (other processes only slow a run down). Prints GB/s, % of bandwidth and B / A.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
import bench_kernels as B
from flashinfer_cli import kernels as K
impl = sys.argv[1]
rng = np.random.default_rng(0)
w = rng.standard_normal((B.M, B.K_DIM), dtype=np.float32)
x = rng.standard_normal(B.K_DIM, dtype=np.float32)
bn, bf = B.measure_bandwidth(w, x)
copies = B.stream_copies(K.quantize(w, "q1_0"))
out = {}
for n in (1, 2):
    K.set_threads(n)
    t = B.time_matvec(copies, x, impl, passes=5)
    out[n] = {"bw": max(bn[n], bf[n]), "q1": copies[0].nbytes / t / 1e9}
print(json.dumps(out))
"""


def run_child(repo: str, impl: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "bench")]))
    res = subprocess.run([sys.executable, "-c", CHILD, impl], env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("repo_a")
    ap.add_argument("repo_b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--impl", default="avx2")
    args = ap.parse_args()
    best: dict[str, dict[int, dict[str, float]]] = {}
    for r in range(args.rounds):
        for name, repo in (("A", args.repo_a), ("B", args.repo_b)):
            got = run_child(repo, args.impl)
            cur = best.setdefault(name, {n: {"bw": 0.0, "q1": 0.0} for n in (1, 2)})
            for n in (1, 2):
                for key in ("bw", "q1"):
                    cur[n][key] = max(cur[n][key], got[n][key])
            print(f"round {r} {name}: " + ", ".join(f"{n} thr q1 {got[n]['q1']:.1f} GB/s of {got[n]['bw']:.1f}"
                                                  for n in (1, 2)), flush=True)
    print(f"\n| build | threads | bandwidth GB/s | Q1_0 {args.impl} matvec GB/s | % of bandwidth |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("A", "B"):
        for n in (1, 2):
            c = best[name][n]
            print(f"| {name} | {n} | {c['bw']:.1f} | {c['q1']:.1f} | {100 * c['q1'] / c['bw']:.0f}% |")
    for n in (1, 2):
        print(f"B / A, {n} thread(s): {best['B'][n]['q1'] / best['A'][n]['q1']:.2f}x")


if __name__ == "__main__":
    main()
