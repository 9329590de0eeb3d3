"""cffi API-mode build script for fic's C core (module flashinfer_cli._fic).

setup.py names this file in cffi_modules; `python csrc/build_ffi.py` also builds it in place.
The cdef is the marked region of csrc/fic.h, so the header stays the one source of the API.
"""
from __future__ import annotations

import os
import platform
import re

from cffi import FFI

CSRC_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["quant.c", "matvec.c", "pool.c", "stream.c", "ffn.c", "attention.c", "decode.c", "moe.c", "rows.c",
           # the kernels: shared code, then one file per architecture (each empty off its own)
           "kernels.c", "kernels_scalar.c", "kernels_avx2.c", "kernels_avx512.c", "kernels_vnni.c", "kernels_amx.c",
           "kernels_neon.c",
           # int8-activation prefill (matmul, expert FFN): shared code, then one file per architecture
           "qdot.c", "qdot_ffn.c", "qdot_scalar.c", "qdot_avx2.c", "qdot_neon.c",
           # Q1_0 in groups of 32 rows (the kernels are in the architecture files)
           "q1r32.c"]


def _cdef_from_header(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{path}: cdef markers not found")
    return match.group(1)


# FIC_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer, every finding fatal (.ci/sanitizers
# builds a copy of the package this way; the module then needs gcc's libasan in LD_PRELOAD).
SANITIZE = os.environ.get("FIC_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# Python's own CFLAGS, which setuptools passes first, carry -fwrapv: signed overflow would wrap, and
# UBSan would not see it. The C core must not rely on it, so the sanitized build checks it.
SANITIZE_COMPILE_ONLY = ["-fno-wrapv"]


def _compile_args() -> list[str]:
    # No -march=native: the wheel must run on any CPU of its architecture. Fast paths are
    # compiled per function with target attributes and chosen at run time.
    args = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra",
            "-Wno-unused-parameter"]
    if platform.machine().lower() in ("aarch64", "arm64"):
        args.append("-march=armv8-a+crc")
    if SANITIZE:
        args = ["-O1" if a == "-O3" else a for a in args] + ["-g", *SANITIZE_FLAGS, *SANITIZE_COMPILE_ONLY]
    return args


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(os.path.join(CSRC_DIR, "fic.h")))
ffibuilder.set_source(
    "flashinfer_cli._fic",
    '#include "fic.h"',
    # Relative paths: setuptools wants sources relative to setup.py's directory.
    sources=[os.path.relpath(os.path.join(CSRC_DIR, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC_DIR)],
    extra_compile_args=_compile_args(),
    libraries=["m"],  # expf in ffn.c and attention.c, sqrt in decode.c
    extra_link_args=["-pthread"] + (SANITIZE_FLAGS if SANITIZE else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
