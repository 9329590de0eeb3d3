"""The model format: write/read round trip, atomic writes, and every corruption the reader must refuse."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import fmt, kernels
from flashinfer_cli.fmt import ExpertLayout, FormatError, ModelReader, ModelWriter

from test_kernels import EPS32, assert_within, dot_bound

D_MODEL = 256
N_LAYERS = 2
EXPERT_SIZES = (128, 128, 256)  # neurons per expert; multiples of every block size


def _rng_matrix(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.standard_normal((m, k)).astype(np.float32)


def _make_parts(rng, layout: ExpertLayout, n: int):
    gate = kernels.quantize(_rng_matrix(rng, n, layout.d_model), layout.gate_fmt)
    up = kernels.quantize(_rng_matrix(rng, n, layout.d_model), layout.up_fmt)
    down = kernels.quantize(_rng_matrix(rng, *layout.down_shape(n)), layout.down_fmt)
    return gate, up, down


def write_model(dest: Path, down_layout: str = "columns", seed: int = 0, down_fmts: list[str] | None = None):
    """A small model; returns what was written so tests compare against the source values.
    down_fmts: ffn_down's format per layer."""
    rng = np.random.default_rng(seed)
    downs = down_fmts or ["q1_0" if down_layout == "rows" else "q8_0"] * N_LAYERS
    layout = ExpertLayout.per_layer(D_MODEL, "q4_0", "q4_1", downs, down_layout)
    src = dest.parent.parent / "src"  # outside the store, so the store holds only models
    src.mkdir(exist_ok=True)
    tok = src / "tokenizer.json"
    tok.write_text('{"model": "test"}')
    dense = {
        "token_embd": kernels.quantize(_rng_matrix(rng, 64, D_MODEL), "q8_0"),
        "output_norm": rng.standard_normal(D_MODEL).astype(np.float32),
        "half": rng.standard_normal((3, 5)).astype(np.float16),
    }
    bundles = {}
    with ModelWriter(dest, name="tiny", arch={"arch": "llama", "n_layers": N_LAYERS}, layout=layout,
                     provenance={"source": "test", "sha256": "0" * 64}) as w:
        for name, value in dense.items():
            w.add_dense(name, value)
        for layer in range(N_LAYERS):
            for e, n in enumerate(EXPERT_SIZES):
                bundles[layer, e] = _make_parts(rng, layout.layer(layer), n)
                w.add_expert(layer, *bundles[layer, e])
            w.set_neuron_order(layer, rng.permutation(sum(EXPERT_SIZES)))
        w.add_file(tok)
        w.note("written by a test")
    return dense, bundles


def _read_all(reader: ModelReader, keys):
    bufs = [kernels.aligned_buffer(reader.bundle_bytes(l, e)) for l, e in keys]
    return reader.read_bundles(keys, bufs)


@pytest.mark.parametrize("down_layout", ["columns", "rows"])
def test_round_trip(tmp_path: Path, down_layout: str):
    dest = tmp_path / "store" / "tiny"
    dense, bundles = write_model(dest, down_layout)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["tiny"]  # no temp dir left
    with ModelReader(dest) as r:
        man = r.manifest
        assert man.name == "tiny" and man.arch["n_layers"] == N_LAYERS
        assert man.provenance["sha256"] == "0" * 64 and man.notes == ["written by a test"]
        assert man.tokenizer["files"] == ["tokenizer.json"]
        assert (dest / "tokenizer.json").read_text() == '{"model": "test"}'
        got = r.dense()
        np.testing.assert_array_equal(got["token_embd"].data, dense["token_embd"].data)
        assert got["token_embd"].shape == dense["token_embd"].shape
        np.testing.assert_array_equal(got["output_norm"], dense["output_norm"])
        np.testing.assert_array_equal(got["half"], dense["half"])
        assert got["half"].dtype == np.float16
        for layer in range(N_LAYERS):
            assert sorted(r.neuron_order(layer).tolist()) == list(range(sum(EXPERT_SIZES)))
        keys = sorted(bundles)
        for key, bundle in zip(keys, _read_all(r, keys)):
            for got_part, want_part in zip((bundle.gate, bundle.up, bundle.down), bundles[key]):
                assert (got_part.fmt, got_part.shape) == (want_part.fmt, want_part.shape)
                np.testing.assert_array_equal(got_part.data, want_part.data)
        assert all(e.offset % fmt.ALIGN == 0 for layer in man.experts for e in layer)
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_round_trip_with_down_formats_per_layer(tmp_path: Path):
    """ffn_down in a format per layer (version 5): each layer's bundles come back in their own."""
    dest = tmp_path / "store" / "m"
    _, bundles = write_model(dest, down_fmts=["q8_0", "q1_0"])
    raw = json.loads((dest / fmt.MANIFEST_FILE).read_text())
    assert raw["version"] == fmt.DOWN_FMTS_VERSION
    assert raw["expert_layout"]["down_fmts"] == ["q8_0", "q1_0"] and raw["expert_layout"]["down_fmt"] == "q8_0"
    with ModelReader(dest) as r:
        keys = sorted(bundles)
        for (layer, e), bundle in zip(keys, _read_all(r, keys)):
            assert bundle.down.fmt == ("q8_0", "q1_0")[layer]
            np.testing.assert_array_equal(bundle.data[:sum(p.data.nbytes for p in bundles[layer, e])],
                                          np.concatenate([p.data for p in bundles[layer, e]]))
        assert r.bundle_bytes(0, 0) > r.bundle_bytes(1, 0)


