"""Decode attention: fic_attention over an fp16 KV cache against the numpy code path of
model.py's `_attend_one` (float32 cache), in the same run.

Usage: PYTHONPATH=. python bench/bench_attention.py [--reps 7] [--ctx 64 512 2048 4096] [--prefill 128]

One decode step's attention (t = 1, the query at position ctx - 1) for every layer of a model's
cache, one call per layer in layer order, so that (as in decode) each layer's K/V comes from
wherever the previous step left it: at 4096 positions the caches (fp16: 92 MB SmolLM2, 117 MB
Qwen2.5-1.5B) are far larger than the last-level cache. Figures are microseconds per layer, the
median over --reps passes of all layers (and the best pass), and the K/V read rate that implies
(fp16 bytes for fic; numpy reads twice as many float32 bytes). Only the attention itself is timed
(no RoPE, no cache write, no output projection) for both. The numpy path runs on as many BLAS
threads as numpy has (OpenBLAS's default: every core; on a loaded machine its spinning threads
made it ~100x slower here, so run with OPENBLAS_NUM_THREADS=1 for a single-thread baseline), in
both tables.

A second table times prefill attention (--prefill queries, default 128, ending at ctx) against
model.py `_attention`'s numpy code (a masked (kv, t*g, n) score matrix), one layer.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from flashinfer_cli import kernels as K

# name: (layers, n_heads, n_kv_heads, head_dim)
SHAPES = {"SmolLM2-135M": (30, 9, 3, 64), "Qwen2.5-1.5B": (28, 12, 2, 128), "syn20b": (55, 32, 4, 128)}


def numpy_decode(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n: int, scale: np.float32) -> np.ndarray:
    """model.py `_attend_one`'s attention, verbatim but for names: k_cache/v_cache are one layer
    of the (layers, ctx, kv, hd) float32 cache."""
    nkv, hd = k_cache.shape[1], k_cache.shape[2]
    nh = q.shape[0]
    qg = q.reshape(nkv, nh // nkv, hd)
    scores = np.matmul(qg, k_cache[:n].transpose(1, 2, 0))  # (kv, group, n)
    scores *= scale
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, v_cache[:n].transpose(1, 0, 2))  # (kv, group, hd)
    return out.reshape(-1)


def numpy_prefill(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, p0: int, scale: np.float32) -> np.ndarray:
    """model.py `_attention`'s attention part (after the cache write) for t = q.shape[0] queries."""
    t, nh, hd = q.shape
    nkv = k_cache.shape[1]
    n = p0 + t
    keys = k_cache[:n].transpose(1, 2, 0)
    vals = v_cache[:n].transpose(1, 0, 2)
    g = nh // nkv
    qg = q.reshape(t, nkv, g, hd).transpose(1, 0, 2, 3).reshape(nkv, t * g, hd)
    scores = np.matmul(qg, keys) * scale
    qpos = np.repeat(np.arange(p0, p0 + t), g)
    scores = np.where(np.arange(n)[None, :] <= qpos[:, None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, vals)
    return out.reshape(nkv, t, g, hd).transpose(1, 0, 2, 3).reshape(t, nh * hd)


def time_passes(fn, n_layers: int, reps: int) -> tuple[float, float, float]:
    """(median wall, best wall, median process CPU) microseconds per layer over reps passes of
    fn(layer) for every layer. CPU time counts every thread of the process (numpy's BLAS threads,
    fic's pool); on a loaded machine it says what the work cost where wall time says what it
    took."""
    fn(0)
    wall, cpu = [], []
    for _ in range(reps):
        c0, start = time.process_time(), time.perf_counter()
        for layer in range(n_layers):
            fn(layer)
        wall.append((time.perf_counter() - start) / n_layers * 1e6)
        cpu.append((time.process_time() - c0) / n_layers * 1e6)
    return float(np.median(wall)), min(wall), float(np.median(cpu))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ctx", type=int, nargs="+", default=[64, 512, 2048, 4096])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefill", type=int, default=128, help="queries of the prefill table (0: skip it)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    blas = f"BLAS {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"  # numpy's threads
    impls = K.available_impls()
    print(f"impls: {', '.join(impls)} (auto = {K.best_impl()})")
    print("| model | ctx | code | threads | us/layer median (best) | CPU us/layer | K/V GB/s | vs numpy |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (n_layers, nh, nkv, hd) in SHAPES.items():
        for ctx in args.ctx:
            k16 = rng.standard_normal((n_layers, ctx, nkv, hd)).astype(np.float16)
            v16 = rng.standard_normal((n_layers, ctx, nkv, hd)).astype(np.float16)
            k32, v32 = k16.astype(np.float32), v16.astype(np.float32)
            q = rng.standard_normal((n_layers, 1, nh, hd)).astype(np.float32)
            scale = np.float32(1.0 / np.sqrt(hd))
            kv_bytes16 = 2 * ctx * nkv * hd * 2
            out = np.empty((1, nh, hd), np.float32)
            K.set_threads(1)
            ref_np = numpy_decode(q[0, 0], k32[0], v32[0], ctx, scale)
            got = K.attention(q[0], k16[0], v16[0], ctx - 1, float(scale))
            assert np.allclose(got.reshape(-1), ref_np, atol=1e-4), "C and numpy disagree"
            med_np, best_np, cpu_np = time_passes(lambda i: numpy_decode(q[i, 0], k32[i], v32[i], ctx, scale),
                                                  n_layers, args.reps)
            print(f"| {name} | {ctx} | numpy f32 | {blas} | {med_np:.1f} ({best_np:.1f}) | {cpu_np:.1f} | "
                  f"{2 * kv_bytes16 / med_np / 1e3:.1f} | 1.00 |")
            for threads in args.threads:
                K.set_threads(threads)
                for impl in impls:
                    med, best, cpu = time_passes(
                        lambda i: K.attention(q[i], k16[i], v16[i], ctx - 1, float(scale), out=out, impl=impl),
                        n_layers, args.reps)
                    print(f"| {name} | {ctx} | fic {impl} | {threads} | {med:.1f} ({best:.1f}) | {cpu:.1f} | "
                          f"{kv_bytes16 / med / 1e3:.1f} | {med_np / med:.2f} |", flush=True)
            del k16, v16, k32, v32
    if args.prefill:
        print()
        print(f"Prefill: {args.prefill} queries at positions ctx - {args.prefill}..ctx - 1, one layer's cache")
        print("| model | ctx | code | threads | ms median (best) | CPU ms | vs numpy |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        t = args.prefill
        for name, (_, nh, nkv, hd) in SHAPES.items():
            for ctx in (512, 2048):
                k16 = rng.standard_normal((1, ctx, nkv, hd)).astype(np.float16)
                v16 = rng.standard_normal((1, ctx, nkv, hd)).astype(np.float16)
                k32, v32 = k16.astype(np.float32), v16.astype(np.float32)
                q = rng.standard_normal((1, t, nh, hd)).astype(np.float32)
                scale = np.float32(1.0 / np.sqrt(hd))
                K.set_threads(1)
                got = K.attention(q[0], k16[0], v16[0], ctx - t, float(scale))
                want = numpy_prefill(q[0], k32[0], v32[0], ctx - t, scale)
                assert np.allclose(got.reshape(t, -1), want, atol=1e-4), "C and numpy disagree"
                med_np, best_np, cpu_np = time_passes(lambda i: numpy_prefill(q[0], k32[0], v32[0], ctx - t, scale),
                                                      1, args.reps)
                print(f"| {name} | {ctx} | numpy f32 | {blas} | {med_np / 1e3:.2f} ({best_np / 1e3:.2f}) | "
                      f"{cpu_np / 1e3:.2f} | 1.00 |")
                for threads in args.threads:
                    K.set_threads(threads)
                    med, best, cpu = time_passes(lambda i: K.attention(q[0], k16[0], v16[0], ctx - t, float(scale)),
                                                 1, args.reps)
                    print(f"| {name} | {ctx} | fic auto | {threads} | {med / 1e3:.2f} ({best / 1e3:.2f}) | "
                          f"{cpu / 1e3:.2f} | {med_np / med:.2f} |", flush=True)


if __name__ == "__main__":
    main()
