"""Choosing each layer's active set once per prompt: selection policies and reselection.

`exact` (GRIFFIN, arXiv 2404.01365): every token's FFN activation row h (silu(gate x) * up x,
over all of the layer's neurons) is L2-normalised; a neuron's score is the L2 norm of its column
over the prompt's tokens; an expert's score is the sum of its neurons' scores. `static`: the same
statistic gathered once over calibration text (texts.calibration_text) and stored beside the model.
`sketch`: the same statistic over rows the model's fitted predictor (calibrate.py) predicts from
each token's FFN input, so the experts it rejects are never read (Predictor below). `mixed`: exact's
prompt scores and static's calibration scores, each normalised to sum 1 over the layer's experts,
averaged (mix below): the prompt's choice pulled toward the experts most text uses, for a
continuation that leaves the prompt's topic. `sketch-mixed`: sketch's predicted prompt scores mixed
with static's the same way (still no expert read to score it).

The Scorer accumulates sum_t (h[t, n] / ||h[t]||)^2 per neuron from the FFN's scratch (which holds
h after every call, expert block after expert block) and turns it into expert scores.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from flashinfer_cli import fmt

# router: a mixture of experts' (moe.RouterScorer); sketch: the calibrated predictor's scores; none: no
# selection at all, the arena only an LRU cache of what tokens asked for (what MoE offloading engines
# do; exact mode only, a baseline)
POLICIES = ("exact", "static", "router", "sketch", "mixed", "sketch-mixed", "none")
PER_PROMPT = ("exact", "router", "sketch", "mixed", "sketch-mixed")  # the policies that choose each prompt's sets from its own tokens
PREDICTED = ("sketch", "sketch-mixed")  # the policies that score from the calibrated predictor
MIXES_STATIC = ("mixed", "sketch-mixed")  # the policies whose prompt scores are averaged with static's (mix)
# prune mode's policy unless told: mixed did not earn it (bench/RESULTS.md, "Static scores at calibration,
# mixed against exact": x1.09-1.16 of exact on Qwen2.5-Coder-1.5B at 0.75, 1 text of 8 better)
PRUNE_DEFAULT = "exact"
STATIC_TOKENS = 4096  # calibration text the static scores are gathered over (Engine.static_calibration),
STATIC_WINDOW = 256   # in windows of this many tokens, each from an empty cache (any context holds one)
STATIC_FILE = "static_scores.npy"
RESELECT_MARGIN = 0.05  # a challenger must beat the weakest selected expert by 5%


class Scorer:
    """GRIFFIN statistics of every layer's neurons, accumulated over tokens."""

    def __init__(self, n_neurons: np.ndarray, max_tokens: int = 1):
        # n_neurons: (n_layers, max_experts) neurons per expert (0 where a layer has fewer experts);
        # max_tokens: the most tokens one add() sees (the plan's prefill chunk): buffers sized once
        self.n_neurons = n_neurons
        self.offsets = np.concatenate([np.zeros((n_neurons.shape[0], 1), np.int64),
                                       np.cumsum(n_neurons, axis=1)], axis=1)
        self.d_ff = int(self.offsets[:, -1].max(initial=0))
        self.acc = np.zeros((n_neurons.shape[0], self.d_ff), dtype=np.float64)
        self.n_tokens = np.zeros(n_neurons.shape[0], dtype=np.int64)
        self._h = np.empty(max_tokens * self.d_ff, dtype=np.float32)
        self._sq = np.empty(max_tokens * self.d_ff, dtype=np.float32)

    def reset(self) -> None:
        self.acc[:] = 0
        self.n_tokens[:] = 0

    def assemble(self, layer: int, t: int, calls: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The layer's h (t, d_ff) in bundle order, gathered from the FFN calls' scratch regions
        (a view of a buffer reused by the next call). calls: (experts, scratch region) of each FFN
        call of the layer for these t tokens; each region holds the experts' h blocks (t x n_e)
        back to back. Together they cover every expert of the layer."""
        n = self.n_neurons[layer]
        off = self.offsets[layer]
        d_ff = int(off[-1])
        if self._h.size < t * d_ff:
            raise ValueError(f"{t} tokens in one call, the scorer was sized for {self._h.size // max(1, d_ff)}")
        h = self._h[:t * d_ff].reshape(t, d_ff)
        for experts, region in calls:
            pos = 0
            sizes = n[experts]
            if len(experts) and (sizes == sizes[0]).all():
                ne = int(sizes[0])
                blocks = region[:len(experts) * t * ne].reshape(len(experts), t, ne)
                cols = (off[experts][:, None] + np.arange(ne)).reshape(-1)
                h[:, cols] = blocks.transpose(1, 0, 2).reshape(t, -1)
                continue
            for e, ne in zip(experts, sizes):
                h[:, off[e]:off[e] + ne] = region[pos:pos + t * ne].reshape(t, ne)
                pos += t * ne
        return h

    def normalized_sq(self, h: np.ndarray) -> np.ndarray:
        """(h / ||h||_row)^2 of h (t, d_ff), in the scorer's second buffer."""
        t, d_ff = h.shape
        sq = np.square(h, out=self._sq[:t * d_ff].reshape(t, d_ff))
        norm2 = sq.sum(axis=1, keepdims=True, dtype=np.float64)
        norm2[norm2 == 0] = 1.0
        sq /= norm2.astype(np.float32)
        return sq

    def add(self, layer: int, t: int, calls: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Accumulate the GRIFFIN statistic of these t tokens' FFN calls (see assemble)."""
        sq = self.normalized_sq(self.assemble(layer, t, calls))
        self.acc[layer, :sq.shape[1]] += sq.sum(axis=0, dtype=np.float64)
        self.n_tokens[layer] += t

    def add_predicted(self, layer: int, rows: np.ndarray) -> None:
        """Accumulate predicted rows (t, d_ff) of the L2-normalised |h| (the sketch policy): their
        negative parts clipped, squared as add squares the true rows."""
        r = np.maximum(rows, 0.0)
        self.acc[layer, :r.shape[1]] += np.einsum("td,td->d", r, r, dtype=np.float64)
        self.n_tokens[layer] += r.shape[0]

    def expert_scores(self, layer: int) -> np.ndarray:
        """One score per expert of the layer (sum of its neurons' GRIFFIN norms)."""
        off = self.offsets[layer]
        n_exp = int((self.n_neurons[layer] > 0).sum())
        col = np.sqrt(self.acc[layer, :int(off[-1])])
        return np.add.reduceat(col, off[:n_exp]) if n_exp else np.zeros(0)

    def all_scores(self) -> np.ndarray:
        """(n_layers, max_experts) scores; -inf where a layer has no such expert."""
        out = np.full(self.n_neurons.shape, -np.inf)
        for l in range(out.shape[0]):
            s = self.expert_scores(l)
            out[l, :len(s)] = s
        return out


def mix(prompt: np.ndarray, static: np.ndarray) -> np.ndarray:
    """(n_layers, max_experts) scores: each layer's prompt and static scores divided by their sum
    over the layer's experts (the finite entries), averaged; -inf stays where a layer has no expert."""
    def unit(s: np.ndarray) -> np.ndarray:
        finite = np.isfinite(s)
        total = np.where(finite, s, 0.0).sum(axis=1, keepdims=True)
        return np.where(finite, s / np.where(total > 0, total, 1.0), -np.inf)

    return np.where(np.isfinite(prompt), 0.5 * (unit(prompt) + unit(static)), -np.inf)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, in expert order (ties to the lower index)."""
    k = min(k, int(np.isfinite(scores).sum()))
    order = np.argsort(-scores, kind="stable")[:k]
    return np.sort(order)


def reselect(current: np.ndarray, scores: np.ndarray, margin: float = RESELECT_MARGIN) -> np.ndarray:
    """The active set after swapping in challengers that beat the weakest selected expert by more
    than `margin` (relative); the set's size is kept."""
    cur = set(int(e) for e in current)
    challengers = [int(e) for e in np.argsort(-scores, kind="stable") if int(e) not in cur and np.isfinite(scores[e])]
    weakest = sorted(cur, key=lambda e: scores[e])
    out = set(cur)
    for c, w in zip(challengers, weakest):
        if scores[c] > (1 + margin) * scores[w]:
            out.discard(w)
            out.add(c)
        else:
            break
    return np.array(sorted(out), dtype=np.int64)


# ---- the static policy's stored scores -----------------------------------------------------

def static_scores_path(model_dir: Path) -> Path:
    return Path(model_dir) / STATIC_FILE


def load_static(model_dir: Path) -> np.ndarray | None:
    p = static_scores_path(model_dir)
    if not p.exists():
        return None
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError):
        return None


def save_static(model_dir: Path, scores: np.ndarray) -> None:
    """Written to a temporary file and renamed: a crash leaves no half file."""
    p = static_scores_path(model_dir)
    fd, tmp = tempfile.mkstemp(prefix=".static-", suffix=".npy", dir=p.parent)
    try:
        os.fchmod(fd, fmt.file_mode())  # mkstemp's 0600: like the model's other files instead
        with os.fdopen(fd, "wb") as f:
            np.save(f, scores, allow_pickle=False)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- applying a selection ------------------------------------------------------------------

def apply_sets(arena, runner, sets: list[np.ndarray], *, prune: bool) -> int:
    """Make `sets` (one array of experts per layer) the active sets: read what is missing in one
    batch, pin exactly them; in prune mode they become all the FFN runs. Returns experts read."""
    runner.drop_prefetch()
    arena.unpin_all()
    keys = [(l, int(e)) for l, s in enumerate(sets) for e in s]
    n_read = arena.load(keys, pin=True)
    if prune:
        runner.active = [np.asarray(s, dtype=np.int64) for s in sets]
        runner.prune = True
    return n_read


# ---- the sketch policy's predictor ---------------------------------------------------------

class Predictor:
    """Per layer, y = b (a (x - mu_x)) + mu_y from each token's FFN input x (calibrate.py fits it;
    fmt stores it). Its target (the manifest's predictor "target", "neuron" when absent) is either
    the L2-normalised |h| row (d_ff outputs) or the norm of each expert's slice of that row
    (n_experts outputs). Matrices stay in their stored format (q8_0 or f16) and go through the
    kernels."""

    def __init__(self, tensors: dict, n_layers: int, *, target: str = "neuron",
                 n_neurons: list[list[int]] | None = None):
        from flashinfer_cli.model import _qt

        if target not in ("neuron", "expert"):
            raise ValueError(f"unknown predictor target {target!r}")
        if target == "expert" and n_neurons is None:
            raise ValueError("an expert-target predictor needs each expert's neuron count")
        self.target = target
        # expert target: each expert's output spread over its neurons (see predict)
        self._spread = [np.repeat(np.arange(len(n)), n) for n in n_neurons] if target == "expert" else None
        self._scale = [np.repeat(1.0 / np.sqrt(np.maximum(n, 1)), n).astype(np.float32)
                       for n in map(np.asarray, n_neurons)] if target == "expert" else None
        self.layers = []
        for layer in range(n_layers):
            n = fmt.predictor_names(layer)
            self.layers.append((_qt(tensors[n["a"]]), _qt(tensors[n["b"]]),
                                np.asarray(tensors[n["mu_x"]], np.float32).reshape(-1),
                                np.asarray(tensors[n["mu_y"]], np.float32).reshape(-1)))

    @classmethod
    def load(cls, reader: "fmt.ModelReader", n_layers: int) -> "Predictor | None":
        tensors = reader.predictor()
        if tensors is None:
            return None
        man = reader.manifest
        return cls(tensors, n_layers, target=man.predictor.get("target", "neuron"),
                   n_neurons=[[e.n_neurons for e in layer] for layer in man.experts])

    @property
    def rank(self) -> int:
        return self.layers[0][0].shape[0] if self.layers else 0

    def predict_raw(self, layer: int, x: np.ndarray) -> np.ndarray:
        """What the predictor was fitted to, for FFN inputs x (t, d_model) or (d_model,):
        (t, d_ff) rows, or (t, n_experts) expert norms for the expert target."""
        from flashinfer_cli import kernels

        a, b, mu_x, mu_y = self.layers[layer]
        xc = np.ascontiguousarray(np.atleast_2d(x) - mu_x, dtype=np.float32)
        z = np.ascontiguousarray(kernels.matmul(a, xc), dtype=np.float32)
        return kernels.matmul(b, z) + mu_y

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Predicted rows (t, d_ff) for the Scorer (add_predicted). For the expert target, expert
        e's predicted norm z (clipped at 0) becomes z / sqrt(n_e) on each of its n_e neurons: the
        row keeps the expert's norm, and the Scorer's expert score is sqrt(n_e) * ||z over tokens||,
        GRIFFIN's sum of n_e equal column norms."""
        raw = self.predict_raw(layer, x)
        if self.target == "neuron":
            return raw
        return np.maximum(raw, 0.0)[:, self._spread[layer]] * self._scale[layer]
