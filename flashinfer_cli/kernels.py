"""The binding to fic's C core: the only module that imports the compiled `_fic`.

It checks shapes and dtypes, turns status codes into exceptions and keeps one thread pool and one
kernel workspace for the process. Everything above it speaks numpy arrays, QTensor and Reader.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from flashinfer_cli._fic import ffi, lib

FORMATS: dict[str, int] = {
    "f32": lib.FIC_F32,
    "f16": lib.FIC_F16,
    "q8_0": lib.FIC_Q8_0,
    "q4_0": lib.FIC_Q4_0,
    "q4_1": lib.FIC_Q4_1,
    "q1_0": lib.FIC_Q1_0,
    "q5_0": lib.FIC_Q5_0,
    "q4_k": lib.FIC_Q4_K,  # K-quants: read from GGUF files as they are, never made by fic
    "q6_k": lib.FIC_Q6_K,
}
# Formats fic can quantize to (the K-quants' quantizers are search-based; fic only reads them).
QUANTIZABLE: tuple[str, ...] = tuple(f for f in FORMATS if f not in ("q4_k", "q6_k"))
IMPLS: dict[str, int] = {
    "auto": lib.FIC_IMPL_AUTO,
    "ref": lib.FIC_IMPL_REF,
    "avx2": lib.FIC_IMPL_AVX2,
    "avx512": lib.FIC_IMPL_AVX512,
    "neon": lib.FIC_IMPL_NEON,
}
IO_BACKENDS: dict[str, int] = {
    "auto": lib.FIC_IO_AUTO,
    "io_uring": lib.FIC_IO_URING,
    "pread": lib.FIC_IO_PREAD,
}
DIRECT_ALIGN = 4096


class FicError(RuntimeError):
    """A failure reported by the C core."""


class ReadError(OSError):
    """A bundle read failed; `status` names how (io, short, crc)."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


_STATUS_NAMES = {
    lib.FIC_OK: "ok",
    lib.FIC_ERR_ARG: "bad argument",
    lib.FIC_ERR_NOMEM: "out of memory",
    lib.FIC_ERR_UNSUPPORTED: "not supported on this CPU or system",
    lib.FIC_ERR_OPEN: "cannot open",
    lib.FIC_ERR_IO: "io error",
    lib.FIC_ERR_SHORT: "short read",
    lib.FIC_ERR_CRC: "checksum mismatch",
    lib.FIC_ERR_THREAD: "cannot create thread",
    lib.FIC_ERR_WORKSPACE: "workspace too small",
}
_READ_STATUS = {lib.FIC_ERR_IO: "io", lib.FIC_ERR_SHORT: "short", lib.FIC_ERR_CRC: "crc",
                lib.FIC_ERR_ARG: "arg"}


def _read_status(status: int) -> str:
    # An unexpected code must not pass for success.
    return "ok" if status == lib.FIC_OK else _READ_STATUS.get(status, status_name(status))


def status_name(status: int) -> str:
    return _STATUS_NAMES.get(status, f"status {status}")


def _check(status: int, what: str) -> None:
    if status == lib.FIC_ERR_ARG:
        raise ValueError(f"{what}: {status_name(status)}")
    if status == lib.FIC_ERR_UNSUPPORTED:
        raise NotImplementedError(f"{what}: {status_name(status)}")
    if status != lib.FIC_OK:
        raise FicError(f"{what}: {status_name(status)}")


# ---- formats -------------------------------------------------------------------------------

# Layouts of a format that matvec and matmul read (fic.h): Q1_0 with 32 rows side by side.
LAYOUTS: dict[str, int] = {"q1_0r32": lib.FIC_Q1_0R32}
LAYOUT_OF: dict[str, str] = {"q1_0r32": "q1_0"}  # layout -> the format whose bytes it holds


def _fmt_id(fmt: str) -> int:
    try:
        return FORMATS[fmt] if fmt in FORMATS else LAYOUTS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})") from None


def block_weights(fmt: str) -> int:
    """Weights per block of `fmt` (1 for f32/f16; a layout: its format's)."""
    return lib.fic_fmt_block_weights(_fmt_id(LAYOUT_OF.get(fmt, fmt)))


def block_bytes(fmt: str) -> int:
    return lib.fic_fmt_block_bytes(_fmt_id(LAYOUT_OF.get(fmt, fmt)))


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of k weights; ValueError when k is not a whole number of blocks."""
    n_bytes = lib.fic_row_bytes(_fmt_id(fmt), k)
    if n_bytes < 0:
        raise ValueError(f"row length {k} is not a multiple of {fmt}'s block of {block_weights(fmt)}")
    return n_bytes


@dataclass(frozen=True)
class QTensor:
    """A row-major quantized matrix: `data` holds its blocks, row after row (ggml layout)."""

    fmt: str
    shape: tuple[int, int]
    data: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        m, k = self.shape
        expected = m * row_bytes(self.fmt, k)
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or not self.data.flags.c_contiguous:
            raise ValueError("QTensor data must be a contiguous 1-D uint8 array")
        if self.data.nbytes != expected:
            raise ValueError(f"QTensor {self.fmt} {self.shape}: {self.data.nbytes} bytes, expected {expected}")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def rows(self, start: int, stop: int) -> "QTensor":
        """Rows [start, stop) as a QTensor sharing this one's memory."""
        m, k = self.shape
        if not 0 <= start <= stop <= m:
            raise ValueError(f"rows [{start}, {stop}) outside 0..{m}")
        if self.fmt in LAYOUTS and (start % Q1R32_ROWS or stop % Q1R32_ROWS):
            raise ValueError(f"a {self.fmt} matrix is sliced at multiples of {Q1R32_ROWS} rows, not [{start}, {stop})")
        rb = row_bytes(self.fmt, k)
        return QTensor(self.fmt, (stop - start, k), self.data[start * rb:stop * rb])


def _f32_matrix(w: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array")
    if w.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {w.dtype}")
    return np.ascontiguousarray(w)


def _u8(a: np.ndarray):
    return ffi.from_buffer("uint8_t[]", a)


def _f32(a: np.ndarray):
    return ffi.from_buffer("float[]", a)


def quantize(w: np.ndarray, fmt: str) -> QTensor:
    """Quantize a float32 (M, K) matrix with the reference quantizer of `fmt`."""
    if fmt in FORMATS and fmt not in QUANTIZABLE:
        raise NotImplementedError(f"fic reads {fmt} (kept from GGUF files) but does not quantize to it")
    w = _f32_matrix(w, "weights")
    m, k = w.shape
    data = np.empty(m * row_bytes(fmt, k), dtype=np.uint8)
    _check(lib.fic_quantize(_fmt_id(fmt), _f32(w), _u8(data), m, k), f"quantize {fmt}")
    return QTensor(fmt, (m, k), data)


def dequantize(qt: QTensor) -> np.ndarray:
    m, k = qt.shape
    if qt.fmt == "q1_0r32":
        qt = q1r32_rows(qt, 0, m)
    out = np.empty((m, k), dtype=np.float32)
    _check(lib.fic_dequantize(_fmt_id(qt.fmt), _u8(qt.data), _f32(out), m, k), f"dequantize {qt.fmt}")
    return out


def fp32_to_fp16_bits(x: float) -> int:
    return lib.fic_fp32_to_fp16(x)


def fp16_bits_to_fp32(h: int) -> float:
    return lib.fic_fp16_to_fp32(h)


# ---- threads and kernels -------------------------------------------------------------------

def available_impls() -> list[str]:
    """Kernel implementations that run on this CPU, the reference first."""
    return [name for name, i in IMPLS.items() if name != "auto" and lib.fic_impl_available(i)]


def best_impl() -> str:
    best = lib.fic_impl_best()
    return next(name for name, i in IMPLS.items() if i == best and name != "auto")


def amx_available() -> bool:
    """True when AVX-512 runs the int8 prefill on AMX tiles: Q1_0's r32 layout, and the unpacked rows
    of TILE_FORMATS (FIC_NO_AMX=1 turns them off)."""
    return bool(lib.fic_amx_available())


# Formats whose int8 prefill runs on AMX tiles where amx_available() (csrc/qdot.h, the QT layout):
# every int8-prefill format but Q1_0 (its own kernels) and Q6_K (16-weight sub-block scales).
TILE_FORMATS = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k")


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Pool:
    """The process's one thread pool, created on first use and re-created only on resize."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ptr = ffi.NULL
        self._n_threads = 0

    def get(self):
        if self._ptr == ffi.NULL:
            self.resize(int(os.environ.get("FIC_THREADS", "0")) or default_threads())
        return self._ptr

    def resize(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"thread count must be at least 1, got {n_threads}")
        with self._lock:
            if self._ptr != ffi.NULL and self._n_threads == n_threads:
                return
            out = ffi.new("fic_pool **")
            _check(lib.fic_pool_create(n_threads, out), "thread pool")
            old, self._ptr, self._n_threads = self._ptr, ffi.gc(out[0], lib.fic_pool_destroy), n_threads
            del old

    @property
    def n_threads(self) -> int:
        self.get()
        return self._n_threads


_POOL = _Pool()


def set_threads(n_threads: int) -> None:
    """Use n_threads cores for kernels (default: every core this process may run on)."""
    _POOL.resize(n_threads)
    _WS.resize_threads(_POOL.n_threads)


# ---- prefill arithmetic ------------------------------------------------------------------------

PREFILL_MODES = ("int8", "exact")  # the arithmetics of prefill and of decode alike


class _Arithmetic:
    """The process's arithmetic for one kind of product ("prefill": T > 1, "decode": one token):
    "int8" (activations quantized to 8 bits, integer dot products, as llama.cpp) or "exact" (float
    activations), read from the environment variable `env` at import."""

    def __init__(self, kind: str, env: str, default: str):
        self.kind, self.env = kind, env
        self.mode = os.environ.get(env, default) or default

    def set(self, mode: str) -> None:
        if mode not in PREFILL_MODES:
            raise ValueError(f"unknown {self.kind} mode {mode!r} (known: {', '.join(PREFILL_MODES)})")
        self.mode = mode

    @contextlib.contextmanager
    def block(self, mode: str) -> Iterator[None]:
        before = self.mode
        self.set(mode)
        try:
            yield
        finally:
            self.mode = before

    def impl(self, impl: str) -> int:
        """impl's id with FIC_IMPL_EXACT OR'ed in when this arithmetic is exact."""
        if self.mode not in PREFILL_MODES:
            raise ValueError(f"{self.env}={self.mode!r} is not a {self.kind} mode (known: {', '.join(PREFILL_MODES)})")
        return _impl_id(impl) | (lib.FIC_IMPL_EXACT if self.mode == "exact" else 0)


def _int8_by_default(fmt: str, impl: str) -> bool:
    """Whether "auto" prefill takes the int8 path for products in fmt with kernels impl: Q1_0 always,
    TILE_FORMATS where they run on AMX tiles (2x the fp32 prefill there; bench/RESULTS.md)."""
    if LAYOUT_OF.get(fmt, fmt) == "q1_0":
        return True
    return fmt in TILE_FORMATS and _on_amx_tiles(impl)


@functools.cache
def _on_amx_tiles(impl: str) -> bool:
    """impl's int8 prefill runs on AMX tiles: facts of the process (the CPU, and FIC_NO_AMX, which the
    core reads once), asked once per impl rather than at every product."""
    return (impl == "avx512" or (impl == "auto" and best_impl() == "avx512")) and amx_available()


class _PrefillArithmetic(_Arithmetic):
    """Prefill's arithmetic: "int8", "exact", or "auto" (the default): int8 for products whose
    formats all have it by default (_int8_by_default: Q1_0; the AMX tiles' formats where the CPU
    has them), exact for any other."""

    MODES = ("auto",) + PREFILL_MODES

    def __init__(self) -> None:
        super().__init__("prefill", "FIC_PREFILL", "auto")

    def set(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown {self.kind} mode {mode!r} (known: {', '.join(self.MODES)})")
        self.mode = mode

    def impl(self, impl: str, formats: tuple[str, ...] = ()) -> int:
        """impl's id, FIC_IMPL_EXACT OR'ed in when products in these formats are to be exact."""
        if self.mode == "auto":
            exact = not formats or not all(_int8_by_default(f, impl) for f in formats)
            return _impl_id(impl) | (lib.FIC_IMPL_EXACT if exact else 0)
        if self.mode not in self.MODES:
            raise ValueError(f"{self.env}={self.mode!r} is not a {self.kind} mode (known: {', '.join(self.MODES)})")
        return super().impl(impl)


# Prefill: exact by default for every format but Q1_0, because int8 bought only 0.89-1.21x on an AVX2
# CPU for logits 3% away from the float model's on tiny models (bench/RESULTS.md, "Prefill with int8
# activations"). Q1_0 ("auto"): int8, the arithmetic its decode already has (no float matvec), through
# its own kernels, which made a 1.7B-shape model's prefill 1.5-1.7x faster (bench/RESULTS.md, "Q1_0
# prefill with int8 activations"). On AMX tiles the other formats but Q6_K take int8 too: 2x the fp32
# prefill, as close to transformers as llama.cpp's own prefill (bench/RESULTS.md, "Q4 prefill on AMX").
_PREFILL = _PrefillArithmetic()
# Decode: int8 by default, as llama.cpp: the kernels run 1.3-2.2x faster on AVX2 for perplexity
# x1.001 (bench/RESULTS.md, "Decode with int8 activations"). Exact mode's promise (the full model's
# answer under any budget) holds because the FFN sums each expert in fixed point (FIC_FFN_FIXED):
# without it, int8's rounding turned the streamed FFN's 1e-7 summation-order differences into 1e-2
# and an answer parted (tests/test_soak.py). Q1_0 has int8 kernels only.
_DECODE = _Arithmetic("decode", "FIC_DECODE", "int8")


def set_prefill(mode: str) -> None:
    """Choose the arithmetic of prefill products (matmul, the expert FFN for T > 1) for this
    process: "int8", "exact", or "auto" (the default: int8 where every format is Q1_0, else exact)."""
    _PREFILL.set(mode)


def get_prefill() -> str:
    return _PREFILL.mode


def prefill_mode(mode: str) -> contextlib.AbstractContextManager:
    """set_prefill(mode) for a block, the previous mode back after it."""
    return _PREFILL.block(mode)


def set_decode(mode: str) -> None:
    """Choose the arithmetic of decode (one token) products for this process: "int8" or "exact"."""
    _DECODE.set(mode)


def get_decode() -> str:
    return _DECODE.mode


def decode_mode(mode: str) -> contextlib.AbstractContextManager:
    """set_decode(mode) for a block, the previous mode back after it."""
    return _DECODE.block(mode)


def _prefill_impl(impl: str, formats: tuple[str, ...] = ()) -> int:
    return _PREFILL.impl(impl, formats)


def _decode_impl(impl: str) -> int:
    return _DECODE.impl(impl)


def _math_impl(impl: str, t: int, formats: tuple[str, ...] = ()) -> int:
    """The decode arithmetic for one token, the prefill arithmetic (of these formats) for more."""
    return _decode_impl(impl) if t == 1 else _prefill_impl(impl, formats)


def _ffn_impl(impl: str, t: int, formats: tuple[str, ...], y_flag: int) -> int:
    """An FFN call's arithmetic (with its y flag). A fixed-point call (FIC_FFN_FIXED) runs a down
    without AMX tiles in float in either mode (ffn.c: Q6_K, as Q4_K_M files keep some layers'
    ffn_down), so only gate and up decide its prefill: with Q4_K gate/up on AMX that made
    Qwen2.5-Coder-1.5B's 512-token prefill 1.5-1.6x (bench/RESULTS.md) where the Q6_K down made the
    whole call float."""
    down = LAYOUT_OF.get(formats[2], formats[2])
    if y_flag and t > 1 and down not in TILE_FORMATS and down != "q1_0":
        formats = formats[:2]
    return _math_impl(impl, t, formats) | y_flag


def get_threads() -> int:
    return _POOL.n_threads


# ---- the kernel workspace -------------------------------------------------------------------

class _Workspace:
    """The process's one kernel workspace (C kernels never allocate; fic_workspace_bytes).

    Sized for maxima (t, k, experts, neurons) and the pool's thread count. A call beyond the
    maxima raises them; when that needs more bytes the buffer is replaced and `grows` counted.
    Kernel calls hold `lock` while C uses the buffer (cffi releases the GIL; see _ws_acquire)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf: np.ndarray | None = None
        self.ptr = ffi.NULL
        self.nbytes = 0
        self.maxima = (0, 0, 0, 0)  # t, k, experts, neurons
        self.n_threads = 0
        self.grows = 0

    def _size(self, n_threads: int, maxima: tuple[int, int, int, int]) -> int:
        n_bytes = lib.fic_workspace_bytes(n_threads, *maxima)
        if n_bytes < 0:
            raise ValueError(f"workspace maxima {maxima} with {n_threads} threads: {status_name(n_bytes)}")
        return n_bytes

    def _set(self, n_threads: int, maxima: tuple[int, int, int, int], n_bytes: int) -> None:
        if n_bytes != self.nbytes:
            self.buf = aligned_buffer(n_bytes) if n_bytes > 0 else None
            self.ptr = ffi.from_buffer("uint8_t[]", self.buf) if n_bytes > 0 else ffi.NULL
            self.nbytes = n_bytes
        self.n_threads, self.maxima = n_threads, maxima

    def reserve(self, n_threads: int, maxima: tuple[int, int, int, int]) -> None:
        with self.lock:
            maxima = tuple(max(a, b) for a, b in zip(self.maxima, maxima))
            n_bytes = self._size(n_threads, maxima)
            # never shrinks below what the current thread count and maxima need
            self._set(n_threads, maxima, max(n_bytes, self.nbytes) if n_threads == self.n_threads else n_bytes)

    def resize_threads(self, n_threads: int) -> None:
        with self.lock:
            if n_threads != self.n_threads and self.nbytes > 0:
                self._set(n_threads, self.maxima, self._size(n_threads, self.maxima))

    def ensure(self, n_threads: int, t: int, k: int, experts: int, neurons: int):
        """(pointer, bytes) of a workspace for this call; call with `lock` held."""
        mt, mk, me, mn = self.maxima
        if n_threads == self.n_threads and t <= mt and k <= mk and experts <= me and neurons <= mn:
            return self.ptr, self.nbytes
        if n_threads != self.n_threads:  # the pool was created or resized: a re-reservation
            self._set(n_threads, self.maxima, self._size(n_threads, self.maxima))
        maxima = (max(mt, t), max(mk, k), max(me, experts), max(mn, neurons))
        if maxima != self.maxima:
            n_bytes = self._size(n_threads, maxima)
            if n_bytes > self.nbytes:
                self.grows += 1
            self._set(n_threads, maxima, max(n_bytes, self.nbytes))
        return self.ptr, self.nbytes


