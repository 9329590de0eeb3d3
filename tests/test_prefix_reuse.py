"""The KV cache between requests (Engine._prefill): a prompt that extends the previous one reuses the
cached prefix, and the answer is the one a fresh engine gives. Where each prompt chooses its active
sets (prune mode, or a budget), the reusable prefix is the previous prompt (its selection statistics
are kept): the sets and the answer are a fresh run's. On a tiny random Llama (4 experts per layer)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import make_checkpoint  # noqa: E402
from flashinfer_cli import Engine  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import PREFIX_ALIGN, EngineError  # noqa: E402
from flashinfer_cli.plan import BudgetError  # noqa: E402

MAX = 10
TURN1 = [{"role": "user", "content": "Tell me about Berlin."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-reuse")
    make_checkpoint("llama_tied", root / "hf", seed=3)
    return Path(convert(root / "hf", root / "fic", name="tiny", options=ConvertOptions(quant="f32", expert_size=32),
                        progress=False))


OPTIONS = {"exact": {}, "prune": {"mode": "prune", "active": 0.5}}


def aligned(n: int) -> int:
    """A reused prefix of n tokens as the engine cuts it (engine.PREFIX_ALIGN)."""
    return n - n % PREFIX_ALIGN


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_prefill_split_on_the_alignment_is_one_call_bit_for_bit(tiny, tmp_path_factory, quant):
    """What lets a reused prefix give what a fresh prompt gives: a prefill call that starts on a
    multiple of PREFIX_ALIGN computes every position as one call from position 0 (splits elsewhere
    may differ by float rounding, which is why the engine cuts its reuse to it)."""
    path = tiny
    if quant != "f32":
        root = tmp_path_factory.mktemp(f"tiny-{quant}")
        make_checkpoint("llama_tied", root / "hf", seed=3)
        path = Path(convert(root / "hf", root / "fic", name="tiny", progress=False,
                            options=ConvertOptions(quant=quant, expert_size=32)))
    eng = Engine.open(str(path), ctx=256)
    m = eng.model
    ids = (eng.tokenize("The quick brown fox jumps over the lazy dog near the river bank. ") * 12)[:150]

    def run(splits: list[int]) -> np.ndarray:
        m.reset()
        outs, pos = [], 0
        for n in splits:
            outs.append(m.forward(ids[pos:pos + n], all_logits=True))
            pos += n
        return np.concatenate(outs)

    whole = run([len(ids)])
    for splits in ([8, 142], [64, 86], [96, 48, 6], [PREFIX_ALIGN * 5, 110]):
        assert np.array_equal(run(splits), whole), splits
    # a budget's smaller prefill chunks: a prompt one token longer than a chunk must not end in a
    # one-token piece, which would run as a decode step (int8 activations in q4_0)
    chunk = m.prefill_chunk
    m.reset()
    want = m.forward(ids[:129])
    m.prefill_chunk = 64
    try:
        m.reset()
        assert np.array_equal(m.forward(ids[:129]), want)
    finally:
        m.prefill_chunk = chunk


def answer(engine: Engine, ids: list[int]) -> tuple[list[int], str]:
    rs = list(engine.stream(ids, max_tokens=MAX))
    return [r.token for r in rs], "".join(r.text for r in rs)


def turn2(first_answer: str) -> list[dict]:
    return TURN1 + [{"role": "assistant", "content": first_answer},
                    {"role": "user", "content": "And the river?"}]


def sets(engine: Engine) -> list[list[int]]:
    m = engine.model
    return [sorted(m.arena.pinned_experts(layer).tolist()) for layer in range(m.config.n_layers)]


@pytest.mark.parametrize("mode", list(OPTIONS))
def test_follow_up_reuses_the_cache_and_answers_as_a_fresh_engine(tiny, mode):
    eng = Engine.open(str(tiny), ctx=256, **OPTIONS[mode])
    ids1 = eng.chat_ids(TURN1)
    _, first = answer(eng, ids1)
    assert eng.last_prefix.reused == 0 and eng.last_prefix.computed == len(ids1)
    generated = len(eng._cached) - len(ids1)  # the answer's tokens decoded into the cache
    ids2 = eng.chat_ids(turn2(first))
    assert ids2[:len(ids1)] == ids1
    common = next(i for i, (a, b) in enumerate(zip(eng._cached + [-1], ids2)) if a != b)
    tokens, text = answer(eng, ids2)
    used = eng.last_prefix
    assert used.reused + used.computed == len(ids2)
    if mode == "prune":
        # each prompt chooses its sets: the previous prompt is reused, its answer runs again
        assert eng.selects and used.reused == aligned(len(ids1))
    else:
        # every expert runs: the answer's keys and values are reused too
        assert not eng.selects and common > len(ids1) and generated > 0
        assert used.reused == aligned(common)
    fresh = Engine.open(str(tiny), ctx=256, **OPTIONS[mode])
    want_tokens, want_text = answer(fresh, ids2)
    assert fresh.last_prefix.reused == 0
    assert (tokens, text) == (want_tokens, want_text)
    if mode == "prune":
        assert sets(eng) == sets(fresh)  # the selection is the fresh prompt's


# Reused keys and values were written by decode steps (matvec), a fresh prefill writes them with the
# prefill kernels (packed panels): the same products summed in another order, so with an f32 cache the
# logits agree to float rounding; an f16 cache rounds each engine's keys and values separately, and
# where the two fp32 sums straddle an fp16 rounding boundary one element moves by an fp16 ulp (2^-11
# relative): measured 2.8e-4 of the largest logit on this tiny model.
REUSE_BOUNDS = {"f32": 1e-5, "f16": 2e-3}


@pytest.mark.parametrize("kv", list(REUSE_BOUNDS))
@pytest.mark.parametrize("mode", list(OPTIONS))
def test_first_token_logits_equal_a_fresh_prefill(tiny, mode, kv):
    eng = Engine.open(str(tiny), ctx=256, kv_dtype=kv, **OPTIONS[mode])
    ids1 = eng.chat_ids(TURN1)
    _, first = answer(eng, ids1)
    ids2 = eng.chat_ids(turn2(first))
    got = eng._prefill(ids2)
    fresh = Engine.open(str(tiny), ctx=256, kv_dtype=kv, **OPTIONS[mode])
    want = fresh._prefill(ids2)
    assert eng.last_prefix.reused > 0 and fresh.last_prefix.reused == 0
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < REUSE_BOUNDS[kv]


def test_the_same_prompt_again_runs_one_token_and_keeps_its_sets(tiny):
    eng = Engine.open(str(tiny), ctx=256, **OPTIONS["prune"])
    ids = eng.chat_ids(TURN1)
    first = answer(eng, ids)
    chosen = sets(eng)
    assert answer(eng, ids) == first
    assert eng.last_prefix.reused == aligned(len(ids) - 1) and eng.last_prefix.computed == len(ids) - aligned(len(ids) - 1)
    assert sets(eng) == chosen


def test_a_prompt_that_departs_inside_the_previous_one(tiny):
    other = [{"role": "user", "content": "Tell me about Paris."}]
    for mode in OPTIONS:
        eng = Engine.open(str(tiny), ctx=256, **OPTIONS[mode])
        ids1, ids2 = eng.chat_ids(TURN1), eng.chat_ids(other)
        common = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
        answer(eng, ids1)
        got = answer(eng, ids2)
        # prune: the statistics of a part of the previous prompt are not kept: everything runs
        assert eng.last_prefix.reused == (0 if mode == "prune" else aligned(common))
        assert got == answer(Engine.open(str(tiny), ctx=256, **OPTIONS[mode]), ids2)


def test_use_active_sizes_the_next_sets(tiny):
    eng = Engine.open(str(tiny), ctx=256, **OPTIONS["prune"])
    ids = eng.chat_ids(TURN1)
    assert eng.use_active(0.25) == 0.25
    answer(eng, ids)
    assert [len(s) for s in sets(eng)] == [1, 1] and eng.stats()["active_fraction"] == 0.25
    assert eng.use_active(None) == 0.5  # the engine's own size again
    answer(eng, ids)
    assert [len(s) for s in sets(eng)] == [2, 2]
    assert eng.use_active(1.0) == 1.0  # everything resident: the arena holds every set
    with pytest.raises(ValueError, match="fraction"):
        eng.use_active("2")
    exact = Engine.open(str(tiny), ctx=256)
    with pytest.raises(EngineError, match="prune mode"):
        exact.use_active(0.5)
    assert exact.use_active(None) == 1.0


def test_use_active_refuses_what_the_arena_cannot_hold(tiny, monkeypatch):
    eng = Engine.open(str(tiny), ctx=256, **OPTIONS["prune"])
    monkeypatch.setattr(type(eng.plan), "max_active_per_layer", property(lambda self: 3))
    assert eng.use_active(0.75) == 0.75
    with pytest.raises(BudgetError, match=r"at most 3 \(0.75\)"):
        eng.use_active(1.0)


def test_static_policy_forgets_the_cache_when_the_size_changes(tiny):
    eng = Engine.open(str(tiny), ctx=256, policy="static", **OPTIONS["prune"])
    ids = eng.chat_ids(TURN1)
    answer(eng, ids)
    answer(eng, ids)
    assert eng.last_prefix.reused == aligned(len(ids) - 1)  # one set for every prompt: the whole prefix
    eng.use_active(0.25)
    got = answer(eng, ids)
    assert eng.last_prefix.reused == 0  # the cache was computed with the larger sets
    fresh = Engine.open(str(tiny), ctx=256, policy="static", mode="prune", active=0.25)
    assert got == answer(fresh, ids)
