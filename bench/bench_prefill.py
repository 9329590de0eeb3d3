"""Prefill tokens/s of fic before and after a change, next to llama.cpp, in one run.

    python bench/bench_prefill.py --before /work/main --after . --model smollm2-135m \
        --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--n 256] [--threads 2] [--rounds 3]
    python bench/bench_prefill.py --make-q1 OUT.gguf      # a synthetic 1-bit (Q1_0) llama GGUF

Each measurement runs in its own process (two builds of fic's C core cannot share one), and
rounds alternate the engines: fic with --before's package, fic with --after's, llama.cpp
(llama-cpp-python). A worker prints one JSON line: prefill of n tokens (tokens/s, best of 3
after a warm-up; wall clock, or with --clock cpu the process's CPU time) and one decode step after that prefill (ms, median of 16), so the per-token cost
of prefill and of decode come from the same process. The driver prints medians, ratios and the
1-minute load average beside each round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "data" / "prose.txt"


def token_ids(gguf: str, n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(gguf, vocab_only=True, verbose=False)
    ids = llm.tokenize(TEXT.read_text().encode(), add_bos=False, special=False)
    return (ids * (n // len(ids) + 1))[:n]


def worker(args) -> dict:
    ids = token_ids(args.gguf, args.n + 17)
    prompt, more = ids[:args.n], ids[args.n:]
    if args.worker == "fic":
        from flashinfer_cli import Engine

        m = Engine.open(args.model, threads=args.threads, ctx=args.n + 64).model

        def prefill():
            m.reset()
            m.forward(prompt)

        def step(tok):
            m.forward([tok])
    else:
        from llama_cpp import Llama

        llm = Llama(args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=args.n + 64,
                    n_batch=512, verbose=False)

        def prefill():
            llm.reset()
            llm.eval(prompt)

        def step(tok):
            llm.eval([tok])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    prefill()  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = clock()
        prefill()
        best = min(best, clock() - t0)
    steps = []
    for tok in more[:16]:
        t0 = clock()
        step(tok)
        steps.append(clock() - t0)
    return {"prefill_tps": args.n / best, "decode_ms": 1e3 * statistics.median(steps)}


def run_worker(engine: str, root: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model", args.model, "--gguf",
           args.gguf, "--n", str(args.n), "--threads", str(args.threads), "--clock", args.clock]
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load1"] = os.getloadavg()[0]
    return res


def make_q1(path: Path) -> None:
    """A llama GGUF with every attention and FFN matrix in Q1_0 (Bonsai-style), random weights,
    d_model 1024, d_ff 2816, 8 layers (~100M parameters in Q1_0), written with tests' helpers."""
    sys.path.insert(0, str(REPO / "tests"))
    import gguf

    from test_convert import tiny_model, write_gguf

    T = gguf.GGMLQuantizationType
    model = tiny_model("llama", seed=1, vocab_size=2048, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=2048)
    q1 = {r: T.Q1_0 for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    tmp = path.with_suffix(".tmp")
    write_gguf(tmp, model, types={"token_embd": T.Q8_0, "output": T.Q8_0, **q1})
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-q1", type=Path)
    ap.add_argument("--worker", choices=["fic", "llama"])
    ap.add_argument("--before", help="repository root of the 'before' fic (built in place)")
    ap.add_argument("--after", default=str(REPO))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the process's CPU time (with --threads 1, robust to a busy shared machine)")
    args = ap.parse_args()
    if args.make_q1:
        make_q1(args.make_q1)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    engines = ([("before", "fic", args.before)] if args.before else []) + [("after", "fic", args.after),
                                                                            ("llama.cpp", "llama", args.after)]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
    for r in range(args.rounds):
        for name, engine, root in engines:
            res = run_worker(engine, root, args)
            runs[name].append(res)
            print(f"round {r} {name:9s} prefill {res['prefill_tps']:7.1f} tok/s  decode step "
                  f"{res['decode_ms']:6.2f} ms  load {res['load1']:.2f}", flush=True)
    med = {name: {k: statistics.median(x[k] for x in v) for k in ("prefill_tps", "decode_ms")}
           for name, v in runs.items()}
    print(f"\nmodel {args.model}, {args.n}-token prefill, {args.threads} threads, {args.clock} clock, "
          f"medians of {args.rounds} rounds")
    for name, m in med.items():
        per_tok_ms = 1e3 / m["prefill_tps"]
        print(f"| {name} | {m['prefill_tps']:.1f} tok/s | decode step {m['decode_ms']:.2f} ms | "
              f"decode step / prefill per token {m['decode_ms'] / per_tok_ms:.2f}x |")
    a, l = med["after"], med["llama.cpp"]
    print(f"after / llama.cpp prefill: {a['prefill_tps'] / l['prefill_tps']:.2f}x")
    if "before" in med:
        print(f"after / before prefill: {a['prefill_tps'] / med['before']['prefill_tps']:.2f}x")


if __name__ == "__main__":
    main()