def test_a_uniform_layout_keeps_the_older_version(model: Path):
    """No down_fmts: the manifest stays what an older fic reads (version 3, no new key)."""
    raw = json.loads((model / fmt.MANIFEST_FILE).read_text())
    assert raw["version"] == fmt.FORMAT_VERSION and "down_fmts" not in raw["expert_layout"]


@pytest.mark.parametrize("edit,fault", [
    (lambda m: m.update(version=3), "down_fmts in a version 3 manifest"),
    (lambda m: m["expert_layout"].update(down_fmts=["q8_0"]), "down_fmts names 1 layers, the expert table has 2"),
    (lambda m: m["expert_layout"].update(down_fmt="q1_0"), "down_fmt 'q1_0' is not the widest of down_fmts"),
    (lambda m: m["expert_layout"].update(down_fmts=["q8_0", "q9_9"]), "unknown weight format 'q9_9' in down_fmts"),
    (lambda m: m["expert_layout"].update(down_fmts="q8_0"), "down_fmts is not a list of format names"),
    (lambda m: m["expert_layout"].update(down_fmts=["q8_0", "q8_0"]),
     "layer 1 expert 0: length .* does not fit 128 neurons"),
], ids=["old-version", "wrong-length", "not-widest", "unknown-format", "not-a-list", "bytes-of-another-format"])
def test_bad_down_formats_per_layer_are_format_errors(tmp_path: Path, edit, fault):
    dest = tmp_path / "store" / "m"
    write_model(dest, down_fmts=["q8_0", "q1_0"])
    _edit_manifest(dest, edit)
    _expect(dest, fmt.MANIFEST_FILE if "length" not in fault else fmt.EXPERTS_FILE, fault)


def test_bundle_is_usable_by_kernels(tmp_path: Path):
    """A bundle read from disk computes the same FFN as the weights it was written from."""
    dest = tmp_path / "store" / "m"
    _, bundles = write_model(dest, "rows", seed=3)
    x = np.random.default_rng(1).standard_normal(D_MODEL).astype(np.float32)
    with ModelReader(dest) as r:
        (b,) = _read_all(r, [(1, 2)])
    gate, up, down = (kernels.dequantize(p).astype(np.float64) for p in bundles[1, 2])
    x64 = x.astype(np.float64)
    g64, u64 = gate @ x64, up @ x64
    s64 = g64 / (1 + np.exp(-g64))
    want = down.T @ (s64 * u64)
    # The float reference kernels: this checks the bytes, not the int8-activation fast paths.
    g, u = kernels.matvec(b.gate, x, impl="ref"), kernels.matvec(b.up, x, impl="ref")
    h = g / (1 + np.exp(-g)) * u  # float32
    got = kernels.accum_rows(b.down, h, np.zeros(D_MODEL, np.float32), impl="ref")
    # The bound, derived as in test_ffn: g and u within the float32 summation bound of a length
    # D_MODEL dot product; h = silu(g) u moves by at most 1.1 |dg| (|u| + |du|) + |silu(g)| |du|
    # plus 8 roundings of |h| (|silu'| <= 1.1; exp, the division and the products in float32);
    # y sums n rows of down scaled by h in float32: sum |down| |dh| plus its own summation bound.
    bg, bu = dot_bound(gate, x64), dot_bound(up, x64)
    bh = 1.1 * bg * (np.abs(u64) + bu) + np.abs(s64) * bu + 8 * EPS32 * np.abs(s64 * u64)
    bound = np.abs(down.T) @ bh + dot_bound(down.T, np.abs(s64 * u64) + bh)
    assert_within(got, want, bound)


