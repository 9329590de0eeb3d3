"""The on-disk model format: the only module that knows its byte layouts.

A model is a directory:
    manifest.json      format name and version, architecture config, format, shape and CRC32C of
                       every dense tensor, the expert table, tokenizer files, provenance
    dense.safetensors  the dense block: quantized tensors as raw uint8 blocks (ggml layouts),
                       float tensors as they are, per-layer neuron orders as int32
    experts.bin        a 4 KiB header (magic, version, bundle count) then the expert bundles,
                       each 4 KiB aligned: gate rows, up rows, then the down part
    predictor-*.safetensors  optional (calibrate.py writes it): the fitted predictor of each
                       layer's activations, part of the dense block; the manifest's "predictor"
                       names the file and holds its tensors' specs and CRC32Cs. A manifest without
                       the key (every model converted before it) simply has no predictor, and a
                       reader that predates it ignores it: the format version stays 3. Its
                       optional "target" says what it predicts ("neuron" when absent, "expert").
                       "bundle_order": "r32" (format version 4): experts.bin holds each Q1_0 bundle's
                       parts in the r32 layout (groups of 32 rows, fic.h), what x86's kernels read,
                       so no read repacks them; a reader that wants rows unpacks them after the
                       checksum. Absent: rows, as every version 3 model; an older fic refuses
                       version 4 rather than read its bundles as rows.
                       expert_layout "down_fmts" (format version 5): ffn_down's format per layer,
                       where the source's differ between layers (a Q4_K_M file's Q4_K and Q6_K);
                       "down_fmt" is then the widest of them. Absent: down_fmt in every layer.
    tokenizer files    copied as they are
    DAMAGED            written by a reader that found bytes failing their checksum (`fic ls` shows
                       it); pulling the model again replaces the directory, marker and all

The down part of a bundle is either `columns` (the expert's column slice of ffn_down: d_model
rows of n_neurons, lossless when n_neurons is a multiple of the block) or `rows` (the slice of
ffn_downᵀ: n_neurons rows of d_model, any expert size).

The writer builds everything in a temporary sibling directory and renames it into place, so a
failure leaves no half model. The reader trusts nothing: every fault is a FormatError that names
the file and what is wrong. Every byte of weights is checked against a CRC32C written at conversion:
a bundle as it is read, a dense tensor as it is read (one left on flash, whole, when it is opened).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flashinfer_cli import kernels
from flashinfer_cli.kernels import QTensor
from flashinfer_cli.moe import RoutingRule, expected_dense

FORMAT_NAME = "fic-model"
FORMAT_VERSION = 3  # 2: every dense tensor has a CRC32C in the manifest; 3: "moe", the routing rules
R32_VERSION = 4  # "bundle_order": "r32"; written only by such a model (others stay readable by older fic)
DOWN_FMTS_VERSION = 5  # expert_layout "down_fmts": ffn_down's format per layer; written only by such a model
READABLE_VERSIONS = (2, 3, 4, 5)  # a version 2 manifest is a dense model (no "moe"): read as one
BUNDLE_ORDERS = ("rows", "r32")
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
DAMAGED_FILE = "DAMAGED"
EXPERTS_MAGIC = b"FICXPRT\0"
EXPERTS_VERSION = 1
ALIGN = 4096
_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, bundle count
DOWN_LAYOUTS = ("columns", "rows")
_FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}


class FormatError(Exception):
    """A model file that cannot be trusted; the message names the file and the fault."""

    def __init__(self, path: str | os.PathLike, fault: str):
        super().__init__(f"{path}: {fault}")
        self.path = os.fspath(path)
        self.fault = fault


def neuron_order_name(layer: int) -> str:
    return f"blk.{layer}.ffn_neuron_order"


SHARED_PARTS = ("gate", "up", "down")


def shared_names(layer: int) -> tuple[str, str, str]:
    """A dense model's shared expert of `layer` (cluster.py): gate rows, up rows and the down part
    in the model's down layout, the bundle's three parts kept adjacent in the dense block so they
    run as one bundle (dense_pack)."""
    return tuple(f"blk.{layer}.ffn_{part}_shared" for part in SHARED_PARTS)


def repull_command(name: str, provenance: dict[str, Any]) -> str:
    """The `fic pull` that fetches and converts model `name` again, from its provenance (pull.py
    writes it): its catalog entry, else the file, directory or repo it was converted from with the
    converter's options; a model that says neither gets `fic pull NAME --force`."""
    provenance = provenance if isinstance(provenance, dict) else {}
    catalog = provenance.get("catalog")
    source = str(provenance.get("source") or "")
    args: list[str] = []
    if isinstance(catalog, str) and catalog:
        args = [catalog]
    elif source.startswith("/"):
        args = [source]
    elif source.startswith("huggingface ") and len(source.split()) == 2:
        args = [source.split()[1]]
    if not args:
        return f"fic pull {shlex.quote(name)} --force"
    if args[0] != name:
        args += ["--name", name]
    converter = provenance.get("converter")
    if not catalog and isinstance(converter, dict):  # a catalog entry holds its own options
        for key in ("quant", "expert_size"):
            if converter.get(key) is not None:
                args += [f"--{key.replace('_', '-')}", str(converter[key])]
    return "fic pull " + " ".join(shlex.quote(a) for a in args) + " --force"


def damage(model_dir: str | os.PathLike) -> str | None:
    """What a reader found damaged in this model (its DAMAGED marker), else None. Cheap: one
    small file, so `fic ls` can ask of every model."""
    try:
        return (Path(model_dir) / DAMAGED_FILE).read_text(encoding="utf-8").strip() or "damaged"
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return "damaged"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of every file of a model: what open() gives a new file under the umask (writers
    that create files 0600, safetensors and mkstemp, are brought to it)."""
    return 0o666 & ~_umask()


def _align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


# ---- the manifest --------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertEntry:
    """Where one bundle lives in experts.bin."""

    offset: int
    length: int  # bytes of payload; on disk the bundle is zero-padded to a multiple of ALIGN
    crc32c: int  # CRC32C of the padded bundle, so the C reader checks it as it reads
    n_neurons: int

    @property
    def padded_length(self) -> int:
        return _align_up(self.length)


@dataclass(frozen=True)
class ExpertLayout:
    """How the bundles of every layer are cut: one d_model, one set of formats, but for ffn_down,
    whose format may differ between layers (down_fmts), as in a Q4_K_M file (Q4_K and Q6_K)."""

    d_model: int
    gate_fmt: str
    up_fmt: str
    down_fmt: str     # with down_fmts: the one of most bytes, so sizes taken from it are upper bounds
    down_layout: str  # "columns" or "rows"
    down_fmts: tuple[str, ...] | None = None  # per layer; None: down_fmt in every layer

    @classmethod
    def per_layer(cls, d_model: int, gate_fmt: str, up_fmt: str, down_fmts: Sequence[str],
                  down_layout: str) -> "ExpertLayout":
        """A layout with ffn_down's format per layer: uniform (no down_fmts) when they agree."""
        distinct = sorted(set(down_fmts))
        if len(distinct) == 1:
            return cls(d_model, gate_fmt, up_fmt, distinct[0], down_layout)
        widest = max(distinct, key=down_bytes_per_weight)
        return cls(d_model, gate_fmt, up_fmt, widest, down_layout, tuple(down_fmts))

    def layer(self, i: int) -> "ExpertLayout":
        """Layer i's layout: one format per part."""
        if self.down_fmts is None:
            return self
        return ExpertLayout(self.d_model, self.gate_fmt, self.up_fmt, self.down_fmts[i], self.down_layout)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.down_fmts is None:
            del out["down_fmts"]  # a uniform layout's manifest stays what older fic reads
        else:
            out["down_fmts"] = list(self.down_fmts)
        return out

    def part_bytes(self, n_neurons: int) -> tuple[int, int, int]:
        """Bytes of the gate, up and down parts of a bundle of n_neurons."""
        return kernels.bundle_part_bytes(self.gate_fmt, self.up_fmt, self.down_fmt, self.d_model,
                                         self.down_layout, n_neurons)

    def down_shape(self, n_neurons: int) -> tuple[int, int]:
        return (self.d_model, n_neurons) if self.down_layout == "columns" else (n_neurons, self.d_model)


