"""A mixture of experts' decode step in C (csrc/moe.c, kernels.MoEDecode): its routing against
moe.route (the numpy reference) for each rule, and whole models' decode logits against the numpy
step (Model.fused_moe = False) and transformers, with every expert resident, in prune mode and in
exact mode under a budget that reads misses."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels, moe

IMPLS = ["ref", "auto"]


def _case(rng, e: int, d: int, scale: float = 1.0):
    router = (scale * rng.standard_normal((e, d))).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    return router, x


def _numpy_route(rule: moe.RoutingRule, router: np.ndarray, x: np.ndarray, allowed):
    # the logits in float64, rounded once: the reference does not share the C matvec's sum order
    logits = (router.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)[None]
    coef, probs = moe.route(rule, logits, allowed)
    return coef[0], probs[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softmax,norm_topk", [("before", True), ("before", False), ("after", False)])
@pytest.mark.parametrize("mask", ["none", "wide", "narrow"])
def test_c_routing_equals_numpy_route_for_each_rule(impl, softmax, norm_topk, mask):
    """coef and probs within 1e-6 of moe.route's on 200 random tokens of 16 experts, top-4; the same
    experts picked. mask: prune mode's allowed set, wide (>= top_k experts) or narrow (fewer than
    top_k: every allowed expert runs)."""
    rng = np.random.default_rng(7)
    e, d, k = 16, 96, 4
    rule = moe.RoutingRule(e, k, softmax, norm_topk)
    worst = 0.0
    for _ in range(200):
        router, x = _case(rng, e, d, scale=0.3)
        allowed = None
        if mask != "none":
            allowed = np.zeros(e, dtype=bool)
            allowed[rng.choice(e, 8 if mask == "wide" else 3, replace=False)] = True
        ref_coef, ref_probs = _numpy_route(rule, router, x, allowed)
        coef, probs, top = kernels.moe_route(router, x, top_k=k, softmax_after=softmax == "after",
                                             norm_topk=norm_topk, allowed=allowed, impl=impl)
        np.testing.assert_array_equal(np.flatnonzero(coef), np.flatnonzero(ref_coef))
        np.testing.assert_array_equal(np.sort(top), np.flatnonzero(ref_coef))
        assert len(top) == (3 if mask == "narrow" else k)
        if allowed is not None:
            assert allowed[top].all()
        worst = max(worst, float(np.abs(coef - ref_coef).max()), float(np.abs(probs - ref_probs).max()))
        # rank order: descending probability
        assert (np.diff(probs[top]) <= 0).all()
    assert worst < 1e-6, worst


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softmax", ["before", "after"])
def test_c_routing_ties_go_to_the_lower_index_as_numpy_does(impl, softmax):
    """Exactly tied logits (identical router rows, and an all-zero input where every expert ties):
    both pick the lower indices first, as a stable sort (and torch.topk) does."""
    rng = np.random.default_rng(3)
    e, d = 8, 32
    router, x = _case(rng, e, d)
    router[5] = router[2] = router[6]  # experts 2, 5, 6 tie
    x = np.abs(x)
    router[2] = router[5] = router[6] = np.abs(router[6]) + 1.0  # and lead every other expert
    rule = moe.RoutingRule(e, 2, softmax, True)
    ref_coef, _ = _numpy_route(rule, router, x, None)
    coef, _, top = kernels.moe_route(router, x, top_k=2, softmax_after=softmax == "after", impl=impl)
    assert top.tolist() == [2, 5] and np.flatnonzero(ref_coef).tolist() == [2, 5]
    np.testing.assert_allclose(coef, ref_coef, atol=1e-7)
    # all tied: the first k
    zero = np.zeros(d, dtype=np.float32)
    ref_coef, _ = _numpy_route(moe.RoutingRule(e, 3, softmax, True), router, zero, None)
    coef, probs, top = kernels.moe_route(router, zero, top_k=3, softmax_after=softmax == "after", impl=impl)
    assert top.tolist() == [0, 1, 2] == np.flatnonzero(ref_coef).tolist()
    np.testing.assert_allclose(probs, np.full(e, 1 / e), rtol=1e-6)
    np.testing.assert_allclose(coef, ref_coef, atol=1e-7)


def test_c_routing_refuses_bad_shapes_in_one_line():
    router = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="x has shape"):
        kernels.moe_route(router, np.zeros(16, np.float32), top_k=2)
    with pytest.raises(ValueError, match="allowed"):
        kernels.moe_route(router, np.zeros(32, np.float32), top_k=2, allowed=np.ones(3, bool))
    with pytest.raises(ValueError, match="MoE shape"):
        kernels.moe_route(router, np.zeros(32, np.float32), top_k=5)  # more than the experts


# ---- whole models: the C step against the numpy step and transformers ------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_moe import FAMILIES, IDS, big_mixtral, families, hf_logits, rel, small_budget  # noqa: E402,F401

from flashinfer_cli.engine import Engine  # noqa: E402

SPLIT = 12


def _decode(eng: Engine, fused: bool) -> np.ndarray:
    """Logits of IDS: the first SPLIT as a prompt, the rest one decode step each."""
    m = eng.model
    m.fused_moe = fused
    eng.forget_context()
    got = [eng.forward(IDS[:SPLIT]).reshape(SPLIT, -1)[-1:]]
    got += [m.forward([t])[None] for t in IDS[SPLIT:]]
    return np.concatenate(got)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_decode_equals_the_numpy_step_and_transformers(family, families):
    """Every expert resident, an f32 cache (an fp16 cache would round a 1e-7 difference in a key
    into an fp16 ulp's): the C MoE step within float rounding of the numpy one (under 1e-5 of the
    logits' range; measured 2.3e-7 to 5.6e-7 over this file's model tests), both within 1e-4 of
    transformers as test_moe's checks."""
    _, hf, dest = families[family]
    eng = Engine.open(str(dest), ctx=128, kv_dtype="f32", auto_pull=False)
    assert eng.plan.all_resident
    fused, numpy_step = _decode(eng, True), _decode(eng, False)
    assert rel(fused, numpy_step) < 1e-5
    ref = hf_logits(hf, IDS)[SPLIT - 1:]
    assert rel(fused, ref) < 1e-4 and rel(numpy_step, ref) < 1e-4


