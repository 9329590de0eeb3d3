"""The engine's one thread in `fic serve`: requests wait in a bounded queue and run one at a time
on the one engine (and its one arena), each token handed to the request's event loop as it comes.

    worker = EngineWorker(engine, max_waiting=16)
    worker.start()
    job = Job(GenerationRequest(ids, max_tokens=64), loop, asyncio.Queue())
    worker.submit(job)          # raises Busy when max_waiting jobs already wait
    event = await job.events.get()   # Text(...) per piece of text, then Done(Summary) or Failed
    job.cancel()                # a client that went away: the generation stops at its next token

The engine is not thread-safe: only this thread drives it, and it holds `lock` while it does, so
`snapshot()` (the /metrics figures, from any thread) reads a consistent arena between two tokens.
Stop strings end a generation here too (StopText), since they decide when the engine stops.
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from flashinfer_cli.engine import Engine


@dataclass(frozen=True)
class GenerationRequest:
    """What a request asks of the engine, checked (serve_api.py) before it is queued."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    active: str | float | int | None = None  # prune mode: the size of this prompt's active sets


@dataclass
class Summary:
    """How a generation went, with the engine's figures for it (usage, the page's figures, /metrics)."""

    finish_reason: str            # stop, length, or cancelled (the client went away)
    prompt_tokens: int
    cached_tokens: int            # of the prompt, reused from the KV cache
    completion_tokens: int
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    queue_seconds: float = 0.0
    prompt_tokens_per_s: float = 0.0
    tokens_per_s: float = 0.0     # decode: the steps after the first token
    mode: str = ""
    policy: str = ""
    active: float = 1.0           # the share of the experts that ran (exact mode: all of them)
    selected: float = 1.0         # the share chosen from the prompt (exact mode: kept resident, the rest streamed)
    active_params: int = 0
    arena: dict[str, Any] = field(default_factory=dict)  # this request's hits, misses, bytes read, ...

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prefilled_tokens": self.prefilled_tokens}


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    summary: Summary


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500  # 503: the server is shutting down


class Busy(RuntimeError):
    """The queue of waiting requests is full."""


class StopText:
    """Cuts generated text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:n])), default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Job:
    """One request's generation: its events go to the asyncio queue of the loop that asked."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        self.request, self.loop, self.events = request, loop, events
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Text | Done | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled.set()


@dataclass
class Counters:
    served: int = 0       # requests answered to the end
    cancelled: int = 0    # requests whose client went away
    rejected: int = 0     # 503: the queue was full
    failed: int = 0       # the engine raised
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    decode_seconds: float = 0.0
    busy_seconds: float = 0.0


_STOP = object()
SHUTTING_DOWN = "the server is shutting down"


