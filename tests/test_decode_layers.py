"""A decode token through every layer in one C call (csrc/decode.c fic_decode_layers,
kernels.DecodeLayers, Model._fused_layers): the same C calls in the same order as the
layer-by-layer step (DecodeAttention.run, then the layer's prepared SlotsFFN and the fixed-point
flush), so the logits must be equal bit for bit, not close. The reference is the layer-by-layer
step of the same model (Model.fused_layers = False), itself checked against transformers and the
numpy step in tests/test_decode_model.py; the arena's bookkeeping (ticks, last use, hits) must be
what the layer-by-layer step leaves."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels
from flashinfer_cli._fic import ffi, lib
from flashinfer_cli.convert import ConvertOptions, convert
from flashinfer_cli.engine import Engine
from flashinfer_cli.model import Model

from _tiny import VOCAB, make_checkpoint

IDS = [int(i) for i in np.random.default_rng(3).integers(0, VOCAB, 40)]


def steps(m: Model, fused: bool, n_prompt: int = 12, n_steps: int = 10) -> tuple[np.ndarray, dict]:
    """Greedy decode logits after a prompt, with the one-call step on or off, and the arena's
    bookkeeping after it."""
    m.fused_layers = fused
    m.reset()
    m.arena.tick = 0
    m.arena.last_use[:] = 0
    hits0 = m.arena.total.hits
    a = m.forward(IDS[:n_prompt])
    out = []
    for _ in range(n_steps):
        a = m.forward([int(np.argmax(a))])
        out.append(a.copy())
    book = {"tick": m.arena.tick, "last_use": m.arena.last_use.copy(), "hits": m.arena.total.hits - hits0}
    return np.stack(out), book


def assert_same(m: Model) -> None:
    can = m.fused_layers
    assert can
    m._layers_held = None
    ref, ref_book = steps(m, False)
    assert m._layers_held is None  # the reference never made the fused call
    got, book = steps(m, True)
    assert m._layers_held is not None  # ... and this run did
    assert np.array_equal(got, ref)
    assert book["tick"] == ref_book["tick"] and book["hits"] == ref_book["hits"]
    assert np.array_equal(book["last_use"], ref_book["last_use"])
    m.fused_layers = can


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """layout -> a tiny llama converted to q8_0 with that down layout (columns: fixed-point sums,
    rows: straight into x)."""
    root = tmp_path_factory.mktemp("layers")
    hf = make_checkpoint("qwen3", root / "hf")
    out = {}
    for layout in ("columns", "rows"):
        dest = root / layout
        convert(root / "hf", dest, name=layout, progress=False,
                options=ConvertOptions(quant="q8_0", expert_size=32, down_layout=layout))
        out[layout] = dest
    return out


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_one_call_equals_the_layer_by_layer_step(tiny, layout, mode):
    m = Model(tiny[layout], ctx=128)
    assert m.runner.fixed == (layout == "columns")
    with kernels.decode_mode(mode):
        assert_same(m)
    m.close()


def test_smollm2_all_resident_and_pruned(smollm2_model):
    """The real model (Q4_1, columns): all resident, then prune mode at 0.5, whose active sets the
    prompt chose; a change of one layer's active set makes a new one-call step, still equal."""
    eng = Engine.open(str(smollm2_model), ctx=256, threads=2)
    assert_same(eng.model)
    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active=0.5, threads=2)
    ids = eng.tokenize("The quick brown fox jumps over the lazy dog. " * 3)
    eng.forward(ids, prompt_len=len(ids))  # the prompt chooses the active sets
    m = eng.model
    assert m.runner.prune and all(a is not None for a in m.runner.active)
    assert_same(m)
    held = m._layers_held
    r = m.runner
    r.active[3] = r.active[3][:-1].copy()  # one expert fewer in layer 3
    m.forward([5])
    assert m._layers_held is not held and m._layers_held[0][3] is not held[0][3]
    assert m._layers_held[0][4] is held[0][4]  # the other layers' prepared calls are kept
    assert_same(m)


def test_hooks_and_reads_keep_the_layer_by_layer_step(tiny, smollm2_model):
    """A collect or before_ffn hook, or a reselection window, needs Python between layers; a
    budget that streams experts needs reads: none of them takes the one-call step."""
    m = Model(tiny["columns"], ctx=128)
    m.forward(IDS[:5])
    m.collect = lambda *a: None
    m.forward([1])
    assert m._layers_held is None
    m.collect = None
    m.before_ffn = lambda *a: None
    m.forward([2])
    assert m._layers_held is None
    m.before_ffn = None
    m.forward([3])
    assert m._layers_held is not None
    m.close()
    from test_budget import budget_for
    eng = Engine.open(str(smollm2_model), ctx=256, mem=budget_for(smollm2_model, 256, 0.3), mode="exact")
    assert not eng.plan.all_resident
    eng.forward(eng.tokenize("Hello there, how are you?"))
    eng._step([42])
    assert eng.model._layers_held is None and eng.model.runner.resident_calls(True) is None


def test_decode_layers_refuses_bad_arguments(tiny):
    m = Model(tiny["columns"], ctx=128)
    m.forward(IDS[:5])
    m.forward([1])
    calls, layers, _, _ = m._layers_held
    with pytest.raises(ValueError, match="FFN calls for"):
        kernels.DecodeLayers(m._decode_attn, calls[:-1], m.runner._acc1)
    with pytest.raises(ValueError, match="acc must be"):
        kernels.DecodeLayers(m._decode_attn, calls, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="position"):
        layers.run(m.ctx)
    a = m._decode_attn
    null = ffi.NULL
    common = (a._cos, a._sin, a._k_all, a._v_all, 0, a._x, a._xn, layers._acc, *layers._scratch, a._ws_ptr,
              a._ws_bytes)
    ws = kernels.aligned_buffer(1 << 20)
    pws = ffi.from_buffer("uint8_t[]", ws)
    # a negative count, no shape, FIC_FFN_FIXED in impl (acc says it), a layer whose layout is missing
    assert lib.fic_decode_layers(null, 0, a.shape, -1, a._w_all, layers._ffn, *layers._arena, *common,
                                 pws, len(ws)) == lib.FIC_ERR_ARG
    assert lib.fic_decode_layers(null, 0, null, 1, a._w_all, layers._ffn, *layers._arena, *common,
                                 pws, len(ws)) == lib.FIC_ERR_ARG
    assert lib.fic_decode_layers(null, lib.FIC_FFN_FIXED, a.shape, 1, a._w_all, layers._ffn,
                                 *layers._arena, *common, pws, len(ws)) == lib.FIC_ERR_ARG
    bad = ffi.new("fic_ffn_slots_call[]", [{"layout": null, "slots": null, "n_neurons": null, "n_experts": 0}])
    assert lib.fic_decode_layers(null, 0, a.shape, 1, a._w_all, bad, *layers._arena, *common,
                                 pws, len(ws)) == lib.FIC_ERR_ARG
    # no layers: nothing to do
    assert lib.fic_decode_layers(null, 0, a.shape, 0, null, null, *layers._arena, *common, pws, len(ws)) == lib.FIC_OK
    m.close()
