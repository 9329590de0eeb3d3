"""The transformer forward pass (Llama, Qwen2, Qwen3) over a fic model, with a KV cache.

Read it top to bottom like llama2.c's run.c: load the weights, then `forward(tokens)` runs every
layer on a batch of new tokens (prefill: T > 1, matmul) or on one token (decode: matvec), appending
their keys and values to the cache. Activations are float32; weights stay quantized (kernels.py).

The FFN runs through expert bundles in the arena (arena.py): streaming.FFNRunner runs a layer's
resident experts where they lie and streams the missing ones through the ring; which experts are
resident, pinned or active is the arena's and the router's business (router.py), not this file's.
The memory plan (plan.py) sizes every buffer here once, at open.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from flashinfer_cli import fmt, kernels, moe
from flashinfer_cli.arena import Arena
from flashinfer_cli.config import ArchConfig
from flashinfer_cli.kernels import QTensor
from flashinfer_cli.plan import MemoryPlan, ModelShape, PlanRequest, make_plan, workspace_maxima
from flashinfer_cli.router import Scorer
from flashinfer_cli.streaming import FFNRunner

# A prefill call that starts on a multiple of this (prefill attention's query groups, ATT_QB in
# csrc/attention.c) computes every position bit for bit as one call from position 0 would: prefill
# chunks are multiples of it, and a reused prefix is cut to it (engine.PREFIX_ALIGN), so that what
# a model computes depends on the tokens, never on its budget (tests/test_prefix_reuse.py).
PREFILL_ALIGN = 8


# ---- weights -------------------------------------------------------------------------------

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
    # a mixture of experts' layer: its rule, router (n_routed, d_model) f32, and shared expert
    rule: moe.RoutingRule | None = None
    router: np.ndarray | None = None
    shared: tuple[QTensor, QTensor, QTensor] | None = None  # gate, up, down
    shared_gate: np.ndarray | None = None                   # (d_model,): sigmoid(w . x) scales it
    # a dense model's shared expert (cluster.py): one bundle in the dense block, run in both modes
    shared_set: kernels.ExpertSet | None = None


# ---- the math ------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * w over the last axis: float32 in C (kernels.rmsnorm_rows: numpy's temporaries
    cost a prefill ~13%), other dtypes (a test's float64 reference) in numpy."""
    if x.dtype == np.float32 and w.dtype == np.float32 and x.size:
        return kernels.rmsnorm_rows(x, w, eps)
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
    """x (T, heads, head_dim); cos/sin (T, head_dim). Hugging Face's rotate-half convention; float32
    in C (kernels.rope_rows), other dtypes in numpy."""
    if x.dtype == np.float32 and cos.dtype == np.float32 and sin.dtype == np.float32 and x.size:
        return kernels.rope_rows(x, cos, sin)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


# ---- the model -----------------------------------------------------------------------------

class ContextFull(ValueError):
    """More tokens than the KV cache holds."""


def _qt(w: QTensor | np.ndarray) -> QTensor:
    """A dense matrix as the kernels take it (float matrices are the f32/f16 'formats'); a view."""
    if isinstance(w, QTensor):
        return w
    f = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}.get(w.dtype)
    if f is None or w.ndim != 2:
        raise ValueError(f"matrix of dtype {w.dtype} and {w.ndim} dimensions")
    return QTensor(f, (w.shape[0], w.shape[1]), w.reshape(-1).view(np.uint8))


