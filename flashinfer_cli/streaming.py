"""A layer's FFN from the arena: resident experts where they lie, the missing ones streamed from
flash through the ring, the next read always in flight while the current piece computes.

For a layer the runner (1) starts reading the first piece of the missing experts into one half of
the ring (unless it is already in flight: the previous layer prefetched it), (2) runs the resident
experts (one fic_experts_ffn call over their slots), (3) for each piece: waits for it, starts the
next read (this layer's next piece or the next layer's first), runs the piece. The FFN output is
the sum over every expert the layer runs: in exact mode all of them, in prune mode only the active
set. With the columns down layout the calls add into a fixed-point accumulator (FIC_FFN_FIXED), each
expert's contribution rounded on its own, added to the float output once the layer is done: the
sum does not depend on which experts were resident and which were streamed, so exact mode under
any budget computes the full model's output bit for bit, int8 decode included (whose rounding
would otherwise turn a 1e-7 difference in the order of float sums into an answer that parts).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from flashinfer_cli import kernels
from flashinfer_cli.arena import Arena


def _ffn_over_slots(layout, arena: Arena, slots: np.ndarray, n_neurons: np.ndarray, x: np.ndarray,
                    y: np.ndarray, region: np.ndarray) -> None:
    """y += FFN over the experts in these slots (one fic_experts_ffn_slots call); region receives
    their h. slots and n_neurons come from the arena's int32 tables: no conversion per call."""
    kernels.experts_ffn_slots(layout, arena.buf, arena.slot_bytes, slots.astype(np.int32, copy=False),
                              n_neurons.astype(np.int32, copy=False), x, y, scratch=region)


class _Piece:
    def __init__(self, layer: int, experts: np.ndarray, slots: np.ndarray, pending):
        self.layer, self.experts, self.slots, self.pending = layer, experts, slots, pending


