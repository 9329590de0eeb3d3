"""A fast proxy for prune-mode quality of an expert grouping, on held-out calibration windows:
the share of GRIFFIN energy (sum of squared normalised |h|) a window loses when each layer keeps
its top experts by the window's own GRIFFIN expert scores. No forward pass per variant: one
activation collection (cluster.collect_activations, 4096 tokens: the first 2048 fit the grouping,
the last 2048, cut into 128-token windows, evaluate it).

    python bench/cluster_proxy.py MODEL_DIR [--layers 0,10,20,29] [--rows /tmp/rows.npz]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from flashinfer_cli import cluster

WINDOW, FIT, SIZE = 128, 2048, 16


def _energy(r: np.ndarray, w0: int) -> tuple[np.ndarray, np.ndarray]:
    e = r[w0:w0 + WINDOW] ** 2
    return np.sqrt(e.sum(0)), e


def lost(order: np.ndarray, n_shared: int, r_eval: np.ndarray, frac: float, size: int = SIZE) -> float:
    """Mean over windows of the energy outside shared + top routed experts (frac of all neurons)."""
    n = r_eval.shape[1]
    routed = order[n_shared:]
    k = int(round((frac * n - n_shared) / size))
    out = []
    for w0 in range(0, r_eval.shape[0] - WINDOW + 1, WINDOW):
        s, e = _energy(r_eval, w0)
        groups = routed.reshape(-1, size)
        keep = np.concatenate([order[:n_shared], groups[np.argsort(-s[groups].sum(1))[:k]].ravel()])
        out.append(1 - e[:, keep].sum() / e.sum())
    return float(np.mean(out))


def lost_single(r_eval: np.ndarray, frac: float) -> float:
    k = int(round(frac * r_eval.shape[1]))
    out = []
    for w0 in range(0, r_eval.shape[0] - WINDOW + 1, WINDOW):
        s, e = _energy(r_eval, w0)
        out.append(1 - e[:, np.argsort(-s)[:k]].sum() / e.sum())
    return float(np.mean(out))


def _centred(r: np.ndarray, seed: int = 0) -> np.ndarray:
    """balanced_clusters on centred columns (about their correlation; +1e-3 so no column is all zero),
    the variant compared against."""
    return cluster.balanced_clusters(r - r.mean(axis=0, keepdims=True) + 1e-3, SIZE, seed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--layers", default="0,10,20,29")
    p.add_argument("--rows", default=None, help="cache of the collected activations (.npz)")
    args = p.parse_args()
    if args.rows and os.path.exists(args.rows):
        z = np.load(args.rows)
        rows = [z[f"arr_{i}"] for i in range(len(z.files))]
    else:
        rows = cluster.collect_activations(args.model, n_tokens=2 * FIT)
        if args.rows:
            np.savez(args.rows, *rows)
    layers = [int(x) for x in args.layers.split(",")]
    for frac in (0.5, 0.75, 0.9):
        res: dict[str, list[float]] = {}
        for l in layers:
            r = rows[l].astype(np.float32)
            fit, ev = r[:FIT], r[FIT:]
            n = r.shape[1]
            res.setdefault("contiguous", []).append(lost(np.arange(n), 0, ev, frac))
            res.setdefault("clustered centred", []).append(lost(_centred(fit), 0, ev, frac))
            for f in (0.0, 0.1, 0.2):
                plan = cluster.plan_layer(fit, SIZE, f, 0)
                res.setdefault(f"clustered shared {f:g}", []).append(lost(plan.order, plan.n_shared, ev, frac))
            res.setdefault("single neurons", []).append(lost_single(ev, frac))
        print(f"active {frac}: " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
