"""Mixture-of-experts models (issue 8): the format's routing rules, conversion of tiny random
Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints made here with transformers, logits and greedy
generations against transformers, and the same under a budget small enough that experts are
missed and read during decode."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import fmt, kernels, moe
from flashinfer_cli.fmt import ExpertLayout, FormatError, ModelReader, ModelWriter

D = 64
E = 4
N = 32


# ---- the format ----------------------------------------------------------------------------

def _write_moe(dest: Path, rules: list[moe.RoutingRule]) -> None:
    rng = np.random.default_rng(0)
    layout = ExpertLayout(D, "f32", "f32", "f32", "columns")
    with ModelWriter(dest, name="m", arch={"arch": "llama"}, layout=layout, moe=rules,
                     provenance={"source": "/src/mixtral-tiny"}) as w:
        w.add_dense("token_embd", kernels.quantize(rng.standard_normal((8, D)).astype(np.float32), "f32"))
        for li, r in enumerate(rules):
            for name, shape in moe.expected_dense(r, li, D).items():
                w.add_dense(name, rng.standard_normal(shape).astype(np.float32))
            for _ in range(r.n_routed):
                parts = [kernels.quantize(rng.standard_normal(s).astype(np.float32), "f32") for s in ((N, D), (N, D), (D, N))]
                w.add_expert(li, *parts)


RULES = [moe.RoutingRule(E, 2), moe.RoutingRule(E, 1, norm_topk=False, shared_neurons=N, shared_gate="sigmoid")]


def test_routing_rules_round_trip(tmp_path: Path):
    _write_moe(tmp_path / "m", RULES)
    with ModelReader(tmp_path / "m") as r:
        assert r.manifest.moe == RULES
        assert json.loads((tmp_path / "m" / fmt.MANIFEST_FILE).read_text())["version"] == fmt.FORMAT_VERSION == 3


def _edit(model: Path, edit) -> None:
    p = model / fmt.MANIFEST_FILE
    raw = json.loads(p.read_text())
    edit(raw)
    p.write_text(json.dumps(raw))


@pytest.mark.parametrize("edit,fault", [
    (lambda m: m["moe"]["layers"][0].update(top_k=9), "moe layer 0: top_k 9 is more than the 4 routed experts"),
    (lambda m: m["moe"]["layers"][1].update(n_routed=3), "moe layer 1: 3 routed experts, the expert table has 4"),
    (lambda m: m["moe"]["layers"][0].update(softmax="sideways"), "moe layer 0: softmax 'sideways'"),
    (lambda m: m["moe"]["layers"][0].update(colour=1), "moe layer 0: unknown fields colour"),
    (lambda m: m["moe"]["layers"].pop(), "moe has 1 layers' rules, the expert table 2 layers"),
    (lambda m: m["tensors"].pop("blk.1.ffn_gate_inp_shexp"), "dense tensor 'blk.1.ffn_gate_inp_shexp'"),
    (lambda m: m.update(moe=[]), "moe is not an object with layers"),
])
def test_bad_routing_rules_are_refused_in_one_line(tmp_path: Path, edit, fault):
    _write_moe(tmp_path / "m", RULES)
    _edit(tmp_path / "m", edit)
    with pytest.raises(FormatError, match=fault) as info:
        ModelReader(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_version_2_is_read_as_a_dense_model_and_1_is_refused_with_the_command(tmp_path: Path):
    _write_moe(tmp_path / "m", RULES)
    _edit(tmp_path / "m", lambda m: m.update(version=2))
    assert fmt.parse_manifest(tmp_path / "m" / fmt.MANIFEST_FILE).moe is None  # version 2 knew no routing
    _edit(tmp_path / "m", lambda m: m.update(version=1))
    with pytest.raises(FormatError, match=r"format version 1 .*run `fic pull /src/mixtral-tiny --name m --force`"):
        ModelReader(tmp_path / "m")
    _edit(tmp_path / "m", lambda m: m.update(version=6))
    with pytest.raises(FormatError, match="unsupported format version 6 .*reads versions 2, 3, 4, 5"):
        ModelReader(tmp_path / "m")


# ---- routing rules -------------------------------------------------------------------------

def test_route_follows_each_rule():
    logits = np.array([[2.0, 1.0, 0.5, -1.0]], dtype=np.float32)
    p = moe.softmax(logits)[0]
    coef, probs = moe.route(moe.RoutingRule(4, 2), logits)
    np.testing.assert_allclose(coef[0], [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0], rtol=1e-6)
    coef, _ = moe.route(moe.RoutingRule(4, 2, norm_topk=False), logits)
    np.testing.assert_allclose(coef[0], [p[0], p[1], 0, 0], rtol=1e-6)
    coef, _ = moe.route(moe.RoutingRule(4, 2, softmax="after"), logits)
    np.testing.assert_allclose(coef[0], [np.exp(1) / (np.exp(1) + 1), 1 / (np.exp(1) + 1), 0, 0], rtol=1e-6)
    allowed = np.array([False, True, True, True])
    coef, _ = moe.route(moe.RoutingRule(4, 2), logits, allowed)  # top-k among the active set, renormalised
    np.testing.assert_allclose(coef[0], [0, p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2]), 0], rtol=1e-6)
    np.testing.assert_allclose(probs[0], p, rtol=1e-6)


# ---- tiny random checkpoints of each family, made with transformers -------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import VOCAB, add_gguf_tokenizer, make_tokenizer, widen_weights  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import Engine, EngineError, make_engine_plan  # noqa: E402
from flashinfer_cli.model import Model  # noqa: E402

# family -> (transformers class prefix, config keys); hidden 64, 2 layers, 8 experts of 32 neurons
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
FAMILIES = {
    "mixtral": ("Mixtral", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3Moe", dict(intermediate_size=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=True, head_dim=16)),
    "qwen2_moe": ("Qwen2Moe", dict(intermediate_size=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                   shared_expert_intermediate_size=64, norm_topk_prob=False)),
    "olmoe": ("Olmoe", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
}
IDS = [int(i) for i in np.random.default_rng(1).integers(0, VOCAB, 40)]


def make_moe_checkpoint(family: str, dest: Path, seed: int = 0, extra: dict | None = None, std: float = 0.15):
    """A random model of `family` with a tokenizer, saved in Hugging Face layout; the torch model.
    extra: config values over the family's tiny ones."""
    prefix, over = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(**{**COMMON, **over, **(extra or {})})
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    widen_weights(model, std)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    make_tokenizer(dest)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (HF dir, torch model, fic model dir converted at f32)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for fam in FAMILIES:
        hf = make_moe_checkpoint(fam, root / fam)
        dest = root / f"{fam}-fic"
        convert(root / fam, dest, name=fam, options=ConvertOptions(quant="f32"), progress=False)
        out[fam] = (root / fam, hf, dest)
    return out


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, prompt, n=32) -> list[int]:
    model.generation_config.eos_token_id = None  # all n tokens
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(m: Model, prompt, n=32) -> list[int]:
    m.reset()
    tokens = [int(np.argmax(m.forward(prompt)))]
    while len(tokens) < n:
        tokens.append(int(np.argmax(m.forward([tokens[-1]]))))
    return tokens


