"""The memory plan: every byte the engine allocates, under a budget (`--mem`).

    plan = make_plan(manifest, PlanRequest(mem=parse_size("512M"), ctx=2048, mode="exact"))
    plan.lines()      # what `fic show MODEL --mem 512M` prints

The parts: the dense block (one huge-page buffer), the KV cache (fp16), the activation scratch and
kernel workspaces (sized once, for a prefill chunk), the reader's buffers, the tokenizer, a fixed
allowance for the engine's own small objects, and the arena: equal slots of the largest bundle.
A budget that cannot hold the fixed parts plus the smallest arena is refused with the smallest
budget that would work (BudgetError).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from flashinfer_cli import fmt

MODES = ("exact", "prune")
MiB = 1 << 20
HUGE_PAGE = 2 * MiB
# The engine's small objects: arena tables, rope tables are counted apart; this covers numpy
# arrays of a layer's norms, per-request bookkeeping and the C pool's touched thread stacks.
ENGINE_OVERHEAD_BYTES = 4 * MiB
READER_BYTES = 1 * MiB            # io_uring rings and request arrays (queue depth 32)
RING_TARGET_BYTES = 2 * MiB       # a streaming read of about this size keeps the disk busy
PREFILL_CHUNK_MAX = 512
TOKENIZER_FACTOR = 22             # resident bytes of a loaded tokenizer per byte of tokenizer.json (measured: 17-21)
TOKENIZER_IMPORT_BYTES = 12 * MiB  # the tokenizers and jinja2 libraries themselves (measured: 10.6 MiB)


class BudgetError(ValueError):
    """A budget (or --active) the model cannot meet; the message names what would work."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """Bytes of '512M', '1.5G', '800k', '4096' (K/M/G/T are binary: 1K = 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (use e.g. 512M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


AUTO_THRESHOLD = 0.9  # --active auto: the share of each layer's score mass the chosen experts reach
AUTO_FLOOR = 0.25     # ... and never fewer than this share of the layer's experts


@dataclass(frozen=True)
class AutoActive:
    """--active auto[:T] (prune mode): each prompt's active sets sized per layer by the selection
    policy's scores: the fewest experts whose share of the layer's score mass reaches threshold,
    at least floor of the layer's experts, at most the plan's largest fitting size."""

    threshold: float = AUTO_THRESHOLD
    floor: float = AUTO_FLOOR

    def __str__(self) -> str:
        return f"auto:{self.threshold:g}"


def parse_active(text: str | float | None) -> float | int | AutoActive | None:
    """--active: a fraction in (0, 1] (float), a number of active parameters ('300M', '1.5B': int),
    or auto[:T] (AutoActive; T in (0, 1], default AUTO_THRESHOLD)."""
    if text is None or isinstance(text, (int, float, AutoActive)):
        return text
    s = str(text).strip()
    if s.lower() == "auto" or s.lower().startswith("auto:"):
        try:
            threshold = float(s[5:]) if len(s) > 4 else AUTO_THRESHOLD
        except ValueError:
            threshold = math.nan
        if not 0 < threshold <= 1:  # nan fails too
            raise ValueError(f"--active {text!r}: auto takes a score-mass threshold in (0, 1], like auto:0.95")
        return AutoActive(threshold)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmb])", s, re.I)
    if m:
        return int(float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])
    try:
        a = float(s)
    except ValueError:
        raise ValueError(f"--active {text!r}: a fraction in (0, 1] or a parameter count like 300M") from None
    if not 0 < a <= 1:
        raise ValueError(f"--active {text!r}: a fraction must be in (0, 1]")
    return a


@dataclass(frozen=True)
class PlanRequest:
    mem: int | None = None       # bytes; None: everything resident
    ctx: int = 4096
    mode: str = "exact"
    active: float | int | AutoActive | None = None  # fraction of routed experts, active parameters, or auto
    tokenizer_file_bytes: int = 0
    n_threads: int = 1            # the kernel pool's threads (the workspace has a tile per thread)
    kv_dtype: str = "f16"         # the KV cache's element type: f16 (default) or f32


