"""Architecture configuration, and the contract between the converter and the forward pass.

A fic model (see fmt.py for the bytes) holds, for an ArchConfig `c`:

Dense block (dense.safetensors), canonical names (GGUF's spelling), weights in Hugging Face's
convention: attention Q and K rows are in rotate-half order (GGUF's llama-family permutation is
undone on import), every matrix is (out_features, in_features) row-major:
    token_embd                 (vocab_size, d_model)            any weight format
    output_norm                (d_model,)                       f32
    output                     (vocab_size, d_model)            absent when c.tie_embeddings
    blk.{i}.attn_norm          (d_model,)                       f32
    blk.{i}.attn_q             (n_heads * head_dim, d_model)
    blk.{i}.attn_k             (n_kv_heads * head_dim, d_model)
    blk.{i}.attn_v             (n_kv_heads * head_dim, d_model)
    blk.{i}.attn_output        (d_model, n_heads * head_dim)
    blk.{i}.attn_q.bias, attn_k.bias, attn_v.bias   f32, only when c.attn_bias (Qwen2)
    blk.{i}.attn_q_norm, attn_k_norm  (head_dim,)   f32, only when c.qk_norm (Qwen3); with
                               c.qk_norm_full (OLMoE) (n_heads * head_dim,) and (n_kv_heads * head_dim,)
    blk.{i}.ffn_gate_inp       (n_routed, d_model) f32: a mixture of experts' router (moe.py: the
                               shared expert's ffn_{gate,up,down}_shexp and ffn_gate_inp_shexp too)
    blk.{i}.ffn_norm           (d_model,)                       f32
    blk.{i}.ffn_neuron_order   (d_ff,) int32: original FFN neuron index of each bundled neuron
                               (written by fmt.ModelWriter.set_neuron_order; absent = identity)

FFN (experts.bin): layer i's FFN, SwiGLU down(silu(gate x) * up x), is cut into experts: groups of
neurons, in neuron order. Expert e of layer i holds the neurons after those of experts 0..e-1; its
bundle has gate rows, up rows and its part of down (fmt.ExpertLayout: "columns" is the column slice of
ffn_down, (d_model, n) and lossless for a quantized checkpoint when n is a multiple of the block;
"rows" is the slice of ffn_downᵀ, (n, d_model)). The FFN output is the sum over experts.

Norm weights are f32 and applied as x / rms(x) * w (Llama/Qwen: no +1 offset).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3", "olmoe")


@dataclass(frozen=True)
class ArchConfig:
    arch: str                       # one of ARCHITECTURES
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_ctx: int                    # max_position_embeddings / context_length
    tie_embeddings: bool
    attn_bias: bool = False         # Qwen2: biases on q, k, v
    qk_norm: bool = False           # Qwen3: RMSNorm per head on q and k, before RoPE
    qk_norm_full: bool = False      # OLMoE: the q and k norms span every head (one RMSNorm over all of q, of k)
    rope_scaling: dict[str, Any] | None = None  # Hugging Face's rope_scaling dict (llama3 type), or None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance-only details

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r} (fic runs: {', '.join(ARCHITECTURES)})")
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "max_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is {value!r}, not a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} attention heads cannot share {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd: rotary embeddings rotate pairs")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} is {value!r}, not a finite non-negative number")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta is {self.rope_theta!r}, not positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ArchConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {', '.join(sorted(unknown))}")
        return cls(**raw)
