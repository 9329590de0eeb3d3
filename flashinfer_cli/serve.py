"""`fic serve`: an OpenAI-compatible HTTP server over one engine whose arena lives across requests,
and a chat page that shows the arena at work.

    POST /v1/chat/completions, POST /v1/completions   (streamed as server-sent events, or not)
    GET  /v1/models, /health, /metrics                 (/metrics: the arena's statistics)
    GET  /                                             (the chat page, serve_page.html)

One engine, one arena: requests wait in a bounded queue for the engine's one thread
(serve_worker.py); beyond the queue a 503 with Retry-After. A client that goes away stops its
generation at the next token. Requests are checked (serve_api.py) before they queue: a bad one gets
OpenAI's error shape and a 4xx. Starlette routes on uvicorn (the optional extra `serve`).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from flashinfer_cli import __version__, serve_api as api
from flashinfer_cli import plan as planlib
from flashinfer_cli.engine import Engine, EngineError
from flashinfer_cli.serve_worker import Busy, Done, EngineWorker, Failed, GenerationRequest, Job, Summary, Text

MAX_BODY_BYTES = 8 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServeConfig:
    """What `fic serve` was asked for beyond the engine's own options."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_waiting: int = 16           # requests that may wait for the engine; more get a 503
    model_id: str = "fic"           # the name /v1/models lists and requests give as "model"
    aliases: tuple[str, ...] = ()   # other names accepted as "model" (the store name, the path)