@dataclass
class ModelShape:
    """What the plan needs to know of a model, from its manifest."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_ctx: int
    dense_bytes: int              # the dense tensors packed as the engine packs them
    dense_params: int
    experts_per_layer: list[int]
    slot_bytes: int               # the largest padded bundle
    bundle_bytes_total: int       # every bundle, padded
    expert_params: int            # parameters of one (largest) expert
    max_expert_neurons: int
    moe_top_k: int = 0            # a mixture of experts: the most experts a token routes to in a layer (0: dense)
    shared_neurons: int = 0       # the largest shared expert (in the dense block; a MoE's or a dense model's)

    @classmethod
    def from_manifest(cls, man: fmt.Manifest) -> "ModelShape":
        a = man.arch
        dense = fmt.dense_pack_bytes(man) + fmt.predictor_bytes(man)  # the predictor is dense block too
        # the active parameters a token uses: an embedding left on flash contributes one row
        params = sum(math.prod(s["shape"]) for n, s in man.tensors.items()
                     if s["fmt"] != "i32" and n not in fmt.flash_resident(man))
        entries = [e for layer in man.experts for e in layer]
        slot = max((e.padded_length for e in entries), default=0)
        n_max = max((e.n_neurons for e in entries), default=0)
        rules = man.moe or []
        return cls(n_layers=a["n_layers"], d_model=a["d_model"], d_ff=a["d_ff"], n_heads=a["n_heads"],
                   n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"], vocab_size=a["vocab_size"],
                   max_ctx=a["max_ctx"], dense_bytes=dense, dense_params=params,
                   experts_per_layer=[len(layer) for layer in man.experts], slot_bytes=slot,
                   bundle_bytes_total=sum(e.padded_length for e in entries),
                   expert_params=3 * n_max * a["d_model"], max_expert_neurons=n_max,
                   moe_top_k=max((r.top_k for r in rules), default=0),
                   shared_neurons=max([r.shared_neurons for r in rules] + man.shared_neurons, default=0))

    @property
    def n_experts(self) -> int:
        return sum(self.experts_per_layer)

    @property
    def mean_bundle_bytes(self) -> int:
        """A bundle's padded bytes on average: what a streamed one costs to read, where bundles
        differ (a smaller last expert, ffn_down's format per layer); slot_bytes is the largest."""
        return self.bundle_bytes_total // max(1, self.n_experts)

    @property
    def max_experts_per_layer(self) -> int:
        return max(self.experts_per_layer, default=0)

    @property
    def is_moe(self) -> bool:
        return self.moe_top_k > 0

    @property
    def total_params(self) -> int:
        return self.dense_params + self.n_experts * self.expert_params

    @property
    def routed_params(self) -> int:
        """A mixture of experts: the parameters a token uses (the dense block, its top-k experts
        of each layer); a dense model: every parameter."""
        if not self.is_moe:
            return self.total_params
        return self.dense_params + sum(min(self.moe_top_k, n) for n in self.experts_per_layer) * self.expert_params


@dataclass
class MemoryPlan:
    shape: ModelShape
    request: PlanRequest
    mode: str
    ctx: int
    prefill_chunk: int
    parts: dict[str, int]         # fixed parts: name -> bytes
    n_slots: int                  # arena slots in all, the ring included
    n_ring: int                   # slots reserved for streaming (0 when everything is resident)
    all_resident: bool
    active_per_layer: list[int]   # prune: the active set's size; exact: the experts pinned per layer
    prune: bool                   # only the active sets run (prune mode with a selection)
    notes: list[str] = field(default_factory=list)

    @property
    def slot_bytes(self) -> int:
        return self.shape.slot_bytes

    @property
    def arena_bytes(self) -> int:
        return huge_round(self.n_slots * self.slot_bytes)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.arena_bytes

    @property
    def active_fraction(self) -> float:
        e = self.shape.experts_per_layer
        return sum(self.active_per_layer) / max(1, sum(e))

    @property
    def streamed_bytes_per_token(self) -> int:
        """Exact mode: the bundle bytes a decode step reads (those not resident); for a mixture
        of experts the most it reads (every routed expert a miss)."""
        if self.all_resident or self.prune:
            return 0
        s = self.shape
        if s.is_moe:
            return sum(min(s.moe_top_k, n - k) for n, k in zip(s.experts_per_layer, self.active_per_layer)) \
                * self.slot_bytes
        resident = sum(self.active_per_layer)
        return max(0, self.shape.n_experts - resident) * self.shape.mean_bundle_bytes

    @property
    def active_params(self) -> int:
        if self.shape.is_moe:  # a token runs its top-k whatever the sets hold
            return self.shape.routed_params
        return self.shape.dense_params + sum(self.active_per_layer) * self.shape.expert_params

    @property
    def max_active_per_layer(self) -> int:
        """The largest active set per layer that the arena holds beside the ring."""
        return max_prune_active(self.shape, self.n_slots - self.n_ring)

    def lines(self) -> list[str]:
        s = self.shape
        budget = human(self.request.mem) if self.request.mem else "none (everything resident)"
        out = [f"budget          {budget}, context {self.ctx}, mode {self.mode}"]
        for name, n in self.parts.items():
            out.append(f"  {name:<14}{human(n):>12}")
        out.append(f"  {'arena':<14}{human(self.arena_bytes):>12}  {self.n_slots} slots of {human(self.slot_bytes)}"
                   f" ({self.n_ring} for streaming)")
        out.append(f"  {'total':<14}{human(self.total_bytes):>12}")
        per_layer = sum(self.active_per_layer) / max(1, s.n_layers)
        e_max = s.max_experts_per_layer
        if s.shared_neurons and not s.is_moe:  # cluster.py's shared experts: in the dense block above
            out.append(f"shared experts  up to {s.shared_neurons} neurons per layer in the dense block, always on")
        if self.all_resident:
            out.append(f"experts         all {s.n_experts} resident ({e_max} per layer)")
        else:
            out.append(f"experts         {per_layer:.1f} of {e_max} per layer fit beside the ring")
            k = max_prune_active(s, self.n_slots - self.n_ring)
            if s.is_moe:  # a token reads only its own top-k that are not resident
                worst = self.streamed_bytes_per_token if self.mode == "exact" else \
                    s.n_layers * s.moe_top_k * self.slot_bytes
                out.append(f"exact mode      at most {human(worst)} read per token (every routed expert a miss);"
                           f" the prompt's set is prefetched and pinned, misses are kept while hot")
            else:
                n_stream = max(0, s.n_experts - sum(min(k, n) for n in s.experts_per_layer))
                out.append(f"exact mode      {human(n_stream * s.mean_bundle_bytes)} streamed from flash per token"
                           f" ({n_stream} bundles)")
            params = "" if s.is_moe else \
                f", {(s.dense_params + k * s.n_layers * s.expert_params) / 1e6:.0f}M active parameters"
            out.append(f"prune mode      largest --active {k / max(1, e_max):.2f} ({k} of {e_max} per layer{params})")
        if self.prune and s.is_moe:
            out.append(f"active set      {self.active_fraction:.2f} of the experts; each token's top-{s.moe_top_k} "
                       f"among them (lossy: see fic bench --quality)")
        elif self.prune:
            out.append(f"active set      {self.active_fraction:.2f} of the experts, "
                       f"{self.active_params / 1e6:.0f}M active parameters")
        out.extend(f"note            {n}" for n in self.notes)
        return out


WINDOW_MAX = 64  # prune mode: the recent FFN inputs a reselection rescores, per layer


def window_bytes(shape: ModelShape, chunk: int, mode: str) -> int:
    return shape.n_layers * min(WINDOW_MAX, chunk) * shape.d_model * 4 if mode == "prune" else 0


def statistics_bytes(shape: ModelShape) -> int:
    """The selection's statistics: the scorer's float64 sums per neuron and the engine's copy of
    the cached prompt's (a next prompt that extends it adds to them)."""
    return 2 * shape.n_layers * shape.d_ff * 8


def huge_round(n: int) -> int:
    """Bytes a huge-page buffer of n bytes becomes resident as (whole 2 MiB pages)."""
    return -(-n // HUGE_PAGE) * HUGE_PAGE


def workspace_bytes(shape: ModelShape, chunk: int, n_threads: int) -> int:
    """The kernels' workspaces: kernels.reserve_workspace with the same maxima, and attention's."""
    from flashinfer_cli import kernels

    attention = 4 * kernels.attention_ws_floats(n_threads, chunk, shape.n_heads, shape.head_dim)
    moe = 0
    if shape.is_moe:  # decode's fused MoE layer (kernels.MoEDecode): its workspace and routing outputs
        e = shape.max_experts_per_layer
        moe = kernels.moe_ws_bytes(n_threads, kernels.MoEShape(
            shape.d_model, e, shape.moe_top_k, shared_neurons=shape.shared_neurons,
            max_neurons=max(1, shape.max_expert_neurons))) + 4 * (2 * e + 2 * shape.moe_top_k)
    return kernels.workspace_bytes_for(n_threads=n_threads, **workspace_maxima(shape, chunk)) + attention + moe


def workspace_maxima(shape: ModelShape, chunk: int) -> dict[str, int]:
    return {"max_t": chunk, "max_k": max(shape.d_model, shape.n_heads * shape.head_dim, shape.shared_neurons),
            "max_experts": shape.max_experts_per_layer, "max_neurons": shape.d_ff}


KV_DTYPES = {"f16": 2, "f32": 4}


def kv_bytes(shape: ModelShape, ctx: int, kv_dtype: str = "f16") -> int:
    return 2 * shape.n_layers * ctx * shape.n_kv_heads * shape.head_dim * KV_DTYPES[kv_dtype]  # k and v


def scratch_bytes(shape: ModelShape, chunk: int, ctx: int) -> int:
    """Activations of one prefill chunk of `chunk` tokens (the forward pass and its numpy temporaries)."""
    d, nq = shape.d_model, shape.n_heads * shape.head_dim
    nkv = shape.n_kv_heads * shape.head_dim
    per_token = 4 * (6 * d + 3 * (nq + 2 * nkv) + 2 * nq + 3 * shape.d_ff)
    per_token += 8 * d  # the FFN's fixed-point sums (streaming.FFNRunner: int64 per output)
    # a mixture of experts: router logits, probabilities and coefficients, the shared expert's h
    per_token += 4 * (6 * shape.max_experts_per_layer + 4 * shape.shared_neurons) if shape.is_moe else 0
    logits = 4 * shape.vocab_size * 2
    rope = 3 * 4 * ctx * shape.head_dim  # cos, sin, signed sin tables
    return chunk * per_token + logits + rope


def _fixed_parts(shape: ModelShape, req: PlanRequest, chunk: int) -> dict[str, int]:
    return {
        "dense block": huge_round(shape.dense_bytes),
        "kv cache": kv_bytes(shape, req.ctx, req.kv_dtype),
        "scratch": scratch_bytes(shape, chunk, req.ctx) + window_bytes(shape, chunk, req.mode)
                   + statistics_bytes(shape),
        "reader": READER_BYTES,
        "workspace": workspace_bytes(shape, chunk, req.n_threads),
        "tokenizer": TOKENIZER_IMPORT_BYTES + TOKENIZER_FACTOR * req.tokenizer_file_bytes,
        "engine": ENGINE_OVERHEAD_BYTES,
    }


def ring_slots(shape: ModelShape, free_slots: int | None = None) -> int:
    """Slots of the streaming ring: two halves (one read while the other computes), each about
    RING_TARGET_BYTES / 2 of bundles, no more than a layer's experts; 2 at least."""
    half = max(1, min(shape.max_experts_per_layer, RING_TARGET_BYTES // 2 // max(1, shape.slot_bytes)))
    if free_slots is not None:
        half = max(1, min(half, free_slots // 8))
    return 2 * half


def max_prune_active(shape: ModelShape, pinned_slots: int) -> int:
    """The largest per-layer active count whose sets fit in pinned_slots."""
    return min(shape.max_experts_per_layer, pinned_slots // max(1, shape.n_layers))


def _active_count(shape: ModelShape, active: float | int) -> int:
    e = shape.max_experts_per_layer
    if isinstance(active, float):
        return max(1, min(e, round(active * e)))
    k = (active - shape.dense_params) / max(1, shape.n_layers * shape.expert_params)
    if k < 1:
        raise BudgetError(f"--active {active / 1e6:.0f}M is below the dense block's {shape.dense_params / 1e6:.0f}M "
                          f"parameters plus one expert per layer")
    return min(e, int(k))


def active_sizes(plan: MemoryPlan, active: float | int | AutoActive) -> list[int]:
    """Each layer's active set size for an --active value (a fraction, or active parameters)
    within the arena the plan has; BudgetError when the arena cannot hold the sets. auto: the
    largest that fits (each prompt's selection then takes what its scores need, auto_size)."""
    s = plan.shape
    if isinstance(active, AutoActive):
        return [min(plan.max_active_per_layer, n) for n in s.experts_per_layer]
    e, k, k_max = s.max_experts_per_layer, _active_count(s, active), plan.max_active_per_layer
    if k > k_max:
        where = f"--mem {human(plan.request.mem)}" if plan.request.mem else "this arena"
        raise BudgetError(f"active {k / e:.2f} ({k} of {e} experts per layer) does not fit {where}: "
                          f"at most {k_max} ({k_max / e:.2f}) fits")
    return [min(k, n) for n in s.experts_per_layer]


def auto_size(scores, auto: AutoActive, k_max: int) -> int:
    """A layer's active set size under --active auto: the fewest of its experts whose scores (the
    policy's, for this prompt) sum to threshold of the layer's total, clamped to [floor, k_max].
    A threshold of 1 takes every expert (no expert with a zero score is left out)."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    n = len(s)
    floor = min(k_max, n, max(1, math.ceil(auto.floor * n)))
    if auto.threshold >= 1 or n == 0:
        return min(k_max, n)
    desc = np.sort(np.maximum(s, 0))[::-1]
    total = desc.sum()
    if total <= 0:
        return min(k_max, n)
    k = int(np.searchsorted(np.cumsum(desc) / total, auto.threshold - 1e-12)) + 1
    return max(floor, min(k, k_max, n))


def make_plan(shape: ModelShape, req: PlanRequest) -> MemoryPlan:
    if req.kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache type {req.kv_dtype!r} (choose from {', '.join(KV_DTYPES)})")
    if req.mode not in MODES:
        raise ValueError(f"unknown mode {req.mode!r} (choose from {', '.join(MODES)})")
    ctx = req.ctx
    chunk = PREFILL_CHUNK_MAX
    parts = _fixed_parts(shape, req, chunk)
    everything = sum(parts.values()) + huge_round(shape.n_experts * shape.slot_bytes)
    auto = isinstance(req.active, AutoActive)
    if auto and req.mode != "prune":  # exact mode runs every expert: there is no size to choose
        raise BudgetError(f"--active {req.active}: auto sizes what runs, so it needs prune mode (--mode prune); "
                          f"exact mode runs every expert")
    # auto: the largest that fits, as no --active; each prompt then takes what it needs of it
    k_req = _active_count(shape, req.active) if req.active is not None and not auto else None
    e_max = shape.max_experts_per_layer
    if req.mem is None or req.mem >= everything:
        # everything resident; an explicit --active prunes within it
        k = k_req if k_req is not None else e_max
        return MemoryPlan(shape, req, req.mode, ctx, chunk, parts, shape.n_experts, 0, True,
                          [min(k, n) for n in shape.experts_per_layer],
                          prune=(k_req is not None or auto) and req.mode == "prune")
    # under a budget, prefill chunks small enough that their activations take no more than a
    # sixteenth of it (64 tokens at least: a batch still amortises reading the weights)
    while chunk > 64 and scratch_bytes(shape, chunk, ctx) > req.mem // 16:
        chunk //= 2
    parts = _fixed_parts(shape, req, chunk)
    fixed = sum(parts.values())
    min_ring = 2
    # exact mode on a mixture of experts: room beside the pins for a token's misses of one layer
    reserve = shape.moe_top_k if req.mode == "exact" else 0
    min_arena = huge_round((min_ring + reserve + (shape.n_layers if req.mode == "prune" else 0)) * shape.slot_bytes)
    if fixed + min_arena > req.mem:
        need = fixed + min_arena
        hint = ""
        if parts["kv cache"] > req.mem // 3 and ctx > 256:
            smaller = max(256, ctx // 4)
            hint = f", or a smaller --ctx (the KV cache of {ctx} tokens takes {human(parts['kv cache'])}; --ctx {smaller}"\
                   f" needs {human(need - parts['kv cache'] + kv_bytes(shape, smaller) - parts['scratch'] + scratch_bytes(shape, chunk, smaller))})"
        what = "one expert per layer" if req.mode == "prune" else "the smallest arena"
        raise BudgetError(f"--mem {human(req.mem)} cannot hold the dense block, KV cache, scratch and {what}: "
                          f"the smallest budget that works is {human(need)} (--mem {math.ceil(need / MiB)}M){hint}")
    n_slots = min(shape.n_experts, (req.mem - fixed) // HUGE_PAGE * HUGE_PAGE // shape.slot_bytes)
    n_ring = min(ring_slots(shape, n_slots), n_slots)
    pinned = n_slots - n_ring
    k_fit = max_prune_active(shape, max(0, pinned - reserve))
    if req.mode == "prune":
        if k_req is not None and k_req > k_fit:
            need = fixed + huge_round((n_ring + shape.n_layers * k_req) * shape.slot_bytes)
            raise BudgetError(f"--active {k_req / e_max:.2f} ({k_req} of {e_max} experts per layer) does not fit "
                              f"--mem {human(req.mem)}: at most {k_fit} ({k_fit / e_max:.2f}) fits; "
                              f"--active {k_req / e_max:.2f} needs --mem {math.ceil(need / MiB)}M")
        k = k_req if k_req is not None else k_fit
        if k < 1:
            raise BudgetError(f"--mem {human(req.mem)} leaves no room for one expert per layer in prune mode")
        return MemoryPlan(shape, req, "prune", ctx, chunk, parts, n_slots, n_ring, False,
                          [min(k, n) for n in shape.experts_per_layer], prune=True)
    # exact: every pinned slot holds a selected expert; the rest of each layer streams through the ring
    k = k_fit if k_req is None else min(k_req, k_fit)
    return MemoryPlan(shape, req, "exact", ctx, chunk, parts, n_slots, n_ring, False,
                      [min(k, n) for n in shape.experts_per_layer], prune=False)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo, in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
