"""Clustered experts and shared experts for a dense model (issue 7), at conversion time.

Three steps, each a public function calibration (calibrate.py) can call or replace:
1. collect_activations: run a converted model over text and keep, per layer, each token's
   L2-normalised |activation| row |h| / ||h|| (h = silu(gate x) * up x over the layer's neurons).
2. plan_layer: from those rows, the neurons useful for almost every token (highest mean normalised
   activation) become the layer's shared expert, and the rest are grouped by co-activation into
   balanced clusters of the expert size (balanced spherical k-means on the neurons' unit
   activation columns, a greedy capacity-respecting assignment each round; deterministic for a seed).
3. rewrite_model: the layer's neurons permuted (gate/up rows, down's part) through fmt.ModelWriter
   into a new directory renamed into place (nothing half-written on failure or Ctrl-C), the
   shared neurons moved into the dense block (fmt.shared_names), the new neuron order recorded.

A permutation of gate/up rows and of rows-layout down is a copy of whole rows (lossless). A
columns-layout down holds a neuron's weights inside blocks that run across neurons: permuting them
means requantizing down (f32/f16 excepted), measured and noted in the manifest.

    python -m flashinfer_cli.cluster MODEL [--out DIR] [--shared F] [--seed S] [--tokens N]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from flashinfer_cli import fmt, kernels
from flashinfer_cli.kernels import QTensor

DEFAULT_SHARED = 0.1       # measured best at 0.75 and 0.9 active on SmolLM2 (bench/RESULTS.md, "Clustered and shared experts")
DEFAULT_TOKENS = 2048      # calibration tokens whose activation rows are clustered
CHUNK_TOKENS = 256         # the context each calibration chunk runs in
KMEANS_ROUNDS = 12
CANDIDATES = 8             # clusters a neuron may join in the greedy assignment before any with room


class ClusterError(Exception):
    """A model or option clustering refuses; the message is one line."""


@dataclass
class ClusterOptions:
    shared_frac: float = DEFAULT_SHARED  # fraction of each layer's neurons kept always on (dense block)
    seed: int = 0
    n_tokens: int = DEFAULT_TOKENS

    def check(self) -> None:
        f = self.shared_frac
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ClusterError(f"--shared {f!r}: a fraction of the neurons in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ClusterError(f"--seed {self.seed!r}: a non-negative integer")
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int) or self.n_tokens < 16:
            raise ClusterError(f"--tokens {self.n_tokens!r}: at least 16 calibration tokens")


@dataclass
class LayerPlan:
    """One layer's new neuron order: `order[j]` is the current bundle-order index of new neuron j;
    the first `n_shared` are the shared expert, then clusters of the expert size."""

    order: np.ndarray
    n_shared: int


@dataclass
class ClusterResult:
    path: Path
    options: ClusterOptions
    shared_neurons: list[int]
    down_requantized: bool
    down_rel_rms: float          # relative RMS change of down's weights (0 when the permutation is lossless)
    notes: list[str] = field(default_factory=list)


# ---- 1. activation rows ----------------------------------------------------------------------

def _layer_rows(n_neurons: np.ndarray, t: int, calls) -> np.ndarray:
    """The layer's h (t, d_ff) in bundle order, from an FFN call's (experts, scratch region) pairs
    (each region holds its experts' h blocks, t x n_e each, back to back)."""
    off = np.concatenate([[0], np.cumsum(n_neurons)])
    h = np.zeros((t, int(off[-1])), dtype=np.float32)
    for experts, region in calls:
        pos = 0
        for e in experts:
            ne = int(n_neurons[e])
            h[:, off[e]:off[e] + ne] = region[pos:pos + t * ne].reshape(t, ne)
            pos += t * ne
    return h


def collect_activations(model_dir: str | Path, text: str | None = None, *, n_tokens: int = DEFAULT_TOKENS,
                        chunk: int = CHUNK_TOKENS, progress: Callable[[int, int], None] | None = None
                        ) -> list[np.ndarray]:
    """Per layer, (tokens, d_ff) float16 rows |h| / ||h|| of the first n_tokens tokens of `text`
    (default texts.calibration_text), in the model's bundle order, run in chunks of `chunk` tokens
    (each a fresh context) with every expert resident. calibrate.py may pass its own stream instead."""
    from flashinfer_cli import texts
    from flashinfer_cli.model import Model
    from flashinfer_cli.tokenizer import Tokenizer

    model = Model(model_dir, ctx=chunk)
    try:
        if model.moe is not None:
            raise ClusterError(f"{model_dir}: a mixture of experts keeps its own experts; clustering is for dense models")
        tok = Tokenizer.from_model_dir(Path(model_dir), model.reader.manifest.tokenizer)
        ids = tok.encode(text if text is not None else texts.calibration_text(max(60000, 8 * n_tokens)))[:n_tokens]
        if len(ids) < 16:
            raise ClusterError(f"only {len(ids)} calibration tokens")
        nn = model.arena.n_neurons
        widths = nn.sum(axis=1)
        rows = [np.empty((len(ids), int(w)), dtype=np.float16) for w in widths]
        done = [0]

        def collect(layer: int, t: int, calls) -> None:
            h = np.abs(_layer_rows(nn[layer][:model.arena.experts_per_layer[layer]], t, calls))
            norm = np.linalg.norm(h, axis=1, keepdims=True)
            rows[layer][done[0]:done[0] + t] = h / np.where(norm > 0, norm, 1.0)

        model.collect, model.full = collect, True
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            model.reset()
            model.forward(part, all_logits=False)
            done[0] += len(part)
            if progress:
                progress(done[0], len(ids))
        return rows
    finally:
        model.close()


# ---- 2. shared neurons and balanced clusters -------------------------------------------------

def shared_neurons(rows: np.ndarray, n_shared: int) -> np.ndarray:
    """The n_shared neurons with the highest mean normalised activation (useful to almost every
    token), ascending; ties to the lower index."""
    mean = rows.astype(np.float32).mean(axis=0)
    return np.sort(np.argsort(-mean, kind="stable")[:n_shared])


def _capacities(n: int, size: int) -> np.ndarray:
    """Cluster sizes for n neurons: `size` each, the last the remainder (as convert.py cuts)."""
    caps = np.full(-(-n // size), size, dtype=np.int64)
    if n % size:
        caps[-1] = n % size
    return caps


def _assign(sim: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Greedy balanced assignment: (neuron, cluster) pairs in order of similarity among each
    neuron's CANDIDATES best clusters, each taken while the cluster has room; neurons left over
    go to their best cluster with room. Deterministic (stable sorts)."""
    n, k = sim.shape
    m = min(CANDIDATES, k)
    cand = np.argpartition(-sim, m - 1, axis=1)[:, :m] if m < k else np.tile(np.arange(k), (n, 1))
    vals = np.take_along_axis(sim, cand, axis=1)
    order = np.argsort(-vals.reshape(-1), kind="stable")
    room = caps.copy()
    label = np.full(n, -1, dtype=np.int64)
    flat_n, flat_c = np.repeat(np.arange(n), m)[order], cand.reshape(-1)[order]
    for i, c in zip(flat_n.tolist(), flat_c.tolist()):
        if label[i] < 0 and room[c] > 0:
            label[i] = c
            room[c] -= 1
    for i in np.flatnonzero(label < 0):
        s = np.where(room > 0, sim[i], -np.inf)
        c = int(np.argmax(s))
        label[i] = c
        room[c] -= 1
    return label


def balanced_clusters(rows: np.ndarray, size: int, seed: int = 0, rounds: int = KMEANS_ROUNDS) -> np.ndarray:
    """Neurons (columns of rows, (tokens, n)) grouped by co-activation into clusters of exactly
    `size` (the last the remainder): balanced spherical k-means on the neurons' unit activation
    columns (the cosine of their |h| over tokens: co-activation). Returns the permutation: cluster after
    cluster, each cluster's neurons ascending; clusters in the order of their smallest neuron."""
    n = rows.shape[1]
    caps = _capacities(n, size)
    k = len(caps)
    if k == 1:
        return np.arange(n)
    # not centred: against centred columns (correlation) on SmolLM2, prune-mode perplexity x7.94 vs
    # x8.59 at 0.5 active, x2.04 vs x2.03 at 0.75, x1.24 vs x1.29 at 0.9 (bench/RESULTS.md)
    x = rows.astype(np.float32).T.copy()
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centers = x[np.sort(rng.choice(n, k, replace=False))]
    label = None
    for _ in range(rounds):
        new = _assign(x @ centers.T, caps)
        if label is not None and np.array_equal(new, label):
            break
        label = new
        sums = np.zeros_like(centers)
        np.add.at(sums, label, x)
        centers = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    groups = [np.flatnonzero(label == c) for c in range(k)]
    groups.sort(key=lambda g: int(g[0]))
    return np.concatenate(groups)


def plan_layer(rows: np.ndarray, expert_size: int, shared_frac: float, seed: int) -> LayerPlan:
    """One layer's new order: shared neurons first (shared_frac of the layer, rounded to whole
    experts), then the rest in balanced co-activation clusters of expert_size."""
    n = rows.shape[1]
    n_shared = int(round(shared_frac * n / expert_size)) * expert_size
    n_shared = min(n_shared, (n // expert_size - 1) * expert_size) if n_shared else 0  # keep a routed expert
    shared = shared_neurons(rows, n_shared) if n_shared else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), shared)
    order = np.concatenate([shared, rest[balanced_clusters(rows[:, rest], expert_size, seed)]])
    return LayerPlan(order.astype(np.int64), n_shared)


# ---- 3. the rewrite --------------------------------------------------------------------------

def _take_rows(qt: QTensor, idx: np.ndarray) -> QTensor:
    """Rows idx of a row-major matrix, whole rows copied (any format: blocks run along a row)."""
    rb = kernels.row_bytes(qt.fmt, qt.shape[1])
    data = np.ascontiguousarray(qt.data.reshape(qt.shape[0], rb)[idx]).reshape(-1)
    return QTensor(qt.fmt, (len(idx), qt.shape[1]), data)


def _concat_rows(parts: Sequence[QTensor]) -> QTensor:
    return QTensor(parts[0].fmt, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                   np.concatenate([np.asarray(p.data).reshape(-1) for p in parts]))


def _read_layer(reader: fmt.ModelReader, layer: int) -> list:
    """Every bundle of the layer, read and checked (fmt.Bundle views of fresh buffers)."""
    keys = [(layer, e) for e in range(len(reader.manifest.experts[layer]))]
    dsts = [kernels.aligned_buffer(reader.bundle_bytes(l, e)) for l, e in keys]
    return reader.read_bundles(keys, dsts)


def _down_target(layout: fmt.ExpertLayout) -> tuple[str, bool]:
    """(down's format after the permutation, whether it is requantized)."""
    if layout.down_layout == "rows" or layout.down_fmt in ("f32", "f16"):
        return layout.down_fmt, False
    return (layout.down_fmt if layout.down_fmt in kernels.QUANTIZABLE else "q8_0"), True


class _DownError:
    """The requantization error of down's weights over the model (relative RMS)."""

    def __init__(self):
        self.err_sq = self.ref_sq = 0.0

    def add(self, ref: np.ndarray, new: QTensor) -> None:
        got = kernels.dequantize(new).astype(np.float64)
        self.err_sq += float(np.sum((got - ref) ** 2))
        self.ref_sq += float(np.sum(ref.astype(np.float64) ** 2))

    @property
    def rel(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def _permuted_ffn(bundles, plan: LayerPlan, layout: fmt.ExpertLayout, down_fmt: str, err: _DownError):
    """(gate, up, down) of the whole layer in the new neuron order; down in the layout's shape
    ((d_model, d_ff) columns or (d_ff, d_model) rows) and down_fmt."""
    gate = _take_rows(_concat_rows([b.gate for b in bundles]), plan.order)
    up = _take_rows(_concat_rows([b.up for b in bundles]), plan.order)
    if layout.down_layout == "rows":
        return gate, up, _take_rows(_concat_rows([b.down for b in bundles]), plan.order)
    from flashinfer_cli.convert import as_float, to_qtensor

    full = np.concatenate([as_float(b.down) for b in bundles], axis=1)[:, plan.order]
    down = to_qtensor(np.ascontiguousarray(full), down_fmt)
    if layout.down_fmt not in ("f32", "f16"):
        err.add(full, down)
    return gate, up, down


def _down_part(down: QTensor, layout: fmt.ExpertLayout, start: int, stop: int) -> QTensor:
    if layout.down_layout == "rows":
        return down.rows(start, stop)
    from flashinfer_cli.convert import column_slice

    return column_slice(down, start, stop)


def rewrite_model(src: str | Path, dest: str | Path, plans: Sequence[LayerPlan], *,
                  provenance: dict | None = None, progress: Callable[[int, int], None] | None = None
                  ) -> ClusterResult:
    """Write the model at `src` with each layer's neurons in plans[l].order, its first n_shared
    neurons as the layer's shared expert (dense block), into `dest` (may be `src`: replaced
    atomically). Expert size and formats are kept (columns-layout down requantized; K-quants to q8_0)."""
    src, dest = Path(src), Path(dest)
    with fmt.ModelReader(src) as reader:
        man = reader.manifest
        layout = man.expert_layout
        targets = [_down_target(layout.layer(l)) for l in range(len(man.experts))]
        requant = any(r for _, r in targets)
        new_layout = fmt.ExpertLayout.per_layer(layout.d_model, layout.gate_fmt, layout.up_fmt,
                                                [f for f, _ in targets], layout.down_layout)
        size = max(e.n_neurons for e in man.experts[0])
        tokenizer = {k: v for k, v in man.tokenizer.items() if k != "files"}
        prov = dict(man.provenance)
        prov["cluster"] = dict(provenance or {})
        err = _DownError()
        with fmt.ModelWriter(dest, name=man.name, arch=man.arch, layout=new_layout, provenance=prov,
                             tokenizer=tokenizer, overwrite=True) as w:
            dense = reader.dense()
            orders = [reader.neuron_order(l) for l in range(len(man.experts))]
            for name, value in dense.items():
                if not name.endswith(".ffn_neuron_order"):
                    w.add_dense(name, value)
            for layer, plan in enumerate(plans):
                gate, up, down = _permuted_ffn(_read_layer(reader, layer), plan, layout.layer(layer),
                                               targets[layer][0], err)
                n_sh, d_ff = plan.n_shared, gate.shape[0]
                if n_sh:
                    w.set_shared(layer, gate.rows(0, n_sh), up.rows(0, n_sh), _down_part(down, new_layout, 0, n_sh))
                for start in range(n_sh, d_ff, size):
                    stop = min(start + size, d_ff)
                    w.add_expert(layer, gate.rows(start, stop), up.rows(start, stop),
                                 _down_part(down, new_layout, start, stop))
                old = orders[layer] if orders[layer] is not None else np.arange(d_ff)
                w.set_neuron_order(layer, np.asarray(old)[plan.order])
                if progress:
                    progress(layer + 1, len(plans))
            for note in man.notes:
                w.note(note)
            notes = []
            if requant:
                olds = "/".join(sorted(set(layout.down_fmts or (layout.down_fmt,))))
                news = "/".join(sorted({f for f, _ in targets}))
                notes.append(f"clustering permuted ffn_down's columns inside {olds} blocks: down "
                             f"requantized to {news}, relative RMS change {err.rel:.3e}")
            shared = [p.n_shared for p in plans]
            notes.append(f"neurons clustered by co-activation into experts of {size}; shared experts: "
                         f"{sum(shared)} neurons in the dense block ({', '.join(map(str, sorted(set(shared))))} per layer)")
            for note in notes:
                w.note(note)
            for name in man.tokenizer.get("files", []):
                w.add_file(src / name, name)
    return ClusterResult(dest, ClusterOptions(), shared, requant, err.rel, notes)


def cluster_model(model_dir: str | Path, out_dir: str | Path | None = None, shared_frac: float = DEFAULT_SHARED,
                  seed: int = 0, *, n_tokens: int = DEFAULT_TOKENS, text: str | None = None,
                  progress: bool = False) -> ClusterResult:
    """Cluster a converted dense model's neurons (and keep shared_frac of them always on), writing
    the result to out_dir (default: model_dir itself, replaced atomically). ClusterError: one line."""
    opts = ClusterOptions(shared_frac=shared_frac, seed=seed, n_tokens=n_tokens)
    opts.check()
    src = Path(model_dir)
    dest = Path(out_dir) if out_dir is not None else src
    try:
        with fmt.ModelReader(src) as reader:
            man = reader.manifest
            if man.moe is not None:
                raise ClusterError(f"{src}: a mixture of experts keeps its own experts; clustering is for dense models")
            if any(man.shared_neurons):
                raise ClusterError(f"{src}: already has shared experts; cluster the model as converted")
            sizes = {e.n_neurons for layer in man.experts for e in layer[:-1]}
            if len(sizes) > 1:
                raise ClusterError(f"{src}: experts of several sizes ({sorted(sizes)})")
            size = max(e.n_neurons for e in man.experts[0])
        if dest.exists() and dest.resolve() != src.resolve() and not (dest / fmt.MANIFEST_FILE).is_file():
            raise ClusterError(f"{dest}: exists and is not a model directory")
        bar = _bar(progress)
        rows = collect_activations(src, text, n_tokens=n_tokens, progress=bar("activations"))
        plans = []
        tick = bar("clusters")
        for layer, r in enumerate(rows):
            plans.append(plan_layer(r, size, shared_frac, seed + layer))
            if tick:
                tick(layer + 1, len(rows))
        info = {"method": "balanced spherical k-means on unit |h| columns", "expert_size": size,
                "shared": shared_frac, "seed": seed, "tokens": int(rows[0].shape[0]),
                "text": "texts.calibration_text" if text is None else "caller's"}
        result = rewrite_model(src, dest, plans, provenance=info, progress=bar("rewriting"))
    except fmt.FormatError as exc:
        raise ClusterError(str(exc)) from None
    except OSError as exc:
        raise ClusterError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    result.options = opts
    return result


def _bar(enabled: bool):
    """A maker of progress callbacks (done, total) printing one updating line on stderr."""
    def make(what: str):
        if not enabled:
            return None

        def tick(done: int, total: int) -> None:
            print(f"\rclustering: {what} {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        return tick
    return make


# ---- the command -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        print(f"fic cluster: error: {message}", file=sys.stderr)
        sys.exit(2)


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shared {text!r}: a fraction of the neurons in [0, 1)") from None
    if not 0 <= f < 1:  # nan fails too
        raise argparse.ArgumentTypeError(f"--shared {text!r}: a fraction of the neurons in [0, 1)")
    return f


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m flashinfer_cli.cluster",
                description="Cluster a dense model's FFN neurons into co-activated experts, with shared experts.")
    p.add_argument("model", help="a model directory or a store name")
    p.add_argument("--out", default=None, help="write here (default: replace the model in place)")
    p.add_argument("--shared", type=_fraction, default=DEFAULT_SHARED,
                   help=f"fraction of each layer's neurons kept always on in the dense block (default {DEFAULT_SHARED})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    args = p.parse_args(argv)
    from flashinfer_cli.pull import resolve_model
    from flashinfer_cli.store import StoreError

    try:

        path = resolve_model(args.model, auto_pull=False)
        res = cluster_model(path, args.out, args.shared, args.seed, n_tokens=args.tokens, progress=True)
    except (ClusterError, StoreError, ValueError, OSError) as exc:
        print(f"fic cluster: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fic cluster: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"{res.path}: clustered; shared neurons per layer {sorted(set(res.shared_neurons))}"
          + (f"; down requantized (relative RMS {res.down_rel_rms:.2e})" if res.down_requantized else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