class Server:
    """The routes' shared state: the engine's worker and the configuration."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.worker = EngineWorker(engine, max_waiting=config.max_waiting)
        self.started = time.time()
        self.page = resources.files("flashinfer_cli").joinpath("serve_page.html").read_text(encoding="utf-8")

    # -- checks every request passes --
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None or not (request.url.path.startswith("/v1") or request.url.path == "/metrics"):
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise api.ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, body: dict) -> str:
        name = body.get("model")
        if name is None:
            return self.config.model_id
        if not isinstance(name, str):
            raise api.bad("model must be a string", "model")
        if name != self.config.model_id and name not in self.config.aliases:
            raise api.ApiError(404, f"the model {name!r} does not exist here: this server runs "
                                    f"{self.config.model_id!r}", param="model", code="model_not_found")
        return self.config.model_id

    def check_active(self, active) -> None:
        """A per-request active size: prune mode only, and what the arena holds (before queueing)."""
        if active is None:
            return
        plan = self.engine.plan
        if not plan.prune:
            raise api.bad(f"fic.active needs a server in prune mode (fic serve --mode prune): this one runs in "
                          f"{plan.mode} mode with every expert", "fic.active")
        try:
            planlib.active_sizes(plan, planlib.parse_active(active))
        except ValueError as exc:  # BudgetError included: what the arena holds
            raise api.bad(str(exc).replace("--active", "fic.active"), "fic.active",
                          code="active_too_large" if isinstance(exc, planlib.BudgetError) else None) from None

    def check_length(self, ids: list[int], param: str) -> None:
        if len(ids) > self.engine.ctx:
            raise api.bad(f"the prompt has {len(ids)} tokens, more than this server's context of {self.engine.ctx} "
                          f"(fic serve --ctx)", param, code="context_length_exceeded")

    def generation(self, ids: list[int], o: api.Options) -> GenerationRequest:
        room = self.engine.ctx - len(ids) + 1  # the prefill's token, then one per free position
        return GenerationRequest(ids, max_tokens=min(o.max_tokens or room, room), temperature=o.temperature,
                                 top_k=o.top_k, top_p=o.top_p, min_p=o.min_p, seed=o.seed, stop=o.stop,
                                 active=o.active)

    # -- running a generation --
    def submit(self, gen: GenerationRequest) -> Job:
        job = Job(gen, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self.worker.submit(job)
        except Busy as exc:
            raise api.ApiError(503, f"the server is busy: {exc}; retry later", code="server_busy",
                               headers={"Retry-After": str(self.worker.retry_after())}) from None
        return job


async def _read_body(request: Request) -> dict:
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise api.ApiError(413, f"the body is larger than {MAX_BODY_BYTES >> 20} MiB")
    except ClientDisconnect:
        raise api.bad("the client went away before the body arrived") from None
    return api.parse_json(bytes(raw))


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (a non-streamed request waits here)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _collect(request: Request, job: Job) -> tuple[str, Summary]:
    """The whole answer of a non-streamed request."""
    watch = asyncio.ensure_future(_watch_disconnect(request, job))
    texts = []
    try:
        while True:
            ev = await job.events.get()
            if isinstance(ev, Text):
                texts.append(ev.text)
            elif isinstance(ev, Done):
                return "".join(texts), ev.summary
            else:
                raise _failure(ev)
    finally:
        job.cancel()  # a no-op after Done; stops the generation if this handler is cancelled
        watch.cancel()


async def _events(job: Job, on_text: Callable[[str], dict], on_done: Callable[[Summary], list[dict]]
                  ) -> AsyncIterator[bytes]:
    """A streamed answer as server-sent events; the client going away (the stream's task is
    cancelled) cancels the job, whose generation stops at the next token."""
    try:
        while True:
            ev = await job.events.get()
            if isinstance(ev, Text):
                yield api.sse(on_text(ev.text))
            elif isinstance(ev, Done):
                for chunk in on_done(ev.summary):
                    yield api.sse(chunk)
                yield api.sse("[DONE]")
                return
            else:
                yield api.sse(_failure(ev).body())
                return
    finally:
        job.cancel()


def _failure(ev: Failed) -> api.ApiError:
    if ev.status == 503:
        return api.ApiError(503, ev.message, code="server_shutting_down")
    return api.ApiError(ev.status, ev.message, code="engine_failed")


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(obj, status_code=status, headers=headers)


def make_app(server: Server) -> Starlette:
    model_id = server.config.model_id

    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request)
        model = server.check_model(body)
        messages = api.parse_messages(body)
        opts = api.parse_options(body, chat=True)
        server.check_active(opts.active)
        try:
            ids = await run_in_threadpool(server.engine.chat_ids, messages)
        except (EngineError, ValueError, TypeError) as exc:
            raise api.bad(f"the messages cannot be rendered: {exc}", "messages") from None
        except Exception as exc:  # the chat template refused them (jinja2's TemplateError)
            raise api.bad(f"the chat template refused the messages: {exc}", "messages") from None
        server.check_length(ids, "messages")
        job = server.submit(server.generation(ids, opts))
        rid, created = api.new_id("chatcmpl"), api.now()
        if not opts.stream:
            text, s = await _collect(request, job)
            return _json(api.chat_response(rid, model, created, text, s))
        first = [True]

        def on_text(text: str) -> dict:
            delta = {"role": "assistant", "content": text} if first[0] else {"content": text}
            first[0] = False
            return api.chat_chunk(rid, model, created, delta=delta)

        def on_done(s: Summary) -> list[dict]:
            out = [api.chat_chunk(rid, model, created, delta={"role": "assistant", "content": ""})] if first[0] else []
            out.append(api.chat_chunk(rid, model, created, s=s))
            if opts.include_usage:
                out.append(api.chat_chunk(rid, model, created, s=s, usage_only=True))
            return out

        return StreamingResponse(_events(job, on_text, on_done), media_type="text/event-stream", headers=SSE_HEADERS)

    async def completions(request: Request) -> Response:
        body = await _read_body(request)
        model = server.check_model(body)
        api.check_completion_extras(body)
        prompt = api.parse_prompt(body)
        opts = api.parse_options(body, chat=False)
        server.check_active(opts.active)
        if isinstance(prompt, str):
            ids = await run_in_threadpool(server.engine.prompt_ids, prompt, chat=False)
        else:
            vocab = server.engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise api.bad(f"token ids must be in 0..{vocab - 1}", "prompt")
            ids = prompt
        server.check_length(ids, "prompt")
        job = server.submit(server.generation(ids, opts))
        rid, created = api.new_id("cmpl"), api.now()
        if not opts.stream:
            text, s = await _collect(request, job)
            return _json(api.completion_response(rid, model, created, text, s))

        def on_done(s: Summary) -> list[dict]:
            out = [api.completion_chunk(rid, model, created, s=s)]
            if opts.include_usage:
                out.append(api.completion_chunk(rid, model, created, s=s, usage_only=True))
            return out

        return StreamingResponse(_events(job, lambda t: api.completion_chunk(rid, model, created, text=t), on_done),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(server.started), "owned_by": "fic"}

    async def models(request: Request) -> Response:
        return _json({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name != model_id and name not in server.config.aliases:
            raise api.ApiError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")
        return _json(model_card())

    async def health(request: Request) -> Response:
        return _json({"status": "ok", "model": model_id, "version": __version__})

    async def metrics(request: Request) -> Response:
        snap = await run_in_threadpool(server.worker.snapshot)
        body = metrics_body(server, snap)
        if _wants_text(request):
            return PlainTextResponse(prometheus_text(body), media_type="text/plain; version=0.0.4")
        return _json(body)

    async def page(request: Request) -> Response:
        return HTMLResponse(server.page)

    async def api_error(request: Request, exc: api.ApiError) -> Response:
        return _json(exc.body(), exc.status, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _json(api.error_body(str(exc.detail), param=None, code=code), exc.status_code, exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        return _json(api.error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.worker.stop)

    class KeyCheck:
        """The API key before anything else (raw ASGI: streamed responses pass through untouched)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                try:
                    server.check_key(Request(scope))
                except api.ApiError as exc:
                    await _json(exc.body(), exc.status, exc.headers)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    from starlette.middleware import Middleware

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(KeyCheck)],
                     exception_handlers={api.ApiError: api_error, HTTPException: http_error, Exception: server_error})


