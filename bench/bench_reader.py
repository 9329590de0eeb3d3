"""Expert-bundle read throughput of kernels.Reader against a sequential O_DIRECT read.

Bundles of 64 KiB to 1 MiB (4 KiB multiples) at random 4 KiB-aligned offsets of a multi-GB file,
read in batches (one batch ~ one layer's missing experts), with a cold page cache before each run.

    python bench/bench_reader.py [--size-gib 4] [--read-gib 2] [--rounds 3] [--dir bench/out] [--keep]
    python bench/bench_reader.py --crc-only     # just fic_crc32c's speed on 64 KiB-1 MiB buffers
    python bench/bench_reader.py --overlap-only [--compute-threads 1]
                                                # Reader.submit + a matvec loop + wait: read time hidden

Needs root for `echo 3 > /proc/sys/vm/drop_caches` (without it the figures say "warm?").
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from flashinfer_cli import kernels
from flashinfer_cli.kernels import Reader, ReadRequest, aligned_buffer, crc32c

ALIGN = 4096
MIB = 1 << 20
GIB = 1 << 30
BATCH = 64  # bundles per Reader.read call


@dataclass(frozen=True)
class Config:
    name: str
    backend: str
    queue_depth: int = 32
    n_threads: int = 1
    check_crc: bool = False


def drop_caches() -> bool:
    """Empty the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_file(path: Path, size: int) -> None:
    """size bytes of random data (incompressible, so no storage layer can cheat)."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(0)
    chunk = 64 * MIB
    with open(path, "wb") as f:
        for start in range(0, size, chunk):
            f.write(rng.integers(0, 256, min(chunk, size - start), dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())


def bundle_plan(file_size: int, total: int, seed: int = 1) -> list[tuple[int, int]]:
    """(offset, length) bundles, 64 KiB..1 MiB, random aligned offsets, summing to ~total bytes."""
    rng = random.Random(seed)
    plan, read = [], 0
    while read < total:
        length = ALIGN * rng.randrange(16, 257)
        offset = ALIGN * rng.randrange(0, (file_size - length) // ALIGN + 1)
        plan.append((offset, length))
        read += length
    return plan


def run_bundles(path: Path, cfg: Config, plan: list[tuple[int, int]], buf: np.ndarray,
                crcs: list[int] | None) -> float:
    """Seconds to read every bundle of plan in batches of BATCH."""
    with Reader(path, backend=cfg.backend, queue_depth=cfg.queue_depth, n_threads=cfg.n_threads) as reader:
        assert reader.direct, "the benchmark file must be on a filesystem that takes O_DIRECT"
        start = time.perf_counter()
        for b in range(0, len(plan), BATCH):
            requests, pos = [], 0
            for i, (offset, length) in enumerate(plan[b:b + BATCH], start=b):
                crc = crcs[i] if crcs is not None else None
                requests.append(ReadRequest(offset, length, buf[pos:pos + length], crc))
                pos += length
            reader.read_checked(requests)
        return time.perf_counter() - start


def bundle_crcs(path: Path, plan: list[tuple[int, int]]) -> list[int]:
    """Expected CRC32C of each bundle, from plain buffered Python reads."""
    with open(path, "rb") as f:
        return [crc32c(os.pread(f.fileno(), length, offset)) for offset, length in plan]


def run_sequential_reader(path: Path, size: int, buf: np.ndarray, queue_depth: int) -> float:
    """Seconds to read the whole file with the reader, 1 MiB requests, in order."""
    with Reader(path, backend="io_uring", queue_depth=queue_depth) as reader:
        start = time.perf_counter()
        for base in range(0, size, BATCH * MIB):
            n = min(BATCH, (size - base) // MIB)
            reader.read_checked([ReadRequest(base + i * MIB, MIB, buf[i * MIB:(i + 1) * MIB]) for i in range(n)])
        return time.perf_counter() - start


def run_sequential_plain(path: Path, size: int, buf: np.ndarray) -> float:
    """Seconds for a plain single-threaded O_DIRECT read loop, 1 MiB at a time (no fic code).
    It cycles through the same buffer as the other runs: reusing one 1 MiB buffer reads measurably
    faster on this VM, which would flatter the baseline."""
    views = [memoryview(buf)[i:i + MIB] for i in range(0, len(buf), MIB)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        for offset in range(0, size, MIB):
            if os.preadv(fd, [views[(offset // MIB) % len(views)]], offset) != MIB:
                raise OSError(f"short read at {offset}")
        return time.perf_counter() - start
    finally:
        os.close(fd)


def crc_rates(repeats: int = 9) -> None:
    """Print fic_crc32c's (and the table reference's) GB/s on bundle-sized buffers in cache, best
    of `repeats` timings. Each call goes through cffi, whose per-call cost is printed too."""
    rng = np.random.default_rng(0)
    buf = aligned_buffer(MIB)
    buf[:] = rng.integers(0, 256, MIB, dtype=np.uint8)

    def best(data: np.ndarray, impl: str, calls: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                crc32c(data, impl=impl)
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    print(f"# CRC32C, best of {repeats}; cffi call on an empty buffer: {best(buf[:0], 'auto', 10_000) * 1e6:.2f} us")
    print("| buffer | fic_crc32c GB/s | fic_crc32c_ref GB/s |")
    print("| ---: | ---: | ---: |")
    for size in (64 << 10, 256 << 10, MIB):
        hw = best(buf[:size], "auto", max(1, (64 * MIB) // size))
        ref = best(buf[:size], "ref", max(1, (8 * MIB) // size))
        print(f"| {size >> 10} KiB | {size / hw / 1e9:.1f} | {size / ref / 1e9:.2f} |")


# ---- overlap: read layer l+1's bundles while layer l computes ---------------------------------

def batches(plan: list[tuple[int, int]], buf: np.ndarray, crcs: list[int]) -> list[list[ReadRequest]]:
    out = []
    for b in range(0, len(plan), BATCH):
        requests, pos = [], 0
        for i, (offset, length) in enumerate(plan[b:b + BATCH], start=b):
            requests.append(ReadRequest(offset, length, buf[pos:pos + length], crcs[i]))
            pos += length
        out.append(requests)
    return out


def overlap_runs(path: Path, plan: list[tuple[int, int]], buf: np.ndarray, crcs: list[int], rounds: int,
                 backend: str, queue_depth: int) -> None:
    """Per batch of BATCH bundles (CRC checked): read alone, compute alone, and submit + compute +
    wait. The compute is Q4_0 4096x4096 matvecs (fic's kernel, GIL released), as many as take about
    as long as one batch's read, so that perfect overlap would hide all of the read."""
    groups = batches(plan, buf, crcs)
    rng = np.random.default_rng(3)
    w = kernels.quantize(rng.standard_normal((4096, 4096), dtype=np.float32), "q4_0")
    x = rng.standard_normal(4096, dtype=np.float32)
    y = np.empty(4096, dtype=np.float32)

    def compute(n: int) -> None:
        for _ in range(n):
            kernels.matvec(w, x, out=y)

    with Reader(path, backend=backend, queue_depth=queue_depth) as reader:
        assert reader.direct, "the benchmark file must be on a filesystem that takes O_DIRECT"

        def read_only() -> float:
            start = time.perf_counter()
            for g in groups:
                reader.read_checked(g)
            return time.perf_counter() - start

        def compute_only(n: int) -> float:
            start = time.perf_counter()
            for _ in groups:
                compute(n)
            return time.perf_counter() - start

        def overlapped(n: int) -> float:
            start = time.perf_counter()
            for g in groups:
                pending = reader.submit(g)
                compute(n)  # layer l's FFN while layer l+1's bundles come in
                pending.wait_checked()
            return time.perf_counter() - start

        cold = drop_caches()
        t_read = read_only()
        t_one = min(compute_only(1) for _ in range(3)) / len(groups)
        n_mv = max(1, round(t_read / len(groups) / t_one))
        reads, comps, overs = [], [], []
        for _ in range(rounds):  # interleaved, medians: the shared disk and cores drift
            cold &= drop_caches()
            reads.append(read_only())
            comps.append(compute_only(n_mv))
            cold &= drop_caches()
            overs.append(overlapped(n_mv))
    tr, tc, to = (statistics.median(v) for v in (reads, comps, overs))
    hidden = (tr + tc - to) / tr
    total = sum(length for _, length in plan)
    label = f"io_uring QD{queue_depth}" if backend == "io_uring" else "pread 4 threads"
    print(f"\n# overlap: {label}, {len(plan)} bundles ({total / GIB:.2f} GiB, CRC checked) in "
          f"{len(groups)} batches of {BATCH}; compute {n_mv} Q4_0 4096x4096 matvecs per batch on "
          f"{kernels.get_threads()} kernel threads; {rounds} rounds, medians; page cache "
          f"{'dropped' if cold else 'NOT dropped (not root)'}")
    print("| run | s (median) | s (min-max) | ms per batch |")
    print("| --- | ---: | ---: | ---: |")
    for name, v in (("read only (Reader.read)", reads), ("compute only", comps),
                    ("submit + compute + wait", overs)):
        print(f"| {name} | {statistics.median(v):.3f} | {min(v):.3f}-{max(v):.3f} | "
              f"{statistics.median(v) / len(groups) * 1e3:.2f} |")
    print(f"\nread time hidden behind compute: {hidden:.0%} "
          f"((read + compute - overlapped) / read = ({tr:.3f} + {tc:.3f} - {to:.3f}) / {tr:.3f}); "
          f"overlapped vs the slower of the two alone: {to / max(tr, tc):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="size of the test file")
    ap.add_argument("--read-gib", type=float, default=2.0, help="bytes of bundles read per run")
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every run")
    ap.add_argument("--keep", action="store_true", help="keep the test file")
    ap.add_argument("--crc-only", action="store_true", help="only time fic_crc32c, no file")
    ap.add_argument("--overlap-only", action="store_true", help="only the submit/compute/wait overlap runs")
    ap.add_argument("--compute-threads", type=int, default=0, help="kernel threads for the overlap compute "
                    "(default: all cores)")
    args = ap.parse_args()
    if args.compute_threads:
        kernels.set_threads(args.compute_threads)
    print(f"# {platform.node()} {platform.machine()} Linux {platform.release()}, {os.cpu_count()} cpus")
    if not args.overlap_only:
        crc_rates()
    if args.crc_only:
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "reader-bench.bin"
    size = int(args.size_gib * GIB) // MIB * MIB
    print(f"# writing {size / GIB:.1f} GiB of random bytes to {path}")
    make_file(path, size)
    buf = aligned_buffer(BATCH * MIB)
    plan = bundle_plan(size, int(args.read_gib * GIB))
    total = sum(length for _, length in plan)
    crcs = bundle_crcs(path, plan)
    if args.overlap_only:
        try:
            for backend, qd in (("io_uring", 32), ("pread", 4)):
                overlap_runs(path, plan, buf, crcs, args.rounds, backend, qd)
        finally:
            if not args.keep:
                path.unlink()
        return
    runs = sequential_runs(path, size, buf) + bundle_runs(path, plan, total, buf, crcs)
    # The disk's speed drifts over minutes (a shared virtual disk): interleave rounds, keep medians.
    secs: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cold = True
    try:
        for _ in range(args.rounds):
            for name, _, run in runs:
                cold &= drop_caches()
                secs[name].append(run())
    finally:
        if not args.keep:
            path.unlink()
    print_table(runs, secs, cold, len(plan), total)


Run = tuple[str, int, Callable[[], float]]


def sequential_runs(path: Path, size: int, buf: np.ndarray) -> list[Run]:
    runs: list[Run] = [("sequential, plain O_DIRECT loop, 1 MiB, QD1", size,
                        lambda: run_sequential_plain(path, size, buf))]
    for qd in (1, 8):
        runs.append((f"sequential, reader io_uring, 1 MiB, QD{qd}", size,
                     lambda qd=qd: run_sequential_reader(path, size, buf, qd)))
    return runs


def bundle_runs(path: Path, plan: list[tuple[int, int]], total: int, buf: np.ndarray, crcs: list[int]) -> list[Run]:
    configs = [Config("io_uring QD1", "io_uring", 1), Config("io_uring QD8", "io_uring", 8),
               Config("io_uring QD32", "io_uring", 32), Config("pread 1 thread", "pread", n_threads=1),
               Config("pread 4 threads", "pread", n_threads=4),
               Config("io_uring QD8 + CRC check", "io_uring", 8, check_crc=True),
               Config("io_uring QD32 + CRC check", "io_uring", 32, check_crc=True),
               Config("pread 4 threads + CRC check", "pread", n_threads=4, check_crc=True)]
    return [(f"random bundles 64K-1M, {cfg.name}", total,
             lambda cfg=cfg: run_bundles(path, cfg, plan, buf, crcs if cfg.check_crc else None))
            for cfg in configs]


def print_table(runs: list[Run], secs: dict[str, list[float]], cold: bool, n_bundles: int, total: int) -> None:
    rate = {name: n / statistics.median(secs[name]) / 1e9 for name, n, _ in runs}
    seq_best = max(r for name, r in rate.items() if name.startswith("sequential"))
    n_rounds = len(next(iter(secs.values())))
    print(f"\nbundles: {n_bundles} ({total / GIB:.2f} GiB) in batches of {BATCH}; {n_rounds} interleaved rounds; "
          f"page cache {'dropped before each run' if cold else 'NOT dropped (not root): warm?'}\n")
    print("| run | GiB per run | GB/s (median) | GB/s (min-max) | vs best sequential |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, n, _ in runs:
        lo, hi = n / max(secs[name]) / 1e9, n / min(secs[name]) / 1e9
        print(f"| {name} | {n / GIB:.2f} | {rate[name]:.3f} | {lo:.2f}-{hi:.2f} | {rate[name] / seq_best:.0%} |")


if __name__ == "__main__":
    main()