def decode_logits(m: Model, ids, split: int) -> np.ndarray:
    m.reset()
    first = m.forward(ids[:split], all_logits=True)
    return np.concatenate([first, np.stack([m.forward([t]) for t in ids[split:]])])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conversion_keeps_each_expert_a_bundle_and_the_rule(family, families):
    _, hf, dest = families[family]
    with ModelReader(dest) as r:
        man = r.manifest
        assert [len(layer) for layer in man.experts] == [8, 8]
        rule = man.moe[0]
        assert (rule.n_routed, rule.top_k) == (8, 2)
        assert rule.norm_topk == (family in ("mixtral", "qwen3_moe"))
        assert rule.shared_neurons == (64 if family == "qwen2_moe" else 0)
        assert rule.shared_gate == ("sigmoid" if family == "qwen2_moe" else "none")
        assert man.tensors["blk.0.ffn_gate_inp"]["fmt"] == "f32"
        # expert 5 of layer 1 is the checkpoint's expert 5, byte for byte at f32
        b = r.read_bundles([(1, 5)], [kernels.aligned_buffer(r.bundle_bytes(1, 5))])[0]
        experts = hf.model.layers[1].mlp.experts
        gate_up = experts.gate_up_proj[5].detach().numpy()
        n = gate_up.shape[0] // 2
        np.testing.assert_array_equal(kernels.dequantize(b.gate), gate_up[:n])
        np.testing.assert_array_equal(kernels.dequantize(b.up), gate_up[n:])
        np.testing.assert_array_equal(kernels.dequantize(b.down), experts.down_proj[5].detach().numpy())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_logits_and_greedy_match_transformers_everything_resident(family, families):
    _, hf, dest = families[family]
    m = Model(dest, ctx=128, kv_dtype="f32")
    ref = hf_logits(hf, IDS)
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4
    assert rel(decode_logits(m, IDS, 17), ref) < 1e-4
    assert greedy(m, IDS[:8]) == hf_greedy(hf, IDS[:8])
    assert m.arena.total.misses == 8 * 2  # the one batched read at open: nothing since