def test_failed_write_leaves_nothing(tmp_path: Path):
    dest = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with ModelWriter(dest, name="x", arch={}, layout=None) as w:
            w.add_dense("a", np.zeros(4, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_model_is_kept_unless_overwrite(tmp_path: Path):
    dest = tmp_path / "store" / "m"
    write_model(dest, seed=1)
    with pytest.raises(FileExistsError):
        ModelWriter(dest, name="x", arch={}, layout=None)
    with ModelWriter(dest, name="replaced", arch={}, layout=None, overwrite=True) as w:
        w.add_dense("a", np.ones(4, np.float32))
    assert ModelReader(dest).manifest.name == "replaced"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_writer_rejects_mismatched_parts(tmp_path: Path):
    layout = ExpertLayout(D_MODEL, "q4_0", "q4_0", "q4_0", "columns")
    rng = np.random.default_rng(0)
    w = ModelWriter(tmp_path / "m", name="x", arch={}, layout=layout)
    try:
        gate, up, _ = _make_parts(rng, layout, 64)
        wrong_down = kernels.quantize(_rng_matrix(rng, 64, D_MODEL), "q4_0")  # rows, not columns
        with pytest.raises(ValueError, match="layout wants"):
            w.add_expert(0, gate, up, wrong_down)
        with pytest.raises(ValueError, match="not a permutation"):
            w.set_neuron_order(0, np.array([0, 0, 1]))
    finally:
        w.abort()


# ---- corruptions ---------------------------------------------------------------------------

@pytest.fixture()
def model(tmp_path: Path) -> Path:
    dest = tmp_path / "store" / "m"
    write_model(dest)
    return dest


def _edit_manifest(model: Path, edit) -> None:
    path = model / fmt.MANIFEST_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _expect(model: Path, filename: str, fault: str) -> None:
    with pytest.raises(FormatError, match=fault) as info:
        ModelReader(model)
    assert info.value.path.endswith(filename)
    assert filename in str(info.value)


def test_missing_manifest(model: Path):
    (model / fmt.MANIFEST_FILE).unlink()
    _expect(model, fmt.MANIFEST_FILE, "missing")


def test_manifest_not_json(model: Path):
    (model / fmt.MANIFEST_FILE).write_text("{not json")
    _expect(model, fmt.MANIFEST_FILE, "not readable JSON")


def test_manifest_bad_magic(model: Path):
    _edit_manifest(model, lambda m: m.update(format="gguf"))
    _expect(model, fmt.MANIFEST_FILE, "bad magic")


def test_manifest_bad_version(model: Path):
    _edit_manifest(model, lambda m: m.update(version=99))
    _expect(model, fmt.MANIFEST_FILE, "unsupported format version 99")


def test_manifest_bad_tensor_spec(model: Path):
    _edit_manifest(model, lambda m: m["tensors"]["output_norm"].update(fmt="q7_7"))
    _expect(model, fmt.MANIFEST_FILE, "bad spec")


def test_table_entry_outside_file(model: Path):
    def push_out(m):
        m["experts"][1][2][0] = m["experts_file_bytes"]
    _edit_manifest(model, push_out)
    _expect(model, fmt.EXPERTS_FILE, "outside the file")


def test_table_entry_length_mismatch(model: Path):
    _edit_manifest(model, lambda m: m["experts"][0][0].__setitem__(3, 64))
    _expect(model, fmt.EXPERTS_FILE, "does not fit 64 neurons")


def test_experts_bad_magic(model: Path):
    with open(model / fmt.EXPERTS_FILE, "r+b") as f:
        f.write(b"GARBAGE!")
    _expect(model, fmt.EXPERTS_FILE, "bad magic")


def test_experts_bad_version(model: Path):
    with open(model / fmt.EXPERTS_FILE, "r+b") as f:
        f.seek(8)
        f.write((7).to_bytes(4, "little"))
    _expect(model, fmt.EXPERTS_FILE, "unsupported experts version 7")


def test_experts_truncated(model: Path):
    path = model / fmt.EXPERTS_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - fmt.ALIGN)
    _expect(model, fmt.EXPERTS_FILE, "truncated")


def test_experts_missing(model: Path):
    (model / fmt.EXPERTS_FILE).unlink()
    _expect(model, fmt.EXPERTS_FILE, "missing")


def test_dense_truncated(model: Path):
    path = model / fmt.DENSE_FILE
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    _expect(model, fmt.DENSE_FILE, "truncated: tensor .* needs bytes")


def test_dense_tensor_missing(model: Path):
    _edit_manifest(model, lambda m: m["tensors"].update(extra={"fmt": "f32", "shape": [4], "crc32c": 0}))
    _expect(model, fmt.DENSE_FILE, "'extra' listed in the manifest is missing")


def test_dense_size_mismatch(model: Path):
    _edit_manifest(model, lambda m: m["tensors"]["output_norm"].update(shape=[D_MODEL * 2]))
    _expect(model, fmt.DENSE_FILE, "needs")


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _open_or_skip(model: Path, io_backend: str) -> ModelReader:
    try:
        return ModelReader(model, io_backend=io_backend)
    except NotImplementedError:
        pytest.skip(f"{io_backend} is not available on this system")


# Where a byte rots inside bundle (1, 1) (73,728 bytes: 18 pages): its first byte, one a hundred
# bytes in, one deep inside (past the first pages), its last payload byte.
FLIPS = {"first": lambda e: 0, "near_start": lambda e: 100, "deep": lambda e: e.length // 2 + 4097,
         "last": lambda e: e.length - 1}


def _check_corrupted_bundle(model: Path, io_backend: str, where: str, direct: bool | None) -> None:
    with ModelReader(model) as r:
        entry = r.entry(1, 1)
    assert entry.length > 4 * fmt.ALIGN
    _flip(model / fmt.EXPERTS_FILE, entry.offset + FLIPS[where](entry))
    with _open_or_skip(model, io_backend) as r:  # opening is fine: checksums are checked when bundles are read
        if direct is not None:
            assert r._reader.direct is direct
        _read_all(r, [(0, 0), (1, 0), (1, 2)])
        with pytest.raises(FormatError, match="layer 1 expert 1 .*checksum mismatch"):
            _read_all(r, [(0, 0), (1, 1)])


@pytest.mark.parametrize("where", sorted(FLIPS))
@pytest.mark.parametrize("io_backend", ["io_uring", "pread"])
def test_corrupted_bundle_byte(model: Path, io_backend: str, where: str):
    _check_corrupted_bundle(model, io_backend, where, None)


@pytest.mark.parametrize("where", ["near_start", "deep"])
@pytest.mark.parametrize("io_backend", ["io_uring", "pread"])
def test_corrupted_bundle_byte_without_o_direct(ramfs_dir: Path, io_backend: str, where: str):
    """On a filesystem that refuses O_DIRECT (ramfs) the reader reads buffered: the checksum is
    checked there too."""
    dest = ramfs_dir / "store" / "m"
    dest.parent.mkdir()
    write_model(dest)
    _check_corrupted_bundle(dest, io_backend, where, False)


def test_not_a_directory(tmp_path: Path):
    with pytest.raises(FormatError, match="not a model directory"):
        ModelReader(tmp_path / "nothing")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_files_share_one_mode(tmp_path: Path, umask: int):
    """Every file of a model, dense.safetensors too (safetensors writes 0600), as the umask allows;
    the static policy's scores, written later beside them, too."""
    from flashinfer_cli import router

    dest = tmp_path / "store" / "m"
    old = os.umask(umask)
    try:
        write_model(dest)
        router.save_static(dest, np.zeros((N_LAYERS, 3), np.float32))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in dest.iterdir()}
    assert sorted(modes) == ["dense.safetensors", "experts.bin", "manifest.json", "static_scores.npy", "tokenizer.json"]
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


