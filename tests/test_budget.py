"""The heart: the memory budget (plan.py), the arena (arena.py), selection (router.py) and streaming
(streaming.py), on the default model (SmolLM2-135M, Q4_1) held to budgets well below its size.

The references: the full model (every expert resident; itself checked against transformers and
llama.cpp in test_smollm2.py) for exact mode, the process's own peak resident memory (VmHWM,
measured in a subprocess) for the budget, and byte counts derived from the manifest for reads.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import fmt, kernels, plan as planlib, router
from flashinfer_cli.arena import Arena, ArenaFull
from flashinfer_cli.cli import cli
from flashinfer_cli.engine import Engine, make_engine_plan

HERE = Path(__file__).parent
PROMPT = "What is the capital of Germany?"
TEXT = ("The river town woke slowly. Bakers pulled the first loaves from their ovens while the ferryman "
        "checked the ropes of his boat, and a cold mist still lay over the water.")
# Peak RSS beyond --mem that the test accepts: the interpreter's own allocations while the engine
# runs (Python objects of a request: token lists, the response strings, the stats dicts, numpy's
# small temporaries), measured at 3-4 MiB on SmolLM2; 8 MiB states it with room.
RSS_MARGIN = 8 << 20


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def shape(smollm2_model) -> planlib.ModelShape:
    return planlib.ModelShape.from_manifest(fmt.parse_manifest(smollm2_model / fmt.MANIFEST_FILE))


def full_bytes(path: Path, ctx: int) -> int:
    """The model's in-memory size with everything resident at this context."""
    plan, _ = make_engine_plan(path, mem="64G", ctx=ctx)
    assert plan.all_resident
    return plan.total_bytes


def budget_for(path: Path, ctx: int, expert_fraction: float) -> int:
    """A budget whose arena holds about this fraction of the experts (beside the fixed parts)."""
    plan, _ = make_engine_plan(path, mem="64G", ctx=ctx)
    return plan.fixed_bytes + int(expert_fraction * plan.shape.n_experts * plan.slot_bytes) + 2 * planlib.HUGE_PAGE


# ---- the plan ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,n", [("512M", 512 << 20), ("1.5G", 3 << 29), ("800k", 800 << 10), ("4096", 4096),
                                    ("2GiB", 2 << 30), (" 64 m ", 64 << 20)])
def test_parse_size(text, n):
    assert planlib.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "-1G", "12Q", "1.2.3G"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        planlib.parse_size(text)


def test_parse_active():
    assert planlib.parse_active("0.5") == 0.5
    assert planlib.parse_active("300M") == 300_000_000
    assert planlib.parse_active("1.5B") == 1_500_000_000
    for bad in ("0", "1.5", "abc"):
        with pytest.raises(ValueError):
            planlib.parse_active(bad)


def test_plan_accounts_for_every_part(shape):
    p = planlib.make_plan(shape, planlib.PlanRequest(mem=150 << 20, ctx=1024))
    assert p.total_bytes <= 150 << 20
    assert p.parts["kv cache"] == 2 * 30 * 1024 * 3 * 64 * 2  # fp16 keys and values of every layer
    assert p.parts["dense block"] >= shape.dense_bytes
    assert p.n_slots * shape.slot_bytes <= p.arena_bytes
    assert not p.all_resident and 2 <= p.n_ring < p.n_slots
    assert sum(p.active_per_layer) <= p.n_slots - p.n_ring


def test_refused_budget_names_the_smallest_that_works(shape):
    with pytest.raises(planlib.BudgetError) as exc:
        planlib.make_plan(shape, planlib.PlanRequest(mem=40 << 20, ctx=1024))
    msg = str(exc.value)
    assert "\n" not in msg and "smallest budget that works" in msg
    mib = int(re.search(r"--mem (\d+)M", msg).group(1))
    plan = planlib.make_plan(shape, planlib.PlanRequest(mem=mib << 20, ctx=1024))  # works
    assert plan.total_bytes <= mib << 20
    with pytest.raises(planlib.BudgetError):
        planlib.make_plan(shape, planlib.PlanRequest(mem=(mib - 1) << 20, ctx=1024))


