"""A cold prompt's expert reads against the disk's sequential rate, in one run.

Issue 9's goal: on the 20B synthetic model, a first prompt (fresh engine, empty arena, page cache
dropped) reads its experts at 85% or more of the disk's sequential bandwidth. This script:

  1. reads the model's experts.bin sequentially (1 MiB requests through fic's reader at QD8 and at
     QD32, the engine's depth, the page cache dropped before each): the better is the denominator;
  2. drops the page cache, opens a fresh engine and answers one prompt (one new token), timing every
     batch of bundle reads from its submission to the end of its wait;
  3. prints the bytes, the time the reads were in flight (the union of those intervals: overlapping
     prefetches counted once) and the ratio, then the sequential read again (the disk drifts).

    FIC_HOME=... python bench/cold_read.py syn20b-q1 [--mem 768M] [--ctx 1024] [--mode prune]
        [--prompt TEXT] [--seq-gib 1]

A batch's interval ends when its wait returns, so a read collected late (a prefetch waited for after
compute) counts its idle tail too: the prompt's rate is, if anything, understated. Needs root to drop
the page cache (without it the figures say "warm").
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reader  # noqa: E402  (this folder's script: drop_caches, the sequential read)

from flashinfer_cli import fmt, kernels  # noqa: E402
from flashinfer_cli.engine import Engine  # noqa: E402

GIB = 1 << 30


@dataclass
class ReadLog:
    """Each batch of bundle reads: (start, end) seconds and its bytes."""
    intervals: list[tuple[float, float]] = field(default_factory=list)
    n_bytes: int = 0

    def in_flight_s(self) -> float:
        """The union of the intervals' lengths."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total


def log_reads(log: ReadLog) -> None:
    """Wrap ModelReader.submit_bundles so that every batch records its interval when waited for."""
    submit = fmt.ModelReader.submit_bundles

    def timed_submit(self, keys, dsts):
        start = time.perf_counter()
        pending = submit(self, keys, dsts)
        wait = pending.wait

        def timed_wait(*args, **kwargs):
            out = wait(*args, **kwargs)
            log.intervals.append((start, time.perf_counter()))
            log.n_bytes += sum(d.nbytes for d in dsts)
            return out

        pending.wait = timed_wait
        return pending

    fmt.ModelReader.submit_bundles = timed_submit


def sequential_gbps(path: Path, n_bytes: int) -> tuple[float, bool]:
    """The better GB/s of reading the file's first n_bytes in order (1 MiB requests) at QD8 and QD32,
    and whether the page cache was dropped before each."""
    n_bytes = min(n_bytes, path.stat().st_size) // bench_reader.MIB * bench_reader.MIB
    buf = kernels.aligned_buffer(bench_reader.BATCH * bench_reader.MIB)
    best, cold = 0.0, True
    for qd in (8, 32):
        cold &= bench_reader.drop_caches()
        best = max(best, n_bytes / bench_reader.run_sequential_reader(path, n_bytes, buf, queue_depth=qd) / 1e9)
    return best, cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--mem", default="768M")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--mode", default="prune", choices=["prune", "exact"])
    ap.add_argument("--prompt", default="What is the capital of France, and why is it there?")
    ap.add_argument("--seq-gib", type=float, default=1.0, help="bytes of experts.bin read in order")
    args = ap.parse_args()

    from flashinfer_cli.pull import resolve_model
    experts = resolve_model(args.model, auto_pull=False) / "experts.bin"
    seq_before, cold_seq = sequential_gbps(experts, int(args.seq_gib * GIB))

    log = ReadLog()
    log_reads(log)
    cold = bench_reader.drop_caches()
    engine = Engine.open(args.model, mem=args.mem, ctx=args.ctx, mode=args.mode, auto_pull=False)
    try:
        start = time.perf_counter()
        ids = engine.prompt_ids(args.prompt)
        for _ in engine.stream(ids, max_tokens=1):
            pass
        ttft = time.perf_counter() - start
    finally:
        engine.close()
    seq_after, _ = sequential_gbps(experts, int(args.seq_gib * GIB))

    flight = log.in_flight_s()
    rate = log.n_bytes / flight / 1e9 if flight > 0 else float("nan")
    seq = max(seq_before, seq_after)
    state = "cold" if cold and cold_seq else "warm (page cache not dropped: not root?)"
    print(f"{args.model} --mem {args.mem} --ctx {args.ctx} --mode {args.mode}, {len(ids)}-token prompt, {state}")
    print(f"sequential read of experts.bin (1 MiB, the better of QD8 and QD32): {seq_before:.2f} GB/s before, "
          f"{seq_after:.2f} after")
    print(f"prompt: {log.n_bytes / 1e9:.3f} GB in {len(log.intervals)} batches, in flight {flight:.2f} s "
          f"of {ttft:.2f} s to the first token: {rate:.2f} GB/s = {rate / seq:.0%} of the better sequential")


if __name__ == "__main__":
    main()
