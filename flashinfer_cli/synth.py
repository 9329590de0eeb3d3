"""Synthetic models at a real model's scale (`fic synth`): random weights in fic's format, with the
shape of a large mixture of experts or of Bonsai-8B, so speed under a budget can be measured at the
mission's scale without a download. Routing on random weights says nothing of quality; it measures
speed.

Shapes. A mixture of experts follows Qwen3-30B-A3B's proportions (d_model 2048, 48 layers, head_dim
128, 32 query heads = d_model/64, 4 KV heads, q/k norms, experts of 768 = 0.375 d_model neurons,
vocabulary 151936, untied output), with --experts routed experts (default 64), top --top-k (default
8, softmax then top-k, renormalised as Qwen3-MoE) and --shared shared experts (default 2). fic's
format has one shared expert per layer, in the dense block: S shared experts of w neurons each are
one shared expert of S*w neurons (a SwiGLU FFN is a sum over its neurons, so the two are the same
function), without a gate (as DeepSeek's shared experts). --dense follows Qwen3-8B (Bonsai-8B's
shape: 36 layers, d_model 4096, d_ff 12288 = 3 d_model, 32 heads of 128, 8 KV heads); without
--params it is Qwen3-8B exactly.

The rule that turns --params into a shape: the reference is scaled by s (d_model, layers and expert
width all times s, so the parameters grow as s^3, as from Qwen3-30B-A3B to Qwen3-235B-A22B);
s is solved for --params, d_model rounded to 128 (Q1_0's block), the expert width (or d_ff) to the
expert's block, and then the one free integer is fitted to the target: the number of layers, or,
when --layers is given, the expert width. Every matrix is in --quant (Q1_0 or Q4_0, embedding and
output included, as Bonsai's Q1_0 GGUF); norms and routers are f32.

Weights: uniform random (from a seeded numpy Generator's bytes: twice as fast as normals, and a
quantizer only sees a distribution's scale), at scales that keep activations finite (inputs of
each matrix are RMS-normalised or of unit scale, each matrix scaled by 1/sqrt(fan-in)); the
routers' logits have a standard deviation of ~2 and every token embedding shares one direction
(0.3 common + 0.95 own, as bench/moe_budget.py's), so some experts are hotter than others and
routing varies from token to token. The special tokens' output rows are zero, so greedy decoding
never stops early and a bench decodes every token it asks for.

Writing streams: each tensor is generated, quantized by the C core and written in chunks of rows
(a bundle at a time for experts); only the dense block (attention, embeddings, shared experts,
routers: fmt.ModelWriter writes dense.safetensors in one piece at the end) is held until the end.
The model is built in the store's tmp/ and renamed into place (as `fic pull` installs), so Ctrl-C
leaves nothing half written.
"""
from __future__ import annotations

import math
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from flashinfer_cli import fmt, kernels, moe
from flashinfer_cli.config import ArchConfig
from flashinfer_cli.kernels import QTensor

QUANTS = ("q1_0", "q4_0")
VOCAB = 151936  # Qwen3's
MAX_CTX = 40960  # Qwen3's max_position_embeddings
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
D_ALIGN = 128          # d_model's rounding: Q1_0's block, so every row of every matrix is whole blocks
DENSE_EXPERT = 64      # a dense model's expert: 64 neurons, rounded up to the down format's block (as convert)
_CHUNK_WEIGHTS = 1 << 24  # weights generated at once: 64 MiB of f32


class SynthError(ValueError):
    """Options that describe no model; the message is one line."""