# ---- under a budget: exact mode reads its misses during decode ------------------------------

# bigger experts, so that a 2 MiB huge page of arena holds only a couple of them (f32: 768 KiB each)
BIG = dict(hidden_size=256, intermediate_size=256, num_local_experts=16, num_experts_per_tok=2, num_attention_heads=4,
           num_key_value_heads=2)


@pytest.fixture(scope="module")
def big_mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigmoe")
    torch.manual_seed(3)
    cfg = transformers.MixtralConfig(**{**COMMON, **BIG})
    hf = transformers.MixtralForCausalLM(cfg).eval()
    widen_weights(hf, 0.08)  # Mixtral has no biases
    hf.save_pretrained(root / "hf", safe_serialization=True)
    make_tokenizer(root / "hf")
    convert(root / "hf", root / "fic", name="big-mixtral", options=ConvertOptions(quant="f32"), progress=False)
    return hf, root / "fic"


@pytest.fixture(scope="module")
def big_qwen2_moe(tmp_path_factory):
    """A Qwen2-MoE with bundles of 768 KiB and a shared expert (sigmoid-gated) in the dense block."""
    root = tmp_path_factory.mktemp("bigqwen")
    torch.manual_seed(4)
    cfg = transformers.Qwen2MoeConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256,
                                         "num_experts": 16, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 256,
                                         "norm_topk_prob": False})
    hf = transformers.Qwen2MoeForCausalLM(cfg).eval()
    widen_weights(hf, 0.08)
    hf.save_pretrained(root / "hf", safe_serialization=True)
    make_tokenizer(root / "hf")
    convert(root / "hf", root / "fic", name="big-qwen2-moe", options=ConvertOptions(quant="f32"), progress=False)
    return hf, root / "fic"


def test_shared_expert_model_under_a_budget_equals_the_full_model(big_qwen2_moe):
    hf, path = big_qwen2_moe
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", auto_pull=False)
    assert not eng.plan.all_resident
    got = [eng.forward(IDS[:12])]
    got += [eng.model.forward([t])[None] for t in IDS[12:]]
    assert rel(np.concatenate(got), hf_logits(hf, IDS)) < 1e-4
    st = eng.stats()["request"]
    assert st["misses"] > 0 and st["evictions"] > 0 and st["predicted"] > 0
    eng.model.arena.check_invariants()


def small_budget(path: Path, slots: int, ctx: int = 128, mode: str = "exact") -> int:
    """The largest budget (in MiB steps) whose arena holds at most `slots` bundles."""
    from flashinfer_cli import plan as planlib

    full, _ = make_engine_plan(path, mem="64G", ctx=ctx)
    mem = full.total_bytes
    while True:
        try:
            plan, _ = make_engine_plan(path, mem=mem, ctx=ctx, mode=mode)
        except planlib.BudgetError:
            raise AssertionError(f"no budget holds {slots} slots") from None
        if plan.n_slots <= slots:
            return mem
        mem -= 1 << 20


