"""Read a checkpoint (a Hugging Face layout directory or a GGUF file) as an ArchConfig and a stream of
canonical tensors (config.py's names and conventions).

Tensors are loaded one at a time, on demand, so that converting a model never holds two copies of it.
A loaded tensor is either a float32 array (every float source, and GGUF types fic has no kernel for,
dequantized with the gguf package) or, for the GGUF block formats fic shares with ggml, a QTensor of
the file's own bytes: those are kept exactly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from flashinfer_cli.config import ArchConfig
from flashinfer_cli.kernels import QTensor
from flashinfer_cli.moe import RoutingRule, expected_dense


class CheckpointError(Exception):
    """A checkpoint fic cannot read; the message is one line that names the file or the reason."""


# GGUF types stored as they are: ggml's block layouts are fic's.
KEPT_GGUF_TYPES = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q1_0": "q1_0",
                   "Q5_0": "q5_0", "Q4_K": "q4_k", "Q6_K": "q6_k"}


@dataclass
class SourceTensor:
    """One canonical tensor of a checkpoint, not yet loaded."""

    name: str                    # canonical name (config.py), e.g. "blk.3.ffn_up"
    shape: tuple[int, ...]       # (rows, cols) for matrices, (n,) for vectors
    src_type: str                # the source's type name: "f32", "bf16", "Q4_K", ...
    kept: bool                   # True: stored as the source holds it (a GGUF type fic shares)
    load: Callable[[], np.ndarray | QTensor]  # float32 array, float16 array (a kept F16) or QTensor
    # a MoE layer's experts, (n_experts, rows, cols): expert j's matrix alone, so that a conversion
    # holds one expert at a time (load() would stack them all)
    load_expert: Callable[[int], np.ndarray | QTensor] | None = None

    @property
    def requantized(self) -> bool:
        """A quantized source type fic has no kernel for: dequantized here, requantized by the converter."""
        return not self.kept and self.src_type.upper() not in ("F32", "F16", "BF16", "F64")


@dataclass
class Checkpoint:
    kind: str                    # "hf" or "gguf"
    path: Path
    config: ArchConfig
    files: list[Path]            # what the checkpoint was read from (hashed for provenance)
    tensors: dict[str, SourceTensor]
    gguf_reader: Any = None      # the gguf.GGUFReader, for a GGUF source (its tokenizer lives there)
    notes: list[str] | None = None
    moe: list[RoutingRule] | None = None  # a mixture of experts: each layer's routing rule

    def __iter__(self) -> Iterator[SourceTensor]:
        return iter(self.tensors.values())


def open_checkpoint(path: Path) -> Checkpoint:
    """A Hugging Face layout directory or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return _open_hf(path)
    if path.is_file():
        return _open_gguf(path)
    raise CheckpointError(f"{path}: no such file or directory")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- Hugging Face layout -------------------------------------------------------------------

_HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
             "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2", "Qwen3MoeForCausalLM": "qwen3",
             "OlmoeForCausalLM": "olmoe"}
_HF_MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
    # mixtures of experts: the router and the shared expert (the routed experts: _HF_EXPERT)
    "block_sparse_moe.gate.weight": "ffn_gate_inp", "mlp.gate.weight": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp", "mlp.shared_expert.up_proj.weight": "ffn_up_shexp",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp",
}
# one routed expert's matrix: layer, expert, role (Mixtral's w1 gate, w3 up, w2 down)
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_HF_EXPERT_ROLES = {"w1": "ffn_gate_exps", "gate_proj": "ffn_gate_exps", "w3": "ffn_up_exps",
                    "up_proj": "ffn_up_exps", "w2": "ffn_down_exps", "down_proj": "ffn_down_exps"}

_HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                    "lm_head.weight": "output"}
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_canonical_name(name: str) -> str | None:
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_HF_LAYER_NAMES[m.group(2)]}"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def _hf_rope(cfg: dict[str, Any], where: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 rope_scaling dict or None) from either transformers 4's rope_theta and
    rope_scaling or transformers 5's rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = scaling or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (fic runs llama3 rope scaling)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CheckpointError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


