"""Sampling and the streaming generation loop (in the manner of mlx-lm).

    generate_step    prefill the prompt, then yield (token, logits) one decode step at a time
    stream_generate  adds stop conditions and text: yields a Response per token, text never
                     splitting a UTF-8 character (the tokenizer's stream decoder)
    generate         collects stream_generate into a Result with timings
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np


# ---- sampling ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; otherwise the filters apply in this order, each to the
    distribution the previous one left (renormalized): top_k (0: off), top_p (1: off),
    min_p (0: off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min-p must be in [0, 1], got {self.min_p}")


def distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The probabilities a non-greedy sampler draws from (float64, zero outside the filters)."""
    z = logits.astype(np.float64) / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")  # most probable first
    keep = np.ones(probs.size, dtype=bool)
    if p.top_k > 0:
        keep[order[p.top_k:]] = False
        probs = _renorm(probs, keep)
    if p.top_p < 1.0:
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, p.top_p * (1 - 1e-12))) + 1  # smallest prefix reaching top_p
        keep[order[n:]] = False
        probs = _renorm(probs, keep)
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max()
        probs = _renorm(probs, keep)
    return probs


def _renorm(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


class Sampler:
    """Picks the next token from logits; reproducible for a given seed."""

    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        probs = distribution(logits, self.params)
        return int(self.rng.choice(probs.size, p=probs))


# ---- the loop ------------------------------------------------------------------------------

class LanguageModel(Protocol):
    def forward(self, tokens: Sequence[int]) -> np.ndarray: ...  # last token's logits


@dataclass
class Response:
    """One generated token (mlx-lm's GenerationResponse), with the timings so far."""

    text: str                # new text (possibly empty: an unfinished UTF-8 character)
    token: int               # -1 on the closing response when the context filled up
    prompt_tokens: int
    prompt_seconds: float    # the prefill, which also produced the first token
    generation_tokens: int   # tokens generated so far, the first (from the prefill) included
    decode_seconds: float    # the decode steps: generation_tokens - 1 of them
    finish_reason: str | None = None  # "stop" (an end token), "length" (max_tokens or context)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Decode tokens/s (the steps after the prefill)."""
        steps = self.generation_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Result(Response):
    """The whole generation: all the text, and the tokens (end token excluded)."""

    tokens: list[int] = field(default_factory=list)


def generate_step(model: LanguageModel, prompt: Sequence[int], sampler: Callable[[np.ndarray], int],
                  *, prefill: Callable[[Sequence[int]], np.ndarray] | None = None,
                  room: Callable[[], int] | None = None) -> Iterator[tuple[int, float]]:
    """Yield (token, seconds it took) forever: the first token from the prompt's prefill, then
    one per decode step. `prefill` replaces model.forward for the prompt (a caller that reuses
    a cached prefix); `room()` says how many more tokens the context takes (stops at 0)."""
    t0 = time.perf_counter()
    logits = (prefill or model.forward)(prompt)
    token = sampler(logits)
    yield token, time.perf_counter() - t0
    while room is None or room() > 0:
        t0 = time.perf_counter()
        token = sampler(model.forward([token]))
        yield token, time.perf_counter() - t0


def stream_generate(model: LanguageModel, tokenizer, prompt: Sequence[int], *, max_tokens: int = 256,
                    sampler: Callable[[np.ndarray], int] | None = None, eos_ids: Sequence[int] | None = None,
                    **step_options) -> Iterator[Response]:
    """Generate up to max_tokens after prompt, stopping at an end token (not yielded as text)."""
    if max_tokens <= 0:
        return
    sampler = sampler or Sampler()
    eos = set(tokenizer.eos_ids if eos_ids is None else eos_ids)
    decoder = tokenizer.stream_decoder()
    prompt_s = decode_s = 0.0
    n = 0
    for n, (token, seconds) in enumerate(generate_step(model, prompt, sampler, **step_options), start=1):
        if n == 1:
            prompt_s = seconds
        else:
            decode_s += seconds
        stop = token in eos
        text = "" if stop else decoder.add(token)
        finish = "stop" if stop else ("length" if n >= max_tokens else None)
        if finish:
            text += decoder.flush()
        yield Response(text, token, len(prompt), prompt_s, n, decode_s, finish)
        if finish:
            return
    # the context filled up before max_tokens
    yield Response(decoder.flush(), -1, len(prompt), prompt_s, n, decode_s, "length")


def generate(model: LanguageModel, tokenizer, prompt: Sequence[int], **options) -> Result:
    """Run stream_generate to the end; the Result has the text, the tokens and the timings."""
    texts, tokens, last = [], [], None
    for r in stream_generate(model, tokenizer, prompt, **options):
        texts.append(r.text)
        if r.token >= 0 and r.finish_reason != "stop":
            tokens.append(r.token)
        last = r
    if last is None:
        return Result("", -1, len(prompt), 0.0, 0, 0.0, "length", tokens)
    return Result("".join(texts), last.token, last.prompt_tokens, last.prompt_seconds, last.generation_tokens,
                  last.decode_seconds, last.finish_reason, tokens)