@dataclass
class Manifest:
    name: str
    arch: dict[str, Any]
    tensors: dict[str, dict[str, Any]]  # dense tensor name -> {"fmt": str, "shape": [..], "crc32c": int}
    expert_layout: ExpertLayout | None
    experts: list[list[ExpertEntry]]  # [layer][expert]
    experts_file_bytes: int
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {"files": [...], "chat_template": ...}
    provenance: dict[str, Any] = field(default_factory=dict)  # {"source": ..., "sha256": ...}
    notes: list[str] = field(default_factory=list)
    # a mixture of experts: one routing rule per layer, every bundle of a layer a routed expert
    # (the router and a shared expert are dense tensors); None: a dense model, bundles are neurons
    moe: list[RoutingRule] | None = None
    # a dense model's shared experts: neurons per layer kept in the dense block (shared_names) and
    # always run; None: none (every FFN neuron is in a routed bundle)
    shared: list[int] | None = None

    @property
    def shared_neurons(self) -> list[int]:
        return list(self.shared) if self.shared else [0] * len(self.experts)
    # the fitted predictor (calibrate.py): {"file", "tensors": {name: spec}, "rank", "fmt", ...}
    predictor: dict[str, Any] | None = None
    # how experts.bin stores Q1_0 bundles: "rows" (the layout's own), or "r32" (groups of 32 rows)
    bundle_order: str = "rows"

    @property
    def version(self) -> int:
        """The oldest format version that holds this manifest, so that older fic reads what it can."""
        if self.expert_layout is not None and self.expert_layout.down_fmts is not None:
            return DOWN_FMTS_VERSION
        return R32_VERSION if self.bundle_order == "r32" else FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "name": self.name,
            "arch": self.arch,
            "tensors": self.tensors,
            "expert_layout": self.expert_layout.to_json() if self.expert_layout else None,
            "experts": [[[e.offset, e.length, e.crc32c, e.n_neurons] for e in layer] for layer in self.experts],
            "experts_file_bytes": self.experts_file_bytes,
            "tokenizer": self.tokenizer,
            "provenance": self.provenance,
            "notes": self.notes,
            "moe": {"layers": [r.to_json() for r in self.moe]} if self.moe is not None else None,
            "shared": {"neurons": list(self.shared)} if self.shared else None,
            **({"predictor": self.predictor} if self.predictor is not None else {}),
            **({"bundle_order": self.bundle_order} if self.bundle_order != "rows" else {}),
        }


def _require(cond: bool, path: Path, fault: str) -> None:
    if not cond:
        raise FormatError(path, fault)


# Bounds on the numbers a manifest or header may hold, checked before any is used: far above any
# real model, and small enough that no product of them overflows the C core's 64-bit sizes.
MAX_DIM = 1 << 40          # elements along one dimension of a tensor
MAX_TENSOR_BYTES = 1 << 48  # bytes of one tensor, of a file's offsets
MAX_NDIM = 4


def _is_int(v: Any) -> bool:
    """A JSON integer (not a bool, which Python counts as one)."""
    return type(v) is int


