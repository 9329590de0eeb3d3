"""Convert a checkpoint (checkpoint.py) into a fic model (fmt.py): dense tensors in the dense block,
each layer's FFN cut into experts of `expert_size` neurons and written as bundles.

What is quantized: float weights become `options.quant`; norms and biases stay f32. GGUF tensors in a
format fic shares with ggml (F32, F16, Q8_0, Q4_0, Q4_1, Q1_0, Q5_0, Q4_K, Q6_K) are kept byte for byte;
other GGUF types are dequantized with the gguf package and requantized to `options.quant`, and the
manifest notes how many and how far the weights moved (relative RMS error, measured here).

K-quants (Q4_K, Q6_K) span 256 weights along a row: gate/up rows split into experts of any size, but
an expert's columns of ffn_down are whole blocks only when the expert size is a multiple of 256. The
default expert size is rounded up to the down format's block; an explicit size that is not a multiple
has down requantized to `options.quant` (noted in the manifest).
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashinfer_cli import fmt, kernels
from flashinfer_cli.checkpoint import (KEPT_GGUF_TYPES, Checkpoint, CheckpointError, SourceTensor,
                                       open_checkpoint, sha256_file)
from flashinfer_cli.kernels import QTensor

QUANT_CHOICES = kernels.QUANTIZABLE  # f32, f16, q8_0, q4_0, q4_1, q1_0, q5_0 (K-quants are only kept)
K_QUANTS = tuple(f for f in kernels.FORMATS if f not in kernels.QUANTIZABLE)


DEFAULT_EXPERT_SIZE = 64  # see bench/RESULTS.md (quality per expert size)


class ConvertError(Exception):
    """A conversion that cannot proceed; the message is one line."""


@dataclass
class ConvertOptions:
    quant: str = "q8_0"           # format for weights that are converted: QUANT_CHOICES
    expert_size: int | None = None  # neurons per expert; None: DEFAULT_EXPERT_SIZE, rounded up to the down block
    down_layout: str = "columns"  # fmt.DOWN_LAYOUTS
    bundle_order: str = "auto"    # fmt.BUNDLE_ORDERS, or auto: fmt.default_bundle_order

    def check(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ConvertError(f"unknown quantization {self.quant!r} (choose from {', '.join(QUANT_CHOICES)})")
        if self.expert_size is not None and self.expert_size < 1:
            raise ConvertError(f"expert size must be positive, got {self.expert_size}")
        if self.down_layout not in fmt.DOWN_LAYOUTS:
            raise ConvertError(f"unknown down layout {self.down_layout!r} (choose from {', '.join(fmt.DOWN_LAYOUTS)})")
        if self.bundle_order not in ("auto", *fmt.BUNDLE_ORDERS):
            raise ConvertError(f"unknown bundle order {self.bundle_order!r} (choose from auto, "
                               f"{', '.join(fmt.BUNDLE_ORDERS)})")


# ---- formats -------------------------------------------------------------------------------

def _source_fmt(st: SourceTensor, options: ConvertOptions) -> str:
    """The format a matrix ends up in when nothing forces another: its own if kept, else options.quant."""
    return KEPT_GGUF_TYPES[st.src_type] if st.kept else options.quant


def to_qtensor(value: np.ndarray | QTensor, fmt_name: str) -> QTensor:
    """`value` in format `fmt_name`: as it is when it already is, else (re)quantized."""
    if isinstance(value, QTensor):
        if value.fmt == fmt_name:
            return value
        value = kernels.dequantize(value)
    if value.dtype == np.float16 and fmt_name == "f16":
        return QTensor("f16", value.shape, np.ascontiguousarray(value).view(np.uint8).reshape(-1))
    return kernels.quantize(np.ascontiguousarray(value, dtype=np.float32), fmt_name)


def as_float(value: np.ndarray | QTensor) -> np.ndarray:
    if isinstance(value, QTensor):
        return kernels.dequantize(value) if value.fmt not in ("f32", "f16") else \
            value.data.view(np.float32 if value.fmt == "f32" else np.float16).reshape(value.shape).astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def column_slice(qt: QTensor, start: int, stop: int) -> QTensor:
    """Columns [start, stop) of a row-major quantized matrix: whole blocks of every row, copied."""
    m, k = qt.shape
    bw, bb = kernels.block_weights(qt.fmt), kernels.block_bytes(qt.fmt)
    if start % bw or (stop % bw and stop != k):
        raise ValueError(f"columns [{start}, {stop}) do not fall on {qt.fmt} block boundaries")
    rows = qt.data.reshape(m, kernels.row_bytes(qt.fmt, k))
    return QTensor(qt.fmt, (m, stop - start), np.ascontiguousarray(rows[:, start // bw * bb: stop // bw * bb]).reshape(-1))


# ---- measured requantization ---------------------------------------------------------------

@dataclass
class _Moved:
    """Weights that changed value in conversion (quantized sources requantized), with their error."""

    types: Counter = field(default_factory=Counter)
    err_sq: float = 0.0
    ref_sq: float = 0.0
    worst: tuple[float, str] = (0.0, "")

    def add(self, name: str, src_type: str, ref: np.ndarray, new: QTensor | np.ndarray, chunk: int = 4096) -> None:
        e = r = 0.0
        for start in range(0, ref.shape[0], chunk):  # by rows: a whole dequantized copy can be a GB
            stop = min(start + chunk, ref.shape[0])
            got = as_float(new.rows(start, stop) if isinstance(new, QTensor) else new[start:stop])
            want = ref[start:stop].astype(np.float64)
            e += float(np.sum((got - want) ** 2))
            r += float(np.sum(want ** 2))
        self.types[src_type] += 1
        self.err_sq += e
        self.ref_sq += r
        rel = (e / r) ** 0.5 if r else 0.0
        self.worst = max(self.worst, (rel, name))

    @property
    def count(self) -> int:
        return sum(self.types.values())

    def note(self, what: str, quant: str) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        rel = (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0
        return (f"{self.count} tensors ({types}) {what} and requantized to {quant}: relative RMS change of "
                f"those weights {rel:.3e} (worst {self.worst[1]}: {self.worst[0]:.3e})")


# ---- the conversion ------------------------------------------------------------------------

@dataclass
class _Plan:
    layout: fmt.ExpertLayout
    requant_reason: dict[str, str]  # ffn role -> why kept tensors of that role are requantized


# a MoE layer's routed experts: the source tensors whose matrices become bundles, one per expert
_MOE_ROLES = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}
# routers stay f32 whatever --quant says: a rounded router logit can change which experts a token picks
_ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp")


def _down_block(layout: fmt.ExpertLayout) -> int:
    """Neurons per down block in every layer (block sizes are powers of two: the largest)."""
    return max(kernels.block_weights(f) for f in (layout.down_fmts or (layout.down_fmt,)))


def _plan_layout(ck: Checkpoint, options: ConvertOptions) -> _Plan:
    c = ck.config
    roles = {}
    reasons = {}
    layer_downs = None  # ffn_down's kept format per layer, when the file's differ between layers
    for role in ("ffn_gate", "ffn_up", "ffn_down"):
        src = _MOE_ROLES[role] if ck.moe else role
        per_layer = [_source_fmt(ck.tensors[f"blk.{i}.{src}"], options) for i in range(c.n_layers)]
        fmts = set(per_layer)
        if role == "ffn_down" and options.down_layout == "rows":
            roles[role] = options.quant  # the transposed slice is quantized anew
            if any(ck.tensors[f"blk.{i}.{src}"].kept and fmts != {options.quant} for i in range(c.n_layers)):
                reasons[role] = "transposed for the rows down layout"
        elif len(fmts) == 1:
            roles[role] = fmts.pop()
        elif role == "ffn_down":  # columns: each layer keeps its own (the expert size may still join them)
            roles[role], layer_downs = per_layer[0], per_layer
        else:  # one format for all layers: the kept ones join options.quant
            roles[role] = options.quant
            reasons[role] = f"in formats that differ between layers ({', '.join(sorted(fmts))})"
    layout = fmt.ExpertLayout.per_layer(c.d_model, roles["ffn_gate"], roles["ffn_up"],
                                        layer_downs or [roles["ffn_down"]] * c.n_layers, options.down_layout)
    for role, f in (("ffn_gate", layout.gate_fmt), ("ffn_up", layout.up_fmt), ("ffn_down", layout.down_fmt)):
        if c.d_model % kernels.block_weights(f) and not (role == "ffn_down" and options.down_layout == "columns"):
            raise ConvertError(f"d_model {c.d_model} is not a multiple of {f}'s block of {kernels.block_weights(f)}")
    names = "/".join(sorted(set(layout.down_fmts or (layout.down_fmt,))))
    if ck.moe:  # an expert is the model's own: every bundle holds one routed expert whole
        size = c.d_ff // ck.moe[0].n_routed
        if options.expert_size is not None and options.expert_size != size:
            raise ConvertError(f"--expert-size {options.expert_size}: a mixture of experts keeps its own experts "
                               f"({size} neurons each)")
        options.expert_size = size
        if options.down_layout == "columns" and size % _down_block(layout) and layout.down_fmts is not None:
            reasons["ffn_down"] = (f"experts of {size} neurons are not a whole number of {names}'s block of "
                                   f"{_down_block(layout)}")
            layout = dataclasses.replace(layout, down_fmt=options.quant, down_fmts=None)
        bw = _down_block(layout)
        if options.down_layout == "columns" and size % bw:
            raise ConvertError(f"experts of {size} neurons are not a whole number of {layout.down_fmt}'s block of {bw} "
                               f"for the columns down layout; use --down-layout rows")
    elif options.down_layout == "columns":
        bw = _down_block(layout)
        if options.expert_size is None:  # the default suits the file: a whole number of down blocks
            options.expert_size = -(-DEFAULT_EXPERT_SIZE // bw) * bw
        if options.expert_size % bw and (layout.down_fmts is not None or layout.down_fmt in K_QUANTS):
            # a K-quant block (256 neurons) would straddle experts: down joins options.quant
            reasons["ffn_down"] = f"expert size {options.expert_size} is not a multiple of {names}'s block of {bw}"
            layout = dataclasses.replace(layout, down_fmt=options.quant, down_fmts=None)
            bw = _down_block(layout)
        if options.expert_size % bw or c.d_ff % bw:
            raise ConvertError(f"expert size {options.expert_size} (and d_ff {c.d_ff}) must be multiples of "
                               f"{layout.down_fmt}'s block of {bw} for the columns down layout; "
                               f"choose another expert size or --down-layout rows")
    return _Plan(layout, reasons)


class _Converter:
    def __init__(self, ck: Checkpoint, options: ConvertOptions, writer: fmt.ModelWriter, plan: _Plan):
        self.ck, self.options, self.w, self.plan = ck, options, writer, plan
        self.foreign = _Moved()   # GGUF types fic has no kernel for
        self.joined = _Moved()    # kept types requantized so that every layer shares one layout

    def _convert(self, st: SourceTensor, value: np.ndarray | QTensor, target: str,
                 transpose: bool = False) -> QTensor | np.ndarray:
        """`value` in `target`, measuring the change when a quantized source is requantized."""
        measure = st.requantized or (isinstance(value, QTensor) and (value.fmt != target or transpose))
        if transpose:
            value = np.ascontiguousarray(as_float(value).T)
        ref = as_float(value) if measure else None
        if target in ("f32", "f16") and not isinstance(value, QTensor):
            out = np.ascontiguousarray(value, dtype=np.float32 if target == "f32" else np.float16)
        else:
            out = to_qtensor(value, target)
        if measure:
            (self.foreign if st.requantized else self.joined).add(st.name, st.src_type, ref, out)
        return out

    def dense(self, st: SourceTensor) -> None:
        value = st.load()
        if len(st.shape) == 1 or st.name.endswith(_ROUTERS):  # norms, biases and routers: f32
            self.w.add_dense(st.name, as_float(value).reshape(st.shape))
            return
        target = _source_fmt(st, self.options)
        self.w.add_dense(st.name, self._convert(st, value, target))

    def ffn(self, layer: int) -> None:
        lay, size, t = self.plan.layout, self.options.expert_size, self.ck.tensors
        gate_st, up_st, down_st = (t[f"blk.{layer}.{r}"] for r in ("ffn_gate", "ffn_up", "ffn_down"))
        gate = to_qtensor(self._convert(gate_st, gate_st.load(), lay.gate_fmt), lay.gate_fmt)
        up = to_qtensor(self._convert(up_st, up_st.load(), lay.up_fmt), lay.up_fmt)
        rows = lay.down_layout == "rows"
        lay = lay.layer(layer)
        down = to_qtensor(self._convert(down_st, down_st.load(), lay.down_fmt, transpose=rows), lay.down_fmt)
        d_ff = gate.shape[0]
        for start in range(0, d_ff, size):
            stop = min(start + size, d_ff)
            part = down.rows(start, stop) if rows else column_slice(down, start, stop)
            self.w.add_expert(layer, gate.rows(start, stop), up.rows(start, stop), part)
        # identity: the routing issue will cluster neurons and record its permutation here
        self.w.set_neuron_order(layer, np.arange(d_ff, dtype=np.int32))

    def moe_ffn(self, layer: int) -> None:
        """A MoE layer's routed experts, one bundle each, one expert in memory at a time."""
        lay, t = self.plan.layout.layer(layer), self.ck.tensors
        gate_st, up_st, down_st = (t[f"blk.{layer}.{r}"] for r in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        rows = lay.down_layout == "rows"
        for j in range(gate_st.shape[0]):
            gate = to_qtensor(self._convert(gate_st, gate_st.load_expert(j), lay.gate_fmt), lay.gate_fmt)
            up = to_qtensor(self._convert(up_st, up_st.load_expert(j), lay.up_fmt), lay.up_fmt)
            down = to_qtensor(self._convert(down_st, down_st.load_expert(j), lay.down_fmt, transpose=rows),
                              lay.down_fmt)
            self.w.add_expert(layer, gate, up, down)

    def notes(self) -> list[str]:
        out = []
        if self.foreign.count:
            out.append(self.foreign.note("in GGUF types fic has no kernel for were dequantized with the gguf "
                                         "package", self.options.quant))
        if self.joined.count:
            why = "; ".join(f"{r}: {w}" for r, w in self.plan.requant_reason.items())
            out.append(self.joined.note(f"kept-format FFN weights were dequantized ({why})", self.options.quant))
        return out


def _provenance(ck: Checkpoint, options: ConvertOptions, extra: dict | None) -> dict[str, Any]:
    hashes = {str(f.relative_to(ck.path)) if ck.kind == "hf" else f.name: sha256_file(f) for f in ck.files}
    return {"source": str(ck.path.resolve()), "kind": ck.kind, "sha256": hashes,
            "converter": {"name": "fic", **asdict(options)}, **(extra or {})}


def _tokenizer_spec(ck: Checkpoint):
    from flashinfer_cli import tokenizer  # the tokenizer module is only needed here

    try:
        if ck.kind == "gguf":
            return tokenizer.spec_from_gguf(ck.gguf_reader)
        return tokenizer.spec_from_hf_dir(ck.path)
    except Exception as exc:  # the tokenizer module's own errors: one line, naming the source
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConvertError(f"{ck.path}: cannot build the tokenizer ({detail})") from None


def _tensor_order(ck: Checkpoint) -> list[tuple[str, Any]]:
    """Work items: dense tensors and one FFN item per layer, in file-friendly order."""
    items: list[tuple[str, Any]] = []
    ffn_done = set()
    for st in ck:
        parts = st.name.split(".")
        if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            layer = int(parts[1])
            if layer not in ffn_done:
                ffn_done.add(layer)
                items.append(("ffn", layer))
        elif parts[0] == "blk" and parts[2] in _MOE_ROLES.values():
            layer = int(parts[1])
            if layer not in ffn_done:
                ffn_done.add(layer)
                items.append(("moe", layer))
        else:
            items.append(("dense", st))
    return items


def _bundle_order(ck: Checkpoint, options: ConvertOptions, layout: fmt.ExpertLayout) -> str:
    """options.bundle_order resolved: auto is fmt.default_bundle_order; r32 where the bundles cannot
    take it is an error."""
    sizes = fmt.expert_sizes(ck.config.d_ff // ck.moe[0].n_routed if ck.moe else ck.config.d_ff, options.expert_size)
    if options.bundle_order == "auto":
        return fmt.default_bundle_order(layout, sizes)
    if options.bundle_order == "r32" and not fmt.r32_storable(layout, sizes):
        raise ConvertError("bundle order r32 needs Q1_0 experts with the columns down layout and sizes multiples "
                           "of 128")
    return options.bundle_order


def convert(source: Path, dest: Path, *, name: str, options: ConvertOptions = ConvertOptions(),
            provenance: dict | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert a Hugging Face layout directory or a .gguf file into a fic model at `dest`, atomically.
    Raises ConvertError with a one-line message."""
    options.check()
    options = dataclasses.replace(options)  # the resolved expert size is written into this copy
    source, dest = Path(source), Path(dest)
    try:
        ck = open_checkpoint(source)
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    plan = _plan_layout(ck, options)
    if options.expert_size is None:
        options.expert_size = DEFAULT_EXPERT_SIZE
    options.bundle_order = _bundle_order(ck, options, plan.layout)
    spec = _tokenizer_spec(ck)
    tokenizer_entry = spec.manifest_entry()
    from tqdm import tqdm

    items = _tensor_order(ck)
    try:
        writer = fmt.ModelWriter(dest, name=name, arch=ck.config.to_json(), layout=plan.layout,
                                 provenance=_provenance(ck, options, provenance), tokenizer=tokenizer_entry,
                                 overwrite=overwrite, moe=ck.moe, bundle_order=options.bundle_order)
    except FileExistsError:
        raise ConvertError(f"{dest}: already exists") from None
    except OSError as exc:
        raise ConvertError(f"{dest}: cannot write ({exc.strerror})") from None
    try:
        with writer, tqdm(items, desc=f"converting {name}", unit="tensor", file=sys.stderr,
                          disable=not progress, leave=False) as bar:
            conv = _Converter(ck, options, writer, plan)
            for kind, item in bar:
                if kind == "ffn":
                    conv.ffn(item)
                elif kind == "moe":
                    conv.moe_ffn(item)
                else:
                    conv.dense(item)
            for text in conv.notes():
                writer.note(text)
            _add_tokenizer_file(writer, spec.tokenizer_json)
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    except ValueError as exc:  # a shape or format the kernels refuse
        raise ConvertError(f"{source}: {exc}") from None
    except OSError as exc:
        raise ConvertError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    return dest


def _add_tokenizer_file(writer: fmt.ModelWriter, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        writer.add_file(tmp, "tokenizer.json")
    finally:
        os.unlink(tmp)
