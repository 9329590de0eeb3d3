"""The transformer forward pass (Llama, Qwen2, Qwen3) over a fic model, with a KV cache.

Read it top to bottom like llama2.c's run.c: load the weights, then `forward(tokens)` runs every
layer on a batch of new tokens (prefill: T > 1, matmul) or on one token (decode: matvec), appending
their keys and values to the cache. Activations are float32; weights stay quantized (kernels.py).

The FFN runs through expert bundles. A provider (ExpertProvider) says which bundles a layer has in
memory; in this issue `AllResident` reads every bundle at load into one huge-page arena cut into
slots. The FFN of a layer is the sum over its experts of down_e(silu(gate_e x) * up_e x), and
`LayerFFN` runs it straight from the arena slots: one fused C call (kernels.ExpertSet,
fic_experts_ffn) per layer and step, decode and prefill alike. Its ExpertSet (the slot pointers)
is built once and rebuilt only when the provider's set for that layer changes, so a reselection
that swaps a few slots of one layer touches nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from flashinfer_cli import fmt, kernels
from flashinfer_cli.config import ArchConfig
from flashinfer_cli.kernels import QTensor


# ---- weights -------------------------------------------------------------------------------

def as_qtensor(w: QTensor | np.ndarray) -> QTensor:
    """A dense matrix as a QTensor the kernels take (float matrices are the f32/f16 'formats'),
    copied into huge pages: decode streams every weight once per token, and reads from huge pages
    run at nearly twice the speed (ARCHITECTURE.md)."""
    if isinstance(w, QTensor):
        return concat_rows([w])
    if w.dtype == np.float32:
        f = "f32"
    elif w.dtype == np.float16:
        f = "f16"
    else:
        raise ValueError(f"matrix of dtype {w.dtype}")
    w = np.ascontiguousarray(w)
    return concat_rows([QTensor(f, (w.shape[0], w.shape[1]), w.reshape(-1).view(np.uint8))])


def concat_rows(parts: Sequence[QTensor]) -> QTensor:
    """Stack matrices of one format and row length into one (rows of ggml blocks concatenate)."""
    f, k = parts[0].fmt, parts[0].shape[1]
    if any(p.fmt != f or p.shape[1] != k for p in parts):
        raise ValueError("concat_rows needs one format and one row length")
    data = kernels.aligned_buffer(sum(p.nbytes for p in parts), huge=True)
    off = 0
    for p in parts:
        data[off:off + p.nbytes] = p.data
        off += p.nbytes
    return QTensor(f, (sum(p.shape[0] for p in parts), k), data)


def _vec(x: QTensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    qkv: QTensor                # q, k, v rows stacked: one kernel call
    q_bias: np.ndarray | None   # q, k, v biases stacked (Qwen2)
    q_norm: np.ndarray | None   # Qwen3
    k_norm: np.ndarray | None
    attn_output: QTensor
    ffn_norm: np.ndarray


# ---- experts -------------------------------------------------------------------------------

class ExpertProvider(Protocol):
    """Where a layer's expert bundles come from. The next issues add an arena with a budget,
    per-prompt selection and streaming behind this same question."""

    def bundles(self, layer: int) -> list[tuple[int, fmt.Bundle]]:
        """(expert index, bundle) for every expert of `layer` to run, in expert order; each
        bundle's `data` is the memory it lives in (an arena slot) and stays valid until
        version(layer) changes."""
        ...

    def version(self, layer: int) -> int:
        """A number that changes whenever bundles(layer) would return a different set or slots."""
        ...


class AllResident:
    """Every bundle read at load (one batch, CRC-checked) into slots of one huge-page arena,
    which the FFN then runs from: the experts are in memory once."""

    def __init__(self, reader: fmt.ModelReader):
        man = reader.manifest
        keys = [(l, e) for l, layer in enumerate(man.experts) for e in range(len(layer))]
        sizes = [reader.bundle_bytes(l, e) for l, e in keys]
        self.arena = kernels.aligned_buffer(max(1, sum(sizes)), huge=True)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        dsts = [self.arena[offsets[i]:offsets[i + 1]] for i in range(len(keys))]
        bundles = reader.read_bundles(keys, dsts) if keys else []
        self._by_layer: list[list[tuple[int, fmt.Bundle]]] = [[] for _ in man.experts]
        for (l, e), b in zip(keys, bundles):
            self._by_layer[l].append((e, b))

    def bundles(self, layer: int) -> list[tuple[int, fmt.Bundle]]:
        return self._by_layer[layer]

    def version(self, layer: int) -> int:
        return 0  # the set never changes


class Scratch:
    """One float32 buffer for the hidden activations of every layer's FFN (they run one at a time),
    grown to the largest t x neurons asked for."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.float32)

    def get(self, n: int) -> np.ndarray:
        if self.buf.size < n:
            self.buf = np.empty(n, dtype=np.float32)
        return self.buf