def test_refusal_suggests_a_smaller_context_when_the_cache_is_the_problem(shape):
    with pytest.raises(planlib.BudgetError, match=r"smaller --ctx"):
        planlib.make_plan(shape, planlib.PlanRequest(mem=120 << 20, ctx=8192))


def test_active_that_does_not_fit_is_refused_with_what_fits(shape):
    with pytest.raises(planlib.BudgetError, match=r"at most \d+"):
        planlib.make_plan(shape, planlib.PlanRequest(mem=150 << 20, ctx=1024, mode="prune", active=1.0))
    p = planlib.make_plan(shape, planlib.PlanRequest(mem=150 << 20, ctx=1024, mode="prune"))
    assert p.prune and 0 < p.active_fraction < 1  # the default: the largest that fits


def test_everything_resident_when_it_fits(shape):
    p = planlib.make_plan(shape, planlib.PlanRequest(mem=1 << 30, ctx=1024, mode="prune"))
    assert p.all_resident and not p.prune and p.n_ring == 0  # no --active: the full model
    p = planlib.make_plan(shape, planlib.PlanRequest(mem=1 << 30, ctx=1024, mode="prune", active=0.5))
    assert p.all_resident and p.prune and p.active_per_layer == [12] * 30  # --active prunes anyway


def test_cli_refuses_a_budget_in_one_line(smollm2_model):
    r = CliRunner().invoke(cli, ["run", str(smollm2_model), "--mem", "40M", "--ctx", "1024", PROMPT])
    assert r.exit_code != 0
    assert "smallest budget that works" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_show_prints_the_plan(smollm2_model):
    r = CliRunner().invoke(cli, ["show", str(smollm2_model), "--mem", "150M", "--ctx", "1024"])
    assert r.exit_code == 0, r.output
    for part in ("dense block", "kv cache", "scratch", "tokenizer", "arena", "exact mode", "prune mode",
                 "streamed from flash per token", "largest --active"):
        assert part in r.output


# ---- the arena -----------------------------------------------------------------------------

def test_arena_holds_no_more_than_its_slots_and_never_evicts_a_pinned_expert(smollm2_model):
    with fmt.ModelReader(smollm2_model) as reader:
        arena = Arena(reader, n_slots=12, n_ring=2)
        assert arena.buf.nbytes == 12 * arena.slot_bytes and arena.slot_bytes % 4096 == 0
        arena.load([(0, 0), (0, 1), (1, 5)], pin=True)
        arena.load([(2, e) for e in range(7)])                      # fills the 10 cache slots
        assert arena.n_resident == 10 and (arena.owner[arena.ring, 0] < 0).all()
        arena.touch(2, np.array([0, 1]))                             # 2/0 and 2/1 are now the most recent
        arena.load([(3, 0), (3, 1), (3, 2)])                         # evicts three, least recent first
        assert arena.n_resident == 10 and arena.request.evictions == 3
        assert all(arena.slot_of[l, e] >= 0 for l, e in [(0, 0), (0, 1), (1, 5), (2, 0), (2, 1)])
        assert [e for e in range(2, 7) if arena.slot_of[2, e] < 0] == [2, 3, 4]
        with pytest.raises(ArenaFull):                               # 3 pinned of 10: 8 would need a pinned slot
            arena.load([(4, e) for e in range(8)])
        assert all(arena.slot_of[l, e] >= 0 for l, e in [(0, 0), (0, 1), (1, 5)])
        # what a slot holds is the bundle the manifest describes, checksum and all
        s = arena.slot_of[1, 5]
        e = reader.entry(1, 5)
        from flashinfer_cli import kernels
        assert kernels.crc32c(arena.view(s, e.padded_length)) == e.crc32c


# ---- exact mode is the full model ----------------------------------------------------------

@pytest.fixture(scope="module")
def full_engine(smollm2_model):
    e = Engine.open(str(smollm2_model), ctx=256)
    assert e.plan.all_resident
    return e


