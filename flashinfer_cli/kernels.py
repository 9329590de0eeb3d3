"""The binding to fic's C core: the only module that imports the compiled `_fic`.

It checks shapes and dtypes, turns status codes into exceptions and keeps one thread pool for
the process. Everything above it speaks numpy arrays, QTensor and Reader.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from flashinfer_cli._fic import ffi, lib

FORMATS: dict[str, int] = {
    "f32": lib.FIC_F32,
    "f16": lib.FIC_F16,
    "q8_0": lib.FIC_Q8_0,
    "q4_0": lib.FIC_Q4_0,
    "q4_1": lib.FIC_Q4_1,
    "q1_0": lib.FIC_Q1_0,
}
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

def _fmt_id(fmt: str) -> int:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})") from None


def block_weights(fmt: str) -> int:
    """Weights per block of `fmt` (1 for f32/f16)."""
    return lib.fic_fmt_block_weights(_fmt_id(fmt))


def block_bytes(fmt: str) -> int:
    return lib.fic_fmt_block_bytes(_fmt_id(fmt))


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
    w = _f32_matrix(w, "weights")
    m, k = w.shape
    data = np.empty(m * row_bytes(fmt, k), dtype=np.uint8)
    _check(lib.fic_quantize(_fmt_id(fmt), _f32(w), _u8(data), m, k), f"quantize {fmt}")
    return QTensor(fmt, (m, k), data)


def dequantize(qt: QTensor) -> np.ndarray:
    m, k = qt.shape
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


def get_threads() -> int:
    return _POOL.n_threads


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
    status = lib.fic_matvec(_POOL.get(), _impl_id(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(x), _f32(y), m, k)
    _check(status, f"matvec {qt.fmt} {impl}")
    return y


def matmul(qt: QTensor, x: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """Y = X Wᵀ: W is (M, K) quantized, X is float32 (T, K); returns float32 (T, M)."""
    m, k = qt.shape
    x = _f32_matrix(x, "X")
    if x.shape[1] != k:
        raise ValueError(f"X has {x.shape[1]} columns, weights have {k}")
    t = x.shape[0]
    y = np.empty((t, m), dtype=np.float32)
    status = lib.fic_matmul(_POOL.get(), _impl_id(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(x), _f32(y), t, m, k)
    _check(status, f"matmul {qt.fmt} {impl}")
    return y


def accum_rows(qt: QTensor, a: np.ndarray, y: np.ndarray, *, impl: str = "auto") -> np.ndarray:
    """y += Σ_i a[i] · W[i] in place: W is (N, K) quantized, a is float32 (N,), y float32 (K,)."""
    n_rows, k = qt.shape
    a = _f32_vector(a, n_rows, "a")
    if not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.shape != (k,) or not y.flags.c_contiguous:
        raise ValueError(f"y must be a contiguous float32 array of shape ({k},)")
    status = lib.fic_accum_rows(_POOL.get(), _impl_id(impl), _fmt_id(qt.fmt), _u8(qt.data), _f32(a), _f32(y), n_rows, k)
    _check(status, f"accum_rows {qt.fmt} {impl}")
    return y


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


class Reader:
    """Batched reads from one file: io_uring (or pread threads), O_DIRECT when possible."""

    def __init__(self, path: str | os.PathLike, *, backend: str | None = None, queue_depth: int = 32,
                 n_threads: int = 4, direct: bool = True):
        if backend is None:
            backend = os.environ.get("FIC_IO", "auto")
        if backend not in IO_BACKENDS:
            raise ValueError(f"unknown io backend {backend!r} (known: {', '.join(IO_BACKENDS)})")
        if queue_depth < 1 or n_threads < 1:
            raise ValueError("queue_depth and n_threads must be at least 1")
        self.path = os.fspath(path)
        out = ffi.new("fic_reader **")
        err = ffi.new("int *")
        flags = 0 if direct else lib.FIC_OPEN_NO_DIRECT
        status = lib.fic_reader_open(self.path.encode(), IO_BACKENDS[backend], queue_depth, n_threads,
                                     flags, out, err)
        if status == lib.FIC_ERR_OPEN:
            raise OSError(err[0], f"{self.path}: {os.strerror(err[0])}")
        _check(status, f"open {self.path}")
        self._ptr = ffi.gc(out[0], lib.fic_reader_close)

    @property
    def backend(self) -> str:
        return "io_uring" if lib.fic_reader_backend(self._ptr) == lib.FIC_IO_URING else "pread"

    @property
    def direct(self) -> bool:
        return bool(lib.fic_reader_direct(self._ptr))

    @property
    def size(self) -> int:
        return lib.fic_reader_size(self._ptr)

    def read(self, requests: Sequence[ReadRequest]) -> list[ReadResult]:
        """Perform every request; each result says what happened to its request."""
        n = len(requests)
        if n == 0:
            return []
        reqs = ffi.new("fic_read_req[]", n)
        keep = []  # cffi buffers must outlive the call
        for i, rq in enumerate(requests):
            if rq.dst.dtype != np.uint8 or not rq.dst.flags.c_contiguous or rq.dst.nbytes < rq.length:
                raise ValueError(f"request {i}: dst must be a contiguous uint8 array of at least {rq.length} bytes")
            buf = ffi.from_buffer("uint8_t[]", rq.dst, require_writable=True)
            keep.append(buf)
            reqs[i].offset = rq.offset
            reqs[i].length = rq.length
            reqs[i].dst = buf
            reqs[i].crc32c = rq.crc32c or 0
            reqs[i].check_crc = 0 if rq.crc32c is None else 1
        lib.fic_reader_read(self._ptr, reqs, n)
        return [ReadResult(_read_status(reqs[i].status), reqs[i].n_read, reqs[i].sys_errno) for i in range(n)]

    def read_checked(self, requests: Sequence[ReadRequest]) -> None:
        """As read(), but raise ReadError naming the first failed request."""
        for rq, res in zip(requests, self.read(requests)):
            if res.status != "ok":
                detail = os.strerror(res.errno) if res.status == "io" else _READ_DETAIL.get(res.status, res.status)
                raise ReadError(f"{self.path}: {detail} reading {rq.length} bytes at offset {rq.offset}"
                                f" ({res.n_read} read)", res.status)

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            ffi.gc(ptr, None)  # detaches the destructor (returns None), so close runs once
            lib.fic_reader_close(ptr)

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_READ_DETAIL = {"short": "unexpected end of file", "crc": "checksum mismatch",
                "arg": "misaligned request (O_DIRECT needs 4096-byte alignment)"}
