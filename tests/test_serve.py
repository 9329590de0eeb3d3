"""`fic serve` as a real process on a loopback port, driven with the official openai client (and
httpx where a request must be malformed): answers equal to `fic run`'s, streamed and not; eight
clients at once; a client that goes away stops its generation; every bad request gets OpenAI's
error shape and a 4xx (and the server lives on); the arena's figures in /metrics.

Two servers: a tiny random Llama in exact mode (every expert resident: answers are checked
against `fic run`), and SmolLM2-135M in prune mode under a budget (bytes read, per-request active
sizes, the queue and disconnects: generation there is slow enough to watch)."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def aligned(n: int) -> int:
    """A reused prefix of n tokens as the engine cuts it."""
    from flashinfer_cli.engine import PREFIX_ALIGN

    return n - n % PREFIX_ALIGN

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from _server import fic_server  # noqa: E402
from _tiny import make_checkpoint  # noqa: E402
from flashinfer_cli import plan as planlib  # noqa: E402
from flashinfer_cli.cli import cli  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import make_engine_plan  # noqa: E402

MAX = 12
PROMPTS = ["What is the capital of Germany?", "hi", "Tell me a story.", "def f(x):", "café 日本",
           "The quick brown fox", "12345", "Berlin is"]
TIMEOUT = 120  # seconds any one request may take (the client's own timeout)


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-serve")
    make_checkpoint("llama_tied", root / "hf", seed=1)
    return Path(convert(root / "hf", root / "tiny", name="tiny", options=ConvertOptions(quant="f32", expert_size=32),
                        progress=False))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> dict:
    return {"FIC_HOME": str(tmp_path_factory.mktemp("fic-home"))}


@pytest.fixture(scope="module")
def tiny_server(tiny, home):
    with fic_server(tiny, "--ctx", "256", env=home) as srv:
        yield srv
    assert "Traceback" not in srv.log, srv.log  # no request made the server fail


def client(srv, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=TIMEOUT, **kw)


def fic_run(*args: str) -> str:
    """`fic run`'s answer (its stdout without the newline it adds)."""
    res = CliRunner().invoke(cli, ["run", *args])
    assert res.exit_code == 0, res.output
    out = res.stdout
    return out[:-1] if out.endswith("\n") else out


def metrics(srv) -> dict:
    r = httpx.get(srv.url + "/metrics", timeout=30)
    assert r.status_code == 200
    return r.json()


def chat(c, prompt_or_messages, **kw):
    msgs = [{"role": "user", "content": prompt_or_messages}] if isinstance(prompt_or_messages, str) \
        else prompt_or_messages
    return c.chat.completions.create(model=kw.pop("model", "tiny"), messages=msgs, temperature=kw.pop("temperature", 0),
                                     **kw)


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


# ---- answers: equal to `fic run` -----------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_chat_equals_fic_run(tiny_server, tiny, prompt):
    want = fic_run(str(tiny), prompt, "--max-tokens", str(MAX), "--ctx", "256")
    c = client(tiny_server)
    r = chat(c, prompt, max_tokens=MAX)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    text, chunks = streamed(chat(c, prompt, max_tokens=MAX, stream=True, stream_options={"include_usage": True}))
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == r.usage.prompt_tokens
    assert usage.completion_tokens == r.usage.completion_tokens <= MAX
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == MAX
    fic = chunks[-2].model_extra["fic"]
    assert fic["mode"] == "exact" and fic["active"] == 1.0 and fic["tokens_per_s"] >= 0