class Model:
    """Weights + KV cache of one fic model. `forward(tokens)` appends tokens at position `pos`."""

    def __init__(self, path: str | Path, *, ctx: int | None = None, plan: MemoryPlan | None = None,
                 kv_dtype: str = "f16"):
        self.reader = fmt.ModelReader(path)
        man = self.reader.manifest
        self.config = c = ArchConfig.from_json(man.arch)
        if man.expert_layout is None:
            raise fmt.FormatError(self.reader.path, "no expert layout: the FFN has no bundles")
        if plan is None:
            ctx = min(ctx or min(c.max_ctx, 4096), c.max_ctx)
            plan = make_plan(ModelShape.from_manifest(man), PlanRequest(ctx=ctx, n_threads=kernels.get_threads(),
                                                                        kv_dtype=kv_dtype))
        self.plan = plan
        self.ctx = plan.ctx
        kernels.reserve_workspace(**workspace_maxima(plan.shape, plan.prefill_chunk))
        self.prefill_chunk = plan.prefill_chunk
        # the dense block, read straight from the file into one huge-page buffer
        layout, dense_bytes = fmt.dense_pack(man)
        self._dense_buf = kernels.aligned_buffer(dense_bytes, huge=True)
        dense = self.reader.read_dense_into(self._dense_buf)
        self._pack = {name: (off, n) for name, off, n in layout}
        on_flash = fmt.flash_resident(man)
        self.token_embd = self.reader.dense_rows("token_embd") if "token_embd" in on_flash else _qt(dense["token_embd"])
        self.output_norm = _vec(dense["output_norm"])
        self.output = self.token_embd if c.tie_embeddings else _qt(dense["output"])
        self.layers = [self._layer(dense, i) for i in range(c.n_layers)]
        r32 = kernels.q1r32_wanted()
        if r32:
            self._q1r32_layout()
        # Q1_0 bundles too, each repacked as it is read into the arena (fmt.PendingBundles); the exact
        # float prefill reads rows, so it keeps them as stored
        self.r32_experts = r32 and kernels.get_prefill() != "exact" and self.reader.use_r32()
        # the shared experts' h (t x neurons), sized once: the plan's scratch counts d_ff per token
        n_shared = max(man.shared_neurons, default=0)
        self._shared_scratch = np.empty(max(1, plan.prefill_chunk * n_shared), dtype=np.float32)
        # the arena and the FFN runner
        self.arena = Arena(self.reader, n_slots=max(1, plan.n_slots), n_ring=plan.n_ring)
        if plan.all_resident:
            self.arena.load_all()
            self.arena.begin_request()
        self.runner = FFNRunner(self.arena, self.reader.layout, plan.prefill_chunk)
        self.runner.wrap = not plan.prune and man.moe is None  # MoE: which experts run is known per token
        self.moe = man.moe
        # the per-prompt statistic: GRIFFIN's over neurons, or a MoE's router probabilities
        self.scorer = Scorer(self.arena.n_neurons, max_tokens=plan.prefill_chunk) if man.moe is None else \
            moe.RouterScorer(c.n_layers, self.arena.n_neurons.shape[1])
        self.cos, self.sin = rope_tables(self.ctx, c.head_dim, c.rope_theta, c.rope_scaling)
        half = c.head_dim // 2  # decode's RoPE: rotate_half(x) = x[rot] * sign, the sign folded into sin
        self._rot = np.concatenate([np.arange(half, c.head_dim), np.arange(half)])
        self._sin_signed = np.concatenate([-self.sin[:, :half], self.sin[:, half:]], axis=1)
        self._scale = np.float32(1.0 / math.sqrt(c.head_dim))
        kv = np.float16 if plan.request.kv_dtype == "f16" else np.float32
        self.k_cache = np.zeros((c.n_layers, self.ctx, c.n_kv_heads, c.head_dim), kv)
        self.v_cache = np.zeros_like(self.k_cache)
        # fp16 cache: attention in C (attention.c, a streaming softmax, no score matrix); an fp32
        # cache (parity tests) keeps the numpy reference path
        self._c_attention = kv is np.float16
        if self._c_attention:
            kernels.reserve_attention(kernels.get_threads(), plan.prefill_chunk, c.n_heads, c.head_dim)
        # decode: each layer's attention block is one C call (decode.c) on these two buffers: the
        # residual stream and the FFN's input; False runs the numpy reference step (_attend_one)
        self.fused_decode = self._c_attention
        self._x = np.zeros(c.d_model, dtype=np.float32)
        self._xn = np.zeros(c.d_model, dtype=np.float32)
        self._decode_attn = self._fused_attention() if self._c_attention else None
        self.pos = 0
        # a callback that receives every FFN call's selection statistic: (layer, t, calls) with h
        # for a dense model, (layer, probs) with the router's probabilities for a MoE
        self.collect = None
        # a callback given each FFN's input before the FFN runs: (layer, xn (t, d) or (d,)); the
        # sketch policy chooses a layer's set from it (pruned prefill), calibration records it
        self.before_ffn = None
        self.full = not plan.prune  # every expert runs (exact mode); False: the active sets only
        self.window: np.ndarray | None = None  # prune-mode reselection: recent FFN inputs per layer
        self.moe_prefetch = True  # a mixture of experts in exact mode: read the next layer's predicted experts
        # decode of a mixture of experts: routing, top-k, resident experts and shared expert in C
        # (moe.c, one call per layer when every picked expert is resident); False: the numpy step
        self.fused_moe = man.moe is not None
        self._moe_decode = self._fused_moe() if man.moe is not None else None
        # decode of a dense model whose every layer needs no read and no Python hook: all layers in
        # one C call (kernels.DecodeLayers, made again when a layer's resident call changes)
        self.fused_layers = self._c_attention and man.moe is None and \
            all(lw.shared_set is None for lw in self.layers)
        self.fused_layers_moe = True  # the same for a mixture of experts (_moe_in_one_call says when)
        self._layers_held: tuple | None = None  # (the layers' calls, DecodeLayers, slots, each slot's layer)
        # a mixture of experts' decode with nothing to read ahead: attention and routed layers in one C
        # call, broken only at a layer whose picks are not all resident
        self._moe_layers = kernels.DecodeMoELayers(self._decode_attn, self._moe_decode) \
            if self._c_attention and man.moe is not None else None

    def _layer(self, dense: dict, i: int) -> LayerWeights:
        c = self.config
        p = f"blk.{i}."
        names = [p + n for n in ("attn_q", "attn_k", "attn_v")]
        qkv = [_qt(dense[n]) for n in names]
        offs = [self._pack[n] for n in names]
        adjacent = all(offs[j][0] + offs[j][1] == offs[j + 1][0] for j in range(2)) and len({q.fmt for q in qkv}) == 1
        if adjacent:  # packed q|k|v rows: one matrix, one kernel call (fmt.dense_pack)
            start, stop = offs[0][0], offs[2][0] + offs[2][1]
            qkv = QTensor(qkv[0].fmt, (sum(q.shape[0] for q in qkv), qkv[0].shape[1]), self._dense_buf[start:stop])
        bias = np.concatenate([_vec(dense[p + n + ".bias"]) for n in ("attn_q", "attn_k", "attn_v")]) \
            if c.attn_bias else None
        moe_parts = {}
        if self.reader.manifest.moe is not None:
            rule = self.reader.manifest.moe[i]
            n = moe.router_names(i)
            moe_parts = dict(rule=rule, router=np.ascontiguousarray(dense[n["router"]], dtype=np.float32))
            if rule.shared_neurons:
                moe_parts["shared"] = tuple(_qt(dense[n[k]]) for k in ("gate", "up", "down"))
            if rule.shared_gate == "sigmoid":
                moe_parts["shared_gate"] = _vec(dense[n["shared_gate"]])
        n_shared = self.reader.manifest.shared_neurons[i] if self.reader.manifest.moe is None else 0
        if n_shared:  # the three parts are adjacent in the dense buffer (fmt.dense_pack): one bundle
            names = fmt.shared_names(i)
            start = self._pack[names[0]][0]
            stop = self._pack[names[2]][0] + self._pack[names[2]][1]
            moe_parts["shared_set"] = kernels.ExpertSet.from_layout(
                self.reader.manifest.expert_layout.layer(i), [self._dense_buf[start:stop]], [n_shared])
        return LayerWeights(
            **moe_parts,
            attn_norm=_vec(dense[p + "attn_norm"]),
            qkv=qkv,
            q_bias=bias,
            q_norm=_vec(dense[p + "attn_q_norm"]) if c.qk_norm else None,
            k_norm=_vec(dense[p + "attn_k_norm"]) if c.qk_norm else None,
            attn_output=_qt(dense[p + "attn_output"]),
            ffn_norm=_vec(dense[p + "ffn_norm"]),
        )

    def _q1r32_layout(self) -> None:
        """The resident Q1_0 matrices of attention, a mixture of experts' shared expert and the output
        into the r32 layout, in place:
        decode's matvec by table lookups, 1.3-1.5x the row-major kernel's speed from DRAM on 2
        threads (bench/RESULTS.md, "Q1_0 in groups of 32 rows"); prefill unpacks them for the
        row-major kernels, the same bits."""
        c = self.config
        cuts = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim)  # the fused decode slices q|k|v here

        def r32(qt):
            ok = isinstance(qt, QTensor) and kernels.q1r32_eligible(qt)
            return kernels.q1r32_repack(qt, in_place=True) if ok else qt
        for lw in self.layers:
            if isinstance(lw.qkv, QTensor):
                if all(n % kernels.Q1R32_ROWS == 0 for n in cuts):
                    lw.qkv = r32(lw.qkv)
            else:
                lw.qkv = [r32(q) for q in lw.qkv]
            lw.attn_output = r32(lw.attn_output)
            if lw.shared is not None:  # a mixture of experts' shared expert, run every token
                lw.shared = tuple(r32(q) for q in lw.shared)
        tied = self.output is self.token_embd
        self.output = r32(self.output)
        if tied:
            self.token_embd = self.output

    def _fused_attention(self) -> kernels.DecodeAttention:
        c = self.config
        nq, nkv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qk_norm = None if not c.qk_norm else ("full" if c.qk_norm_full else "head")
        shape = kernels.DecodeShape(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, float(c.norm_eps),
                                    float(self._scale), qk_norm)
        blocks = []
        for lw in self.layers:
            wq, wk, wv = lw.qkv if not isinstance(lw.qkv, QTensor) else \
                (lw.qkv.rows(0, nq), lw.qkv.rows(nq, nq + nkv), lw.qkv.rows(nq + nkv, nq + 2 * nkv))
            blocks.append(kernels.AttnBlockWeights(lw.attn_norm, wq, wk, wv, lw.attn_output, lw.ffn_norm,
                                                   lw.q_bias, lw.q_norm, lw.k_norm))
        return kernels.DecodeAttention(shape, blocks, self.cos, self.sin, self.k_cache, self.v_cache,
                                       self._x, self._xn)

    def _fused_moe(self) -> kernels.MoEDecode:
        c, a = self.config, self.arena
        max_neurons = max(1, int(a.n_neurons.max(initial=0)))
        shapes = [kernels.MoEShape(c.d_model, lw.rule.n_routed, lw.rule.top_k, lw.rule.softmax == "after",
                                   lw.rule.norm_topk, lw.rule.shared_neurons, max_neurons, float(c.norm_eps))
                  for lw in self.layers]
        weights = [kernels.MoELayerWeights(lw.router, lw.shared, lw.shared_gate) for lw in self.layers]
        return kernels.MoEDecode(shapes, weights, self.reader.layout, a.buf, a.slot_bytes,
                                 a.slot_of, a.n_neurons)

    def _ffn(self, i: int, xn: np.ndarray, x: np.ndarray) -> None:
        """x += FFN_i(xn), through the arena."""
        if self.before_ffn is not None:
            self.before_ffn(i, xn)
        if self.moe is not None:
            self._moe_ffn(i, xn, x)
            return
        self.runner.run(i, xn, x, full=self.full, collect=self.collect)
        shared = self.layers[i].shared_set
        if shared is not None:  # always on, in both modes; never scored, never read from flash
            t = 1 if xn.ndim == 1 else xn.shape[0]
            shared.ffn(np.ascontiguousarray(xn, dtype=np.float32), x, scratch=self._shared_scratch[:t * shared.n_total])

    def _moe_ffn(self, i: int, xn: np.ndarray, x: np.ndarray) -> None:
        """x += the routed experts each token picks, weighed by the layer's rule, + the shared expert."""
        lw = self.layers[i]
        one = xn.ndim == 1
        if one and self.fused_moe:
            self._moe_ffn_one(i, xn, x)
            return
        logits = (xn[None, :] if one else xn) @ lw.router.T
        # prune mode: each token's top-k among the active set (full: while the prompt chooses it)
        allowed = None if self.full else self.runner.active_mask(i)
        coef, probs = moe.route(lw.rule, logits, allowed)
        if self.collect is not None:
            self.collect(i, probs)
        prefetch = None
        if self.moe_prefetch and one and self.full and not self.plan.all_resident and i + 1 < len(self.layers):
            # layer i+1's router on this layer's hidden state, normalised as layer i+1 will: its
            # guess at the next layer's experts, read while this layer computes
            nxt = self.layers[i + 1]
            guess = _rmsnorm1(x, nxt.ffn_norm, self.config.norm_eps) @ nxt.router.T
            prefetch = (i + 1, np.argsort(-guess, kind="stable")[:nxt.rule.top_k])
        self.runner.run_routed(i, xn, x, coef[0] if one else coef, prefetch)
        if lw.shared is not None:
            gate, up, down = lw.shared
            if one:
                h = silu(kernels.matvec(gate, xn)) * kernels.matvec(up, xn)
                out = kernels.matvec(down, h)
            else:
                h = silu(kernels.matmul(gate, xn)) * kernels.matmul(up, xn)
                out = kernels.matmul(down, np.ascontiguousarray(h, dtype=np.float32))
            if lw.shared_gate is not None:
                g = xn @ lw.shared_gate
                out *= (1.0 / (1.0 + np.exp(-g))) if one else (1.0 / (1.0 + np.exp(-g)))[:, None]
            x += out

    def _moe_ffn_one(self, i: int, xn: np.ndarray, x: np.ndarray) -> None:
        """_moe_ffn of one token through moe.c: one C call per layer when no read is involved
        (prune mode, or every expert resident); in exact mode under a budget the routing and the
        next layer's guess in C, the reads and the routed experts through the runner."""
        md, runner = self._moe_decode, self.runner
        allowed = None if self.full else runner.active_u8(i)
        reads = self.moe_prefetch and self.full and not self.plan.all_resident
        if not reads:
            missing = md.run(i, xn, x, allowed)
            if missing == 0:
                self.arena.touch(i, md.top[:md.n_top])
                if self.collect is not None:
                    self.collect(i, md.probs[None, :md.n_routed[i]].copy())
                return
        else:
            md.route(i, xn, allowed)
        n_routed = md.n_routed[i]
        if self.collect is not None:
            self.collect(i, md.probs[None, :n_routed].copy())
        prefetch = None
        if reads and i + 1 < len(self.layers):
            # layer i+1's router on this layer's residual, normalised as layer i+1 will: its guess at
            # the next layer's experts, read while this layer computes
            prefetch = (i + 1, md.guess(i + 1, x, self.layers[i + 1].ffn_norm))
        runner.run_routed(i, xn, x, md.coef[:n_routed].copy(), prefetch)
        md.shared(i, xn, x)

    def reset(self) -> None:
        """Forget the context (the cache is overwritten, not cleared)."""
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Keep the first n tokens of the context (a chat reuses its common prefix)."""
        self.pos = min(self.pos, n)

    # -- one step --
    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of token_embd, dequantized (read from flash when the embedding stays there)."""
        e = self.token_embd
        if isinstance(e, fmt.DenseRows):
            return kernels.dequantize(e.rows(list(tokens)))
        if e.fmt == "q1_0r32":  # rows gathered back from their groups of 32
            return np.concatenate([kernels.dequantize(kernels.q1r32_rows(e, t, t + 1)) for t in tokens])
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
        if t > self.prefill_chunk:  # bounds the activations' memory (the plan's scratch)
            cuts = list(range(0, t, self.prefill_chunk)) + [t]
            if cuts[-1] - cuts[-2] == 1:  # a last piece of one token would run as a decode step (other
                cuts[-2] -= PREFILL_ALIGN  # arithmetic): it runs with the PREFILL_ALIGN tokens before it
            parts = [self.forward(tokens[a:b], all_logits=all_logits) for a, b in zip(cuts, cuts[1:])]
            return np.concatenate(parts) if all_logits else parts[-1]
        x = self.embed(tokens)
        for i in range(c.n_layers):
            x = x + self._attention(i, rmsnorm(x, self.layers[i].attn_norm, c.norm_eps))
            xn = rmsnorm(x, self.layers[i].ffn_norm, c.norm_eps)
            if self.window is not None:  # as _decode does token by token: the last FFN inputs
                w = self.window.shape[1]
                keep = min(t, w)
                self.window[i, (self.pos + np.arange(t - keep, t)) % w] = xn[t - keep:]
            self._ffn(i, xn, x)
        self.pos += t
        x = rmsnorm(x if all_logits else x[-1:], self.output_norm, c.norm_eps)
        logits = kernels.matmul(self.output, x) if all_logits else kernels.matvec(self.output, x[0])
        return logits.reshape(-1, c.vocab_size) if all_logits else logits

    def _decode(self, token: int) -> np.ndarray:
        """One token: the same arithmetic as the prefill path, with as few numpy calls as possible
        (a decode step is ~30 layers x a dozen small operations between kernel calls)."""
        c = self.config
        if self.fused_decode:
            return self._decode_fused(token)
        x = self.embed([token])[0]
        for i in range(c.n_layers):
            lw = self.layers[i]
            x += self._attend_one(i, _rmsnorm1(x, lw.attn_norm, c.norm_eps))
            xn = _rmsnorm1(x, lw.ffn_norm, c.norm_eps)
            if self.window is not None:
                self.window[i, self.pos % self.window.shape[1]] = xn
            self._ffn(i, xn, x)
        self.pos += 1
        return kernels.matvec(self.output, _rmsnorm1(x, self.output_norm, c.norm_eps))

    def _fused_layers(self) -> tuple | None:
        """(calls, kernels.DecodeLayers, slots, each slot's layer) for a token that can run every
        layer in one C call: a dense model with no shared experts, no hook, no reselection window,
        every layer's run set resident. None otherwise (the layer-by-layer step)."""
        if not self.fused_layers or self.window is not None or self.before_ffn is not None or self.collect is not None:
            return None
        prepared = self.runner.resident_calls(self.full)
        if prepared is None:
            return None
        held = self._layers_held
        if held is not None and all(a is p[1] for a, p in zip(held[0], prepared)):
            return held
        calls = tuple(p[1] for p in prepared)
        layers = kernels.DecodeLayers(self._decode_attn, calls, self.runner._acc1 if self.runner.fixed else None)
        slots = np.concatenate([p[2] for p in prepared])
        run_of = np.repeat(np.arange(len(prepared)), [len(p[2]) for p in prepared])
        self._layers_held = (calls, layers, slots, run_of)
        return self._layers_held

    def _moe_in_one_call(self) -> bool:
        """A MoE decode token needs no Python between layers: no hook, no reselection window, the
        fused MoE step, and no next-layer reads (exact mode under a budget guesses and reads them)."""
        return (self.fused_layers_moe and self.fused_moe and self.window is None and self.before_ffn is None
                and self.collect is None and not (self.moe_prefetch and self.full and not self.plan.all_resident))

    def _decode_moe_layers(self) -> None:
        """Every layer of a MoE token: runs of layers in one C call, a layer whose picks must be read
        through the layer-by-layer step (_moe_ffn_one, which routes again: the same picks)."""
        ml, runner, arena, n = self._moe_layers, self.runner, self.arena, self.config.n_layers
        for layer in range(n):
            ml.set_allowed(layer, None if self.full else runner.active_u8(layer))
        l0 = 0
        while l0 < n:
            reached = ml.run(l0, self.pos)
            if reached > l0:  # their picks were used: arena.touch of each, in layer order
                n_top = ml.n_top[l0:reached]
                picked = np.arange(ml.tops.shape[1]) < n_top[:, None]
                layer_of = np.repeat(np.arange(l0, reached), n_top)
                arena.touch_slot_runs(arena.slot_of[layer_of, ml.tops[l0:reached][picked]], layer_of - l0,
                                      reached - l0)
            if reached == n:
                return
            self._ffn(reached, self._xn, self._x)
            l0 = reached + 1

    def _decode_fused(self, token: int) -> np.ndarray:
        """_decode with each layer's attention block one C call on the preallocated x and xn; with
        nothing to read and nothing to hook, every layer in one C call."""
        c, x = self.config, self._x
        x[:] = self.embed([token])[0]
        if self._moe_layers is not None and self._moe_in_one_call():
            self._decode_moe_layers()
        elif (held := self._fused_layers()) is not None:
            calls, layers, slots, run_of = held
            self.runner.begin_fused(x)
            layers.run(self.pos)
            self.runner.end_fused()
            self.arena.touch_slot_runs(slots, run_of, len(calls))
        else:
            self._decode_layer_by_layer()
        self.pos += 1
        return kernels.matvec(self.output, _rmsnorm1(x, self.output_norm, c.norm_eps))

    def _decode_layer_by_layer(self) -> None:
        """Each layer's attention block one C call, its FFN through the runner (reads, hooks)."""
        x, xn, attn = self._x, self._xn, self._decode_attn
        for i in range(self.config.n_layers):
            attn.run(i, self.pos)
            if self.window is not None:
                self.window[i, self.pos % self.window.shape[1]] = xn
            self._ffn(i, xn, x)

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
        if lw.q_norm is not None and c.qk_norm_full:  # one norm over all heads (OLMoE)
            qk = np.concatenate([rmsnorm(qk[:nh].reshape(-1), lw.q_norm, c.norm_eps),
                                 rmsnorm(qk[nh:].reshape(-1), lw.k_norm, c.norm_eps)]).reshape(nh + nkv, hd)
        elif lw.q_norm is not None:
            qk = np.concatenate([rmsnorm(qk[:nh], lw.q_norm, c.norm_eps), rmsnorm(qk[nh:], lw.k_norm, c.norm_eps)])
        qk = qk * self.cos[p] + qk[:, self._rot] * self._sin_signed[p]  # RoPE, rotate-half
        if self._c_attention:
            kernels.f32_to_f16(np.ascontiguousarray(qk[nh:]), self.k_cache[i, p])
            kernels.f32_to_f16(qkv[(nh + nkv) * hd:], self.v_cache[i, p])
            out = kernels.attention(qk[None, :nh], self.k_cache[i], self.v_cache[i], p, float(self._scale))
            return kernels.matvec(lw.attn_output, out.reshape(-1))
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
        if lw.q_norm is not None and c.qk_norm_full:  # one norm over all heads (OLMoE), before they split
            qkv = np.concatenate([rmsnorm(qkv[:, :nq], lw.q_norm, c.norm_eps),
                                  rmsnorm(qkv[:, nq:nq + nkv], lw.k_norm, c.norm_eps), qkv[:, nq + nkv:]], axis=1)
        q = qkv[:, :nq].reshape(t, c.n_heads, hd)
        k = qkv[:, nq:nq + nkv].reshape(t, c.n_kv_heads, hd)
        v = qkv[:, nq + nkv:].reshape(t, c.n_kv_heads, hd)
        if lw.q_norm is not None and not c.qk_norm_full:
            q = rmsnorm(q, lw.q_norm, c.norm_eps)
            k = rmsnorm(k, lw.k_norm, c.norm_eps)
        cos, sin = self.cos[p0:p0 + t], self.sin[p0:p0 + t]
        q = apply_rope(q, cos, sin)
        if self._c_attention:
            kernels.f32_to_f16(np.ascontiguousarray(apply_rope(k, cos, sin), dtype=np.float32), self.k_cache[i, p0:p0 + t])
            kernels.f32_to_f16(np.ascontiguousarray(v, dtype=np.float32), self.v_cache[i, p0:p0 + t])
            out = kernels.attention(np.ascontiguousarray(q, dtype=np.float32), self.k_cache[i], self.v_cache[i], p0,
                                    float(self._scale))
            return kernels.matmul(lw.attn_output, out.reshape(t, nq))
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
        if isinstance(self.token_embd, fmt.DenseRows):
            self.token_embd.close()
        self.reader.close()
