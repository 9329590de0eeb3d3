"""The parts of `fic serve` that need no model and no network: stop strings, the engine's worker
(queue, cancellation, failures, shutdown) over a scripted engine, and the checks of request
bodies (serve_api.py). The real server is test_serve.py's."""
from __future__ import annotations

import asyncio
import time

import pytest

from flashinfer_cli.engine import PrefixUse
from flashinfer_cli.generate import Response
from flashinfer_cli.serve_api import ApiError, parse_json, parse_messages, parse_options, parse_prompt
from flashinfer_cli.serve_worker import (Busy, Done, EngineWorker, Failed, GenerationRequest, Job, StopText,
                                         Text)


# ---- stop strings --------------------------------------------------------------------------

def feed(stops, pieces) -> tuple[str, bool, str]:
    s = StopText(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = s.add(p)
        out.append(text)
        if hit:
            break
    return "".join(out), hit, s.flush()


@pytest.mark.parametrize("stops,pieces,text,hit,rest", [
    ([], ["ab", "cd"], "abcd", False, ""),
    (["cd"], ["ab", "cd", "ef"], "ab", True, ""),
    (["cd"], ["abc", "def"], "ab", True, ""),            # a stop split across two pieces
    (["cd"], ["abc"], "ab", False, "c"),                 # held back: it could begin the stop
    (["xyz", "b"], ["a", "bc"], "a", True, ""),          # the first of several
    (["END"], ["the E", "N", "D here"], "the ", True, ""),
    (["\n\n"], ["one\n", "two"], "one\ntwo", False, ""),
])
def test_stop_text(stops, pieces, text, hit, rest):
    assert feed(stops, pieces) == (text, hit, rest)


# ---- the worker over a scripted engine -------------------------------------------------------

class ScriptedEngine:
    """Yields 'w0 ', 'w1 ', ... one per step (max_tokens of them), as Engine.stream does."""

    def __init__(self, *, delay: float = 0.0, fail_at: int | None = None):
        self.delay, self.fail_at = delay, fail_at
        self.steps, self.forgotten, self.actives = 0, 0, []
        self.last_prefix = PrefixUse()

    def use_active(self, active):
        self.actives.append(active)
        return 1.0 if active is None else float(active)

    def stream(self, ids, *, max_tokens, **sampling):
        self.last_prefix = PrefixUse(1, len(ids) - 1)
        for i in range(max_tokens):
            if i == self.fail_at:
                raise RuntimeError("the disk went away")
            time.sleep(self.delay)
            self.steps += 1
            yield Response(f"w{i} ", 10 + i, len(ids), 0.01, i + 1, 0.01 * i,
                           "length" if i + 1 == max_tokens else None)

    def stats(self):
        return {"mode": "prune", "policy": "exact", "prune": True, "active_params": 123, "resident": 3,
                "pinned": 2, "slots": 4, "request": {"hits": 1, "misses": 2, "bytes_read": 4096}}

    def forget_context(self):
        self.forgotten += 1


async def run_job(worker, request, *, cancel_after: int | None = None) -> tuple[list[str], object]:
    job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
    worker.submit(job)
    texts = []
    while True:
        ev = await asyncio.wait_for(job.events.get(), 30)
        if isinstance(ev, Text):
            texts.append(ev.text)
            if cancel_after is not None and len(texts) == cancel_after:
                job.cancel()
        else:
            return texts, ev


def test_worker_streams_and_summarises():
    eng = ScriptedEngine()
    w = EngineWorker(eng, max_waiting=2)
    w.start()
    try:
        texts, end = asyncio.run(run_job(w, GenerationRequest([1, 2, 3], max_tokens=4, active=0.5)))
    finally:
        w.stop()
    assert texts == ["w0 ", "w1 ", "w2 ", "w3 "] and isinstance(end, Done)
    s = end.summary
    assert (s.finish_reason, s.prompt_tokens, s.cached_tokens, s.completion_tokens) == ("length", 3, 1, 4)
    assert s.prefilled_tokens == 2 and s.active == 0.5 and s.arena["bytes_read"] == 4096
    assert eng.actives == [0.5]
    assert w.counters.served == 1 and w.counters.completion_tokens == 4 and w.last is s


def test_a_stop_string_ends_the_generation():
    eng = ScriptedEngine()
    w = EngineWorker(eng)
    w.start()
    try:
        texts, end = asyncio.run(run_job(w, GenerationRequest([1], max_tokens=50, stop=("w2",))))
    finally:
        w.stop()
    assert "".join(texts) == "w0 w1 " and end.summary.finish_reason == "stop"
    assert eng.steps == 3  # the engine stopped at the token that reached the stop string


def test_a_cancelled_job_stops_at_the_next_token():
    eng = ScriptedEngine(delay=0.02)
    w = EngineWorker(eng)
    w.start()
    try:
        texts, end = asyncio.run(run_job(w, GenerationRequest([1], max_tokens=500), cancel_after=2))
    finally:
        w.stop()
    assert isinstance(end, Done) and end.summary.finish_reason == "cancelled"
    assert eng.steps <= 4 and w.counters.cancelled == 1 and w.counters.served == 0


def test_an_engine_failure_fails_the_request_not_the_worker():
    eng = ScriptedEngine(fail_at=2)
    w = EngineWorker(eng)
    w.start()
    try:
        texts, end = asyncio.run(run_job(w, GenerationRequest([1], max_tokens=5)))
        assert isinstance(end, Failed) and end.status == 500 and "the disk went away" in end.message
        assert eng.forgotten == 1 and w.counters.failed == 1
        eng.fail_at = None
        texts, end = asyncio.run(run_job(w, GenerationRequest([1], max_tokens=2)))
        assert isinstance(end, Done) and texts == ["w0 ", "w1 "]
    finally:
        w.stop()


def test_a_full_queue_refuses_and_shutdown_answers_the_waiting():
    w = EngineWorker(ScriptedEngine(), max_waiting=2)  # not started: jobs stay queued

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [Job(GenerationRequest([1], max_tokens=1), loop, asyncio.Queue()) for _ in range(3)]
        w.submit(jobs[0])
        w.submit(jobs[1])
        with pytest.raises(Busy):
            w.submit(jobs[2])
        assert w.counters.rejected == 1 and w.waiting == 2 and w.retry_after() >= 1
        w.close()
        ends = [await asyncio.wait_for(j.events.get(), 5) for j in jobs[:2]]
        assert all(isinstance(e, Failed) and e.status == 503 for e in ends)
        with pytest.raises(Busy, match="shutting down"):
            w.submit(jobs[2])

    asyncio.run(go())


# ---- request bodies ------------------------------------------------------------------------

def status_of(fn, *args, **kw) -> tuple[int, str | None]:
    with pytest.raises(ApiError) as exc:
        fn(*args, **kw)
    assert exc.value.body()["error"]["type"] == "invalid_request_error"
    return exc.value.status, exc.value.param


def test_options():
    o = parse_options({}, chat=True)
    assert (o.temperature, o.top_p, o.max_tokens, o.stream, o.stop) == (1.0, 1.0, None, False, ())
    o = parse_options({"top_p": 0, "temperature": 0.7}, chat=True)
    assert (o.temperature, o.top_p) == (0.0, 1.0)  # the smallest set reaching 0: the top token
    o = parse_options({"max_tokens": 5, "max_completion_tokens": 7, "seed": -1, "stop": "x", "top_k": 3,
                       "min_p": 0.1, "stream": True, "stream_options": {"include_usage": True},
                       "fic": {"active": "300M"}}, chat=True)
    assert (o.max_tokens, o.seed, o.stop, o.top_k, o.min_p, o.stream, o.include_usage, o.active) == \
        (7, (1 << 64) - 1, ("x",), 3, 0.1, True, True, "300M")
    assert parse_options({"max_tokens": 5, "max_completion_tokens": 7}, chat=False).max_tokens == 5
    for body, param in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                        ({"max_tokens": 2.5}, "max_tokens"), ({"temperature": 2.5}, "temperature"),
                        ({"temperature": "hot"}, "temperature"), ({"top_p": -0.1}, "top_p"),
                        ({"stop": ["a"] * 5}, "stop"), ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"),
                        ({"stream": "yes"}, "stream"), ({"fic": {"active": [1]}}, "fic.active"),
                        ({"fic": 0.5}, "fic"), ({"top_k": -1}, "top_k"), ({"min_p": 2}, "min_p")]:
        assert status_of(parse_options, body, chat=True) == (400, param), body


def test_messages_and_prompts():
    msgs = parse_messages({"messages": [{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}]})
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert status_of(parse_messages, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}) == \
        (400, "messages[0].content")
    assert status_of(parse_messages, {"messages": [{"role": "assistant", "content": "hi"}]}) == (400, "messages")
    assert status_of(parse_messages, {"messages": "hi"}) == (400, "messages")
    assert parse_prompt({"prompt": ["once"]}) == "once" and parse_prompt({"prompt": [1, 2]}) == [1, 2]
    assert status_of(parse_prompt, {"prompt": ["a", "b"]}) == (400, "prompt")
    assert status_of(parse_json, b"{") == (400, None)
    assert status_of(parse_json, b'"a string"') == (400, None)
