"""`fic synth`: random models of a real model's shape, written into the store streaming. Small ones
here (tens of millions of parameters); the shapes at scale are checked by computation only."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import kernels, moe, synth
from flashinfer_cli.cli import cli
from flashinfer_cli.store import Store

SMALL_MOE = ["--params", "50M", "--layers", "2", "--experts", "8", "--top-k", "2", "--shared", "2",
             "--vocab", "1024", "--quant", "q4_0", "--no-progress"]
SMALL_DENSE = ["--dense", "--params", "30M", "--layers", "2", "--vocab", "512", "--no-progress"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fic(*args: str):
    return CliRunner().invoke(cli, list(args))


def synth_ok(name: str, *args: str) -> Path:
    result = fic("synth", name, *args)
    assert result.exit_code == 0, result.output
    return Store().path(name)


def manifest_params(model: Path) -> tuple[int, dict]:
    """Parameters counted from the manifest's tensor shapes and expert table (not from synth's
    own arithmetic): every dense tensor but the neuron orders, and 3 x d_model x neurons a bundle."""
    man = json.loads((model / "manifest.json").read_text())
    n = sum(math.prod(t["shape"]) for t in man["tensors"].values() if t["fmt"] != "i32")
    d = man["expert_layout"]["d_model"]
    return n + sum(3 * d * e[3] for layer in man["experts"] for e in layer), man


def test_a_small_mixture_of_experts_has_the_shape_asked_for(home):
    model = synth_ok("s", *SMALL_MOE)
    params, man = manifest_params(model)
    assert abs(params / 50e6 - 1) < 0.03, params
    arch = man["arch"]
    assert arch["arch"] == "qwen3" and arch["qk_norm"] and not arch["tie_embeddings"]
    assert arch["n_heads"] % arch["n_kv_heads"] == 0 and arch["head_dim"] == 128 and arch["vocab_size"] == 1024
    neurons = {e[3] for layer in man["experts"] for e in layer}
    assert len(man["experts"]) == 2 and all(len(layer) == 8 for layer in man["experts"]) and len(neurons) == 1
    (w,) = neurons
    for rule in map(moe.RoutingRule.from_json, man["moe"]["layers"]):
        assert (rule.n_routed, rule.top_k, rule.shared_neurons, rule.norm_topk) == (8, 2, 2 * w, True)
    lay = man["expert_layout"]
    assert {lay["gate_fmt"], lay["up_fmt"], lay["down_fmt"]} == {"q4_0"}
    for name, t in man["tensors"].items():  # every matrix in --quant, routers and norms f32
        want = "f32" if len(t["shape"]) == 1 or name.endswith("ffn_gate_inp") else "q4_0"
        assert t["fmt"] == want, name
    out = fic("show", "s").output
    assert f"parameters      {params:,} " in out
    assert ("routing         8 routed experts, softmax, then top-2, renormalised, "
            f"shared expert of {2 * w} neurons") in out
    assert "quantization    q4_0 (" in out
    assert "random weights: routing on them says nothing of quality; it measures speed" in out


def test_it_runs_with_finite_logits_and_non_degenerate_routing(home, tmp_path):
    from flashinfer_cli.engine import Engine

    synth_ok("s", *SMALL_MOE)
    result = fic("run", "s", "Hello there", "--max-tokens", "8")
    assert result.exit_code == 0 and result.output.strip(), result.output
    eng = Engine.open("s", mem=None)
    try:
        logits = eng.forward(eng.tokenize("The quick brown fox jumps over the lazy dog."))
        assert np.isfinite(logits).all() and logits.std() > 0.1
        # layer 0's router over the prompt-free token embeddings: tokens choose different experts
        reader = eng.model.reader
        emb = kernels.dequantize(reader.dense_tensor("token_embd").rows(0, 64))
        x = emb / np.sqrt((emb ** 2).mean(axis=1, keepdims=True))
        coef, _ = moe.route(reader.manifest.moe[0], x @ reader.dense_tensor("blk.0.ffn_gate_inp").T)
        chosen = (coef > 0).sum(axis=0)
        assert (chosen > 0).sum() >= 6 and chosen.max() < 64, chosen
    finally:
        eng.close()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nWhat is the capital of France?\n")
    result = fic("bench", "s", "--mem", "120M", "--max-tokens", "4", "--prompts", str(prompts), "--json",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["prompts"], report


def test_dense_has_bonsai_proportions(home):
    model = synth_ok("d", *SMALL_DENSE)
    params, man = manifest_params(model)
    assert abs(params / 30e6 - 1) < 0.03 and man["moe"] is None
    arch = man["arch"]
    assert arch["d_ff"] % 128 == 0 and [len(layer) for layer in man["experts"]] == [arch["d_ff"] // 128] * 2
    assert {t["fmt"] for t in man["tensors"].values() if len(t["shape"]) == 2} == {"q1_0"}
    result = fic("run", "d", "Hi", "--max-tokens", "6")
    assert result.exit_code == 0, result.output


def test_the_shapes_at_scale():
    s = synth.derive_shape(20 * 10 ** 9, quant="q1_0")
    assert abs(s.total_params / 20e9 - 1) < 0.01 and (s.n_experts, s.top_k, s.shared) == (64, 8, 2)
    assert s.d_model % 128 == 0 and s.ffn_neurons % 128 == 0 and 2.5e9 < s.approx_bytes() < 3.1e9
    s4 = synth.derive_shape(20 * 10 ** 9, quant="q4_0")
    assert abs(s4.total_params / 20e9 - 1) < 0.01 and 10e9 < s4.approx_bytes() < 12e9
    b = synth.derive_shape(None, dense=True)  # Bonsai-8B: Qwen3-8B's dimensions exactly
    assert (b.n_layers, b.d_model, b.d_ff, b.n_heads, b.n_kv_heads, b.head_dim, b.vocab_size) == \
        (36, 4096, 12288, 32, 8, 128, 151936)
    assert 1.1e9 < b.approx_bytes() < 1.2e9


def test_a_seed_gives_the_same_bytes(home, tmp_path, monkeypatch):
    a = synth_ok("s", *SMALL_DENSE, "--seed", "7")
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "other"))
    b = synth_ok("s", *SMALL_DENSE, "--seed", "7")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "experts.bin" in files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = synth_ok("t", *SMALL_DENSE, "--seed", "8")
    assert (c / "experts.bin").read_bytes() != (a / "experts.bin").read_bytes()


def test_a_name_in_the_store_is_refused_unless_forced(home):
    model = synth_ok("s", *SMALL_DENSE)
    before = (model / "experts.bin").read_bytes()
    result = fic("synth", "s", *SMALL_DENSE)
    assert result.exit_code == 1 and result.output == \
        f"fic: 's' is already in the store ({model}); use --force to replace it\n"
    synth_ok("s", *SMALL_DENSE, "--seed", "1", "--force")
    assert (model / "experts.bin").read_bytes() != before


@pytest.mark.parametrize("args,message", [
    (["--params", "lots"], "--params 'lots': a count such as 20B, 8B or 50M"),
    (["--quant", "q8_0"], "--quant 'q8_0': choose from q1_0, q4_0"),
    (["--experts", "8", "--top-k", "9"], "--top-k 9 is more than the 8 routed experts"),
    (["--dense", "--experts", "8"], "--experts, --top-k and --shared describe a mixture of experts"),
    (["--params", "2M", "--layers", "8"], "--params 2M is too few for 8 layers"),
    (["--vocab", "100"], "--vocab 100: at least 259"),
    (["--layers", "0"], "--layers 0: at least 1"),
])
def test_bad_options_are_one_line(home, args, message):
    result = fic("synth", "x", *args, "--no-progress")
    assert result.exit_code == 1 and result.output.startswith(f"fic: {message}"), result.output
    assert result.output.count("\n") == 1
    assert Store().names() == []


def test_ctrl_c_leaves_nothing(home):
    """SIGINT to the process group (a terminal's Ctrl-C) while bundles are being written: exit 130,
    one line, no model and no work directory left in the store."""
    env = {**os.environ, "FIC_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "flashinfer_cli", "synth", "big", "--params", "3B", "--vocab",
                             "1024", "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > (1 << 20) for p in (home / "tmp").glob("synth-big-*/**/experts.bin")):
            assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it was interrupted"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["fic: interrupted; no half model or partial download was left in the store"]
    store = Store(home)
    assert store.names() == [] and list(store.tmp_dir.iterdir()) == []
    assert list(store.models_dir.iterdir()) == [] if store.models_dir.exists() else True