# ---- the dense block's checksums -----------------------------------------------------------

def _tensor_offset(model: Path, name: str) -> int:
    """Where tensor `name`'s data starts in dense.safetensors."""
    header, base = fmt.safetensors_header(model / fmt.DENSE_FILE)
    return base + header[name]["data_offsets"][0]


def test_dense_checksums_are_in_the_manifest(model: Path):
    with ModelReader(model) as r:
        got = r.dense()
        for name, spec in r.manifest.tensors.items():
            raw = got[name].data if isinstance(got[name], kernels.QTensor) else got[name]
            assert spec["crc32c"] == kernels.crc32c(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))


def _read_into(r: ModelReader):
    return r.read_dense_into(kernels.aligned_buffer(fmt.dense_pack_bytes(r.manifest)))


# every way a dense tensor leaves the file; DenseRows checks its whole tensor when it is opened
DENSE_READS = {"read_dense_into": _read_into, "dense": lambda r: r.dense(),
               "dense_tensor": lambda r: r.dense_tensor("half"), "dense_rows": lambda r: r.dense_rows("half")}


@pytest.mark.parametrize("how", sorted(DENSE_READS))
def test_damaged_dense_tensor_is_refused(model: Path, how: str):
    _flip(model / fmt.DENSE_FILE, _tensor_offset(model, "half") + 7)
    with ModelReader(model) as r:  # opening reads headers only: the damage shows when the tensor is read
        with pytest.raises(FormatError, match=r"tensor 'half' is damaged .*run `fic pull tiny --force`") as info:
            DENSE_READS[how](r)
    assert info.value.path.endswith(fmt.DENSE_FILE) and "\n" not in str(info.value)


