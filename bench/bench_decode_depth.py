"""Decode tokens/s after a prompt of --depth tokens: fic's fused step, fic's numpy step and llama.cpp
(llama-cpp-python) on the same GGUF and threads, rounds alternating between the engines.

    PYTHONPATH=. python bench/bench_decode_depth.py --gguf PATH.gguf --model smollm2-135m \
        [--depth 2000] [--decode 32] [--rounds 3] [--threads 2]

Each engine reads the prompt once; each round then decodes --decode more tokens where the engine
left off (the context grows by rounds x decode past --depth), so a round costs no prefill. Prints the
median and range per engine, their ratios and the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import token_ids  # noqa: E402


class FicEngine:
    def __init__(self, model: str, threads: int, ctx: int, fused: bool):
        from flashinfer_cli import Engine

        self.name = "fic" if fused else "fic (numpy step)"
        self.m = Engine.open(model, threads=threads, ctx=ctx).model
        self.m.fused_decode = fused

    def prompt(self, ids):
        self.m.reset()
        self.m.forward(ids)

    def step(self, tok):
        self.m.forward([tok])


class LlamaEngine:
    name = "llama.cpp"

    def __init__(self, gguf: str, threads: int, ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(gguf, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512, verbose=False)

    def prompt(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, tok):
        self.llm.eval([tok])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--depth", type=int, default=2000)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-numpy-step", action="store_true", help="leave out fic's numpy step")
    args = ap.parse_args()

    load0 = os.getloadavg()[0]
    n_total = args.depth + args.rounds * args.decode + 8
    ids = token_ids(args.gguf, n_total)
    ctx = n_total + 64
    engines = [FicEngine(args.model, args.threads, ctx, True), LlamaEngine(args.gguf, args.threads, ctx)]
    if not args.no_numpy_step:
        engines.append(FicEngine(args.model, args.threads, ctx, False))
    for e in engines:
        e.prompt(ids[:args.depth])
        e.step(ids[args.depth])  # warm up: first touches
    rates = {e.name: [] for e in engines}
    for r in range(args.rounds):
        start = args.depth + 1 + r * args.decode
        for e in engines:
            t = time.perf_counter()
            for tok in ids[start:start + args.decode]:
                e.step(tok)
            rates[e.name].append(args.decode / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.model}, {args.threads} threads, decode after {args.depth} tokens, {args.rounds} rounds of "
          f"{args.decode} alternating, load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    for k, v in rates.items():
        print(f"  {k}: {med[k]:.1f} tok/s ({min(v):.1f}-{max(v):.1f}), {med[k] / med['llama.cpp']:.2f}x llama.cpp")


if __name__ == "__main__":
    main()