def load_json(path: Path) -> Any:
    """A JSON file's value; FormatError names what is wrong (unreadable, not UTF-8, not JSON, or
    nested too deeply to parse)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(path, "missing") from None
    except OSError as exc:
        raise FormatError(path, f"not readable JSON ({exc.strerror or exc})") from None
    except ValueError as exc:  # not UTF-8, not JSON, an integer of more digits than Python converts
        raise FormatError(path, f"not readable JSON ({exc})") from None
    except RecursionError:
        raise FormatError(path, "not readable JSON (nested too deeply)") from None


def is_plain_name(name: Any) -> bool:
    """A file name that stays in its directory: one path component, not '.' or '..', not hidden,
    no NUL, no backslash (a separator elsewhere), encodable as a file name."""
    if not isinstance(name, str) or not name or name.startswith(".") or len(name) > 255:
        return False
    if any(c in name for c in "/\\\0"):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def _check_spec(name: str, spec: Any, path: Path) -> None:
    """One dense tensor's manifest entry: a known format, a shape of at most MAX_NDIM positive
    dimensions whose bytes the format can hold (whole blocks per row), a CRC32C."""
    fault = f"tensor {name!r}: bad spec {_short(spec)}"
    _require(isinstance(spec, dict), path, fault)
    fmt_name, shape, crc = spec.get("fmt"), spec.get("shape"), spec.get("crc32c")
    _require(isinstance(fmt_name, str) and (fmt_name in kernels.FORMATS or fmt_name == "i32"), path, fault)
    ok = isinstance(shape, list) and 1 <= len(shape) <= MAX_NDIM
    _require(ok and all(_is_int(d) and 0 < d <= MAX_DIM for d in shape), path, fault)
    _require(_is_int(crc) and 0 <= crc < 1 << 32, path, fault)
    try:
        n = _tensor_nbytes(spec)
    except ValueError as exc:  # a row that is not a whole number of blocks
        raise FormatError(path, f"tensor {name!r}: {exc}") from None
    _require(n <= MAX_TENSOR_BYTES, path, f"tensor {name!r}: {n} bytes is more than any model holds")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def down_bytes_per_weight(fmt_name: str) -> float:
    return kernels.block_bytes(fmt_name) / kernels.block_weights(fmt_name)


def _parse_down_fmts(raw: Any, path: Path) -> tuple[str, ...] | None:
    if raw is None:
        return None
    _require(isinstance(raw, list) and raw and all(isinstance(f, str) for f in raw), path,
             "expert_layout: down_fmts is not a list of format names")
    for f in raw:
        _require(f in kernels.FORMATS, path, f"expert_layout: unknown weight format {_short(f)} in down_fmts")
    return tuple(raw)


def _parse_layout(raw: Any, path: Path) -> ExpertLayout | None:
    if raw is None:
        return None
    _require(isinstance(raw, dict), path, "expert_layout is not an object")
    known = {f.name for f in fields(ExpertLayout)}
    for key in raw:  # named here, through _short: a key is the file's text and may hold anything
        _require(key in known, path, f"expert_layout: unknown key {_short(key)}")
    try:
        layout = ExpertLayout(**{**raw, "down_fmts": _parse_down_fmts(raw.get("down_fmts"), path)})
    except TypeError:
        missing = sorted(known - set(raw) - {"down_fmts"})  # down_fmts is optional
        raise FormatError(path, f"expert_layout: missing {', '.join(missing) or 'keys'}") from None
    for fmt in (layout.gate_fmt, layout.up_fmt, layout.down_fmt):
        _require(isinstance(fmt, str) and fmt in kernels.FORMATS, path, f"expert_layout: unknown weight format {_short(fmt)}")
    _require(layout.down_layout in DOWN_LAYOUTS, path, f"expert_layout: unknown down_layout {_short(layout.down_layout)}")
    _require(_is_int(layout.d_model) and 0 < layout.d_model <= MAX_DIM, path, "expert_layout: bad d_model")
    downs = layout.down_fmts or (layout.down_fmt,)
    for fmt in (layout.gate_fmt, layout.up_fmt) + (downs if layout.down_layout == "rows" else ()):
        _require(layout.d_model % kernels.block_weights(fmt) == 0, path,
                 f"expert_layout: d_model {layout.d_model} is not a whole number of {fmt} blocks")
    if layout.down_fmts is not None:
        widest = max(down_bytes_per_weight(f) for f in layout.down_fmts)
        _require(layout.down_fmt in layout.down_fmts and down_bytes_per_weight(layout.down_fmt) == widest, path,
                 f"expert_layout: down_fmt {_short(layout.down_fmt)} is not the widest of down_fmts")
    return layout


def _parse_experts(raw: Any, path: Path) -> list[list[ExpertEntry]]:
    _require(isinstance(raw, list), path, "experts is not a list of layers")
    layers = []
    for li, layer in enumerate(raw):
        _require(isinstance(layer, list), path, f"experts[{li}] is not a list")
        entries = []
        for ei, e in enumerate(layer):
            ok = isinstance(e, list) and len(e) == 4 and all(_is_int(v) and v >= 0 for v in e)
            ok = ok and e[0] <= MAX_TENSOR_BYTES and e[1] <= MAX_TENSOR_BYTES and e[2] < 1 << 32 and e[3] <= MAX_DIM
            _require(ok, path, f"experts[{li}][{ei}] is not [offset, length, crc32c, n_neurons]")
            entries.append(ExpertEntry(*e))
        layers.append(entries)
    return layers


def _parse_tokenizer(raw: Any, path: Path) -> dict[str, Any]:
    """The tokenizer entry's structure; its files are plain names inside the model's directory
    (tokenizer.py checks the rest when it loads them)."""
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), path, "tokenizer is not an object")
    files = raw.get("files", [])
    _require(isinstance(files, list), path, "tokenizer files is not a list")
    for f in files:
        _require(is_plain_name(f) and f not in (MANIFEST_FILE, DENSE_FILE, EXPERTS_FILE, DAMAGED_FILE), path,
                 f"tokenizer file {_short(f)} is not a file name inside the model's directory")
    return raw


def parse_manifest(path: Path) -> Manifest:
    """Read and validate manifest.json (structure only; files are checked by ModelReader)."""
    raw = load_json(path)
    _require(isinstance(raw, dict), path, "not a JSON object")
    _require(raw.get("format") == FORMAT_NAME, path, f"bad magic: format is {_short(raw.get('format'))}, expected {FORMAT_NAME!r}")
    if raw.get("version") == 1 and type(raw.get("version")) is int:  # not read unchecked: its dense block could be damaged unseen
        again = repull_command(str(raw.get("name")), raw.get("provenance"))
        raise FormatError(path, f"format version 1 has no checksums for the dense block; run `{again}` to convert it again")
    _require(raw.get("version") in READABLE_VERSIONS and _is_int(raw.get("version")), path,
             f"unsupported format version {_short(raw.get('version'))} (this fic reads versions "
             f"{', '.join(map(str, READABLE_VERSIONS))})")
    for key, typ in (("name", str), ("arch", dict), ("tensors", dict), ("experts_file_bytes", int)):
        _require(isinstance(raw.get(key), typ) and not isinstance(raw.get(key), bool), path, f"missing or bad {key!r}")
    _require(0 <= raw["experts_file_bytes"] <= MAX_TENSOR_BYTES, path, "bad 'experts_file_bytes'")
    tensors = raw["tensors"]
    for name, spec in tensors.items():
        _check_spec(name, spec, path)
    provenance = raw.get("provenance") or {}
    _require(isinstance(provenance, dict), path, "provenance is not an object")
    notes = raw.get("notes") or []
    _require(isinstance(notes, list) and all(isinstance(n, str) for n in notes), path, "notes is not a list of strings")
    layout = _parse_layout(raw.get("expert_layout"), path)
    experts = _parse_experts(raw.get("experts", []), path)
    if layout is not None and layout.down_fmts is not None:
        _require(raw["version"] >= DOWN_FMTS_VERSION, path, f"down_fmts in a version {raw['version']} manifest")
        _require(len(layout.down_fmts) == len(experts), path,
                 f"expert_layout: down_fmts names {len(layout.down_fmts)} layers, the expert table has {len(experts)}")
    moe = _parse_moe(raw.get("moe") if raw["version"] >= 3 else None, experts, layout, tensors, path)
    shared = _parse_shared(raw.get("shared"), experts, layout, tensors, moe, path)
    predictor = _parse_predictor(raw.get("predictor"), path)
    bundle_order = _parse_bundle_order(raw, layout, experts, path)
    return Manifest(
        name=raw["name"], arch=raw["arch"], tensors=tensors, expert_layout=layout, experts=experts,
        experts_file_bytes=raw["experts_file_bytes"],
        tokenizer=_parse_tokenizer(raw.get("tokenizer"), path), provenance=provenance, notes=list(notes),
        moe=moe, shared=shared, predictor=predictor, bundle_order=bundle_order,
    )


def r32_storable(layout: ExpertLayout | None, sizes: Sequence[int] | Any) -> bool:
    """Bundles of this layout and these sizes can be stored (and read) in the r32 order."""
    return layout is not None and layout.down_fmts is None and kernels.q1r32_bundle_eligible(
        layout.gate_fmt, layout.up_fmt, layout.down_fmt, layout.down_layout, layout.d_model, sizes)


def expert_sizes(d_ff: int, expert_size: int) -> list[int]:
    """The sizes of the bundles one FFN of d_ff neurons is cut into, expert_size at a time."""
    return [min(expert_size, d_ff - start) for start in range(0, d_ff, expert_size)]


def default_bundle_order(layout: ExpertLayout | None, sizes: Sequence[int]) -> str:
    """The order a model is written in when nothing says which: r32 where this machine's kernels
    read that layout (kernels.q1r32_wanted: AVX2, AVX-512) and the bundles can take it, so that no
    read repacks them; rows elsewhere (NEON, FIC_Q1R32=0), where r32 would be unpacked at each read."""
    return "r32" if kernels.q1r32_wanted() and r32_storable(layout, sizes) else "rows"


def _parse_bundle_order(raw: dict, layout: ExpertLayout | None, experts: list[list[ExpertEntry]], path: Path) -> str:
    order = raw.get("bundle_order", "rows")
    _require(order in BUNDLE_ORDERS, path, f"unknown bundle_order {_short(order)} (known: {', '.join(BUNDLE_ORDERS)})")
    if order == "r32":
        _require(raw["version"] >= R32_VERSION, path, f"bundle_order r32 in a version {raw['version']} manifest")
        _require(r32_storable(layout, [e.n_neurons for layer in experts for e in layer]), path,
                 "bundle_order r32 for bundles that are not Q1_0 with columns and sizes multiples of 128")
    return order


def _parse_shared(raw: Any, experts: list[list[ExpertEntry]], layout: ExpertLayout | None,
                  tensors: dict[str, Any], moe: list[RoutingRule] | None, path: Path) -> list[int] | None:
    """A dense model's shared experts: neurons per layer, each layer's three parts in the dense
    block in the expert layout's formats and shapes (a bundle's)."""
    if raw is None:
        return None
    ok = isinstance(raw, dict) and isinstance(raw.get("neurons"), list)
    _require(ok and all(_is_int(n) and 0 <= n <= MAX_DIM for n in raw["neurons"]), path,
             "shared is not an object with a list of neuron counts")
    neurons = raw["neurons"]
    _require(len(neurons) == len(experts), path, f"shared has {len(neurons)} layers, the expert table {len(experts)}")
    _require(moe is None, path, "shared neurons in a mixture of experts (its shared expert is in moe)")
    _require(layout is not None, path, "shared without an expert_layout")
    for li, n in enumerate(neurons):
        if not n:
            continue
        lay = layout.layer(li)
        shapes = ((lay.gate_fmt, [n, lay.d_model]), (lay.up_fmt, [n, lay.d_model]),
                  (lay.down_fmt, list(lay.down_shape(n))))
        for name, (fmt_name, shape) in zip(shared_names(li), shapes):
            spec = tensors.get(name)
            _require(isinstance(spec, dict) and spec.get("fmt") == fmt_name and spec.get("shape") == shape, path,
                     f"shared layer {li}: dense tensor {name!r} {fmt_name} {shape} missing or of another format or shape")
    return list(neurons)


PREDICTOR_PREFIX = "predictor-"
PREDICTOR_TARGETS = ("neuron", "expert")  # each neuron's normalised |h|, or each expert's norm of it


def predictor_names(layer: int) -> dict[str, str]:
    """The predictor's tensors of one layer: a (rank, d_model) and b (d_ff, rank) matrices, the
    centring means mu_x (d_model) and mu_y (d_ff); y = b (a (x - mu_x)) + mu_y."""
    return {k: f"blk.{layer}.pred_{k}" for k in ("a", "b", "mu_x", "mu_y")}


def _parse_predictor(raw: Any, path: Path) -> dict[str, Any] | None:
    if raw is None:
        return None
    _require(isinstance(raw, dict), path, "predictor is not an object")
    name = raw.get("file")
    _require(isinstance(name, str) and is_plain_name(name) and name.startswith(PREDICTOR_PREFIX), path,
             f"predictor file {_short(name)} is not a predictor file name inside the model's directory")
    tensors = raw.get("tensors")
    _require(isinstance(tensors, dict) and tensors, path, "predictor has no tensors")
    for tname, spec in tensors.items():
        _check_spec(tname, spec, path)
    _require(_is_int(raw.get("rank")) and raw["rank"] > 0, path, "bad predictor rank")
    # what it predicts: absent (every predictor written before the key) means "neuron"
    _require(raw.get("target", "neuron") in PREDICTOR_TARGETS, path,
             f"unknown predictor target {_short(raw.get('target'))}")
    return raw


def predictor_bytes(man: Manifest) -> int:
    """Bytes of the predictor's tensors (0 without one): what it adds to the dense block."""
    if man.predictor is None:
        return 0
    return sum(_tensor_nbytes(spec) for spec in man.predictor["tensors"].values())