def hf_moe_rules(cfg: dict[str, Any], where: Path) -> tuple[list[RoutingRule], int] | None:
    """(each layer's routing rule, neurons per routed expert) of a Hugging Face MoE config, None
    for a dense one (transformers' modeling files: Mixtral renormalises the top-k; the Qwen MoE
    models as norm_topk_prob says, Qwen2-MoE with a sigmoid-gated shared expert)."""
    hf_arch = (cfg.get("architectures") or [None])[0]
    if hf_arch not in _HF_MOE_ARCHS:
        return None
    try:
        n_layers = int(cfg["num_hidden_layers"])
        n_exp = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        top_k = int(cfg["num_experts_per_tok"])
        if hf_arch == "MixtralForCausalLM":
            size, norm, shared = int(cfg["intermediate_size"]), True, 0
        elif hf_arch == "OlmoeForCausalLM":
            size, norm, shared = int(cfg["intermediate_size"]), bool(cfg.get("norm_topk_prob", False)), 0
        else:
            size, norm = int(cfg["moe_intermediate_size"]), bool(cfg.get("norm_topk_prob", False))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0) if hf_arch == "Qwen2MoeForCausalLM" else 0
            if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
                raise CheckpointError(f"{where}: dense MLP layers between the MoE layers (mlp_only_layers, "
                                      "decoder_sparse_step) are not supported")
        rule = RoutingRule(n_routed=n_exp, top_k=top_k, softmax="before", norm_topk=norm, shared_neurons=shared,
                           shared_gate="sigmoid" if shared else "none")
        rule.check()
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: mixture of experts: {exc}") from None
    if size < 1:
        raise CheckpointError(f"{where}: experts of {size} neurons")
    return [rule] * n_layers, size


