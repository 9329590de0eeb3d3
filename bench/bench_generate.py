"""Decode and prefill tokens/s of a model with fic, next to llama.cpp (llama-cpp-python) on the
same GGUF file.

    PYTHONPATH=. python bench/bench_generate.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--model smollm2-135m] [--threads 2] [--prefill 512] [--decode 64] [--depth 16] [--rounds 5] [--profile]

Both engines get the same token ids (llama.cpp's tokenizer on a text, repeated to length) and do
the same work per token: a forward pass with the last position's logits. No sampling is timed
(decode feeds fixed tokens). Rounds alternate between the engines; the median and range are shown.
--depth: the decode is timed after a prompt of that many tokens (default 16: short context).
--profile adds where the time of a fic decode step goes (kernel calls against the Python between them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt"


def token_ids(gguf: str, n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(gguf, vocab_only=True, verbose=False)
    ids = llm.tokenize(TEXT.read_text().encode(), add_bos=False, special=False)
    return (ids * (n // len(ids) + 1))[:n]


class Fic:
    name = "fic"

    def __init__(self, model: str, threads: int, ctx: int):
        from flashinfer_cli import Engine

        self.engine = Engine.open(model, threads=threads, ctx=ctx)
        self.m = self.engine.model

    def prefill(self, ids):
        self.m.reset()
        t = time.perf_counter()
        self.m.forward(ids)
        return len(ids) / (time.perf_counter() - t)

    def decode(self, ids, n, depth=16):
        self.m.reset()
        self.m.forward(ids[:depth])
        t = time.perf_counter()
        for tok in ids[depth:depth + n]:
            self.m.forward([tok])
        return n / (time.perf_counter() - t)


class FicNumpyStep(Fic):
    """fic with the numpy decode step between the kernels (before decode.c), for a same-run ratio."""
    name = "fic (numpy step)"

    def __init__(self, model: str, threads: int, ctx: int):
        super().__init__(model, threads, ctx)
        self.m.fused_decode = False


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: str, threads: int, ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(gguf, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)

    def decode(self, ids, n, depth=16):
        self.llm.reset()
        self.llm.eval(ids[:depth])
        t = time.perf_counter()
        for tok in ids[depth:depth + n]:
            self.llm.eval([tok])
        return n / (time.perf_counter() - t)


def profile_decode(fic: Fic, ids, n: int) -> dict[str, float]:
    """ms per decode step: total, inside kernel calls (kernels.py's functions and ExpertSet.ffn,
    wrapper included), and the rest (Python/numpy)."""
    from flashinfer_cli import kernels, model

    spent = {"kernels": 0.0, "calls": 0}
    by_site: dict[str, list[float]] = {}  # "matvec (m, k)" / "ExpertSet.ffn (n_total)" -> [seconds, calls]
    originals = {name: getattr(kernels, name) for name in ("matvec", "matmul", "accum_rows", "dequantize")}

    def site(name, a):
        w = a[0] if a else None
        if isinstance(w, kernels.QTensor):
            return f"{name} {w.shape[0]}x{w.shape[1]}"
        if hasattr(w, "n_total"):
            return f"{name} {len(w)} experts, {w.n_total} neurons"
        return name

    def timed(fn, name):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                spent["kernels"] += dt
                spent["calls"] += 1
                s = by_site.setdefault(site(name, a), [0.0, 0])
                s[0] += dt
                s[1] += 1
        return wrapper

    for name, fn in originals.items():
        setattr(kernels, name, timed(fn, name))
    ffn_set = getattr(kernels, "ExpertSet", None)  # the fused expert FFN is a method
    ffn_orig = ffn_set.ffn if ffn_set is not None else None
    if ffn_orig is not None:
        ffn_set.ffn = timed(ffn_orig, "ExpertSet.ffn")
    try:
        fic.m.reset()
        fic.m.forward(ids[:16])
        spent.update(kernels=0.0, calls=0)
        by_site.clear()
        t = time.perf_counter()
        for tok in ids[16:16 + n]:
            fic.m.forward([tok])
        total = time.perf_counter() - t
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
        if ffn_orig is not None:
            ffn_set.ffn = ffn_orig
    assert model.kernels is kernels
    out = {"step_ms": 1e3 * total / n, "kernel_ms": 1e3 * spent["kernels"] / n,
           "python_ms": 1e3 * (total - spent["kernels"]) / n, "kernel_calls": spent["calls"] / n}
    out["sites"] = {k: (1e3 * v[0] / n, v[1] / n) for k, v in sorted(by_site.items(), key=lambda kv: -kv[1][0])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the GGUF file llama.cpp runs (and fic's model came from)")
    ap.add_argument("--model", default="smollm2-135m", help="fic model: store name or directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--depth", type=int, default=16, help="context tokens before the timed decode")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--numpy-step", action="store_true", help="also time fic's numpy decode step")
    args = ap.parse_args()

    ctx = max(args.prefill, args.depth) + args.decode + 64
    ids = token_ids(args.gguf, max(args.prefill, args.depth + args.decode))
    engines = [Fic(args.model, args.threads, ctx), LlamaCpp(args.gguf, args.threads, ctx)]
    if args.numpy_step:
        engines.append(FicNumpyStep(args.model, args.threads, ctx))
    for e in engines:  # warm up: first touches of weights and buffers
        e.prefill(ids[:64])
        e.decode(ids, 8)
    results = {e.name: {"prefill": [], "decode": []} for e in engines}
    for _ in range(args.rounds):
        for e in engines:
            results[e.name]["prefill"].append(e.prefill(ids[:args.prefill]))
            results[e.name]["decode"].append(e.decode(ids, args.decode, args.depth))

    print(f"threads {args.threads}, prefill of {args.prefill} tokens, decode of {args.decode} tokens after "
          f"{args.depth}, "
          f"{args.rounds} alternating rounds, load average {os.getloadavg()[0]:.2f}")
    print("| engine | decode tokens/s (median) | decode min-max | prefill tokens/s (median) | prefill min-max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        d, p = r["decode"], r["prefill"]
        print(f"| {name} | {statistics.median(d):.1f} | {min(d):.1f}-{max(d):.1f} "
              f"| {statistics.median(p):.1f} | {min(p):.1f}-{max(p):.1f} |")
    if args.profile:
        runs = [profile_decode(engines[0], ids, args.decode) for _ in range(args.rounds)]
        best = min(runs, key=lambda r: r["step_ms"])
        sites = best.pop("sites")
        print("fic decode step (fastest of the rounds): " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()))
        for k, (ms, calls) in sites.items():
            print(f"  {k}: {ms:.3f} ms in {calls:.0f} calls per step ({1e3 * ms / calls:.1f} us a call)")


if __name__ == "__main__":
    main()
