"""Error of the int8 prefill path per format against float64 numpy (m 256, k 2048, T 16, Gaussian data),
and of the exact path: PYTHONPATH=. python bench/prefill_int8_error.py (a markdown table)."""
import sys, numpy as np
sys.path.insert(0, "tests")
from flashinfer_cli import kernels as K
from _kquant import quantize_any
from test_kernels import matmul_bound, dot_bound, QDOT_FORMATS
rng = np.random.default_rng(0)
m, k, t = 256, 2048, 16
print("| format | int8: RMS err / RMS y | max err / q8 bound | exact: RMS err / RMS y |")
print("| --- | --- | --- | --- |")
for fmt in QDOT_FORMATS:
    w = rng.standard_normal((m, k), dtype=np.float32)
    qt = quantize_any(w, fmt, rng)
    wd = K.dequantize(qt).astype(np.float64)
    x = rng.standard_normal((t, k), dtype=np.float32)
    want = x.astype(np.float64) @ wd.T
    y = K.matmul(qt, x)
    K.set_prefill("exact"); ye = K.matmul(qt, x); K.set_prefill("int8")
    err = np.abs(y - want); b = matmul_bound(fmt, wd, x)
    rms = np.sqrt((want ** 2).mean())
    print(f"| {fmt} | {np.sqrt((err**2).mean())/rms:.2e} | {(err/b).max():.3f} | {np.sqrt(((ye-want)**2).mean())/rms:.1e} |")
