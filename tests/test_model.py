"""The forward pass against transformers (torch CPU) on tiny random checkpoints of each architecture.

How differences are measured: rel = max |fic - ref| / max |ref| over every logit of a 40-token
sequence (one number per model, so a 1e-4 bound means every logit is within 1e-4 of the largest).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from conftest import flip_byte  # noqa: E402
from _tiny import KINDS, VOCAB, make_checkpoint  # noqa: E402
from flashinfer_cli import fmt, kernels  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.model import ContextFull, Model, rope_inv_freq  # noqa: E402

IDS = [int(i) for i in np.random.default_rng(0).integers(0, VOCAB, 40)]


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (HF dir, torch model); made once per module."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_checkpoint(kind, root / kind)) for kind in KINDS}


def fic_model(src: Path, quant: str, tmp: Path, *, layout: str = "columns", ctx: int = 128) -> Model:
    dest = tmp / f"{src.name}-{quant}-{layout}"
    if not dest.exists():
        convert(src, dest, name=src.name, options=ConvertOptions(quant=quant, expert_size=32, down_layout=layout),
                progress=False)
    return Model(dest, ctx=ctx, kv_dtype="f32")  # fp32 keys and values: parity to 1e-4


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def decode_logits(m: Model, ids, split: int) -> np.ndarray:
    """Prefill ids[:split], then decode the rest one token at a time; logits of every position."""
    m.reset()
    first = m.forward(ids[:split], all_logits=True)
    return np.concatenate([first, np.stack([m.forward([t]) for t in ids[split:]])])


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_logits_match_transformers(kind, checkpoints, tmp_path_factory):
    src, hf = checkpoints[kind]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"))
    ref = hf_logits(hf, IDS)
    assert m.forward(IDS, all_logits=True).shape == (len(IDS), VOCAB)
    m.reset()
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4  # measured 1.1e-6 .. 1.8e-6
    assert rel(decode_logits(m, IDS, 17), ref) < 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_then_decode_equals_one_shot(kind, checkpoints, tmp_path_factory):
    src, _ = checkpoints[kind]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"))
    one_shot = m.forward(IDS, all_logits=True)
    for split in (1, 5, 39):
        assert rel(decode_logits(m, IDS, split), one_shot) < 1e-5  # measured < 1e-6


def test_chunked_prefill_equals_one_pass(checkpoints, tmp_path_factory):
    src, _ = checkpoints["qwen3"]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"))
    one_pass = m.forward(IDS, all_logits=True)
    m.prefill_chunk = 7  # the plan's chunk; smaller than the plan sized the scratch for is fine
    m.reset()
    assert rel(m.forward(IDS, all_logits=True), one_pass) < 1e-5
    m.reset()
    assert rel(m.forward(IDS), one_pass[-1]) < 1e-5


def test_down_rows_layout_matches_transformers(checkpoints, tmp_path_factory):
    src, hf = checkpoints["qwen2"]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"), layout="rows")
    ref = hf_logits(hf, IDS)
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4
    assert rel(decode_logits(m, IDS, 20), ref) < 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_32_tokens_equal_transformers(kind, checkpoints, tmp_path_factory):
    src, hf = checkpoints[kind]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"))
    prompt = IDS[:8]
    hf.generation_config.eos_token_id = None  # run all 32 tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    tokens = [int(np.argmax(m.forward(prompt)))]
    while len(tokens) < 32:
        tokens.append(int(np.argmax(m.forward([tokens[-1]]))))
    assert tokens == expected


def test_llama3_rope_frequencies_match_transformers(checkpoints):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src, hf = checkpoints["llama3_rope"]
    cfg = hf.config
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    params = dict(cfg.rope_parameters)
    ours = rope_inv_freq(cfg.hidden_size // cfg.num_attention_heads, params["rope_theta"], params)
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)
    plain = rope_inv_freq(cfg.hidden_size // cfg.num_attention_heads, params["rope_theta"], None)
    assert np.abs(ours - plain).max() > 1e-3  # the scaling is really exercised


def snapped(src: Path, hf, quant: str, dest: Path):
    """The checkpoint with every matrix rounded through `quant` by the gguf package (an independent
    numpy implementation): those weights are exactly representable, so fic's quantized model holds
    the same numbers as this fp32 reference, and what remains is fic's arithmetic."""
    qtype = getattr(gguf.GGMLQuantizationType, quant.upper())
    model = type(hf)(hf.config).eval()
    model.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)))
    model.save_pretrained(dest)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dest / f)
    return model


