"""A mixture of experts under a budget (issue 8): hit rate, bytes read per decoded token and decode
tokens/s in exact mode at two budgets, with and without the next-layer prefetch, on a synthetic MoE
of realistic shape (OLMoE-1B-7B's proportions at half its width: d_model 1024, 8 layers, 64 experts
of 512 neurons, top-8, Q4_0 experts; vocabulary 32000, tied).

The weights are random (flashinfer_cli/synth.py writes them, as `fic synth` does: uniform, not
Gaussian, since the writer moved there). Token embeddings share one direction (each is 0.3 common
+ 0.95 random), so some experts are hotter than others as in trained models; beyond that, routing from one token to
the next is as random as the token ids, the hard case for a pin list and a predictor.

    python bench/moe_budget.py [--dir /tmp/fic-moe-synth] [--tokens 64] [--threads 2]
    python bench/moe_budget.py --quality [--dir MODEL]   # prune mode against the full model, teacher-forced
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from flashinfer_cli import fmt, kernels, synth

D, LAYERS, EXPERTS, NEURONS, TOP_K, VOCAB, HEADS, KV, HEAD_DIM = 1024, 8, 64, 512, 8, 32000, 16, 4, 64


SHAPE = synth.SynthShape(n_layers=LAYERS, d_model=D, n_heads=HEADS, n_kv_heads=KV, head_dim=HEAD_DIM,
                         vocab_size=VOCAB, ffn_neurons=NEURONS, n_experts=EXPERTS, top_k=TOP_K, quant="q4_0",
                         family="llama", tie_embeddings=True, dense_quant="q8_0", norm_topk=False)  # OLMoE's rule


def build(dest: Path, seed: int = 0) -> None:
    """The synthetic model, written by flashinfer_cli/synth.py (`fic synth`'s writer; its tokenizer
    is not used: the bench feeds token ids)."""
    synth.write_model(dest, "synthetic-moe", SHAPE, seed=seed)


def run(path: Path, mem: int | None, prefetch: bool, prompt: list[int], n_tokens: int) -> dict:
    from flashinfer_cli.engine import Engine, make_engine_plan
    from flashinfer_cli.model import Model

    plan, _ = make_engine_plan(path, mem=mem, ctx=512)
    model = Model(path, plan=plan)
    model.moe_prefetch = prefetch
    eng = Engine(path, model, tokenizer=None)
    logits = eng.forward(prompt)[-1]
    a = model.arena
    before = a.request.as_dict()
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        tok = int(np.argmax(model.forward([tok])))
    dt = time.perf_counter() - t0
    after = a.request.as_dict()
    d = {k: after[k] - before[k] for k in after}
    out = {"mem": mem, "prefetch": prefetch, "slots": plan.n_slots, "pinned_per_layer": plan.active_per_layer[0],
           "tok_s": n_tokens / dt, "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),
           "bytes_per_token": d["bytes_read"] / n_tokens, "read_wait_ms_per_token": 1000 * d["read_seconds"] / n_tokens,
           **{k: d[k] for k in ("hits", "misses", "predicted", "predicted_right", "prefetched", "prefetch_used")}}
    model.close()
    return out


def quality(path: Path, prompt: list[int], n_tokens: int, actives: list[float]) -> None:
    """Prune mode's cost: the full model's greedy continuation scored teacher-forced by a pruned
    engine (sets chosen from the prompt, held): perplexity relative to the full model's, and the
    share of positions whose argmax agrees."""
    from flashinfer_cli.engine import Engine, make_engine_plan
    from flashinfer_cli.model import Model

    def engine(mode: str, active: float | None) -> Engine:
        plan, _ = make_engine_plan(path, mem=None, ctx=512, mode=mode, active=active)
        return Engine(path, Model(path, plan=plan), tokenizer=None)

    full = engine("exact", None)
    ids = list(prompt)
    for _ in range(n_tokens):
        ids.append(int(np.argmax(full.forward(ids)[-1])) if len(ids) == len(prompt) else
                   int(np.argmax(full.model.forward([ids[-1]]))))
    ref = full.forward(ids)[len(prompt) - 1:-1]

    def nll(logits: np.ndarray) -> float:
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(lse - z[np.arange(len(z)), ids[len(prompt):]]))

    base = nll(ref)
    print("active | ppl / full model's | argmax agrees")
    for a in actives:
        got = engine("prune", a).forward(ids, prompt_len=len(prompt))[len(prompt) - 1:-1]
        print(f"{a:.2f} | {np.exp(nll(got) - base):.3f} | {(got.argmax(1) == ref.argmax(1)).mean():.3f}")


def budget_for_slots(path: Path, slots: int) -> int:
    """The largest budget (to 1 MiB) whose arena has at most `slots` slots (the plan's prefill
    chunk, and so its fixed parts, shrink with the budget: searched, not computed)."""
    from flashinfer_cli.engine import make_engine_plan

    lo, hi = 1, 1 << 14  # MiB
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            ok = make_engine_plan(path, mem=mid << 20, ctx=512)[0].n_slots <= slots
        except ValueError:  # a BudgetError: too small
            ok = True
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/fic-moe-synth")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", default="0.5,0.25", help="budgets: arenas holding these shares of the experts")
    ap.add_argument("--quality", action="store_true", help="prune mode's cost instead of the budgets' speed")
    args = ap.parse_args()
    kernels.set_threads(args.threads)
    path = Path(args.dir)
    if not (path / fmt.MANIFEST_FILE).exists():
        t0 = time.perf_counter()
        build(path)
        print(f"built {path} in {time.perf_counter() - t0:.0f} s")
    from flashinfer_cli import plan as planlib
    from flashinfer_cli.engine import make_engine_plan

    full, _ = make_engine_plan(path, mem="64G", ctx=512)
    print(f"everything resident: {planlib.human(full.total_bytes)}; slot {planlib.human(full.slot_bytes)}")
    vocab = fmt.parse_manifest(path / fmt.MANIFEST_FILE).arch["vocab_size"]  # --dir may name another MoE
    prompt = [int(i) for i in np.random.default_rng(1).integers(0, vocab, 64)]
    if args.quality:
        quality(path, prompt, args.tokens, [1.0, 0.5, 0.25, 0.125])
        return
    rows = [run(path, None, False, prompt, args.tokens)]
    for frac in map(float, args.fractions.split(",")):
        mem = budget_for_slots(path, int(frac * EXPERTS * LAYERS))
        for prefetch in (False, True):
            rows.append(run(path, mem, prefetch, prompt, args.tokens))
    rows.append(run(path, None, False, prompt, args.tokens))  # again: the machine is shared, say how it moved
    cols = ("mem", "prefetch", "slots", "pinned_per_layer", "tok_s", "hit_rate", "bytes_per_token",
            "read_wait_ms_per_token", "misses", "predicted", "predicted_right", "prefetched", "prefetch_used")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(planlib.human(r[c]) if c in ("mem", "bytes_per_token") and r[c] else
                         f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
