"""What checking the dense block's CRC32Cs costs when a model opens.

For each model: ModelReader.read_dense_into (the engine's load of the dense block) with its per-tensor
check and with the check switched off, alternating, each read from disk (read_dense_into drops the
file's pages after reading, and the script drops them before); the CRC32C alone over the loaded
buffer; and the whole-tensor check a flash-resident tensor (an untied token embedding) gets when
ModelReader.dense_rows opens it (on the model's largest dense matrix when it has none on flash).
With --open, whole Engine.open calls too, checks on and off, which goes first alternating by round
(the second open of a pair ran faster, whichever it was).

    FIC_HOME=... PYTHONPATH=. python bench/bench_dense_check.py MODEL [MODEL ...] [--rounds 5] [--open]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

from flashinfer_cli import fmt, kernels
from flashinfer_cli.pull import resolve_model


def _drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(fn, cpu: list[float] | None = None) -> float:
    """Wall seconds of fn(); its CPU seconds (user + system) appended to `cpu` (steadier than wall
    time on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def _median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ({min(xs) * 1000:.1f}-{max(xs) * 1000:.1f})"


def bench(model: str, rounds: int) -> None:
    path = resolve_model(model, auto_pull=False)
    with fmt.ModelReader(path) as r:
        man = r.manifest
        layout, total = fmt.dense_pack(man)
        buf = kernels.aligned_buffer(total, huge=True)
        checked, unchecked, crc_only, on_flash = [], [], [], []
        cpu = {True: [], False: []}
        real_check = r._check_dense
        for _ in range(rounds):
            for check, out in ((True, checked), (False, unchecked)):
                r._check_dense = real_check if check else (lambda name, data: None)
                _drop(r.dense_path)
                out.append(_timed(lambda: r.read_dense_into(buf), cpu[check]))
            r._check_dense = real_check
            crc_only.append(_timed(lambda: [kernels.crc32c(buf[off:off + n]) for _, off, n in layout]))
            big = next(iter(fmt.flash_resident(man)), None) or \
                max((n for n in man.tensors if len(man.tensors[n]["shape"]) == 2),
                    key=lambda n: fmt._tensor_nbytes(man.tensors[n]))  # a stand-in for a tied model
            begin, end = r._dense_header[big]["data_offsets"]
            _drop(r.dense_path)
            on_flash.append(_timed(lambda: r._check_on_flash(big, r._dense_data_start + begin, end - begin)))
        mb = total / 1e6
        print(f"{man.name}: dense block {mb:.1f} MB in {len(layout)} tensors (resident), {rounds} rounds, "
              "ms median (min-max)")
        print(f"  read_dense_into, checked     wall {_median_ms(checked)}, CPU {_median_ms(cpu[True])}")
        print(f"  read_dense_into, unchecked   wall {_median_ms(unchecked)}, CPU {_median_ms(cpu[False])}")
        extra = statistics.median(checked) - statistics.median(unchecked)
        extra_cpu = statistics.median(cpu[True]) - statistics.median(cpu[False])
        print(f"  difference                   wall {extra * 1000:+.1f} ms ({extra / statistics.median(unchecked):+.0%}), "
              f"CPU {extra_cpu * 1000:+.1f} ms")
        print(f"  CRC32C alone, buffer in RAM  {_median_ms(crc_only)} "
              f"({mb / 1000 / statistics.median(crc_only):.1f} GB/s)")
        big_mb = (end - begin) / 1e6
        where = "on flash" if big in fmt.flash_resident(man) else "stand-in"
        print(f"  whole-tensor check of {big} ({where}, {big_mb:.1f} MB, from disk)  {_median_ms(on_flash)} "
              f"({big_mb / 1000 / statistics.median(on_flash):.2f} GB/s)")


def bench_open(model: str, rounds: int) -> None:
    """Engine.open with the dense checks on and off (both switched off on the class)."""
    from flashinfer_cli.engine import Engine

    real = fmt.ModelReader._check_dense, fmt.ModelReader._check_on_flash
    off = (lambda self, name, data: None), (lambda self, name, offset, n: None)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for check in ((True, False) if i % 2 else (False, True)):
            fmt.ModelReader._check_dense, fmt.ModelReader._check_on_flash = real if check else off
            t0 = time.perf_counter()
            Engine.open(model).close()
            times[check].append(time.perf_counter() - t0)
            gc.collect()  # the last engine's buffers go before the next open, not during it
    fmt.ModelReader._check_dense, fmt.ModelReader._check_on_flash = real
    print(f"  Engine.open, checked         {_median_ms(times[True])}")
    print(f"  Engine.open, unchecked       {_median_ms(times[False])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--open", action="store_true", help="time whole Engine.open calls too")
    args = ap.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, kernels {kernels.best_impl()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for m in args.models:
        bench(m, args.rounds)
        if args.open:
            bench_open(m, args.rounds)


if __name__ == "__main__":
    main()
