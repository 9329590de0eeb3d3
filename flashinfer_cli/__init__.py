"""fic: run language models far larger than the memory they are given."""

import os

__version__ = "0.1.0"

# fic runs its own thread pool on every core; numpy's OpenBLAS threads (a MoE router's matmul over a
# prompt) would spin beside it (bench/RESULTS.md, "An AVX-512 machine", section 5). It acts only
# where numpy is not loaded yet, and an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def __getattr__(name: str):
    # Engine is imported on first use: `import flashinfer_cli` stays light (no compiled module).
    if name == "Engine":
        from flashinfer_cli.engine import Engine

        return Engine
    raise AttributeError(f"module 'flashinfer_cli' has no attribute {name!r}")
