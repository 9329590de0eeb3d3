"""Pruned against full prefill for the sketch policy (and exact's for reference): expert bytes
read for one prompt from a cold arena, and time to first token, in prune mode at one active size.

    python bench/sketch_prefill.py MODEL [--active 0.75] [--texts 4] [--tokens 256]

The budget is set just below everything resident (the plan's total with every expert minus one
byte), so nothing is read at open and every read is the prompt's. Engines alternate per text;
TTFT figures are only comparable within one run (the machine is shared): read them as ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from flashinfer_cli import texts
from flashinfer_cli.engine import Engine, make_engine_plan
from flashinfer_cli.pull import resolve_model

CONFIGS = (("exact", None), ("sketch", "full"), ("sketch", "pruned"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--active", type=float, default=0.75)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    path = resolve_model(args.model, auto_pull=False)
    everything, _ = make_engine_plan(path, ctx=args.tokens + 8, mode="prune", active=1.0)
    mem = everything.total_bytes - 1
    rows = {c: [] for c in CONFIGS}
    for doc in texts.quality_texts()[:args.texts]:
        for policy, prefill in CONFIGS:
            eng = Engine.open(str(path), ctx=args.tokens + 8, mem=mem, mode="prune", active=args.active,
                              policy=policy, prefill=prefill)
            ids = eng.tokenize(doc.text)[:args.tokens]
            t0 = time.perf_counter()
            for _ in eng.stream(ids, max_tokens=1):
                pass
            ttft = time.perf_counter() - t0
            st = eng.stats()["request"]
            rows[(policy, prefill)].append((st["bytes_read"], st["misses"], ttft))
            eng.close()
    print(f"{path.name}: active {args.active}, {args.texts} texts x {args.tokens} tokens, mem {mem:,} B, "
          f"load {os.getloadavg()[0]:.1f}")
    base = statistics.median(r[2] for r in rows[CONFIGS[0]])
    for (policy, prefill), r in rows.items():
        b = statistics.mean(x[0] for x in r)
        n = statistics.mean(x[1] for x in r)
        t = statistics.median(x[2] for x in r)
        print(f"  {policy:<7}{prefill or '-':<8} bytes read {b / 1e6:8.2f} MB  experts read {n:7.1f}  "
              f"TTFT median {t:6.2f} s (x{t / base:.2f} of exact's)")


if __name__ == "__main__":
    main()
