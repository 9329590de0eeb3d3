"""The converter against independent references: transformers' torch weights for Hugging Face
checkpoints, the gguf package's quantizer and reader for GGUF files (with llama.cpp's Q/K permutation
applied here as its converter does), and the real SmolLM2 GGUF."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from flashinfer_cli import fmt, kernels  # noqa: E402
from flashinfer_cli.convert import ConvertError, ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import make_engine_plan  # noqa: E402
from flashinfer_cli.plan import HUGE_PAGE  # noqa: E402

from _kquant import ggml_quantize  # noqa: E402
from _tiny import add_gguf_tokenizer  # noqa: E402

T = gguf.GGMLQuantizationType
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

HF_TO_CANON = {
    "model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output",
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
    "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def canon(hf_name: str) -> str:
    if hf_name in HF_TO_CANON:
        return HF_TO_CANON[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_CANON[rest]}"


# ---- tiny checkpoints made with transformers -------------------------------------------------

def write_tokenizer_files(path: Path) -> None:
    """A tiny byte-level BPE tokenizer.json with two special tokens, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    vocab["Ġt"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"}))


def tiny_model(arch: str, *, tied: bool = False, rope_scaling: dict | None = None, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5)
    common.update(sizes)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_scaling=dict(rope_scaling) if rope_scaling else None)  # it adds keys
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "qwen3":  # head_dim * heads != hidden_size, as in the Qwen3 family
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    else:
        raise AssertionError(arch)
    with torch.no_grad():  # random norms, so a norm mix-up cannot pass for ones
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path: Path, dtype=torch.float32, **kwargs) -> dict[str, np.ndarray]:
    """save_pretrained, tokenizer files beside; returns the saved weights as float32 by canonical name."""
    model = model.to(dtype)
    model.save_pretrained(path, **kwargs)
    write_tokenizer_files(path)
    state = {canon(k): v.float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("output", None)
    return state


def read_model(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(manifest, dequantized dense tensors + reassembled ffn_gate/up/down, raw bundles) of a fic model."""
    with fmt.ModelReader(path) as r:
        man = r.manifest
        dense = {}
        for name, v in r.dense().items():
            dense[name] = v if name.endswith("neuron_order") else \
                (kernels.dequantize(v) if isinstance(v, kernels.QTensor) else v.astype(np.float32))
        bundles = {}
        for layer, entries in enumerate(man.experts):
            keys = [(layer, e) for e in range(len(entries))]
            bufs = [kernels.aligned_buffer(r.bundle_bytes(*k)) for k in keys]
            bundles[layer] = r.read_bundles(keys, bufs)
            parts = bundles[layer]
            gate = np.concatenate([kernels.dequantize(b.gate) for b in parts])
            up = np.concatenate([kernels.dequantize(b.up) for b in parts])
            if man.expert_layout.down_layout == "columns":
                down = np.concatenate([kernels.dequantize(b.down) for b in parts], axis=1)
            else:
                down = np.concatenate([kernels.dequantize(b.down) for b in parts]).T
            dense[f"blk.{layer}.ffn_gate"], dense[f"blk.{layer}.ffn_up"], dense[f"blk.{layer}.ffn_down"] = gate, up, down
        return json.loads((path / fmt.MANIFEST_FILE).read_text()), dense, bundles


def block_bound(w: np.ndarray, fmt_name: str) -> np.ndarray:
    """Per-weight bound of the quantization error of `fmt_name` (ggml's reference quantizers):
    the scale is stored as f16 (relative rounding 2^-11), which moves a weight of q steps by q * 2^-11 steps:
    q8_0: half a step of amax/127, plus 127 * 2^-11 steps for the scale's rounding (0.57 steps);
    q4_0: one step of amax/8 (the side opposite the extreme clamps at 7), plus 8 * 2^-11;
    q4_1: half a step of (max-min)/15 plus 15 * 2^-11 steps, plus the f16 rounding of the min;
    q5_0: one step of amax/16, plus 16 * 2^-11;
    q5_1: half a step of (max-min)/31 plus 31 * 2^-11 steps, plus the f16 rounding of the min."""
    blocks = w.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if fmt_name == "q8_0":
        b = 0.57 * amax / 127
    elif fmt_name == "q4_0":
        b = 1.01 * amax / 8
    elif fmt_name == "q4_1":
        b = 0.51 * (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 15 + amax * 2 ** -10
    elif fmt_name == "q5_0":
        b = 1.01 * amax / 16
    elif fmt_name == "q5_1":
        b = 0.52 * (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 31 + amax * 2 ** -10
    else:
        raise AssertionError(fmt_name)
    return np.broadcast_to(b, blocks.shape).reshape(w.shape) + 1e-7


def check_tensors(dense: dict[str, np.ndarray], ref: dict[str, np.ndarray], manifest: dict, quant: str) -> float:
    """Every reference tensor is in the model, exactly at f32 and within the quantizer's bound
    otherwise; returns the worst error relative to the bound (<= 1)."""
    worst = 0.0
    for name, want in ref.items():
        got = dense[name]
        assert got.shape == want.shape, name
        if want.ndim == 1 or quant == "f32":
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        if quant == "f16":
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
            continue
        ratio = float((np.abs(got - want) / block_bound(want, quant)).max())
        assert ratio <= 1.0, f"{name}: error {ratio:.3f} of the {quant} bound"
        worst = max(worst, ratio)
    assert not set(n for n in dense if not n.endswith("neuron_order")) - set(ref), "extra tensors"
    return worst


CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "mistral": dict(arch="mistral"),
    "qwen2-bias": dict(arch="qwen2"),
    "qwen3-qknorm": dict(arch="qwen3", tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_f32_exact(tmp_path, case):
    model = tiny_model(**CASES[case])
    ref = save_hf(model, tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "m", name=case, options=ConvertOptions(quant="f32"), progress=False)
    manifest, dense, _ = read_model(out)
    check_tensors(dense, ref, manifest, "f32")
    arch = manifest["arch"]
    cfg = model.config
    assert arch["arch"] == {"mistral": "llama"}.get(CASES[case]["arch"], CASES[case]["arch"])
    assert (arch["n_layers"], arch["d_model"], arch["n_heads"], arch["n_kv_heads"], arch["d_ff"], arch["vocab_size"]) == \
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
         cfg.intermediate_size, cfg.vocab_size)
    assert arch["head_dim"] == (32 if case.startswith("qwen3") else 16)
    assert arch["tie_embeddings"] == CASES[case].get("tied", False)
    assert arch["attn_bias"] == (case == "qwen2-bias") and arch["qk_norm"] == (case == "qwen3-qknorm")
    assert arch["norm_eps"] == 1e-5
    assert arch["rope_scaling"] == (LLAMA3_ROPE if case == "llama3-rope" else None)
    # experts of 64 neurons over d_ff 160: 64, 64, 32 (the last smaller), identity order recorded
    assert [[e[3] for e in layer] for layer in manifest["experts"]] == [[64, 64, 32]] * 2
    for layer in range(2):
        np.testing.assert_array_equal(dense[f"blk.{layer}.ffn_neuron_order"], np.arange(160))
    assert manifest["tokenizer"]["files"] == ["tokenizer.json"] and (out / "tokenizer.json").is_file()
    prov = manifest["provenance"]
    assert prov["kind"] == "hf" and prov["converter"]["quant"] == "f32"
    weights = tmp_path / "src" / "model.safetensors"
    assert prov["sha256"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not manifest["notes"]


def test_hf_bf16_sharded_and_rows_layout(tmp_path):
    """bf16 weights (read as raw bytes), several shards with an index, and the transposed down layout."""
    ref = save_hf(tiny_model("qwen2"), tmp_path / "src", dtype=torch.bfloat16, max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    opts = ConvertOptions(quant="f32", expert_size=48, down_layout="rows")
    out = convert(tmp_path / "src", tmp_path / "m", name="q", options=opts, progress=False)
    manifest, dense, _ = read_model(out)
    check_tensors(dense, ref, manifest, "f32")
    assert [e[3] for e in manifest["experts"][0]] == [48, 48, 48, 16]
    assert manifest["expert_layout"]["down_layout"] == "rows"


def test_hf_f16_exact(tmp_path):
    ref = save_hf(tiny_model("llama"), tmp_path / "src", dtype=torch.float16)
    out = convert(tmp_path / "src", tmp_path / "m", name="h", options=ConvertOptions(quant="f16"), progress=False)
    manifest, dense, _ = read_model(out)
    check_tensors(dense, ref, manifest, "f16")
    assert manifest["tensors"]["token_embd"]["fmt"] == "f16"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_hf_quantized_error_bounded(tmp_path, quant):
    """At q8_0 every weight is within 0.57 steps of amax/127 of its block; at q4_0 within one step of
    amax/8. Norms and biases stay exact (f32)."""
    ref = save_hf(tiny_model("qwen2"), tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "m", name=quant, options=ConvertOptions(quant=quant), progress=False)
    manifest, dense, _ = read_model(out)
    worst = check_tensors(dense, ref, manifest, quant)
    assert worst > 0.3  # the bound is tight enough to mean something
    assert manifest["tensors"]["token_embd"]["fmt"] == quant and manifest["tensors"]["output"]["fmt"] == quant
    assert manifest["tensors"]["blk.0.attn_q.bias"]["fmt"] == "f32"
    assert manifest["expert_layout"]["gate_fmt"] == manifest["expert_layout"]["down_fmt"] == quant


# ---- GGUF -----------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (Q with n_head, K with n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(rs: dict, head_dim: int, base: float) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for a llama3 rope_scaling (generate_extra_tensors)."""
    import math
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    lo_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    hi_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < hi_wl:
            out.append(1)
        elif wavelen > lo_wl:
            out.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / \
                (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, dtype=np.float32)


# tensor type per canonical role in the synthetic GGUF: kept types, and Q5_1 (which fic requantizes)
GGUF_TYPES = {"token_embd": T.Q8_0, "output": T.Q5_0, "attn_q": T.Q4_0, "attn_k": T.Q8_0, "attn_v": T.F16,
              "attn_output": T.F32, "ffn_gate": T.Q4_1, "ffn_up": T.Q5_1, "ffn_down": T.Q4_1}


# K-quant blocks: (bytes per 256 weights, byte offsets of the f16 scales in a block)
K_BLOCKS = {T.Q4_K: (144, (0, 2)), T.Q6_K: (210, (208,))}


def random_k_blocks(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """Random K-quant rows whose f16 super-block scales are finite and small."""
    size, f16_offsets = K_BLOCKS[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for off in f16_offsets:
        scale = rng.uniform(1e-3, 4e-3, (rows, cols // 256)).astype(np.float16)
        blocks[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model, *, types=GGUF_TYPES, arch: str = "llama") -> dict[str, np.ndarray]:
    """A GGUF file as llama.cpp's converter writes one (names, permuted Q/K, rope_freqs, metadata)."""
    cfg = model.config
    state = {canon(k): v.float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    add_gguf_tokenizer(w, cfg.vocab_size)
    rs = getattr(cfg, "rope_scaling", None) or {}
    if rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(rs, head_dim, 10000.0))
    for name, value in state.items():
        role = name.split(".")[-1] if name.startswith("blk.") else name
        if arch == "llama" and role == "attn_q":
            value = llama_cpp_permute(value, cfg.num_attention_heads)
        elif arch == "llama" and role == "attn_k":
            value = llama_cpp_permute(value, cfg.num_key_value_heads)
        qtype = types.get(role, T.F32) if value.ndim == 2 else T.F32
        gname = name if name.endswith(".bias") else name + ".weight"
        if qtype == T.F16:
            w.add_tensor(gname, value.astype(np.float16))
        elif qtype == T.F32:
            w.add_tensor(gname, value)
        elif qtype == T.Q1_0:  # the gguf package cannot quantize Q1_0: fic's quantizer (ggml's layout)
            q = kernels.quantize(np.ascontiguousarray(value, dtype=np.float32), "q1_0")
            state[name] = kernels.dequantize(q)
            w.add_tensor(gname, q.data.reshape(value.shape[0], -1), raw_dtype=qtype)
        elif qtype in K_BLOCKS:  # the gguf package cannot quantize K types: llama.cpp's quantizer, else
            # random valid blocks
            qt = ggml_quantize(np.ascontiguousarray(value, dtype=np.float32), qtype.name.lower())
            blocks = qt.data.reshape(value.shape[0], -1) if qt is not None else \
                random_k_blocks(value.shape, qtype, np.random.default_rng(len(state) + len(name)))
            state[name] = gguf.quants.dequantize(blocks, qtype)
            w.add_tensor(gname, blocks, raw_dtype=qtype)
        else:
            w.add_tensor(gname, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v for k, v in state.items()}


def unpermuted_q_bytes(reader, name: str, n_head: int) -> np.ndarray:
    """The GGUF's quantized rows of a Q/K tensor put back in Hugging Face order (llama.cpp's forward
    permutation inverted here with numpy's argsort)."""
    t = next(t for t in reader.tensors if t.name == name)
    rows = np.asarray(t.data)
    fwd = llama_cpp_permute(np.arange(rows.shape[0]), n_head)
    return rows[np.argsort(fwd)]


def test_gguf_round_trip(tmp_path):
    model = tiny_model("llama", rope_scaling=LLAMA3_ROPE, seed=3)
    ref = write_gguf(tmp_path / "tiny.gguf", model)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "m", name="g", progress=False)
    manifest, dense, bundles = read_model(out)
    cfg = model.config
    assert manifest["arch"]["rope_scaling"] == {**LLAMA3_ROPE}
    assert manifest["arch"]["tie_embeddings"] is False
    # F32 exact, F16 exact to the f16 value, every kept quantized type within its quantizer's bound
    for name, want in ref.items():
        role = name.split(".")[-1] if name.startswith("blk.") else name
        qtype = GGUF_TYPES.get(role, T.F32) if want.ndim == 2 else T.F32
        got = dense[name]
        if qtype == T.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif qtype == T.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        elif qtype == T.Q5_1:  # Q5_1 then q8_0: both errors
            bound = block_bound(want, "q5_1") + block_bound(want, "q8_0") * 1.1
            assert (np.abs(got - want) <= bound).all(), name
        else:
            assert (np.abs(got - want) <= block_bound(want, qtype.name.lower())).all(), name
    # kept quantized data is byte-identical: Q/K rows unpermuted (rows quantize independently, so
    # they equal the gguf package quantizing the torch weight directly), FFN slices inside bundles
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    with fmt.ModelReader(out) as r:
        for layer in range(cfg.num_hidden_layers):
            q = r.dense_tensor(f"blk.{layer}.attn_q")
            assert q.fmt == "q4_0"
            np.testing.assert_array_equal(q.data, unpermuted_q_bytes(reader, f"blk.{layer}.attn_q.weight", 4).reshape(-1))
            np.testing.assert_array_equal(q.data, gguf.quants.quantize(ref[f"blk.{layer}.attn_q"], T.Q4_0).reshape(-1))
            k = r.dense_tensor(f"blk.{layer}.attn_k")
            np.testing.assert_array_equal(k.data, unpermuted_q_bytes(reader, f"blk.{layer}.attn_k.weight", 2).reshape(-1))
            gate = raw[f"blk.{layer}.ffn_gate.weight"]
            down = raw[f"blk.{layer}.ffn_down.weight"]  # 64 rows of d_ff=160 Q4_1 weights: 5 blocks of 20 bytes
            starts = [0, 64, 128]
            for b, s in zip(bundles[layer], starts):
                np.testing.assert_array_equal(b.gate.data, gate[s:s + b.n_neurons].reshape(-1))
                np.testing.assert_array_equal(b.down.data, down[:, s // 32 * 20:(s + b.n_neurons) // 32 * 20].reshape(-1))
        assert r.dense_tensor("token_embd").fmt == "q8_0"
        np.testing.assert_array_equal(r.dense_tensor("token_embd").data, raw["token_embd.weight"].reshape(-1))
        assert r.dense_tensor("output").fmt == "q5_0"  # kept as it is
        np.testing.assert_array_equal(r.dense_tensor("output").data, raw["output.weight"].reshape(-1))
    assert manifest["expert_layout"] == {"d_model": 64, "gate_fmt": "q4_1", "up_fmt": "q8_0", "down_fmt": "q4_1",
                                         "down_layout": "columns"}
    # the Q5_1 ffn_up tensors were requantized, and the note says so with a measured error
    assert len(manifest["notes"]) == 1
    note = manifest["notes"][0]
    assert note.startswith("2 tensors (2 Q5_1)") and "q8_0" in note and "relative RMS" in note
    measured = float(note.split("relative RMS change of those weights ")[1].split()[0])
    src_up = np.concatenate([gguf.quants.dequantize(raw[f"blk.{i}.ffn_up.weight"], T.Q5_1) for i in range(2)])
    got_up = np.concatenate([dense[f"blk.{i}.ffn_up"] for i in range(2)])
    expect = np.sqrt(((got_up.astype(np.float64) - src_up) ** 2).sum() / (src_up.astype(np.float64) ** 2).sum())
    assert measured == pytest.approx(expect, rel=1e-3) and 0 < measured < 0.01


K_TYPES = {"ffn_gate": T.Q4_K, "ffn_up": T.Q4_K, "ffn_down": T.Q6_K, "token_embd": T.Q6_K, "output": T.Q6_K,
           "attn_q": T.Q4_K, "attn_k": T.Q5_0, "attn_v": T.Q6_K, "attn_output": T.Q4_K}


def test_gguf_k_quants_kept(tmp_path):
    """Q4_K, Q6_K and Q5_0 tensors (what llama.cpp's Q4_K_M files hold) are kept byte for byte: dense
    ones whole, gate/up as rows of experts, down as whole-block columns (the default expert size
    rounds up to the K-quant block of 256); no note, nothing requantized."""
    model = tiny_model("qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=4, seed=6)
    write_gguf(tmp_path / "k.gguf", model, arch="qwen2", types=K_TYPES)
    out = convert(tmp_path / "k.gguf", tmp_path / "m", name="k", progress=False)
    manifest, dense, bundles = read_model(out)
    reader = gguf.GGUFReader(str(tmp_path / "k.gguf"))
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert manifest["expert_layout"] == {"d_model": 256, "gate_fmt": "q4_k", "up_fmt": "q4_k", "down_fmt": "q6_k",
                                         "down_layout": "columns"}
    assert manifest["provenance"]["converter"]["expert_size"] == 256
    assert manifest.get("notes", []) == []
    with fmt.ModelReader(out) as r:
        for name, fmt_name in (("token_embd", "q6_k"), ("output", "q6_k"), ("blk.1.attn_k", "q5_0"),
                               ("blk.0.attn_q", "q4_k"), ("blk.1.attn_v", "q6_k")):
            t = r.dense_tensor(name)
            assert t.fmt == fmt_name, name
            np.testing.assert_array_equal(t.data, raw[name + ".weight"].reshape(-1), err_msg=name)
    for layer in range(2):
        gate, down = raw[f"blk.{layer}.ffn_gate.weight"], raw[f"blk.{layer}.ffn_down.weight"]
        for b, s in zip(bundles[layer], (0, 256)):
            np.testing.assert_array_equal(b.gate.data, gate[s:s + b.n_neurons].reshape(-1))
            np.testing.assert_array_equal(b.down.data, down[:, s // 256 * 210:(s + b.n_neurons) // 256 * 210].reshape(-1))


def test_gguf_k_quant_down_requantized_for_small_experts(tmp_path):
    """An explicit expert size that is not a multiple of 256 keeps gate/up as Q4_K (rows split
    anywhere) and requantizes the Q6_K down to options.quant, with a note that says why."""
    model = tiny_model("qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=4, seed=6)
    ref = write_gguf(tmp_path / "k.gguf", model, arch="qwen2", types=K_TYPES)
    out = convert(tmp_path / "k.gguf", tmp_path / "m", name="k", options=ConvertOptions(expert_size=64),
                  progress=False)
    manifest, dense, bundles = read_model(out)
    lay = manifest["expert_layout"]
    assert (lay["gate_fmt"], lay["up_fmt"], lay["down_fmt"]) == ("q4_k", "q4_k", "q8_0")
    assert [b.n_neurons for b in bundles[0]] == [64] * 8
    (note,) = manifest["notes"]
    assert note.startswith("2 tensors (2 Q6_K)") and "expert size 64 is not a multiple of q6_k's block of 256" in note
    for layer in range(2):  # within q8_0's bound of the Q6_K values
        name = f"blk.{layer}.ffn_down"
        assert (np.abs(dense[name] - ref[name]) <= block_bound(ref[name], "q8_0")).all(), name


def load_gguf_weights(model, path: Path) -> None:
    """Every matrix of a llama torch model replaced by the GGUF's dequantized tensor (gguf package),
    Q/K rows put back in Hugging Face order."""
    cfg = model.config
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for hf_name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        name = canon(hf_name)
        t = raw[name + ".weight"]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(p.shape)
        n_head = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[-1])
        if n_head:
            w = w[np.argsort(llama_cpp_permute(np.arange(w.shape[0]), n_head))]
        p.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


def test_gguf_k_quants_logits_match_llama_cpp(tmp_path):
    """A tiny llama GGUF of Q4_K, Q6_K and Q5_0 tensors (made by llama.cpp's own quantizer), converted by
    fic: fic's prefill logits against llama.cpp's on the same file. llama.cpp rounds activations to
    8 bits (q8_K for the K-quants, q8_0 for Q5_0) where fic keeps them float32, so the two differ by
    that rounding only: the test asks for a difference well under the weights' own quantization effect
    (fic against the unquantized torch model), which reading any block wrongly would exceed. And fic
    against torch running the file's dequantized weights (gguf package) in float32: within 1e-4."""
    from conftest import need_llama_cpp

    llama_cpp = need_llama_cpp()
    if ggml_quantize(np.zeros((1, 256), np.float32), "q4_k") is None:
        pytest.skip("llama-cpp-python's libggml-base is not loadable")
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, seed=8)
    path = tmp_path / "k.gguf"
    write_gguf(path, model, types=K_TYPES)
    out = convert(path, tmp_path / "m", name="k", progress=False)
    from flashinfer_cli.engine import Engine

    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, 40)]
    eng = Engine.open(str(out), ctx=128, kv_dtype="f32")
    with kernels.prefill_mode("exact"):  # the float32 prefill (the default but on AMX tiles)
        fic = np.asarray(eng.forward(ids), dtype=np.float64)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False)
    llm.eval(ids)
    lcpp = np.array(llm.scores[:len(ids)], dtype=np.float64)
    del llm
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].double().numpy()
        load_gguf_weights(model, path)  # the torch model with the file's dequantized weights
        hf_file = model(torch.tensor([ids])).logits[0].double().numpy()
    scale = np.abs(lcpp).max()
    diff, quant_effect = np.abs(fic - lcpp).max() / scale, np.abs(fic - hf).max() / scale
    exact = np.abs(fic - hf_file).max() / scale
    print(f"k-quants vs llama.cpp: max |diff| / max |logit| {diff:.2e}; quantization effect {quant_effect:.2e}; "
          f"vs torch on the file's weights {exact:.2e}")
    assert exact < 1e-4  # fic computes with exactly the file's weights (float32 activations)
    assert diff < 0.25 * quant_effect and diff < 0.05
    cos = (fic * lcpp).sum(1) / np.linalg.norm(fic, axis=1) / np.linalg.norm(lcpp, axis=1)
    assert cos.min() > 0.999


def test_gguf_qwen2_not_permuted(tmp_path):
    """qwen2 GGUFs keep Hugging Face's Q/K row order (llama.cpp permutes only arch llama)."""
    model = tiny_model("qwen2", seed=4)
    ref = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", types={"attn_q": T.Q8_0, "attn_k": T.F32})
    out = convert(tmp_path / "q.gguf", tmp_path / "m", name="q", options=ConvertOptions(quant="f32"), progress=False)
    manifest, dense, _ = read_model(out)
    assert manifest["arch"]["arch"] == "qwen2" and manifest["arch"]["attn_bias"]
    np.testing.assert_array_equal(dense["blk.0.attn_k"], ref["blk.0.attn_k"])
    np.testing.assert_array_equal(dense["blk.0.attn_q.bias"], ref["blk.0.attn_q.bias"])
    assert (np.abs(dense["blk.1.attn_q"] - ref["blk.1.attn_q"]) <= block_bound(ref["blk.1.attn_q"], "q8_0")).all()


def test_gguf_1bit_ffn_converts_with_the_defaults(tmp_path):
    """A Bonsai-style GGUF whose FFN is Q1_0 (block 128) pulls with the default options: the default
    expert size rounds up to a whole number of down blocks (64 -> 128)."""
    model = tiny_model("llama", seed=6, hidden_size=128, intermediate_size=384)
    path = tmp_path / "bonsai.gguf"
    write_gguf(path, model, types={"ffn_gate": T.Q1_0, "ffn_up": T.Q1_0, "ffn_down": T.Q1_0})
    out = convert(path, tmp_path / "m", name="x", options=ConvertOptions(), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["expert_layout"]["down_fmt"] == "q1_0"
    assert [e[3] for e in manifest["experts"][0]] == [128, 128, 128]
    assert manifest["provenance"]["converter"]["expert_size"] == 128
    with pytest.raises(ConvertError, match="multiples of q1_0's block of 128"):  # an explicit size is kept
        convert(path, tmp_path / "m2", name="x", options=ConvertOptions(expert_size=64), progress=False)


def _q8_gguf_with_a_q4_0_layer(tmp_path: Path, role: str) -> Path:
    """A tiny Q8_0 GGUF whose layer 1 holds `role` (ffn_gate, ffn_up, ffn_down) in Q4_0."""
    model = tiny_model("llama", seed=5)
    q8 = {"ffn_gate": T.Q8_0, "ffn_up": T.Q8_0, "ffn_down": T.Q8_0}
    write_gguf(tmp_path / "q8.gguf", model, types=q8)
    write_gguf(tmp_path / "q4.gguf", model, types={**q8, role: T.Q4_0})
    return _splice(tmp_path / "q8.gguf", tmp_path / "q4.gguf", f"blk.1.{role}.weight", tmp_path / "spliced.gguf")


def test_gguf_mixed_down_formats_kept_per_layer(tmp_path):
    """ffn_down in formats that differ between layers (a Q8_0 file with one Q4_0 layer) keeps each
    layer's own: the manifest names them per layer (version 5), each bundle's down part is the file's
    bytes, nothing is requantized and no note says otherwise."""
    mixed = _q8_gguf_with_a_q4_0_layer(tmp_path, "ffn_down")
    out = convert(mixed, tmp_path / "m", name="x", options=ConvertOptions(quant="q8_0"), progress=False)
    manifest, dense, bundles = read_model(out)
    assert manifest["version"] == fmt.DOWN_FMTS_VERSION
    assert manifest["expert_layout"]["down_fmts"] == ["q8_0", "q4_0"]
    assert manifest["expert_layout"]["down_fmt"] == "q8_0"  # the widest: sizes taken from it are upper bounds
    assert not any("requantized" in n for n in manifest.get("notes", []))
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(mixed)).tensors}
    for layer, (fmt_name, block) in enumerate((("q8_0", 34), ("q4_0", 18))):
        down, s = raw[f"blk.{layer}.ffn_down.weight"], 0
        for b in bundles[layer]:
            assert b.down.fmt == fmt_name
            np.testing.assert_array_equal(b.down.data, down[:, s // 32 * block:(s + b.n_neurons) // 32 * block].reshape(-1))
            s += b.n_neurons


def test_gguf_mixed_gate_formats_share_one_layout(tmp_path):
    """Gate (or up) formats that differ between layers are brought to options.quant, with a note."""
    mixed = _q8_gguf_with_a_q4_0_layer(tmp_path, "ffn_gate")
    out = convert(mixed, tmp_path / "m", name="x", options=ConvertOptions(quant="q8_0"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["expert_layout"]["gate_fmt"] == "q8_0" and "down_fmts" not in manifest["expert_layout"]
    assert manifest["version"] == fmt.FORMAT_VERSION  # a uniform layout: what older fic reads
    assert any("differ between layers" in n and "1 Q4_0" in n for n in manifest["notes"])


def _q4_k_m_gguf(tmp_path: Path, model) -> Path:
    """A GGUF shaped like llama.cpp's Q4_K_M: K-quants throughout, ffn_down Q6_K in layer 0 and Q4_K
    in layer 1 (Q4_K_M gives some layers' ffn_down more bits)."""
    write_gguf(tmp_path / "q6.gguf", model, types=K_TYPES)
    write_gguf(tmp_path / "q4.gguf", model, types={**K_TYPES, "ffn_down": T.Q4_K})
    return _splice(tmp_path / "q6.gguf", tmp_path / "q4.gguf", "blk.1.ffn_down.weight", tmp_path / "k_m.gguf")


def test_gguf_q4_k_m_down_kept_per_layer(tmp_path):
    """A Q4_K_M-shaped file keeps ffn_down's Q6_K and Q4_K layers byte for byte (the default expert
    size rounds up to their block of 256); an explicit expert size of 64 joins them into
    options.quant, with a note naming both formats."""
    model = tiny_model("qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=4, seed=6)
    path = _q4_k_m_gguf(tmp_path, model)
    out = convert(path, tmp_path / "m", name="k", progress=False)
    manifest, dense, bundles = read_model(out)
    assert manifest["expert_layout"]["down_fmts"] == ["q6_k", "q4_k"]
    assert manifest["provenance"]["converter"]["expert_size"] == 256
    assert manifest.get("notes", []) == []
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    for layer, block in enumerate((210, 144)):
        down = raw[f"blk.{layer}.ffn_down.weight"]
        for b, s in zip(bundles[layer], (0, 256)):
            np.testing.assert_array_equal(b.down.data, down[:, s // 256 * block:(s + 256) // 256 * block].reshape(-1))
    small = convert(path, tmp_path / "m64", name="k", options=ConvertOptions(expert_size=64), progress=False)
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["expert_layout"]["down_fmt"] == "q8_0" and "down_fmts" not in manifest["expert_layout"]
    (note,) = manifest["notes"]
    assert "expert size 64 is not a multiple of q4_k/q6_k's block of 256" in note


def test_gguf_q4_k_m_logits_match_the_file(tmp_path):
    """The per-layer down formats computed as the file holds them: fic's logits against torch running
    the file's dequantized weights (gguf package), all resident and with the experts streamed
    through a budget below the model's size; the streamed run matches the resident one."""
    from flashinfer_cli.engine import Engine

    # 12 experts of 256 a layer: more than one huge page of arena holds, so a budget can stream
    model = tiny_model("llama", hidden_size=256, intermediate_size=3072, num_attention_heads=4,
                       num_key_value_heads=2, seed=8)
    path = _q4_k_m_gguf(tmp_path, model)
    out = convert(path, tmp_path / "m", name="k", progress=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, 24)]
    with torch.no_grad():
        load_gguf_weights(model, path)
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    eng = Engine.open(str(out), ctx=64, kv_dtype="f32")
    with kernels.prefill_mode("exact"):
        fic = np.asarray(eng.forward(ids), dtype=np.float64)
    assert np.abs(fic - ref).max() / np.abs(ref).max() < 1e-4
    full, _ = make_engine_plan(out, mem="64G", ctx=64)
    mem = full.fixed_bytes + HUGE_PAGE
    streamed = Engine.open(str(out), ctx=64, kv_dtype="f32", mem=mem, mode="exact")
    assert eng.plan.all_resident and not streamed.plan.all_resident
    assert np.array_equal(streamed.forward(ids), eng.forward(ids))
    a = eng.forward(ids)[-1]
    for _ in range(4):  # decode: the fused all-layers call against the streaming runner
        tok = int(np.argmax(a))
        a, b = eng._step([tok]), streamed._step([tok])
        assert np.array_equal(a, b)
    assert streamed.stats()["request"]["streamed"] > 0
def _splice(base: Path, other: Path, name: str, dest: Path) -> Path:
    """A GGUF with base's tensors except `name`, taken from other."""
    rb, ro = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(other))
    w = gguf.GGUFWriter(str(dest), "llama")
    for key, field in rb.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in rb.tensors:
        src = next(x for x in ro.tensors if x.name == name) if t.name == name else t
        w.add_tensor(t.name, np.asarray(src.data), raw_dtype=src.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# ---- the real SmolLM2 GGUF ------------------------------------------------------------------

# smollm2_gguf: conftest.py (the catalog's pip source, downloaded once and verified)

def test_smollm2_gguf(tmp_path, smollm2_gguf):
    out = convert(smollm2_gguf, tmp_path / "smol", name="smollm2-135m", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    reader = gguf.GGUFReader(str(smollm2_gguf))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = manifest["arch"]
    assert arch["arch"] == meta["general.architecture"] == "llama"
    assert (arch["n_layers"], arch["d_model"], arch["d_ff"], arch["n_heads"], arch["n_kv_heads"]) == \
        (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
         meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (30, 576, 1536, 9, 3)
    assert arch["head_dim"] == meta["llama.rope.dimension_count"] == 64
    assert arch["rope_theta"] == meta["llama.rope.freq_base"] == 1e5
    assert arch["norm_eps"] == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"])
    assert arch["max_ctx"] == meta["llama.context_length"]
    assert arch["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert arch["tie_embeddings"] and arch["rope_scaling"] is None
    assert manifest["provenance"]["sha256"] == {SMOLLM2_FILE: SMOLLM2_SHA256}
    assert manifest["notes"] == []  # nothing requantized: Q8_0, Q4_1 and F32 are all kept
    assert manifest["expert_layout"]["gate_fmt"] == manifest["expert_layout"]["down_fmt"] == "q4_1"
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    with fmt.ModelReader(out) as r:
        assert r.dense_tensor("token_embd").fmt == "q8_0"
        np.testing.assert_array_equal(r.dense_tensor("token_embd").data, raw["token_embd.weight"].reshape(-1))
        for layer in (0, 17, 29):
            entries = r.manifest.experts[layer]
            assert [e.n_neurons for e in entries] == [64] * 24
            bundles = r.read_bundles([(layer, e) for e in range(24)],
                                     [kernels.aligned_buffer(r.bundle_bytes(layer, e)) for e in range(24)])
            gate, up, down = (raw[f"blk.{layer}.ffn_{p}.weight"] for p in ("gate", "up", "down"))
            for e, b in enumerate(bundles):  # Q4_1: 32 weights in 20 bytes
                n0, n1 = 64 * e, 64 * (e + 1)
                assert bytes(b.gate.data) == gate[n0:n1].tobytes()
                assert bytes(b.up.data) == up[n0:n1].tobytes()
                assert bytes(b.down.data) == np.ascontiguousarray(down[:, n0 // 32 * 20:n1 // 32 * 20]).tobytes()
            q = r.dense_tensor(f"blk.{layer}.attn_q")
            assert bytes(q.data) == unpermuted_q_bytes(reader, f"blk.{layer}.attn_q.weight", 9).tobytes()
            k = r.dense_tensor(f"blk.{layer}.attn_k")
            assert bytes(k.data) == unpermuted_q_bytes(reader, f"blk.{layer}.attn_k.weight", 3).tobytes()


# ---- errors ---------------------------------------------------------------------------------

def test_unsupported_hf_architecture(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConvertError, match="GPT2LMHeadModel") as exc:
        convert(src, tmp_path / "m", name="x", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m").exists()


def test_sliding_window_refused(tmp_path):
    model = tiny_model("mistral")
    save_hf(model, tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["sliding_window"] = 32
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="sliding-window"):
        convert(tmp_path / "src", tmp_path / "m", name="x", progress=False)


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConvertError, match="'gpt2'"):
        convert(tmp_path / "g.gguf", tmp_path / "m", name="x", progress=False)


def gguf_cuts(path: Path) -> dict[str, tuple[int, str]]:
    """Where to cut the GGUF file at `path`, by what the cut falls inside: (bytes kept, the message
    expected). The gguf package slices a memory map, so unchecked, each gave numpy's words instead."""
    data = path.read_bytes()
    reader = gguf.GGUFReader(str(path))
    first, last = reader.tensors[0], reader.tensors[-1]
    kv = data.index(b"tokenizer.ggml.tokens") + 40          # inside the token list
    info = data.index(b"blk.1.ffn_down.weight", 0, reader.data_offset) + 5  # a tensor's name in its info

    def tensor(t, cut: int) -> tuple[int, str]:
        a, b = t.data_offset, t.data_offset + t.n_bytes
        return cut, f"truncated: tensor '{t.name}' needs bytes {a}..{b}, the file has {cut}"
    return {
        "header": (10, r"truncated: the GGUF header needs bytes \d+\.\.\d+, the file has 10$"),
        "metadata": (kv, rf"truncated: the metadata needs bytes \d+\.\.\d+, the file has {kv}( \(the header claims .*\))?$"),
        "tensor info": (info, rf"truncated: the metadata needs bytes \d+\.\.\d+, the file has {info}$"),
        "before the data": (reader.data_offset, tensor(first, reader.data_offset)[1]),
        "first tensor's data": tensor(first, first.data_offset + 100),
        "last tensor's data": tensor(last, len(data) - 1),
    }


@pytest.mark.parametrize("where", ["header", "metadata", "tensor info", "before the data",
                                   "first tensor's data", "last tensor's data"])
def test_truncated_gguf(tmp_path, where):
    write_gguf(tmp_path / "full.gguf", tiny_model("llama"))
    keep, message = gguf_cuts(tmp_path / "full.gguf")[where]
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "full.gguf").read_bytes()[:keep])
    with pytest.raises(ConvertError, match="cut.gguf: " + message) as exc:
        convert(tmp_path / "cut.gguf", tmp_path / "m", name="x", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m").exists()


def test_empty_gguf(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ConvertError, match="empty.gguf: truncated: the file is empty"):
        convert(tmp_path / "empty.gguf", tmp_path / "m", name="x", progress=False)


def test_truncated_safetensors_checkpoint(tmp_path):
    save_hf(tiny_model("llama"), tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    header, base = fmt.safetensors_header(path)
    name, info = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1])  # the last tensor
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    a, b = (base + o for o in info["data_offsets"])
    with pytest.raises(ConvertError, match=f"model.safetensors: truncated: tensor '{name}' needs bytes {a}..{b}, "
                                           f"the file has {size - 10}$"):
        convert(tmp_path / "src", tmp_path / "m", name="x", progress=False)


def test_safetensors_checkpoint_tensor_of_the_wrong_size(tmp_path):
    """data_offsets that do not hold dtype x shape: refused when the checkpoint opens, not as numpy's
    reshape error while converting."""
    save_hf(tiny_model("llama"), tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["model.norm.weight"]["dtype"] == "F32"
    header["model.norm.weight"]["dtype"] = "F16"  # the shape the config implies, half the bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(ConvertError, match=r"model.safetensors: tensor 'model.norm.weight' has 256 bytes, F16 \[64\] needs 128$"):
        convert(tmp_path / "src", tmp_path / "m", name="x", progress=False)


def test_not_a_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ConvertError, match="junk.gguf"):
        convert(tmp_path / "junk.gguf", tmp_path / "m", name="x", progress=False)


def test_columns_need_block_multiple(tmp_path):
    save_hf(tiny_model("llama"), tmp_path / "src")
    with pytest.raises(ConvertError, match="block of 32"):
        convert(tmp_path / "src", tmp_path / "m", name="x", options=ConvertOptions(expert_size=48), progress=False)


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    save_hf(tiny_model("llama"), tmp_path / "src")
    real = fmt.ModelWriter.add_expert
    calls = []

    def add_expert(self, *args, **kwargs):  # the disk fills after a few bundles
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fmt.ModelWriter, "add_expert", add_expert)
    dest = tmp_path / "store" / "m"
    with pytest.raises(ConvertError, match="No space left"):
        convert(tmp_path / "src", dest, name="x", progress=False)
    assert len(calls) == 4
    assert not dest.exists() and list((tmp_path / "store").iterdir()) == []


def test_existing_destination(tmp_path):
    save_hf(tiny_model("llama"), tmp_path / "src")
    (tmp_path / "m").mkdir()
    with pytest.raises(ConvertError, match="already exists"):
        convert(tmp_path / "src", tmp_path / "m", name="x", progress=False)
    out = convert(tmp_path / "src", tmp_path / "m", name="x", progress=False, overwrite=True)
    assert (out / "manifest.json").is_file()


# ---- hostile GGUF headers and metadata (tests/test_fuzz.py fuzzes this reader) --------------

def _seed_gguf(tmp_path: Path):
    from _fuzz import gguf_parts, write_seed_gguf

    return gguf_parts(write_seed_gguf(tmp_path / "seed.gguf"))


def _peak(fn) -> int:
    from _fuzz import peak_heap_bytes

    return peak_heap_bytes(fn)


def _claims(kvs, tensors, data):
    """GGUF files whose header, metadata or tensor infos claim more than the file holds."""
    from _fuzz import ARR, STR, U32, gguf_bytes

    big_array = [kv for kv in kvs if kv[0] != "tokenizer.ggml.token_type"] + [("tokenizer.ggml.token_type", ARR, (U32, [1], 1 << 60))]
    big_string = kvs + [("general.name", STR, b"x")]
    t0 = tensors[0]
    return {
        "2^60 tensors": (gguf_bytes(kvs, tensors, data, counts=(1 << 60, None)), r"claims \d+ keys and 1152921504606846976 tensors"),
        "2^60 keys": (gguf_bytes(kvs, tensors, data, counts=(None, 1 << 60)), "claims 1152921504606846976 keys"),
        "array of 2^60 items": (gguf_bytes(big_array, tensors, data), "an array of 1152921504606846976 items"),
        "string of 2^60 bytes": (gguf_bytes(big_string, tensors, data).replace(
            b"general.name\x08\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00x",
            b"general.name\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10x"), r"truncated: the metadata needs bytes"),
        "tensor of 2^64 elements": (gguf_bytes(kvs, [(t0[0], [1 << 32, 1 << 32], t0[2], t0[3])] + tensors[1:], data),
                                    "truncated: tensor .* needs bytes"),
        "tensor of 2^31 dimensions": (gguf_bytes(kvs, [(t0[0], [1] * 5, t0[2], t0[3])] + tensors[1:], data),
                                      "has 5 dimensions"),
        "2^31 layers": (gguf_bytes([kv if kv[0] != "llama.block_count" else (kv[0], U32, 1 << 31) for kv in kvs],
                                   tensors, data), r"block_count is 2147483648, outside"),
        "65535 layers": (gguf_bytes([kv if kv[0] != "llama.block_count" else (kv[0], U32, 65535) for kv in kvs],
                                    tensors, data), r"65535 layers, the checkpoint \d+ tensors"),
    }


@pytest.mark.parametrize("claim", ["2^60 tensors", "2^60 keys", "array of 2^60 items", "string of 2^60 bytes",
                                   "tensor of 2^64 elements", "tensor of 2^31 dimensions", "2^31 layers", "65535 layers"])
def test_gguf_claiming_more_than_the_file_holds(tmp_path, claim):
    """Counts and sizes are checked against the file before anything is built from them: a
    header that claims 2^60 tensors is refused at once, not read until the file runs out (one
    Python object per entry), a tensor of 2^64 elements is not wrapped to a small one, 2^31
    layers are not a table of 2^31 expected shapes."""
    from flashinfer_cli.checkpoint import CheckpointError, open_checkpoint

    data, fault = _claims(*_seed_gguf(tmp_path))[claim]
    path = tmp_path / "claims.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=fault) as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value)
    assert _peak(lambda: open_checkpoint(path)) < 2 * len(data) + (2 << 20)


def _with(kvs, key, vtype, value):
    return [kv for kv in kvs if kv[0] != key] + [(key, vtype, value)]


@pytest.mark.parametrize("key,vtype,value,fault", [
    ("llama.attention.head_count", "U32", 0, "head_count is 0, outside"),             # was ZeroDivisionError
    ("llama.attention.head_count_kv", "U32", 0, "head_count_kv is 0, outside"),       # was ZeroDivisionError
    ("llama.embedding_length", "STR", b"32", "embedding_length is '32', not an integer"),  # was ValueError
    ("llama.attention.layer_norm_rms_epsilon", "F32", float("nan"), "not a finite"),
    ("llama.rope.freq_base", "F32", float("inf"), "not a finite"),
    ("llama.attention.key_length+rope.dimension_count", "U32", 15, "head_dim 15 is odd"),  # was numpy's reshape error
    ("llama.context_length", "STR", b"long", "not an integer"),
    ("general.name", "STR", b"\xff\xfe", "general.name' is unreadable"),                # was UnicodeDecodeError
    ("tokenizer.ggml.tokens", "U32", 7, "tokenizer.ggml.tokens is not a list"),        # was TypeError
    ("general.architecture", "ARR", ("U8", [1, 2]), "unsupported architecture"),
])
def test_gguf_metadata_of_the_wrong_type(tmp_path, key, vtype, value, fault):
    import _fuzz
    from _fuzz import gguf_bytes
    from flashinfer_cli.checkpoint import CheckpointError, open_checkpoint

    kvs, tensors, data = _seed_gguf(tmp_path)
    if vtype == "ARR":
        value = (getattr(_fuzz, value[0]), value[1])
    if "+" in key:  # two keys of one value
        first, second = key.split("+")
        kvs, key = _with(kvs, first, getattr(_fuzz, vtype), value), "llama." + second
    (tmp_path / "bad.gguf").write_bytes(gguf_bytes(_with(kvs, key, getattr(_fuzz, vtype), value), tensors, data))
    with pytest.raises(CheckpointError, match=fault):
        open_checkpoint(tmp_path / "bad.gguf")


def test_gguf_rope_factors_of_the_wrong_size(tmp_path):
    from _fuzz import gguf_bytes, gguf_parts, write_seed_gguf
    from flashinfer_cli.checkpoint import CheckpointError, open_checkpoint

    kvs, tensors, data = gguf_parts(write_seed_gguf(tmp_path / "rope.gguf", rope_freqs=True))
    rope = next(t for t in tensors if t[0] == "rope_freqs.weight")
    bad = [(t[0], [4], t[2], t[3]) if t is rope else t for t in tensors]  # 4 factors for a head of 16
    (tmp_path / "bad.gguf").write_bytes(gguf_bytes(kvs, bad, data))
    with pytest.raises(CheckpointError, match="rope_freqs is not 8 positive F32 factors"):
        open_checkpoint(tmp_path / "bad.gguf")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", 5, ""])
def test_hf_index_names_stay_in_the_checkpoint(tmp_path, target):
    """model.safetensors.index.json comes with a download: its file names are read inside the
    checkpoint's directory or not at all (they were joined to it as they came)."""
    from flashinfer_cli.checkpoint import CheckpointError, open_checkpoint

    save_hf(tiny_model("llama"), tmp_path / "src")
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    (tmp_path / "src" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": target}}))
    with pytest.raises(CheckpointError, match="is not a path inside"):
        open_checkpoint(tmp_path / "src")
