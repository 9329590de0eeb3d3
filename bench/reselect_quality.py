"""What --reselect N buys in prune mode: the full model's greedy answer to each shipped prompt is
scored teacher-forced, token by token through Engine's decode step (which reselects every N tokens),
by a pruned engine; reported: the answer's perplexity relative to the full model's, the share of
positions whose argmax agrees, and the bytes read by reselections.

    python bench/reselect_quality.py smollm2-135m --active 0.5 --tokens 64 --reselect 0,8,16,32
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from flashinfer_cli import texts
from flashinfer_cli.engine import Engine


def nll(logits: np.ndarray, token: int) -> float:
    z = logits.astype(np.float64)
    z -= z.max()
    return float(np.log(np.exp(z).sum()) - z[token])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--active", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reselect", default="0,8,16,32")
    ap.add_argument("--mem", default=None)
    args = ap.parse_args()
    full = Engine.open(args.model, ctx=1024)
    cases = []
    for p in texts.prompts():
        ids = full.prompt_ids(p["prompt"])
        out = [r.token for r in full.stream(ids, max_tokens=args.tokens) if r.token >= 0]
        full._prefill(ids)
        steps = [full._prefill(ids)] + [full._step([t]) for t in out[:-1]]
        cases.append((p["id"], ids, out, [nll(l, t) for l, t in zip(steps, out)], [int(l.argmax()) for l in steps]))
    print(f"model {args.model}, active {args.active}, {len(cases)} prompts, up to {args.tokens} answer tokens")
    print(f"{'reselect':>8} {'ppl x':>8} {'agree':>7} {'resel':>6} {'MB read':>8} {'s':>6}")
    for n in [int(x) for x in args.reselect.split(",")]:
        eng = Engine.open(args.model, ctx=1024, mode="prune", active=args.active, reselect=n, mem=args.mem)
        d_nll, agree, total, resel, n_bytes = 0.0, 0, 0, 0, 0
        t0 = time.perf_counter()
        for name, ids, out, ref_nll, ref_top in cases:
            eng.model.arena.begin_request()
            logits = eng._prefill(ids)
            eng._since_select = 0
            for i, t in enumerate(out):
                d_nll += nll(logits, t) - ref_nll[i]
                agree += int(logits.argmax()) == ref_top[i]
                total += 1
                if i + 1 < len(out):
                    logits = eng._step([t])
            st = eng.stats()["request"]
            resel += st["reselections"]
            n_bytes += st["bytes_read"]
        print(f"{n:>8} {math.exp(d_nll / total):>8.3f} {agree / total:>7.3f} {resel:>6} {n_bytes / 1e6:>8.1f}"
              f" {time.perf_counter() - t0:>6.1f}")


if __name__ == "__main__":
    main()