def hf_arch_config(cfg: dict[str, Any], where: Path) -> ArchConfig:
    archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
    hf_arch = archs[0]
    if hf_arch not in _HF_ARCHS:
        raise CheckpointError(f"unsupported architecture {hf_arch!r} (fic converts {', '.join(_HF_ARCHS)})")
    arch = _HF_ARCHS[hf_arch]
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: activation {cfg['hidden_act']!r} is not supported (fic runs SwiGLU with silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: MLP biases are not supported")
    max_ctx = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", hf_arch == "MistralForCausalLM")
    if uses_window and window is not None and window < max_ctx:
        raise CheckpointError(f"{where}: sliding-window attention ({window} of {max_ctx} positions) is not supported")
    if arch == "llama" and cfg.get("attention_bias"):
        raise CheckpointError(f"{where}: Llama attention biases are not supported")
    d_model, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    theta, scaling = _hf_rope(cfg, where)
    moe = hf_moe_rules(cfg, where)
    # a MoE layer's d_ff: the neurons of all its routed experts (what one FFN call may run)
    d_ff = moe[0][0].n_routed * moe[1] if moe else int(cfg["intermediate_size"])
    attn_bias = arch == "qwen2" or (arch == "qwen3" and bool(cfg.get("attention_bias")))
    if hf_arch == "Qwen2MoeForCausalLM":
        attn_bias = bool(cfg.get("qkv_bias", True))
    if arch == "olmoe":
        attn_bias = bool(cfg.get("attention_bias"))
        if cfg.get("clip_qkv") is not None:
            raise CheckpointError(f"{where}: clip_qkv is not supported")
    try:
        return ArchConfig(
            arch=arch, n_layers=int(cfg["num_hidden_layers"]), d_model=d_model, n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or d_model // n_heads), d_ff=d_ff,
            vocab_size=int(cfg["vocab_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, max_ctx=max_ctx, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=attn_bias, qk_norm=arch in ("qwen3", "olmoe"), qk_norm_full=arch == "olmoe",
            rope_scaling=scaling, extra={"hf_architecture": hf_arch},
        )
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data section), by fmt's one parser (numpy has no bfloat16, so the
    tensors are read by hand from these offsets)."""
    from flashinfer_cli import fmt

    try:
        return fmt.safetensors_header(path)
    except fmt.FormatError as exc:
        raise CheckpointError(str(exc)) from None


def _safetensors_loader(path: Path, base: int, name: str, info: dict[str, Any]) -> Callable[[], np.ndarray]:
    dtype, width = _ST_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]

    def load() -> np.ndarray:
        try:
            with open(path, "rb") as f:
                f.seek(base + begin)
                raw = f.read(end - begin)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror})") from None
        if len(raw) != end - begin:
            raise CheckpointError(f"{path}: tensor {name!r} is truncated")
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)

    return load


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        for f in weight_map.values():  # names from a download: none may leave the checkpoint's directory
            if not isinstance(f, str) or not f or f.startswith("/") or "\\" in f or "\0" in f \
                    or any(part in ("", ".", "..") for part in f.split("/")):
                raise CheckpointError(f"{index}: weight file {_short(f)} is not a path inside {path}")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {index.name})")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    return files


def _open_hf(path: Path) -> Checkpoint:
    config_path = path / "config.json"
    raw_cfg = _read_json(config_path)
    config = hf_arch_config(raw_cfg, config_path)  # refuse an architecture before reading weights
    moe = hf_moe_rules(raw_cfg, config_path)
    files = _hf_weight_files(path)
    tensors: dict[str, SourceTensor] = {}
    experts: dict[tuple[int, str], dict[int, SourceTensor]] = {}  # (layer, role) -> expert -> its matrix
    for f in files:
        header, base = _safetensors_header(f)
        for name, info in header.items():
            canon = hf_canonical_name(name)
            m = _HF_EXPERT.fullmatch(name) if moe and canon is None else None
            if m:
                if info.get("dtype") not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name!r} has dtype {info.get('dtype')}, fic reads F32, F16, BF16")
                role = _HF_EXPERT_ROLES[m.group(3)]
                experts.setdefault((int(m.group(1)), role), {})[int(m.group(2))] = SourceTensor(
                    name, tuple(info["shape"]), info["dtype"].lower(), False, _safetensors_loader(f, base, name, info))
                continue
            if canon is None:
                if _HF_IGNORED.match(name):
                    continue
                raise CheckpointError(f"{f}: unexpected tensor {name!r}")
            if info.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {info.get('dtype')}, fic reads F32, F16, BF16")
            tensors[canon] = SourceTensor(canon, tuple(info["shape"]), info["dtype"].lower(), False,
                                          _safetensors_loader(f, base, name, info))
    if "output" not in tensors and not config.tie_embeddings:  # no lm_head: the embeddings are tied
        config = _replace(config, tie_embeddings=True)
    if config.tie_embeddings:
        tensors.pop("output", None)
    for (layer, role), by_expert in experts.items():
        tensors[f"blk.{layer}.{role}"] = _stacked_experts(f"blk.{layer}.{role}", by_expert, path)
    _check_tensors(config, tensors, path, moe[0] if moe else None)
    return Checkpoint("hf", path, config, [config_path, *files], tensors, moe=moe[0] if moe else None)


def _stacked_experts(canon: str, by_expert: dict[int, SourceTensor], where: Path) -> SourceTensor:
    """A layer's per-expert matrices of one role as one (n_experts, rows, cols) source tensor."""
    n = len(by_expert)
    if sorted(by_expert) != list(range(n)):
        missing = min(set(range(max(by_expert) + 1)) - set(by_expert))
        raise CheckpointError(f"{where}: {canon}: expert {missing} missing")
    shapes = {t.shape for t in by_expert.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CheckpointError(f"{where}: {canon}: experts of shapes {sorted(shapes)}")
    first = by_expert[0]

    def load_expert(j: int) -> np.ndarray:
        return by_expert[j].load()

    def load() -> np.ndarray:
        return np.stack([by_expert[j].load() for j in range(n)])

    return SourceTensor(canon, (n, *first.shape), first.src_type, False, load, load_expert)


def _replace(config: ArchConfig, **changes: Any) -> ArchConfig:
    return ArchConfig(**{**config.to_json(), **changes})


def expected_shapes(c: ArchConfig, moe: list[RoutingRule] | None = None) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor an ArchConfig (and, for a mixture of experts, its routing rules)
    implies, with its shape. A MoE layer's routed experts are (n_experts, rows, cols) tensors, as
    llama.cpp merges them: ffn_gate_exps, ffn_up_exps, ffn_down_exps."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd": (c.vocab_size, c.d_model), "output_norm": (c.d_model,)}
    if not c.tie_embeddings:
        shapes["output"] = (c.vocab_size, c.d_model)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm": (c.d_model,), b + "attn_q": (q, c.d_model), b + "attn_k": (kv, c.d_model),
                       b + "attn_v": (kv, c.d_model), b + "attn_output": (c.d_model, q), b + "ffn_norm": (c.d_model,)})
        if moe:
            r = moe[i]
            n = c.d_ff // r.n_routed
            shapes.update({b + "ffn_gate_exps": (r.n_routed, n, c.d_model), b + "ffn_up_exps": (r.n_routed, n, c.d_model),
                           b + "ffn_down_exps": (r.n_routed, c.d_model, n), **expected_dense(r, i, c.d_model)})
        else:
            shapes.update({b + "ffn_gate": (c.d_ff, c.d_model), b + "ffn_up": (c.d_ff, c.d_model),
                           b + "ffn_down": (c.d_model, c.d_ff)})
        if c.attn_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if c.qk_norm:
            qn, kn = ((q,), (kv,)) if c.qk_norm_full else ((c.head_dim,), (c.head_dim,))
            shapes.update({b + "attn_q_norm": qn, b + "attn_k_norm": kn})
    return shapes