def write_predictor(model_dir: str | os.PathLike, tensors: dict[str, QTensor | np.ndarray],
                    meta: dict[str, Any]) -> Path:
    """Replace the model's predictor: its file is written under a new name and renamed into place,
    then the manifest (temporary file + rename: the commit point), then the old file is removed.
    Stopped anywhere, the directory holds the old model or the new one, at worst with an unused
    predictor file that the next write removes."""
    from safetensors.numpy import save_file

    model_dir = Path(model_dir)
    man_path = model_dir / MANIFEST_FILE
    man = parse_manifest(man_path)
    specs, arrays = {}, {}
    for name, value in tensors.items():
        specs[name], arrays[name] = _encode_dense(value)
    tag = f"{kernels.crc32c(np.frombuffer(json.dumps(specs, sort_keys=True).encode(), np.uint8)):08x}"
    fname = f"{PREDICTOR_PREFIX}{tag}.safetensors"
    for stale in model_dir.glob(".tmp-predictor-*"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-predictor-", suffix=".safetensors", dir=model_dir)
        os.close(fd)
        _save_safetensors(save_file, arrays, Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, model_dir / fname)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    man.predictor = {**meta, "file": fname, "tensors": specs}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-predictor-manifest-", suffix=".json", dir=model_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(man.to_json(), indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, man_path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    for old in model_dir.glob(PREDICTOR_PREFIX + "*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)
    return model_dir / fname


def _parse_moe(raw: Any, experts: list[list[ExpertEntry]], layout: ExpertLayout | None,
               tensors: dict[str, Any], path: Path) -> list[RoutingRule] | None:
    """The routing rules: one per layer, as many routed experts as the layer has bundles, the
    router (f32) and any shared expert present in the dense block at their shapes."""
    if raw is None:
        return None
    _require(isinstance(raw, dict) and isinstance(raw.get("layers"), list), path, "moe is not an object with layers")
    _require(len(raw["layers"]) == len(experts), path,
             f"moe has {len(raw['layers'])} layers' rules, the expert table {len(experts)} layers")
    _require(layout is not None, path, "moe without an expert_layout")
    rules = []
    for li, r in enumerate(raw["layers"]):
        try:
            rule = RoutingRule.from_json(r)
        except ValueError as exc:
            raise FormatError(path, f"moe layer {li}: {exc}") from None
        _require(rule.n_routed == len(experts[li]), path,
                 f"moe layer {li}: {rule.n_routed} routed experts, the expert table has {len(experts[li])}")
        for name, shape in expected_dense(rule, li, layout.d_model).items():
            spec = tensors.get(name)
            _require(isinstance(spec, dict) and spec.get("shape") == list(shape), path,
                     f"moe layer {li}: dense tensor {name!r} {list(shape)} missing or of another shape")
            if name.endswith("ffn_gate_inp") or name.endswith("ffn_gate_inp_shexp"):
                _require(spec["fmt"] == "f32", path, f"moe layer {li}: router {name!r} is {spec['fmt']}, not f32")
        rules.append(rule)
    return rules


# ---- safetensors headers -------------------------------------------------------------------