# ---- /metrics ------------------------------------------------------------------------------

def metrics_body(server: Server, snap: dict) -> dict[str, Any]:
    """/metrics: the engine's plan, the arena (resident experts; hits, misses and bytes read in all
    and for the last request), the requests and tokens served, and the last request's summary."""
    st, c = snap["stats"], snap["counters"]
    tps = round(c["completion_tokens"] / c["decode_seconds"], 2) if c["decode_seconds"] else 0.0
    return {
        "model": server.config.model_id,
        "uptime_seconds": round(time.time() - server.started, 3),
        "engine": _engine_figures(server.engine, st),
        "arena": {"slots": st["slots"], "ring": st["ring"], "slot_bytes": st["slot_bytes"],
                  "resident": st["resident"], "pinned": st["pinned"], "total": st["total"],
                  "last_request": st["request"]},
        "requests": {"served": c["served"], "cancelled": c["cancelled"], "rejected": c["rejected"],
                     "failed": c["failed"], "running": int(snap["running"]), "waiting": snap["waiting"]},
        "tokens": {"prompt": c["prompt_tokens"], "cached": c["cached_tokens"],
                   "prefilled": c["prompt_tokens"] - c["cached_tokens"], "generated": c["completion_tokens"],
                   "tokens_per_s": tps},
        "last_request": snap["last"],
    }


def _engine_figures(engine: Engine, st: dict) -> dict[str, Any]:
    """active: the share of the experts a token runs by default (exact mode: all); selected: the
    share each prompt chooses (exact mode: kept resident); max_active: the largest per-request
    fic.active the arena holds (prune mode)."""
    plan = engine.plan
    return {"mode": st["mode"], "policy": st["policy"], "ctx": engine.ctx,
            "active": round(st["active_fraction"] if st["prune"] else 1.0, 4),
            "selected": round(st["active_fraction"], 4), "active_params": st["active_params"],
            "max_active": round(plan.max_active_per_layer / max(1, plan.shape.max_experts_per_layer), 4),
            "budget_bytes": st["budget_bytes"], "planned_bytes": st["planned_bytes"],
            "streamed_bytes_per_token": st["streamed_bytes_per_token"]}


