"""What the fuzz tests (test_fuzz.py) share: how many inputs, the per-example deadline and
allocation bound, and the mutations that derive hostile inputs from valid seed files.

Inputs are derived from valid seeds, two ways:
    byte mutations   flips, set bytes, integers written over (4 or 8 bytes, the widths of binary
                     headers), runs of one byte (deep nesting: "[[[[..."), insertions, deletions,
                     duplicated chunks, truncations; positions mostly inside the seed's header
    JSON mutations   a value anywhere in the seed's tree replaced by a hostile one (wrong types,
                     huge and negative numbers, NaN, names that climb out of a directory, lone
                     surrogates, empty and deep containers), a key dropped or added

A test draws a list of operations and applies them itself, so a failure prints the few operations
that make it (and an @example can pin them), not the whole mutated file.

FIC_FUZZ_EXAMPLES sets the inputs per reader (CI: 10,000); FIC_FUZZ_DEADLINE the seconds one
input may take before it counts as a hang.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import resource
import signal
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FIC_FUZZ_EXAMPLES", "10000"))
DEADLINE_SECONDS = float(os.environ.get("FIC_FUZZ_DEADLINE", "10"))

# No hypothesis deadline (a busy CI machine would make it flaky); deadline() below stops a hang.
# Phases: no targeting or explaining (they cost per input and tell little here).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
                phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))


def peak_heap_bytes(fn) -> int:
    """Peak bytes the Python heap grew by while fn ran (its exception, if any, swallowed): what a
    reader allocated before it refused a hostile claim."""
    tracemalloc.start()
    try:
        try:
            fn()
        except Exception:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Hang(BaseException):
    """An input that ran past the per-example deadline: a test failure, never an accepted error
    (a BaseException, so no reader's `except Exception` can turn it into its named error)."""


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_SECONDS) -> Iterator[None]:
    """Raise Hang in the test if the block runs longer than `seconds` (SIGALRM: the main thread)."""
    def on_alarm(signum, frame):
        raise Hang(f"one input ran over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class AllocationMeter:
    """Two bounds on what an input may make a reader allocate.

    Every input: the process's address space is capped (RLIMIT_AS) at what it had when the meter
    started plus HEADROOM, so an allocation sized by a hostile count (2^60 tensors, a 1 TB tensor)
    fails at once with MemoryError, which no reader may turn into its named error.
    One input in SAMPLE: the Python heap's peak (tracemalloc: Python objects and numpy's buffers)
    must stay within a bound proportional to the input. (tracemalloc triples a reader's time, so
    it samples; the explicit tests of huge headers measure every one of theirs.)"""

    HEADROOM = 2 << 30
    SAMPLE = int(os.environ.get("FIC_FUZZ_TRACE_EVERY", "4"))

    def __init__(self):
        self._n = 0
        self._old = None

    def __enter__(self) -> "AllocationMeter":
        try:
            self._old = resource.getrlimit(resource.RLIMIT_AS)
            used = _address_space()
            if used is not None:
                hard = self._old[1]
                soft = used + self.HEADROOM
                if hard == resource.RLIM_INFINITY or soft < hard:
                    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except (OSError, ValueError):
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            resource.setrlimit(resource.RLIMIT_AS, self._old)

    @contextlib.contextmanager
    def bound(self, limit: int, what: str = "") -> Iterator[None]:
        self._n += 1
        if self._n % self.SAMPLE:
            yield
            return
        was = tracemalloc.is_tracing()
        if not was:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            yield
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if not was:
                tracemalloc.stop()
        assert peak <= limit, f"{what}: allocated {peak:,} bytes at the peak, the bound is {limit:,}"


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ---- the operations: decoded from one drawn byte string ------------------------------------
#
# Each input is one st.binary draw, decoded here into mutation operations: hypothesis spends
# about as long on one draw of bytes as on one of an integer, and several times longer on the
# nested strategies the operations would otherwise need; shrinking bytes still shrinks the
# operations (fewer, smaller). A test notes the decoded operations, which a failure prints.

OPS = st.binary(min_size=1, max_size=48)


class Stream:
    """Reads choices from a byte string; past its end every choice is the first."""

    def __init__(self, data: bytes):
        self.data, self.i = data, 0

    def more(self) -> bool:
        return self.i < len(self.data)

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        if n <= 1:
            return 0
        width = ((n - 1).bit_length() + 7) // 8
        raw = self.data[self.i:self.i + width]
        self.i += width
        return int.from_bytes(raw, "little") % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return self.below(2) == 1


INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 31, 32, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                    0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 60, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
INTERESTING_BYTES = b'\x00\x01\x7f\x80\xff"{}[],:\\-09 e.\n'
BYTE_KINDS = ("xor", "set", "int", "run", "insert", "delete", "dup", "truncate")


def byte_ops(stream: Stream, hot: int, size: int, max_ops: int = 4) -> list[tuple]:
    """Operations on a file of `size` bytes whose first `hot` bytes are its header (most
    positions fall there)."""
    ops = []
    while stream.more() and len(ops) < max_ops:
        kind = stream.choice(BYTE_KINDS)
        pos = stream.below(size + 1) if stream.below(4) == 0 else stream.below(hot + 1)
        if kind == "xor":
            ops.append((kind, pos, 1 + stream.below(255)))
        elif kind == "set":
            ops.append((kind, pos, stream.choice(INTERESTING_BYTES)))
        elif kind == "int":
            ops.append((kind, pos, stream.choice((4, 8)), stream.choice(INTERESTING_INTS)))
        elif kind == "run":
            ops.append((kind, pos, stream.choice(b'[{"0 \x00'), stream.choice((2, 64, 5000, 100_000))))
        elif kind == "insert":
            n = 1 + stream.below(8)
            ops.append((kind, pos, bytes(stream.below(256) for _ in range(n))))
        elif kind in ("delete", "dup"):
            ops.append((kind, pos, 1 + stream.below(256)))
        else:
            ops.append((kind, pos))
    return ops


def apply_byte_ops(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind, p = op[0], min(op[1], len(buf))
        if kind == "xor" and p < len(buf):
            buf[p] ^= op[2]
        elif kind == "set" and p < len(buf):
            buf[p] = op[2]
        elif kind == "int":
            width, value = op[2], op[3]
            buf[p:p + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == "run":
            buf[p:p] = bytes([op[2]]) * op[3]
        elif kind == "insert":
            buf[p:p] = op[2]
        elif kind == "delete":
            del buf[p:p + op[2]]
        elif kind == "dup":
            buf[p:p] = buf[p:p + op[2]]
        elif kind == "truncate":
            del buf[p:]
    return bytes(buf)


# ---- JSON mutations ------------------------------------------------------------------------

HOSTILE_STRINGS = ("", "x", "..", ".", "../../../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "a\x00b",
                   "\ud800", "manifest.json", "dense.safetensors", "experts.bin", "DAMAGED", "~", "x" * 5000,
                   "f32", "f16", "q8_0", "q4_0", "q4_1", "q1_0", "i32", "F32", "BF16", "U8", "I64", "columns",
                   "rows", "fic-model", "{{ x }}", "<|im_end|>", "Ġ", "a b", "BPE", "ByteLevel", "Sequence")
HOSTILE_NUMBERS = (0, 1, -1, 2, 3, 31, 32, 33, 4095, 4096, 4097, 1 << 31, 1 << 32, 1 << 53, (1 << 63) - 1,
                   1 << 63, 1 << 64, 1 << 100, -(1 << 63), 0.5, -0.0, 1e308, math.inf, -math.inf, math.nan)


def hostile_value(stream: Stream, depth: int = 0) -> Any:
    """A JSON value: wrong types, extreme numbers, names that climb out of a directory, lone
    surrogates, empty and small containers of the same."""
    k = stream.below(9)
    if k == 0:
        return None
    if k == 1:
        return stream.flag()
    if k == 2:
        return stream.choice(HOSTILE_NUMBERS)
    if k == 3:
        return stream.choice(HOSTILE_STRINGS)
    if k == 4:
        return stream.below(300) - 5
    if k == 5:
        return bytes(stream.below(256) for _ in range(stream.below(6))).decode("latin-1")
    if k == 6 and depth < 3:
        return [hostile_value(stream, depth + 1) for _ in range(stream.below(3))]
    if k == 7 and depth < 3:
        return {stream.choice(HOSTILE_STRINGS): hostile_value(stream, depth + 1) for _ in range(stream.below(3))}
    return stream.choice(([], {}, [[]], "", 0))


JSON_KINDS = ("replace", "replace", "replace", "drop", "add", "wrap", "grow")


def json_ops(stream: Stream, n_paths: int, max_ops: int = 3) -> list[tuple]:
    """Operations on a JSON document with n_paths paths (json_paths)."""
    ops = []
    while stream.more() and len(ops) < max_ops:
        kind, where = stream.choice(JSON_KINDS), stream.below(n_paths)
        if kind == "replace":
            ops.append((kind, where, hostile_value(stream)))
        elif kind == "add":
            ops.append((kind, where, stream.choice(HOSTILE_STRINGS), hostile_value(stream)))
        elif kind == "grow":
            ops.append((kind, where, stream.choice((2, 100, 2000))))
        else:
            ops.append((kind, where))
    return ops


class Seed:
    """A seed with a short repr, so a failure's report does not print the whole file."""

    def __init__(self, name: str, **parts: Any):
        self.name = name
        self.__dict__.update(parts)

    def __repr__(self) -> str:
        return f"Seed({self.name!r})"


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) into a JSON value, the root included; long lists and big
    objects are sampled at their ends so a vocabulary does not swamp the rest."""
    out = [prefix]
    if isinstance(value, dict):
        keys = list(value)
        for k in keys if len(keys) <= 16 else keys[:3] + keys[-2:]:  # a vocabulary: its ends
            out += json_paths(value[k], prefix + (k,))
    elif isinstance(value, list):
        idx = range(len(value)) if len(value) <= 8 else [0, 1, 2, len(value) - 2, len(value) - 1]
        for i in idx:
            out += json_paths(value[i], prefix + (i,))
    return out


def apply_json_ops(doc: Any, paths: list[tuple], ops) -> Any:
    """`doc` (a JSON value, or its text: parsing it again is quicker than a deep copy) changed by ops."""
    doc = json.loads(doc) if isinstance(doc, (str, bytes)) else copy.deepcopy(doc)
    for op in ops:
        path = paths[op[1]]
        parent, key = None, None
        node = doc
        try:
            for k in path:
                if not isinstance(node, (dict, list)) or isinstance(node, list) != isinstance(k, int):
                    raise KeyError(k)
                parent, key, node = node, k, node[k]
        except (KeyError, IndexError):
            continue  # an earlier operation changed the tree
        kind = op[0]
        if kind == "replace":
            if parent is None:
                doc = op[2]
            else:
                parent[key] = op[2]
        elif kind == "drop" and parent is not None:
            del parent[key]
        elif kind == "add" and isinstance(node, dict):
            node[op[2]] = op[3]
        elif kind == "add" and isinstance(node, list):
            node.append(op[3])
        elif kind == "wrap":
            if parent is None:
                doc = [node]
            else:
                parent[key] = [node]
        elif kind == "grow" and isinstance(node, list) and node:
            node[:] = (node * op[2])[:max(len(node), op[2])]
    return doc


def dumps(doc: Any) -> bytes:
    """JSON as a writer would put it (NaN and infinities as Python writes them)."""
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def mutate(seed: Seed, stream: Stream) -> tuple[bytes, list]:
    """A seed with .data (and .hot: its header's length) and, for a JSON document, .doc and
    .paths: mutated as JSON or as bytes, as the stream says. (bytes, the operations)."""
    if getattr(seed, "doc", None) is not None and stream.flag():
        ops = json_ops(stream, len(seed.paths))
        return dumps(apply_json_ops(getattr(seed, "text", seed.doc), seed.paths, ops)), ["json"] + ops
    ops = byte_ops(stream, seed.hot, len(seed.data))
    return apply_byte_ops(seed.data, ops), ["bytes"] + ops


# ---- GGUF: a writer that writes anything, valid or not -------------------------------------

# gguf.GGUFValueType
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}


def _gguf_value(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:  # (item type, items) or (item type, items, the count the file claims)
        itype, items = value[0], value[1]
        count = len(items) if len(value) < 3 else value[2]
        return struct.pack("<IQ", itype & 0xFFFFFFFF, count & (2**64 - 1)) + b"".join(_gguf_value(itype, v) for v in items)
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        return b""  # an unknown type: its value cannot be written
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, float(value))
    bits = struct.calcsize(fmt) * 8
    v = int(value) & ((1 << bits) - 1)
    if fmt[1].islower() and v >= 1 << (bits - 1):
        v -= 1 << bits
    return struct.pack(fmt, v)


def gguf_bytes(kvs: list, tensors: list, data: bytes, *, version: int = 3, alignment: int = 32,
               counts: tuple[int | None, int | None] = (None, None)) -> bytes:
    """A GGUF file: kvs [(key, type, value)] (an array's value is (item type, items)), tensors
    [(name, dims, ggml type, offset into data)], then the data at the alignment. counts overrides
    the tensor and key counts the header claims."""
    n_tensors = len(tensors) if counts[0] is None else counts[0]
    n_kv = len(kvs) if counts[1] is None else counts[1]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_tensors & (2**64 - 1), n_kv & (2**64 - 1)))
    for key, vtype, value in kvs:
        out += _gguf_value(STR, key) + struct.pack("<I", vtype & 0xFFFFFFFF) + _gguf_value(vtype, value)
    for name, dims, ttype, offset in tensors:
        out += _gguf_value(STR, name) + struct.pack("<I", len(dims) & 0xFFFFFFFF)
        out += b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in dims)
        out += struct.pack("<IQ", ttype & 0xFFFFFFFF, offset & (2**64 - 1))
    out += b"\0" * (-len(out) % alignment)
    return bytes(out) + data


def gguf_parts(path) -> tuple[list, list, bytes]:
    """(kvs, tensors, data) of a GGUF file, as gguf_bytes takes them (to mutate and write back)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kvs = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = int(f.types[0])
        value = (int(f.types[-1]), f.contents()) if vtype == ARR else f.contents()
        kvs.append((name, vtype, value))
    tensors = [(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data_offset - r.data_offset)
               for t in r.tensors]
    data = bytes(r.data[r.data_offset:])
    return kvs, tensors, data


# ---- GGUF mutations ------------------------------------------------------------------------

GGUF_KEYS = ("general.architecture", "general.alignment", "general.name", "general.file_type",
             "tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eot_token_id",
             "tokenizer.ggml.eom_token_id", "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.merges", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.token_type", "tokenizer.ggml.tokens")
GGUF_ARCH_KEYS = ("attention.head_count", "attention.head_count_kv", "attention.key_length",
                  "attention.layer_norm_rms_epsilon", "block_count", "context_length", "embedding_length",
                  "feed_forward_length", "rope.dimension_count", "rope.freq_base",
                  "rope.scaling.original_context_length", "rope.scaling.type")
_GGUF_INTS = INTERESTING_INTS + (-1, -(1 << 31), -(1 << 63), 2, 16, 64, 4096)
_GGUF_FLOATS = (0.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 0.5, 1e-6, 10000.0, 3.4e38)
_GGUF_STRS = (b"", b"llama", b"qwen2", b"qwen3", b"gpt2", b"llama", b"\xff\xfe", b"x" * 1000, b"default",
              b"llama-bpe", b"qwen2", b"smollm", b"none", b"linear", b"yarn", b"a b", b"\xc3", b"<|im_end|>", "Ġ".encode())


def hostile_gguf_value(stream: Stream, depth: int = 0) -> tuple[int, Any]:
    """(value type, value): every type GGUF has and two it has not, extreme values of each."""
    vtype = stream.choice((U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64, 13, 0xFFFFFFFF))
    if vtype in (F32, F64):
        return vtype, stream.choice(_GGUF_FLOATS)
    if vtype == BOOL:
        return vtype, stream.choice((0, 1, 2, 255))
    if vtype == STR:
        return vtype, stream.choice(_GGUF_STRS)
    if vtype == ARR:
        if depth >= 2:
            return vtype, (U8, [])
        itype, item = hostile_gguf_value(stream, depth + 1)
        items = [item if itype != ARR else item for _ in range(stream.below(4))]
        if stream.below(4) == 0:  # a count the items do not fill
            return vtype, (itype, items, stream.choice(_GGUF_INTS))
        return vtype, (itype, items)
    return vtype, stream.choice(_GGUF_INTS)


GGUF_KINDS = ("kv", "kv", "kv", "kv_drop", "kv_dup", "kv_add", "kv_add", "t_dims", "t_type", "t_off", "t_name",
              "t_drop", "t_dup", "counts", "version", "item", "item", "item")


def gguf_ops(stream: Stream, kvs: list, tensors: list, arch: str, max_ops: int = 3) -> list[tuple]:
    """Operations on a GGUF file's parts (gguf_parts)."""
    ops = []
    arrays = [i for i, kv in enumerate(kvs) if kv[1] == ARR]
    while stream.more() and len(ops) < max_ops:
        kind = stream.choice(GGUF_KINDS)
        if kind == "kv":
            ops.append((kind, stream.below(len(kvs)), hostile_gguf_value(stream)))
        elif kind in ("kv_drop", "kv_dup"):
            ops.append((kind, stream.below(len(kvs))))
        elif kind == "kv_add":
            key = stream.choice(GGUF_KEYS) if stream.flag() else f"{arch}.{stream.choice(GGUF_ARCH_KEYS)}"
            ops.append((kind, key, hostile_gguf_value(stream)))
        elif kind == "t_dims":
            ops.append((kind, stream.below(len(tensors)), stream.choice(
                ("empty", "zero", "huge", "wrap", "many", "plus1", "swap", "first"))))
        elif kind == "t_type":
            ops.append((kind, stream.below(len(tensors)), stream.choice(tuple(range(42)) + (1 << 31,))))
        elif kind == "t_off":
            ops.append((kind, stream.below(len(tensors)), stream.choice((0, 1, 31, 32, 4096, 1 << 40, 1 << 63))))
        elif kind == "t_name":
            ops.append((kind, stream.below(len(tensors)), stream.below(len(tensors)),
                        stream.choice(("other", "", "\udcff", "blk.99.attn_q.weight", "output.weight"))))
        elif kind in ("t_drop", "t_dup"):
            ops.append((kind, stream.below(len(tensors))))
        elif kind == "counts":
            ops.append((kind, stream.below(2), stream.choice((0, -1, 1, 1 << 32, 1 << 60, (1 << 64) - 1))))
        elif kind == "version":
            ops.append((kind, stream.choice((0, 1, 2, 4, 1 << 16))))
        elif kind == "item" and arrays:  # one element of an array (tokens, token types, merges)
            ops.append((kind, stream.choice(arrays), stream.below(1 << 16), stream.choice(
                ("", "dup", "\udcff", "x" * 300, " ", "a b c", "Ġ Ġ", -1, 1 << 31, 3, 4, 2, 99))))
    return ops


def _hostile_dims(dims: list[int], how: str) -> list[int]:
    return {"empty": [], "zero": [0] + dims[1:], "huge": [1 << 63] + dims[1:], "wrap": [1 << 32, 1 << 32],
            "many": [1] * 9 + dims, "plus1": [d + 1 for d in dims], "swap": dims[::-1], "first": dims[:1]}[how]


def apply_gguf_ops(kvs: list, tensors: list, ops) -> tuple[list, list, dict]:
    """(kvs, tensors, options for gguf_bytes) after ops."""
    kvs, tensors, opts = list(kvs), [list(t) for t in tensors], {"counts": [None, None]}
    for op in ops:
        kind = op[0]
        if kind == "kv" and op[1] < len(kvs):
            kvs[op[1]] = (kvs[op[1]][0],) + op[2]
        elif kind == "kv_drop" and op[1] < len(kvs):
            del kvs[op[1]]
        elif kind == "kv_dup" and op[1] < len(kvs):
            kvs.append(kvs[op[1]])
        elif kind == "kv_add":
            kvs = [kv for kv in kvs if kv[0] != op[1]] + [(op[1],) + op[2]]
        elif kind.startswith("t_") and op[1] < len(tensors):
            t = tensors[op[1]]
            if kind == "t_dims":
                t[1] = _hostile_dims(list(t[1]), op[2])
            elif kind == "t_type":
                t[2] = op[2]
            elif kind == "t_off":
                t[3] = op[2]
            elif kind == "t_name":
                t[0] = tensors[op[2] % len(tensors)][0] if op[3] == "other" else op[3]
            elif kind == "t_drop":
                del tensors[op[1]]
            elif kind == "t_dup":
                tensors.append(list(t))
        elif kind == "counts":
            opts["counts"][op[1]] = op[2]
        elif kind == "version":
            opts["version"] = op[1]
        elif kind == "item" and op[1] < len(kvs):
            key, vtype, value = kvs[op[1]]
            if vtype != ARR or not value[1]:
                continue
            items = list(value[1])
            i, new = op[2] % len(items), op[3]
            if new == "dup":
                new = items[(i + 1) % len(items)]
            if isinstance(new, str) != isinstance(items[i], str):
                new = str(new) if isinstance(items[i], str) else len(str(new))
            items[i] = new
            kvs[op[1]] = (key, vtype, (value[0], items))
    opts["counts"] = tuple(opts["counts"])
    return kvs, [tuple(t) for t in tensors], opts


# ---- GGUF seeds --------------------------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GGUF_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz.,!?Ġ")
               + ["Ġt", "he", "Ġthe", "in", "Ġa"])
GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def write_seed_gguf(path: Path, arch: str = "llama", *, rope_freqs: bool = False, pre: str = "llama-bpe") -> Path:
    """A one-layer model of the smallest sizes, with a byte-level BPE tokenizer and a chat
    template: F32 norms, F16 and Q8_0 matrices (kept types), llama3 rope factors if asked."""
    import gguf
    import numpy as np

    from flashinfer_cli.checkpoint import llama3_factors

    rng = np.random.default_rng(1)
    d, heads, kv, hd, ff, vocab = 32, 2, 1, 16, 64, len(GGUF_TOKENS)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(GGUF_TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(GGUF_MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", llama3_factors({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}, hd, 10000.0))
    w.add_tensor("token_embd.weight", f(vocab, d).astype(np.float16))
    w.add_tensor("output_norm.weight", f(d))
    w.add_tensor("blk.0.attn_norm.weight", f(d))
    w.add_tensor("blk.0.ffn_norm.weight", f(d))
    for name, shape in (("attn_q", (heads * hd, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
                        ("attn_output", (d, heads * hd))):
        w.add_tensor(f"blk.0.{name}.weight", f(*shape).astype(np.float16))
    if arch == "qwen2":
        for name, n in (("attn_q", heads * hd), ("attn_k", kv * hd), ("attn_v", kv * hd)):
            w.add_tensor(f"blk.0.{name}.bias", f(n))
    for name, shape in (("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
        w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(f(*shape), gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