# bytes per element of the safetensors dtypes, to check each tensor's extent against its shape
_ST_WIDTHS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data section) of a safetensors file, every
    tensor's data_offsets checked to lie inside the file, to hold its dtype and shape, and to
    overlap no other tensor's (so the tensors together hold no more bytes than the file). The one
    parser of these headers (checkpoint.py reads Hugging Face weights through it too). FormatError
    names what is wrong. Nothing is allocated before the header's length is checked against the
    file's."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            _require(len(head) == 8, path, f"truncated: the header's length needs bytes 0..8, the file has {size}")
            (n,) = struct.unpack("<Q", head)
            _require(8 + n <= size, path, f"truncated: the header needs bytes 8..{8 + n}, the file has {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FormatError(path, "missing") from None
    except OSError as exc:
        raise FormatError(path, f"unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise FormatError(path, f"unreadable safetensors header ({exc})") from None
    except RecursionError:
        raise FormatError(path, "unreadable safetensors header (nested too deeply)") from None
    _require(isinstance(header, dict), path, "bad safetensors header")
    header.pop("__metadata__", None)
    extents = []
    for name, info in header.items():
        extents.append(_check_extent(path, name, info, 8 + n, size) + (name,))
    extents.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(extents, extents[1:]):
        _require(b1 >= e0 or b0 == e0 or b1 == e1, path, f"tensors {n0!r} and {n1!r} overlap (bytes {b1}..{min(e0, e1)})")
    return header, 8 + n


def _check_extent(path: Path, name: str, info: Any, base: int, size: int) -> tuple[int, int]:
    """One safetensors header entry: data_offsets inside the file, as many bytes as dtype x shape;
    returns its (begin, end) in the file."""
    _require(isinstance(info, dict), path, f"tensor {name!r}: bad header entry")
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    ok = isinstance(offsets, (list, tuple)) and len(offsets) == 2 and all(_is_int(v) for v in offsets)
    _require(ok and 0 <= offsets[0] <= offsets[1], path, f"tensor {name!r}: bad data_offsets {_short(offsets)}")
    begin, end = base + offsets[0], base + offsets[1]
    _require(end <= size, path, f"truncated: tensor {name!r} needs bytes {begin}..{end}, the file has {size}")
    ok = isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d <= MAX_TENSOR_BYTES for d in shape)
    _require(ok, path, f"tensor {name!r}: bad shape {_short(shape)}")
    _require(isinstance(dtype, str), path, f"tensor {name!r}: bad dtype {_short(dtype)}")
    width = _ST_WIDTHS.get(dtype)
    if width is not None:  # other dtypes are refused by whoever reads them
        need = width * math.prod(shape)
        _require(end - begin == need, path, f"tensor {name!r} has {end - begin} bytes, {dtype} {shape} needs {need}")
    return begin, end


# ---- dense tensors -------------------------------------------------------------------------

def _tensor_nbytes(spec: dict[str, Any]) -> int:
    """Bytes of a dense tensor (Python integers: no shape overflows them)."""
    shape = spec["shape"]
    if spec["fmt"] == "i32":
        return 4 * math.prod(shape)
    if len(shape) == 1:
        return kernels.row_bytes(spec["fmt"], shape[0])
    return math.prod(shape[:-1]) * kernels.row_bytes(spec["fmt"], shape[-1])


def _raw_bytes(arr: np.ndarray) -> np.ndarray:
    """A contiguous array's bytes, as stored (what a dense tensor's CRC32C covers)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _encode_dense(value: QTensor | np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """(spec, array to store) for one dense tensor."""
    if isinstance(value, QTensor):
        spec, arr = {"fmt": value.fmt, "shape": list(value.shape)}, np.ascontiguousarray(value.data)
    else:
        arr = np.ascontiguousarray(value)
        names = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.int32): "i32"}
        if arr.dtype not in names:
            raise ValueError(f"dense tensors are QTensor, float32, float16 or int32 arrays, got {arr.dtype}")
        spec = {"fmt": names[arr.dtype], "shape": list(arr.shape)}
    spec["crc32c"] = kernels.crc32c(_raw_bytes(arr))
    return spec, arr


def _decode_dense(name: str, spec: dict[str, Any], arr: np.ndarray, path: Path) -> QTensor | np.ndarray:
    fmt, shape = spec["fmt"], tuple(spec["shape"])
    _require(arr.nbytes == _tensor_nbytes(spec), path,
             f"tensor {name!r} holds {arr.nbytes} bytes, manifest's {fmt} {list(shape)} needs {_tensor_nbytes(spec)}")
    if fmt == "i32":
        _require(arr.dtype == np.int32, path, f"tensor {name!r} is {arr.dtype}, expected int32")
        return arr.reshape(shape)
    if fmt in _FLOAT_DTYPES and arr.dtype == _FLOAT_DTYPES[fmt]:
        return arr.reshape(shape)
    _require(arr.dtype == np.uint8 and len(shape) == 2, path, f"tensor {name!r}: {arr.dtype} data for a {fmt} {list(shape)} tensor")
    return QTensor(fmt, (shape[0], shape[1]), np.ascontiguousarray(arr.reshape(-1)))


_DENSE_ALIGN = 64
_CHECK_CHUNK = 1 << 20  # the buffer a flash-resident tensor is checksummed through
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "U8": np.uint8}


def flash_resident(man: Manifest) -> set[str]:
    """Dense tensors the engine leaves on flash and reads a row at a time: the token embedding
    when the model has its own output matrix (one row per token; tied, it is the output layer and
    every row is read every token)."""
    return {"token_embd"} if "output" in man.tensors and "token_embd" in man.tensors else set()


def dense_pack(man: Manifest) -> tuple[list[tuple[str, int, int]], int]:
    """Where each dense tensor lives in the engine's one dense buffer: [(name, offset, bytes)] and
    the total. A layer's attn_q, attn_k and attn_v are adjacent (their rows concatenate into one
    qkv matrix, one kernel call); every other group starts 64-byte aligned. Tensors left on flash
    (flash_resident) are not in it."""
    skip = flash_resident(man)
    names = [n for n in man.tensors if n not in skip]
    groups: list[list[str]] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        if name.endswith(".ffn_gate_shared"):  # a shared expert: its parts back to back, one bundle
            trio = [name[:-len("gate_shared")] + p + "_shared" for p in SHARED_PARTS]
            if all(t in man.tensors and t not in skip for t in trio):
                groups.append(trio)
                seen.update(trio)
                continue
        if name.endswith(".attn_q"):
            base = name[:-len("attn_q")]
            trio = [base + "attn_q", base + "attn_k", base + "attn_v"]
            specs = [man.tensors.get(t) for t in trio]
            if all(specs) and len({s["fmt"] for s in specs}) == 1 and len({s["shape"][-1] for s in specs}) == 1:
                groups.append(trio)
                seen.update(trio)
                continue
        groups.append([name])
        seen.add(name)
    layout, off = [], 0
    for g in groups:
        off = _align_up(off, _DENSE_ALIGN)
        for name in g:
            n = _tensor_nbytes(man.tensors[name])
            layout.append((name, off, n))
            off += n
    return layout, _align_up(off, _DENSE_ALIGN)


def dense_pack_bytes(man: Manifest) -> int:
    return dense_pack(man)[1]


def _decode_view(name: str, spec: dict[str, Any], view: np.ndarray, info: dict[str, Any], path: Path):
    """A dense tensor from its raw bytes in the engine's buffer (dtype from the safetensors header)."""
    dtype = _ST_DTYPES.get(info.get("dtype"))
    _require(dtype is not None, path, f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
    return _decode_dense(name, spec, view.view(dtype), path)


# ---- the writer ----------------------------------------------------------------------------

def _save_safetensors(save_file, tensors: dict, path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    import re

    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": FORMAT_NAME})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


class ModelWriter:
    """Writes a model directory atomically:

        with ModelWriter(dest, name=..., arch=..., layout=...) as w:
            w.add_dense("tok_embd", qtensor); w.add_expert(layer, gate, up, down); w.add_file(path)
        # on leaving the block without an exception the model is renamed into place
    """

    def __init__(self, dest: str | os.PathLike, *, name: str, arch: dict[str, Any],
                 layout: ExpertLayout | None, provenance: dict[str, Any] | None = None,
                 tokenizer: dict[str, Any] | None = None, overwrite: bool = False,
                 moe: list[RoutingRule] | None = None, bundle_order: str = "rows"):
        if bundle_order not in BUNDLE_ORDERS:
            raise ValueError(f"unknown bundle order {bundle_order!r} (known: {', '.join(BUNDLE_ORDERS)})")
        if bundle_order == "r32" and not r32_storable(layout, []):
            raise ValueError(f"bundles in the r32 order need Q1_0 throughout, columns and a d_model a multiple of "
                             f"128, not {layout}")
        self.dest = Path(dest)
        if self.dest.exists() and not overwrite:
            raise FileExistsError(f"{self.dest} already exists")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.dest.name}-", dir=self.dest.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a model is as readable as any file
        self.overwrite = overwrite
        self.manifest = Manifest(name=name, arch=arch, tensors={}, expert_layout=layout, experts=[],
                                 experts_file_bytes=0, tokenizer=dict(tokenizer or {}),
                                 provenance=dict(provenance or {}), moe=moe, bundle_order=bundle_order)
        self._dense: dict[str, np.ndarray] = {}
        self._experts = open(self.tmp / EXPERTS_FILE, "wb")
        self._experts.write(b"\0" * ALIGN)  # header, filled in at the end
        self._offset = ALIGN

    def add_dense(self, name: str, value: QTensor | np.ndarray) -> None:
        if name in self._dense:
            raise ValueError(f"dense tensor {name!r} added twice")
        spec, arr = _encode_dense(value)
        self.manifest.tensors[name] = spec
        self._dense[name] = arr

    def add_expert(self, layer: int, gate: QTensor, up: QTensor, down: QTensor) -> ExpertEntry:
        """Append one bundle to `layer` (experts are numbered in the order they are added)."""
        if self.manifest.expert_layout is None:
            raise ValueError("this model was opened without an expert layout")
        layout = self.manifest.expert_layout.layer(layer)
        n = gate.shape[0]
        expected = ((layout.gate_fmt, (n, layout.d_model)), (layout.up_fmt, (n, layout.d_model)),
                    (layout.down_fmt, layout.down_shape(n)))
        for part, (fmt, shape) in zip((gate, up, down), expected):
            if part.fmt != fmt or part.shape != shape:
                raise ValueError(f"bundle part {part.fmt} {part.shape}, layout wants {fmt} {shape}")
        payload = b"".join(bytes(p.data) for p in (gate, up, down))
        if self.manifest.bundle_order == "r32":  # stored as x86's kernels read it: no repack at each read
            # (columns of Q1_0 make n a multiple of its block of 128, all r32 needs)
            buf = np.frombuffer(bytearray(payload), dtype=np.uint8)
            kernels.q1r32_bundle(buf, n, layout.d_model)
            payload = buf.tobytes()
        padded = payload + b"\0" * (_align_up(len(payload)) - len(payload))
        entry = ExpertEntry(self._offset, len(payload), kernels.crc32c(padded), n)
        self._experts.write(padded)
        self._offset += len(padded)
        while len(self.manifest.experts) <= layer:
            self.manifest.experts.append([])
        self.manifest.experts[layer].append(entry)
        return entry

    def set_shared(self, layer: int, gate: QTensor, up: QTensor, down: QTensor) -> None:
        """Layer's shared expert (a dense model's, always run): a bundle's parts, in the dense block."""
        layout = self.manifest.expert_layout.layer(layer)
        n = gate.shape[0]
        expected = ((layout.gate_fmt, (n, layout.d_model)), (layout.up_fmt, (n, layout.d_model)),
                    (layout.down_fmt, layout.down_shape(n)))
        for part, (fmt_name, shape) in zip((gate, up, down), expected):
            if part.fmt != fmt_name or part.shape != shape:
                raise ValueError(f"shared part {part.fmt} {part.shape}, layout wants {fmt_name} {shape}")
        for name, part in zip(shared_names(layer), (gate, up, down)):
            self.add_dense(name, part)
        if self.manifest.shared is None:
            self.manifest.shared = []
        while len(self.manifest.shared) <= layer:
            self.manifest.shared.append(0)
        self.manifest.shared[layer] = n

    def set_neuron_order(self, layer: int, order: np.ndarray) -> None:
        """Record that layer's bundles hold its FFN neurons in this order (original indices)."""
        order = np.asarray(order)
        if order.ndim != 1 or sorted(order.tolist()) != list(range(order.size)):
            raise ValueError(f"layer {layer}: neuron order is not a permutation")
        self.add_dense(neuron_order_name(layer), order.astype(np.int32))

    def add_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        """Copy a file (a tokenizer file, say) into the model directory."""
        name = name or Path(src).name
        if name in (MANIFEST_FILE, DENSE_FILE, EXPERTS_FILE, DAMAGED_FILE) or "/" in name:
            raise ValueError(f"cannot add a file named {name!r}")
        shutil.copyfile(src, self.tmp / name)
        self.manifest.tokenizer.setdefault("files", []).append(name)

    def note(self, text: str) -> None:
        self.manifest.notes.append(text)

    def _finish_files(self) -> None:
        from safetensors.numpy import save_file

        if self.manifest.shared is not None:  # one count per layer, 0 where a layer has none
            self.manifest.shared += [0] * (len(self.manifest.experts) - len(self.manifest.shared))

        n_bundles = sum(len(layer) for layer in self.manifest.experts)
        self._experts.seek(0)
        self._experts.write(_HEADER.pack(EXPERTS_MAGIC, EXPERTS_VERSION, 0, n_bundles))
        self._experts.flush()
        os.fsync(self._experts.fileno())
        self._experts.close()
        self.manifest.experts_file_bytes = self._offset
        _save_safetensors(save_file, self._dense, self.tmp / DENSE_FILE)
        os.chmod(self.tmp / DENSE_FILE, file_mode())
        manifest_text = json.dumps(self.manifest.to_json(), indent=1)
        (self.tmp / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")

    def commit(self) -> Path:
        lay = self.manifest.expert_layout
        if lay is not None and lay.down_fmts is not None and len(lay.down_fmts) != len(self.manifest.experts):
            raise ValueError(f"down_fmts names {len(lay.down_fmts)} layers, {len(self.manifest.experts)} were written")
        self._finish_files()
        old = None
        if self.dest.exists():  # overwrite: move the old model aside, then swap
            old = self.dest.with_name(f".old-{self.dest.name}-{os.getpid()}")
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest

    def abort(self) -> None:
        if not self._experts.closed:
            self._experts.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


# ---- the reader ----------------------------------------------------------------------------

def _bundle_bytes(layout: ExpertLayout, n_neurons: int) -> int | None:
    """Payload bytes of a bundle of n_neurons; None when the layout's blocks cannot cut it."""
    try:
        return sum(layout.part_bytes(n_neurons))
    except ValueError:
        return None


@dataclass(frozen=True)
class Bundle:
    """An expert's weights, as views into the buffer it was read into; `data` is the whole
    bundle (gate, up and down parts back to back), what kernels.ExpertSet takes."""

    gate: QTensor
    up: QTensor
    down: QTensor
    n_neurons: int
    data: np.ndarray | None = field(default=None, repr=False, compare=False)


class DenseRows:
    """A dense matrix that stays on flash: rows read with pread when asked for (the file's pages
    may sit in the page cache, which the kernel reclaims; none of it is the engine's memory)."""

    def __init__(self, path: Path, fmt_name: str, shape: tuple[int, int], offset: int):
        self.path, self.fmt, self.shape, self.offset = path, fmt_name, shape, offset
        self.row_bytes = kernels.row_bytes(fmt_name, shape[1])
        self._fd = os.open(path, os.O_RDONLY)

    def rows(self, ids) -> QTensor:
        """The rows `ids` (in that order) as one QTensor."""
        buf = bytearray()
        for i in ids:
            if not 0 <= i < self.shape[0]:
                raise ValueError(f"row {i} outside 0..{self.shape[0]}")
            got = os.pread(self._fd, self.row_bytes, self.offset + i * self.row_bytes)
            _require(len(got) == self.row_bytes, self.path, f"truncated: row {i} of a dense tensor")
            buf += got
        return QTensor(self.fmt, (len(ids), self.shape[1]), np.frombuffer(bytes(buf), dtype=np.uint8))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PendingBundles:
    """A batch of bundle reads in flight (ModelReader.submit_bundles)."""

    def __init__(self, reader: "ModelReader", keys, entries, dsts, pending):
        self._reader, self.keys, self._entries, self._dsts, self._pending = reader, keys, entries, dsts, pending
        self._done: list[Bundle] | None = None
        self._checked = False
        self._transformed = False

    def wait(self, *, transform: bool = True, views: bool = True) -> list[Bundle] | None:
        """Block until the batch is read; FormatError names the first bad bundle. transform=False
        leaves the bundles as stored until transform() (a caller that starts its next read first).
        Returns the bundles' views (views=False: None, for a caller that reads the buffers itself,
        as the arena does: the views were 5% of an exact-mode decode's Python profile)."""
        if not self._checked:
            results = self._pending.wait()
            self._reader._check_results(self.keys, self._entries, results)
            self._checked = True
        if transform:
            self.transform()
        if not views:
            return None
        if self._done is None:
            self._done = [self._reader.bundle_view(d, e.n_neurons, layer)
                          for (layer, _), e, d in zip(self.keys, self._entries, self._dsts)]
        return self._done

    def transform(self) -> None:
        """After wait(): the bundles turned into the layout the kernels read, once: repacked in place
        into the r32 layout (stored as rows, the reader's r32 wanted), or back into rows (stored
        in r32 order, rows wanted); as stored when the two agree."""
        if not self._checked:
            raise RuntimeError("transform() before wait()")
        r = self._reader
        if r.r32 != r.stored_r32 and not self._transformed:
            kernels.q1r32_bundles(self._dsts, [e.n_neurons for e in self._entries], r.layout.d_model,
                                  unpack=r.stored_r32)
        self._transformed = True

    def settle(self) -> None:
        """Wait for the batch to land without checking it: for reads whose bytes will not be used."""
        self._pending.wait()


class ModelReader:
    """Opens a model directory and validates it; reads dense tensors and expert bundles."""

    def __init__(self, path: str | os.PathLike, *, io_backend: str | None = None, queue_depth: int = 32):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(self.path, "not a model directory")
        self.manifest = parse_manifest(self.path / MANIFEST_FILE)
        self._r32: ExpertLayout | None = None  # use_r32()
        self.stored_r32 = self.manifest.bundle_order == "r32"  # experts.bin's bundles in r32 order
        self.dense_path = self.path / DENSE_FILE
        self.experts_path = self.path / EXPERTS_FILE
        self._check_dense_header()
        self._check_experts_file()
        self._reader = kernels.Reader(self.experts_path, backend=io_backend, queue_depth=queue_depth) \
            if self.n_bundles else None

    def io_description(self) -> str:
        """How expert bundles are read, for --verbose: 'io_uring, O_DIRECT', 'pread (io_uring
        refused: EPERM), O_DIRECT', ... (kernels.Reader.describe)."""
        return self._reader.describe() if self._reader is not None else "none (the model has no expert bundles)"

    @property
    def n_bundles(self) -> int:
        return sum(len(layer) for layer in self.manifest.experts)

    @property
    def layout(self) -> ExpertLayout | None:
        """How bundles this reader has read lie in memory: the manifest's, or its r32 form after
        use_r32()."""
        return self._r32 if self._r32 is not None else self.manifest.expert_layout

    @property
    def r32(self) -> bool:
        return self._r32 is not None

    def use_r32(self) -> bool:
        """Bundles read from now on (read_bundles, submit_bundles) are in the r32 layout: as stored
        (a model written in r32 order), or repacked in place once their checksum is checked
        (kernels.q1r32_bundle); `layout` names that layout. False, and nothing changes, when the
        bundles cannot take it (not Q1_0 throughout with columns, or a size not a multiple of 128).
        Without it a reader gives rows, unpacking bundles stored in r32 order."""
        lay = self.manifest.expert_layout
        if not r32_storable(lay, [e.n_neurons for layer in self.manifest.experts for e in layer]):
            return False
        self._r32 = ExpertLayout(lay.d_model, "q1_0r32", "q1_0r32", "q1_0r32", "columns")
        return True

    def _check_dense_header(self) -> None:
        """Parse the safetensors header and check every manifest tensor is there at its size."""
        path = self.dense_path
        header, self._dense_data_start = safetensors_header(path)
        self._dense_header = header
        for name, spec in self.manifest.tensors.items():
            info = header.get(name)
            _require(isinstance(info, dict), path, f"tensor {name!r} listed in the manifest is missing")
            begin, end = info["data_offsets"]
            _require(end - begin == _tensor_nbytes(spec), path,
                     f"tensor {name!r} has {end - begin} bytes, its {spec['fmt']} {spec['shape']} needs {_tensor_nbytes(spec)}")
        for name in flash_resident(self.manifest):  # read by rows (DenseRows): a weight matrix
            spec = self.manifest.tensors[name]
            _require(spec["fmt"] in kernels.FORMATS and len(spec["shape"]) == 2, self.path / MANIFEST_FILE,
                     f"tensor {name!r}: a {spec['fmt']} {spec['shape']} tensor is not a matrix of weights")

    def _check_experts_file(self) -> None:
        path, man = self.experts_path, self.manifest
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
        except FileNotFoundError:
            raise FormatError(path, "missing") from None
        except OSError as exc:
            raise FormatError(path, f"unreadable ({exc.strerror})") from None
        _require(len(head) == _HEADER.size, path, "truncated header")
        magic, version, _, n_bundles = _HEADER.unpack(head)
        _require(magic == EXPERTS_MAGIC, path, f"bad magic {magic!r}")
        _require(version == EXPERTS_VERSION, path, f"unsupported experts version {version}")
        _require(n_bundles == self.n_bundles, path, f"header counts {n_bundles} bundles, manifest {self.n_bundles}")
        _require(size == man.experts_file_bytes, path,
                 f"{size} bytes, manifest says {man.experts_file_bytes} (truncated or replaced)")
        if self.n_bundles:
            _require(man.expert_layout is not None, self.path / MANIFEST_FILE, "experts without an expert_layout")
        for li, layer in enumerate(man.experts):
            for ei, e in enumerate(layer):
                where = f"expert table entry layer {li} expert {ei}"
                _require(e.offset % ALIGN == 0 and e.offset >= ALIGN, path, f"{where}: offset {e.offset} not aligned")
                _require(e.offset + _align_up(e.length) <= size, path,
                         f"{where}: bytes {e.offset}..{e.offset + e.length} lie outside the file of {size}")
                _require(e.n_neurons > 0 and e.length == _bundle_bytes(man.expert_layout.layer(li), e.n_neurons), path,
                         f"{where}: length {e.length} does not fit {e.n_neurons} neurons")

    # -- dense block --
    def dense(self) -> dict[str, QTensor | np.ndarray]:
        """Every dense tensor, validated against the manifest."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(self.dense_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(self.dense_path, f"unreadable ({exc})") from None
        for name in self.manifest.tensors:
            self._check_dense(name, _raw_bytes(raw[name]))
        return {name: _decode_dense(name, spec, raw[name], self.dense_path)
                for name, spec in self.manifest.tensors.items()}

    def dense_tensor(self, name: str) -> QTensor | np.ndarray:
        """One dense tensor, validated against the manifest."""
        from safetensors import SafetensorError, safe_open

        spec = self.manifest.tensors.get(name)
        if spec is None:
            raise KeyError(f"no dense tensor {name!r}")
        try:
            with safe_open(str(self.dense_path), framework="numpy") as f:
                arr = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(self.dense_path, f"unreadable tensor {name!r} ({exc})") from None
        self._check_dense(name, _raw_bytes(arr))
        return _decode_dense(name, spec, arr, self.dense_path)

    def read_dense_into(self, buf: np.ndarray) -> dict[str, QTensor | np.ndarray]:
        """Read every dense tensor straight from the file into `buf` (dense_pack's layout, at least
        dense_pack_bytes long), so the block is in memory once; returns views of buf by name.
        Each tensor's checksum is checked as it is read; the file's pages are dropped from the page
        cache after reading."""
        layout, total = dense_pack(self.manifest)
        _require(buf.nbytes >= total and buf.dtype == np.uint8, self.dense_path, "dense buffer too small")
        out: dict[str, QTensor | np.ndarray] = {}
        try:
            with open(self.dense_path, "rb", buffering=0) as f:
                for name, off, n in layout:
                    begin, end = self._dense_header[name]["data_offsets"]
                    f.seek(self._dense_data_start + begin)
                    view = buf[off:off + n]
                    got = f.readinto(memoryview(view))
                    _require(got == n, self.dense_path, f"tensor {name!r}: truncated ({got} of {n} bytes)")
                    self._check_dense(name, view)  # now, while its bytes are in the CPU's cache
                    out[name] = _decode_view(name, self.manifest.tensors[name], view, self._dense_header[name],
                                             self.dense_path)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise FormatError(self.dense_path, f"unreadable ({exc.strerror or exc})") from None
        return out

    def dense_rows(self, name: str) -> "DenseRows":
        """Rows of a 2-D dense tensor read from the file on demand (flash_resident tensors). The
        whole tensor's checksum is checked here, once, so no damaged row reaches the model later."""
        spec = self.manifest.tensors[name]
        _require(spec["fmt"] in kernels.FORMATS and len(spec["shape"]) == 2, self.path / MANIFEST_FILE,
                 f"tensor {name!r}: a {spec['fmt']} {spec['shape']} tensor is not a matrix of weights")
        begin, end = self._dense_header[name]["data_offsets"]
        self._check_on_flash(name, self._dense_data_start + begin, end - begin)
        return DenseRows(self.dense_path, spec["fmt"], (spec["shape"][0], spec["shape"][1]),
                         self._dense_data_start + begin)

    def _check_on_flash(self, name: str, offset: int, n: int) -> None:
        """Checksum a tensor that stays on flash, read through a small buffer (never resident; its
        pages are dropped from the page cache after, as read_dense_into's are)."""
        crc, done, chunk = 0, 0, bytearray(_CHECK_CHUNK)
        try:
            with open(self.dense_path, "rb", buffering=0) as f:
                f.seek(offset)
                while done < n:
                    got = f.readinto(memoryview(chunk)[:min(len(chunk), n - done)])
                    _require(got > 0, self.dense_path, f"tensor {name!r}: truncated ({done} of {n} bytes)")
                    crc = kernels.crc32c(memoryview(chunk)[:got], crc)
                    done += got
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), offset, n, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise FormatError(self.dense_path, f"unreadable ({exc.strerror or exc})") from None
        self._check_crc(name, crc)

    def _check_dense(self, name: str, data: np.ndarray) -> None:
        """`data`: dense tensor `name`'s bytes as read."""
        self._check_crc(name, kernels.crc32c(data))

    def _check_crc(self, name: str, crc: int) -> None:
        if crc != self.manifest.tensors[name]["crc32c"]:
            raise self._damaged(self.dense_path, f"tensor {name!r} is damaged (CRC32C mismatch)")

    def _damaged(self, path: Path, fault: str) -> FormatError:
        """The error for bytes that fail their checksum, which says what to do; first the DAMAGED
        marker `fic ls` shows (best effort: a read-only store keeps none)."""
        man = self.manifest
        message = f"{fault}; run `{repull_command(man.name, man.provenance)}` to fetch and convert it again"
        try:
            (self.path / DAMAGED_FILE).write_text(f"{path.name}: {message}\n", encoding="utf-8")
        except OSError:
            pass
        return FormatError(path, message)

    # -- experts --
    def entry(self, layer: int, expert: int) -> ExpertEntry:
        try:
            return self.manifest.experts[layer][expert]
        except IndexError:
            raise KeyError(f"no expert {expert} in layer {layer}") from None

    def bundle_bytes(self, layer: int, expert: int) -> int:
        """Bytes a destination buffer needs for this bundle (its padded length)."""
        return self.entry(layer, expert).padded_length

    def predictor(self) -> dict[str, QTensor | np.ndarray] | None:
        """The predictor's tensors (predictor_names), each checked against its CRC32C; None when
        the model has none."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        pred = self.manifest.predictor
        if pred is None:
            return None
        path = self.path / pred["file"]
        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(path, f"unreadable ({exc})") from None
        out = {}
        for name, spec in pred["tensors"].items():
            _require(name in raw, path, f"tensor {name!r} listed in the manifest is missing")
            if kernels.crc32c(_raw_bytes(raw[name])) != spec["crc32c"]:
                raise self._damaged(path, f"tensor {name!r} is damaged (CRC32C mismatch)")
            out[name] = _decode_dense(name, spec, raw[name], path)
        return out

    def neuron_order(self, layer: int) -> np.ndarray | None:
        """The original FFN neuron index of each neuron of `layer`, in bundle order, if permuted."""
        name = neuron_order_name(layer)
        if name not in self.manifest.tensors:
            return None
        return self.dense_tensor(name)

    def read_bundles(self, keys: Sequence[tuple[int, int]], dsts: Sequence[np.ndarray]) -> list[Bundle]:
        """Read bundles (layer, expert) into 4 KiB aligned uint8 buffers in one batch, checking
        each checksum; raise FormatError naming the first bad bundle."""
        return self.submit_bundles(keys, dsts).wait()

    def submit_bundles(self, keys: Sequence[tuple[int, int]], dsts: Sequence[np.ndarray]) -> "PendingBundles":
        """Start reading bundles into dsts; PendingBundles.wait() finishes (and checks) the batch."""
        if len(keys) != len(dsts):
            raise ValueError("one destination per bundle")
        entries = [self.entry(l, e) for l, e in keys]
        reqs = [kernels.ReadRequest(e.offset, e.padded_length, dst, e.crc32c) for e, dst in zip(entries, dsts)]
        return PendingBundles(self, list(keys), entries, list(dsts), self._reader.submit(reqs))

    def _check_results(self, keys, entries, results) -> None:
        for (l, x), e, res in zip(keys, entries, results):
            where = f"bundle layer {l} expert {x} at offset {e.offset}"
            _require(res.status != "short", self.experts_path, f"{where}: truncated file")
            if res.status == "crc":
                raise self._damaged(self.experts_path, f"{where}: checksum mismatch")
            if res.status != "ok":
                detail = os.strerror(res.errno) if res.status == "io" else res.status
                raise FormatError(self.experts_path, f"{where}: read failed ({detail})")

    def settle(self) -> None:
        """Wait for any batch of bundle reads still in flight that nobody will collect."""
        self._reader.settle()

    def bundle_view(self, buf: np.ndarray, n_neurons: int, layer: int) -> Bundle:
        layout = self.layout.layer(layer)
        gate_b, up_b, down_b = layout.part_bytes(n_neurons)
        gate = QTensor(layout.gate_fmt, (n_neurons, layout.d_model), buf[:gate_b])
        up = QTensor(layout.up_fmt, (n_neurons, layout.d_model), buf[gate_b:gate_b + up_b])
        down = QTensor(layout.down_fmt, layout.down_shape(n_neurons), buf[gate_b + up_b:gate_b + up_b + down_b])
        return Bundle(gate, up, down, n_neurons, buf[:gate_b + up_b + down_b])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