def test_exact_mode_streaming_equals_the_full_model(smollm2_model, full_engine):
    mem = budget_for(smollm2_model, 256, 0.3)
    eng = Engine.open(str(smollm2_model), ctx=256, mem=mem, mode="exact")
    assert not eng.plan.all_resident and eng.plan.streamed_bytes_per_token > 0
    ids = full_engine.tokenize(TEXT)
    ref = full_engine.forward(ids)
    got = eng.forward(ids)
    # bit for bit: each expert's contribution is summed in fixed point (FIC_FFN_FIXED), so the
    # streamed pieces and the resident call add up to what one call over every expert gives
    assert np.array_equal(got, ref)                   # prefill
    st = eng.stats()["request"]
    assert st["streamed"] > 0 and st["bytes_read"] > 0
    # decode: the same tokens stepped one at a time through both, in both arithmetics: with int8
    # activations a difference of one float ulp would flip roundings and grow (1e-7 -> 1e-2 by the
    # last layer before the fixed-point sums), so equal means equal here
    nxt, a = list(ids), ref[-1]
    for mode in ("int8", "exact", "int8"):
        with kernels.decode_mode(mode):
            for _ in range(2):
                tok = int(np.argmax(a))
                a, b = full_engine._step([tok]), eng._step([tok])
                assert np.array_equal(b, a), (mode, rel(b, a))
                nxt.append(tok)
    assert eng.stats()["request"]["streamed"] > st["streamed"]  # decode streamed too


def test_exact_mode_answers_as_the_full_model(smollm2_model, full_engine):
    want = "".join(full_engine.generate(PROMPT, max_tokens=12))
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.25))
    assert "".join(eng.generate(PROMPT, max_tokens=12)) == want
    # the arena outlives the request: the same prompt again finds its pinned experts resident
    first = eng.stats()["request"]
    eng.generate_again = "".join(eng.generate(PROMPT, max_tokens=12))
    second = eng.stats()["request"]
    assert eng.generate_again == want
    assert second["hits"] > 0 and second["bytes_read"] < first["bytes_read"]


def test_policy_none_pins_nothing_and_equals_the_full_model(smollm2_model, full_engine):
    """The baseline of bench/compare.py: no per-prompt selection. A dense token needs every expert in
    turn, so nothing is kept and nothing hits: every FFN byte not resident is read, every token."""
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.3), policy="none")
    ids = full_engine.tokenize(TEXT)
    assert np.array_equal(eng.forward(ids), full_engine.forward(ids))
    st = eng.stats()["request"]
    assert eng.model.arena.n_resident == 0 and st["hits"] == 0 and st["misses"] > 0 and st["bytes_read"] > 0


# ---- prune mode ----------------------------------------------------------------------------

def test_prune_mode_second_similar_prompt_reads_at_most_half(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.8), mode="prune")
    assert eng.plan.prune and eng.plan.active_fraction >= 0.6
    "".join(eng.generate("What is the capital of Germany?", max_tokens=8))
    first = eng.stats()["request"]["bytes_read"]
    "".join(eng.generate("What is the capital of France?", max_tokens=8))
    second = eng.stats()["request"]["bytes_read"]
    assert first > 0 and second <= first / 2


def test_prune_decode_never_reads(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.8), mode="prune", reselect=0)
    ids = eng.prompt_ids(PROMPT)
    stream = eng.stream(ids, max_tokens=6)
    next(stream)                                   # the prefill: selection and its reads
    after_prefill = eng.stats()["request"]["bytes_read"]
    list(stream)
    assert eng.stats()["request"]["bytes_read"] == after_prefill


def test_prune_with_every_expert_active_is_the_full_model(smollm2_model, full_engine):
    ids = full_engine.tokenize(TEXT)
    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active=1.0)
    assert eng.plan.prune and eng.plan.all_resident
    # the same split of the tokens into batches as the reference (batches sum in another order)
    assert rel(eng.forward(ids, prompt_len=10), full_engine.forward(ids, prompt_len=10)) < 1e-6


