"""Mixture-of-experts models (issue 8): the format's routing rules, conversion of tiny random
Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints made here with transformers, logits and greedy
generations against transformers, and the same under a budget small enough that experts are
missed and read during decode."""
from __future__ import annotations

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
    _edit(tmp_path / "m", lambda m: m.update(version=4))
    with pytest.raises(FormatError, match="unsupported format version 4 .*reads versions 2, 3"):
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
