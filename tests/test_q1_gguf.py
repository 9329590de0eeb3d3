"""A Bonsai-shaped 1-bit GGUF (tests/_q1gguf.py: Qwen3 attention, every matrix Q1_0, written as raw
blocks with the gguf package), converted by fic and run teacher-forced beside llama.cpp (through
llama-cpp-python) on the same file.

Tolerances. llama.cpp rounds activations to 8 bits in every quantized product (q8_0 blocks of 32, scale
in fp16); fic's Q1_0 prefill and decode are int8 by default with the scale kept in fp32, one scale per
128 weights on the r32 layout (prefill "auto"; FIC_PREFILL=exact keeps x in fp32). On the TINY shape (2
layers, d_model 256, vocab 512, logits of |z| <= 5), measured: per-position cosine >= 0.99978, max
|fic - llama.cpp| 0.078 (int8 prefill), 0.051 (exact prefill) and 0.078 (decode); 0.059 and 0.054 when
fic rounded x per 32 too. Bounds: cosine > 0.999 and max |diff| < 0.15 (about 2x the measured); argmax
equal wherever llama.cpp's top-2 margin exceeds 0.3 (twice the diff bound, so a flip there is a real
disagreement, not a near-tie). Random logits have near-ties (median margin 0.38, smallest 0.008 here):
63 of 64 prefill and 55 of 56 decode positions agreed, every disagreement at a margin under 0.022.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import need_llama_cpp
from flashinfer_cli import Engine, kernels
from flashinfer_cli.convert import convert

from _q1gguf import TINY, write_q1_gguf

N_POS = 64
FIRST_DECODE = 8
MAX_DIFF = 0.15
MIN_COSINE = 0.999
CLEAR_MARGIN = 2 * MAX_DIFF


@pytest.fixture(scope="module")
def q1_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("q1gguf")
    gguf_path = write_q1_gguf(d / "bonsai-tiny.gguf", TINY, seed=0)
    model = convert(gguf_path, d / "model", name="bonsai-tiny", progress=False)
    return gguf_path, model


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(1)
    return [int(t) for t in rng.integers(3, TINY.vocab, N_POS)]  # no specials


def llama_logits(gguf_path, ids: list[int], first: int) -> np.ndarray:
    """llama.cpp's logits after each of ids[first:]: ids[:first] as one batch, then one token per eval
    (first = len(ids): all of them as one batch)."""
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, logits_all=True, type_k=0, type_v=0,  # f32 KV cache
                          n_threads=2, verbose=False)
    llm.eval(ids[:first])
    for t in ids[first:]:
        llm.eval([t])
    rows = np.array(llm.scores[:len(ids)])
    llm.close()
    return rows


def assert_agrees(fic: np.ndarray, ref: np.ndarray) -> None:
    cos = (fic * ref).sum(1) / np.linalg.norm(fic, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > MIN_COSINE
    assert np.abs(fic - ref).max() < MAX_DIFF
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > CLEAR_MARGIN
    assert clear.sum() >= len(ref) // 2  # the check below is not vacuous
    assert (fic.argmax(1) == ref.argmax(1))[clear].all()


def test_every_matrix_stays_q1_0(q1_model):
    """The GGUF's Q1_0 blocks are used as they are (no requantization): embedding, attention, output
    and the FFN's experts."""
    _, model = q1_model
    man = json.loads((model / "manifest.json").read_text())
    fmts = {name: t["fmt"] for name, t in man["tensors"].items() if len(t["shape"]) == 2}
    assert fmts and set(fmts.values()) == {"q1_0"}
    lay = man["expert_layout"]
    assert (lay["gate_fmt"], lay["up_fmt"], lay["down_fmt"]) == ("q1_0", "q1_0", "q1_0")


@pytest.mark.parametrize("prefill", ["auto", "exact"])
def test_prefill_teacher_forced_matches_llama_cpp(q1_model, ids, prefill):
    """The default ("auto": Q1_0's own int8 kernels, qdot.h Q1X_*) and the fp32 prefill alike."""
    gguf_path, model = q1_model
    with kernels.prefill_mode(prefill):
        fic = Engine.open(str(model), ctx=256, kv_dtype="f32").forward(ids)
    assert_agrees(fic, llama_logits(gguf_path, ids, len(ids)))


def test_decode_teacher_forced_matches_llama_cpp(q1_model, ids):
    """One token per step: fic's Q1_0 matvec kernels (int8 activations on AVX2/AVX-512)."""
    gguf_path, model = q1_model
    m = Engine.open(str(model), ctx=256, kv_dtype="f32").model
    m.reset()
    m.forward(ids[:FIRST_DECODE])
    dec = np.stack([m.forward([t]) for t in ids[FIRST_DECODE:]])
    assert_agrees(dec, llama_logits(gguf_path, ids, FIRST_DECODE)[FIRST_DECODE:])


def test_resident_matrices_take_the_r32_layout(q1_model, ids, monkeypatch):
    """Where the CPU has the r32 kernels (FIC_Q1R32=auto), attention and the output are repacked at
    open (csrc/q1r32.c), and every expert bundle as it is read into the arena. The r32 products
    (decode's matvec, prefill's tables a token at a time) sum the same integers but scale them in
    another float order (1e-7
    relative); each next product's int8 rounding of x amplifies that, as it does any summation order
    (measured here: logits 0.03 apart after 56 steps), so the two must agree as fic and llama.cpp
    must (assert_agrees), not bit for bit."""
    _, model = q1_model
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("FIC_Q1R32", mode)
        m = Engine.open(str(model), ctx=256).model
        fmts = {m.output.fmt, m.layers[0].attn_output.fmt, m.layers[0].qkv.fmt}  # (untied: the embedding stays)
        assert fmts == ({"q1_0r32"} if mode == "1" else {"q1_0"})
        assert m.r32_experts == (mode == "1") and m.runner.layout.gate_fmt == ("q1_0r32" if mode == "1" else "q1_0")
        m.reset()
        prefill = m.forward(ids[:FIRST_DECODE], all_logits=True)
        out[mode] = np.concatenate([prefill, np.stack([m.forward([t]) for t in ids[FIRST_DECODE:]])])
    assert_agrees(out["1"], out["0"])


def test_r32_bundles_streamed_give_the_resident_models_bits(q1_model, ids, monkeypatch):
    """A model whose arena holds 3 of its 8 experts (2 slots a streaming ring): the experts loaded into
    the arena and those streamed through the ring are each repacked into the r32 layout once read
    (fmt.PendingBundles), and prefill and decode equal the all-resident model's bit for bit (each
    expert's sum in fixed point, each row's value from its own group alone)."""
    import dataclasses

    from flashinfer_cli.model import Model

    _, model = q1_model
    monkeypatch.setenv("FIC_Q1R32", "1")
    full = Model(model, ctx=256)
    small = Model(model, plan=dataclasses.replace(full.plan, n_slots=5, n_ring=2, all_resident=False))
    assert full.r32_experts and small.r32_experts and full.plan.all_resident
    small.arena.load([(0, 1), (1, 2), (1, 3)])
    want, got = full.forward(ids[:FIRST_DECODE]), small.forward(ids[:FIRST_DECODE])
    assert np.array_equal(got, want)
    for t in ids[FIRST_DECODE:FIRST_DECODE + 6]:
        assert np.array_equal(small.forward([t]), full.forward([t]))
    st = small.arena.stats()["total"]
    assert st["streamed"] > 0 and st["hits"] > 0