# Bounds on (prefill rel, decode rel) against the snapped fp32 reference, with their measurements:
# FIC_PREFILL=exact (the default but where AMX tiles run these formats' int8 prefill) and FIC_DECODE=exact
# multiply in fp32 (measured 0 and 0 to fp32 rounding for q8_0, 0.9e-6-1.4e-6 for q4_0).
SNAPPED_BOUNDS = {"q8_0": (1e-4, 1e-4), "q4_0": (1e-4, 1e-4)}
# FIC_DECODE=int8 (the default) quantizes the activations to 8 bits (as llama.cpp does), which moves decode by
# 2.0-2.8% of the largest logit on these random 2-layer models (Q4_0 on AVX-512 VNNI, and every
# format on AVX2: 2.5-2.7% for q8_0), with the FFN in one fused call 1.8-3.5%; FIC_PREFILL=int8 likewise
# (measured 2.1-5.3% on AMX tiles, 2026-12-02).
INT8_DECODE_BOUND = 0.08


@pytest.mark.parametrize("quant", list(SNAPPED_BOUNDS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_quantized_matches_reference_on_same_weights(kind, quant, checkpoints, tmp_path_factory):
    src, hf = checkpoints[kind]
    tmp = tmp_path_factory.mktemp("snap")
    ref_model = snapped(src, hf, quant, tmp / kind)
    m = fic_model(tmp / kind, quant, tmp)
    ref = hf_logits(ref_model, IDS)
    prefill_bound, decode_bound = SNAPPED_BOUNDS[quant]
    with kernels.prefill_mode("exact"):
        assert rel(m.forward(IDS, all_logits=True), ref) < prefill_bound
        with kernels.decode_mode("exact"):
            assert rel(decode_logits(m, IDS, 20)[20:], ref[20:]) < decode_bound
        with kernels.decode_mode("int8"):
            assert rel(decode_logits(m, IDS, 20)[20:], ref[20:]) < INT8_DECODE_BOUND
    with kernels.prefill_mode("int8"):
        m.reset()
        assert rel(m.forward(IDS, all_logits=True), ref) < INT8_DECODE_BOUND


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_q8_0_close_to_unquantized(kind, checkpoints, tmp_path_factory):
    """Weight quantization included: q8_0 against the fp32 checkpoint (measured 0.028-0.046; these
    random models amplify weight noise several-fold, q4_0 reaches 0.55-0.75 on them)."""
    src, hf = checkpoints[kind]
    m = fic_model(src, "q8_0", tmp_path_factory.mktemp("fic"))
    ref = hf_logits(hf, IDS)
    logits = m.forward(IDS, all_logits=True)
    assert rel(logits, ref) < 0.12
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.85  # measured 0.95-0.975


def test_context_limits(checkpoints, tmp_path_factory):
    src, _ = checkpoints["llama"]
    m = fic_model(src, "f32", tmp_path_factory.mktemp("fic"), ctx=16)
    m.forward(IDS[:16])
    with pytest.raises(ContextFull):
        m.forward([1])
    m.reset()
    with pytest.raises(ValueError):
        m.forward([VOCAB])
    with pytest.raises(ValueError):
        m.forward([])


def test_corrupt_bundle_is_refused(checkpoints, tmp_path_factory):
    src, _ = checkpoints["llama"]
    tmp = tmp_path_factory.mktemp("fic")
    fic_model(src, "f32", tmp).close()
    path = tmp / f"{src.name}-f32-columns"
    flip_byte(path / fmt.EXPERTS_FILE, fmt.ALIGN + 100)
    with pytest.raises(fmt.FormatError, match="checksum"):
        Model(path)


def test_permuted_neurons_match_transformers(checkpoints, tmp_path):
    """A model written directly through fmt.ModelWriter (no converter) with each layer's FFN
    neurons shuffled and uneven expert sizes: the output is the same function."""
    from flashinfer_cli import kernels
    from flashinfer_cli.config import ArchConfig

    src, hf = checkpoints["llama"]
    cfg = hf.config
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    arch = ArchConfig(arch="llama", n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
                      n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                      head_dim=cfg.hidden_size // cfg.num_attention_heads, d_ff=cfg.intermediate_size,
                      vocab_size=cfg.vocab_size, norm_eps=cfg.rms_norm_eps, rope_theta=10000.0,
                      max_ctx=cfg.max_position_embeddings, tie_embeddings=False)
    layout = fmt.ExpertLayout(cfg.hidden_size, "f32", "f32", "f32", "rows")
    q = lambda w: kernels.quantize(np.ascontiguousarray(w, dtype=np.float32), "f32")
    rng = np.random.default_rng(1)
    with fmt.ModelWriter(tmp_path / "perm", name="perm", arch=arch.to_json(), layout=layout) as w:
        w.add_dense("token_embd", q(sd["model.embed_tokens.weight"]))
        w.add_dense("output", q(sd["lm_head.weight"]))
        w.add_dense("output_norm", sd["model.norm.weight"])
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            w.add_dense(f"blk.{i}.attn_norm", sd[p + "input_layernorm.weight"])
            w.add_dense(f"blk.{i}.ffn_norm", sd[p + "post_attention_layernorm.weight"])
            for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
                w.add_dense(f"blk.{i}.{ours}", q(sd[p + f"self_attn.{theirs}.weight"]))
            order = rng.permutation(cfg.intermediate_size)
            gate, up = sd[p + "mlp.gate_proj.weight"][order], sd[p + "mlp.up_proj.weight"][order]
            down_t = sd[p + "mlp.down_proj.weight"].T[order]
            for a, b in ((0, 16), (16, 64), (64, 96), (96, 128)):
                w.add_expert(i, q(gate[a:b]), q(up[a:b]), q(down_t[a:b]))
            w.set_neuron_order(i, order)
    m = Model(tmp_path / "perm", ctx=64, kv_dtype="f32")
    ref = hf_logits(hf, IDS)
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4
    assert rel(decode_logits(m, IDS, 30), ref) < 1e-4


def test_ffn_follows_the_active_sets(checkpoints, tmp_path_factory):
    """A layer's FFN runs the runner's active set for that layer as it is now (prune mode), and the
    other layers keep theirs; all experts again gives the full model back."""
    src, _ = checkpoints["llama"]
    tmp = tmp_path_factory.mktemp("fic")
    fic_model(src, "f32", tmp).close()
    m = Model(tmp / f"{src.name}-f32-columns", ctx=128, kv_dtype="f32")
    full = m.forward(IDS, all_logits=True)
    n0 = len(m.arena.experts(0))
    assert n0 > 1

    m.runner.prune, m.full = True, False
    m.runner.active = [None] * m.config.n_layers
    m.runner.active[0] = np.array([0])
    m.reset()
    pruned = m.forward(IDS, all_logits=True)
    assert rel(pruned, full) > 1e-3  # the dropped experts really are gone
    assert rel(decode_logits(m, IDS, 20), pruned) < 1e-5  # decode runs the same set as prefill

    m.runner.active[0] = np.arange(n0)
    m.reset()
    assert rel(m.forward(IDS, all_logits=True), full) < 1e-6


def test_fp16_kv_cache_is_within_its_rounding_of_fp32(checkpoints, tmp_path_factory):
    """The default KV cache holds keys and values in fp16: each element rounded to 11 significant
    bits (relative error <= 2^-11 = 4.9e-4). Through attention's weighted sums and two layers that
    stays within a few times that on the logits; measured 7.5e-4 on the tiny Llama."""
    src, _ = checkpoints["llama"]
    tmp = tmp_path_factory.mktemp("fic")
    fic_model(src, "f32", tmp).close()
    path = tmp / f"{src.name}-f32-columns"
    ref = Model(path, ctx=128, kv_dtype="f32")
    m = Model(path, ctx=128)
    assert m.k_cache.dtype == np.float16 and ref.k_cache.dtype == np.float32
    assert m.k_cache.nbytes * 2 == ref.k_cache.nbytes
    a, b = m.forward(IDS, all_logits=True), ref.forward(IDS, all_logits=True)
    assert 0 < rel(a, b) < 4 * 2.0 ** -11
    assert 0 < rel(decode_logits(m, IDS, 30), decode_logits(ref, IDS, 30)) < 4 * 2.0 ** -11
