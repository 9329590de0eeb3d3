"""The engine: what the CLI, the tests and scripts drive.

    from flashinfer_cli import Engine
    eng = Engine.open("smollm2-135m")          # a store name (pulled on first use) or a model dir
    ids = eng.tokenize("Hello")
    logits = eng.forward(ids)                  # float32 (len(ids), vocab), from an empty context
    for text in eng.generate("What is the capital of Germany?"):
        print(text, end="")
    for text in eng.chat([{"role": "user", "content": "hi"}], temperature=0.7, seed=1): ...

The engine keeps the KV cache between calls and reuses the longest common prefix of the tokens
already in it, so a chat does not re-read its history every turn.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np

from flashinfer_cli import generate as gen
from flashinfer_cli import kernels
from flashinfer_cli.model import Model


class EngineError(ValueError):
    """A request the engine refuses (empty prompt, prompt longer than the context); one line."""


class Engine:
    def __init__(self, path: Path, model: Model, tokenizer):
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self._cached: list[int] = []  # the tokens whose keys and values are in the cache
        self.last: gen.Response | None = None  # timings of the last generation

    @classmethod
    def open(cls, name_or_path: str, *, threads: int | None = None, ctx: int | None = None,
             auto_pull: bool = True, **options) -> "Engine":
        """Open a model directory, or a store name (a catalog name is pulled on first use).
        threads: kernel threads (default: every core); ctx: KV cache length (default: the
        model's, at most 4096)."""
        from flashinfer_cli.pull import resolve_model
        from flashinfer_cli.tokenizer import Tokenizer

        if threads is not None:
            kernels.set_threads(threads)
        path = resolve_model(name_or_path, auto_pull=auto_pull)
        model = Model(path, ctx=ctx, **options)
        tokenizer = Tokenizer.from_model_dir(path, model.reader.manifest.tokenizer)
        return cls(path, model, tokenizer)

    @property
    def ctx(self) -> int:
        return self.model.ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text (special tokens parsed; bos prepended if the model wants it)."""
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) of every position, from an empty context."""
        self._check_length(ids)
        self.model.reset()
        self._cached = []
        logits = self.model.forward(list(ids), all_logits=True)
        self._cached = list(ids)
        return logits

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """The tokens of a prompt, wrapped in the chat template when chat and the model has one."""
        if chat and getattr(self.tokenizer, "chat_template", True):
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            return self.chat_ids(messages)
        if not prompt:
            raise EngineError("empty prompt")
        return self.tokenize(prompt if system is None else f"{system}\n\n{prompt}")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not messages or not any(m.get("content") for m in messages if m.get("role") == "user"):
            raise EngineError("empty prompt")
        ids = self.tokenize(self.tokenizer.render_chat(messages, add_generation_prompt=True))
        bos = self.tokenizer.bos_id
        if bos is not None and ids[:2] == [bos, bos]:  # the template wrote bos and encode added one
            ids = ids[1:]
        return ids

    def stream(self, ids: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None) -> Iterator[gen.Response]:
        """Generate after the token ids; yields generate.Response (text and timings)."""
        self._check_length(ids)
        sampler = gen.Sampler(gen.SamplingParams(temperature, top_k, top_p, min_p, seed))
        stepper = SimpleNamespace(forward=self._step)  # decode steps append to the cache
        for r in gen.stream_generate(stepper, self.tokenizer, list(ids), max_tokens=max_tokens, sampler=sampler,
                                     prefill=self._prefill, room=lambda: self.ctx - self.model.pos):
            self.last = r
            yield r

    def generate(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, chat: bool = True,
                 system: str | None = None) -> Iterator[str]:
        """Stream the answer to prompt as text."""
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        for r in self.stream(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seed=seed):
            if r.text:
                yield r.text

    def chat(self, messages: list[dict], **sampling) -> Iterator[str]:
        """Stream the assistant's next message after messages ([{"role", "content"}, ...])."""
        for r in self.stream(self.chat_ids(messages), **sampling):
            if r.text:
                yield r.text

    # -- the model as generate.py sees it: forward appends to the cache --
    def _check_length(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise EngineError("empty prompt")
        if len(ids) > self.ctx:
            raise EngineError(f"the prompt has {len(ids)} tokens, more than the context of {self.ctx} (see --ctx)")

    def _prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Last logits after ids, reusing the cached common prefix (at least one token is run)."""
        keep = 0
        limit = min(len(self._cached), len(ids) - 1)
        while keep < limit and self._cached[keep] == ids[keep]:
            keep += 1
        self.model.truncate(keep)
        self._cached = self._cached[:keep]
        logits = self.model.forward(list(ids[keep:]))
        self._cached = list(ids)
        return logits

    def _step(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.model.forward(list(ids))
        self._cached.extend(ids)
        return logits

    def close(self) -> None:
        self.model.close()
