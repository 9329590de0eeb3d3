"""Where a fic decode step's time goes: inside C calls (every function of the compiled module,
timed through a proxy of kernels.lib) against the Python/numpy between them, at a context depth.

    PYTHONPATH=. python bench/profile_decode.py --model smollm2-135m [--depth 2000] [--decode 64]
        [--threads 2] [--rounds 3] [--path fused|numpy]

The step time is measured without the proxy; the C time with it (the proxy adds about 0.3 us a
call, counted as Python). Rounds: the fastest is shown (a shared machine only ever slows a run).
--python-only: the step with the hot kernels replaced by calls that return at once (their outputs
are garbage, the control flow the same for a dense model): what the Python between them costs.
--clock thread: the calling thread's CPU time instead of wall time, so a loaded machine's waits for a
core do not count: the Python figure is then the CPU the interpreter spends per step (the kernels'
figure is only the calling thread's share of their work).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt"


CLOCK = time.perf_counter


class _TimedLib:
    """kernels.lib with every function call timed (seconds and calls per function name)."""

    def __init__(self, lib):
        self._lib, self.spent, self._cache = lib, {}, {}

    def __getattr__(self, name):
        attr = getattr(self._lib, name)
        if not callable(attr):
            return attr
        fn = self._cache.get(name)
        if fn is None:
            spent = self.spent.setdefault(name, [0.0, 0])

            def fn(*a, _f=attr, _s=spent):
                t = CLOCK()
                try:
                    return _f(*a)
                finally:
                    _s[0] += CLOCK() - t
                    _s[1] += 1
            self._cache[name] = fn
        return fn


HOT = ("fic_decode_attn", "fic_experts_ffn_slots", "fic_matvec", "fic_matmul", "fic_attention",
       "fic_f32_to_f16_rows", "fic_dequantize")


class _StubLib:
    """kernels.lib with the hot kernels returning FIC_OK at once."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        if name in HOT:
            return lambda *a: 0
        return getattr(self._lib, name)


def _prefill(m, ids: list[int], depth: int) -> None:
    m.reset()
    for i in range(0, depth, m.prefill_chunk):
        m.forward(ids[i:min(depth, i + m.prefill_chunk)])


def _decode(m, ids: list[int], depth: int, n: int) -> float:
    t = CLOCK()
    for tok in ids[depth:depth + n]:
        m.forward([tok])
    return CLOCK() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--depth", type=int, default=16, help="tokens of context before the timed decode")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--path", choices=("fused", "numpy"), default="fused", help="the decode step to time")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--python-only", action="store_true", help="time the step with the hot kernels stubbed")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time

    from flashinfer_cli import Engine, kernels

    engine = Engine.open(args.model, threads=args.threads, ctx=args.depth + args.decode + 16)
    m = engine.model
    if args.path == "numpy":
        m.fused_decode = False
    words = TEXT.read_text().split()
    ids = engine.tokenize(" ".join(words * (1 + 4 * (args.depth + args.decode) // len(words))))
    ids = ids[:args.depth + args.decode]
    _prefill(m, ids, min(args.depth, 64))
    _decode(m, ids, min(args.depth, 64), 8)  # warm up
    plain, timed = [], []
    real = kernels.lib
    for _ in range(args.rounds):
        _prefill(m, ids, args.depth)
        plain.append(_decode(m, ids, args.depth, args.decode))
        _prefill(m, ids, args.depth)
        proxy = _TimedLib(real)
        kernels.lib = proxy
        try:
            timed.append((_decode(m, ids, args.depth, args.decode), proxy.spent))
        finally:
            kernels.lib = real
    n = args.decode
    if args.python_only:
        stub = []
        for _ in range(args.rounds):
            _prefill(m, ids, args.depth)
            kernels.lib = _StubLib(real)
            try:
                stub.append(_decode(m, ids, args.depth, n))
            finally:
                kernels.lib = real
        print(f"{args.model} ({args.path} path, {args.clock} clock): Python alone {1e6 * min(stub) / n:.0f} us a step "
              f"(kernels stubbed), load {os.getloadavg()[0]:.2f}")
    step = 1e3 * min(plain) / n
    _, spent = min(timed, key=lambda r: r[0])
    spent = {k: v for k, v in spent.items() if v[1]}
    c_ms = 1e3 * sum(s for s, _ in spent.values()) / n
    calls = sum(c for _, c in spent.values()) / n
    print(f"{args.model} ({args.path} path, {args.clock} clock), decode of {n} tokens after {args.depth}, "
          f"{args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"step {step:.2f} ms ({1e3 / step:.1f} tok/s): C {c_ms:.2f} ms in {calls:.0f} calls, "
          f"Python {step - c_ms:.2f} ms")
    for name, (s, c) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
        if c:
            print(f"  {name}: {1e3 * s / n:.3f} ms in {c / n:.0f} calls per step ({1e6 * s / c:.1f} us a call)")


if __name__ == "__main__":
    main()
