"""Q1_0 expert bundles stored in the r32 order (fmt "bundle_order": "r32", format version 4): the same
1-bit GGUF (tests/_q1gguf.py) converted with its bundles as rows and in r32 order. The reference for
the r32 bytes is the repack of the rows model's bundles (whose kernel tests/test_q1r32_ffn.py checks
against numpy); for the answers, the rows model. Reading either file either way must give the same
bytes, and models over either file the same logits bit for bit."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from flashinfer_cli import fmt, kernels
from flashinfer_cli._fic import ffi, lib
from flashinfer_cli.convert import ConvertError, ConvertOptions, convert
from flashinfer_cli.model import Model

from _q1gguf import TINY, write_q1_gguf
from conftest import flip_byte


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """order -> the TINY 1-bit GGUF converted with its bundles in that order; "gguf" -> the file."""
    d = tmp_path_factory.mktemp("order")
    gguf_path = write_q1_gguf(d / "tiny.gguf", TINY, seed=0)
    out = {"gguf": gguf_path}
    for order in ("rows", "r32"):
        out[order] = convert(gguf_path, d / order, name=order, progress=False,
                             options=ConvertOptions(bundle_order=order))
    return out


def all_bundles(path, *, r32: bool) -> list[bytes]:
    reader = fmt.ModelReader(path)
    if r32:
        assert reader.use_r32()
    keys = [(li, ei) for li, layer in enumerate(reader.manifest.experts) for ei in range(len(layer))]
    lengths = [reader.manifest.experts[li][ei].length for li, ei in keys]
    dsts = [kernels.aligned_buffer(-(-n // fmt.ALIGN) * fmt.ALIGN) for n in lengths]  # reads are whole pages
    reader.read_bundles(keys, dsts)
    return [bytes(b[:n]) for b, n in zip(dsts, lengths)]


def test_manifest_says_the_order_and_version(models):
    rows = json.loads((models["rows"] / fmt.MANIFEST_FILE).read_text())
    r32 = json.loads((models["r32"] / fmt.MANIFEST_FILE).read_text())
    assert rows["version"] == 3 and "bundle_order" not in rows
    assert r32["version"] == 4 and r32["bundle_order"] == "r32"
    assert r32["expert_layout"] == rows["expert_layout"]  # the layout stays the bundles' logical one
    assert fmt.ModelReader(models["r32"]).stored_r32 and not fmt.ModelReader(models["rows"]).stored_r32


def test_stored_bytes_are_the_repacked_rows(models):
    """experts.bin of the r32 model holds each rows bundle repacked (and nothing else differs)."""
    man = fmt.ModelReader(models["rows"]).manifest
    raw_rows = (models["rows"] / fmt.EXPERTS_FILE).read_bytes()
    raw_r32 = (models["r32"] / fmt.EXPERTS_FILE).read_bytes()
    assert len(raw_rows) == len(raw_r32) and raw_rows != raw_r32
    d = man.expert_layout.d_model
    for layer in man.experts:
        for e in layer:
            want = np.frombuffer(bytearray(raw_rows[e.offset:e.offset + e.length]), dtype=np.uint8)
            kernels.q1r32_bundle(want, e.n_neurons, d)
            assert raw_r32[e.offset:e.offset + e.length] == want.tobytes()


@pytest.mark.parametrize("r32", [False, True], ids=["rows-wanted", "r32-wanted"])
def test_either_file_reads_as_the_same_bytes(models, r32):
    assert all_bundles(models["rows"], r32=r32) == all_bundles(models["r32"], r32=r32)


def test_wanted_as_stored_reads_without_moving_a_byte(models, monkeypatch):
    calls = []
    real = kernels.q1r32_bundles
    monkeypatch.setattr(kernels, "q1r32_bundles", lambda *a, **k: (calls.append(k.get("unpack")), real(*a, **k)))
    all_bundles(models["r32"], r32=True)
    all_bundles(models["rows"], r32=False)
    assert calls == []
    all_bundles(models["r32"], r32=False)
    all_bundles(models["rows"], r32=True)
    assert calls == [True, False]


@pytest.mark.parametrize("q1r32", ["1", "0"])
def test_models_over_either_file_answer_bit_for_bit(models, monkeypatch, q1r32):
    """All resident and, for the r32 file, under a budget that streams experts through the ring
    (exact mode: every expert's sum in fixed point): the rows model's logits, prefill and decode."""
    monkeypatch.setenv("FIC_Q1R32", q1r32)
    ids = [int(t) for t in np.random.default_rng(2).integers(3, TINY.vocab, 20)]
    out = {}
    for order in ("rows", "r32"):
        m = Model(models[order], ctx=128)
        assert m.r32_experts == (q1r32 == "1")
        out[order] = np.concatenate([m.forward(ids[:8], all_logits=True), np.stack([m.forward([t]) for t in ids[8:]])])
    assert np.array_equal(out["r32"], out["rows"])
    full = Model(models["r32"], ctx=128)
    small = Model(models["r32"], plan=dataclasses.replace(full.plan, n_slots=5, n_ring=2, all_resident=False))
    small.arena.load([(0, 1), (1, 2), (1, 3)])
    got = np.concatenate([small.forward(ids[:8], all_logits=True), np.stack([small.forward([t]) for t in ids[8:]])])
    assert np.array_equal(got, out["rows"])
    assert small.arena.stats()["total"]["streamed"] > 0


def test_default_order_follows_the_kernels(models, tmp_path, monkeypatch):
    """auto: r32 where this CPU's kernels read it (x86), rows with FIC_Q1R32=0 (as NEON); a model
    that is not Q1_0 stays rows, and asking r32 of it is a one-line error."""
    auto = convert(models["gguf"], tmp_path / "auto", name="auto", progress=False)
    assert fmt.ModelReader(auto).stored_r32 == kernels.q1r32_wanted()
    monkeypatch.setenv("FIC_Q1R32", "0")
    off = convert(models["gguf"], tmp_path / "off", name="off", progress=False)
    assert not fmt.ModelReader(off).stored_r32
    monkeypatch.setenv("FIC_Q1R32", "1")
    q8 = convert(models["gguf"], tmp_path / "q8", name="q8", progress=False,
                 options=ConvertOptions(quant="q8_0", bundle_order="auto", down_layout="rows"))
    assert not fmt.ModelReader(q8).stored_r32
    with pytest.raises(ConvertError, match="bundle order r32 needs Q1_0"):
        convert(models["gguf"], tmp_path / "bad", name="bad", progress=False,
                options=ConvertOptions(quant="q8_0", bundle_order="r32", down_layout="rows"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConvertError, match="unknown bundle order"):
        convert(models["gguf"], tmp_path / "bad", name="bad", progress=False, options=ConvertOptions(bundle_order="x"))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(version=3), "bundle_order r32 in a version 3 manifest"),
    (lambda m: m.update(bundle_order="cols"), "unknown bundle_order"),
    (lambda m: m["expert_layout"].update(down_layout="rows"), "bundle_order r32 for bundles that are not"),
])
def test_bad_manifests_are_refused(models, tmp_path, edit, words):
    dest = tmp_path / "m"
    shutil.copytree(models["r32"], dest)
    man = json.loads((dest / fmt.MANIFEST_FILE).read_text())
    edit(man)
    (dest / fmt.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(fmt.FormatError, match=words):
        fmt.ModelReader(dest)


def test_a_damaged_r32_bundle_fails_its_checksum(models, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(models["r32"], dest)
    e = fmt.ModelReader(dest).manifest.experts[0][0]
    flip_byte(dest / fmt.EXPERTS_FILE, e.offset + 100, 1)
    with pytest.raises(fmt.FormatError, match="checksum"):
        all_bundles(dest, r32=True)


def test_writer_refuses_what_r32_cannot_hold(tmp_path):
    q1 = fmt.ExpertLayout(256, "q1_0", "q1_0", "q1_0", "columns")
    with pytest.raises(ValueError, match="r32 order need"):
        fmt.ModelWriter(tmp_path / "a", name="a", arch={},
                        layout=fmt.ExpertLayout(256, "q8_0", "q8_0", "q8_0", "columns"), bundle_order="r32")
    with pytest.raises(ValueError, match="unknown bundle order"):
        fmt.ModelWriter(tmp_path / "b", name="b", arch={}, layout=q1, bundle_order="cols")


def test_c_refuses_a_bad_direction_and_round_trips():
    rng = np.random.default_rng(5)
    n, d = 128, 256
    buf = rng.integers(0, 256, 3 * n * kernels.row_bytes("q1_0", d), dtype=np.uint8)
    orig = buf.copy()
    kernels.q1r32_bundle(buf, n, d)
    assert not np.array_equal(buf, orig)
    kernels.q1r32_bundle(buf, n, d, unpack=True)
    assert np.array_equal(buf, orig)
    ws = np.empty(1 << 16, np.uint8)
    ptrs = ffi.new("uint8_t *[]", [ffi.from_buffer("uint8_t[]", buf)])
    ns = np.array([n], np.int32)
    assert lib.fic_q1r32_bundles(ffi.NULL, 0, ptrs, ffi.from_buffer("int32_t[]", ns), 1, d, 2,
                                 ffi.from_buffer("uint8_t[]", ws), ws.nbytes) == lib.FIC_ERR_ARG