def _check_tensors(config: ArchConfig, tensors: dict[str, SourceTensor], where: Path,
                   moe: list[RoutingRule] | None = None) -> None:
    if config.n_layers * 9 > len(tensors):  # checked first: a claimed layer count sizes what follows
        raise CheckpointError(f"{where}: the configuration has {config.n_layers} layers, the checkpoint "
                              f"{len(tensors)} tensors (each layer needs at least 9)")
    shapes = expected_shapes(config, moe)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} missing{more}")
    for name, t in tensors.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for this configuration")
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the config implies {list(shapes[name])}")


# ---- GGUF ----------------------------------------------------------------------------------

GGUF_ARCHS = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe")
_GGUF_FIC_ARCH = {"qwen2moe": "qwen2", "qwen3moe": "qwen3"}  # the same attention as their dense kin
# llama.cpp's routing per architecture (llama-model.cpp's build_moe_ffn calls: whether the top-k
# weights are renormalised); a file's {arch}.expert_weights_norm says otherwise when present
_GGUF_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError) as exc:  # a string that is not UTF-8; a field of no value
        raise CheckpointError(f"{_where(reader)}: GGUF metadata {key!r} is unreadable ({exc})") from None


def _where(reader: Any) -> str:
    return str(getattr(reader, "fic_path", None) or getattr(reader.data, "filename", "GGUF file"))


# Bounds on a GGUF file's sizes: far above any model fic runs, low enough that nothing computed
# from them overflows or is allocated before the file's tensors are checked against them.
_MAX_GGUF_DIM = 1 << 24
_MAX_GGUF_LAYERS = 1 << 16
_MAX_GGUF_CTX = 1 << 32


def _gguf_int(reader: Any, key: str, where: Path, *, default: int | None = None, required: bool = False,
              lo: int = 1, hi: int = _MAX_GGUF_DIM) -> int | None:
    """An integer of the metadata (one value for every layer, if it is a list), lo..hi."""
    value = _field(reader, key)
    if value is None:
        if required:
            raise CheckpointError(f"{where}: GGUF metadata {key!r} missing")
        return default
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise CheckpointError(f"{where}: {key} varies across layers, which fic does not support")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: GGUF metadata {key} is {_short(value)}, not an integer")
    if not lo <= value <= hi:
        raise CheckpointError(f"{where}: GGUF metadata {key} is {value}, outside {lo}..{hi}")
    return value


