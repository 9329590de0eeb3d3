"""The arena: one allocation at open, cut into equal 4 KiB-aligned slots, holding every routed
expert that is in DRAM.

    arena = Arena(reader, n_slots=..., n_ring=...)
    arena.load([(layer, expert), ...], pin=True)   # one batched read of what is missing
    arena.slots(layer, experts)                     # their slot numbers (int32), for the FFN call

A table maps (layer, expert) to a slot. Pinned experts (the active set) are never evicted; every
other resident expert is evictable, least recently used first. The last `n_ring` slots are the
streaming ring: experts read there for one FFN call and not kept (the table never points at them).
Nothing is allocated per request or per token beyond small index arrays.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from flashinfer_cli import fmt, kernels


class ArenaFull(RuntimeError):
    """More experts asked to be resident than there are evictable slots."""


@dataclass
class ArenaStats:
    hits: int = 0            # experts an FFN call found resident
    misses: int = 0          # experts that had to be read (into a slot or streamed through the ring)
    bytes_read: int = 0
    read_seconds: float = 0.0  # time spent waiting for reads (not hidden behind compute)
    evictions: int = 0
    streamed: int = 0        # experts read through the ring (not kept)
    reselections: int = 0
    # a mixture of experts' next-layer prefetch (decode, exact mode): experts predicted by layer
    # l+1's router from layer l's hidden state, those the token then routed to, reads issued for
    # predicted experts not resident, and of those reads the ones the token used
    predicted: int = 0
    predicted_right: int = 0
    prefetched: int = 0
    prefetch_used: int = 0

    def add(self, other: "ArenaStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return asdict(self)


class Arena:
    def __init__(self, reader: fmt.ModelReader, *, n_slots: int, n_ring: int):
        man = reader.manifest
        self.reader = reader
        self.n_layers = len(man.experts)
        self.experts_per_layer = np.array([len(layer) for layer in man.experts], dtype=np.int64)
        e_max = int(self.experts_per_layer.max(initial=0))
        self.slot_bytes = max((e.padded_length for layer in man.experts for e in layer), default=fmt.ALIGN)
        if n_ring > n_slots or n_slots < 1:
            raise ValueError(f"arena of {n_slots} slots cannot reserve {n_ring} for the ring")
        self.n_slots, self.n_ring = n_slots, n_ring
        self.n_cache = n_slots - n_ring           # slots that hold resident experts
        self.buf = kernels.aligned_buffer(n_slots * self.slot_bytes, huge=True)
        self.n_neurons = np.zeros((self.n_layers, e_max), dtype=np.int32)
        self.exists = np.zeros((self.n_layers, e_max), dtype=bool)
        for li, layer in enumerate(man.experts):
            for ei, e in enumerate(layer):
                self.n_neurons[li, ei] = e.n_neurons
                self.exists[li, ei] = True
        self.slot_of = np.full((self.n_layers, e_max), -1, dtype=np.int32)
        self.pinned = np.zeros((self.n_layers, e_max), dtype=bool)
        self.owner = np.full((n_slots, 2), -1, dtype=np.int32)   # (layer, expert) per slot
        self.last_use = np.zeros(n_slots, dtype=np.int64)
        self.ring = np.arange(self.n_cache, n_slots, dtype=np.int32)
        self.tick = 0
        self.version = 0          # changes whenever the table changes
        self.total = ArenaStats()
        self.request = ArenaStats()
        self._prefetch: tuple | None = None  # (keys, slots, pending) of a prefetch in flight

    # -- queries --
    @property
    def n_resident(self) -> int:
        return int((self.slot_of >= 0).sum())

    def experts(self, layer: int) -> np.ndarray:
        return np.arange(int(self.experts_per_layer[layer]))

    def resident(self, layer: int) -> np.ndarray:
        """Experts of `layer` that have a slot, in expert order."""
        return np.flatnonzero(self.slot_of[layer] >= 0)

    def missing(self, layer: int, among: np.ndarray | None = None) -> np.ndarray:
        row = self.slot_of[layer]
        e = self.experts(layer) if among is None else among
        return e[row[e] < 0]

    def slots(self, layer: int, experts: np.ndarray) -> np.ndarray:
        s = self.slot_of[layer, experts]
        if (s < 0).any():
            raise KeyError(f"layer {layer}: experts {experts[s < 0].tolist()} are not resident")
        return s

    def room(self, layer: int, keep: np.ndarray) -> int:
        """Slots a load may fill without evicting a pinned expert or one of `keep` (experts of
        `layer` an FFN call is about to use)."""
        row = self.slot_of[layer, keep]
        return self.n_cache - int(self.pinned.sum()) - int(((row >= 0) & ~self.pinned[layer, keep]).sum())

    def pinned_experts(self, layer: int) -> np.ndarray:
        return np.flatnonzero(self.pinned[layer])

    def touch(self, layer: int, experts: np.ndarray) -> None:
        """An FFN call used these resident experts."""
        self.tick += 1
        self.last_use[self.slot_of[layer, experts]] = self.tick
        self._count(hits=len(experts))

    def touch_slots(self, slots: np.ndarray) -> None:
        """touch() for resident experts whose slots the caller holds (decode's prepared FFN calls)."""
        self.touch_slot_runs(slots, 0, 1)

    def touch_slot_runs(self, slots: np.ndarray, run_of: np.ndarray | int, n_runs: int) -> None:
        """touch_slots of n_runs calls at once: slots[j] was used by call run_of[j] (0..n_runs-1, in
        the calls' order; no slot in two calls), as n_runs touch_slots calls one after another."""
        self.last_use[slots] = self.tick + 1 + run_of
        self.tick += n_runs
        self.total.hits += len(slots)
        self.request.hits += len(slots)

    def view(self, slot: int, n_bytes: int | None = None) -> np.ndarray:
        start = int(slot) * self.slot_bytes
        return self.buf[start:start + (n_bytes or self.slot_bytes)]

    # -- changes --
    def _count(self, **kv) -> None:
        for k, v in kv.items():
            setattr(self.total, k, getattr(self.total, k) + v)
            setattr(self.request, k, getattr(self.request, k) + v)

    def _victims(self, n: int, keep: set[tuple[int, int]], partial: bool = False) -> list[int]:
        """n slots to fill: free ones first, then the least recently used unpinned ones (partial:
        as many as there are, else ArenaFull)."""
        owner = self.owner[:self.n_cache]
        free = np.flatnonzero(owner[:, 0] < 0)
        out = free[:n].tolist()
        if len(out) < n:
            used = np.flatnonzero(owner[:, 0] >= 0)
            order = used[np.argsort(self.last_use[used], kind="stable")]
            layer, expert = owner[order, 0], owner[order, 1]
            ok = ~self.pinned[layer, expert]
            if keep:  # as codes layer * width + expert, one vectorised membership test
                width = self.pinned.shape[1]
                ok &= ~np.isin(layer.astype(np.int64) * width + expert,
                               np.fromiter((l * width + e for l, e in keep), dtype=np.int64, count=len(keep)))
            out += order[ok][:n - len(out)].tolist()
        if len(out) < n and not partial:
            raise ArenaFull(f"{n} experts to load, {len(out)} evictable slots of {self.n_cache}")
        return out

    def _evict(self, slots: list[int]) -> int:
        """Free these slots. Returns how many held an expert. The table first: interrupted between
        the two, a slot is still "used" by an owner the table no longer names (recover() frees it),
        never free while the table points at it."""
        evicted = 0
        for s in slots:
            ol, oe = self.owner[s]
            if ol >= 0:
                if self.slot_of[ol, oe] == s:
                    self.slot_of[ol, oe] = -1
                self.owner[s] = -1
                evicted += 1
        self.version += 1
        return evicted

    # -- a mixture of experts' prefetch: one batch in flight, installed before any other read --
    def submit_prefetch(self, layer: int, experts: np.ndarray, keep: set[tuple[int, int]]) -> int:
        """Start reading the experts of `layer` that are not resident into evictable slots (free
        ones, then the least recently used unpinned ones not in `keep`); they enter the table when
        finish_prefetch installs them. Returns the number of reads issued."""
        self.finish_prefetch()
        todo = [(layer, int(e)) for e in experts if self.slot_of[layer, e] < 0]
        if not todo:
            return 0
        victims = self._victims(len(todo), keep | set(todo), partial=True)
        todo = todo[:len(victims)]
        if not todo:
            return 0
        evicted = self._evict(victims)
        dsts = [self.view(s, self.reader.bundle_bytes(l, e)) for s, (l, e) in zip(victims, todo)]
        self._prefetch = (todo, victims, self.reader.submit_bundles(todo, dsts))
        self._count(prefetched=len(todo), bytes_read=sum(d.nbytes for d in dsts), evictions=evicted)
        return len(todo)

    def finish_prefetch(self) -> list[tuple[int, int]]:
        """Wait for the prefetch in flight and put its experts in the table; returns them."""
        p, self._prefetch = self._prefetch, None
        if p is None:
            return []
        keys, slots, pending = p
        t0 = time.perf_counter()
        pending.wait(views=False)  # a bad bundle raises here, before the table names it
        self._count(read_seconds=time.perf_counter() - t0)
        self.tick += 1
        for s, (l, e) in zip(slots, keys):
            self.owner[s] = (l, e)
            self.slot_of[l, e] = s
            self.last_use[s] = self.tick
        self.version += 1  # the table changed (streaming.FFNRunner keys its prepared calls on it)
        return keys

    def load(self, keys: Sequence[tuple[int, int]], *, pin: bool = False) -> int:
        """Make (layer, expert) pairs resident with one batched read of those missing; pin them if
        asked. Returns the number read."""
        self.finish_prefetch()
        keys = [(int(l), int(e)) for l, e in keys]
        todo = [(l, e) for l, e in keys if self.slot_of[l, e] < 0]
        hits = len(keys) - len(todo)
        if todo:
            victims = self._victims(len(todo), set(keys))
            evicted = self._evict(victims)
            t0 = time.perf_counter()
            dsts = [self.view(s, self.reader.bundle_bytes(l, e)) for s, (l, e) in zip(victims, todo)]
            self.reader.read_bundles(todo, dsts)
            n_bytes = sum(d.nbytes for d in dsts)
            self._count(misses=len(todo), bytes_read=n_bytes, read_seconds=time.perf_counter() - t0,
                        evictions=evicted)
            for s, (l, e) in zip(victims, todo):
                # the owner first: interrupted between the two, the slot is merely used (and
                # evictable), never a table entry whose slot another expert may take
                self.owner[s] = (l, e)
                self.slot_of[l, e] = s
        if hits:
            self._count(hits=hits)
        self.tick += 1
        for l, e in keys:
            self.last_use[self.slot_of[l, e]] = self.tick
            if pin:
                self.pinned[l, e] = True
        return len(todo)

    def set_pins(self, layer: int, experts: np.ndarray) -> None:
        """The pinned set of `layer` becomes exactly `experts` (which must be resident)."""
        if (self.slot_of[layer, experts] < 0).any():
            raise KeyError(f"layer {layer}: cannot pin experts that are not resident")
        self.pinned[layer] = False
        self.pinned[layer, experts] = True

    def unpin_all(self) -> None:
        self.pinned[:] = False

    def load_all(self) -> None:
        """Every expert of the model, in one batched read (the arena must hold them all)."""
        keys = [(l, e) for l in range(self.n_layers) for e in range(int(self.experts_per_layer[l]))]
        if len(keys) > self.n_cache:
            raise ArenaFull(f"{len(keys)} experts do not fit {self.n_cache} slots")
        self.load(keys)

    # -- the streaming ring --
    def submit_ring(self, layer: int, experts: np.ndarray, ring_slots: np.ndarray) -> "fmt.PendingBundles":
        """Start reading experts of `layer` into the given ring slots (not kept in the table)."""
        self.finish_prefetch()
        keys = [(layer, int(e)) for e in experts]
        dsts = [self.view(s, self.reader.bundle_bytes(layer, int(e))) for s, e in zip(ring_slots, experts)]
        n_bytes = sum(d.nbytes for d in dsts)
        self._count(misses=len(keys), streamed=len(keys), bytes_read=n_bytes)
        return self.reader.submit_bundles(keys, dsts)

    def wait(self, pending: "fmt.PendingBundles", *, transform: bool = True) -> None:
        """A ring read landed and checked; transform=False: its bundles stay as stored until
        pending.transform() (the caller starts its next read first)."""
        t0 = time.perf_counter()
        pending.wait(transform=transform, views=False)
        self._count(read_seconds=time.perf_counter() - t0)

    def settle(self, pending: "fmt.PendingBundles") -> None:
        """Let a read whose bytes will not be used land (unchecked) before its slots are reused."""
        t0 = time.perf_counter()
        pending.settle()
        self._count(read_seconds=time.perf_counter() - t0)

    def count_reselection(self) -> None:
        self._count(reselections=1)

    def recover(self) -> None:
        """After a request that stopped anywhere (Ctrl-C between any two statements, a read
        error): nothing of it is left in flight on the reader, and the slot owners are rebuilt
        from the table (the table is the truth: load and eviction change it so that it never
        names a slot that holds something else)."""
        self._prefetch = None  # its slots are free in the table: forgotten, the reader settled
        self.reader.settle()
        where = np.argwhere(self.slot_of >= 0).astype(np.int32)
        owner = np.full_like(self.owner, -1)
        owner[self.slot_of[self.slot_of >= 0]] = where
        if not np.array_equal(owner, self.owner):
            self.owner[:] = owner
            self.version += 1
        self.pinned &= self.slot_of >= 0

    def begin_request(self) -> None:
        """A new request: fresh statistics, and whatever an abandoned one left recovered."""
        self.recover()
        self.request = ArenaStats()

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken rule of the tables: the table and the slot
        owners are one mapping, the ring holds nothing of the table, pins are resident experts
        that exist, the counts agree. Cheap (array operations); tests call it after requests."""
        def rule(ok, what: str) -> None:
            if not ok:
                raise AssertionError(f"arena: {what}")

        owner, slot_of = self.owner, self.slot_of
        rule(slot_of.shape == self.pinned.shape == self.exists.shape, "table shapes differ")
        rule((owner[self.ring] < 0).all(), "a ring slot in the table")
        where = np.argwhere(slot_of >= 0)
        slots = slot_of[slot_of >= 0]
        rule(((slot_of >= -1) & (slot_of < self.n_cache)).all(), "a table entry outside the cache slots")
        rule(len(np.unique(slots)) == len(slots), "two experts in one slot")
        rule(self.exists[slot_of >= 0].all(), "a slot holds an expert the model does not have")
        rule((owner[slots] == where).all(), "a table entry whose slot names another owner")
        owned = np.flatnonzero(owner[:, 0] >= 0)
        rule(((owner[:, 0] >= 0) == (owner[:, 1] >= 0)).all(), "a half-written slot owner")
        rule((slot_of[owner[owned, 0], owner[owned, 1]] == owned).all(), "a slot owner the table does not point back to")
        rule(len(owned) == len(slots) == self.n_resident <= self.n_cache, "resident counts disagree")
        rule(not (self.pinned & (slot_of < 0)).any(), "a pinned expert that is not resident")
        rule(not (self.pinned & ~self.exists).any(), "a pin on an expert the model does not have")
        rule((self.last_use <= self.tick).all(), "a slot used after the clock")
        for st in (self.total, self.request):
            rule(all(v >= 0 for v in st.as_dict().values()), "a negative statistic")
            rule(st.streamed <= st.misses, "more streamed than missed")
        for k, v in self.request.as_dict().items():
            rule(v <= getattr(self.total, k) + 1e-9, f"request {k} above the total")

    def stats(self) -> dict:
        return {"request": self.request.as_dict(), "total": self.total.as_dict(),
                "resident": self.n_resident, "pinned": int(self.pinned.sum()), "slots": self.n_slots,
                "ring": self.n_ring, "slot_bytes": self.slot_bytes}