def test_exact_mode_under_a_budget_reads_misses_and_equals_the_full_model(big_mixtral):
    hf, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", auto_pull=False)
    plan = eng.plan
    assert not plan.all_resident and plan.n_slots < 32 and eng.policy == "router"
    ref = hf_logits(hf, IDS)
    split = 12
    got = [eng.forward(IDS[:split])]
    arena = eng.model.arena
    pinned = [arena.pinned_experts(l).tolist() for l in range(2)]
    assert all(len(p) == plan.active_per_layer[l] > 0 for l, p in enumerate(pinned))
    before = arena.request.misses
    got += [eng.model.forward([t])[None] for t in IDS[split:]]
    assert rel(np.concatenate(got), ref) < 1e-4
    st = eng.stats()["request"]
    assert st["misses"] > before and st["evictions"] > 0  # decode missed experts, read them, evicted others
    assert [arena.pinned_experts(l).tolist() for l in range(2)] == pinned  # the prompt's set stayed pinned
    arena.check_invariants()
    # the prompt's set: the experts with the largest summed router probabilities
    m = Model(path, ctx=128, kv_dtype="f32")
    scores = np.zeros((2, 16))
    m.collect = lambda layer, probs: scores.__setitem__(layer, scores[layer] + probs.sum(axis=0))
    m.forward(IDS[:split])
    for l in range(2):
        assert set(pinned[l]) == set(np.argsort(-scores[l], kind="stable")[:len(pinned[l])].tolist())
    # greedy generation: the full model's (the engine's prefill chooses and pins, decode misses)
    eng2 = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", auto_pull=False)
    tokens = [int(np.argmax(eng2.forward(IDS[:8])[-1]))]
    while len(tokens) < 32:
        tokens.append(int(np.argmax(eng2.model.forward([tokens[-1]]))))
    assert tokens == hf_greedy(hf, IDS[:8])
    assert eng2.stats()["request"]["misses"] > 0


def test_exact_mode_under_a_budget_is_the_full_model_bit_for_bit(big_mixtral):
    """The routed experts are summed in fixed point (FIC_FFN_FIXED) both where every picked expert is
    resident (moe.c, the full engine's decode) and where the runner reads misses through the ring."""
    _, path = big_mixtral
    full = Engine.open(str(path), ctx=128, auto_pull=False)
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, auto_pull=False)
    assert full.plan.all_resident and not eng.plan.all_resident
    assert np.array_equal(eng.forward(IDS[:12]), full.forward(IDS[:12]))
    for t in IDS[12:]:
        assert np.array_equal(eng._step([t]), full._step([t]))
    assert eng.stats()["request"]["misses"] > 0