@dataclass(frozen=True)
class SynthShape:
    """The shape of a synthetic model. A mixture of experts when n_experts > 0, else dense with an
    FFN of ffn_neurons cut into experts of expert_neurons."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn_neurons: int      # MoE: one routed expert's neurons; dense: d_ff
    n_experts: int = 0    # routed experts per layer; 0: dense
    top_k: int = 0
    shared: int = 0       # shared experts (of ffn_neurons each), written as one of shared * ffn_neurons
    quant: str = "q1_0"
    # other families (bench/moe_budget.py's OLMoE-like model): "llama" has no q/k norms
    family: str = "qwen3"
    tie_embeddings: bool = False
    dense_quant: str | None = None  # attention and embeddings; None: quant
    norm_topk: bool = True          # Qwen3-MoE renormalises the top-k; OLMoE does not

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def d_ff(self) -> int:
        """The architecture's d_ff: a MoE layer's every routed neuron (fic's convention)."""
        return self.n_experts * self.ffn_neurons if self.moe else self.ffn_neurons

    @property
    def expert_neurons(self) -> int:
        if self.moe:
            return self.ffn_neurons
        bw = kernels.block_weights(self.quant)
        return -(-DENSE_EXPERT // bw) * bw

    @property
    def shared_neurons(self) -> int:
        return self.shared * self.ffn_neurons if self.moe else 0

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def _attn_params(self) -> int:
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        norms = 2 * self.head_dim if self.qk_norm else 0
        return d * q + 2 * d * kv + q * d + norms + 2 * d  # q, k, v, o, q/k norms, two norms

    def layer_params(self) -> int:
        d = self.d_model
        if not self.moe:
            return self._attn_params() + 3 * d * self.ffn_neurons
        return (self._attn_params() + self.n_experts * d + 3 * d * self.ffn_neurons * self.n_experts
                + 3 * d * self.shared_neurons)

    @property
    def total_params(self) -> int:
        embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * self.d_model
        return embeddings + self.d_model + self.n_layers * self.layer_params()

    @property
    def active_params(self) -> int:
        """What `fic show` counts: every parameter but the experts a token does not route to, and
        one row of the token embedding (it stays on flash when untied)."""
        idle = self.n_experts - self.top_k if self.moe else 0
        on_flash = 0 if self.tie_embeddings else (self.vocab_size - 1) * self.d_model
        return self.total_params - on_flash \
            - self.n_layers * idle * 3 * self.d_model * self.ffn_neurons

    def arch(self, seed: int) -> ArchConfig:
        qwen = self.family == "qwen3"
        return ArchConfig(arch=self.family, n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                          n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_ff=self.d_ff,
                          vocab_size=self.vocab_size, norm_eps=1e-6, rope_theta=1_000_000.0 if qwen else 10000.0,
                          max_ctx=MAX_CTX if qwen else 4096, tie_embeddings=self.tie_embeddings, qk_norm=qwen,
                          extra={"synthetic": f"fic synth, seed {seed}"})

    def lines(self) -> list[str]:
        """What `fic synth` prints before writing."""
        attn = (f"{self.n_layers} layers, d_model {self.d_model}, {self.n_heads} heads of {self.head_dim} "
                f"({self.n_kv_heads} KV){', q/k norms' if self.qk_norm else ''}, vocab {self.vocab_size}")
        if self.moe:
            ffn = (f"{self.n_experts} routed experts of {self.ffn_neurons} neurons, top-{self.top_k}"
                   + (f", {self.shared} shared (one shared expert of {self.shared_neurons} neurons)"
                      if self.shared else ""))
        else:
            ffn = f"dense FFN d_ff {self.ffn_neurons} (experts of {self.expert_neurons} neurons)"
        return [f"shape       {attn}", f"ffn         {ffn}",
                f"parameters  {self.total_params / 1e9:.3f}B in all, {self.active_params / 1e9:.3f}B active "
                f"per token; {self.quant}, about {human(self.approx_bytes())} on disk"]

    def approx_bytes(self) -> int:
        # norms and routers (f32) are a fraction of a percent; every matrix is in self.quant
        return self.total_params * kernels.block_bytes(self.quant) // kernels.block_weights(self.quant)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def parse_params(text: str) -> int:
    """'20B', '50M', '1.5e9', '300k' -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise SynthError(f"--params {text!r}: a count such as 20B, 8B or 50M")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    n = int(float(m.group(1)) * scale)
    if n < 1_000_000:
        raise SynthError(f"--params {text!r}: at least 1M")
    return n


# ---- shapes --------------------------------------------------------------------------------

# the references, at s = 1: (d_model, layers, ffn width per d_model, query width per d_model, KV heads)
_MOE_REF = (2048, 48, 0.375, 2.0, 4)   # Qwen3-30B-A3B
_DENSE_REF = (4096, 36, 3.0, 1.0, 8)   # Qwen3-8B (Bonsai-8B)
HEAD_DIM = 128


def _round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def _shape_at(d: int, layers: int, width: int, *, dense: bool, experts: int, top_k: int, shared: int,
              quant: str, vocab: int) -> SynthShape:
    _, _, _, q_ratio, kv_ref = _DENSE_REF if dense else _MOE_REF
    heads = max(1, round(d * q_ratio / HEAD_DIM))
    kv = min(kv_ref, heads)
    heads = max(kv, round(heads / kv) * kv)  # GQA: the query heads a multiple of the KV heads
    return SynthShape(n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv, head_dim=HEAD_DIM, vocab_size=vocab,
                      ffn_neurons=width, n_experts=0 if dense else experts, top_k=0 if dense else top_k,
                      shared=0 if dense else shared, quant=quant)


def derive_shape(params: int | None, *, dense: bool = False, layers: int | None = None, experts: int = 64,
                 top_k: int = 8, shared: int = 2, quant: str = "q1_0", vocab: int = VOCAB) -> SynthShape:
    """The shape for a parameter target (the module's docstring gives the rule)."""
    if quant not in QUANTS:
        raise SynthError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    if layers is not None and layers < 1:
        raise SynthError(f"--layers {layers}: at least 1")
    if vocab < 256 + len(SPECIAL_TOKENS):
        raise SynthError(f"--vocab {vocab}: at least {256 + len(SPECIAL_TOKENS)} (256 bytes and the special tokens)")
    if not dense:
        if experts < 1 or top_k < 1 or shared < 0:
            raise SynthError(f"--experts {experts}, --top-k {top_k}, --shared {shared}: experts and top-k at "
                             "least 1, shared at least 0")
        if top_k > experts:
            raise SynthError(f"--top-k {top_k} is more than the {experts} routed experts")
    d_ref, l_ref, w_ratio, _, _ = _DENSE_REF if dense else _MOE_REF
    # a dense expert is 64 neurons rounded up to the down block; d_ff a whole number of experts
    step = kernels.block_weights(quant) if not dense else \
        -(-DENSE_EXPERT // kernels.block_weights(quant)) * kernels.block_weights(quant)
    kw = dict(dense=dense, experts=experts, top_k=top_k, shared=shared, quant=quant, vocab=vocab)
    if params is None:
        if not dense:
            params = 20 * 10 ** 9
        elif layers is None:  # Bonsai-8B: Qwen3-8B's dimensions exactly
            return _shape_at(d_ref, l_ref, int(w_ratio * d_ref), **kw)
        else:
            params = _shape_at(d_ref, l_ref, int(w_ratio * d_ref), **kw).total_params

    q_ratio, kv_ref = (_DENSE_REF if dense else _MOE_REF)[3:]

    def continuous(s: float) -> float:  # parameters at scale s, before any rounding
        d = d_ref * s
        q_width = q_ratio * d
        attn = 2 * d * q_width + 2 * d * min(q_width, kv_ref * HEAD_DIM)
        ffn = 3 * d * w_ratio * d * (1 if dense else experts + shared) + (0 if dense else experts * d)
        return 2 * vocab * d + (layers if layers is not None else l_ref * s) * (attn + ffn)

    lo, hi = 1e-4, 1e3
    for _ in range(200):  # parameters grow with s: bisect
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if continuous(mid) < params else (lo, mid)
    # d_model rounded to 128: of the two neighbours, the one whose fitted shape comes closer
    d0 = _round_to(d_ref * lo, D_ALIGN)
    fits = [_fit(d, params, layers, step, w_ratio, kw) for d in (d0, d0 - D_ALIGN, d0 + D_ALIGN) if d >= D_ALIGN]
    fits = [f for f in fits if f is not None]
    if not fits:
        raise SynthError(f"--params {params / 1e6:.0f}M is too few for {layers} layers of d_model {d0} and a "
                         f"vocabulary of {vocab} (the embeddings alone take {2 * vocab * d0 / 1e6:.0f}M): "
                         "give more --params, fewer --layers or a smaller --vocab")
    return min(fits, key=lambda f: abs(f.total_params - params))


def _fit(d: int, params: int, layers: int | None, step: int, w_ratio: float, kw: dict) -> SynthShape | None:
    """The shape of d_model d closest to `params`: the layers fitted (the width at the reference's
    ratio), or with --layers the expert width (d_ff for a dense model); None if none fits."""
    if layers is None:
        base = _shape_at(d, 1, _round_to(w_ratio * d, step), **kw)
        fixed = base.total_params - base.layer_params()
        return replace(base, n_layers=max(1, round((params - fixed) / base.layer_params())))
    bare = _shape_at(d, layers, step, **kw)
    per_step = bare.total_params - replace(bare, ffn_neurons=0).total_params  # parameters of `step` neurons
    w = (params - (bare.total_params - per_step)) / per_step * step
    if w < step / 2:
        return None
    return replace(bare, ffn_neurons=_round_to(w, step))


# ---- the tokenizer -------------------------------------------------------------------------

def tokenizer_json(vocab: int) -> str:
    """A valid byte-level BPE tokenizer of exactly `vocab` ids: the 256 bytes, fillers `<|x{i}|>`
    (never produced by encoding: no merges reach them) and the special tokens last, as Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from flashinfer_cli.tokenizer import _byte_to_unicode

    table = _byte_to_unicode()
    entries = {table[b]: b for b in range(256)}
    for i in range(256, vocab - len(SPECIAL_TOKENS)):
        entries[f"<|x{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=entries, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


def tokenizer_entry(vocab: int) -> dict:
    im_end = vocab - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_end|>")
    return {"chat_template": CHATML, "bos_id": None, "eos_ids": [im_end], "add_bos": False}


# ---- the weights ---------------------------------------------------------------------------

class _Weights:
    """Random matrices from one seeded Generator, quantized in chunks of rows (never a whole f32
    matrix in memory): the same seed gives the same bytes."""

    def __init__(self, seed: int, quant: str, dense_quant: str | None = None):
        self.rng = np.random.default_rng(seed)
        self.quant = quant
        self.dense_quant = dense_quant or quant

    def uniform(self, n: int, std: float) -> np.ndarray:
        """n float32 values, uniform with standard deviation std (int8 bytes: std 73.9 before scaling)."""
        x = np.frombuffer(self.rng.bytes(n), dtype=np.int8).astype(np.float32)
        x *= np.float32(std / 73.9)
        return x

    def matrix(self, rows: int, cols: int, std: float, *, common: np.ndarray | None = None,
               zero_rows: tuple[int, ...] = (), fmt_name: str | None = None) -> QTensor | np.ndarray:
        """A (rows, cols) matrix in `fmt_name` (default the model's quant; 'f32': an array).
        common: a row added to every row (the embeddings' shared direction)."""
        fmt_name = fmt_name or self.quant
        step = max(1, _CHUNK_WEIGHTS // cols)
        parts = []
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            w = self.uniform(n * cols, std).reshape(n, cols)
            if common is not None:
                w += common
            for z in zero_rows:
                if r0 <= z < r0 + n:
                    w[z - r0] = 0
            parts.append(w if fmt_name == "f32" else kernels.quantize(w, fmt_name).data)
            del w
        if fmt_name == "f32":
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        return QTensor(fmt_name, (rows, cols), np.concatenate(parts) if len(parts) > 1 else parts[0])


def _write_layer(w: fmt.ModelWriter, gen: _Weights, s: SynthShape, i: int, tick: Callable[[int], None]) -> None:
    d, hd = s.d_model, s.head_dim
    q, kv = s.n_heads * hd, s.n_kv_heads * hd
    b = f"blk.{i}."
    ones = np.ones(d, np.float32)
    w.add_dense(b + "attn_norm", ones)
    w.add_dense(b + "ffn_norm", ones)
    if s.qk_norm:
        w.add_dense(b + "attn_q_norm", np.ones(hd, np.float32))
        w.add_dense(b + "attn_k_norm", np.ones(hd, np.float32))
    for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
        w.add_dense(b + name, gen.matrix(rows, d, d ** -0.5, fmt_name=gen.dense_quant))
    # half: the residual grows slowly
    w.add_dense(b + "attn_output", gen.matrix(d, q, 0.5 * q ** -0.5, fmt_name=gen.dense_quant))
    tick(s._attn_params())
    n = s.ffn_neurons
    if not s.moe:  # a dense FFN, one expert (a group of neurons) at a time
        for start in range(0, n, s.expert_neurons):
            m = min(s.expert_neurons, n - start)
            w.add_expert(i, gen.matrix(m, d, d ** -0.5), gen.matrix(m, d, d ** -0.5),
                         gen.matrix(d, m, 0.3 * n ** -0.5))
            tick(3 * d * m)
        return
    w.add_dense(b + "ffn_gate_inp", gen.matrix(s.n_experts, d, 2 * d ** -0.5, fmt_name="f32"))  # logits of std ~2
    if s.shared:
        sn = s.shared_neurons
        w.add_dense(b + "ffn_gate_shexp", gen.matrix(sn, d, d ** -0.5))
        w.add_dense(b + "ffn_up_shexp", gen.matrix(sn, d, d ** -0.5))
        w.add_dense(b + "ffn_down_shexp", gen.matrix(d, sn, 0.3 * sn ** -0.5))
    tick(s.n_experts * d + 3 * d * s.shared_neurons)
    for _ in range(s.n_experts):
        w.add_expert(i, gen.matrix(n, d, d ** -0.5), gen.matrix(n, d, d ** -0.5), gen.matrix(d, n, 0.3 * n ** -0.5))
        tick(3 * d * n)


def write_model(dest: Path, name: str, s: SynthShape, *, seed: int = 0, progress: bool = True) -> Path:
    """Write the model to `dest` (a new directory, through fmt.ModelWriter's temporary sibling)."""
    import tempfile

    from tqdm import tqdm

    gen = _Weights(seed, s.quant, s.dense_quant)
    down_block = kernels.block_weights(s.quant)
    layout = fmt.ExpertLayout(s.d_model, s.quant, s.quant, s.quant, "columns")
    assert s.expert_neurons % down_block == 0 and s.d_model % down_block == 0
    rules = [moe.RoutingRule(s.n_experts, s.top_k, softmax="before", norm_topk=s.norm_topk,
                             shared_neurons=s.shared_neurons)] * s.n_layers if s.moe else None
    prov = {"source": f"synthetic (fic synth, seed {seed})", "kind": "synthetic",
            "synth": {"seed": seed, "quant": s.quant, "shared_experts": s.shared,
                      "params": s.total_params, "active_params": s.active_params}}
    sizes = [s.ffn_neurons] if s.moe else fmt.expert_sizes(s.ffn_neurons, s.expert_neurons)
    with fmt.ModelWriter(dest, name=name, arch=s.arch(seed).to_json(), layout=layout, moe=rules,
                         provenance=prov, tokenizer=tokenizer_entry(s.vocab_size),
                         bundle_order=fmt.default_bundle_order(layout, sizes)) as w, \
            tqdm(total=s.total_params, desc=f"synthesizing {name}", unit="param", unit_scale=True,
                 file=sys.stderr, disable=not progress, leave=False) as bar:
        common = gen.uniform(s.d_model, 0.3)
        w.add_dense("token_embd", gen.matrix(s.vocab_size, s.d_model, 0.95, common=common, fmt_name=gen.dense_quant))
        if not s.tie_embeddings:
            specials = tuple(range(s.vocab_size - len(SPECIAL_TOKENS), s.vocab_size))
            w.add_dense("output", gen.matrix(s.vocab_size, s.d_model, s.d_model ** -0.5, zero_rows=specials,
                                             fmt_name=gen.dense_quant))
        w.add_dense("output_norm", np.ones(s.d_model, np.float32))
        bar.update(s.total_params - s.n_layers * s.layer_params())
        for i in range(s.n_layers):
            _write_layer(w, gen, s, i, bar.update)
        if s.shared > 1:
            w.note(f"{s.shared} shared experts of {s.ffn_neurons} neurons are written as one shared expert of "
                   f"{s.shared_neurons} neurons (the same function: a SwiGLU FFN is a sum over its neurons)")
        w.note("random weights: routing on them says nothing of quality; it measures speed")
        fd, tmp = tempfile.mkstemp(suffix=".json")
        try:
            with open(fd, "w", encoding="utf-8") as f:
                f.write(tokenizer_json(s.vocab_size))
            w.add_file(tmp, "tokenizer.json")
        finally:
            Path(tmp).unlink()
    return dest


def check_new(name: str, force: bool) -> None:
    """StoreError unless `name` is a valid model name free in the store (or force)."""
    from flashinfer_cli.store import Store, StoreError, validate_name

    store = Store()
    validate_name(name)
    if store.exists(name) and not force:
        raise StoreError(f"{name!r} is already in the store ({store.path(name)}); use --force to replace it")


def synthesize(name: str, s: SynthShape, *, seed: int = 0, force: bool = False, progress: bool = True,
               log: Callable[[str], None] | None = None) -> Path:
    """Write a synthetic model into the store as `name`: built in the store's tmp/, installed by
    rename (pull's install: an old model under --force is swapped out whole)."""
    from flashinfer_cli import pull
    from flashinfer_cli.store import Store

    store = Store()
    check_new(name, force)
    with store.lock(blocking=False):
        pull._clean_stale(store)  # work dirs of a synth or pull that was killed
        work = store.make_tmp(f"synth-{name}-")
        try:
            model = write_model(work / "model", name, s, seed=seed, progress=progress)
            pull._install(model, store.path(name))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return store.path(name)