_WS = _Workspace()


def _ws_acquire(n_threads: int, t: int, k: int, experts: int, neurons: int):
    """(pointer, bytes, held) of a workspace for one kernel call: the process's one, its lock
    held (release it after the call), or, when another Python thread is inside a kernel with it,
    a private one for this call only, so concurrent callers still run concurrently."""
    if _WS.lock.acquire(blocking=False):
        try:
            ptr, n_bytes = _WS.ensure(n_threads, t, k, experts, neurons)
        except BaseException:
            _WS.lock.release()
            raise
        return ptr, n_bytes, True
    n_bytes = _WS._size(n_threads, (t, k, experts, neurons))
    return (ffi.from_buffer("uint8_t[]", aligned_buffer(n_bytes)) if n_bytes else ffi.NULL), n_bytes, False


def reserve_workspace(*, max_t: int, max_k: int, max_experts: int = 0, max_neurons: int = 0) -> int:
    """Size the process's kernel workspace once for every call within these maxima, at the
    pool's thread count (re-reserved by set_threads); returns its bytes. max_t: tokens per call;
    max_k: the longest row (matvec/matmul k, experts_ffn d_model); max_experts: experts per
    FFN call; max_neurons: neurons per FFN call, all its experts together. Never shrinks."""
    for name, v in (("max_t", max_t), ("max_k", max_k), ("max_experts", max_experts), ("max_neurons", max_neurons)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    _WS.reserve(_POOL.n_threads, (int(max_t), int(max_k), int(max_experts), int(max_neurons)))
    return _WS.nbytes


def workspace_bytes() -> int:
    """Bytes of the kernel workspace now held (0 before any kernel call or reservation)."""
    return _WS.nbytes


def workspace_grows() -> int:
    """How many times a kernel call needed a larger workspace than the one held (a reservation
    or a thread-count change does not count)."""
    return _WS.grows


def workspace_bytes_for(*, n_threads: int, max_t: int, max_k: int, max_experts: int = 0,
                        max_neurons: int = 0) -> int:
    """fic_workspace_bytes: the workspace bytes that cover every kernel call within the maxima."""
    return _WS._size(n_threads, (max_t, max_k, max_experts, max_neurons))


def _impl_id(impl: str) -> int:
    try:
        return IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown kernel implementation {impl!r} (known: {', '.join(IMPLS)})") from None


def _f32_vector(x: np.ndarray, n: int, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{name} must be a float32 numpy array")
    if x.shape != (n,):
        raise ValueError(f"{name} has shape {x.shape}, expected ({n},)")
    return np.ascontiguousarray(x)


def matvec(qt: QTensor, x: np.ndarray, *, impl: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """y = W x: W is (M, K) quantized, x is float32 (K,); returns float32 (M,)."""
    m, k = qt.shape
    x = _f32_vector(x, k, "x")
    y = np.empty(m, dtype=np.float32) if out is None else _f32_vector(out, m, "out")
    pool = _POOL.get()
    ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, 1, k, 0, 0)
    try:
        status = lib.fic_matvec(pool, _decode_impl(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(x), _f32(y), m, k,
                                ws, ws_bytes)
    finally:
        if held:
            _WS.lock.release()
    _check(status, f"matvec {qt.fmt} {impl}")
    return y


class PreparedMatvec:
    """y = W x as one C call with every argument converted once: what a decode step that holds
    its pointers pays per matrix, without `matvec`'s per-call checks and workspace lock
    (bench/bench_kernels.py times kernels so). `workspace` (default: its own) may be shared by calls
    made one at a time, as a decode step's one workspace is; `qt`, `x` and `out` must stay alive
    and unmoved while it is used."""

    def __init__(self, qt: QTensor, x: np.ndarray, out: np.ndarray, *, impl: str = "auto",
                 workspace: np.ndarray | None = None) -> None:
        m, k = qt.shape
        self._x, self._out = _f32_vector(x, k, "x"), _f32_vector(out, m, "out")
        if self._out is not out:
            raise ValueError("out must be a contiguous float32 array")
        pool = _POOL.get()  # held here: a later set_threads makes a new pool, this one lives on
        if workspace is None:
            workspace = aligned_buffer(lib.fic_workspace_bytes(_POOL.n_threads, 1, k, 0, 0))
        self._ws = workspace
        self._what = f"matvec {qt.fmt} {impl}"
        self._args = (pool, _decode_impl(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(self._x), _f32(self._out), m, k,
                      _u8(self._ws), self._ws.nbytes)

    def __call__(self) -> None:
        _check(lib.fic_matvec(*self._args), self._what)


def matmul(qt: QTensor, x: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """Y = X Wᵀ: W is (M, K) quantized, X is float32 (T, K); returns float32 (T, M)."""
    m, k = qt.shape
    x = _f32_matrix(x, "X")
    if x.shape[1] != k:
        raise ValueError(f"X has {x.shape[1]} columns, weights have {k}")
    t = x.shape[0]
    if qt.fmt == "q1_0r32" and t > 1 and _prefill_impl(impl, (qt.fmt,)) & lib.FIC_IMPL_EXACT:
        qt = q1r32_rows(qt, 0, m)  # float prefill reads rows: the r32 layout has only the int8 path
    y = np.empty((t, m), dtype=np.float32)
    pool = _POOL.get()
    ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, 1, k, 0, 0)  # the tiles do not depend on t
    try:
        status = lib.fic_matmul(pool, _prefill_impl(impl, (qt.fmt,)), _fmt_id(qt.fmt), _u8(qt.data), _f32(x), _f32(y), t, m, k,
                                ws, ws_bytes)
    finally:
        if held:
            _WS.lock.release()
    _check(status, f"matmul {qt.fmt} {impl}")
    return y


def accum_rows(qt: QTensor, a: np.ndarray, y: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """y += Σ_i a[i] · W[i] in place: W is (N, K) quantized, a is float32 (N,), y float32 (K,)."""
    n_rows, k = qt.shape
    a = _f32_vector(a, n_rows, "a")
    if not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.shape != (k,) or not y.flags.c_contiguous:
        raise ValueError(f"y must be a contiguous float32 array of shape ({k},)")
    status = lib.fic_accum_rows(_POOL.get(), _impl_id(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(a), _f32(y),
                                n_rows, k, ffi.NULL, 0)  # needs no workspace
    _check(status, f"accum_rows {qt.fmt} {impl}")
    return y


# ---- expert FFN ----------------------------------------------------------------------------

_DOWN_LAYOUTS = {"columns": 0, "rows": 1}


def bundle_part_bytes(gate: str, up: str, down: str, d_model: int, down_layout: str, n: int) -> tuple[int, int, int]:
    """Bytes of the gate, up and down parts of a bundle of n neurons, back to back in that order:
    gate rows (n x d_model), up rows (n x d_model), then down as columns (d_model rows of n, the
    expert's column slice of ffn_down) or as rows (n x d_model, ffn_down transposed). The one place
    Python derives the bundle layout (fmt.ExpertLayout and the FFN bindings use it; ffn.c's
    gate_row/up_row/down_part are the C side of the same rule)."""
    if down_layout not in _DOWN_LAYOUTS:
        raise ValueError(f"down_layout must be 'columns' or 'rows', got {down_layout!r}")
    g, u = n * row_bytes(gate, d_model), n * row_bytes(up, d_model)
    d = d_model * row_bytes(down, n) if down_layout == "columns" else n * row_bytes(down, d_model)
    return g, u, d


class ExpertSet:
    """A layer's set of expert bundles, ready for one-call FFNs (fic_experts_ffn).

    Built once per active set, so a forward step pays one Python -> C call per layer: the cffi
    pointer arrays are made here and the buffers kept alive. `formats` is (gate, up, down) fmt
    names, `down_layout` "columns" (down part d_model x n) or "rows" (n x d_model), as fmt.py's
    ExpertLayout; each bundle is a uint8 array holding gate rows, up rows and the down part back
    to back (at least that many bytes: padded buffers are fine), `n_neurons` their sizes.
    """

    def __init__(self, formats: Sequence[str], d_model: int, down_layout: str,
                 bundles: Sequence[np.ndarray], n_neurons: Sequence[int]):
        if len(formats) != 3:
            raise ValueError("formats must be (gate, up, down)")
        if down_layout not in _DOWN_LAYOUTS:
            raise ValueError(f"down_layout must be 'columns' or 'rows', got {down_layout!r}")
        if len(bundles) != len(n_neurons):
            raise ValueError(f"{len(bundles)} bundles but {len(n_neurons)} neuron counts")
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        gate, up, down = formats
        self.formats = (gate, up, down)
        self.d_model = d_model
        self.down_layout = down_layout
        self.n_neurons = [int(n) for n in n_neurons]
        row_bytes(gate, d_model), row_bytes(up, d_model)  # ValueError now for a d_model off the blocks
        if down_layout == "rows":
            row_bytes(down, d_model)
        for i, (buf, n) in enumerate(zip(bundles, self.n_neurons)):
            if n <= 0:
                raise ValueError(f"expert {i}: neuron count must be positive, got {n}")
            need = sum(bundle_part_bytes(gate, up, down, d_model, down_layout, n))
            if (not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1
                    or not buf.flags.c_contiguous):
                raise ValueError(f"expert {i}: bundle must be a contiguous 1-D uint8 array")
            if buf.nbytes < need:
                raise ValueError(f"expert {i}: bundle has {buf.nbytes} bytes, {n} neurons need {need}")
        self.n_total = sum(self.n_neurons)
        self._layout = ffi.new("fic_expert_layout *", {
            "d_model": d_model, "gate_fmt": _fmt_id(gate), "up_fmt": _fmt_id(up), "down_fmt": _fmt_id(down),
            "down_rows": _DOWN_LAYOUTS[down_layout]})
        self._keep = [_u8(b) for b in bundles]  # the arrays stay alive while these views do
        self._bundles = ffi.new("const uint8_t *[]", self._keep) if bundles else ffi.NULL
        self._n = ffi.new("int32_t[]", self.n_neurons) if bundles else ffi.NULL
        self._scratch = np.empty(0, dtype=np.float32)

    @classmethod
    def from_layout(cls, layout, bundles: Sequence[np.ndarray], n_neurons: Sequence[int]) -> "ExpertSet":
        """From an fmt.ExpertLayout (anything with d_model, gate_fmt, up_fmt, down_fmt, down_layout)."""
        return cls((layout.gate_fmt, layout.up_fmt, layout.down_fmt), layout.d_model, layout.down_layout,
                   bundles, n_neurons)

    def __len__(self) -> int:
        return len(self.n_neurons)

    def ffn(self, x: np.ndarray, y: np.ndarray, coef: np.ndarray | None = None, *,
            impl: str = "auto", scratch: np.ndarray | None = None) -> np.ndarray:
        """y += Σ_e coef[:, e] · down_e(silu(gate_e x) * (up_e x)), in place; returns y.

        x and y are float32 (t, d_model) or (d_model,) (one token), y C-contiguous; coef is
        None (all ones) or float32 (t, n_experts) ((n_experts,) for one token); 0 skips.
        scratch: a contiguous 1-D float32 array of at least t * n_total floats to use instead of
        this set's own (so that the sets of many layers can share one); on return it holds h
        (see experts_ffn_slots)."""
        x, t, coef_ptr, y_ptr, y_flag = _ffn_io(x, y, coef, self.d_model, len(self))
        if y_flag and self.down_layout == "rows":
            raise ValueError(_FIXED_ROWS)
        need = t * self.n_total
        if scratch is None:
            if self._scratch.size < need:
                self._scratch = np.empty(need, dtype=np.float32)
            scratch = self._scratch
        else:
            _check_scratch(scratch, need)
        pool = _POOL.get()
        ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, t, self.d_model, len(self), self.n_total)
        try:
            status = lib.fic_experts_ffn(pool, _ffn_impl(impl, t, tuple(self.formats), y_flag), self._layout,
                                         self._bundles, self._n, len(self), coef_ptr, _f32(x), y_ptr, t,
                                         _f32(scratch), scratch.size, ws, ws_bytes)
        finally:
            if held:
                _WS.lock.release()
        _check(status, f"experts_ffn {'/'.join(self.formats)} {self.down_layout} {impl}")
        return y


_FIXED_ROWS = "a fixed-point FFN accumulator needs the columns down layout (rows sum per neuron)"


def _ffn_y(y: np.ndarray, shape: tuple) -> tuple:
    """An FFN call's output: (pointer, flag). float32: y += the FFN; int64: a fixed-point
    accumulator (FIC_FFN_FIXED, fic.h) that fixed_flush adds to a float32 y."""
    if (not isinstance(y, np.ndarray) or y.dtype not in (np.float32, np.int64) or y.shape != shape
            or not y.flags.c_contiguous or not y.flags.writeable):
        raise ValueError(f"y must be a writable contiguous float32 (or int64 fixed-point) array of shape {shape}")
    if y.dtype == np.int64:
        return ffi.from_buffer("float[]", y), lib.FIC_FFN_FIXED
    return _f32(y), 0


def _ffn_io(x: np.ndarray, y: np.ndarray, coef: np.ndarray | None, d: int, n_experts: int):
    """Checks an FFN call's x, y and coef; returns (contiguous x, t, coef pointer or NULL, y's
    pointer, y's flag)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError("x must be a float32 numpy array")
    if x.ndim not in (1, 2) or x.shape[-1] != d or x.size == 0:
        raise ValueError(f"x has shape {x.shape}, expected ({d},) or (t, {d})")
    y_ptr, y_flag = _ffn_y(y, x.shape)
    t = 1 if x.ndim == 1 else x.shape[0]
    x = np.ascontiguousarray(x)
    coef_ptr = ffi.NULL
    if coef is not None:
        shape = (n_experts,) if x.ndim == 1 else (t, n_experts)
        if not isinstance(coef, np.ndarray) or coef.dtype != np.float32 or coef.shape != shape:
            raise ValueError(f"coef must be float32 of shape {shape}")
        coef_ptr = _f32(np.ascontiguousarray(coef))
    return x, t, coef_ptr, y_ptr, y_flag


def fixed_add(c: np.ndarray, acc: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """acc += fix(c) (fic_fixed_add: c * 2^32 rounded half to even, |c| saturated at 2^30);
    c float32, acc int64 of the same size. Returns acc."""
    if not isinstance(c, np.ndarray) or c.dtype != np.float32 or not c.flags.c_contiguous:
        raise ValueError("c must be a contiguous float32 array")
    if (not isinstance(acc, np.ndarray) or acc.dtype != np.int64 or acc.size != c.size
            or not acc.flags.c_contiguous or not acc.flags.writeable):
        raise ValueError(f"acc must be a writable contiguous int64 array of {c.size} elements")
    _check(lib.fic_fixed_add(_impl_id(impl), _f32(c), ffi.from_buffer("int64_t[]", acc), c.size), "fixed_add")
    return acc


def silu_mul(c: float, h: np.ndarray, u: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """h = c * silu(h) * u in place (fic_silu_mul, the FFN's gating); h, u contiguous float32 of one
    size. Returns h."""
    for name, a in (("h", h), ("u", u)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous float32 array")
    if u.size != h.size or not h.flags.writeable:
        raise ValueError(f"h must be writable and u of h's {h.size} elements")
    _check(lib.fic_silu_mul(_impl_id(impl), float(c), ffi.from_buffer("float[]", h), _f32(u), h.size), "silu_mul")
    return h

# ---- Q1_0 in groups of 32 rows (the r32 layout) -------------------------------------------------

Q1R32_ROWS = 32
_R32_GROUP_CHUNK = 64  # groups repacked at a time: a bounded temporary copy


def q1r32_wanted() -> bool:
    """Whether models put their resident Q1_0 matrices in the r32 layout: FIC_Q1R32=1 or 0, else
    where the best implementation has the layout's fast path (AVX2, AVX-512); NEON keeps its own
    row-major Q1_0 kernel."""
    mode = os.environ.get("FIC_Q1R32", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FIC_Q1R32={mode!r}: expected 0, 1 or auto")
    return mode == "1" or (mode == "auto" and best_impl() in ("avx2", "avx512"))


def q1r32_eligible(qt: QTensor) -> bool:
    """qt can take the r32 layout: Q1_0 with rows a multiple of 32."""
    return qt.fmt == "q1_0" and qt.shape[0] % Q1R32_ROWS == 0


def q1r32_repack(qt: QTensor, *, in_place: bool = False) -> QTensor:
    """qt (Q1_0, rows a multiple of 32) in the r32 layout (fmt "q1_0r32"): in a new buffer, or in
    qt's own memory (a group of 32 rows keeps its bytes' range), through a copy of 64 groups at a
    time."""
    if not q1r32_eligible(qt):
        raise ValueError(f"the r32 layout is for q1_0 matrices of a multiple of {Q1R32_ROWS} rows, "
                         f"not {qt.fmt} {qt.shape}")
    m, k = qt.shape
    out = qt.data if in_place else aligned_buffer(qt.nbytes)
    if in_place and not out.flags.writeable:
        raise ValueError("in-place repacking needs writable weights")
    group_bytes = Q1R32_ROWS * row_bytes("q1_0", k)
    step = _R32_GROUP_CHUNK * group_bytes
    for a in range(0, qt.nbytes, step):
        src = qt.data[a:a + step].copy() if in_place else qt.data[a:a + step]
        n_rows = src.nbytes // group_bytes * Q1R32_ROWS
        _check(lib.fic_q1r32_repack(_u8(src), n_rows, k, _u8(out[a:a + step])), "q1r32_repack")
    return QTensor("q1_0r32", qt.shape, out)


def q1r32_rows(qt: QTensor, start: int, stop: int) -> QTensor:
    """Rows [start, stop) of an r32 matrix back in Q1_0's row-major layout (a copy; the groups of 32
    rows that hold them are unpacked, fic_q1r32_unpack)."""
    m, k = qt.shape
    if qt.fmt != "q1_0r32" or not 0 <= start <= stop <= m:
        raise ValueError(f"rows [{start}, {stop}) of a {qt.fmt} {qt.shape} matrix")
    rb = row_bytes("q1_0", k)
    g0, g1 = start // Q1R32_ROWS, -(-stop // Q1R32_ROWS)
    out = np.empty(max(1, (g1 - g0) * Q1R32_ROWS * rb), dtype=np.uint8)
    if g1 > g0:
        src = qt.data[g0 * Q1R32_ROWS * rb:g1 * Q1R32_ROWS * rb]
        _check(lib.fic_q1r32_unpack(_u8(src), (g1 - g0) * Q1R32_ROWS, k, _u8(out)), "q1r32_unpack")
    a = (start - g0 * Q1R32_ROWS) * rb
    return QTensor("q1_0", (stop - start, k), out[a:a + (stop - start) * rb])


def q1r32_bundle_eligible(gate_fmt: str, up_fmt: str, down_fmt: str, down_layout: str, d_model: int,
                           n_neurons: Iterable[int]) -> bool:
    """Bundles of this layout can take the r32 layout: Q1_0 throughout, down as columns, every size
    a multiple of 128 (Q1_0's block, which down's columns already need)."""
    return ((gate_fmt, up_fmt, down_fmt, down_layout) == ("q1_0", "q1_0", "q1_0", "columns")
            and d_model % 128 == 0 and all(n > 0 and n % 128 == 0 for n in n_neurons))


def q1r32_bundles(bufs: Sequence[np.ndarray], n_neurons: Sequence[int], d_model: int, *,
                  impl: str = "auto", unpack: bool = False) -> None:
    """Q1_0 bundles (gate n x d, up n x d, down d x n, each in its buffer's first bytes) repacked in
    place into the r32 layout (unpack: from it back to rows), part by part, split between the
    pool's threads (fic_q1r32_bundles; every impl gives the same bytes)."""
    if len(bufs) != len(n_neurons):
        raise ValueError(f"{len(bufs)} buffers but {len(n_neurons)} neuron counts")
    if not len(bufs):
        return
    for buf, n in zip(bufs, n_neurons):
        if n <= 0 or n % 128 or d_model <= 0 or d_model % 128:
            raise ValueError(f"an r32 bundle needs sizes that are multiples of 128, not n={n}, d={d_model}")
        if buf.dtype != np.uint8 or not buf.flags.c_contiguous or not buf.flags.writeable \
                or buf.nbytes < 3 * n * row_bytes("q1_0", d_model):
            raise ValueError(f"a writable contiguous uint8 buffer of the bundle's bytes, not {buf.dtype} {buf.shape}")
    need = lib.fic_q1r32_bundles_ws_bytes(_POOL.n_threads, max(n_neurons), d_model)
    ws = np.empty(need, dtype=np.uint8)  # a group of rows a thread (tens of KB); any alignment
    ptrs = ffi.new("uint8_t *[]", [ffi.from_buffer("uint8_t[]", b) for b in bufs])
    ns = np.ascontiguousarray(n_neurons, dtype=np.int32)
    _check(lib.fic_q1r32_bundles(_POOL.get(), _impl_id(impl), ptrs, ffi.from_buffer("int32_t[]", ns), len(bufs),
                                 d_model, 0 if unpack else 1, _u8(ws), ws.nbytes), "q1r32_bundles")


def q1r32_bundle(buf: np.ndarray, n_neurons: int, d_model: int, *, impl: str = "auto", unpack: bool = False) -> None:
    """One bundle: q1r32_bundles of [buf]."""
    q1r32_bundles([buf], [n_neurons], d_model, impl=impl, unpack=unpack)


class FixedFlush:
    """fixed_flush of one accumulator into float32 outputs, checked once per output array (decode
    flushes the same two buffers every layer of every token)."""

    def __init__(self, acc: np.ndarray):
        if (not isinstance(acc, np.ndarray) or acc.dtype != np.int64 or acc.ndim != 1
                or not acc.flags.c_contiguous or not acc.flags.writeable):
            raise ValueError("acc must be a writable contiguous 1-D int64 array")
        self.acc, self._pacc = acc, ffi.from_buffer("int64_t[]", acc)
        self._y: tuple = (None, None)

    def __call__(self, y: np.ndarray) -> None:
        """y += acc * 2^-32, acc = 0 (y float32 of acc's size)."""
        if y is not self._y[0]:
            if (not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.size != self.acc.size
                    or not y.flags.c_contiguous or not y.flags.writeable):
                raise ValueError(f"y must be a writable contiguous float32 array of {self.acc.size} elements")
            self._y = (y, _f32(y))
        lib.fic_fixed_flush(self._pacc, self._y[1], self.acc.size)  # FIC_OK: checked above


def fixed_flush(acc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y += acc * 2^-32 (through double, rounded to float32), then acc = 0 (fic_fixed_flush). Returns y."""
    if (not isinstance(acc, np.ndarray) or acc.dtype != np.int64 or not acc.flags.c_contiguous
            or not acc.flags.writeable):
        raise ValueError("acc must be a writable contiguous int64 array")
    if (not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.size != acc.size or not y.flags.c_contiguous
            or not y.flags.writeable):
        raise ValueError(f"y must be a writable contiguous float32 array of {acc.size} elements")
    _check(lib.fic_fixed_flush(ffi.from_buffer("int64_t[]", acc), _f32(y), acc.size), "fixed_flush")
    return y


def _check_scratch(scratch: np.ndarray, need: int) -> None:
    if (not isinstance(scratch, np.ndarray) or scratch.dtype != np.float32 or scratch.ndim != 1
            or not scratch.flags.c_contiguous or not scratch.flags.writeable or scratch.size < need):
        raise ValueError(f"scratch must be a writable contiguous 1-D float32 array of at least {need} floats")


class _SlotLayout:
    """A layout's cffi struct and the numbers the bounds check needs, cached per layout."""

    __slots__ = ("c", "d_model", "gate_up_row", "down_per_neuron", "down_bw", "name", "rows", "formats")

    def __init__(self, d_model: int, gate: str, up: str, down: str, down_layout: str):
        if down_layout not in _DOWN_LAYOUTS:
            raise ValueError(f"down_layout must be 'columns' or 'rows', got {down_layout!r}")
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        self.c = ffi.new("fic_expert_layout *", {
            "d_model": d_model, "gate_fmt": _fmt_id(gate), "up_fmt": _fmt_id(up), "down_fmt": _fmt_id(down),
            "down_rows": _DOWN_LAYOUTS[down_layout]})
        self.d_model = d_model
        self.gate_up_row = row_bytes(gate, d_model) + row_bytes(up, d_model)
        if down_layout == "rows":  # bundle bytes = n (gate_up_row + down_per_neuron)
            self.down_per_neuron, self.down_bw = row_bytes(down, d_model), 1
        else:  # + d_model * (n / bw) * block bytes
            self.down_per_neuron, self.down_bw = d_model * block_bytes(down), block_weights(down)
        self.name = f"{gate}/{up}/{down} {down_layout}"
        self.rows = down_layout == "rows"
        self.formats = (gate, up, down)

    def bundle_bytes(self, n: int) -> int:
        return n * self.gate_up_row + (n // self.down_bw) * self.down_per_neuron


_SLOT_LAYOUTS: dict[tuple, _SlotLayout] = {}
_SLOTS_SCRATCH = [np.empty(0, dtype=np.float32)]  # experts_ffn_slots' default scratch


def _int32_vector(a: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int32 numpy array")
    return np.ascontiguousarray(a)


def _checked_slots(layout, arena: np.ndarray, slot_bytes: int, slots: np.ndarray, n_neurons: np.ndarray):
    """experts_ffn_slots' checks of everything but x, y and coef: (layout, slots, n_neurons, total neurons)."""
    key = layout if isinstance(layout, tuple) else (
        layout.d_model, layout.gate_fmt, layout.up_fmt, layout.down_fmt, layout.down_layout)
    lay = _SLOT_LAYOUTS.get(key)
    if lay is None:
        lay = _SLOT_LAYOUTS[key] = _SlotLayout(*key)
    if (not isinstance(arena, np.ndarray) or arena.dtype != np.uint8 or arena.ndim != 1
            or not arena.flags.c_contiguous):
        raise ValueError("arena must be a contiguous 1-D uint8 array")
    slots = _int32_vector(slots, "slots")
    n_neurons = _int32_vector(n_neurons, "n_neurons")
    n_experts = slots.shape[0]
    if n_neurons.shape[0] != n_experts:
        raise ValueError(f"{n_experts} slots but {n_neurons.shape[0]} neuron counts")
    if slot_bytes <= 0:
        raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
    n_total = 0
    if n_experts:
        # bundle e ends at slots[e] * slot_bytes + bytes(n_e); bytes() grows with n, so the top
        # slot plus the largest expert bounds them all (a negative slot the C core rejects)
        n_max = int(np.maximum.reduce(n_neurons))
        if int(np.maximum.reduce(slots)) * slot_bytes + lay.bundle_bytes(n_max) > arena.nbytes:
            n64 = n_neurons.astype(np.int64)
            ends = slots.astype(np.int64) * slot_bytes + n64 * lay.gate_up_row
            ends += (n64 // lay.down_bw) * lay.down_per_neuron
            bad = np.flatnonzero(ends > arena.nbytes)
            if bad.size:
                e = int(bad[0])
                raise ValueError(f"expert {e}: slot {slots[e]} of {slot_bytes} bytes with {n_neurons[e]} neurons"
                                 f" lies outside the {arena.nbytes}-byte arena")
        n_total = int(np.add.reduce(n_neurons))  # int64 (add reductions upcast int32)
    return lay, slots, n_neurons, n_total


def experts_ffn_slots(layout, arena: np.ndarray, slot_bytes: int, slots: np.ndarray, n_neurons: np.ndarray,
                      x: np.ndarray, y: np.ndarray, *, coef: np.ndarray | None = None,
                      scratch: np.ndarray | None = None, impl: str = "auto") -> np.ndarray:
    """As ExpertSet.ffn over bundles in arena slots (fic_experts_ffn_slots): expert e's bundle is
    at arena[slots[e] * slot_bytes:], n_neurons[e] its size; y += Σ_e coef[:, e] down_e(h_e).
    y: float32, or int64: a fixed-point accumulator (FIC_FFN_FIXED, fic.h) to which each expert adds
    its own rounded contribution, so that the sum does not depend on how experts are split between
    calls (fixed_flush then adds it to a float32 y; columns down layout only).

    layout: anything with d_model, gate_fmt, up_fmt, down_fmt, down_layout (fmt.ExpertLayout),
    or that 5-tuple. arena: the whole arena, a 1-D uint8 array; slots, n_neurons: int32 (E,).
    Per call: two maxima and a sum over the int32 arrays, no per-expert Python loop. On return
    scratch (default: a process-wide one, not for concurrent callers) holds h: expert e's
    t x n_e block starts at t * (n_0 + ... + n_{e-1}), h = coef * silu(gate x) * (up x).
    Returns y."""
    lay, slots, n_neurons, n_total = _checked_slots(layout, arena, slot_bytes, slots, n_neurons)
    n_experts = slots.shape[0]
    x, t, coef_ptr, y_ptr, y_flag = _ffn_io(x, y, coef, lay.d_model, n_experts)
    if y_flag and lay.rows:
        raise ValueError(_FIXED_ROWS)
    need = t * n_total
    if scratch is None:
        scratch = _SLOTS_SCRATCH[0]
        if scratch.size < need:
            scratch = _SLOTS_SCRATCH[0] = np.empty(need, dtype=np.float32)
    else:
        _check_scratch(scratch, need)
    pool = _POOL.get()
    ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, t, lay.d_model, n_experts, n_total)
    try:
        status = lib.fic_experts_ffn_slots(pool, _ffn_impl(impl, t, lay.formats, y_flag), lay.c, _u8(arena),
                                           slot_bytes,
                                           ffi.from_buffer("int32_t[]", slots), ffi.from_buffer("int32_t[]", n_neurons),
                                           n_experts, coef_ptr, _f32(x), y_ptr, t, _f32(scratch), scratch.size,
                                           ws, ws_bytes)
    finally:
        if held:
            _WS.lock.release()
    _check(status, f"experts_ffn_slots {lay.name} {impl}")
    return y


class SlotsFFN:
    """experts_ffn_slots of one token over a fixed set of slots, checked once: each call is then
    one C call (decode's resident experts, the same every token until the arena changes).
    slots and n_neurons are copied; scratch (h, at least their total neurons) is bound here; the
    arena and scratch must outlive this object. The last x and y's pointers are kept (decode
    passes the same two buffers every token)."""

    def __init__(self, layout, arena: np.ndarray, slot_bytes: int, slots: np.ndarray, n_neurons: np.ndarray,
                 scratch: np.ndarray):
        lay, slots, n_neurons, self.n_total = _checked_slots(layout, arena, slot_bytes, slots.copy(),
                                                             n_neurons.copy())
        _check_scratch(scratch, self.n_total)
        self.d_model, self.n_experts, self._lay = lay.d_model, slots.shape[0], lay
        self.scratch = scratch[:self.n_total]
        self._keep = (arena, slots, n_neurons, scratch)
        self._args = (lay.c, _u8(arena), slot_bytes, ffi.from_buffer("int32_t[]", slots),
                      ffi.from_buffer("int32_t[]", n_neurons), self.n_experts, ffi.NULL)
        self._scratch = (_f32(scratch), scratch.size)
        self._xy = (None, None, None, None, 0)  # x, y, their pointers, y's flag

    def _pointers(self, x: np.ndarray, y: np.ndarray):
        d = self.d_model
        if x.shape != (d,) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"x must be a contiguous float32 ({d},) array")
        py, flag = _ffn_y(y, (d,))
        if flag and self._lay.rows:
            raise ValueError(_FIXED_ROWS)
        self._xy = (x, y, _f32(x), py, flag)
        return self._xy

    def __call__(self, x: np.ndarray, y: np.ndarray, *, impl: str = "auto") -> None:
        """y += FFN(x) over the slots (x float32 (d_model,); y float32, or an int64 fixed-point
        accumulator as in experts_ffn_slots); self.scratch receives h."""
        xy = self._xy
        if x is not xy[0] or y is not xy[1]:
            xy = self._pointers(x, y)
        px, py = xy[2], xy[3]
        pool = _POOL.get()
        ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, 1, self.d_model, self.n_experts, self.n_total)
        try:
            status = lib.fic_experts_ffn_slots(pool, _decode_impl(impl) | xy[4], *self._args, px, py, 1,
                                               *self._scratch, ws, ws_bytes)
        finally:
            if held:
                _WS.lock.release()
        if status != 0:
            _check(status, f"experts_ffn_slots {self._lay.name} {impl}")

# ---- attention over an fp16 KV cache -------------------------------------------------------

class _AttentionWorkspace:
    """The process's attention workspace (per-thread tiles and decode partials), kept apart from
    the other kernels' scratch. Sized once by reserve_attention, or grown on demand; `growths`
    counts the reallocations so an engine can assert that none happened after it opened. The lock
    serializes attention calls: two calls at once would share the per-thread tiles."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf = np.empty(0, dtype=np.float32)
        self.ptr = _f32(self.buf)
        self.growths = 0
        self.need: dict[tuple[int, int, int, int], int] = {}  # (threads, t, heads, head_dim) -> floats

    def ensure(self, n_floats: int, *, reserve: bool = False) -> None:
        if self.buf.size < n_floats:
            self.buf = np.empty(n_floats, dtype=np.float32)
            self.ptr = _f32(self.buf)  # made once per size, not per call
            self.growths += 0 if reserve else 1


_ATTN_WS = _AttentionWorkspace()


def attention_ws_floats(n_threads: int, t: int, n_heads: int, head_dim: int) -> int:
    """Floats of attention workspace for t queries of n_heads x head_dim on n_threads threads."""
    n = lib.fic_attention_ws_floats(n_threads, t, n_heads, head_dim)
    if n < 0:
        raise ValueError(f"attention workspace: bad sizes (threads {n_threads}, t {t}, heads {n_heads},"
                         f" head_dim {head_dim})")
    return n


def reserve_attention(n_threads: int, max_t: int, n_heads: int, head_dim: int) -> None:
    """Size the attention workspace for calls of up to max_t queries (it only ever grows)."""
    with _ATTN_WS.lock:
        _ATTN_WS.ensure(attention_ws_floats(n_threads, max_t, n_heads, head_dim), reserve=True)


def attention_ws_growths() -> int:
    """How many times an attention call needed a larger workspace than the one held (a
    reservation does not count)."""
    return _ATTN_WS.growths


def _f16_cache(a: np.ndarray, name: str) -> np.ndarray:
    if (not isinstance(a, np.ndarray) or a.dtype != np.float16 or a.ndim != 3
            or not a.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous float16 array (ctx, n_kv_heads, head_dim)")
    return a


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float, *,
              out: np.ndarray | None = None, impl: str = "auto") -> np.ndarray:
    """Causal GQA attention of t queries at positions pos0..pos0+t-1 over one layer's fp16 cache.

    q: float32 (t, n_heads, head_dim), RoPE applied. k_cache, v_cache: C-contiguous float16
    (ctx, n_kv_heads, head_dim) with positions 0..pos0+t-1 filled. Query i sees positions
    0..pos0+i; head j reads kv head j // (n_heads // n_kv_heads). Returns (or fills `out`)
    float32 (t, n_heads, head_dim) = softmax(scale * q.k) v."""
    if not isinstance(q, np.ndarray) or q.dtype != np.float32 or q.ndim != 3:
        raise ValueError("q must be a float32 array (t, n_heads, head_dim)")
    _f16_cache(k_cache, "k_cache")
    _f16_cache(v_cache, "v_cache")
    t, n_heads, head_dim = q.shape
    ctx, n_kv, hd = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {v_cache.shape} and k_cache {k_cache.shape} differ")
    if hd != head_dim:
        raise ValueError(f"cache head_dim {hd} != q head_dim {head_dim}")
    if pos0 < 0 or pos0 + t > ctx:
        raise ValueError(f"positions {pos0}..{pos0 + t - 1} outside the cache's {ctx}")
    q = np.ascontiguousarray(q)
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != q.shape
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {q.shape}")
    pool = _POOL.get()
    key = (_POOL._n_threads, t, n_heads, head_dim)
    need = _ATTN_WS.need.get(key)
    if need is None:  # a C call, cached: decode calls this ~30 times a token
        need = _ATTN_WS.need[key] = max(0, lib.fic_attention_ws_floats(*key))
    with _ATTN_WS.lock:
        _ATTN_WS.ensure(need)
        # cffi does not check buffer formats: the float16 arrays go in as their uint16 bits.
        status = lib.fic_attention(pool, _impl_id(impl), _f32(q), ffi.from_buffer("uint16_t[]", k_cache),
                                   ffi.from_buffer("uint16_t[]", v_cache), _f32(out), t, pos0, n_heads, n_kv,
                                   head_dim, n_kv * head_dim, scale, _ATTN_WS.ptr, _ATTN_WS.buf.size)
    if status != lib.FIC_OK:
        _check(status, f"attention {impl}")
    return out


def rmsnorm_rows(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2, last axis) + eps) * w for a float32 x of any shape (a new C-contiguous
    array; the mean in double, fic_rmsnorm_rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if x.ndim == 0 or w.shape != x.shape[-1:]:
        raise ValueError(f"weights of shape {w.shape} for rows of {x.shape[-1:] if x.ndim else ()}")
    out = np.empty_like(x)
    n = x.shape[-1]
    _check(lib.fic_rmsnorm_rows(_f32(x), _f32(w), float(eps), x.size // n if n else 0, n, _f32(out)), "rmsnorm_rows")
    return out


def rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE (rotate-half) of x (T, heads, head_dim) with cos/sin (T, head_dim): a new C-contiguous
    float32 array (fic_rope_rows)."""
    out = np.array(x, dtype=np.float32, order="C")  # a copy: rotated in place
    cos = np.ascontiguousarray(cos, dtype=np.float32)
    sin = np.ascontiguousarray(sin, dtype=np.float32)
    if out.ndim != 3 or cos.shape != (out.shape[0], out.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"rope of {out.shape} with cos {cos.shape} and sin {sin.shape}")
    t, n_heads, hd = out.shape
    _check(lib.fic_rope_rows(_f32(out), t, n_heads, hd, _f32(cos), _f32(sin)), "rope_rows")
    return out


def f32_to_f16(src: np.ndarray, dst: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """dst[...] = src rounded to float16 (nearest even); both C-contiguous, same size; returns dst.
    dst may be float16 or uint16 (the bits), e.g. a row of the fp16 KV cache."""
    if not isinstance(src, np.ndarray) or src.dtype != np.float32 or not src.flags.c_contiguous:
        raise ValueError("src must be a C-contiguous float32 array")
    if (not isinstance(dst, np.ndarray) or dst.dtype not in (np.float16, np.uint16)
            or not dst.flags.c_contiguous or not dst.flags.writeable):
        raise ValueError("dst must be a writable C-contiguous float16 or uint16 array")
    if dst.size != src.size:
        raise ValueError(f"src has {src.size} elements, dst {dst.size}")
    _check(lib.fic_f32_to_f16_rows(_impl_id(impl), _f32(src), ffi.from_buffer("uint16_t[]", dst), src.size),
           f"f32_to_f16 {impl}")
    return dst


# ---- a decode token's attention block, fused (decode.c) -----------------------------------

QK_NORMS = {None: 0, "head": 1, "full": 2}  # fic_decode_shape.qk_norm


@dataclass(frozen=True)
class DecodeShape:
    """What fic_decode_attn needs to know of a model's attention. qk_norm: None, "head" (Qwen3)
    or "full" (one norm over all heads, OLMoE)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    scale: float
    qk_norm: str | None = None


@dataclass(frozen=True)
class AttnBlockWeights:
    """One layer's weights of the fused block: norms and biases float32, matrices QTensors."""

    attn_norm: np.ndarray
    wq: QTensor
    wk: QTensor
    wv: QTensor
    wo: QTensor
    ffn_norm: np.ndarray
    qkv_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


def _f32_exact(a: np.ndarray, n: int, name: str) -> np.ndarray:
    """A float32 vector of n elements that C may keep a pointer to (no copy is made here)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.size != n or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous float32 array of {n} elements")
    return a


class DecodeAttention:
    """The fused attention block of every layer of one model, prepared once (fic_decode_attn):
    cffi structs per layer, pointers to each layer's cache, x and xn, and one workspace sized at
    open. `run(layer, pos)` is then one C call: x += attention block, xn = rmsnorm(x, ffn_norm).

    k_cache, v_cache: float16 (n_layers, ctx, n_kv_heads, head_dim), C-contiguous; cos, sin:
    float32 (ctx, head_dim) rotate-half tables; x, xn: float32 (d_model,) buffers the caller
    reads and writes between calls. One model's decode runs on one thread at a time."""

    def __init__(self, shape: DecodeShape, layers: Sequence[AttnBlockWeights], cos: np.ndarray, sin: np.ndarray,
                 k_cache: np.ndarray, v_cache: np.ndarray, x: np.ndarray, xn: np.ndarray):
        if shape.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {shape.qk_norm!r}")
        d, nh, nkv, hd = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
        if k_cache.dtype != np.float16 or not k_cache.flags.c_contiguous or k_cache.ndim != 4 \
                or k_cache.shape[0] != len(layers) or k_cache.shape[2:] != (nkv, hd) or v_cache.shape != k_cache.shape \
                or v_cache.dtype != np.float16 or not v_cache.flags.c_contiguous:
            raise ValueError("k_cache and v_cache must be C-contiguous float16 (n_layers, ctx, n_kv_heads, head_dim)")
        self.ctx = k_cache.shape[1]
        if cos.shape != (self.ctx, hd) or sin.shape != cos.shape:
            raise ValueError(f"cos and sin must be ({self.ctx}, {hd})")
        self._keep = [cos, sin, k_cache, v_cache, x, xn]  # C holds pointers into these
        self.shape = ffi.new("fic_decode_shape *", {
            "d_model": d, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "norm_eps": shape.norm_eps,
            "scale": shape.scale, "qk_norm": QK_NORMS[shape.qk_norm]})
        self._cos = _f32(_f32_exact(cos, self.ctx * hd, "cos"))
        self._sin = _f32(_f32_exact(sin, self.ctx * hd, "sin"))
        self._x = _f32(_f32_exact(x, d, "x"))
        self._xn = _f32(_f32_exact(xn, d, "xn"))
        self._k = [ffi.from_buffer("uint16_t[]", k_cache[i]) for i in range(len(layers))]
        self._v = [ffi.from_buffer("uint16_t[]", v_cache[i]) for i in range(len(layers))]
        norm_n = {None: (0, 0), "head": (hd, hd), "full": (nh * hd, nkv * hd)}[shape.qk_norm]
        self._w = [self._layer(lw, d, nh * hd, nkv * hd, norm_n) for lw in layers]
        # the same as C arrays over every layer, for the calls that run them all (DecodeLayers, DecodeMoELayers)
        self._w_all = ffi.new("fic_attn_weights *[]", self._w)
        self._k_all, self._v_all = ffi.new("uint16_t *[]", self._k), ffi.new("uint16_t *[]", self._v)
        self.n_threads = 0
        self.growths = 0  # workspace reallocations after the first (a thread-count change)
        self._ws = self._ws_ptr = None
        self._ws_bytes = 0
        self._reserve(_POOL.n_threads)

    def _layer(self, lw: AttnBlockWeights, d: int, nq: int, nkv: int, norm_n: tuple[int, int]):
        for name, qt, rows, k in (("wq", lw.wq, nq, d), ("wk", lw.wk, nkv, d), ("wv", lw.wv, nkv, d),
                                  ("wo", lw.wo, d, nq)):
            if qt.shape != (rows, k):
                raise ValueError(f"{name} is {qt.shape}, expected ({rows}, {k})")
        vecs = {"attn_norm": (lw.attn_norm, d), "ffn_norm": (lw.ffn_norm, d)}
        if lw.qkv_bias is not None:
            vecs["qkv_bias"] = (lw.qkv_bias, nq + 2 * nkv)
        if norm_n[0]:
            vecs["q_norm"], vecs["k_norm"] = (lw.q_norm, norm_n[0]), (lw.k_norm, norm_n[1])
        fields = {name: _f32(_f32_exact(a, n, name)) for name, (a, n) in vecs.items()}
        for name in ("wq", "wk", "wv", "wo"):
            qt = getattr(lw, name)
            fields[name] = _u8(qt.data)
            fields[name[1] + "_fmt"] = _fmt_id(qt.fmt)
        self._keep.append((lw, fields))
        return ffi.new("fic_attn_weights *", fields)

    def _reserve(self, n_threads: int) -> None:
        n_bytes = lib.fic_decode_ws_bytes(n_threads, self.shape)
        if n_bytes < 0:
            raise ValueError(f"decode shape: {status_name(n_bytes)}")
        if n_bytes > self._ws_bytes:
            self.growths += 1 if self._ws is not None else 0
            self._ws = aligned_buffer(n_bytes)
            self._ws_ptr, self._ws_bytes = ffi.from_buffer("uint8_t[]", self._ws), n_bytes
        self.n_threads = n_threads

    @property
    def workspace_bytes(self) -> int:
        return self._ws_bytes

    def ready(self, pos: int):
        """The pool for a call at pos, the workspace sized for its threads; pos checked."""
        pool = _POOL.get()
        if _POOL._n_threads != self.n_threads:
            self._reserve(_POOL._n_threads)
        if not 0 <= pos < self.ctx:
            raise ValueError(f"position {pos} outside the cache's {self.ctx}")
        return pool

    def run(self, layer: int, pos: int, *, impl: str = "auto") -> None:
        """x += layer's attention block of the token at pos (its k, v written to the cache at pos);
        xn = rmsnorm(x, ffn_norm)."""
        pool = self.ready(pos)
        status = lib.fic_decode_attn(pool, _decode_impl(impl), self.shape, self._w[layer],
                                     self._cos, self._sin, self._k[layer], self._v[layer], pos, self._x, self._xn,
                                     self._ws_ptr, self._ws_bytes)
        if status != 0:
            _check(status, f"decode attention, layer {layer} {impl}")


class DecodeLayers:
    """A decode token through every layer in one C call (fic_decode_layers): layer l's attention
    block as attn.run(l, pos), then its FFN as calls[l](xn, acc or x) and, with acc, the flush of
    acc into x; the same C calls in the same order as those made one by one, so the same bits,
    without Python between layers. calls: each layer's SlotsFFN, all over one arena and one scratch
    (a runner's prepared resident calls); acc: their fixed-point accumulator (d_model int64, zero
    between tokens) or None. Made for one set of calls: the caller makes another when one changes."""

    def __init__(self, attn: DecodeAttention, calls: Sequence[SlotsFFN], acc: np.ndarray | None):
        if len(calls) != len(attn._w) or not calls:
            raise ValueError(f"{len(calls)} FFN calls for {len(attn._w)} layers")
        first = calls[0]
        d = int(attn.shape.d_model)
        for c in calls:
            if c._args[1] != first._args[1] or c._args[2] != first._args[2] or c._scratch[0] != first._scratch[0]:
                raise ValueError("the layers' FFN calls must share one arena and one scratch")
            if c.d_model != d:
                raise ValueError(f"an FFN call of d_model {c.d_model} in a model of {d}")
        if acc is not None and (acc.dtype != np.int64 or acc.shape != (d,) or not acc.flags.c_contiguous):
            raise ValueError(f"acc must be a contiguous int64 ({d},) array")
        self.attn, self.calls, self._acc_arr = attn, tuple(calls), acc
        self._ffn = ffi.new("fic_ffn_slots_call[]", [
            {"layout": c._args[0], "slots": c._args[3], "n_neurons": c._args[4], "n_experts": c.n_experts}
            for c in calls])
        self._acc = ffi.from_buffer("int64_t[]", acc) if acc is not None else ffi.NULL
        self._arena = first._args[1:3]
        self._scratch = first._scratch
        self._ws_need = (d, max(c.n_experts for c in calls), max(c.n_total for c in calls))

    def run(self, pos: int, *, impl: str = "auto") -> None:
        """Every layer for the token at pos: x (attn's) ends as the last layer's output, the cache
        holds the token's k, v in every layer."""
        a = self.attn
        pool = a.ready(pos)
        ws, ws_bytes, held = _ws_acquire(_POOL._n_threads, 1, *self._ws_need)
        try:
            status = lib.fic_decode_layers(pool, _decode_impl(impl), a.shape, len(self.calls), a._w_all,
                                           self._ffn, *self._arena, a._cos, a._sin, a._k_all, a._v_all, pos, a._x,
                                           a._xn, self._acc, *self._scratch, a._ws_ptr, a._ws_bytes, ws, ws_bytes)
        finally:
            if held:
                _WS.lock.release()
        if status != 0:
            _check(status, f"decode layers {impl}")


# ---- a decode token's mixture-of-experts layer, fused (moe.c) -----------------------------

@dataclass(frozen=True)
class MoEShape:
    """What fic_moe_* needs to know of one MoE layer (moe.RoutingRule's routing, in C's terms)."""

    d_model: int
    n_routed: int
    top_k: int
    softmax_after: bool = False
    norm_topk: bool = True
    shared_neurons: int = 0
    max_neurons: int = 1
    norm_eps: float = 1e-6

    def c_struct(self):
        return ffi.new("fic_moe_shape *", {
            "d_model": self.d_model, "n_routed": self.n_routed, "top_k": self.top_k,
            "softmax_after": int(self.softmax_after), "norm_topk": int(self.norm_topk),
            "shared_neurons": self.shared_neurons, "max_neurons": self.max_neurons, "norm_eps": self.norm_eps})


@dataclass(frozen=True)
class MoELayerWeights:
    """One MoE layer's dense weights: the router (n_routed, d_model) float32, the shared expert's
    gate, up, down (or None) and its sigmoid gate vector (or None)."""

    router: np.ndarray
    shared: tuple[QTensor, QTensor, QTensor] | None = None
    shared_gate: np.ndarray | None = None


class _MoEWorkspace:
    """A 64-byte-aligned workspace for fic_moe_* calls, sized for the given shapes and threads."""

    def __init__(self, shapes: Sequence) -> None:
        self.shapes, self.n_threads, self.buf, self.ptr, self.n_bytes = shapes, 0, None, None, 0
        self.growths = 0  # reallocations after the first (a thread-count change)

    def get(self):
        _POOL.get()  # the pool (and its thread count) exists from here
        if _POOL._n_threads != self.n_threads:
            n = max(lib.fic_moe_ws_bytes(_POOL._n_threads, s) for s in self.shapes)
            if n < 0:
                raise ValueError(f"MoE shape: {status_name(n)}")
            if n > self.n_bytes:
                self.growths += self.buf is not None
                self.buf = aligned_buffer(n)
                self.ptr, self.n_bytes = ffi.from_buffer("uint8_t[]", self.buf), n
            self.n_threads = _POOL._n_threads
        return self.ptr, self.n_bytes


class DecodeMoELayers:
    """A decode token through a mixture of experts' layers in one C call (fic_decode_moe_layers):
    layer l's attention block as attn.run(l, pos), then md.run(l, ...) over its resident experts;
    the same C calls in the same order, so the same bits. run(l0, pos) stops at the first layer
    whose picks are not all resident (its attention done, its routing in md.probs/coef/top) and
    returns it, for the caller to read and run that layer's experts and call again from the next.
    `tops[l, :n_top[l]]` hold each layer's picks. Allowed masks are set per layer (set_allowed)."""

    def __init__(self, attn: DecodeAttention, md: MoEDecode):
        n = len(attn._w)
        if len(md._shapes) != n:
            raise ValueError(f"{len(md._shapes)} MoE layers for {n} attention layers")
        self.attn, self.md, self.n_layers = attn, md, n
        k_max = int(md.top.shape[0])
        self.tops = np.zeros((n, k_max), np.int32)
        self.n_top = np.zeros(n, np.int32)
        self._calls = ffi.new("fic_moe_layer_call[]", [
            {"shape": md._shapes[l], "w": md._w[l], "layout": md._lays[l].c, "slot_of": md._rows[l][0], "n_neurons": md._rows[l][1],
             "allowed": ffi.NULL, "top": ffi.from_buffer("int32_t[]", self.tops[l])} for l in range(n)])
        self._allowed: list = [None] * n
        self._n_top = ffi.from_buffer("int32_t[]", self.n_top)
        self._out = md._out[:2]

    def set_allowed(self, layer: int, allowed: np.ndarray | None) -> None:
        """Layer's mask of the experts that may run (None: all); the pointer is made once per mask."""
        if allowed is not self._allowed[layer]:
            self._calls[layer].allowed = self.md._allowed_of(layer, allowed)
            self._allowed[layer] = allowed

    def run(self, l0: int, pos: int, *, impl: str = "auto") -> int:
        a, md = self.attn, self.md
        pool = a.ready(pos)
        if not 0 <= l0 <= self.n_layers:
            raise ValueError(f"layer {l0} outside 0..{self.n_layers}")
        ptr, n_bytes = md._ws.get()
        st = lib.fic_decode_moe_layers(pool, _decode_impl(impl), a.shape, l0, self.n_layers, a._w_all,
                                       self._calls, *md._arena, a._cos, a._sin, a._k_all, a._v_all, pos,
                                       a._x, a._xn, *self._out, self._n_top, a._ws_ptr, a._ws_bytes, ptr, n_bytes)
        if st < 0:
            _check(st, f"decode moe layers {impl}")
        return st


def moe_ws_bytes(n_threads: int, shape: MoEShape) -> int:
    """fic_moe_ws_bytes: MoEDecode's workspace for one layer shape (the plan counts it)."""
    n = lib.fic_moe_ws_bytes(n_threads, shape.c_struct())
    if n < 0:
        raise ValueError(f"MoE shape: {status_name(n)}")
    return n


def _allowed_ptr(allowed: np.ndarray | None, n: int):
    if allowed is None:
        return ffi.NULL
    if not isinstance(allowed, np.ndarray) or allowed.dtype not in (np.uint8, np.bool_) or allowed.shape != (n,) \
            or not allowed.flags.c_contiguous:
        raise ValueError(f"allowed must be a contiguous bool or uint8 array of {n} elements")
    return ffi.from_buffer("uint8_t[]", allowed.view(np.uint8))


def moe_route(router: np.ndarray, x: np.ndarray, *, top_k: int, softmax_after: bool = False, norm_topk: bool = True,
              allowed: np.ndarray | None = None, impl: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fic_moe_route of one token: (coef (E,), probs (E,), top (picked,) int32 in rank order) for
    router (E, d) float32 and x (d,); the C twin of moe.route (see there for the rules)."""
    router = _f32_matrix(router, "router")
    e, d = router.shape
    x = _f32_vector(x, d, "x")
    shape = MoEShape(d, e, top_k, softmax_after, norm_topk)
    s = shape.c_struct()
    ws = _MoEWorkspace([s])
    probs, coef, top = np.empty(e, np.float32), np.empty(e, np.float32), np.empty(top_k, np.int32)
    ptr, n_bytes = ws.get()
    n = lib.fic_moe_route(_POOL.get(), _decode_impl(impl), s, _f32(router), _f32(x), _allowed_ptr(allowed, e),
                          _f32(probs), _f32(coef), ffi.from_buffer("int32_t[]", top), ptr, n_bytes)
    if n < 0:
        _check(n, f"moe_route {impl}")
    return coef, probs, top[:n]


class MoEDecode:
    """The MoE layers of one model, prepared once for decode (fic_moe_decode and its parts): per
    layer a shape and weights struct, pointers into the arena and its slot table (read at each
    call, so they follow the arena's changes), and one workspace sized at open. After a call,
    `probs`, `coef` (n_routed floats of the last layer called) and `top` (its picks, rank order)
    hold the routing. One model's decode runs on one thread at a time."""

    def __init__(self, shapes: Sequence[MoEShape], weights: Sequence[MoELayerWeights], layout, arena: np.ndarray,
                 slot_bytes: int, slot_of: np.ndarray, n_neurons: np.ndarray):
        if len(shapes) != len(weights) or slot_of.shape[0] != len(shapes) or n_neurons.shape != slot_of.shape \
                or slot_of.dtype != np.int32 or n_neurons.dtype != np.int32 or not slot_of.flags.c_contiguous:
            raise ValueError("one shape and weights per layer; slot_of and n_neurons int32 (n_layers, experts)")
        # per layer: an fmt.ExpertLayout names each layer's (layer(i)); anything else serves them all
        self._lays = [_checked_slots(layout.layer(i) if hasattr(layout, "layer") else layout, arena, slot_bytes,
                                     np.zeros(0, np.int32), np.zeros(0, np.int32))[0] for i in range(len(shapes))]
        self._lay = self._lays[0] if self._lays else None
        self._n_neurons = np.ascontiguousarray(n_neurons)
        self._keep = [arena, slot_of, self._n_neurons, list(weights)]
        self._shapes = [s.c_struct() for s in shapes]
        self.n_routed = [s.n_routed for s in shapes]
        self._w = [self._layer(s, w) for s, w in zip(shapes, weights)]
        e_max, k_max = max(self.n_routed), max(s.top_k for s in shapes)
        self.probs, self.coef = np.zeros(e_max, np.float32), np.zeros(e_max, np.float32)
        self.top, self.guessed = np.zeros(k_max, np.int32), np.zeros(k_max, np.int32)
        self._n_top = ffi.new("int32_t[1]")
        self._out = (_f32(self.probs), _f32(self.coef), ffi.from_buffer("int32_t[]", self.top))
        self._guessed = ffi.from_buffer("int32_t[]", self.guessed)
        self._arena = (_u8(arena), slot_bytes)
        self._rows = [(ffi.from_buffer("int32_t[]", slot_of[i]), ffi.from_buffer("int32_t[]", self._n_neurons[i]))
                      for i in range(len(shapes))]
        self._ws = _MoEWorkspace(self._shapes)
        self._ws.get()
        self._xy = (None, None, None, None)
        self._allowed: list[tuple] = [(None, ffi.NULL)] * len(shapes)

    def _layer(self, s: MoEShape, w: MoELayerWeights):
        if w.router.shape != (s.n_routed, s.d_model):
            raise ValueError(f"router is {w.router.shape}, expected ({s.n_routed}, {s.d_model})")
        fields = {"router": _f32(_f32_exact(w.router, s.n_routed * s.d_model, "router"))}
        if s.shared_neurons:
            gate, up, down = w.shared
            n, d = s.shared_neurons, s.d_model
            for name, qt, shape in (("gate", gate, (n, d)), ("up", up, (n, d)), ("down", down, (d, n))):
                if qt.shape != shape:
                    raise ValueError(f"shared {name} is {qt.shape}, expected {shape}")
                fields[f"shared_w_{name}"] = _u8(qt.data)
                fields[f"{name}_fmt"] = _fmt_id(qt.fmt)
            if w.shared_gate is not None:
                fields["shared_gate"] = _f32(_f32_exact(w.shared_gate, d, "shared_gate"))
        self._keep.append(fields)
        return ffi.new("fic_moe_weights *", fields)

    def _pointers(self, x: np.ndarray, y: np.ndarray):
        d = self._lay.d_model
        if x.shape != (d,) or y.shape != (d,) or x.dtype != np.float32 or y.dtype != np.float32 \
                or not x.flags.c_contiguous or not y.flags.c_contiguous or not y.flags.writeable:
            raise ValueError(f"xn and x must be contiguous float32 ({d},) arrays, x writable")
        self._xy = (x, y, _f32(x), _f32(y))
        return self._xy[2], self._xy[3]

    def _xn_x(self, xn: np.ndarray, x: np.ndarray):
        xy = self._xy
        return (xy[2], xy[3]) if xn is xy[0] and x is xy[1] else self._pointers(xn, x)

    def _allowed_of(self, layer: int, allowed: np.ndarray | None):
        """The mask's pointer, made once per mask object (prune mode's sets change per prompt)."""
        held = self._allowed[layer]
        if held[0] is not allowed:
            self._allowed[layer] = held = (allowed, _allowed_ptr(allowed, self.n_routed[layer]))
        return held[1]

    def run(self, layer: int, xn: np.ndarray, x: np.ndarray, allowed: np.ndarray | None = None, *,
            impl: str = "auto") -> int:
        """x += the layer's routed experts and shared expert of xn, when every expert the token
        picks is resident: returns 0. Otherwise returns how many are not (x untouched; coef,
        probs and top hold the routing, for the caller to stream them)."""
        px, py = self._xn_x(xn, x)
        ptr, n_bytes = self._ws.get()
        st = lib.fic_moe_decode(_POOL.get(), _decode_impl(impl), self._shapes[layer], self._w[layer],
                                self._lays[layer].c,
                                *self._arena, *self._rows[layer], self._allowed_of(layer, allowed), px, py,
                                *self._out, self._n_top, ptr, n_bytes)
        if st < 0:
            _check(st, f"moe_decode, layer {layer} {impl}")
        return st

    @property
    def n_top(self) -> int:
        return int(self._n_top[0])

    def route(self, layer: int, xn: np.ndarray, allowed: np.ndarray | None = None, *, impl: str = "auto") -> int:
        """The routing only (probs, coef, top); returns the count picked."""
        ptr, n_bytes = self._ws.get()
        px = _f32(_f32_vector(xn, self._lay.d_model, "xn"))
        n = lib.fic_moe_route(_POOL.get(), _decode_impl(impl), self._shapes[layer], self._w[layer].router, px,
                              self._allowed_of(layer, allowed), *self._out, ptr, n_bytes)
        if n < 0:
            _check(n, f"moe_route, layer {layer} {impl}")
        self._n_top[0] = n
        return n

    def guess(self, layer: int, x: np.ndarray, ffn_norm: np.ndarray, *, impl: str = "auto") -> np.ndarray:
        """The top_k experts of layer's router on rmsnorm(x, ffn_norm): a copy (int32)."""
        d = self._lay.d_model
        x, ffn_norm = _f32_vector(x, d, "x"), _f32_vector(ffn_norm, d, "ffn_norm")
        ptr, n_bytes = self._ws.get()
        n = lib.fic_moe_guess(_POOL.get(), _decode_impl(impl), self._shapes[layer], self._w[layer].router,
                              _f32(ffn_norm), _f32(x), self._guessed, ptr, n_bytes)
        if n < 0:
            _check(n, f"moe_guess, layer {layer} {impl}")
        return self.guessed[:n].copy()

    def shared(self, layer: int, xn: np.ndarray, x: np.ndarray, *, impl: str = "auto") -> None:
        """x += the layer's shared expert of xn (nothing without one)."""
        px, py = self._xn_x(xn, x)
        ptr, n_bytes = self._ws.get()
        st = lib.fic_moe_shared(_POOL.get(), _decode_impl(impl), self._shapes[layer], self._w[layer], px, py,
                                ptr, n_bytes)
        if st != 0:
            _check(st, f"moe_shared, layer {layer} {impl}")


# ---- memory --------------------------------------------------------------------------------

def aligned_buffer(n_bytes: int, *, huge: bool = False) -> np.ndarray:
    """A zeroed uint8 array, 4 KiB aligned (2 MiB and transparent huge pages when huge),
    freed when the array is garbage collected."""
    if n_bytes <= 0:
        raise ValueError(f"buffer size must be positive, got {n_bytes}")
    ptr = lib.fic_alloc(n_bytes, 1 if huge else 0)
    if ptr == ffi.NULL:
        raise MemoryError(f"cannot allocate {n_bytes} bytes")
    ptr = ffi.gc(ptr, lib.fic_free, size=n_bytes)
    # np.frombuffer keeps the cffi buffer (and so `ptr`) alive as the array's base.
    return np.frombuffer(ffi.buffer(ptr, n_bytes), dtype=np.uint8)


# ---- CRC32C and the bundle reader ----------------------------------------------------------

def crc32c(data: bytes | np.ndarray, crc: int = 0, *, impl: str = "auto") -> int:
    """CRC32C (Castagnoli) of data, continuing from crc (0 to start)."""
    buf = ffi.from_buffer("uint8_t[]", data)
    fn = lib.fic_crc32c_ref if impl == "ref" else lib.fic_crc32c
    return fn(crc, buf, len(buf))


@dataclass
class ReadRequest:
    """One read: `length` bytes at `offset` into `dst` (a uint8 array), CRC-checked if `crc32c`."""

    offset: int
    length: int
    dst: np.ndarray
    crc32c: int | None = None


@dataclass(frozen=True)
class ReadResult:
    status: str  # "ok", "io", "short", "crc" or "arg"
    n_read: int
    errno: int


def probe_io(directory: str | os.PathLike) -> tuple[str, bool, str | None]:
    """(backend, O_DIRECT, why pread) that a Reader gets for files in `directory`: the filesystem
    decides O_DIRECT, the kernel (and a seccomp policy) io_uring; the third is Reader.pread_reason."""
    import tempfile

    with tempfile.NamedTemporaryFile(dir=directory, prefix=".fic-probe-") as f:
        f.write(b"\0" * DIRECT_ALIGN)
        f.flush()
        with Reader(f.name) as reader:
            return reader.backend, reader.direct, reader.pread_reason


# ---- fault injection (FIC_FAULTS) ------------------------------------------------------------

FAULT_KINDS = ("eio", "eagain", "eintr", "short", "slow")  # enum fic_fault_kind's order
_FAULT_KEYS = {"every", "count", "after"}


@dataclass(frozen=True)
class FaultRule:
    every: int = 1
    count: int = 0   # most hits, 0: no limit
    after: int = 0   # read operations 1..after are never hit
    arg: int = 0     # slow: microseconds


@dataclass(frozen=True)
class Faults:
    """Parsed FIC_FAULTS (see parse_faults); `spec` is the text it came from."""

    spec: str = ""
    rules: dict = field(default_factory=dict)  # kind -> FaultRule
    seed: int = 0
    uring_setup_errno: int = 0

    def __bool__(self) -> bool:
        return bool(self.rules) or self.uring_setup_errno != 0


def _fault_int(spec: str, term: str, key: str, value: str, lowest: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        n = None
    if n is None or n < lowest or n >= 1 << 62:
        raise ValueError(f"FIC_FAULTS={spec!r}: {term!r}: {key} must be an integer >= {lowest}")
    return n


def parse_faults(spec: str | None) -> Faults:
    """Parse a fault-injection spec (the FIC_FAULTS environment variable), for tests:

        eio:every=7,short:every=3,eagain:every=5,slow:ms=2,seed=1
        uring_setup:EPERM

    Comma-separated terms. KIND[:key=value]... with KIND one of eio (the read fails with EIO),
    eagain, eintr (the read fails with that errno and is retried), short (the read returns about
    half of what it asked; the rest is read again), slow (the read is delayed by ms=N or us=N,
    default 1 ms); keys every=N (hit every N-th read operation, default 1), count=N (at most N
    hits), after=N (never among the first N operations). seed=N shifts every rule's phase.
    uring_setup:ERRNO (EPERM, ENOSYS or a number): io_uring is refused as a seccomp policy or an
    old kernel refuses it, so the reader falls back to pread. Empty or None: no faults."""
    import errno as errno_mod

    spec = (spec or "").strip()
    rules: dict[str, FaultRule] = {}
    seed, uring_errno = 0, 0
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        head, *params = [p.strip() for p in term.split(":")]
        if head.startswith("seed="):
            if params:
                raise ValueError(f"FIC_FAULTS={spec!r}: {term!r}: seed takes no parameters")
            seed = _fault_int(spec, term, "seed", head[5:], 0)
            continue
        if head == "uring_setup":
            if len(params) != 1 or not params[0]:
                raise ValueError(f"FIC_FAULTS={spec!r}: {term!r}: say which errno, e.g. uring_setup:EPERM")
            name = params[0].upper()
            uring_errno = getattr(errno_mod, name, None) if name.startswith("E") else \
                _fault_int(spec, term, "the errno", params[0], 1)
            if not isinstance(uring_errno, int) or uring_errno <= 0:
                raise ValueError(f"FIC_FAULTS={spec!r}: {term!r}: unknown errno {params[0]!r}")
            continue
        if head not in FAULT_KINDS:
            raise ValueError(f"FIC_FAULTS={spec!r}: unknown fault {head!r} "
                             f"(known: {', '.join(FAULT_KINDS)}, uring_setup, seed)")
        if head in rules:
            raise ValueError(f"FIC_FAULTS={spec!r}: {head!r} given twice")
        vals = {"every": 1, "count": 0, "after": 0, "arg": 1000 if head == "slow" else 0}
        for p in params:
            key, eq, value = p.partition("=")
            key = key.strip()
            if not eq or (key not in _FAULT_KEYS and not (head == "slow" and key in ("ms", "us"))):
                known = sorted(_FAULT_KEYS | ({"ms", "us"} if head == "slow" else set()))
                raise ValueError(f"FIC_FAULTS={spec!r}: {term!r}: {p!r} is not one of {', '.join(k + '=N' for k in known)}")
            if key in ("ms", "us"):
                n = _fault_int(spec, term, key, value.strip(), 0)
                vals["arg"] = n * 1000 if key == "ms" else n
            else:
                vals[key] = _fault_int(spec, term, key, value.strip(), 1 if key == "every" else 0)
        rules[head] = FaultRule(**vals)
    return Faults(spec, rules, seed, uring_errno)


def _c_faults(faults: Faults):
    """The fic_faults struct for faults, or NULL for none."""
    if not faults:
        return ffi.NULL
    c = ffi.new("fic_faults *")
    for i, kind in enumerate(FAULT_KINDS):
        rule = faults.rules.get(kind)
        if rule is not None:
            c.rules[i].every, c.rules[i].count, c.rules[i].after, c.rules[i].arg = \
                rule.every, rule.count, rule.after, rule.arg
    c.seed = faults.seed
    c.uring_setup_errno = faults.uring_setup_errno
    return c


class Reader:
    """Batched reads from one file: io_uring (or pread threads), O_DIRECT when possible.

    faults: a fault-injection spec (parse_faults); None reads FIC_FAULTS from the environment."""

    def __init__(self, path: str | os.PathLike, *, backend: str | None = None, queue_depth: int = 32,
                 n_threads: int = 4, direct: bool = True, faults: str | None = None):
        self._ptr = None
        # The batch in flight, weakly: a PendingRead holds its reader (it must outlive the batch), and
        # a strong reference back would make a cycle. The garbage collector finalizes what it frees
        # in any order: the C reader's destructor, then a PendingRead's __del__ waiting on the freed
        # reader, was a use after free (found by AddressSanitizer). Without the cycle refcounting
        # frees the PendingRead first; where something else's cycle takes both, _closed says the
        # destructor already ran (fic_reader_close finishes the batch) and the wait is skipped.
        self._pending: weakref.ref | None = None
        self._held: list = []  # the C request arrays and buffers of the batch in flight
        self._closed = _Closed()
        self._forced = None  # what asked for a backend: "FIC_IO=..." or "asked for"
        if backend is None:
            backend = os.environ.get("FIC_IO", "auto")
            if backend != "auto":
                self._forced = f"FIC_IO={backend}"
        elif backend != "auto":
            self._forced = "asked for"
        if backend not in IO_BACKENDS:
            raise ValueError(f"unknown io backend {backend!r} (known: {', '.join(IO_BACKENDS)})")
        if queue_depth < 1 or n_threads < 1:
            raise ValueError("queue_depth and n_threads must be at least 1")
        self.faults = parse_faults(os.environ.get("FIC_FAULTS") if faults is None else faults)
        self.path = os.fspath(path)
        out = ffi.new("fic_reader **")
        err = ffi.new("int *")
        flags = 0 if direct else lib.FIC_OPEN_NO_DIRECT
        status = lib.fic_reader_open(self.path.encode(), IO_BACKENDS[backend], queue_depth, n_threads,
                                     flags, _c_faults(self.faults), out, err)
        if status == lib.FIC_ERR_OPEN:
            raise OSError(err[0], f"{self.path}: {os.strerror(err[0])}")
        if status == lib.FIC_ERR_UNSUPPORTED and err[0]:
            raise NotImplementedError(f"open {self.path}: io_uring refused ({_errno_name(err[0])}"
                                      f"{', injected by FIC_FAULTS' if self.faults.uring_setup_errno else ''})")
        _check(status, f"open {self.path}")
        self._ptr = ffi.gc(out[0], self._closed.close)

    @property
    def backend(self) -> str:
        return "io_uring" if lib.fic_reader_backend(self._ptr) == lib.FIC_IO_URING else "pread"

    @property
    def direct(self) -> bool:
        return bool(lib.fic_reader_direct(self._ptr))

    @property
    def uring_errno(self) -> int:
        """The errno io_uring was refused with (0: the reader is on io_uring, or pread was asked for)."""
        return lib.fic_reader_uring_errno(self._ptr)

    @property
    def pread_reason(self) -> str | None:
        """Why the reader uses pread ('FIC_IO=pread', 'io_uring refused: EPERM', ...); None on io_uring."""
        if self.backend != "pread":
            return None
        e = self.uring_errno
        if e:
            injected = ", injected by FIC_FAULTS" if self.faults.uring_setup_errno else ""
            return f"io_uring refused: {_errno_name(e)}{injected}"
        return self._forced or "pread"

    def describe(self) -> str:
        """One line for --verbose: 'io_uring, O_DIRECT', 'pread (io_uring refused: EPERM), page cache'."""
        why = self.pread_reason
        line = f"{self.backend}{f' ({why})' if why else ''}, {'O_DIRECT' if self.direct else 'page cache'}"
        if self.faults.rules:
            line += f"; faults injected (FIC_FAULTS={self.faults.spec})"
        return line

    def fault_hits(self) -> dict[str, int]:
        """Faults injected so far, by kind, and 'ops': the read operations counted while rules were on."""
        out = {kind: lib.fic_reader_fault_hits(self._ptr, i) for i, kind in enumerate(FAULT_KINDS)}
        out["ops"] = lib.fic_reader_fault_hits(self._ptr, lib.FIC_FAULT_KINDS)
        return out

    def set_faults(self, faults: str | None) -> None:
        """Replace the fault rules ('' or None: none); the operation count restarts. Not while a
        submitted batch is in flight (RuntimeError). io_uring's refusal only applies at open."""
        parsed = parse_faults(faults)
        status = lib.fic_reader_set_faults(self._ptr, _c_faults(parsed))
        if status == lib.FIC_ERR_ARG:
            raise RuntimeError(f"{self.path}: faults cannot change while a batch is in flight")
        _check(status, f"set faults on {self.path}")
        self.faults = parsed

    @property
    def size(self) -> int:
        return lib.fic_reader_size(self._ptr)

    @property
    def busy(self) -> bool:
        """True while a submitted batch's reads are still running (its wait() would block)."""
        return bool(lib.fic_reader_busy(self._ptr))

    def read(self, requests: Sequence[ReadRequest]) -> list[ReadResult]:
        """Perform every request; each result says what happened to its request."""
        n = len(requests)
        if n == 0:
            return []
        reqs, keep = _c_requests(requests)
        lib.fic_reader_read(self._ptr, reqs, n)
        del keep  # the cffi buffers had to outlive the call
        return _results(reqs, n)

    def read_checked(self, requests: Sequence[ReadRequest]) -> None:
        """As read(), but raise ReadError naming the first failed request."""
        _raise_first_error(self.path, requests, self.read(requests))

    def submit(self, requests: Sequence[ReadRequest]) -> "PendingRead":
        """Start reading every request and return at once; the reader's I/O thread does the reads
        (and CRC checks) while the caller works. Collect with PendingRead.wait(). One batch at a
        time: RuntimeError while another submitted batch has not been waited for. The request
        destinations must not be touched until wait() returns."""
        if self._ptr is None:
            raise ValueError(f"{self.path}: reader is closed")
        reqs, keep = _c_requests(requests)
        # The reader holds what the I/O thread writes into from before the C call on: a Ctrl-C
        # that lands anywhere after it cannot free them under the I/O thread (settle() lets go).
        self._held.append((reqs, keep))
        status = lib.fic_reader_submit(self._ptr, reqs if requests else ffi.NULL, len(requests))
        if status != lib.FIC_OK:
            self._held.pop()
        if status == lib.FIC_ERR_ARG:  # the arguments are well formed: the reader is taken
            raise RuntimeError(f"{self.path}: a batch is already in flight on this reader")
        _check(status, f"submit to {self.path}")
        pending = PendingRead(self, requests, reqs, keep)
        self._pending = weakref.ref(pending)  # so close() can finish it before freeing the reader
        return pending

    def settle(self) -> None:
        """Wait for a submitted batch that nobody collected (its caller was interrupted anywhere
        between submit and wait, even before submit returned), so the reader takes the next
        batch and writes nothing later."""
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            pending.wait()
        elif self._ptr is not None:
            lib.fic_reader_wait(self._ptr)  # a batch whose PendingRead never came to be
        self._held.clear()

    def close(self) -> None:
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            pending.wait()  # the C reader must not be freed under a batch in flight
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            ffi.gc(ptr, None)  # detaches the destructor (returns None), so close runs once
            self._closed.close(ptr)

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Closed:
    """Closes a C reader once and remembers that it did (see Reader._pending)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def close(self, ptr) -> None:
        self.done = True
        lib.fic_reader_close(ptr)


class PendingRead:
    """A batch handed to Reader.submit. wait() blocks until its reads are done and returns their
    results (the same ones on every call). Holds the C request array and the destination buffers
    until then: dropping it unwaited waits in __del__, so the C side never writes into freed memory."""

    def __init__(self, reader: Reader, requests: Sequence[ReadRequest], reqs, keep: list):
        self._reader: Reader | None = reader  # None once waited for
        self._path = reader.path
        self._requests = requests
        self._reqs = reqs
        self._keep = keep
        self._results: list[ReadResult] | None = None

    def done(self) -> bool:
        """True when wait() would not block."""
        return self._results is not None or not self._reader.busy

    def wait(self) -> list[ReadResult]:
        """Block until every request has finished; each result says what happened to its request."""
        if self._results is None:
            # interrupted at any line here, a second wait() finishes the job
            reader = self._reader
            if not reader._closed.done:  # else fic_reader_close finished the batch
                lib.fic_reader_wait(reader._ptr)  # releases the GIL while it blocks
            self._results = _results(self._reqs, len(self._requests))
            reader._pending = None
            reader._held.clear()
            self._reader = None
            self._reqs = self._keep = None
        return self._results

    def wait_checked(self) -> None:
        """As wait(), but raise ReadError naming the first failed request."""
        _raise_first_error(self._path, self._requests, self.wait())

    def __del__(self) -> None:
        if getattr(self, "_results", True) is None:
            self.wait()


def _c_requests(requests: Sequence[ReadRequest]):
    """The fic_read_req array for requests, and the cffi buffers that must outlive its use."""
    n = len(requests)
    reqs = ffi.new("fic_read_req[]", n) if n else ffi.NULL
    keep = []
    for i, rq in enumerate(requests):
        if rq.dst.dtype != np.uint8 or not rq.dst.flags.c_contiguous or rq.dst.nbytes < rq.length:
            raise ValueError(f"request {i}: dst must be a contiguous uint8 array of at least {rq.length} bytes")
        buf = ffi.from_buffer("uint8_t[]", rq.dst, require_writable=True)
        keep.append(buf)
        c = reqs[i]
        c.offset = rq.offset
        c.length = rq.length
        c.dst = buf
        c.crc32c = rq.crc32c or 0
        c.check_crc = 0 if rq.crc32c is None else 1
    return reqs, keep


def _errno_name(e: int) -> str:
    import errno as errno_mod

    return errno_mod.errorcode.get(e, str(e))


def _results(reqs, n: int) -> list[ReadResult]:
    return [ReadResult(_read_status(reqs[i].status), reqs[i].n_read, reqs[i].sys_errno) for i in range(n)]


def _raise_first_error(path: str, requests: Sequence[ReadRequest], results: list[ReadResult]) -> None:
    for rq, res in zip(requests, results):
        if res.status != "ok":
            detail = os.strerror(res.errno) if res.status == "io" else _READ_DETAIL.get(res.status, res.status)
            raise ReadError(f"{path}: {detail} reading {rq.length} bytes at offset {rq.offset}"
                            f" ({res.n_read} read)", res.status)


_READ_DETAIL = {"short": "unexpected end of file", "crc": "checksum mismatch",
                "arg": "misaligned request (O_DIRECT needs 4096-byte alignment)"}
