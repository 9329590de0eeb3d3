"""K-quant (Q4_K, Q6_K) test inputs: fic reads these formats but does not quantize to them, and the
gguf package can only dequantize them. Realistic blocks come from llama.cpp's own reference
quantizers (quantize_row_q4_K_ref, quantize_row_q6_K_ref in llama-cpp-python's libggml-base),
called through ctypes; without that library, random valid blocks are built bytewise (any bytes are
a valid block once the fp16 scale fields are finite)."""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from flashinfer_cli import kernels as K

K_QUANTS = ("q4_k", "q6_k")
_GGML_REF = {"q4_k": "quantize_row_q4_K_ref", "q6_k": "quantize_row_q6_K_ref", "q5_0": "quantize_row_q5_0_ref"}
_GGML: list = []  # [ctypes.CDLL or None], loaded once


def ggml_base() -> ctypes.CDLL | None:
    """llama-cpp-python's libggml-base, or None when it is not installed."""
    if not _GGML:
        spec = importlib.util.find_spec("llama_cpp")
        lib = None
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / "lib" / "libggml-base.so"
            try:
                lib = ctypes.CDLL(str(path)) if path.exists() else None
            except OSError:
                lib = None
        _GGML.append(lib)
    return _GGML[0]


def ggml_quantize(w: np.ndarray, fmt: str) -> K.QTensor | None:
    """w (float32, m x k) quantized by llama.cpp's reference quantizer, or None without ggml."""
    lib = ggml_base()
    if lib is None:
        return None
    w = np.ascontiguousarray(w, dtype=np.float32)
    m, k = w.shape
    out = np.zeros(m * K.row_bytes(fmt, k), np.uint8)
    fn = getattr(lib, _GGML_REF[fmt])
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(w.ctypes.data, out.ctypes.data, m * k)
    return K.QTensor(fmt, (m, k), out)


def random_blocks(fmt: str, m: int, k: int, rng: np.random.Generator) -> K.QTensor:
    """Random valid blocks: random bytes with the fp16 scales set to finite values of a realistic
    size (so products stay far from overflow)."""
    data = rng.integers(0, 256, m * K.row_bytes(fmt, k), dtype=np.uint8)
    blocks = data.reshape(-1, K.block_bytes(fmt))
    scale_bytes = {"q4_k": (0, 2), "q6_k": (208,), "q5_0": (0,)}[fmt]
    for off in scale_bytes:
        scales = (rng.uniform(0.001, 0.02, len(blocks))).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return K.QTensor(fmt, (m, k), data)


def quantize_any(w: np.ndarray, fmt: str, rng: np.random.Generator | None = None) -> K.QTensor:
    """w in fmt: fic's quantizer where it has one, else llama.cpp's, else random valid blocks."""
    if fmt in K.QUANTIZABLE:
        return K.quantize(np.ascontiguousarray(w, dtype=np.float32), fmt)
    qt = ggml_quantize(w, fmt)
    if qt is None:
        qt = random_blocks(fmt, *w.shape, rng if rng is not None else np.random.default_rng(0))
    return qt
