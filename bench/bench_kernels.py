"""Kernel throughput against the machine's memory read bandwidth.

Usage: PYTHONPATH=. python bench/bench_kernels.py [--quick]

Bandwidth: the best of two read tests. (1) numpy reductions (float32 sum, float32 max, int64 xor)
over a 2 GiB huge-page buffer, split across 1 or 2 Python threads (numpy releases the GIL inside
reductions). (2) fic's own f32 matvec (best implementation) streaming 512 MiB of 4096 x 4096
float32 matrices: one FMA per 4 bytes, a plain read, and here faster than numpy's reductions
(which top out near 34 GB/s a thread). Taking the larger makes the % column strict.

Kernels: every format x implementation, on 4096 x 4096 matrices (Q4_K and Q6_K, which fic reads but
does not make, as random valid blocks: the bytes' values do not change the work), and q1_0r32, Q1_0 in
the r32 layout models use for their resident matrices (fic.h; no accum_rows). matvec cycles over enough copies
of the matrix to fill >= 512 MiB, so the weights come from DRAM as in decode (one matrix alone
would sit in L3), each a C call with its arguments converted once (K.PreparedMatvec), as a decode
step makes it: `K.matvec`'s checks cost ~15 us a call, 10% of a 2-thread Q1_0 matvec; accum_rows
streams the same copies with every row active. matmul runs T = 128 tokens through one matrix; its
figure is weight bytes over time, so its per-token cost is compared to one matvec in the last column.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from flashinfer_cli import kernels as K

M = K_DIM = 4096
T = 128
STREAM_BYTES = 512 << 20
BW_BYTES = 2 << 30


def _threaded(fn, parts: list[np.ndarray]) -> float:
    """Seconds to run fn over every part, one Python thread per part."""
    threads = [threading.Thread(target=fn, args=(p,)) for p in parts]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - start


def numpy_bandwidth(n_threads: int, reps: int = 3) -> float:
    """Best read bandwidth in GB/s of three numpy reductions over a huge-page buffer."""
    buf = K.aligned_buffer(BW_BYTES, huge=True)
    buf[:] = 1  # touch every page
    best = 0.0
    for view, fn in ((buf.view(np.float32), np.sum), (buf.view(np.float32), np.max),
                     (buf.view(np.int64), np.bitwise_xor.reduce)):
        parts = np.array_split(view, n_threads)
        for _ in range(reps):
            best = max(best, BW_BYTES / _threaded(fn, parts) / 1e9)
    return best


def stream_copies(qt: K.QTensor) -> list[K.QTensor]:
    """Copies of qt in one huge-page buffer, together at least STREAM_BYTES."""
    n = max(2, -(-STREAM_BYTES // qt.nbytes))
    buf = K.aligned_buffer(n * qt.nbytes, huge=True)
    copies = []
    for i in range(n):
        view = buf[i * qt.nbytes:(i + 1) * qt.nbytes]
        view[:] = qt.data
        copies.append(K.QTensor(qt.fmt, qt.shape, view))
    return copies


def time_matvec(copies: list[K.QTensor], x: np.ndarray, impl: str, passes: int) -> float:
    """Best seconds per matvec over `passes` sweeps of all copies, each a C call prepared once
    (K.PreparedMatvec: a decode step's cost, without K.matvec's per-call checks)."""
    y = np.empty(copies[0].shape[0], dtype=np.float32)
    ws = K.aligned_buffer(K.lib.fic_workspace_bytes(K.get_threads(), 1, copies[0].shape[1], 0, 0))
    calls = [K.PreparedMatvec(qt, x, y, impl=impl, workspace=ws) for qt in copies]
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best


def time_accum(copies: list[K.QTensor], impl: str, passes: int) -> float:
    """Best seconds per accum_rows (all rows active) over `passes` sweeps of all copies."""
    n_rows, k = copies[0].shape
    a = np.full(n_rows, 1e-3, dtype=np.float32)
    y = np.zeros(k, dtype=np.float32)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for qt in copies:
            K.accum_rows(qt, a, y, impl=impl)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best


def time_matmul(qt: K.QTensor, xs: np.ndarray, impl: str, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        K.matmul(qt, xs, impl=impl)
        best = min(best, time.perf_counter() - start)
    return best


Timings = dict[tuple[str, str, int], tuple[float, float, float]]  # (fmt, impl, threads) -> (matvec, accum, matmul) s


def measure_bandwidth(w: np.ndarray, x: np.ndarray) -> tuple[dict[int, float], dict[int, float]]:
    """GB/s per thread count: numpy reductions, and fic's f32 matvec stream."""
    bw_numpy = {n: numpy_bandwidth(n) for n in (1, 2)}
    f32_copies = stream_copies(K.quantize(w, "f32"))
    bw_f32 = {}
    for n in (1, 2):
        K.set_threads(n)
        bw_f32[n] = f32_copies[0].nbytes / time_matvec(f32_copies, x, K.best_impl(), passes=5) / 1e9
    return bw_numpy, bw_f32


