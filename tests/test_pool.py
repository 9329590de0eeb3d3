"""The thread pool under preemption: many back-to-back kernel calls at 2, 3, 4 and 8 threads
(more threads than this machine's cores) while another process keeps a core busy, each result
checked against numpy and against the 1-thread result (every kernel here splits work so that
each output element is computed by one chunk, so results are bit-identical at any thread count:
a lost or doubled chunk shows). Also builds tests/pool_harness.c and runs its stress mode, under
ThreadSanitizer when the compiler has it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import kernels as K

from test_ffn import ffn_want_and_bound
from test_kernels import assert_within, dot_bound, matvec_bound

# a busy loop that ends with its parent, should the parent die without killing it
HOG = "import os\np = os.getppid()\nwhile os.getppid() == p: pass"

ROOT = Path(__file__).resolve().parents[1]
D, N_EXP, N = 576, 24, 64


@pytest.fixture(scope="module")
def hog():
    p = subprocess.Popen([sys.executable, "-c", HOG])
    yield p
    p.kill()
    p.wait()


@pytest.fixture(autouse=True)
def restore_threads():
    n = K.get_threads()
    yield
    K.set_threads(n)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((1536, D), dtype=np.float32)
    qw = K.quantize(w, "q4_1")
    wd = K.dequantize(qw)
    qa = K.quantize(rng.standard_normal((200, 1536), dtype=np.float32), "q4_1")  # accum_rows rows
    bundles, parts = [], []
    for _ in range(N_EXP):
        g = K.quantize(rng.standard_normal((N, D), dtype=np.float32) * 0.05, "q4_1")
        u = K.quantize(rng.standard_normal((N, D), dtype=np.float32) * 0.05, "q4_1")
        dn = K.quantize(rng.standard_normal((D, N), dtype=np.float32) * 0.05, "q4_1")
        buf = K.aligned_buffer(g.nbytes + u.nbytes + dn.nbytes)
        buf[:] = np.concatenate([g.data, u.data, dn.data])
        bundles.append(buf)
        parts.append((K.dequantize(g), K.dequantize(u), K.dequantize(dn)))
    es = K.ExpertSet(("q4_1", "q4_1", "q4_1"), D, "columns", bundles, [N] * N_EXP)
    xs = [rng.standard_normal(D, dtype=np.float32) for _ in range(4)]
    aa = [rng.standard_normal(200, dtype=np.float32) for _ in range(4)]
    # 1-thread results: the exact values every thread count must give
    K.set_threads(1)
    ref_mv = [K.matvec(qw, x) for x in xs]
    ref_ffn = [es.ffn(x, np.zeros(D, dtype=np.float32)) for x in xs]
    ref_acc = [K.accum_rows(qa, a, np.zeros(1536, dtype=np.float32)) for a in aa]
    # numpy in float64, once: checks the 1-thread results themselves, each within the bound
    # test_kernels / test_ffn derive for that kernel on this machine (float32 summation, plus
    # the q8 rounding of activations where the kernel quantizes them). Measured on an AVX2
    # machine, the largest error is 0.2% of the bound for matvec, 0.8% for accum_rows and
    # 0.005% for the FFN (whose bound propagates worst cases through h); the former 2e-2 * max
    # for matvec and the FFN was some 50 times looser than these.
    wd64 = wd.astype(np.float64)
    wa = K.dequantize(qa).astype(np.float64)
    parts64 = [tuple(p.astype(np.float64) for p in part) for part in parts]
    for x, r, f in zip(xs, ref_mv, ref_ffn):
        assert_within(r, wd64 @ x, matvec_bound("q4_1", "auto", wd64, x))
        want, bound = ffn_want_and_bound(("q4_1",) * 3, "columns", [N] * N_EXP, parts64, x, np.zeros(D, np.float32),
                                         None, "auto")
        assert_within(f, want[0], bound[0])
    for a, r in zip(aa, ref_acc):
        # accum_rows is float32 throughout: sum over 200 rows of a_i w_i, within the gamma_K bound
        assert_within(r, a.astype(np.float64) @ wa, dot_bound(wa.T, a))
    return qw, es, qa, xs, aa, ref_mv, ref_ffn, ref_acc


@pytest.mark.parametrize("threads", [2, 3, 4, 8])
def test_back_to_back_calls_under_load(hog, case, threads):
    qw, es, qa, xs, aa, ref_mv, ref_ffn, ref_acc = case
    K.set_threads(threads)
    y = np.empty(1536, dtype=np.float32)
    for i in range(400):
        j = i % len(xs)
        y.fill(np.nan)
        K.matvec(qw, xs[j], out=y)
        assert np.array_equal(y, ref_mv[j]), f"matvec call {i}"
        yf = np.zeros(D, dtype=np.float32)
        es.ffn(xs[j], yf)
        assert np.array_equal(yf, ref_ffn[j]), f"ffn call {i}"
        ya = np.zeros(1536, dtype=np.float32)
        K.accum_rows(qa, aa[j], ya)
        assert np.array_equal(ya, ref_acc[j]), f"accum_rows call {i}"
    assert hog.poll() is None


def _cc():
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def _build(tmp_path, flags):
    cc = _cc()
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "pool_harness"
    r = subprocess.run([cc, *flags, "-pthread", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "pool_harness.c"),
                        str(ROOT / "csrc" / "pool.c"), "-o", str(exe)], capture_output=True, text=True)
    return exe if r.returncode == 0 else None


def test_pool_harness_stress(tmp_path, hog):
    exe = _build(tmp_path, ["-O2"])
    assert exe is not None
    r = subprocess.run([str(exe), "stress", "3000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "stress ok" in r.stdout


def test_pool_harness_tsan(tmp_path, hog):
    exe = _build(tmp_path, ["-O1", "-g", "-fsanitize=thread"])
    if exe is None:
        pytest.skip("no ThreadSanitizer in this compiler")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    r = subprocess.run([str(exe), "stress", "1000"], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0 and "ThreadSanitizer" not in r.stderr and "stress ok" not in r.stdout:
        pytest.skip(f"ThreadSanitizer binary does not run here: {r.stderr[:200]}")
    assert r.returncode == 0 and "WARNING: ThreadSanitizer" not in r.stderr, r.stderr
    assert "stress ok" in r.stdout