def _wants_text(request: Request) -> bool:
    """Prometheus asks for text/plain or OpenMetrics; browsers and scripts get JSON."""
    if request.query_params.get("format") == "prometheus":
        return True
    accept = request.headers.get("accept", "")
    return ("text/plain" in accept or "openmetrics" in accept) and "json" not in accept and "html" not in accept


def prometheus_text(m: dict) -> str:
    """The same figures in Prometheus' text exposition format."""
    a, r, t = m["arena"], m["requests"], m["tokens"]
    rows = [("fic_arena_hits_total", "counter", "experts an FFN call found resident", a["total"]["hits"]),
            ("fic_arena_misses_total", "counter", "experts read from flash", a["total"]["misses"]),
            ("fic_arena_streamed_total", "counter", "experts read through the ring, not kept", a["total"]["streamed"]),
            ("fic_arena_bytes_read_total", "counter", "bytes read from flash", a["total"]["bytes_read"]),
            ("fic_arena_evictions_total", "counter", "experts evicted", a["total"]["evictions"]),
            ("fic_arena_resident_experts", "gauge", "experts resident in the arena", a["resident"]),
            ("fic_arena_slots", "gauge", "slots of the arena", a["slots"]),
            ("fic_requests_running", "gauge", "requests generating", r["running"]),
            ("fic_requests_waiting", "gauge", "requests waiting for the engine", r["waiting"]),
            ("fic_tokens_per_second", "gauge", "decode tokens per second over all requests", t["tokens_per_s"])]
    lines = []
    for name, kind, doc, value in rows:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP fic_requests_total requests by outcome", "# TYPE fic_requests_total counter"]
    lines += [f'fic_requests_total{{outcome="{k}"}} {r[k]}' for k in ("served", "cancelled", "rejected", "failed")]
    lines += ["# HELP fic_tokens_total tokens by kind", "# TYPE fic_tokens_total counter"]
    lines += [f'fic_tokens_total{{kind="{k}"}} {t[k]}' for k in ("prompt", "cached", "prefilled", "generated")]
    return "\n".join(lines) + "\n"


# ---- running it ----------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one, which the caller reads back)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(engine: Engine, config: ServeConfig, *, log: Callable[[str], None] = _say) -> None:
    """Bind, say where, and serve until interrupted (SIGINT or SIGTERM)."""
    server = Server(engine, config)
    app = make_app(server)
    sock = bind(config.host, config.port)
    url = url_of(sock)
    log(f"fic: serving {config.model_id} at {url} (OpenAI API: {url}/v1, chat page: {url}/)")
    uv = _Uvicorn(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                                 lifespan="on"), on_exit=server.worker.close)
    try:
        uv.run(sockets=[sock])
    finally:
        sock.close()
    log("fic: stopped")


class _Uvicorn(uvicorn.Server):
    """uvicorn, which on SIGINT/SIGTERM first ends the generations in flight (their streams then
    close, and the server need not wait out its graceful-shutdown timeout)."""

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT and SIGTERM stop the server, which then returns (uvicorn's own re-raises them
        after the shutdown: a KeyboardInterrupt, or death by SIGTERM, after a clean stop)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def model_names(name: str, path: Path) -> tuple[str, tuple[str, ...]]:
    """The id a served model is listed under, and the other names a request may use for it."""
    model_id = path.name if Path(name).exists() else name  # a path (a directory, a .gguf): the model's name
    aliases = tuple(sorted({name, str(path), path.name} - {model_id}))
    return model_id, aliases


__all__ = ["ServeConfig", "Server", "make_app", "serve", "model_names", "metrics_body", "prometheus_text"]