def _count_calls(monkeypatch) -> dict:
    """kernels.lib with every call counted by name."""
    counts: dict = {}
    real = kernels.lib

    class Counting:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if not callable(attr):
                return attr

            def call(*a):
                counts[name] = counts.get(name, 0) + 1
                return attr(*a)
            return call

    monkeypatch.setattr(kernels, "lib", Counting())
    return counts


def test_prune_decode_is_one_moe_call_per_layer_and_equals_the_numpy_step(big_mixtral, monkeypatch):
    _, path = big_mixtral
    mem = small_budget(path, 12, mode="prune")
    eng = Engine.open(str(path), mem=mem, mode="prune", ctx=128, kv_dtype="f32", auto_pull=False)
    assert eng.plan.prune and not eng.plan.all_resident
    fused, numpy_step = _decode(eng, True), _decode(eng, False)
    assert rel(fused, numpy_step) < 1e-5
    # the fp16 cache: attention and the MoE layer are each one C call
    eng = Engine.open(str(path), mem=mem, mode="prune", ctx=128, auto_pull=False)
    eng.forward(IDS[:SPLIT])
    m = eng.model
    m.fused_moe = True
    counts = _count_calls(monkeypatch)
    before = m.arena.request.bytes_read
    m.fused_layers_moe = False
    m.forward([IDS[0]])
    n_layers = len(m.layers)
    assert counts.get("fic_moe_decode") == n_layers and counts.get("fic_decode_attn") == n_layers
    # nothing else per layer: no separate router, experts or shared-expert kernels
    assert "fic_experts_ffn_slots" not in counts and counts.get("fic_matvec", 0) <= 1  # the lm_head
    assert m.arena.request.bytes_read == before
    # the default: every layer in one C call (tests/test_decode_layers.py's MoE tests: the same bits)
    counts.clear()
    m.fused_layers_moe = True
    m.forward([IDS[1]])
    assert counts.get("fic_decode_moe_layers") == 1 and "fic_moe_decode" not in counts
    assert counts.get("fic_matvec", 0) <= 1 and m.arena.request.bytes_read == before


