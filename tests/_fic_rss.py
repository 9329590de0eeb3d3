"""`fic` (the console script's main) that first says its own resident memory before any model is
opened, so a test can hold what the engine adds to the budget (tests/test_soak.py runs this in a
subprocess, as tests/_rss_probe.py does for one generation).

    python _fic_rss.py chat MODEL --mem 170M ...

prints `fic-test-baseline-rss: BYTES` on stderr (VmRSS after the imports and the kernel thread
pool, with the peak VmHWM reset to it), then runs fic with the arguments.
"""
from __future__ import annotations

import sys


def main() -> None:
    import numpy  # noqa: F401  (what the interpreter holds, not the engine)
    from flashinfer_cli import cli, engine, kernels, tokenizer  # noqa: F401

    kernels.get_threads()  # the pool exists before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    sys.stderr.write(f"fic-test-baseline-rss: {rss}\n")
    sys.stderr.flush()
    sys.argv[0] = "fic"
    cli.main()


if __name__ == "__main__":
    main()