def test_damage_elsewhere_leaves_other_tensors_readable(model: Path):
    _flip(model / fmt.DENSE_FILE, _tensor_offset(model, "half") + 7)
    with ModelReader(model) as r:
        assert r.dense_tensor("output_norm").shape == (D_MODEL,)
        r.dense_rows("token_embd").close()


def test_damage_is_marked_for_ls(model: Path):
    assert fmt.damage(model) is None
    _flip(model / fmt.DENSE_FILE, _tensor_offset(model, "output_norm"))
    with ModelReader(model) as r, pytest.raises(FormatError):
        r.dense()
    assert "tensor 'output_norm' is damaged" in fmt.damage(model)


def test_damaged_bundle_is_marked_and_says_what_to_do(model: Path):
    with ModelReader(model) as r:
        entry = r.entry(0, 1)
    _flip(model / fmt.EXPERTS_FILE, entry.offset + 5)
    with ModelReader(model) as r, pytest.raises(FormatError, match=r"checksum mismatch.*`fic pull tiny --force`"):
        _read_all(r, [(0, 1)])
    assert "layer 0 expert 1" in fmt.damage(model)


def test_manifest_without_checksums_is_refused_with_what_to_do(model: Path):
    """Version 1 manifests (before the dense block had checksums) are not read unchecked."""
    def downgrade(m):
        m["version"] = 1
        for spec in m["tensors"].values():
            del spec["crc32c"]
    _edit_manifest(model, downgrade)
    _expect(model, fmt.MANIFEST_FILE, r"format version 1 .*no checksums.*run `fic pull tiny --force`")


def test_manifest_tensor_without_checksum(model: Path):
    _edit_manifest(model, lambda m: m["tensors"]["half"].pop("crc32c"))
    _expect(model, fmt.MANIFEST_FILE, "tensor 'half': bad spec")


@pytest.mark.parametrize("prov,command", [
    ({"source": "pip llm-x==1", "catalog": "tiny"}, "fic pull tiny --force"),
    ({"source": "pip llm-x==1", "catalog": "cat"}, "fic pull cat --name tiny --force"),
    ({"source": "/m/x y.gguf", "converter": {"quant": "q4_0", "expert_size": 32}},
     "fic pull '/m/x y.gguf' --name tiny --quant q4_0 --expert-size 32 --force"),
    ({"source": "huggingface org/x", "converter": {"quant": "q8_0", "expert_size": None}},
     "fic pull org/x --name tiny --quant q8_0 --force"),
    ({"source": "test"}, "fic pull tiny --force"),
    ({}, "fic pull tiny --force"),
])
def test_repull_command_follows_the_provenance(prov: dict, command: str):
    assert fmt.repull_command("tiny", prov) == command