class LayerFFN:
    """One layer's FFN over the provider's bundles of that layer, run where they lie (no copy):
    one fic_experts_ffn call per step. The ExpertSet is cached and rebuilt only when the
    provider's version of this layer changes."""

    def __init__(self, provider: ExpertProvider, layer: int, layout: fmt.ExpertLayout, scratch: Scratch):
        self.provider, self.layer, self.layout, self.scratch = provider, layer, layout, scratch
        self._version: int | None = None
        self._set: kernels.ExpertSet | None = None
        self.expert_set()  # fail at load, not at the first token

    def expert_set(self) -> kernels.ExpertSet:
        v = self.provider.version(self.layer)
        if v != self._version or self._set is None:
            pairs = self.provider.bundles(self.layer)
            if not pairs:
                raise ValueError(f"layer {self.layer} has no experts")
            bundles = [b for _, b in pairs]
            if any(b.data is None for b in bundles):
                raise ValueError(f"layer {self.layer}: a bundle without its buffer")
            self._set = kernels.ExpertSet.from_layout(self.layout, [b.data for b in bundles],
                                                      [b.n_neurons for b in bundles])
            self._version = v
        return self._set

    def add_to(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """y += FFN(x) in place (x, y float32 (d_model,) or (t, d_model)); returns y."""
        s = self.expert_set()
        t = 1 if x.ndim == 1 else x.shape[0]
        return s.ffn(x, y, scratch=self.scratch.get(t * s.n_total))


# ---- the math ------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * w over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + eps)) * w


def _rmsnorm1(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """rmsnorm of one vector (decode): a dot product and two multiplies."""
    return (x * np.float32(1.0 / math.sqrt(float(np.dot(x, x)) / x.size + eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """RoPE frequencies, with Llama 3's rope scaling (transformers' _compute_llama3_parameters)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (fic runs default and llama3)")
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(n_pos: int, head_dim: int, theta: float, scaling: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n_pos, head_dim) in rotate-half order (each frequency twice, halves apart)."""
    ang = np.outer(np.arange(n_pos, dtype=np.float64), rope_inv_freq(head_dim, theta, scaling))
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, heads, head_dim); cos/sin (T, head_dim). Hugging Face's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


# ---- the model -----------------------------------------------------------------------------

PREFILL_CHUNK = 512  # tokens per prefill pass


class ContextFull(ValueError):
    """More tokens than the KV cache holds."""


class Model:
    """Weights + KV cache of one fic model. `forward(tokens)` appends tokens at position `pos`."""

    def __init__(self, path: str | Path, *, ctx: int | None = None, provider_factory=AllResident):
        self.reader = fmt.ModelReader(path)
        man = self.reader.manifest
        self.config = c = ArchConfig.from_json(man.arch)
        if man.expert_layout is None:
            raise fmt.FormatError(self.reader.path, "no expert layout: the FFN has no bundles")
        self.ctx = min(ctx or min(c.max_ctx, 4096), c.max_ctx)
        dense = self.reader.dense()
        self.token_embd = as_qtensor(dense["token_embd"])
        self.output_norm = _vec(dense["output_norm"])
        self.output = self.token_embd if c.tie_embeddings else as_qtensor(dense["output"])
        self.layers = [self._layer(dense, i) for i in range(c.n_layers)]
        self.provider = provider_factory(self.reader)
        self._scratch = Scratch()
        self.ffn = [self._ffn(i, man.expert_layout) for i in range(c.n_layers)]
        self.cos, self.sin = rope_tables(self.ctx, c.head_dim, c.rope_theta, c.rope_scaling)
        half = c.head_dim // 2  # decode's RoPE: rotate_half(x) = x[rot] * sign, the sign folded into sin
        self._rot = np.concatenate([np.arange(half, c.head_dim), np.arange(half)])
        self._sin_signed = np.concatenate([-self.sin[:, :half], self.sin[:, half:]], axis=1)
        self._scale = np.float32(1.0 / math.sqrt(c.head_dim))
        self.k_cache = np.zeros((c.n_layers, self.ctx, c.n_kv_heads, c.head_dim), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)
        self.pos = 0

    def _layer(self, dense: dict, i: int) -> LayerWeights:
        c = self.config
        p = f"blk.{i}."
        qkv = [as_qtensor(dense[p + n]) for n in ("attn_q", "attn_k", "attn_v")]
        bias = np.concatenate([_vec(dense[p + n + ".bias"]) for n in ("attn_q", "attn_k", "attn_v")]) \
            if c.attn_bias else None
        return LayerWeights(
            attn_norm=_vec(dense[p + "attn_norm"]),
            qkv=concat_rows(qkv) if len({q.fmt for q in qkv}) == 1 else qkv,
            q_bias=bias,
            q_norm=_vec(dense[p + "attn_q_norm"]) if c.qk_norm else None,
            k_norm=_vec(dense[p + "attn_k_norm"]) if c.qk_norm else None,
            attn_output=as_qtensor(dense[p + "attn_output"]),
            ffn_norm=_vec(dense[p + "ffn_norm"]),
        )

    def _ffn(self, layer: int, layout: fmt.ExpertLayout) -> LayerFFN:
        # A layer's neuron order (fmt.ModelReader.neuron_order) needs no undoing: the FFN is a sum
        # over neurons, and each bundle keeps a neuron's gate row, up row and down column together.
        try:
            return LayerFFN(self.provider, layer, layout, self._scratch)
        except ValueError as e:
            raise fmt.FormatError(self.reader.path, str(e)) from None

    def reset(self) -> None:
        """Forget the context (the cache is overwritten, not cleared)."""
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Keep the first n tokens of the context (a chat reuses its common prefix)."""
        self.pos = min(self.pos, n)

    # -- one step --
    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of token_embd, dequantized one at a time."""
        e = self.token_embd
        return np.concatenate([kernels.dequantize(e.rows(t, t + 1)) for t in tokens])

    def forward(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions pos.. and append them to the cache. Returns the logits of the
        last token (vocab,), or of every token (T, vocab) when all_logits."""
        c = self.config
        t = len(tokens)
        if t == 0:
            raise ValueError("forward of no tokens")
        if self.pos + t > self.ctx:
            raise ContextFull(f"{self.pos + t} tokens do not fit the context of {self.ctx}")
        if any(not 0 <= tok < c.vocab_size for tok in tokens):
            raise ValueError(f"token id outside the vocabulary of {c.vocab_size}")
        if t == 1 and not all_logits:
            return self._decode(tokens[0])
        if t > PREFILL_CHUNK:  # bounds the attention scores' memory for long prompts
            parts = [self.forward(tokens[i:i + PREFILL_CHUNK], all_logits=all_logits)
                     for i in range(0, t, PREFILL_CHUNK)]
            return np.concatenate(parts) if all_logits else parts[-1]
        x = self.embed(tokens)
        for i in range(c.n_layers):
            x = x + self._attention(i, rmsnorm(x, self.layers[i].attn_norm, c.norm_eps))
            self.ffn[i].add_to(rmsnorm(x, self.layers[i].ffn_norm, c.norm_eps), x)
        self.pos += t
        x = rmsnorm(x if all_logits else x[-1:], self.output_norm, c.norm_eps)
        logits = kernels.matmul(self.output, x) if all_logits else kernels.matvec(self.output, x[0])
        return logits.reshape(-1, c.vocab_size) if all_logits else logits

    def _decode(self, token: int) -> np.ndarray:
        """One token: the same arithmetic as the prefill path, with as few numpy calls as possible
        (a decode step is ~30 layers x a dozen small operations between kernel calls)."""
        c = self.config
        x = self.embed([token])[0]
        for i in range(c.n_layers):
            lw = self.layers[i]
            x += self._attend_one(i, _rmsnorm1(x, lw.attn_norm, c.norm_eps))
            self.ffn[i].add_to(_rmsnorm1(x, lw.ffn_norm, c.norm_eps), x)
        self.pos += 1
        return kernels.matvec(self.output, _rmsnorm1(x, self.output_norm, c.norm_eps))

    def _attend_one(self, i: int, x: np.ndarray) -> np.ndarray:
        c, lw, p = self.config, self.layers[i], self.pos
        nh, nkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        if isinstance(lw.qkv, QTensor):
            qkv = kernels.matvec(lw.qkv, x)
        else:
            qkv = np.concatenate([kernels.matvec(w, x) for w in lw.qkv])
        if lw.q_bias is not None:
            qkv += lw.q_bias
        qk = qkv[:(nh + nkv) * hd].reshape(nh + nkv, hd)
        if lw.q_norm is not None:
            qk = np.concatenate([rmsnorm(qk[:nh], lw.q_norm, c.norm_eps), rmsnorm(qk[nh:], lw.k_norm, c.norm_eps)])
        qk = qk * self.cos[p] + qk[:, self._rot] * self._sin_signed[p]  # RoPE, rotate-half
        self.k_cache[i, p] = qk[nh:]
        self.v_cache[i, p] = qkv[(nh + nkv) * hd:].reshape(nkv, hd)
        n = p + 1
        q = qk[:nh].reshape(nkv, nh // nkv, hd)
        scores = np.matmul(q, self.k_cache[i, :n].transpose(1, 2, 0))  # (kv, group, n)
        scores *= self._scale
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, self.v_cache[i, :n].transpose(1, 0, 2))  # (kv, group, hd)
        return kernels.matvec(lw.attn_output, out.reshape(-1))

    def _attention(self, i: int, x: np.ndarray) -> np.ndarray:
        """Attention of a batch of tokens (prefill)."""
        c, lw = self.config, self.layers[i]
        t, p0 = x.shape[0], self.pos
        nq, nkv, hd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.head_dim
        if isinstance(lw.qkv, QTensor):
            qkv = kernels.matmul(lw.qkv, x)
        else:  # q, k, v in different formats
            qkv = np.concatenate([kernels.matmul(w, x) for w in lw.qkv], axis=1)
        if lw.q_bias is not None:
            qkv = qkv + lw.q_bias
        q = qkv[:, :nq].reshape(t, c.n_heads, hd)
        k = qkv[:, nq:nq + nkv].reshape(t, c.n_kv_heads, hd)
        v = qkv[:, nq + nkv:].reshape(t, c.n_kv_heads, hd)
        if lw.q_norm is not None:
            q = rmsnorm(q, lw.q_norm, c.norm_eps)
            k = rmsnorm(k, lw.k_norm, c.norm_eps)
        cos, sin = self.cos[p0:p0 + t], self.sin[p0:p0 + t]
        q = apply_rope(q, cos, sin)
        self.k_cache[i, p0:p0 + t] = apply_rope(k, cos, sin)
        self.v_cache[i, p0:p0 + t] = v
        n = p0 + t
        keys = self.k_cache[i, :n].transpose(1, 2, 0)      # (kv, hd, n)
        vals = self.v_cache[i, :n].transpose(1, 0, 2)      # (kv, n, hd)
        g = c.n_heads // c.n_kv_heads
        qg = q.reshape(t, c.n_kv_heads, g, hd).transpose(1, 0, 2, 3).reshape(c.n_kv_heads, t * g, hd)
        scores = np.matmul(qg, keys) * np.float32(1.0 / math.sqrt(hd))  # (kv, t*g, n)
        if t > 1:  # causal: query at position p0+j sees keys 0..p0+j
            qpos = np.repeat(np.arange(p0, p0 + t), g)
            scores = np.where(np.arange(n)[None, :] <= qpos[:, None], scores, -np.inf)
        out = np.matmul(softmax(scores), vals)                       # (kv, t*g, hd)
        out = out.reshape(c.n_kv_heads, t, g, hd).transpose(1, 0, 2, 3).reshape(t, nq)
        return kernels.matmul(lw.attn_output, np.ascontiguousarray(out, dtype=np.float32))

    def close(self) -> None:
        self.reader.close()