def test_peak_memory_stays_within_the_budget_while_misses_are_read(big_mixtral):
    import os
    import subprocess
    import sys

    _, path = big_mixtral
    mem = small_budget(path, 10)
    opts = {"mem": mem, "ctx": 128, "mode": "exact"}
    here = Path(__file__).parent
    out = subprocess.run([sys.executable, str(here / "_rss_probe.py"), str(path), json.dumps(opts), "the quick brown fox",
                          "24"], capture_output=True, text=True, timeout=600, env={**os.environ, "FIC_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["planned"] <= mem
    assert r["workspace_grows"] == 0
    assert r["delta"] <= mem + (8 << 20), (r["delta"], mem)  # test_budget's margin
    st = r["stats"]["total"]
    assert st["misses"] > st["streamed"] and st["evictions"] > 0  # decode misses read into the arena


WIDE = {"mixtral": dict(hidden_size=256, intermediate_size=256, num_local_experts=16),
        "qwen3_moe": dict(hidden_size=256, moe_intermediate_size=256, num_experts=16),
        "qwen2_moe": dict(hidden_size=256, moe_intermediate_size=256, num_experts=16, shared_expert_intermediate_size=256),
        "olmoe": dict(hidden_size=256, intermediate_size=256, num_experts=16)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_under_a_budget_that_misses_equals_transformers(family, tmp_path):
    """Every family, from its Hugging Face checkpoint (bundles of 768 KiB, so that a budget can hold
    few), with an arena of at most 6 of its 32 bundles:
    the logits and 32 greedy tokens are transformers', while decode misses and reads experts."""
    hf = make_moe_checkpoint(family, tmp_path / "hf", seed=5, extra=WIDE[family], std=0.08)
    dest = tmp_path / "fic"
    convert(tmp_path / "hf", dest, name=family, options=ConvertOptions(quant="f32"), progress=False)
    mem = small_budget(dest, 6)
    eng = Engine.open(str(dest), mem=mem, ctx=128, kv_dtype="f32", auto_pull=False)
    assert not eng.plan.all_resident and eng.plan.n_slots <= 6
    got = [eng.forward(IDS[:12])]
    got += [eng.model.forward([t])[None] for t in IDS[12:]]
    assert rel(np.concatenate(got), hf_logits(hf, IDS)) < 1e-4
    assert eng.stats()["request"]["misses"] > 0
    eng.model.arena.check_invariants()
    eng2 = Engine.open(str(dest), mem=mem, ctx=128, kv_dtype="f32", auto_pull=False)
    tokens = [int(np.argmax(eng2.forward(IDS[:8])[-1]))]
    while len(tokens) < 32:
        tokens.append(int(np.argmax(eng2.model.forward([tokens[-1]]))))
    assert tokens == hf_greedy(hf, IDS[:8])
    assert eng2.stats()["request"]["misses"] > 0


# ---- prune mode: each token's top-k among the active set ------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_mode_with_every_expert_active_is_the_full_model(family, families):
    _, hf, dest = families[family]
    eng = Engine.open(str(dest), mode="prune", active="1", ctx=128, kv_dtype="f32", auto_pull=False)
    assert eng.plan.prune and eng.model.runner.prune is False  # the selection comes with the prompt
    got = [eng.forward(IDS[:12])]
    assert eng.model.runner.prune and not eng.model.full
    got += [eng.model.forward([t])[None] for t in IDS[12:]]
    assert rel(np.concatenate(got), hf_logits(hf, IDS)) < 1e-4


def test_prune_mode_under_a_budget_never_reads_in_decode(big_mixtral):
    hf, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 12, mode="prune"), mode="prune", ctx=128, kv_dtype="f32",
                      auto_pull=False)
    k = eng.plan.active_per_layer
    assert eng.plan.prune and 2 <= k[0] < 16
    eng.forward(IDS[:12])
    arena = eng.model.arena
    before = dict(arena.request.as_dict())
    for t in IDS[12:]:
        eng.model.forward([t])
    assert arena.request.misses == before["misses"] and arena.request.bytes_read == before["bytes_read"]
    # the output is each token's top-2 among the active set, renormalised (Mixtral's rule): check one
    # token's layer-0 coefficients against the rule applied by hand
    active = eng.model.runner.active[0]
    logits = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    coef, _ = moe.route(eng.model.layers[0].rule, logits, eng.model.runner.active_mask(0))
    assert set(np.flatnonzero(coef[0])) <= set(active.tolist()) and abs(coef.sum() - 1) < 1e-6


def test_prune_reselection_rescores_from_the_window_and_reads_only_changes(big_mixtral):
    _, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 12, mode="prune"), mode="prune", ctx=128, reselect=4,
                      auto_pull=False)
    list(eng.stream(IDS[:10], max_tokens=13))
    st = eng.stats()["request"]
    assert st["reselections"] >= 2
    # a reselection reads no expert to score (the window's router probabilities): every read after the
    # prompt's selection is a changed expert, at most the pinned set per reselection
    assert st["streamed"] == 0 or st["misses"] >= st["streamed"]
    eng.model.arena.check_invariants()


def test_show_gives_routing_parameters_and_bytes_per_expert(families):
    from click.testing import CliRunner

    from flashinfer_cli.cli import cli

    _, _, dest = families["qwen2_moe"]
    out = CliRunner().invoke(cli, ["show", str(dest)])
    assert out.exit_code == 0, out.output
    assert "routing         8 routed experts, softmax, then top-2, shared expert of 64 neurons (sigmoid gate)" in out.output
    with ModelReader(dest) as r:
        length = r.entry(0, 0).length
    assert f"per expert      {length:,} bytes" in out.output
    assert "M active per token" in out.output and "prune mode: each token's top-k only among" in out.output