def test_prompt_len_holds_the_set_chosen_from_the_prompt(smollm2_model, full_engine):
    ids = full_engine.tokenize(TEXT)
    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active=0.5)
    got = eng.forward(ids, prompt_len=12)
    ref = full_engine.forward(ids, prompt_len=12)
    assert rel(got[:12], ref[:12]) < 1e-5       # the prompt runs with every expert
    assert rel(got[12:], ref[12:]) > 1e-3       # the continuation with half of them
    sets = [eng.model.runner.active[l] for l in range(30)]
    assert all(len(s) == 12 for s in sets)
    # the set is GRIFFIN's top half of the prompt's statistics, computed here with numpy from the
    # full model's activations (the FFN's h, recomputed from its dequantized weights)
    scores = _griffin_scores_numpy(eng, ids[:12])
    for l in (0, 15, 29):
        assert set(sets[l].tolist()) == set(router.top_k(scores[l], 12).tolist())


def _griffin_scores_numpy(eng: Engine, ids) -> np.ndarray:
    """Expert scores from h = silu(gate x) * (up x) of every neuron, x the FFN inputs captured
    while the model runs the prompt; GRIFFIN's statistic in plain numpy."""
    from flashinfer_cli import kernels

    m = eng.model
    xs = {}
    orig = m.runner.run

    def spy(layer, x, y, **kw):
        xs[layer] = x.copy()
        return orig(layer, x, y, **kw)

    m.runner.run = spy
    m.full = True
    try:
        m.reset()
        m.forward(list(ids), all_logits=True)
    finally:
        m.runner.run = orig
        m.full = not m.plan.prune
    out = np.zeros((30, 24))
    for l in range(30):
        x = xs[l].astype(np.float64)
        hs = []
        for e in range(24):
            b = m.reader.bundle_view(np.ascontiguousarray(m.arena.view(m.arena.slot_of[l, e])), 64, l)
            g, u = kernels.dequantize(b.gate).astype(np.float64), kernels.dequantize(b.up).astype(np.float64)
            a = x @ g.T
            hs.append(a / (1 + np.exp(-a)) * (x @ u.T))
        h = np.concatenate(hs, axis=1)
        hn = h / np.linalg.norm(h, axis=1, keepdims=True)
        out[l] = np.linalg.norm(hn, axis=0).reshape(24, 64).sum(axis=1)
    return out


# ---- reselection ---------------------------------------------------------------------------

def test_reselection_reads_only_the_changed_experts(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.4), reselect=3)
    log = []
    orig = router.apply_sets

    def spy(arena, runner, sets, *, prune):
        before = arena.pinned.copy()
        resident = arena.slot_of >= 0
        bytes0 = arena.total.bytes_read
        n = orig(arena, runner, sets, prune=prune)
        new = [(l, int(e)) for l, s in enumerate(sets) for e in s if not resident[l, e]]
        log.append((before, arena.pinned.copy(), new, arena.total.bytes_read - bytes0, n))
        return n

    router.apply_sets = spy
    try:
        "".join(eng.generate(PROMPT, max_tokens=10))
    finally:
        router.apply_sets = orig
    assert eng.stats()["request"]["reselections"] >= 2
    assert len(log) >= 3                       # the prompt's selection, then the reselections
    for before, after, new, n_bytes, n_read in log:
        assert n_read == len(new)
        assert n_bytes == sum(eng.model.reader.bundle_bytes(l, e) for l, e in new)
    for before, after, new, n_bytes, n_read in log[1:]:
        changed = after & ~before
        assert len(new) <= int(changed.sum())  # nothing but changed experts is read
        assert after.sum() == before.sum()     # the set's size is kept


def test_reselect_keeps_strong_experts_and_swaps_clear_winners():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert router.reselect(np.array([0, 1, 2]), scores).tolist() == [0, 1, 2]
    assert router.reselect(np.array([0, 1, 4]), scores).tolist() == [0, 1, 2]     # 3.0 beats 1.0
    assert router.reselect(np.array([0, 1, 2]), np.array([5, 4, 3, 3.1, 1.0])).tolist() == [0, 1, 2]  # < 5%


