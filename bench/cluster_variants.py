"""Write clustered variants of one converted dense model (cluster.py) that share one collection
of calibration activations: one per --shared fraction, and optionally a contiguous-experts variant
with shared experts (--contiguous: the neurons keep their order, only the shared ones move first).

    python bench/cluster_variants.py MODEL_DIR OUT_PREFIX --shared 0,0.05,0.1 [--contiguous] [--tokens N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from flashinfer_cli import cluster, fmt


def contiguous_plan(rows: np.ndarray, size: int, frac: float) -> cluster.LayerPlan:
    """Shared neurons as cluster.plan_layer picks them, the rest in their converted order."""
    n = rows.shape[1]
    n_shared = int(round(frac * n / size)) * size
    shared = cluster.shared_neurons(rows, n_shared) if n_shared else np.zeros(0, dtype=np.int64)
    return cluster.LayerPlan(np.concatenate([shared, np.setdiff1d(np.arange(n), shared)]).astype(np.int64), n_shared)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out_prefix")
    p.add_argument("--shared", default="0")
    p.add_argument("--contiguous", action="store_true")
    p.add_argument("--tokens", type=int, default=cluster.DEFAULT_TOKENS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    man = fmt.parse_manifest(Path(args.model) / fmt.MANIFEST_FILE)
    size = max(e.n_neurons for e in man.experts[0])
    t0 = time.time()
    rows = cluster.collect_activations(args.model, n_tokens=args.tokens)
    print(f"activations: {rows[0].shape[0]} tokens x {len(rows)} layers in {time.time() - t0:.0f}s", flush=True)
    for frac in (float(f) for f in args.shared.split(",")):
        t0 = time.time()
        if args.contiguous:
            plans, kind = [contiguous_plan(r, size, frac) for r in rows], "contig"
        else:
            plans, kind = [cluster.plan_layer(r, size, frac, args.seed + l) for l, r in enumerate(rows)], "clust"
        t1 = time.time()
        dest = Path(f"{args.out_prefix}-{kind}-sh{frac:g}")
        cluster.rewrite_model(args.model, dest, plans, provenance={"shared": frac, "seed": args.seed, "kind": kind})
        print(f"{dest}: plan {t1 - t0:.0f}s, rewrite {time.time() - t1:.0f}s", flush=True)


if __name__ == "__main__":
    main()
