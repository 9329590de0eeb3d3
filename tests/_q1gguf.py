"""A Bonsai-shaped 1-bit GGUF written with the gguf package: Qwen3 attention (q/k norms, GQA, head_dim
128), every matrix Q1_0 (embedding and output included, as PrismML's Bonsai GGUFs), norms f32.

The gguf package cannot quantize Q1_0, but it writes raw blocks: each row is k/128 blocks of an fp16
scale d and 16 bytes of sign bits (bit j of byte j/8 set: +d, else -d; ggml's layout, blocks.h). Bits
are uniform random; d is 1/sqrt(fan-in) times U(0.75, 1.25) per block, so a matrix maps an input of
unit RMS to outputs of unit RMS (inputs are RMS-normalised or, for attn_output and ffn_down, of
unit scale or less) and activations stay finite through the layers. The embedding's d is 1. The
special tokens' output rows have d = 0, so greedy decoding never stops early.

Shapes (Qwen3's, which Bonsai keeps): BONSAI_8B is Qwen3-8B (1.15 GB), BONSAI_1P7B Qwen3-1.7B (tied
embeddings in the original; written untied here, as Bonsai-8B), TINY a test size. Used by
tests/test_q1_gguf.py and bench/q1_bonsai_vs_llamacpp.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

QK1_0 = 128
BLOCK_BYTES = 18
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Qwen3Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    head_dim: int = 128
    ctx: int = 40960
    rope_theta: float = 1e6
    rms_eps: float = 1e-6

    def params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        layer = self.d_model * (2 * q + 2 * kv) + 3 * self.d_model * self.d_ff
        return self.n_layers * layer + 2 * self.vocab * self.d_model

    def q1_bytes(self) -> int:
        return self.params() // QK1_0 * BLOCK_BYTES


BONSAI_8B = Qwen3Shape(n_layers=36, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=12288, vocab=151936)
BONSAI_1P7B = Qwen3Shape(n_layers=28, d_model=2048, n_heads=16, n_kv_heads=8, d_ff=6144, vocab=151936)
TINY = Qwen3Shape(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, vocab=512, head_dim=64, ctx=512)


def q1_rows(rng: np.random.Generator, rows: int, k: int, scale: float) -> np.ndarray:
    """rows x k weights as raw Q1_0 blocks (uint8, rows x k/128*18): random signs, d = scale x U(0.75, 1.25)."""
    assert k % QK1_0 == 0
    blocks = rng.integers(0, 256, (rows, k // QK1_0, BLOCK_BYTES), dtype=np.uint8)
    d = (scale * rng.uniform(0.75, 1.25, (rows, k // QK1_0))).astype(np.float16)
    blocks[..., :2] = d.view(np.uint8).reshape(rows, k // QK1_0, 2)
    return blocks.reshape(rows, -1)


def byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 single-character tokens of a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def add_tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    """A byte-level BPE vocabulary of `vocab` tokens: the specials, the 256 byte tokens, then filler
    tokens (reachable by id only: the comparison feeds ids)."""
    tokens = list(SPECIALS) + byte_level_alphabet()
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    assert len(tokens) == vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
    w.add_token_merges(["t o"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    w.add_add_bos_token(False)


def write_q1_gguf(path: Path, shape: Qwen3Shape, seed: int = 0) -> Path:
    """Writes the model to path (path.tmp, then renamed) and returns path."""
    rng = np.random.default_rng(seed)
    s = shape
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    tmp = Path(str(path) + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen3")
    w.add_name(f"synthetic 1-bit qwen3 {s.n_layers}x{s.d_model}")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.ctx)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.d_ff)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    add_tokenizer(w, s.vocab)

    def q1(name: str, rows: int, k: int, scale: float) -> None:
        w.add_tensor(name, q1_rows(rng, rows, k, scale), raw_dtype=gguf.GGMLQuantizationType.Q1_0)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, rng.uniform(0.9, 1.1, n).astype(np.float32))

    q1("token_embd.weight", s.vocab, s.d_model, 1.0)
    for i in range(s.n_layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", s.d_model)
        q1(p + "attn_q.weight", q_dim, s.d_model, s.d_model ** -0.5)
        q1(p + "attn_k.weight", kv_dim, s.d_model, s.d_model ** -0.5)
        q1(p + "attn_v.weight", kv_dim, s.d_model, s.d_model ** -0.5)
        norm(p + "attn_q_norm.weight", s.head_dim)
        norm(p + "attn_k_norm.weight", s.head_dim)
        q1(p + "attn_output.weight", s.d_model, q_dim, q_dim ** -0.5)
        norm(p + "ffn_norm.weight", s.d_model)
        q1(p + "ffn_gate.weight", s.d_ff, s.d_model, s.d_model ** -0.5)
        q1(p + "ffn_up.weight", s.d_ff, s.d_model, s.d_model ** -0.5)
        q1(p + "ffn_down.weight", s.d_model, s.d_ff, s.d_ff ** -0.5)
    norm("output_norm.weight", s.d_model)
    out = q1_rows(rng, s.vocab, s.d_model, s.d_model ** -0.5)
    out[:len(SPECIALS)] = 0  # d = 0: the specials' logits are 0, greedy never stops early
    w.add_tensor("output.weight", out, raw_dtype=gguf.GGMLQuantizationType.Q1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
