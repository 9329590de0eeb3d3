"""The ridge fit of calibrate.py against its previous version (main at 3b47ee1: a general solve with
d_out right-hand sides, two d_in x d_in x d_out products, numpy's Householder QR in the subspace
iteration), on the same statistics of one layer's shape, alternated: seconds and agreement.

    python bench/calibrate_fit_time.py D_IN D_OUT RANK [REPS]     # Qwen2.5-Coder-1.5B: 1536 8960 128
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from flashinfer_cli import calibrate as cal, kernels


def previous_top_eigenvectors(g: np.ndarray, k: int, *, iters: int = 8, extra: int = 16):
    n = g.shape[0]
    q = np.random.default_rng(0).standard_normal((n, min(n, k + extra)))
    for _ in range(iters):
        q, _ = np.linalg.qr(g @ q)
    evals, u = np.linalg.eigh(q.T @ g @ q)
    top = np.argsort(evals)[::-1][:k]
    return q @ u[:, top], evals[top]


def previous_fit(st: cal.RidgeStats, rank: int, ridge: float):
    n = max(1, st.n)
    mu_x, mu_y = st.sx / n, st.sy / n
    cxx = st.sxx / n - np.outer(mu_x, mu_x)
    cxy = st.sxy / n - np.outer(mu_x, mu_y)
    lam = ridge * max(np.trace(cxx) / cxx.shape[0], 1e-12)
    reg = cxx + lam * np.eye(cxx.shape[0])
    chol = np.linalg.cholesky(reg)
    w = np.linalg.solve(reg, cxy)
    m = chol.T @ w
    u, evals = previous_top_eigenvectors(m @ m.T, rank)
    s = np.sqrt(np.maximum(evals, 1e-30))
    v = (m.T @ u) / s
    a = (w @ v).T
    return a.astype(np.float32), v.astype(np.float32), mu_x.astype(np.float32), mu_y.astype(np.float32)


def layer_stats(d_in: int, d_out: int, windows: int = 4) -> cal.RidgeStats:
    """Activation-like statistics: L2-normalised |x M + noise| rows of 256-token windows."""
    rng = np.random.default_rng(1)
    st = cal.RidgeStats(d_in, d_out)
    mix = rng.standard_normal((d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    for _ in range(windows):
        x = (rng.standard_normal((256, d_in)) * np.linspace(0.1, 2, d_in)).astype(np.float32)
        y = np.abs(x @ mix + rng.standard_normal((256, d_out)).astype(np.float32))
        st.add(x, y / np.linalg.norm(y, axis=1, keepdims=True))
    return st


def main() -> None:
    d_in, d_out, rank = (int(v) for v in sys.argv[1:4])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    st = layer_stats(d_in, d_out)
    for _ in range(reps):
        t = time.perf_counter(); old = previous_fit(st, rank, 0.1); t_old = time.perf_counter() - t
        t = time.perf_counter(); new = st.fit(rank, 0.1); t_new = time.perf_counter() - t
        print(f"previous {t_old:.2f} s, now {t_new:.2f} s: x{t_old / t_new:.2f} (1-min load {os.getloadavg()[0]:.1f})",
              flush=True)
    map_old = old[0].T.astype(np.float64) @ old[1].T.astype(np.float64)
    map_new = new[0].T.astype(np.float64) @ new[1].T.astype(np.float64)
    print(f"rank-{rank} map: max |now - previous| / max |previous| = "
          f"{np.abs(map_new - map_old).max() / np.abs(map_old).max():.1e}")
    for name, o, n in zip(("a", "b"), old[:2], new[:2]):
        qo, qn = kernels.quantize(np.ascontiguousarray(o), "q8_0"), kernels.quantize(np.ascontiguousarray(n), "q8_0")
        differ = int((np.frombuffer(bytes(qo.data), np.uint8) != np.frombuffer(bytes(qn.data), np.uint8)).sum())
        print(f"q8_0 {name}: {differ} of {qo.nbytes} bytes differ")


if __name__ == "__main__":
    main()