# ---- read faults (FIC_FAULTS, see test_stream.py) -----------------------------------------------

@pytest.mark.parametrize("io_backend", ["io_uring", "pread"])
def test_retried_read_faults_give_the_same_bundles(model: Path, io_backend: str, monkeypatch):
    keys = [(l, e) for l in range(N_LAYERS) for e in range(len(EXPERT_SIZES))]
    with _open_or_skip(model, io_backend) as r:
        want = [b.data.tobytes() for b in _read_all(r, keys)]
    monkeypatch.setenv("FIC_FAULTS", "short:every=2,eagain:every=3,eintr:every=4,slow:us=100,seed=2")
    with _open_or_skip(model, io_backend) as r:
        assert r.io_description().startswith(io_backend)
        assert "faults injected (FIC_FAULTS=short:every=2," in r.io_description()
        for _ in range(3):
            assert [b.data.tobytes() for b in _read_all(r, keys)] == want
        hits = r._reader.fault_hits()
    assert hits["short"] > 0 and hits["eagain"] > 0 and hits["eintr"] > 0 and hits["slow"] == hits["ops"]


@pytest.mark.parametrize("io_backend", ["io_uring", "pread"])
def test_injected_eio_names_the_file_the_bundle_and_its_offset(model: Path, io_backend: str):
    keys = [(0, 0), (0, 1), (1, 2)]
    with _open_or_skip(model, io_backend) as r:
        # one read at a time, so that the second read operation is the second bundle's, hit once
        r._reader.close()
        r._reader = kernels.Reader(r.experts_path, backend=io_backend, queue_depth=1, n_threads=1,
                                   faults="eio:every=2:count=1")
        with pytest.raises(FormatError) as info:
            _read_all(r, keys)
        e = r.entry(0, 1)
        assert str(info.value) == (f"{model / fmt.EXPERTS_FILE}: bundle layer 0 expert 1 at offset {e.offset}: "
                                   "read failed (Input/output error)")
        assert info.value.path == str(model / fmt.EXPERTS_FILE)
        assert [b.n_neurons for b in _read_all(r, keys)] == [128, 128, 256]  # its one hit spent

# ---- hostile manifests and headers (tests/test_fuzz.py fuzzes these readers) ----------------

@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["tensors"]["half"].update(fmt=["f32"]), id="format-unhashable"),
    pytest.param(lambda m: m["expert_layout"].update(gate_fmt=["q4_0"]), id="layout-format-unhashable"),
    pytest.param(lambda m: m.update(notes=5), id="notes-not-a-list"),
    pytest.param(lambda m: m.update(provenance="x"), id="provenance-not-an-object"),
    pytest.param(lambda m: m.update(tokenizer=[1]), id="tokenizer-not-an-object"),
    pytest.param(lambda m: m["tensors"]["output_norm"].update(shape=[2 ** 70]), id="shape-overflows-int64"),
    pytest.param(lambda m: m["tensors"]["output_norm"].update(shape=[2 ** 62, 4]), id="shape-wraps-to-0-bytes"),
    pytest.param(lambda m: m["tensors"]["output_norm"].update(shape=[]), id="shape-empty"),
    pytest.param(lambda m: m["tensors"]["token_embd"].update(shape=[64, 33]), id="row-not-whole-blocks"),
    pytest.param(lambda m: m["expert_layout"].update(d_model=33), id="d_model-not-whole-blocks"),
    pytest.param(lambda m: m["expert_layout"].update(d_model=True), id="d_model-bool"),
    pytest.param(lambda m: m["expert_layout"].update(d_model=2 ** 63), id="d_model-huge"),
    pytest.param(lambda m: m["experts"][0][0].__setitem__(3, 2 ** 64), id="n_neurons-huge"),
    pytest.param(lambda m: m["experts"][0][0].__setitem__(3, 3), id="n_neurons-not-whole-blocks"),
    pytest.param(lambda m: m["experts"][0][0].__setitem__(2, 2 ** 40), id="crc-beyond-32-bits"),
    pytest.param(lambda m: m["tensors"]["token_embd"].update(shape=[64 * D_MODEL]), id="rows-of-a-vector"),
    pytest.param(lambda m: m["expert_layout"].update({"do\n_layout": m["expert_layout"].pop("down_layout")}),
                 id="layout-key-with-a-newline"),  # found by tests/test_fuzz.py
    pytest.param(lambda m: m["expert_layout"].pop("d_model"), id="layout-key-missing"),
])
def test_hostile_manifest_values_are_format_errors(model: Path, edit):
    """Each once escaped as TypeError, OverflowError, ValueError or IndexError (or was read,
    wrapped to 0 bytes): now the reader's own FormatError."""
    _edit_manifest(model, edit)
    with pytest.raises(FormatError) as info:
        with ModelReader(model) as r:
            r.dense_rows("token_embd")  # what the engine reads by rows when the model has an output matrix
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", [b"[" * 100_000, b'{"format": ' + b"9" * 5000 + b"}", b"\xff\xfe{}"],
                         ids=["nested-100000-deep", "integer-of-5000-digits", "not-utf8"])
