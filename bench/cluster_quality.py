"""What clustered and shared experts buy in prune mode (issue 7): `fic bench --quality`'s measure
(bench.quality: continuation perplexity relative to the full model on the shipped quality texts,
which calibration never sees) with the `exact` policy, for several models of one checkpoint.

    python bench/cluster_quality.py NAME=DIR [NAME=DIR ...] [--active 0.5,0.75,0.9] [--json OUT]

A model with shared experts (manifest "shared") is compared at the same share of active FFN
neurons: --active a runs (a - s) / (1 - s) of its routed experts, s its shared share. Quality is
deterministic (no timing), so each model's full run is shared by its active sizes; the load average
is printed beside each model's points.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flashinfer_cli import bench, fmt


def shared_share(model_dir: Path) -> float:
    """The share of FFN neurons in the dense block's shared experts."""
    man = fmt.parse_manifest(Path(model_dir) / fmt.MANIFEST_FILE)
    shared = sum(man.shared_neurons)
    routed = sum(e.n_neurons for layer in man.experts for e in layer)
    return shared / max(1, shared + routed)


def routed_active(active: float, share: float) -> float:
    """The routed fraction that makes `active` of all FFN neurons run with `share` always on."""
    return max(1e-6, min(1.0, (active - share) / (1 - share)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", help="NAME=DIR")
    p.add_argument("--active", default="0.5,0.75,0.9")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--json", default=None)
    p.add_argument("--texts", type=int, default=None, help="the first N quality texts (default: all 8)")
    args = p.parse_args()
    models = [tuple(m.split("=", 1)) for m in args.models]
    actives = [float(a) for a in args.active.split(",")]
    rows = []
    for name, path in models:
        share = shared_share(Path(path))
        t0 = time.time()
        rep = bench.quality(path, actives=[routed_active(a, share) for a in actives], policies=["exact"],
                            max_tokens=args.max_tokens, n_texts=args.texts)
        for a, pt in zip(actives, rep.points):
            ra = routed_active(a, share)
            row = {"model": name, "active": a, "routed_active": round(ra, 4), "shared": round(share, 4),
                   "ppl_ratio": pt.ppl_ratio, "agreement": pt.agreement, "full_ppl": rep.full_ppl,
                   "per_text": {k: v[0] for k, v in pt.per_text.items()}, "load1": os.getloadavg()[0],
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{name:<28} active {a:.2f} (routed {ra:.3f}, shared {share:.3f})  ppl x{pt.ppl_ratio:.3f}  "
                  f"agree {pt.agreement:.3f}  full ppl {rep.full_ppl:.2f}  load {row['load1']:.2f}  "
                  f"{row['seconds']}s", flush=True)
        if args.json:  # after each model: a long run interrupted keeps what it measured
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, args.json)


if __name__ == "__main__":
    sys.exit(main())
