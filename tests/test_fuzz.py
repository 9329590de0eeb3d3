"""Every reader of a file fic did not write itself, fuzzed with inputs derived from valid seeds
(tests/_fuzz.py): each input ends in the reader's named error or in a correct read, within the
per-example deadline, allocating no more than the input justifies.

    test                            reader                                  named error
    test_fuzz_manifest              fmt.parse_manifest                      fmt.FormatError
    test_fuzz_model_reader          fmt.ModelReader (open, dense, bundles)  fmt.FormatError
    test_fuzz_safetensors_header    fmt.safetensors_header (+ HF loaders)   fmt.FormatError, CheckpointError
    test_fuzz_gguf                  checkpoint's GGUF open (+ tensor loads) checkpoint.CheckpointError
                                    tokenizer.spec_from_gguf (same inputs)  tokenizer.TokenizerError
    test_fuzz_hf_tokenizer          tokenizer.json + configs, model entry   tokenizer.TokenizerError
    test_fuzz_chat_template         chat templates (compile + render)       tokenizer.ChatTemplateError

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

from _fuzz import (CHATML, FUZZ, OPS, AllocationMeter, Seed, Stream, deadline, json_paths, mutate,
                   write_seed_gguf)
from flashinfer_cli import fmt, kernels

pytestmark = [pytest.mark.fuzz,
              # garbage blocks of a mutated GGUF dequantize to infinities: numpy says so, fic need not
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              # a mutated template's string literal with a backslash: jinja2's lexer says so
              pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")]

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


# ---- GGUF: header, metadata, tensor infos, tensors; its tokenizer -------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "a mat"}, {"role": "user", "content": "<|im_end|> hi!"}]
TEXT = "the cat sat, in a hat! <|im_end|> 日本 🎉"


def _use_tokenizer(tok) -> None:
    """What the engine does with a tokenizer: render a chat, encode text, decode it whole and as
    a stream. TokenizerError (ChatTemplateError included) is the only error allowed (a document
    the library loads can still fail on some text: an unknown token it has no id for)."""
    from flashinfer_cli.tokenizer import TokenizerError

    try:
        prompt = tok.render_chat(MESSAGES)
        assert isinstance(prompt, str)
    except TokenizerError as exc:
        _one_line(exc)
    try:
        ids = tok.encode(TEXT)
        assert all(type(i) is int for i in ids)
        ids = [i for i in ids if 0 <= i < tok.vocab_size]
        text = tok.decode(ids)
        stream = tok.stream_decoder()
        assert "".join(stream.add(i) for i in ids) + stream.flush() == text
    except TokenizerError as exc:
        _one_line(exc)



@pytest.fixture(scope="module")
def gguf_seeds() -> list[Seed]:
    return make_gguf_seeds()


def make_gguf_seeds() -> list[Seed]:
    import gguf

    from _fuzz import gguf_parts

    seeds = []
    for name, kw in (("llama", {}), ("qwen2", {"arch": "qwen2", "pre": "qwen2"}),
                     ("llama3-rope", {"rope_freqs": True, "pre": "smollm"})):
        path = write_seed_gguf(SCRATCH / f"{name}.gguf", **kw)
        data = path.read_bytes()
        kvs, tensors, tensor_data = gguf_parts(path)
        seeds.append(Seed(name, data=data, hot=gguf.GGUFReader(str(path)).data_offset, kvs=kvs, tensors=tensors,
                          tensor_data=tensor_data, arch=kw.get("arch", "llama")))
    return seeds


def mutate_gguf(seeds: list[Seed], stream: Stream) -> tuple[bytes, list]:
    """A seed GGUF file mutated by structure (its metadata, tensor infos, counts) or as bytes."""
    from _fuzz import apply_byte_ops, apply_gguf_ops, byte_ops, gguf_bytes, gguf_ops

    seed = stream.choice(seeds)
    if stream.flag():
        ops = gguf_ops(stream, seed.kvs, seed.tensors, seed.arch)
        kvs, tensors, opts = apply_gguf_ops(seed.kvs, seed.tensors, ops)
        return gguf_bytes(kvs, tensors, seed.tensor_data, **opts), [seed.name, "gguf"] + ops
    ops = byte_ops(stream, seed.hot, len(seed.data))
    return apply_byte_ops(seed.data, ops), [seed.name, "bytes"] + ops


@FUZZ
@given(ops=OPS)
@example(ops=b"\x00\x01\x00\x06")  # head_count_kv 0: ZeroDivisionError
@example(ops=b"\x00\x01\x00\x0c")  # tokenizer.ggml.tokens an integer: TypeError (len)
def test_fuzz_gguf(gguf_seeds, ops):
    """Two readers of one GGUF file, each input given to both:
    checkpoint's GGUF open (header, metadata, tensor infos; then every tensor loaded):
        CheckpointError, or tensors of the shapes the file's configuration implies;
    tokenizer.spec_from_gguf on the metadata of a file that opens (then the tokenizer built
    and used): TokenizerError, or a tokenizer that encodes and decodes."""
    from flashinfer_cli.checkpoint import CheckpointError, _gguf_checkpoint, _open_gguf_reader
    from flashinfer_cli.tokenizer import Tokenizer, TokenizerError, spec_from_gguf

    data, decoded = mutate_gguf(gguf_seeds, Stream(ops))
    note(f"operations: {decoded}")
    path = SCRATCH / "fuzz.gguf"
    path.write_bytes(data)
    with _meter.bound(64 * len(data) + 16 * MiB, "GGUF"), deadline():
        try:
            reader = _open_gguf_reader(path)
        except CheckpointError as exc:
            _one_line(exc)
            return
        try:
            ck = _gguf_checkpoint(reader, path)
            for t in ck:
                value = t.load()
                assert tuple(value.shape) == tuple(t.shape), (t.name, value.shape, t.shape)
        except CheckpointError as exc:
            _one_line(exc)
        try:
            tok = Tokenizer.from_spec(spec_from_gguf(reader))
        except TokenizerError as exc:
            _one_line(exc)
            return
        _use_tokenizer(tok)


# ---- Hugging Face tokenizers: tokenizer.json and its configs; a fic model's tokenizer entry ---

def write_hf_tokenizers(dest: Path) -> list[Path]:
    """Two Hugging Face tokenizer directories: a byte-level BPE with a post-processor that adds
    BOS (Llama 3's kind) and a chat template, and a SentencePiece-style BPE with byte fallback
    and a decoder that strips the first space (Llama 2's kind)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    words = ["the cat sat on the mat", "a hat, in a vat!", "12345 日本 🎉"] * 10
    bl = HFTokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(words, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    bl.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    spm = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.train_from_iterator(words, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    doc = json.loads(spm.to_str())
    for b in range(0, 256, 16):  # some byte-fallback tokens
        doc["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(doc["model"]["vocab"]))
    doc["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    dirs = []
    for name, text, config, gen in (
            ("bytelevel", bl.to_str(), {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHATML},
             {"eos_token_id": [1, 2], "bos_token_id": 0}),
            ("spm", json.dumps(doc, ensure_ascii=False), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                          "chat_template": [{"name": "default", "template": CHATML}]},
             {"eos_token_id": 2})):
        d = dest / name
        d.mkdir(parents=True)
        (d / "tokenizer.json").write_text(text, encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        (d / "generation_config.json").write_text(json.dumps(gen))
        dirs.append(d)
    return dirs


HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "entry")


@pytest.fixture(scope="module")
def hf_tokenizer_seeds() -> list[Seed]:
    from flashinfer_cli.tokenizer import spec_from_hf_dir

    seeds = []
    for d in write_hf_tokenizers(SCRATCH / "hf-seeds"):
        files = {name: _json_seed(name, (d / name).read_bytes()) for name in HF_FILES[:3]}
        entry = json.dumps(spec_from_hf_dir(d).manifest_entry()).encode()
        files["entry"] = _json_seed("entry", entry)
        seeds.append(Seed(d.name, dir=d, files=files))
    return seeds


@FUZZ
@given(ops=OPS)
@example(ops=b"\x01\x01\x01\x00\x06\x06")  # a named chat template whose name is a list: TypeError (unhashable)
def test_fuzz_hf_tokenizer(hf_tokenizer_seeds, ops):
    """A Hugging Face tokenizer directory with one file mutated (tokenizer.json,
    tokenizer_config.json, generation_config.json), read by spec_from_hf_dir; or a fic model's
    tokenizer.json and manifest entry, read by Tokenizer.from_model_dir. Then the tokenizer is
    used: TokenizerError, or a tokenizer that encodes and decodes."""
    from flashinfer_cli.tokenizer import Tokenizer, TokenizerError, spec_from_hf_dir

    stream = Stream(ops)
    seed = stream.choice(hf_tokenizer_seeds)
    target = stream.choice(HF_FILES)
    mutated, decoded = mutate(seed.files[target], stream)
    note(f"{seed.name} {target}: {decoded}")
    d = SCRATCH / "hf"
    d.mkdir(exist_ok=True)
    for name in HF_FILES[:3]:
        (d / name).write_bytes(mutated if name == target else seed.files[name].data)
    with _meter.bound(64 * len(mutated) + 64 * MiB, "tokenizer"), deadline():
        try:
            if target == "entry":
                try:
                    entry = json.loads(mutated)
                except (ValueError, RecursionError):  # nested too deeply for Python's parser
                    return  # the manifest's JSON: test_fuzz_manifest's domain
                tok = Tokenizer.from_model_dir(d, entry)
            else:
                tok = Tokenizer.from_spec(spec_from_hf_dir(d))
        except TokenizerError as exc:
            _one_line(exc)
            return
        _use_tokenizer(tok)


# ---- chat templates ------------------------------------------------------------------------

TEMPLATES = {
    "chatml": CHATML,
    "llama3": ("{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "qwen-tools": (
        "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
        "{%- else %}{{- 'You are Qwen.' }}{%- endif %}{{- '\n\n# Tools\n<tools>' }}{%- for tool in tools %}"
        "{{- '\n' }}{{- tool | tojson }}{%- endfor %}{{- '\n</tools><|im_end|>\n' }}{%- else %}"
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{%- endif %}{%- endif %}"
        "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
        "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}{%- if message.content %}"
        "{{- '\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls | default([]) %}"
        "{{- '\n<tool_call>\n' }}{{- tool_call | tojson }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"),
    "features": (
        "{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.system = m.content %}{% continue %}{% endif %}{{ loop.index0 ~ ':' ~ m.role|upper|center(12) }}"
        "{{ m.content|replace('cat', 'dog')|truncate(40) }}{% if loop.last %}{{ ns.system|length }}{% endif %}"
        "{% endfor %}{% macro tag(x) %}<{{ x }}>{% endmacro %}{{ tag(eos_token) }}{{ range(3)|join(',') }}"
        "{{ strftime_now('%Y') | length }}{% if messages|selectattr('role', 'equalto', 'tool')|list %}"
        "{{ raise_exception('no tools') }}{% endif %}{{ '%s/%d' % ('a', 1) }}{{ '{} {}'.format('x', 2) }}"),
}
SNIPPETS = (
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ self.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}", "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% for i in range(10**9) %}x{% endfor %}", "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ 'x' * 10**8 }}", "{{ 'a'|center(10**9) }}",
    "{{ 'a'.ljust(10**9) }}", "{{ '%0999999999d' % 1 }}", "{{ '{:>999999999}'.format(1) }}", "{{ 9 ** 9 ** 9 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% for m in messages %}", "{% endfor %}", "{% if %}", "{% if x %}", "{% endif %}", "{{ messages[0]['content'] }}",
    "{{ raise_exception('x') }}", "{{ strftime_now('%Y') }}", "{{ messages|tojson(indent=99999) }}",
    "{% set ns = namespace(x=1) %}", "{{ loop.index }}", "{{ 1/0 }}", "{{ tools[0] }}", "{% break %}",
    "{{ x.y.z }}", "{%- -%}", "{#", "}}", "{% raw %}", "{{ range(5)|list }}", "{{ (messages * 100000)|length }}",
    "{{ 2**64 }}", "{{ messages|map(attribute='content')|join(' ' * 100000) }}", "{{ 'ab'|replace('', 'x' * 9999) }}",
    "{% for c in 'x' * 100000 %}{% for d in 'y' * 1000 %}{% endfor %}{% endfor %}", "{{ ('a\n' * 1000)|indent('z' * 9999) }}",
    "{{ messages|batch(10**9, 'x')|list }}", "{{ dict(a=1).items()|list }}", "{{ lipsum(10**6) }}", "{{ 'x'|wordwrap(0) }}")
MESSAGE_SETS = (
    MESSAGES, [], [{"role": "user"}], [{"content": "x"}], [{"role": 1, "content": None}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [{"role": "user", "content": "x" * 100_000}],
    [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}],
    ["not a message"])
TEMPLATE_KINDS = ("bytes", "bytes", "snippet", "snippet", "splice")


@FUZZ
@given(ops=OPS)
@example(ops=b"\x01\x02\x00\x00+")  # lipsum(10**6): ran past the per-example deadline
def test_fuzz_chat_template(ops):
    """A chat template mutated (bytes, hostile snippets inserted, parts of other templates
    spliced in), compiled and rendered with the sandbox's limits: ChatTemplateError, or a prompt
    within the output limit, in time."""
    from _fuzz import apply_byte_ops, byte_ops
    from flashinfer_cli.tokenizer import ChatTemplate, ChatTemplateError, TemplateLimits

    stream = Stream(ops)
    name = stream.choice(sorted(TEMPLATES))
    source = TEMPLATES[name]
    decoded: list = [name]
    while stream.more() and len(decoded) < 4:
        kind = stream.choice(TEMPLATE_KINDS)
        pos = stream.below(len(source) + 1)
        if kind == "bytes":
            raw = source.encode()
            ops_ = byte_ops(stream, len(raw), len(raw), max_ops=1)
            source = apply_byte_ops(raw, ops_).decode("utf-8", "replace")
            decoded.append(ops_)
        elif kind == "snippet":
            snippet = stream.choice(SNIPPETS)
            source = source[:pos] + snippet + source[pos:]
            decoded.append(("snippet", pos, snippet))
        else:
            other = TEMPLATES[stream.choice(sorted(TEMPLATES))]
            a = stream.below(len(other))
            piece = other[a:a + 1 + stream.below(200)]
            source = source[:pos] + piece + source[pos:]
            decoded.append(("splice", pos, piece))
    messages = stream.choice(MESSAGE_SETS)
    note(f"template: {decoded}; messages: {str(messages)[:80]}")
    limits = TemplateLimits(seconds=0.02, output_chars=64 * 1024)
    own = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    with _meter.bound(64 * MiB, "chat template"), deadline():
        try:
            out = ChatTemplate(source, limits).render(messages, add_generation_prompt=stream.flag(),
                                                      bos_token="<s>", eos_token="</s>")
        except ChatTemplateError as exc:
            _one_line(exc)
            return
        assert isinstance(out, str) and len(out) <= limits.output_chars + 2 * own