# ---- GGUF: llama.cpp's merged 3-D expert tensors ----------------------------------------------

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (Q/K rows of arch llama)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_moe_gguf(path: Path, family: str, hf, expert_type: str = "F32", down_types: list[str] | None = None) -> None:
    """The model as llama.cpp's converter writes it: merged (n_expert, rows, cols) expert tensors,
    ffn_gate_inp, the shared expert's _shexp tensors (its gate a vector), llama's permuted Q/K;
    expert_type: the routed experts' GGUF type (Q8_0: quantized by the gguf package); down_types:
    ffn_down_exps's per layer instead (as Q4_K_M files give some layers more bits)."""
    import gguf

    def experts(name: str, value: np.ndarray, qtype_name: str = expert_type) -> None:
        value = np.ascontiguousarray(value)
        if qtype_name == "F32":
            w.add_tensor(name, value)
        else:
            qtype = gguf.GGMLQuantizationType[qtype_name]
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    arch, cfg = GGUF_ARCH[family], hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    size = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if family != "mixtral":
        w.add_expert_feed_forward_length(size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    add_gguf_tokenizer(w, cfg.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    attn = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf_name, g in attn.items():
            wt = sd[p + f"self_attn.{hf_name}.weight"]
            if arch == "llama" and g in ("attn_q", "attn_k"):
                wt = _permute(wt, cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(b + g + ".weight", wt)
            if p + f"self_attn.{hf_name}.bias" in sd:
                w.add_tensor(b + g + ".bias", sd[p + f"self_attn.{hf_name}.bias"])
        for hf_name, g in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if p + f"self_attn.{hf_name}.weight" in sd:
                w.add_tensor(b + g + ".weight", sd[p + f"self_attn.{hf_name}.weight"])
        gate_up = sd[p + "mlp.experts.gate_up_proj"]
        w.add_tensor(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        experts(b + "ffn_gate_exps.weight", gate_up[:, :size])
        experts(b + "ffn_up_exps.weight", gate_up[:, size:])
        experts(b + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"],
                down_types[i] if down_types else expert_type)
        if family == "qwen2_moe":
            for r in ("gate", "up", "down"):
                w.add_tensor(b + f"ffn_{r}_shexp.weight", sd[p + f"mlp.shared_expert.{r}_proj.weight"])
            w.add_tensor(b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"].reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_merged_experts_convert_and_match_transformers(family, families, tmp_path):
    _, hf, hf_fic = families[family]
    write_moe_gguf(tmp_path / "m.gguf", family, hf)
    dest = convert(tmp_path / "m.gguf", tmp_path / "fic", name=family, options=ConvertOptions(quant="f32"), progress=False)
    with ModelReader(dest) as r, ModelReader(hf_fic) as h:
        assert r.manifest.moe == h.manifest.moe  # the same routing rules from llama.cpp's metadata
    m = Model(dest, ctx=128, kv_dtype="f32")
    ref = hf_logits(hf, IDS)
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4
    assert rel(decode_logits(m, IDS, 17), ref) < 1e-4
    assert greedy(m, IDS[:8]) == hf_greedy(hf, IDS[:8])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])  # llama.cpp refuses our tiny OLMoE file
def test_gguf_merged_experts_match_llama_cpp(family, families, tmp_path):
    from conftest import need_llama_cpp

    llama_cpp = need_llama_cpp()
    _, hf, _ = families[family]
    write_moe_gguf(tmp_path / "m.gguf", family, hf)
    dest = convert(tmp_path / "m.gguf", tmp_path / "fic", name=family, options=ConvertOptions(quant="f32"), progress=False)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2,
                          verbose=False)
    llm.eval(IDS)
    ref = np.array(llm.scores[:len(IDS)])
    del llm
    m = Model(dest, ctx=128, kv_dtype="f32")
    assert rel(m.forward(IDS, all_logits=True), ref) < 1e-4  # llama.cpp's own arithmetic at f32


def test_next_layer_prefetch_counts_and_keeps_the_output(big_mixtral):
    _, path = big_mixtral
    runs = {}
    for on in (False, True):
        eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", auto_pull=False)
        eng.model.moe_prefetch = on
        got = [eng.forward(IDS[:12])]
        got += [eng.model.forward([t])[None] for t in IDS[12:]]
        eng.model.arena.check_invariants()
        runs[on] = (np.concatenate(got), eng.stats()["request"])
    (off_logits, off), (on_logits, st) = runs[False], runs[True]
    np.testing.assert_array_equal(on_logits, off_logits)  # a prefetch changes what is read, not what runs
    n_decode = len(IDS) - 12
    assert off["predicted"] == off["prefetched"] == 0
    assert st["predicted"] == 2 * n_decode  # layer 1's top-2, guessed at layer 0 for every decode token
    assert 0 < st["predicted_right"] <= st["predicted"]
    assert 0 < st["prefetched"] and st["prefetch_used"] <= st["prefetched"]
    # every byte read is a miss or a prefetch (one bundle size here); a used prefetch is a hit
    slot = eng.model.arena.slot_bytes
    assert st["bytes_read"] == (st["misses"] + st["prefetched"]) * slot and off["bytes_read"] == off["misses"] * slot
    assert st["hits"] + st["misses"] == off["hits"] + off["misses"]  # the same experts ran


def test_gguf_quantized_experts_are_kept_byte_for_byte(families, tmp_path):
    """Q8_0 expert tensors (as real GGUF MoE files hold them) become bundles without requantization:
    expert j's bytes are the 3-D tensor's j-th slice; the model agrees with llama.cpp on the file."""
    import gguf

    _, hf, _ = families["mixtral"]
    write_moe_gguf(tmp_path / "m.gguf", "mixtral", hf, expert_type="Q8_0")
    dest = convert(tmp_path / "m.gguf", tmp_path / "fic", name="q8", options=ConvertOptions(quant="f32"), progress=False)
    src = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    with ModelReader(dest) as r:
        assert (r.layout.gate_fmt, r.layout.up_fmt, r.layout.down_fmt) == ("q8_0", "q8_0", "q8_0")
        assert not r.manifest.notes  # nothing requantized
        b = r.read_bundles([(1, 6)], [kernels.aligned_buffer(r.bundle_bytes(1, 6))])[0]
        for part, role in ((b.gate, "gate"), (b.up, "up"), (b.down, "down")):
            want = np.asarray(src[f"blk.1.ffn_{role}_exps.weight"].data)[6]
            np.testing.assert_array_equal(part.data, want.reshape(-1))
    m = Model(dest, ctx=128, kv_dtype="f32")
    ours = m.forward(IDS, all_logits=True)
    try:
        from conftest import need_llama_cpp
        llama_cpp = need_llama_cpp()
    except BaseException:  # a skip: the byte checks above stand alone
        return
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2,
                          verbose=False)
    llm.eval(IDS)
    ref = np.array(llm.scores[:len(IDS)])
    del llm
    # llama.cpp quantizes activations to 8 bits inside its Q8_0 products (fic's kernels multiply in f32)
    assert rel(ours, ref) < 2e-2
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_gguf_down_formats_per_layer_run_as_the_file_holds_them(big_mixtral, tmp_path):
    """ffn_down_exps in Q8_0 in layer 0 and Q4_0 in layer 1 keeps each layer's format: fic against
    torch running the file's dequantized experts (gguf package), all resident (the fused MoE decode,
    one layout per layer) and under a budget that reads misses, bit for bit the resident run."""
    import gguf

    hf, _ = big_mixtral
    write_moe_gguf(tmp_path / "m.gguf", "mixtral", hf, expert_type="Q8_0", down_types=["Q8_0", "Q4_0"])
    dest = convert(tmp_path / "m.gguf", tmp_path / "fic", name="mixed", options=ConvertOptions(quant="f32"),
                   progress=False)
    with ModelReader(dest) as r:
        assert r.layout.down_fmts == ("q8_0", "q4_0") and not r.manifest.notes
    src = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    ref_model = copy.deepcopy(hf)
    size = ref_model.config.intermediate_size
    with torch.no_grad():
        for i, layer in enumerate(ref_model.model.layers):
            def deq(role: str) -> torch.Tensor:
                t = src[f"blk.{i}.ffn_{role}_exps.weight"]
                return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
            layer.mlp.experts.gate_up_proj[:, :size] = deq("gate")
            layer.mlp.experts.gate_up_proj[:, size:] = deq("up")
            layer.mlp.experts.down_proj[:] = deq("down")
    ref = hf_logits(ref_model, IDS)
    full = Engine.open(str(dest), ctx=128, kv_dtype="f32", auto_pull=False)
    eng = Engine.open(str(dest), mem=small_budget(dest, 10), ctx=128, kv_dtype="f32", auto_pull=False)
    assert full.plan.all_resident and not eng.plan.all_resident
    split = 12
    with kernels.prefill_mode("exact"), kernels.decode_mode("exact"):  # float activations, as torch's
        got = [full.forward(IDS[:split])] + [full._step([t])[None] for t in IDS[split:]]
        assert rel(np.concatenate(got), ref) < 1e-4
        assert np.array_equal(eng.forward(IDS[:split]), got[0])
        for t, want in zip(IDS[split:], got[1:]):
            assert np.array_equal(eng._step([t]), want[0])
    assert eng.stats()["request"]["misses"] > 0
    # with the int8 activations of the default kernels the budget still changes nothing
    full.forget_context(), eng.forget_context()
    assert np.array_equal(eng.forward(IDS[:split]), full.forward(IDS[:split]))
    for t in IDS[split:split + 8]:
        assert np.array_equal(eng._step([t]), full._step([t]))


def test_exact_mode_reselection_keeps_the_full_models_output(big_mixtral):
    hf, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", reselect=4, auto_pull=False)
    got = [eng.forward(IDS[:12])]
    got += [eng._step([t])[None] for t in IDS[12:]]  # the engine's decode step: reselects every 4 tokens
    assert eng.stats()["request"]["reselections"] >= 5
    assert rel(np.concatenate(got), hf_logits(hf, IDS)) < 1e-4
    eng.model.arena.check_invariants()


@pytest.mark.parametrize("change,words", [
    (dict(mlp_only_layers=[1]), "dense MLP layers between the MoE layers"),
    (dict(num_experts_per_tok=9), "top_k 9 is more than the 8 routed experts"),
    (dict(num_experts=0), "n_routed is 0"),
])
def test_unsupported_moe_configs_are_one_line_errors(families, tmp_path, change, words):
    import shutil

    from flashinfer_cli.convert import ConvertError

    src, _, _ = families["qwen3_moe"]
    shutil.copytree(src, tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg.pop("num_local_experts", None)
    cfg.update({"num_experts": 8, **change})
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=words) as info:
        convert(tmp_path / "src", tmp_path / "out", name="x", progress=False)
    assert "\n" not in str(info.value)


def test_static_and_router_policies_refuse_the_wrong_kind_of_model(families):
    from flashinfer_cli.engine import EngineError

    _, _, dest = families["mixtral"]
    with pytest.raises(EngineError, match="policy 'static' is for dense models"):
        Engine.open(str(dest), policy="static", auto_pull=False)


def test_bench_quality_compares_the_policies_that_suit_the_model(families):
    """`fic bench --quality` on a mixture of experts compares router (the one policy that applies)
    by default, and a policy that does not apply is one line before anything is measured."""
    from click.testing import CliRunner

    from flashinfer_cli.cli import cli

    _, hf, dest = families["mixtral"]
    r = CliRunner().invoke(cli, ["bench", str(dest), "--quality", "--active", "0.5,1", "--texts", "1",
                                 "--max-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [(p["policy"], p["active"]) for p in d["points"]] == [("router", 0.5), ("router", 1.0)]
    assert d["points"][1]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)  # every expert active: the full model
    r = CliRunner().invoke(cli, ["bench", str(dest), "--quality", "--policy", "static", "--texts", "1"])
    assert r.exit_code == 1 and "measuring" not in r.stderr
    assert r.stderr.strip() == ("fic: policy 'static' does not apply: the model is a mixture of experts "
                                "(use router)"), r.stderr


def test_policy_none_pins_nothing_reads_every_miss_and_equals_the_full_model(big_mixtral):
    """The MoE-offloading baseline (bench/compare.py): no per-prompt set, the arena an LRU only."""
    hf, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", policy="none", auto_pull=False)
    assert not eng.plan.all_resident and eng.policy == "none"
    got = [eng.forward(IDS[:12])]
    got += [eng.model.forward([t])[None] for t in IDS[12:]]
    assert rel(np.concatenate(got), hf_logits(hf, IDS)) < 1e-4
    arena = eng.model.arena
    assert all(len(arena.pinned_experts(l)) == 0 for l in range(2))
    st = eng.stats()["request"]
    assert st["misses"] > 0 and st["evictions"] > 0
    arena.check_invariants()


def test_policy_none_refuses_prune_mode_and_reselection(big_mixtral):
    _, path = big_mixtral
    with pytest.raises(EngineError, match="policy none"):
        Engine.open(str(path), mem=small_budget(path, 12, mode="prune"), mode="prune", ctx=128, policy="none",
                    auto_pull=False)
    with pytest.raises(EngineError, match="policy none"):
        Engine.open(str(path), mem=small_budget(path, 10), ctx=128, policy="none", reselect=4, auto_pull=False)
