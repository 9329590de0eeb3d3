"""Teacher-forced argmax agreement of fic and llama.cpp on a 1-bit GGUF (tests/_q1gguf.py's Bonsai shapes).

Usage: FIC_HOME=... python bench/q1_bonsai_argmax.py MODEL [--positions 64] [--first-decode 8] [--threads 2]

MODEL is a fic model pulled from a .gguf (fic pull FILE.gguf); llama.cpp (llama-cpp-python) loads that
same file. The same random ids (no special tokens) go through both engines twice: as one prefill batch
(logits of every position) and teacher-forced decode (the first --first-decode ids as a batch, then
one id per step). Prints, per path, the positions whose argmax agrees, the logits' max |diff| and
smallest cosine, and llama.cpp's top-2 margin at every disagreement (a near-tie or not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_cli import Engine, kernels, peer  # noqa: E402
from flashinfer_cli.pull import resolve_model  # noqa: E402
from flashinfer_cli.store import Store, fic_home  # noqa: E402


def llama_logits(gguf: Path, ids: list[int], first: int, threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=len(ids) + 8, n_batch=max(first, 1), logits_all=True, type_k=0, type_v=0,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(ids[:first])
    for t in ids[first:]:
        llm.eval([t])
    rows = np.array(llm.scores[:len(ids)])
    llm.close()
    return rows


def report(name: str, fic: np.ndarray, ref: np.ndarray) -> None:
    cos = (fic * ref).sum(1) / np.linalg.norm(fic, axis=1) / np.linalg.norm(ref, axis=1)
    agree = fic.argmax(1) == ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flips = ", ".join(f"pos {i}: margin {margin[i]:.3f}" for i in np.where(~agree)[0])
    print(f"{name}: argmax agrees at {agree.sum()} of {len(agree)} positions; max |diff| {np.abs(fic - ref).max():.3f} "
          f"(max |logit| {np.abs(ref).max():.1f}); min cosine {cos.min():.5f}; median margin {np.median(margin):.3f}"
          + (f"; disagreements at {flips}" if flips else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--first-decode", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    path = resolve_model(args.model)
    gguf = peer.source_gguf(path, [Store().cache_dir, fic_home() / "cache"])
    kernels.set_threads(args.threads)
    engine = Engine.open(str(path), ctx=args.positions + 8, kv_dtype="f32", threads=args.threads)
    vocab = engine.model.cfg.vocab_size if hasattr(engine.model, "cfg") else None
    n_vocab = vocab or engine.forward([5]).shape[1]
    ids = [int(t) for t in np.random.default_rng(args.seed).integers(3, n_vocab, args.positions)]
    print(f"{path.name} on {gguf}: {args.positions} random ids, {args.threads} threads, fic kernels {kernels.best_impl()}, "
          f"load {peer.loadavg()}", flush=True)
    fic_pre = engine.forward(ids)
    report("prefill", fic_pre, llama_logits(gguf, ids, len(ids), args.threads))
    m = engine.model
    m.reset()
    m.forward(ids[:args.first_decode])
    fic_dec = np.stack([m.forward([t]) for t in ids[args.first_decode:]])
    ref_dec = llama_logits(gguf, ids, args.first_decode, args.threads)[args.first_decode:]
    report("decode", fic_dec, ref_dec)


if __name__ == "__main__":
    main()