def make_weights(w: np.ndarray, fmt: str, rng: np.random.Generator) -> K.QTensor:
    """w in fmt; for the read-only K-quants, random bytes with finite, small fp16 scales; for a layout
    (q1_0r32), its format's matrix repacked."""
    if fmt in K.LAYOUTS:
        return K.q1r32_repack(K.quantize(w, K.LAYOUT_OF[fmt]))
    if fmt in K.QUANTIZABLE:
        return K.quantize(w, fmt)
    m, k = w.shape
    data = rng.integers(0, 256, m * K.row_bytes(fmt, k), dtype=np.uint8)
    blocks = data.reshape(-1, K.block_bytes(fmt))
    for off in {"q4_k": (0, 2), "q6_k": (K.block_bytes(fmt) - 2,)}[fmt]:  # d (and dmin) of each block
        blocks[:, off:off + 2] = rng.uniform(1e-3, 4e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return K.QTensor(fmt, (m, k), data)


def measure_kernels(w: np.ndarray, x: np.ndarray, xs: np.ndarray, formats: list[str], quick: bool,
                    with_ref_matmul: bool) -> Timings:
    out: Timings = {}
    for fmt in formats:
        qt = make_weights(w, fmt, np.random.default_rng(1))
        copies = stream_copies(qt)
        for impl in K.available_impls():
            fast = impl != "ref"
            for n_threads in (1, 2):
                K.set_threads(n_threads)
                passes = 5 if fast and not quick else 1
                tv = time_matvec(copies if fast else copies[:4], x, impl, passes)
                # accum_rows reads rows of the transpose: a layout of 32 rows side by side has none
                ta = float("nan") if fmt in K.LAYOUTS else time_accum(copies if fast else copies[:4], impl, passes)
                tm = float("nan")
                if fast or with_ref_matmul:
                    tm = time_matmul(qt, xs, impl, reps=3 if fast and not quick else 1)
                out[(fmt, impl, n_threads)] = (tv, ta, tm)
        del copies
    return out


def print_table(bw: dict[int, float], timings: Timings, nbytes: dict[str, int]) -> None:
    print("| format | impl | threads | matvec GB/s | % of bandwidth | matvec us | accum_rows GB/s | "
          f"matmul T={T} GB/s | matmul us/token | matvec / (matmul per token) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (fmt, impl, n_threads), (tv, ta, tm) in timings.items():
        nb = nbytes[fmt]
        gbs = nb / tv / 1e9
        mm = "- | - | -" if np.isnan(tm) else f"{nb / tm / 1e9:.2f} | {tm / T * 1e6:.1f} | {tv / (tm / T):.1f}x"
        print(f"| {fmt} | {impl} | {n_threads} | {gbs:.1f} | {100 * gbs / bw[n_threads]:.0f}% | "
              f"{tv * 1e6:.0f} | {'-' if not np.isfinite(ta) else f'{nb / ta / 1e9:.1f}'} | {mm} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip the reference matmul")
    ap.add_argument("--formats", default=",".join([*K.FORMATS, *K.LAYOUTS]))
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat everything and keep each figure's best: other processes on a shared "
                         "machine only ever slow a measurement down")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((M, K_DIM), dtype=np.float32)
    x = rng.standard_normal(K_DIM, dtype=np.float32)
    xs = rng.standard_normal((T, K_DIM), dtype=np.float32)
    formats = args.formats.split(",")
    nbytes = {fmt: M * K.row_bytes(fmt, K_DIM) for fmt in formats}

    bw_numpy: dict[int, float] = {1: 0.0, 2: 0.0}
    bw_f32: dict[int, float] = {1: 0.0, 2: 0.0}
    timings: Timings = {}
    for r in range(args.rounds):
        bn, bf = measure_bandwidth(w, x)
        bw_numpy = {n: max(bw_numpy[n], bn[n]) for n in (1, 2)}
        bw_f32 = {n: max(bw_f32[n], bf[n]) for n in (1, 2)}
        t = measure_kernels(w, x, xs, formats, args.quick, with_ref_matmul=r == 0 and not args.quick)
        timings = {key: tuple(np.fmin(timings.get(key, (np.inf, np.inf, np.nan)), t[key])) for key in t}
    bw = {n: max(bw_numpy[n], bw_f32[n]) for n in (1, 2)}
    for n in (1, 2):
        print(f"memory read bandwidth, {n} thread(s): {bw[n]:.1f} GB/s "
              f"(numpy reductions {bw_numpy[n]:.1f}, f32 matvec stream {bw_f32[n]:.1f})")
    print(f"(best of {args.rounds} rounds per figure)\n")
    print_table(bw, timings, nbytes)


if __name__ == "__main__":
    main()