@pytest.mark.parametrize("prompt", ["The quick brown", "Berlin is the capital"])
def test_completion_equals_fic_run_raw(tiny_server, tiny, prompt):
    want = fic_run(str(tiny), prompt, "--raw", "--max-tokens", str(MAX), "--ctx", "256")
    c = client(tiny_server)
    r = c.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=MAX)
    assert r.object == "text_completion" and r.choices[0].text == want
    chunks = list(c.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=MAX, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert r.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0


def test_a_conversation_reuses_its_prefix_and_answers_as_fic_chat(tiny_server, tiny, home):
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "flashinfer_cli", "chat", str(tiny), "--max-tokens", str(MAX),
                        "--ctx", "256"], input="hi\nand again?\n", capture_output=True, text=True, timeout=300,
                       env={**os.environ, **home})
    assert p.returncode == 0, p.stderr
    c = client(tiny_server)
    msgs = [{"role": "user", "content": "hi"}]
    first = chat(c, msgs, max_tokens=MAX)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content.strip()},
             {"role": "user", "content": "and again?"}]
    second = chat(c, msgs, max_tokens=MAX)
    assert p.stdout == f"{first.choices[0].message.content}\n{second.choices[0].message.content}\n"
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first turn was not run again (down to the engine's PREFIX_ALIGN)
    assert aligned(first.usage.prompt_tokens) <= cached < second.usage.prompt_tokens
    assert second.model_extra["fic"]["prefilled_tokens"] == second.usage.prompt_tokens - cached


def test_sampling_options_and_stop(tiny_server):
    c = client(tiny_server)
    a = chat(c, "Tell me a story.", max_tokens=MAX, temperature=1.2, top_p=0.9, seed=3).choices[0].message.content
    b = chat(c, "Tell me a story.", max_tokens=MAX, temperature=1.2, top_p=0.9, seed=3).choices[0].message.content
    other = chat(c, "Tell me a story.", max_tokens=MAX, temperature=1.2, top_p=0.9, seed=4).choices[0].message.content
    assert a == b and a != other
    full = chat(c, "Tell me a story.", max_tokens=MAX).choices[0].message.content
    stop = full[3:5]  # a stop string inside the greedy answer: the answer ends before it
    assert stop and stop not in full[:3]
    for stream in (False, True):
        if stream:
            text, chunks = streamed(chat(c, "Tell me a story.", max_tokens=MAX, stop=[stop], stream=True))
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = chat(c, "Tell me a story.", max_tokens=MAX, stop=stop)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop"


def test_eight_concurrent_clients(tiny_server):
    c = client(tiny_server)
    want = {p: chat(c, p, max_tokens=MAX).choices[0].message.content for p in PROMPTS}
    before = metrics(tiny_server)["requests"]

    def ask(i: int) -> tuple[str, str]:
        p = PROMPTS[i]
        own = client(tiny_server)  # one connection pool per client, as separate programs would have
        if i % 2:
            return p, streamed(chat(own, p, max_tokens=MAX, stream=True))[0]
        return p, chat(own, p, max_tokens=MAX).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, range(8)))
    assert got == want
    after = metrics(tiny_server)["requests"]
    assert after["served"] - before["served"] == 8 and after["rejected"] == before["rejected"]
    assert after["running"] == 0 and after["waiting"] == 0


def test_models_health_and_metrics(tiny_server):
    c = client(tiny_server)
    assert [m.id for m in c.models.list()] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"
    m = metrics(tiny_server)
    assert m["model"] == "tiny" and m["engine"]["mode"] == "exact"
    assert m["arena"]["resident"] == m["arena"]["slots"] == 8  # 2 layers of 4 experts, all resident
    for key in ("hits", "misses", "bytes_read"):
        assert key in m["arena"]["total"]
    assert m["tokens"]["generated"] > 0 and m["tokens"]["tokens_per_s"] > 0
    text = httpx.get(tiny_server.url + "/metrics", headers={"Accept": "text/plain"}).text
    assert "fic_arena_bytes_read_total" in text and 'fic_requests_total{outcome="served"}' in text


# ---- bad requests: OpenAI's error shape, a 4xx, and the server lives on ----------------------

