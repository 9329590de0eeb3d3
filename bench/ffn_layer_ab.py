"""One decode FFN (t = 1) per layer of a real model, the three ways it has been run, interleaved round
by round over the 30 layers (so weights come from DRAM, as in decode):
- fused (arena slots): what model.py runs, one fic_experts_ffn call over the bundles where they were read
- fused (compact copy): the same over the bundles copied back to back without their 4 KiB padding
- packed (2 matvecs + silu): main before branch ffnmodel, gate+up stacked, down joined, numpy SwiGLU

    FIC_HOME=... PYTHONPATH=. python bench/ffn_layer_ab.py [THREADS] [ROUNDS]

Prints the relative difference fused vs packed on two layers, then best and median us per layer."""
import os, sys, time
import numpy as np
os.environ.setdefault("FIC_HOME", os.path.expanduser("~/.cache/fic-test/home-model"))
from flashinfer_cli import kernels
from flashinfer_cli.model import Model, concat_rows, silu
from flashinfer_cli.kernels import QTensor
from flashinfer_cli.pull import resolve_model
th = int(sys.argv[1]) if len(sys.argv) > 1 else 1
kernels.set_threads(th)
m = Model(resolve_model(os.environ.get("FIC_MODEL", "smollm2-135m")), ctx=64)
L = len(m.ffn)

def concat_cols(parts):
    f, mm = parts[0].fmt, parts[0].shape[0]
    k = sum(p.shape[1] for p in parts)
    data = kernels.aligned_buffer(mm * kernels.row_bytes(f, k), huge=True)
    rows = data.reshape(mm, -1); off = 0
    for p in parts:
        rb = kernels.row_bytes(f, p.shape[1]); rows[:, off:off + rb] = p.data.reshape(mm, rb); off += rb
    return QTensor(f, (mm, k), data)

packed = []
compact = []
for l in range(L):
    bs = [b for _, b in m.provider.bundles(l)]
    packed.append((concat_rows([b.gate for b in bs] + [b.up for b in bs]), concat_cols([b.down for b in bs]), sum(b.n_neurons for b in bs)))
    # the same bundles back to back without the 4 KiB padding, in one huge-page buffer
    tot = sum(b.data.nbytes for b in bs); buf = kernels.aligned_buffer(tot, huge=True); off = 0; views = []
    for b in bs:
        buf[off:off + b.data.nbytes] = b.data; views.append(buf[off:off + b.data.nbytes]); off += b.data.nbytes
    compact.append(kernels.ExpertSet.from_layout(m.reader.layout, views, [b.n_neurons for b in bs]))
sets = [f.expert_set() for f in m.ffn]
rng = np.random.default_rng(0)
xs = [rng.standard_normal(576).astype(np.float32) for _ in range(L)]
scratch = np.empty(4096, np.float32)

def fused():
    for l in range(L):
        y = np.zeros(576, np.float32); sets[l].ffn(xs[l], y, scratch=scratch)
def fused_compact():
    for l in range(L):
        y = np.zeros(576, np.float32); compact[l].ffn(xs[l], y, scratch=scratch)
def old():
    for l in range(L):
        gu, down, n = packed[l]
        h = kernels.matvec(gu, xs[l]); h = silu(h[:n]) * h[n:]
        kernels.matvec(down, h)

# correctness: same function
for l in (0, 17):
    y = np.zeros(576, np.float32); sets[l].ffn(xs[l], y)
    gu, down, n = packed[l]; h = kernels.matvec(gu, xs[l]); r = kernels.matvec(down, silu(h[:n]) * h[n:])
    print(f"layer {l}: max |fused - packed| / max |packed| = {np.abs(y - r).max() / np.abs(r).max():.2e}")
fns = {"fused (arena slots)": fused, "fused (compact copy)": fused_compact, "packed (2 matvecs + silu)": old}
res = {k: [] for k in fns}
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
    for k, f in fns.items():
        t = time.perf_counter(); f(); res[k].append((time.perf_counter() - t) / L * 1e6)
print(f"threads {th}, us per layer (30 layers cycled), load {os.getloadavg()[0]:.1f}")
for k, v in res.items():
    print(f"  {k}: best {min(v):.1f} median {np.median(v):.1f}")
