"""Every reader of a file fic did not write itself, fuzzed with inputs derived from valid seeds
(tests/_fuzz.py): each input ends in the reader's named error or in a correct read, within the
per-example deadline, allocating no more than the input justifies.

    test                            reader                                  named error
    test_fuzz_manifest              fmt.parse_manifest                      fmt.FormatError
    test_fuzz_model_reader          fmt.ModelReader (open, dense, bundles)  fmt.FormatError
    test_fuzz_safetensors_header    fmt.safetensors_header (+ HF loaders)   fmt.FormatError, CheckpointError

FIC_FUZZ_EXAMPLES inputs per reader (10,000 by default, what CI runs); the long run is the same
tests with more: FIC_FUZZ_EXAMPLES=200000 pytest -m fuzz tests/test_fuzz.py.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, note

from _fuzz import FUZZ, OPS, AllocationMeter, Seed, Stream, deadline, json_paths, mutate
from flashinfer_cli import fmt, kernels

pytestmark = pytest.mark.fuzz

MiB = 1 << 20
SCRATCH: Path = None  # type: ignore[assignment]  # set by the _scratch fixture
_meter = AllocationMeter()


@pytest.fixture(scope="module", autouse=True)
def _scratch():
    """Where inputs are written: in memory (/dev/shm) where there is one, thousands of times.
    The address-space cap (AllocationMeter) holds while this module's tests run."""
    global SCRATCH
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="fic-fuzz-", dir=shm if shm.is_dir() else None) as d:
        SCRATCH = Path(d)
        with _meter:
            yield


def _one_line(exc: BaseException) -> None:
    assert str(exc) and "\n" not in str(exc), f"not one line: {str(exc)!r}"


# ---- fic's model: manifest, dense block, experts file --------------------------------------

D = 32


def write_seed_model(dest: Path) -> Path:
    """The smallest model that has every part: experts in two layers, a token embedding left on
    flash (the model has an output matrix), f32 and f16 dense tensors, neuron orders, a tokenizer
    file."""
    rng = np.random.default_rng(0)
    layout = fmt.ExpertLayout(D, "q8_0", "q4_0", "q8_0", "columns")
    q = lambda shape, f="q8_0": kernels.quantize(rng.standard_normal(shape).astype(np.float32), f)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tok = dest.parent / "tokenizer.json"
    tok.write_text('{"model": "seed"}')
    with fmt.ModelWriter(dest, name="seed", arch={"arch": "llama", "n_layers": 2}, layout=layout,
                         provenance={"source": "/x/seed.gguf", "sha256": {"seed.gguf": "0" * 64}},
                         tokenizer={"chat_template": None, "bos_id": 1, "eos_ids": [2], "add_bos": False}) as w:
        w.add_dense("token_embd", q((8, D)))
        w.add_dense("output", q((8, D)))
        w.add_dense("output_norm", np.ones(D, np.float32))
        w.add_dense("half", rng.standard_normal((3, 5)).astype(np.float16))
        for layer in range(2):
            w.add_expert(layer, q((32, D)), q((32, D), "q4_0"), q((D, 32)))
            w.add_expert(layer, q((32, D)), q((32, D), "q4_0"), q((D, 32)))
            w.set_neuron_order(layer, np.arange(64))
        w.add_file(tok)
        w.note("seed")
    return dest


@pytest.fixture(scope="module")
def seed_model() -> Path:
    return write_seed_model(SCRATCH / "models" / "seed")


def _json_seed(name: str, data: bytes, hot: int | None = None, doc_bytes: bytes | None = None) -> Seed:
    text = data if doc_bytes is None else doc_bytes
    doc = json.loads(text)
    return Seed(name, data=data, hot=len(data) if hot is None else hot, doc=doc, text=text, paths=json_paths(doc))


def _check_manifest(man: fmt.Manifest, path: Path) -> None:
    """What a manifest that parsed promises its users."""
    assert isinstance(man.name, str) and isinstance(man.arch, dict) and isinstance(man.notes, list)
    assert isinstance(man.tokenizer, dict) and isinstance(man.provenance, dict)
    for f in man.tokenizer.get("files", []):
        assert (path.parent / f).resolve().parent == path.parent.resolve(), f  # inside the model's directory
    for spec in man.tensors.values():
        fmt._tensor_nbytes(spec)
    for layer in man.experts:
        for e in layer:
            assert all(type(v) is int and v >= 0 for v in (e.offset, e.length, e.crc32c, e.n_neurons))
    fmt.dense_pack(man)
    fmt.repull_command(man.name, man.provenance)


@pytest.fixture(scope="module")
def manifest_seed(seed_model) -> Seed:
    return _json_seed("manifest", (seed_model / fmt.MANIFEST_FILE).read_bytes())


@FUZZ
@given(ops=OPS)
@example(ops=b'\x00\x07\x00\x00\xa7\x05\x00\x00F\x85\x03\x00\x00\x043\x02')  # an integer of 5,000 digits
def test_fuzz_manifest(manifest_seed, ops):
    text, decoded = mutate(manifest_seed, Stream(ops))
    note(f"operations: {decoded}")
    path = SCRATCH / fmt.MANIFEST_FILE
    path.write_bytes(text)
    with _meter.bound(64 * len(text) + 8 * MiB, "parse_manifest"), deadline():
        try:
            man = fmt.parse_manifest(path)
        except fmt.FormatError as exc:
            _one_line(exc)
            return
        _check_manifest(man, path)