class FFNRunner:
    def __init__(self, arena: Arena, layout, max_tokens: int):
        self.arena, self.layout = arena, layout
        self.n_layers = arena.n_layers
        self.layouts = [layout.layer(i) for i in range(self.n_layers)]  # each layer's, made once
        d_ff = int(arena.n_neurons.sum(axis=1).max(initial=0))
        self.max_tokens = max_tokens
        self.scratch = np.empty(max(1, max_tokens * d_ff), dtype=np.float32)  # one layer's h, sized once
        d = int(layout.d_model)
        self.fixed = layout.down_layout == "columns"
        # the layer's fixed-point sums (plan.scratch_bytes counts them); zero between layers
        self.acc = np.zeros(max(1, max_tokens * d) if self.fixed else 0, dtype=np.int64)
        self._acc_dirty = False  # a layer's calls began and were not flushed (an error between)
        self._acc1 = self.acc[:d] if self.fixed else self.acc
        self._flush1 = kernels.FixedFlush(self._acc1)
        half = arena.n_ring // 2
        self.halves = [arena.ring[:half], arena.ring[half:2 * half]] if half else []
        self._next_half = 0
        self._pending: _Piece | None = None
        self.active: list[np.ndarray | None] = [None] * self.n_layers  # None: every expert runs
        self.prune = False
        self._predicted: dict[int, np.ndarray] = {}  # layer -> the experts the previous layer predicted for it
        self.wrap = False  # prefetch layer 0's first piece after the last layer (every step runs full)
        # per layer, the prepared one-token call over its run set while all of it is resident:
        # (arena version, full, prune, active array, run set, kernels.SlotsFFN); checked, not rebuilt,
        # each decode step
        self._resident: list[tuple | None] = [None] * self.n_layers
        self._active_u8: list[tuple | None] = [None] * self.n_layers  # (active array, its uint8 mask)

    # -- which experts a layer runs --
    def run_set(self, layer: int, full: bool) -> np.ndarray:
        a = self.active[layer]
        return self.arena.experts(layer) if (full or not self.prune or a is None) else a

    def active_mask(self, layer: int) -> np.ndarray | None:
        """Prune mode: a boolean mask of the layer's active set (None: every expert may run)."""
        a = self.active[layer]
        if not self.prune or a is None:
            return None
        mask = np.zeros(int(self.arena.experts_per_layer[layer]), dtype=bool)
        mask[a] = True
        return mask

    def active_u8(self, layer: int) -> np.ndarray | None:
        """active_mask as uint8, made once per active set (decode's MoE routing in C reads it)."""
        a = self.active[layer]
        if not self.prune or a is None:
            return None
        held = self._active_u8[layer]
        if held is None or held[0] is not a:
            mask = np.zeros(int(self.arena.experts_per_layer[layer]), dtype=np.uint8)
            mask[a] = 1
            held = self._active_u8[layer] = (a, mask)
        return held[1]

    def _cached_resident(self, layer: int, full: bool) -> tuple | None:
        c = self._resident[layer]
        if c is not None and c[0] == self.arena.version and c[1] == full and c[2] == self.prune \
                and c[3] is self.active[layer]:
            return c
        return None

    def _resident_call(self, layer: int, full: bool) -> tuple | None:
        """(run set, prepared call, their slots) when every expert the layer runs is resident, else None."""
        c = self._cached_resident(layer, full)
        if c is None:
            run = self.run_set(layer, full)
            slots = self.arena.slot_of[layer, run]
            if not len(run) or (slots < 0).any():
                return None
            call = kernels.SlotsFFN(self.layouts[layer], self.arena.buf, self.arena.slot_bytes, slots,
                                    self.arena.n_neurons[layer, run], self.scratch)
            c = self._resident[layer] = (self.arena.version, full, self.prune, self.active[layer], run, call,
                                         slots.astype(np.intp))
        return c[4], c[5], c[6]

    def resident_calls(self, full: bool) -> list[tuple] | None:
        """Every layer's (run set, prepared call, slots), as _resident_call, when every layer's run
        set is resident (a decode token then needs no read: one C call can run all layers); None
        as soon as one layer misses something."""
        out = []
        for layer in range(self.n_layers):
            rc = self._resident_call(layer, full)
            if rc is None:
                return None
            out.append(rc)
        return out

    def begin_fused(self, y: np.ndarray) -> np.ndarray:
        """Before the layers' calls run in one C call on one token's y: what they add into, as for
        a layer's calls (_target: the accumulator, cleared if a failed call left it dirty, and
        marked dirty until end_fused; or y itself without fixed point)."""
        return self._target(y)

    def end_fused(self) -> None:
        """The fused call returned: every layer flushed its sums (the accumulator is zero)."""
        self._acc_dirty = False

    def _missing(self, layer: int, full: bool) -> np.ndarray:
        return self.arena.missing(layer, self.run_set(layer, full))

    # -- reads --
    def _submit(self, layer: int, experts: np.ndarray) -> _Piece:
        if not self.halves:
            raise RuntimeError("experts to stream but the arena has no ring")
        slots = self.halves[self._next_half][:len(experts)]
        self._next_half ^= 1
        return _Piece(layer, experts, slots, self.arena.submit_ring(layer, experts, slots))

    def _take(self, layer: int, experts: np.ndarray) -> _Piece:
        p, self._pending = self._pending, None
        if p is not None:
            if p.layer == layer and np.array_equal(p.experts, experts):
                return p
            self.arena.settle(p.pending)  # a stale prefetch: let it land before its half is reused
        return self._submit(layer, experts)

    def drop_prefetch(self) -> None:
        """Forget a read in flight (the residency or the active sets changed): forgotten before it
        lands, and let land unchecked, so a read that failed is not waited for again by the next call
        and nothing of it is used."""
        p, self._pending = self._pending, None
        if p is not None:
            self.arena.settle(p.pending)

    def _prefetch_after(self, layer: int, full: bool) -> None:
        nxt = layer + 1
        if nxt == self.n_layers:
            if not self.wrap:
                return
            nxt = 0
        if self._cached_resident(nxt, full) is not None:  # nothing of it is missing
            return
        miss = self._missing(nxt, full)
        if len(miss):
            self._pending = self._submit(nxt, miss[:len(self.halves[0])])

    # -- the FFN --
    def _target(self, y: np.ndarray) -> np.ndarray:
        """What a layer's calls add into: the fixed-point accumulator shaped as y (zero: _finish
        clears it, and a layer that failed half way is cleared here), or y itself."""
        if not self.fixed:
            return y
        if self._acc_dirty:
            self.acc[:] = 0
        self._acc_dirty = True
        # one token: the same view every step, so that a prepared call keeps its pointers
        return self._acc1 if y.shape == self._acc1.shape else self.acc[:y.size].reshape(y.shape)

    def _finish(self, target: np.ndarray, y: np.ndarray) -> None:
        """y += the layer's fixed-point sums, which are cleared."""
        if target is self._acc1:
            self._flush1(y)
        elif target is not y:
            kernels.fixed_flush(target.reshape(-1), y.reshape(-1))
        self._acc_dirty = False

    def run(self, layer: int, x: np.ndarray, y: np.ndarray, *, full: bool,
            collect: Callable[[int, int, list], None] | None = None, prefetch: bool = True) -> None:
        """y += FFN_layer(x) (x, y float32 (d,) or (t, d)); full: every expert of the layer runs
        (exact mode, or scoring in prune mode), else the active set; collect(layer, t, calls)
        receives each call's experts and h."""
        t = 1 if x.ndim == 1 else x.shape[0]
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens in one FFN call, the scratch holds {self.max_tokens}")
        if x.ndim == 1 and self._run_resident(layer, x, y, full, collect, prefetch):
            return
        out = self._target(y)
        arena = self.arena
        run = self.run_set(layer, full)
        res = run[arena.slot_of[layer, run] >= 0]
        miss = run[arena.slot_of[layer, run] < 0]
        half = len(self.halves[0]) if self.halves else 1
        pieces = [miss[i:i + half] for i in range(0, len(miss), half)]
        pending = self._take(layer, pieces[0]) if pieces else None
        if not pieces and prefetch and self._pending is None:
            self._prefetch_after(layer, full)
        calls, off = [], 0
        nn = arena.n_neurons[layer]
        if len(res):
            arena.touch(layer, res)
            n = int(nn[res].sum()) * t
            region = self.scratch[off:off + n]
            _ffn_over_slots(self.layouts[layer], arena, arena.slot_of[layer, res], nn[res], x, out, region)
            calls.append((res, region))
            off += n
        for i, piece in enumerate(pieces):
            arena.wait(pending.pending, transform=False)
            cur = pending
            if i + 1 < len(pieces):
                pending = self._submit(layer, pieces[i + 1])
            elif prefetch:
                self._prefetch_after(layer, full)
            cur.pending.transform()  # with the next read in flight
            n = int(nn[piece].sum()) * t
            region = self.scratch[off:off + n]
            _ffn_over_slots(self.layouts[layer], arena, cur.slots, nn[piece], x, out, region)
            calls.append((piece, region))
            off += n
        self._finish(out, y)
        if collect is not None:
            collect(layer, t, calls)

    def _run_resident(self, layer: int, x: np.ndarray, y: np.ndarray, full: bool, collect, prefetch: bool) -> bool:
        """One token over a layer whose run set is all resident, through its prepared call (what
        run does in that case, without rebuilding the call); False when something is missing."""
        rc = self._resident_call(layer, full)
        if rc is None:
            return False
        res, call, slots = rc
        if prefetch and self._pending is None:
            self._prefetch_after(layer, full)
        self.arena.touch_slots(slots)
        out = self._target(y)
        call(x, out)
        self._finish(out, y)
        if collect is not None:
            collect(layer, 1, [(res, call.scratch)])
        return True

    # -- a mixture of experts: per-token routing --
    def run_routed(self, layer: int, x: np.ndarray, y: np.ndarray, coef: np.ndarray,
                   prefetch: tuple[int, np.ndarray] | None = None) -> None:
        """y += Σ_e coef[:, e] expert_e(x) over the experts some token routes to (coef (t, E), or
        (E,) for one token, zero where a token does not route). The missing ones are read in one
        batch into the arena (evicting the least recently used unpinned experts: a miss is kept
        while it is hot) when it has room beside the pins, else streamed through the ring.
        prefetch: (next layer, its predicted experts): their reads are issued once this layer's
        own are done, to land while this layer computes and the next one attends."""
        arena = self.arena
        landed = arena.finish_prefetch()
        t = 1 if x.ndim == 1 else x.shape[0]
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens in one FFN call, the scratch holds {self.max_tokens}")
        c2 = coef.reshape(t, -1)
        need = np.flatnonzero(c2.any(axis=0))
        pred = self._predicted.pop(layer, None)
        if pred is not None:  # how the previous layer's guess for this one fared
            used = set(need.tolist())
            arena._count(predicted=len(pred), predicted_right=len(used & set(pred.tolist())),
                         prefetch_used=sum(1 for l, e in landed if l == layer and e in used))
        if not len(need):
            return
        resident = arena.slot_of[layer, need] >= 0
        miss = need[~resident]
        if len(miss) and len(miss) <= arena.room(layer, need):
            arena.load([(layer, int(e)) for e in need])  # hits counted for the resident ones
            res, miss = need, need[:0]
        else:
            res = need[resident]
            if len(res):
                arena.touch(layer, res)
        if prefetch is not None and not len(miss):  # one batch in flight: never beside the ring's
            nxt, experts = prefetch
            self._predicted[nxt] = experts
            arena.submit_prefetch(nxt, experts, {(layer, int(e)) for e in need})
        nn, off = arena.n_neurons[layer], 0
        out = self._target(y)

        def call(experts: np.ndarray, slots: np.ndarray) -> None:
            nonlocal off
            cf = np.ascontiguousarray(c2[:, experts])
            n = int(nn[experts].sum()) * t
            kernels.experts_ffn_slots(self.layouts[layer], arena.buf, arena.slot_bytes, slots.astype(np.int32, copy=False),
                                      nn[experts], x, out, coef=cf[0] if x.ndim == 1 else cf,
                                      scratch=self.scratch[off:off + n])
            off += n

        if len(res):
            call(res, arena.slot_of[layer, res])
        if len(miss):
            half = len(self.halves[0]) if self.halves else 1
            pieces = [miss[i:i + half] for i in range(0, len(miss), half)]
            pending = self._take(layer, pieces[0])
            for i, piece in enumerate(pieces):
                arena.wait(pending.pending, transform=False)
                cur = pending
                if i + 1 < len(pieces):
                    pending = self._submit(layer, pieces[i + 1])
                cur.pending.transform()  # with the next read in flight
                call(piece, cur.slots)
        self._finish(out, y)