# ---- the budget is a promise ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "prune"])
def test_peak_memory_stays_within_the_budget(smollm2_model, mode):
    full = full_bytes(smollm2_model, 1024)
    mem = int(0.75 * full)                        # well below the model's in-memory size
    opts = {"mem": mem, "ctx": 1024, "mode": mode}
    out = subprocess.run([sys.executable, str(HERE / "_rss_probe.py"), str(smollm2_model), json.dumps(opts),
                          PROMPT, "16"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FIC_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["planned"] <= mem
    assert r["workspace_grows"] == 0                  # the kernels' workspace was sized once, at open
    assert r["delta"] <= mem + RSS_MARGIN, (r["delta"], mem)
    assert r["stats"]["total"]["bytes_read"] > 0      # experts really came from flash
    if mode == "exact":
        assert "Berlin" in r["text"]


# ---- the static policy ---------------------------------------------------------------------

def test_static_policy_is_one_set_from_calibration_text(smollm2_model, tmp_path):
    """--policy static: scores gathered once over the calibration text (the standard library's
    docstrings), stored beside the model, and the same active sets for every prompt."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(smollm2_model, model)
    eng = Engine.open(str(model), ctx=512, mode="prune", active=0.5, policy="static")
    stored = router.load_static(model)
    assert stored is not None and stored.shape == (30, 24) and np.isfinite(stored).all()
    sets = [eng.model.runner.active[l].copy() for l in range(30)]
    for l in (0, 29):
        assert set(sets[l].tolist()) == set(router.top_k(stored[l], 12).tolist())
    "".join(eng.generate("What is the capital of Germany?", max_tokens=4))
    "".join(eng.generate("Write a poem about the sea.", max_tokens=4))
    assert all(np.array_equal(eng.model.runner.active[l], sets[l]) for l in range(30))
    again = Engine.open(str(model), ctx=512, mode="prune", active=0.5, policy="static")  # read back, not recomputed
    assert all(np.array_equal(again.model.runner.active[l], sets[l]) for l in range(30))


@pytest.mark.parametrize("args,words", [(["--mem", "abc"], "cannot read 'abc' as a size"),
                                        (["--active", "2"], "a fraction must be in (0, 1]")])
def test_cli_bad_budget_options_are_one_line(smollm2_model, args, words):
    r = CliRunner().invoke(cli, ["run", str(smollm2_model), *args, PROMPT])
    assert r.exit_code != 0 and words in r.output and "cannot open model" not in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---- read faults mid-request (FIC_FAULTS, see test_stream.py) --------------------------------

def _bundle_crcs(reader: fmt.ModelReader) -> dict[int, set[int]]:
    """CRC32C of every bundle (its padded bytes, as stored in a slot), by neuron count."""
    out: dict[int, set[int]] = {}
    for layer in reader.manifest.experts:
        for e in layer:
            out.setdefault(e.n_neurons, set()).add(e.crc32c)
    return out


def _resident_slots_hold_their_bundles(eng: Engine) -> int:
    arena, reader = eng.model.arena, eng.model.reader
    n = 0
    for layer in range(arena.n_layers):
        for e in arena.resident(layer):
            entry = reader.entry(layer, int(e))
            s = int(arena.slot_of[layer, e])
            assert tuple(arena.owner[s]) == (layer, int(e))
            assert kernels.crc32c(arena.view(s, entry.padded_length)) == entry.crc32c, (layer, int(e), s)
            n += 1
    assert (arena.owner[arena.ring, 0] < 0).all()
    return n


def test_a_failed_prefetch_is_dropped_unused_and_frees_the_reader(smollm2_model):
    """A prefetch whose read failed is forgotten when dropped and lands unchecked (its bytes are
    never used), so the next drop (every selection starts with one) does not wait for it again, and
    the same bundles load whole afterwards."""
    from flashinfer_cli.streaming import FFNRunner

    with fmt.ModelReader(smollm2_model) as reader:
        arena = Arena(reader, n_slots=12, n_ring=4)
        runner = FFNRunner(arena, reader.layout, max_tokens=1)
        reader._reader.set_faults("eio:count=1")
        runner._prefetch_after(0, full=True)  # layer 1's first experts, in flight
        assert runner._pending is not None
        runner.drop_prefetch()
        assert runner._pending is None and not reader._reader.busy and reader._reader.fault_hits()["eio"] == 1
        runner.drop_prefetch()
        assert arena.load([(1, 0), (1, 1)]) == 2 and _resident_count(arena) == 2


def _resident_count(arena: Arena) -> int:
    for layer in range(arena.n_layers):
        for e in arena.resident(layer):
            entry = arena.reader.entry(layer, int(e))
            assert kernels.crc32c(arena.view(int(arena.slot_of[layer, e]), entry.padded_length)) == entry.crc32c
    return arena.n_resident


_FAULT_CASES: dict = {}


def _fault_case(model: Path, mode: str) -> dict:
    """Per mode, once: the engine options, a fault-free engine's answer (forward logits of TEXT), and
    where the forward's reads are: the read operations in all, and the (first, last) operation of
    each batch read into the arena."""
    if mode in _FAULT_CASES:
        return _FAULT_CASES[mode]
    frac = 0.3 if mode == "exact" else 0.8
    opts = dict(ctx=256, mem=budget_for(model, 256, frac), mode=mode)
    clean = Engine.open(str(model), **opts)
    ids = clean.tokenize(TEXT)
    case = dict(opts=opts, ids=ids, want=clean.forward(ids))
    clean.close()
    probe = Engine.open(str(model), **opts)
    r = probe.model.reader._reader
    r.set_faults("slow:us=0")  # a rule that changes nothing, so that operations are counted
    loads = []
    real_load = probe.model.arena.load

    def counting_load(keys, *, pin=False):
        before = r.fault_hits()["ops"]
        try:
            return real_load(keys, pin=pin)
        finally:
            if r.fault_hits()["ops"] > before:
                loads.append((before + 1, r.fault_hits()["ops"]))

    probe.model.arena.load = counting_load
    probe.forward(ids)
    case.update(total=r.fault_hits()["ops"], loads=loads)
    probe.close()
    _FAULT_CASES[mode] = case
    return case


@pytest.mark.parametrize("mode,where", [("exact", "ring"), ("exact", "load"), ("prune", "load")])
def test_read_error_mid_request_fails_it_cleanly_and_the_next_one_is_right(smollm2_model, monkeypatch, mode, where):
    """An EIO injected in the middle of a request's reads (while the ring streams a layer's experts,
    or while the selected set is read into the arena): the request fails with an error naming the
    file, the bundle and its offset; no FFN ever runs on a slot whose read failed (every slot an FFN
    call uses holds a whole bundle, checked by its CRC at the call); no slot whose read failed is
    resident; the next request, faults off, answers as an engine that never saw a fault."""
    from flashinfer_cli import streaming

    case = _fault_case(smollm2_model, mode)
    opts, ids, loads = case["opts"], case["ids"], case["loads"]
    if where == "load":
        assert loads, "this request reads nothing into the arena"
        first, last = loads[0]
        nth = (first + last) // 2                    # an operation in the middle of that batch
    else:
        first_load = loads[0][0] if loads else case["total"]
        assert first_load > 8, "this request streams nothing before it loads"
        nth = first_load // 2                        # the ring, halfway through the prefill
    monkeypatch.setenv("FIC_FAULTS", f"eio:every={nth}:count=1")
    eng = Engine.open(str(smollm2_model), **opts)
    monkeypatch.delenv("FIC_FAULTS")
    crcs = _bundle_crcs(eng.model.reader)
    layout = eng.model.reader.layout
    ran = []
    real_ffn = streaming._ffn_over_slots

    def checked_ffn(lay, arena, slots, n_neurons, x, y, region):
        for s, n in zip(slots, n_neurons):
            length = fmt._align_up(sum(layout.part_bytes(int(n))))
            assert kernels.crc32c(arena.view(int(s), length)) in crcs[int(n)], f"an FFN ran on slot {s}: not a whole bundle"
        ran.append(len(slots))
        return real_ffn(lay, arena, slots, n_neurons, x, y, region)

    monkeypatch.setattr(streaming, "_ffn_over_slots", checked_ffn)
    with pytest.raises(fmt.FormatError) as info:
        eng.forward(ids)
    msg = str(info.value)
    assert re.fullmatch(rf"{re.escape(str(smollm2_model / fmt.EXPERTS_FILE))}: bundle layer \d+ expert \d+ at offset "
                        r"\d+: read failed \(Input/output error\)", msg), msg
    assert eng.model.reader._reader.fault_hits()["eio"] == 1
    assert ran  # the request got as far as some FFN calls before the failure
    in_load = any(f.name == "load" and str(f.path).endswith("arena.py") for f in info.traceback)
    assert in_load == (where == "load"), info.traceback
    # the failed bundle is not resident (no resident slot holds anything but its own whole bundle)
    l, x = map(int, re.search(r"layer (\d+) expert (\d+)", msg).groups())
    assert eng.model.arena.slot_of[l, x] < 0
    _resident_slots_hold_their_bundles(eng)
    # the next request (the one count=1 hit is spent: faults are off) is right, and what it made
    # resident too
    got = eng.forward(ids)
    assert rel(got, case["want"]) < 1e-4
    assert _resident_slots_hold_their_bundles(eng) > 0
    assert eng.model.reader._reader.fault_hits()["eio"] == 1


# ---- --verbose names the IO backend and why ------------------------------------------------

def test_verbose_says_which_io_backend_and_why(smollm2_model, monkeypatch):
    """fic run --verbose prints the engine reader's backend; io_uring refused (injected with
    FIC_FAULTS=uring_setup:EPERM, and for real by a seccomp filter in a child process) says so."""
    from test_stream import SECCOMP_PRELUDE

    args = ["run", str(smollm2_model), "--mem", str(budget_for(smollm2_model, 256, 0.5)), "--ctx", "256",
            "--max-tokens", "2", "--verbose", PROMPT]
    monkeypatch.delenv("FIC_IO", raising=False)
    monkeypatch.delenv("FIC_FAULTS", raising=False)
    with fmt.ModelReader(smollm2_model) as reader:
        plain = reader.io_description()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert f"io: {plain}\n" in r.stderr and "refused" not in r.stderr
    monkeypatch.setenv("FIC_FAULTS", "uring_setup:EPERM")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert re.search(r"^io: pread \(io_uring refused: EPERM, injected by FIC_FAULTS\), (O_DIRECT|page cache)$",
                     r.stderr, re.M), r.stderr
    monkeypatch.delenv("FIC_FAULTS")
    child = SECCOMP_PRELUDE + "\nfrom flashinfer_cli.cli import cli\ncli(sys.argv[1:])\n"
    p = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=600)
    if p.stdout.startswith("NOSECCOMP"):
        pytest.skip(f"this kernel or sandbox refuses seccomp filters: {p.stdout.strip()}")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^io: pread \(io_uring refused: EPERM\), (O_DIRECT|page cache)$", p.stderr, re.M), p.stderr


def test_cli_read_error_is_one_line_naming_file_and_offset(smollm2_model, monkeypatch):
    monkeypatch.setenv("FIC_FAULTS", "eio:every=40:count=1,short:every=3,eagain:every=4")
    r = CliRunner().invoke(cli, ["run", str(smollm2_model), "--mem", str(budget_for(smollm2_model, 256, 0.3)),
                                 "--ctx", "256", "--max-tokens", "2", PROMPT])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(rf"fic: {re.escape(str(smollm2_model / fmt.EXPERTS_FILE))}: bundle layer \d+ expert \d+ at "
                        r"offset \d+: read failed \(Input/output error\)\n", r.stderr), r.stderr