def _read_everything(r: fmt.ModelReader, limit: int) -> None:
    """What the engine reads of a model that opened: the dense block into one buffer, the
    tensors left on flash by rows, every bundle. Each buffer is sized by the manifest, which the
    reader checked against the files: none may exceed what the files hold."""
    man = r.manifest
    total = fmt.dense_pack_bytes(man)
    assert total <= limit, f"a dense buffer of {total:,} bytes for files of {limit:,}"
    r.read_dense_into(kernels.aligned_buffer(max(total, 64)))
    for name in fmt.flash_resident(man):
        rows = r.dense_rows(name)
        rows.rows([0, man.tensors[name]["shape"][0] - 1])
        rows.close()
    keys = [(l, e) for l, layer in enumerate(man.experts) for e in range(len(layer))]
    sizes = [r.bundle_bytes(l, e) for l, e in keys]
    assert sum(sizes) <= limit, f"bundles of {sum(sizes):,} bytes for files of {limit:,}"
    if keys:
        r.read_bundles(keys, [kernels.aligned_buffer(n) for n in sizes])


def _safetensors_with_header(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


@pytest.fixture(scope="module")
def model_seeds(seed_model) -> dict[str, Seed]:
    """Each file of the seed model: the manifest (JSON), the dense block (its header as JSON, its
    bytes), the experts file (its 32-byte header, its size)."""
    manifest = (seed_model / fmt.MANIFEST_FILE).read_bytes()
    dense = (seed_model / fmt.DENSE_FILE).read_bytes()
    experts = (seed_model / fmt.EXPERTS_FILE).read_bytes()
    hot = 8 + int.from_bytes(dense[:8], "little")
    return {fmt.MANIFEST_FILE: _json_seed(fmt.MANIFEST_FILE, manifest),
            fmt.DENSE_FILE: _json_seed(fmt.DENSE_FILE, dense, hot, dense[8:hot]),
            fmt.EXPERTS_FILE: Seed(fmt.EXPERTS_FILE, data=experts, hot=32)}


@FUZZ
@given(ops=OPS)
def test_fuzz_model_reader(seed_model, model_seeds, ops):
    """One file of a valid model mutated (the manifest's JSON, the dense block's header, the
    experts file's header, any byte of any file), then the model opened and read whole."""
    stream = Stream(ops)
    target = stream.choice(sorted(model_seeds))
    seed = model_seeds[target]
    mutated, decoded = mutate(seed, stream)
    if target == fmt.DENSE_FILE and decoded[0] == "json":  # the header's JSON, its length prefix made to fit
        mutated = _safetensors_with_header(mutated, seed.data[seed.hot:])
    note(f"{target}: {decoded}")
    path = seed_model / target
    path.write_bytes(mutated)
    try:
        files = sum((seed_model / n).stat().st_size for n in model_seeds)
        with _meter.bound(64 * files + 8 * MiB, "ModelReader"), deadline():
            try:
                with fmt.ModelReader(seed_model, io_backend="pread") as r:
                    _read_everything(r, files)
            except fmt.FormatError as exc:
                _one_line(exc)
    finally:
        path.write_bytes(seed.data)
        (seed_model / fmt.DAMAGED_FILE).unlink(missing_ok=True)


# ---- safetensors headers (fic's dense block, Hugging Face checkpoints) ---------------------

def _hf_safetensors() -> bytes:
    """A Hugging Face checkpoint's weights file: BF16, F16 and F32 tensors, metadata."""
    tensors = {"model.embed_tokens.weight": ("BF16", [4, 8]), "model.norm.weight": ("F32", [8]),
               "lm_head.weight": ("F16", [4, 8]), "model.layers.0.mlp.up_proj.weight": ("BF16", [2, 8])}
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = {"BF16": 2, "F16": 2, "F32": 4}[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return _safetensors_with_header(raw, np.random.default_rng(0).integers(0, 255, off, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def safetensors_seeds(seed_model) -> list[Seed]:
    seeds = []
    for name, data in (("dense", (seed_model / fmt.DENSE_FILE).read_bytes()), ("hf", _hf_safetensors())):
        hot = 8 + int.from_bytes(data[:8], "little")
        seeds.append(_json_seed(name, data, hot, data[8:hot]))
    return seeds


@FUZZ
@given(ops=OPS)
def test_fuzz_safetensors_header(safetensors_seeds, ops):
    """fmt.safetensors_header, then what checkpoint.py makes of a Hugging Face file's tensors
    (each loaded): FormatError (CheckpointError through checkpoint.py) or tensors inside the file,
    overlapping none other, of the bytes their dtype and shape need."""
    from flashinfer_cli import checkpoint

    stream = Stream(ops)
    seed = stream.choice(safetensors_seeds)
    length = stream.choice((None, None, None, 0, -1, 1, 1 << 60))  # of the header; None: its own
    mutated, decoded = mutate(seed, stream)
    if decoded[0] == "json":
        if length in (-1, 1):
            length += len(mutated)
        mutated = _safetensors_with_header(mutated, seed.data[seed.hot:], length)
    note(f"{seed.name}: {decoded}, header length {length}")
    path = SCRATCH / "model.safetensors"
    path.write_bytes(mutated)
    with _meter.bound(64 * len(mutated) + 8 * MiB, "safetensors_header"), deadline():
        try:
            header, base = fmt.safetensors_header(path)
        except fmt.FormatError as exc:
            _one_line(exc)
            return
        spans = sorted((base + i["data_offsets"][0], base + i["data_offsets"][1]) for i in header.values())
        assert all(b <= e <= len(mutated) for b, e in spans)
        assert sum(e - b for b, e in spans) <= len(mutated)
        for name, info in header.items():
            if info["dtype"] not in checkpoint._ST_DTYPES:
                continue
            try:
                arr = checkpoint._safetensors_loader(path, base, name, info)()
            except checkpoint.CheckpointError as exc:
                _one_line(exc)
                continue
            assert arr.shape == tuple(info["shape"]) and arr.dtype == np.float32
