"""Domain balance of the sketch predictor (issue 7): today's calibration text against the balanced
one, the neuron target against the expert target, q8_0 against f16, on held-out windows of each
domain (calibrate.held_out_windows: the shipped prose texts, held-out stdlib sources, the model's
answers to held-out chat instructions).

One forward pass per recipe feeds every target's statistics; the held-out rows are collected once
and every predictor is scored on the same rows. With --write DIR, each variant's predictor is also
stored in a copy of the model (DIR/NAME-VARIANT) for `fic bench --quality --policy sketch`.

    python bench/balance_eval.py MODEL_DIR --tokens 8000 [--write DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict

from flashinfer_cli import calibrate as cal
from flashinfer_cli.engine import Engine
from flashinfer_cli.router import Predictor


def legacy_windows(engine, cfg: cal.CalibrationConfig) -> list[tuple[str, list[int]]]:
    """The calibration text before this change (main at 3b47ee1, calibrate.token_windows): the
    model's samples (cfg.sample_share), then standard-library files one after the other, source
    and docstrings alternately, each read whole, until cfg.tokens."""
    windows = []
    n_samples = max(1, int(round(cfg.tokens * cfg.sample_share / max(1, cfg.sample_tokens))))
    total = 0
    for domain, ids in cal.own_samples(engine, list(cal.INSTRUCTIONS[:min(n_samples, len(cal.INSTRUCTIONS))]),
                                       cfg.seed, cfg.sample_tokens):
        w = ids[:min(cfg.window, cfg.tokens - total)]
        if w:
            windows.append((domain, w))
            total += len(w)
    for domain, text in cal.stdlib_documents(cfg.seed):
        ids = engine.tokenize(text)
        for i in range(0, len(ids) - 16, cfg.window):
            if total >= cfg.tokens:
                return windows
            w = ids[i:i + min(cfg.window, cfg.tokens - total)]
            windows.append((domain, w))
            total += len(w)
    return windows


def collect(engine, windows, weights: dict[str, float]) -> dict[str, list[cal.RidgeStats]]:
    """Ridge statistics of both targets over the windows, each window weighted by its domain."""
    m = engine.model
    c = m.config
    off, n_exp = m.scorer.offsets, m.arena.experts_per_layer
    stats = {"neuron": [cal.RidgeStats(c.d_model, int(m.scorer.d_ff)) for _ in range(c.n_layers)],
             "expert": [cal.RidgeStats(c.d_model, int(n_exp[l])) for l in range(c.n_layers)]}
    for domain, ids in windows:
        for layer, x, y in cal.activation_rows(engine, [ids]):
            stats["neuron"][layer].add(x, y, weights[domain])
            stats["expert"][layer].add(x, cal.expert_norms(y, off[layer], int(n_exp[layer])), weights[domain])
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--ridge", type=float, nargs="+", default=[0.1])
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--write", default=None, help="directory for copies of the model with each predictor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    name = os.path.basename(os.path.normpath(args.model))
    engine = Engine.open(args.model, ctx=256, auto_pull=False)
    m = engine.model
    off, n_exp = m.scorer.offsets, m.arena.experts_per_layer
    man = m.reader.manifest
    n_neurons = [[e.n_neurons for e in layer] for layer in man.experts]
    out = {"model": name, "tokens": args.tokens, "rank": args.rank, "recipes": {}, "variants": []}

    t = time.perf_counter()
    held = cal.held_out_windows(engine, 0, 256, args.held_out)
    rows = {d: list(cal.activation_rows(engine, wins)) for d, wins in held.items()}
    held_tokens = {d: sum(len(w) for w in wins) for d, wins in held.items()}
    out["held_out_seconds"] = time.perf_counter() - t

    fits = {}
    for recipe in ("today", "balanced"):
        cfg = cal.CalibrationConfig(tokens=args.tokens, rank=args.rank)
        t = time.perf_counter()
        windows = legacy_windows(engine, cfg) if recipe == "today" else cal.token_windows(engine, cfg)
        t_text = time.perf_counter() - t
        tokens = cal.domain_tokens(windows)
        weights = dict.fromkeys(cal.DOMAINS, 1.0) if recipe == "today" else cal.domain_weights(cfg, tokens)
        t = time.perf_counter()
        stats = collect(engine, windows, weights)
        t_fwd = time.perf_counter() - t
        out["recipes"][recipe] = {"domain_tokens": tokens, "weights": weights, "text_seconds": t_text,
                                  "forward_seconds": t_fwd}
        print(recipe, out["recipes"][recipe], flush=True)
        for target in ("neuron", "expert") if recipe == "balanced" else ("neuron",):
            for ridge in args.ridge:
                t = time.perf_counter()
                fits[(recipe, target, ridge)] = [s.fit(args.rank, ridge) for s in stats[target]]
                out["recipes"][recipe][f"fit_seconds_{target}_{ridge:g}"] = time.perf_counter() - t
        del stats

    for (recipe, target, ridge), fit in fits.items():
        for fmt_name in ("q8_0", "f16") if (recipe, target) == ("balanced", "neuron") else ("q8_0",):
            tensors = cal.predictor_tensors(fit, fmt_name)
            pred = Predictor(tensors, m.config.n_layers, target=target, n_neurons=n_neurons)
            quality = [cal.evaluate_rows(pred, d, rows[d], off, n_exp, held_tokens[d]) for d in rows]
            label = f"{recipe}-{target}-r{ridge:g}-{fmt_name}"
            v = {"label": label, "recipe": recipe, "target": target, "ridge": ridge, "fmt": fmt_name,
                 "bytes": cal.tensor_bytes(tensors), "held_out": [asdict(q) for q in quality]}
            out["variants"].append(v)
            print(label, v["bytes"], " | ".join(f"{q.domain} R2 {q.r2:.3f} R2e {q.r2_expert:.3f} mass "
                                               + "/".join(f"{x:.4f}" for x in q.mass_recall.values())
                                               for q in quality), flush=True)
            if args.write:
                dest = os.path.join(args.write, f"{name}-{label}")
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                shutil.copytree(args.model, dest)
                meta = {"rank": args.rank, "fmt": fmt_name,
                        "calibration": {"seed": 0, "tokens": args.tokens, "ridge": ridge, "recipe": recipe}}
                if target != "neuron":
                    meta["target"] = target
                cal.fmt.write_predictor(dest, tensors, meta)
    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