def _gguf_float(reader: Any, key: str, where: Path, *, default: float | None = None,
                required: bool = False) -> float | None:
    """A finite, non-negative number of the metadata."""
    value = _field(reader, key)
    if value is None:
        if required:
            raise CheckpointError(f"{where}: GGUF metadata {key!r} missing")
        return default
    if isinstance(value, list) and value and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckpointError(f"{where}: GGUF metadata {key} is {_short(value)}, not a finite non-negative number")
    return float(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def llama3_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs values for a llama3 rope_scaling dict (convert_hf_to_gguf.py's formula):
    each rotary frequency is divided by its factor."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float, old: int | None) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's rope_freqs tensor. In the smooth band,
    smooth = (1/wavelen - low/old) / ((high - low)/old) is linear in 1/wavelen, so a line through the band
    fixes low/old and high/old: the factors depend on nothing else. With `old` (the original context,
    from metadata) that gives low and high; without it, low_freq_factor = 1 (Llama 3's) fixes old.
    Every candidate is checked by recomputing the factors; None when none reproduces them."""
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wave = freqs / (2 * math.pi)
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates: list[tuple[float, float, float]] = []
    if band.sum() >= 2:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(inv_wave[band], smooth, 1)
        if old:
            span = old / slope
            candidates.append((old, -icpt * span, -icpt * span + span))
        if icpt < 0:
            span = -1 / icpt
            candidates.append((slope * span, 1.0, 1.0 + span))
    candidates.append((old or 8192, 1.0, 4.0))  # Llama 3.1's values, when the band says too little
    for ctx, low, high in candidates:
        d = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 4),
             "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": int(round(ctx))}
        if np.allclose(llama3_factors(d, head_dim, theta), factors, rtol=1e-5, atol=0):
            return d
    return None


def _gguf_rope_scaling(reader: Any, arch: str, head_dim: int, theta: float, where: Path) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise CheckpointError(f"{where}: GGUF rope scaling type {_short(kind)} is not supported")
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    factors = np.asarray(t.data).reshape(-1)
    if t.tensor_type.name != "F32" or factors.size != head_dim // 2 or not np.all(np.isfinite(factors)) \
            or not np.all(factors > 0):
        raise CheckpointError(f"{where}: rope_freqs is not {head_dim // 2} positive F32 factors")
    old = _gguf_int(reader, f"{arch}.rope.scaling.original_context_length", where, hi=_MAX_GGUF_CTX)
    try:
        with np.errstate(all="ignore"):
            d = _llama3_from_factors(factors.astype(np.float32), head_dim, theta, old)
    except (ValueError, ArithmeticError):  # no line fits (numpy's LinAlgError is a ValueError)
        d = None
    if d is not None:
        return d
    raise CheckpointError(f"{where}: rope_freqs tensor does not match llama3 rope scaling; fic cannot run it")


def _gguf_canonical(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _qk_unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation for arch llama (convert_hf_to_gguf.py:
    w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)): hf = gguf[index]."""
    fwd = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(fwd)  # gguf row p holds hf row fwd[p]


def _gguf_loader(t: Any, qtype: str, shape: tuple[int, ...], rows_index: np.ndarray | None,
                 where: Path, expert: int | None = None) -> Callable[[], np.ndarray | QTensor]:
    """Loads tensor t of `shape`; expert j: the j-th matrix of a merged (n_experts, rows, cols)
    tensor (`shape` is then one expert's)."""
    import gguf

    def load() -> np.ndarray | QTensor:
        try:
            data = np.asarray(t.data)
            if expert is not None:
                data = data[expert]
            rows = shape[0]
            data = data.reshape(rows, -1) if len(shape) == 2 else data.reshape(1, -1)
            if rows_index is not None:  # whole rows of blocks move: lossless for quantized data
                data = data[rows_index] if len(shape) == 2 else data[:, rows_index]
            data = np.ascontiguousarray(data)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where}: tensor {t.name!r} unreadable ({exc})") from None
        if qtype == "F32":
            return data.astype(np.float32, copy=False).reshape(shape)
        if qtype == "F16":
            return data.view(np.float16).reshape(shape) if len(shape) == 2 else data.astype(np.float32).reshape(shape)
        if qtype in KEPT_GGUF_TYPES and len(shape) == 2:
            return QTensor(KEPT_GGUF_TYPES[qtype], (shape[0], shape[1]), data.reshape(-1))
        try:
            return _dequantize_rows(data, gguf.GGMLQuantizationType[qtype]).reshape(shape)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(f"{where}: tensor {t.name!r} of GGUF type {qtype} cannot be read "
                                  f"({exc or type(exc).__name__})") from None

    return load


def _dequantize_rows(data: np.ndarray, qtype: Any, chunk: int = 2048) -> np.ndarray:
    """gguf.quants.dequantize a few rows at a time: its temporaries are several times the output."""
    import gguf

    out = None
    for start in range(0, data.shape[0], chunk):
        part = gguf.quants.dequantize(data[start:start + chunk], qtype)
        if out is None:
            out = np.empty((data.shape[0], part.shape[-1]), dtype=np.float32)
        out[start:start + part.shape[0]] = part
    return out


class _Truncated(Exception):
    """A read past the end of a GGUF file, or a count or size the file cannot hold; str() is the
    one-line message."""


_GGUF_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_GGUF_MIN_KV = 13        # key length (8), type (4), the smallest value (1)
_GGUF_MIN_TENSOR = 24    # name length (8), dimension count (4), type (4), offset (8)
_GGML_MAX_DIMS = 4


@functools.cache
def _bounded_gguf_reader() -> type:
    """gguf.GGUFReader with every read checked against the file's size before it is made, and
    every count against what the rest of the file can hold before anything is built from it. The
    package slices a memory map of the file, so a truncated file otherwise surfaces as numpy's
    view and reshape errors, and a count of 2^60 as a loop that allocates until the file ends.
    Arrays of numbers are read as one view (the package makes one numpy object per element: a
    hundred bytes of memory per byte of file). Its private _get, _build_fields,
    _get_field_parts and _build_tensors (gguf==0.19.0, pinned in setup.py) are where it reads;
    tests/test_convert.py cuts files at each stage, tests/test_fuzz.py mutates them."""
    import gguf

    VT = gguf.GGUFValueType

    class BoundedReader(gguf.GGUFReader):
        _plain = None  # the memory map as a plain array: its slices skip np.memmap's costly bookkeeping

        def _get(self, offset, dtype, count=1, override_order=None):
            offset, count, dtype = int(offset), int(count), np.dtype(dtype)
            end = offset + dtype.itemsize * count
            if end > len(self.data):
                what = "the GGUF header" if offset < _GGUF_HEADER_BYTES else "the metadata"
                raise _Truncated(f"truncated: {what} needs bytes {offset}..{end}, the file has {len(self.data)}")
            if self._plain is None:
                self._plain = self.data.view(np.ndarray)
            arr = self._plain[offset:end].view(dtype=dtype)  # as the package's _get, unmapped
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

        def _build_fields(self, offs, count):
            n_tensors = int(self.fields["GGUF.tensor_count"].parts[0][0])
            need = int(offs) + int(count) * _GGUF_MIN_KV + n_tensors * _GGUF_MIN_TENSOR
            if need > len(self.data):
                raise _Truncated(f"truncated: the metadata needs bytes {int(offs)}..{need}, the file has "
                                 f"{len(self.data)} (the header claims {int(count)} keys and {n_tensors} tensors)")
            return super()._build_fields(offs, count)

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) != VT.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n = int(raw_itype[0]), int(alen[0])
            try:
                nptype = self.gguf_scalar_to_np.get(VT(itype))
            except ValueError:
                raise ValueError(f"Unknown/unhandled field type {itype}") from None
            least = np.dtype(nptype).itemsize if nptype is not None else 8 if itype == VT.STRING else 12
            end = int(orig_offs) + 12 + n * least
            if end > len(self.data):
                raise _Truncated(f"truncated: the metadata needs bytes {int(orig_offs)}..{end} (an array of {n} "
                                 f"items), the file has {len(self.data)}")
            if itype == VT.STRING:
                return self._string_array(orig_offs, raw_itype, alen, n)
            if nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            items = self._get(orig_offs + 12, nptype, n)
            return 12 + int(items.nbytes), [raw_itype, alen, items], [2], [VT.ARRAY, VT(itype)]

        def _string_array(self, orig_offs, raw_itype, alen, n):
            """An array of strings (a vocabulary) as memoryview slices of the map: the package's
            contents() reads them with tobytes(), as it reads its own numpy views."""
            if self._plain is None:
                self._plain = self.data.view(np.ndarray)
            mv, size = memoryview(self._plain), len(self.data)
            order = sys.byteorder if self.byte_order == "I" else ("big" if sys.byteorder == "little" else "little")
            parts, idxs, offs = [raw_itype, alen], [], int(orig_offs) + 12
            for _ in range(n):
                if offs + 8 > size:
                    raise _Truncated(f"truncated: the metadata needs bytes {offs}..{offs + 8}, the file has {size}")
                slen = int.from_bytes(mv[offs:offs + 8], order)
                if offs + 8 + slen > size:
                    raise _Truncated(f"truncated: the metadata needs bytes {offs + 8}..{offs + 8 + slen}, "
                                     f"the file has {size}")
                parts += [mv[offs:offs + 8], mv[offs + 8:offs + 8 + slen]]
                idxs.append(len(parts) - 1)
                offs += 8 + slen
            return offs - int(orig_offs), parts, idxs, [VT.ARRAY, VT.STRING]

        def _build_tensors(self, start_offs, fields):
            for field in fields:  # parts: name length, name, n_dims, dims, type, offset (gguf_reader.py)
                _, name, _, dims, raw_type, offset = field.parts
                tensor = bytes(name).decode("utf-8", errors="replace")
                if not 1 <= len(dims) <= _GGML_MAX_DIMS:
                    raise _Truncated(f"tensor {tensor!r} has {len(dims)} dimensions (GGUF allows 1..{_GGML_MAX_DIMS})")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                except (KeyError, ValueError):
                    continue  # an unknown type: the package says so itself
                n = math.prod(int(d) for d in dims)  # Python integers: no product wraps
                if n % block:
                    raise _Truncated(f"tensor {tensor!r}: {n} elements are not a whole number of {qtype.name} blocks")
                begin = int(start_offs) + int(offset[0])
                end = begin + n * type_size // block
                if end > len(self.data):
                    raise _Truncated(f"truncated: tensor {tensor!r} needs bytes {begin}..{end}, "
                                     f"the file has {len(self.data)}")
            super()._build_tensors(start_offs, fields)

    return BoundedReader


def _open_gguf_reader(path: Path) -> Any:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        raise CheckpointError(f"{path}: truncated: the file is empty")
    try:
        reader = _bounded_gguf_reader()(str(path))
    except _Truncated as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except MemoryError:  # not a fault of the file's: said as what it is
        raise
    except Exception as exc:  # the reader raises many kinds on a corrupt file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable GGUF file ({detail})") from None
    reader.fic_path = path
    return reader


def _open_gguf(path: Path) -> Checkpoint:
    return _gguf_checkpoint(_open_gguf_reader(path), path)


def _gguf_checkpoint(reader: Any, path: Path) -> Checkpoint:
    """The checkpoint an open GGUF reader holds: its configuration from the metadata, checked,
    and its tensors checked against it."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"unsupported architecture {_short(arch)} in {path.name} (fic converts {', '.join(GGUF_ARCHS)})")
    by_name = {t.name: t for t in reader.tensors}
    d_model = _gguf_int(reader, f"{arch}.embedding_length", path, required=True)
    n_heads = _gguf_int(reader, f"{arch}.attention.head_count", path, required=True)
    n_kv = _gguf_int(reader, f"{arch}.attention.head_count_kv", path, default=n_heads)
    head_dim = _gguf_int(reader, f"{arch}.attention.key_length", path, default=max(1, d_model // n_heads))
    rope_dim = _gguf_int(reader, f"{arch}.rope.dimension_count", path)
    if rope_dim is not None and rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary embedding ({rope_dim} of {head_dim}) is not supported")
    theta = _gguf_float(reader, f"{arch}.rope.freq_base", path) or 10000.0
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' missing")
    moe = _gguf_moe(reader, arch, by_name, path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.tokens is not a list")
    vocab = int(embd.shape[1]) if len(embd.shape) == 2 else len(tokens or [])
    name, file_type = _field(reader, "general.name"), _field(reader, "general.file_type")
    try:
        config = ArchConfig(
            arch=_GGUF_FIC_ARCH.get(arch, arch), n_layers=_gguf_int(reader, f"{arch}.block_count", path, required=True, hi=_MAX_GGUF_LAYERS),
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            d_ff=moe[0][0].n_routed * moe[1] if moe else
            _gguf_int(reader, f"{arch}.feed_forward_length", path, required=True), vocab_size=vocab,
            norm_eps=_gguf_float(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, required=True),
            rope_theta=theta, max_ctx=_gguf_int(reader, f"{arch}.context_length", path, default=2048, hi=_MAX_GGUF_CTX),
            tie_embeddings="output.weight" not in by_name,
            attn_bias="blk.0.attn_q.bias" in by_name, qk_norm="blk.0.attn_q_norm.weight" in by_name,
            qk_norm_full=arch == "olmoe",
            rope_scaling=None,
            extra={"gguf_name": name if isinstance(name, str) else None,
                   "gguf_file_type": file_type if type(file_type) is int else None},
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    scaling = _gguf_rope_scaling(reader, arch, head_dim, theta, path)  # after the config checked head_dim
    if scaling is not None:
        config = _replace(config, rope_scaling=scaling)
    if tokens is not None and len(tokens) != vocab:
        raise CheckpointError(f"{path}: {len(tokens)} tokens but token_embd has {vocab} rows")
    tensors, sources = {}, {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        canon = _gguf_canonical(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists ne0 (row length) first
        if canon.endswith("ffn_gate_inp_shexp") and len(shape) == 1:
            shape = (1, shape[0])  # llama.cpp's shared-expert gate is a vector; Hugging Face's a 1-row matrix
        qtype = t.tensor_type.name
        tensors[canon] = SourceTensor(canon, shape, qtype, qtype in KEPT_GGUF_TYPES, lambda: None)
        sources[canon] = t
    rules = moe[0] if moe else None
    _check_tensors(config, tensors, path, rules)  # before the loaders: their row order needs the shapes checked
    for canon, st in tensors.items():
        if len(st.shape) == 3:  # merged experts: loaded one at a time
            st.load_expert = functools.partial(_gguf_expert, sources[canon], st.src_type, st.shape[1:], path)
            st.load = functools.partial(_gguf_stack, st)
            continue
        index = None
        if arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_[qk](\.bias)?", canon):
            index = _qk_unpermute_index(st.shape[0], n_heads if ".attn_q" in canon else n_kv)
        st.load = _gguf_loader(sources[canon], st.src_type, st.shape, index, path)
    return Checkpoint("gguf", path, config, [path], tensors, gguf_reader=reader, moe=rules)


def _gguf_expert(t: Any, qtype: str, shape: tuple[int, ...], where: Path, j: int) -> np.ndarray | QTensor:
    return _gguf_loader(t, qtype, shape, None, where, expert=j)()


def _gguf_stack(st: SourceTensor) -> np.ndarray:
    from flashinfer_cli.convert import as_float

    return np.stack([as_float(st.load_expert(j)) for j in range(st.shape[0])])


def _gguf_moe(reader: Any, arch: str, by_name: dict[str, Any], where: Path) -> tuple[list[RoutingRule], int] | None:
    """(each layer's routing rule, neurons per expert) of a GGUF mixture of experts (llama.cpp's
    {arch}.expert_count, expert_used_count, expert_feed_forward_length and the shared expert's
    tensors), None for a dense file."""
    n_exp = _gguf_int(reader, f"{arch}.expert_count", where, default=0, lo=0)
    if not n_exp:
        return None
    top_k = _gguf_int(reader, f"{arch}.expert_used_count", where, required=True)
    size = _gguf_int(reader, f"{arch}.expert_feed_forward_length", where) or \
        _gguf_int(reader, f"{arch}.feed_forward_length", where, required=True)
    shexp = by_name.get("blk.0.ffn_gate_shexp.weight")
    shared = int(shexp.shape[1]) if shexp is not None and len(shexp.shape) == 2 else 0
    shared = _gguf_int(reader, f"{arch}.expert_shared_feed_forward_length", where, default=shared, lo=0)
    norm = _field(reader, f"{arch}.expert_weights_norm")
    norm = _GGUF_NORM_TOPK.get(arch, True) if norm is None else norm
    n_layers = _gguf_int(reader, f"{arch}.block_count", where, required=True, hi=_MAX_GGUF_LAYERS)
    try:
        rule = RoutingRule(n_routed=n_exp, top_k=top_k, softmax="before", norm_topk=bool(norm), shared_neurons=shared,
                           shared_gate="sigmoid" if "blk.0.ffn_gate_inp_shexp.weight" in by_name else "none")
        rule.check()
    except ValueError as exc:
        raise CheckpointError(f"{where}: mixture of experts: {exc}") from None
    return [rule] * n_layers, size