def test_unparseable_manifest_is_a_format_error(model: Path, text: bytes):
    (model / fmt.MANIFEST_FILE).write_bytes(text)
    _expect(model, fmt.MANIFEST_FILE, "not readable JSON")


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "a/b", "..", ".", ".hidden", "x\0y",
                                  "a\\b", "manifest.json", "experts.bin", 5, None, "\ud800"])
def test_tokenizer_file_names_stay_in_the_model_directory(model: Path, name):
    """A manifest's file names are read (and stat'ed by the engine's plan) inside the model's
    directory: none may climb out of it, be absolute, or stand for the model's own files."""
    _edit_manifest(model, lambda m: m["tokenizer"].update(files=["tokenizer.json", name]))
    _expect(model, fmt.MANIFEST_FILE, "tokenizer file .* is not a file name inside the model's directory")


def _peak(fn) -> int:
    from _fuzz import peak_heap_bytes

    return peak_heap_bytes(fn)


def _st_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header,length,fault", [
    ({}, 1 << 60, r"truncated: the header needs bytes 8\.\.1152921504606846984"),
    ({"t": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}, None, r"truncated: tensor 't' needs bytes"),
    ({"t": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 0]}}, None, "bad shape|needs"),
    ({"t": {"dtype": "U8", "shape": [1 << 62, 4], "data_offsets": [0, 0]}}, None, "bad shape|needs"),
    ({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, None, "bad dtype"),
    ({"a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]},
      "b": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}, None, "overlap"),
], ids=["header-of-2^60-bytes", "tensor-of-1-TB", "shape-of-2^80", "shape-wrapping-to-0", "dtype-unhashable",
        "tensors-sharing-bytes"])
def test_hostile_safetensors_header_refused_before_allocating(tmp_path: Path, header, length, fault):
    """A header that claims more than the file holds is refused from its numbers, before anything
    is allocated for them; tensors may not share bytes (each would be read, and allocated, whole)."""
    path = _st_file(tmp_path / "x.safetensors", header, bytes(64), length)
    with pytest.raises(FormatError, match=fault):
        fmt.safetensors_header(path)
    assert _peak(lambda: fmt.safetensors_header(path)) < 1 << 20


def test_huge_claims_of_the_model_files_refused_before_allocating(model: Path):
    """A bundle of 1 TB, a header counting 2^60 bundles: refused at open, allocating nothing like it."""
    _edit_manifest(model, lambda m: m["experts"][0][0].__setitem__(1, 1 << 40))
    assert _peak(lambda: ModelReader(model)) < 4 << 20
    with pytest.raises(FormatError, match="outside the file"):
        ModelReader(model)
    _edit_manifest(model, lambda m: m["experts"][0][0].__setitem__(1, 0))
    with open(model / fmt.EXPERTS_FILE, "r+b") as f:
        f.seek(16)
        f.write((1 << 60).to_bytes(8, "little"))
    assert _peak(lambda: ModelReader(model)) < 4 << 20
    with pytest.raises(FormatError, match="header counts 1152921504606846976 bundles"):
        ModelReader(model)