class EngineWorker:
    def __init__(self, engine: Engine, *, max_waiting: int = 16):
        if max_waiting < 1:
            raise ValueError(f"the queue must hold at least one request, got {max_waiting}")
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max_waiting)
        self.lock = threading.Lock()
        self.counters = Counters()
        self.last: Summary | None = None
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="fic-engine", daemon=True)
        self._closing = threading.Event()

    # -- the request side --
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise Busy(SHUTTING_DOWN)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            with self.lock:
                self.counters.rejected += 1
            raise Busy(f"{self.jobs.maxsize} requests are waiting for the engine") from None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue's work at the mean request time."""
        c = self.counters
        done = max(1, c.served + c.cancelled + c.failed)
        mean = c.busy_seconds / done if c.busy_seconds else 1.0
        return max(1, min(60, round(mean * (self.waiting + 1))))

    def close(self) -> None:
        """Refuse new jobs, cancel what runs (it stops at its next token) and what waits; their
        clients hear that the server is shutting down. Does not block (a signal handler calls it)."""
        self._closing.set()
        running = self.running
        if running is not None:
            running.cancel()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.cancel()
                job.emit(Failed(SHUTTING_DOWN, 503))

    def stop(self, timeout: float = 10.0) -> None:
        """close(), then wait for the thread to end."""
        self.close()
        try:
            self.jobs.put_nowait(_STOP)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        """The engine's statistics and the counters, taken between two tokens."""
        with self.lock:
            return {"stats": self.engine.stats(), "counters": dataclasses.asdict(self.counters),
                    "last": self.last.as_dict() if self.last else None,
                    "running": self.running is not None, "waiting": self.waiting}

    # -- the engine side --
    def _run(self) -> None:
        while not self._closing.is_set():
            job = self.jobs.get()
            if job is _STOP:
                return
            if job.cancelled.is_set():
                with self.lock:
                    self.counters.cancelled += 1
                continue
            self.running = job
            t0 = time.perf_counter()
            try:
                summary = self._generate(job)
            except Exception as exc:  # the engine's failure ends this request, not the server
                self._recover()
                with self.lock:
                    self.counters.failed += 1
                    self.counters.busy_seconds += time.perf_counter() - t0
                job.emit(Failed(f"the engine failed: {type(exc).__name__}: {exc}"))
            else:
                with self.lock:
                    self._count(summary, time.perf_counter() - t0)
                stopped = summary.finish_reason == "cancelled" and self._closing.is_set()
                job.emit(Failed(SHUTTING_DOWN, 503) if stopped else Done(summary))
            finally:
                self.running = None

    def _count(self, s: Summary, seconds: float) -> None:
        c = self.counters
        if s.finish_reason == "cancelled":
            c.cancelled += 1
        else:
            c.served += 1
        c.prompt_tokens += s.prompt_tokens
        c.cached_tokens += s.cached_tokens
        c.completion_tokens += s.completion_tokens
        c.decode_seconds += s.decode_seconds
        c.busy_seconds += seconds
        self.last = s

    def _recover(self) -> None:
        """After an exception inside the engine: forget the context (it may be half written)."""
        with self.lock:
            try:
                self.engine.forget_context()
            except Exception:
                pass

    def _generate(self, job: Job) -> Summary:
        req, eng = job.request, self.engine
        queued = time.perf_counter() - job.submitted
        with self.lock:
            active = eng.use_active(req.active)
            stream = eng.stream(req.ids, max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, min_p=req.min_p, seed=req.seed)
        stops = StopText(req.stop)
        finish, n_tokens, last = "length", 0, None
        try:
            while True:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                with self.lock:
                    r = next(stream, None)
                if r is None:
                    break
                last = r
                if r.token >= 0 and r.finish_reason != "stop":
                    n_tokens += 1
                text, hit = stops.add(r.text)
                if r.finish_reason and not hit:
                    text += stops.flush()
                if text:
                    job.emit(Text(text))
                if hit or r.finish_reason:
                    finish = "stop" if hit else r.finish_reason
                    break
        finally:
            with self.lock:
                stream.close()
        with self.lock:
            st = eng.stats()
        if st.get("active_auto") is not None:  # --active auto: this prompt's selection chose the sizes
            active = st["active_fraction"]
        cached = eng.last_prefix.reused if last is not None else 0  # none: cancelled before its prefill
        return Summary(
            finish_reason=finish, prompt_tokens=len(req.ids), cached_tokens=cached, completion_tokens=n_tokens,
            prompt_seconds=last.prompt_seconds if last else 0.0, decode_seconds=last.decode_seconds if last else 0.0,
            queue_seconds=queued, prompt_tokens_per_s=last.prompt_tps if last else 0.0,
            tokens_per_s=last.generation_tps if last else 0.0, mode=st["mode"], policy=st["policy"],
            active=active if st["prune"] else 1.0, selected=active,
            active_params=st["active_params"],
            arena={**(st["request"] if last is not None else {}), "resident": st["resident"], "pinned": st["pinned"],
                   "slots": st["slots"]})