def test_exact_decode_under_a_budget_reads_misses_and_equals_the_numpy_step(big_mixtral):
    hf, path = big_mixtral
    eng = Engine.open(str(path), mem=small_budget(path, 10), ctx=128, kv_dtype="f32", auto_pull=False)
    assert not eng.plan.all_resident and not eng.plan.prune
    fused = _decode(eng, True)
    st = eng.stats()["request"]
    assert st["misses"] > 0 and st["predicted"] > 0 and st["predicted_right"] > 0
    numpy_step = _decode(eng, False)
    assert rel(fused, numpy_step) < 1e-5
    assert rel(fused, hf_logits(hf, IDS)[SPLIT - 1:]) < 1e-4
    eng.model.arena.check_invariants()


# ---- every layer in one C call (kernels.DecodeMoELayers) ------------------------------------

def _steps(eng: Engine, one_call: bool) -> tuple[np.ndarray, dict]:
    """Decode logits with the one-call step on or off (fp16 cache, the fused MoE step both ways),
    and the arena's bookkeeping after them."""
    m = eng.model
    m.fused_layers_moe = one_call
    eng.forget_context()
    m.forward(IDS[:SPLIT])
    a = m.arena
    a.tick, hits0 = 0, a.total.hits
    a.last_use[:] = 0
    out = np.stack([m.forward([t]) for t in IDS[SPLIT:]])
    return out, {"tick": a.tick, "last_use": a.last_use.copy(), "hits": a.total.hits - hits0,
                 "bytes": a.total.bytes_read}


def _same(make) -> Engine:
    ref_eng, eng = make(), make()
    ref, ref_book = _steps(ref_eng, False)
    got, book = _steps(eng, True)
    assert np.array_equal(got, ref)
    assert book["tick"] == ref_book["tick"] and book["hits"] == ref_book["hits"] and book["bytes"] == ref_book["bytes"]
    assert np.array_equal(book["last_use"], ref_book["last_use"])
    return eng


@pytest.mark.parametrize("mode", ["exact", "prune"])
def test_one_call_moe_decode_is_the_layer_by_layer_step_bit_for_bit(big_mixtral, mode, monkeypatch):
    """All resident (exact) and prune mode under a budget (its active sets resident): the one
    C call gives the layer-by-layer step's logits bit for bit and the same arena bookkeeping."""
    _, path = big_mixtral
    mem = "64G" if mode == "exact" else small_budget(path, 12, mode="prune")
    eng = _same(lambda: Engine.open(str(path), mem=mem, mode=mode, ctx=128, auto_pull=False))
    assert eng.model._moe_in_one_call()


def test_one_call_moe_decode_breaks_at_a_layer_that_reads(big_mixtral):
    """Exact mode under a budget without the next-layer guess (moe_prefetch off): the one call
    stops at each layer whose picks are not resident, the layer-by-layer step reads and runs them,
    and the call goes on from the next layer; logits and reads as the layer-by-layer step's."""
    _, path = big_mixtral
    mem = small_budget(path, 10)

    def make():
        e = Engine.open(str(path), mem=mem, ctx=128, auto_pull=False)
        e.model.moe_prefetch = False
        return e
    breaks = []
    real = kernels.DecodeMoELayers.run

    def run(self, l0, pos, **kw):
        reached = real(self, l0, pos, **kw)
        breaks.append(reached < self.n_layers)
        return reached
    kernels.DecodeMoELayers.run = run
    try:
        eng = _same(make)
    finally:
        kernels.DecodeMoELayers.run = real
    assert eng.model._moe_in_one_call() and any(breaks) and not all(breaks)
    eng.model.arena.check_invariants()


def test_decode_moe_layers_refuses_bad_arguments(big_mixtral):
    _, path = big_mixtral
    m = Engine.open(str(path), ctx=128, auto_pull=False).model
    ml = m._moe_layers
    with pytest.raises(ValueError, match="position"):
        ml.run(0, m.ctx)
    with pytest.raises(ValueError, match="layer"):
        ml.run(len(m.layers) + 1, 0)
    import copy
    short = copy.copy(m._moe_decode)
    short._shapes = short._shapes[:-1]
    with pytest.raises(ValueError, match="MoE layers for"):
        kernels.DecodeMoELayers(m._decode_attn, short)