def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "Berlin is the capital of Germany. " * 60  # more than 256 tokens


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, None),
    ("/v1/chat/completions", b'[1, 2]', 400, None, None),
    ("/v1/completions", b'\xff\xfe', 400, None, None),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("/v1/chat/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/chat/completions", {**GOOD, "n": 2}, 400, "n", None),
    ("/v1/chat/completions", {**GOOD, "stop": [1]}, 400, "stop", None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", None),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role",
     None),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": ""}]}, 400, "messages", None),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": [999999]}, 400, "prompt", None),
    ("/v1/chat/completions", {**GOOD, "fic": {"active": 0.5}}, 400, "fic.active", None),  # exact mode
    ("/v1/chat/completions", {**GOOD, "fic": {"profile": "fast"}}, 400, "fic.profile", None),
])
def test_bad_requests_get_the_openai_error_shape(tiny_server, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(tiny_server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert httpx.get(tiny_server.url + "/health").status_code == 200  # alive


def test_bad_requests_through_the_openai_client(tiny_server):
    c = client(tiny_server)
    with pytest.raises(openai.NotFoundError) as exc:
        chat(c, "hi", model="gpt-9", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(c, "hi", max_tokens=-1)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(c, LONG, max_tokens=2)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert chat(c, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")  # and it still answers


def test_unknown_routes_and_methods(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)
    r = httpx.get(tiny_server.url + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)


def test_the_page_is_self_contained(tiny_server):
    r = httpx.get(tiny_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/chat/completions" in page and "<script>" in page
    for outside in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert outside not in page, f"the page refers to something outside itself: {outside}"


# ---- the API key ---------------------------------------------------------------------------

def test_api_key(tiny, home):
    with fic_server(tiny, "--ctx", "256", "--api-key", "s3cret", env=home) as srv:
        with pytest.raises(openai.AuthenticationError) as exc:
            chat(client(srv, api_key="wrong"), "hi", max_tokens=2)
        assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", json=GOOD)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200   # open: a liveness probe
        assert httpx.get(srv.url + "/").status_code == 200         # the page asks for the key
        r = chat(client(srv, api_key="s3cret"), "hi", max_tokens=2)
        assert r.usage.completion_tokens >= 1


def test_serve_without_its_extra_says_what_to_install(monkeypatch, tiny):
    import sys

    import flashinfer_cli

    monkeypatch.delitem(sys.modules, "flashinfer_cli.serve", raising=False)
    monkeypatch.delattr(flashinfer_cli, "serve", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    res = CliRunner().invoke(cli, ["serve", str(tiny)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "flashinfer-cli[serve]" in res.stderr and "uvicorn" in res.stderr


# ---- SmolLM2 in prune mode under a budget ----------------------------------------------------

SMOL_CTX = 512


def smol_budget(path: Path, fraction: float) -> int:
    """A budget whose arena holds about this fraction of the experts (as test_budget.budget_for)."""
    plan, _ = make_engine_plan(path, mem="64G", ctx=SMOL_CTX)
    return plan.fixed_bytes + int(fraction * plan.shape.n_experts * plan.slot_bytes) + 2 * planlib.HUGE_PAGE


@pytest.fixture(scope="module")
def smol_server(smollm2_model, home):
    mem = smol_budget(smollm2_model, 0.8)
    with fic_server(smollm2_model, "--ctx", str(SMOL_CTX), "--mem", str(mem), "--mode", "prune",
                    "--max-waiting", "1", env=home) as srv:
        yield srv
    assert "Traceback" not in srv.log, srv.log


def smol_chat(srv, content, **kw):
    return chat(client(srv), content, model=kw.pop("model", None) or metrics(srv)["model"], **kw)


def test_second_similar_request_reads_fewer_bytes(smol_server):
    first = smol_chat(smol_server, "What is the capital of Germany?", max_tokens=8)
    m1 = metrics(smol_server)
    second = smol_chat(smol_server, "What is the capital of France?", max_tokens=8)
    m2 = metrics(smol_server)
    read1, read2 = m1["arena"]["last_request"]["bytes_read"], m2["arena"]["last_request"]["bytes_read"]
    assert read1 > 0 and read2 <= read1 / 2
    assert first.model_extra["fic"]["arena"]["bytes_read"] == read1
    assert second.model_extra["fic"]["arena"]["bytes_read"] == read2
    assert m2["arena"]["total"]["bytes_read"] - m1["arena"]["total"]["bytes_read"] == read2
    assert 0 < m2["arena"]["resident"] <= m2["arena"]["slots"]


def test_follow_up_prefills_only_what_is_new(smol_server):
    msgs = [{"role": "user", "content": "Name a large city in Germany."}]
    first = smol_chat(smol_server, msgs, max_tokens=6)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And one in France?"}]
    second = smol_chat(smol_server, msgs, max_tokens=6)
    # prune mode chooses each prompt's sets: the previous prompt is reused whole (not its answer),
    # down to the engine's PREFIX_ALIGN
    cached = aligned(first.usage.prompt_tokens)
    assert second.usage.prompt_tokens_details.cached_tokens == cached
    last = metrics(smol_server)["last_request"]
    assert last["prefilled_tokens"] == second.usage.prompt_tokens - cached


def test_per_request_active_within_the_budget(smol_server):
    m = metrics(smol_server)["engine"]
    assert m["mode"] == "prune" and 0.5 < m["max_active"] < 1
    r = smol_chat(smol_server, "hi", max_tokens=2, extra_body={"fic": {"active": 0.5}})
    assert r.model_extra["fic"]["active"] == 0.5
    assert r.model_extra["fic"]["active_params"] < m["active_params"]
    r = smol_chat(smol_server, "hi", max_tokens=2)  # the server's own size again
    assert r.model_extra["fic"]["active"] == m["active"]
    with pytest.raises(openai.BadRequestError) as exc:
        smol_chat(smol_server, "hi", max_tokens=2, extra_body={"fic": {"active": 1.0}})
    assert exc.value.body["code"] == "active_too_large" and "at most" in exc.value.body["message"]
    assert exc.value.body["param"] == "fic.active"


COUNTING = "Count from 1 to 500, one number per line."


def wait_idle(srv, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = metrics(srv)
        if not m["requests"]["running"] and not m["requests"]["waiting"]:
            return m
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy after {seconds}s: {metrics(srv)['requests']}")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_disconnect_stops_its_generation(smol_server, stream):
    before = wait_idle(smol_server)["requests"]["cancelled"]
    body = {"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 400, "temperature": 0, "stream": stream}
    if stream:
        pieces = 0
        with httpx.stream("POST", smol_server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    pieces += 1
                    if pieces == 3:
                        break  # leaving the block closes the connection
    else:  # the client gives up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=1.5))
    t0 = time.monotonic()
    m = wait_idle(smol_server, 30)
    stopped_in = time.monotonic() - t0
    last = m["last_request"]
    assert m["requests"]["cancelled"] == before + 1 and last["finish_reason"] == "cancelled"
    # Counted in the server's own decode rate, so a faster machine does not fail it: the client left after
    # 3 pieces (streamed) or after 1.5 s (whole); the generation may run on at most a second past that.
    left_after_s = 0.0 if stream else 1.5
    tokens_when_left = (3 if stream else 0) + left_after_s * last["tokens_per_s"]
    assert last["completion_tokens"] <= tokens_when_left + 1.0 * last["tokens_per_s"] + 5, last
    assert last["completion_tokens"] < 400 and stopped_in < 10


def test_a_full_queue_answers_503_with_retry_after(smol_server):
    wait_idle(smol_server)
    body = {"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 400, "temperature": 0, "stream": True}
    waiting_result: dict = {}

    def waiting_request() -> None:  # queued behind the running one: answered once it is cancelled
        r = httpx.post(smol_server.url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        waiting_result["status"] = r.status_code

    with httpx.stream("POST", smol_server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if '"content"' in line)  # it runs
        t = threading.Thread(target=waiting_request)
        t.start()
        deadline = time.monotonic() + 30
        while metrics(smol_server)["requests"]["waiting"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as exc:  # --max-waiting 1: the third is refused
            smol_chat(smol_server, "hi", max_tokens=2)
        assert exc.value.status_code == 503 and exc.value.body["code"] == "server_busy"
        assert int(exc.value.response.headers["Retry-After"]) >= 1
        assert exc.value.body["type"] == "server_error"
    t.join(TIMEOUT)
    assert waiting_result.get("status") == 200
    assert metrics(smol_server)["requests"]["rejected"] >= 1
