"""The OpenAI API's shapes for `fic serve`: request bodies checked into Options, responses and
stream chunks built from a generation's text and Summary, and errors as OpenAI writes them:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Nothing here touches the engine or the network: the routes (serve.py) call these functions.
Sampling follows fic's (generate.py): temperature 0 is greedy, top_p 0 too (the smallest set
whose mass reaches 0 is the top token). `top_k` and `min_p` are accepted beside OpenAI's fields
(as llama.cpp and vLLM do); `"fic": {"active": A}` sizes the prompt's active sets in prune mode.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flashinfer_cli.serve_worker import Summary

MAX_STOP = 4
FIC_EXTRAS = ("active",)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The generation options of a chat or completion request, checked."""

    max_tokens: int | None = None    # None: up to the end of the context
    temperature: float = 1.0         # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    active: str | float | int | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name} must be a number", name)
    if not lo <= v <= hi:
        raise bad(f"{name} must be between {lo:g} and {hi:g}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise bad(f"{name} must be an integer", name)
    v = int(v)
    if lo is not None and v < lo:
        raise bad(f"{name} must be at least {lo}, got {v}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings", "stop")
    return tuple(s for s in stops if s)


def _fic_extras(body: dict) -> str | float | int | None:
    v = body.get("fic")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad('fic must be an object, e.g. {"active": 0.5}', "fic")
    unknown = sorted(set(v) - set(FIC_EXTRAS))
    if unknown:
        raise bad(f"unknown fic option {unknown[0]!r} (fic takes: {', '.join(FIC_EXTRAS)})", f"fic.{unknown[0]}")
    a = v.get("active")
    if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float, str))):
        raise bad("fic.active must be a fraction (0.5), active parameters (\"300M\") or \"auto[:T]\"", "fic.active")
    return a


def parse_options(body: dict, *, chat: bool) -> Options:
    """The options both endpoints share, with OpenAI's names and ranges."""
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("fic answers one choice per request (n must be 1)", "n")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        v = _integer(body, name, 1)
        if v is not None:
            max_tokens = v
            break
    if body.get("logprobs") not in (None, False, 0):
        raise bad("fic does not return logprobs", "logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the smallest set reaching probability 0: the most probable token
        temperature, top_p = 0.0, 1.0
    seed = _integer(body, "seed")
    return Options(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   top_k=_integer(body, "top_k", 0) or 0, min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
                   seed=None if seed is None else seed % (1 << 64), stop=_stop(body), stream=stream,
                   include_usage=bool(so.get("include_usage", False)), active=_fic_extras(body))


def _content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("fic reads text only: each content part must be {\"type\": \"text\", \"text\": ...}",
                          f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad("a message's content must be a string or a list of text parts", f"messages[{i}].content")


def parse_messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad("each message must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), i)})
    if not any(m["role"] == "user" and m["content"] for m in out):
        raise bad("the messages hold no user text", "messages")
    return out


def parse_prompt(body: dict) -> str | list[int]:
    """A completion's prompt: a string (or a list of one), or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("the prompt is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def check_completion_extras(body: dict) -> None:
    for name, ok in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
        if body.get(name) not in ok:
            raise bad(f"fic does not support {name}", name)


# ---- responses -----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(s: Summary) -> dict[str, Any]:
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def figures(s: Summary) -> dict[str, Any]:
    """What fic used and did for the request: the `fic` field of a response and of the last chunk."""
    return {"mode": s.mode, "policy": s.policy, "active": round(s.active, 4), "selected": round(s.selected, 4),
            "active_params": s.active_params,
            "prompt_tokens_per_s": round(s.prompt_tokens_per_s, 2), "tokens_per_s": round(s.tokens_per_s, 2),
            "prompt_seconds": round(s.prompt_seconds, 4), "decode_seconds": round(s.decode_seconds, 4),
            "queue_seconds": round(s.queue_seconds, 4), "cached_tokens": s.cached_tokens,
            "prefilled_tokens": s.prefilled_tokens, "arena": s.arena}


def _head(kind: str, rid: str, model: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": created, "model": model}


def chat_response(rid: str, model: str, created: int, text: str, s: Summary) -> dict[str, Any]:
    return {**_head("chat.completion", rid, model, created),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": s.finish_reason, "logprobs": None}],
            "usage": usage(s), "fic": figures(s)}


def chat_chunk(rid: str, model: str, created: int, *, delta: dict | None = None, s: Summary | None = None,
               usage_only: bool = False) -> dict[str, Any]:
    """A streamed piece: a delta, the closing chunk (finish_reason and fic's figures: delta {}),
    or the usage chunk (no choices; stream_options.include_usage)."""
    out = _head("chat.completion.chunk", rid, model, created)
    if usage_only:
        return {**out, "choices": [], "usage": usage(s)}
    choice = {"index": 0, "delta": delta or {}, "finish_reason": s.finish_reason if s else None, "logprobs": None}
    out["choices"] = [choice]
    if s is not None:
        out["fic"] = figures(s)
    return out


def completion_response(rid: str, model: str, created: int, text: str, s: Summary) -> dict[str, Any]:
    return {**_head("text_completion", rid, model, created),
            "choices": [{"index": 0, "text": text, "finish_reason": s.finish_reason, "logprobs": None}],
            "usage": usage(s), "fic": figures(s)}


def completion_chunk(rid: str, model: str, created: int, *, text: str = "", s: Summary | None = None,
                     usage_only: bool = False) -> dict[str, Any]:
    out = _head("text_completion", rid, model, created)
    if usage_only:
        return {**out, "choices": [], "usage": usage(s)}
    out["choices"] = [{"index": 0, "text": text, "finish_reason": s.finish_reason if s else None, "logprobs": None}]
    if s is not None:
        out["fic"] = figures(s)
    return out


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends a stream)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def now() -> int:
    return int(time.time())
