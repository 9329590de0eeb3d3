"""Sampling semantics on crafted logits against a plain numpy reference of the definitions, and the
generation loop's stop conditions and UTF-8 streaming on a scripted model."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli.generate import Sampler, SamplingParams, distribution, generate, stream_generate


# ---- the reference: each definition written out directly ----------------------------------

def ref_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_keep(p, keep_idx):
    out = np.zeros_like(p)
    out[list(keep_idx)] = p[list(keep_idx)]
    return out / out.sum()


def ref_top_k(p, k):
    ranked = sorted(range(len(p)), key=lambda i: (-p[i], i))
    return ref_keep(p, ranked[:k])


def ref_top_p(p, top_p):
    ranked = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, total = [], 0.0
    for i in ranked:  # add tokens, most probable first, until their mass reaches top_p
        kept.append(i)
        total += p[i]
        if total >= top_p - 1e-12:
            break
    return ref_keep(p, kept)


def ref_min_p(p, min_p):
    return ref_keep(p, [i for i in range(len(p)) if p[i] >= min_p * p.max()])


LOGITS = np.log(np.array([0.05, 0.4, 0.25, 0.15, 0.1, 0.05], dtype=np.float32))


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature(t):
    np.testing.assert_allclose(distribution(LOGITS, SamplingParams(temperature=t)), ref_softmax(LOGITS / t), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k(k):
    got = distribution(LOGITS, SamplingParams(temperature=1.0, top_k=k))
    np.testing.assert_allclose(got, ref_top_k(ref_softmax(LOGITS), k), rtol=1e-6, atol=1e-12)
    assert (got > 0).sum() == k


@pytest.mark.parametrize("top_p,n_kept", [(0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.89, 4), (0.99, 6)])
def test_top_p(top_p, n_kept):
    got = distribution(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    np.testing.assert_allclose(got, ref_top_p(ref_softmax(LOGITS), top_p), rtol=1e-6, atol=1e-12)
    assert (got > 0).sum() == n_kept


@pytest.mark.parametrize("min_p,n_kept", [(0.1, 6), (0.2, 4), (0.3, 3), (0.5, 2), (0.9, 1)])
def test_min_p(min_p, n_kept):
    got = distribution(LOGITS, SamplingParams(temperature=1.0, min_p=min_p))
    np.testing.assert_allclose(got, ref_min_p(ref_softmax(LOGITS), min_p), rtol=1e-6, atol=1e-12)
    assert (got > 0).sum() == n_kept


def test_filters_compose_in_order():
    p = SamplingParams(temperature=0.7, top_k=4, top_p=0.8, min_p=0.3)
    expected = ref_min_p(ref_top_p(ref_top_k(ref_softmax(LOGITS / 0.7), 4), 0.8), 0.3)
    np.testing.assert_allclose(distribution(LOGITS, p), expected, rtol=1e-6, atol=1e-12)


def test_greedy_is_argmax():
    rng = np.random.default_rng(3)
    sampler = Sampler(SamplingParams(temperature=0.0))
    for _ in range(20):
        z = rng.normal(size=100).astype(np.float32)
        assert sampler(z) == int(np.argmax(z))


def test_draws_follow_the_distribution():
    params = SamplingParams(temperature=1.0, top_k=4, seed=7)
    sampler = Sampler(params)
    n = 20000
    counts = np.bincount([sampler(LOGITS) for _ in range(n)], minlength=LOGITS.size)
    expected = ref_top_k(ref_softmax(LOGITS), 4)
    assert counts[expected == 0].sum() == 0
    # binomial standard error of each frequency is <= 0.0035 here: 5 sigma
    np.testing.assert_allclose(counts / n, expected, atol=0.018)


def test_seed_reproducible():
    z = np.random.default_rng(0).normal(size=50).astype(np.float32)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler(z) for _ in range(40)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


# ---- the filters against transformers' logits processors ------------------------------------

def hf_distribution(logits, p: SamplingParams) -> np.ndarray:
    """transformers' TemperatureLogitsWarper, TopK, TopP and MinP in fic's order, in float64."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    procs = [tr.TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        procs.append(tr.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(tr.TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(tr.MinPLogitsWarper(p.min_p))
    scores = torch.tensor(np.asarray(logits, dtype=np.float64))[None]
    for proc in procs:
        scores = proc(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 7, 60])
@pytest.mark.parametrize("top_p", [1.0, 0.3, 0.75, 0.95])
@pytest.mark.parametrize("min_p", [0.0, 0.02, 0.25])
def test_filters_equal_transformers_processors(temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rng = np.random.default_rng(int(temperature * 10) + 100 * top_k)
    for _ in range(5):
        z = (rng.standard_normal(500) * rng.uniform(1, 4)).astype(np.float32)  # no ties
        ours, theirs = distribution(z, params), hf_distribution(z, params)
        assert np.array_equal(ours > 0, theirs > 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15)


# probabilities that are exact binary fractions, so cumulative sums land exactly on top_p
EXACT = np.log(np.array([0.0625, 0.5, 0.03125, 0.25, 0.125, 0.03125], dtype=np.float64))


@pytest.mark.parametrize("top_p,kept", [
    (0.5, {1}),                 # the most probable token alone reaches 0.5: only it is kept
    (0.75, {1, 3}),             # 0.5 + 0.25 = 0.75 exactly: those two, not the next
    (0.875, {1, 3, 4}),         # 0.5 + 0.25 + 0.125
    (0.9375, {1, 3, 4, 0}),
    (0.75 + 1e-9, {1, 3, 4}),   # just past a cumulative sum: the next token is needed to reach it
    (0.75 - 1e-9, {1, 3}),
])
def test_top_p_on_an_exact_cumulative_sum(top_p, kept):
    """top_p is reached when the kept mass is >= top_p: a token whose cumulative sum equals top_p
    exactly is kept and the next one is not (transformers' TopPLogitsWarper removes the tokens
    whose ascending cumulative sum is <= 1 - top_p: the same side)."""
    params = SamplingParams(temperature=1.0, top_p=top_p)
    ours = distribution(EXACT, params)
    assert set(np.flatnonzero(ours)) == kept
    np.testing.assert_allclose(ours[sorted(kept)], np.exp(EXACT[sorted(kept)]) / np.exp(EXACT[sorted(kept)]).sum(),
                               rtol=1e-12)
    assert set(np.flatnonzero(hf_distribution(EXACT, params))) == kept


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=-0.1), dict(min_p=2)])
def test_bad_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---- the loop ------------------------------------------------------------------------------

class ScriptedModel:
    """Logits that make greedy sampling produce `script` whatever the input; counts calls."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = list(script), vocab, []

    def forward(self, tokens):
        self.calls.append(list(tokens))
        z = np.zeros(self.vocab, np.float32)
        z[self.script[len(self.calls) - 1]] = 10.0
        return z


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is the end token. Decoding invalid UTF-8 gives U+FFFD."""

    eos_ids = [256]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        tok = self

        class D:
            def __init__(self):
                self.ids, self.sent = [], 0

            def add(self, i):
                self.ids.append(i)
                text = tok.decode(self.ids)
                if text.endswith("\ufffd"):
                    return ""
                out, self.sent = text[self.sent:], len(text)
                return out

            def flush(self):
                text = tok.decode(self.ids)
                out, self.sent = text[self.sent:], len(text)
                return out

        return D()


def test_stream_stops_at_eos_and_never_splits_utf8():
    text = "naïve 日本 ok"
    script = list(text.encode()) + [256, 65, 65]
    model = ScriptedModel(script, 257)
    responses = list(stream_generate(model, ByteTokenizer(), [1, 2, 3], max_tokens=100))
    assert "".join(r.text for r in responses) == text
    assert all("\ufffd" not in r.text for r in responses)
    assert responses[-1].finish_reason == "stop" and responses[-1].token == 256
    assert model.calls[0] == [1, 2, 3] and all(len(c) == 1 for c in model.calls[1:])
    assert len(model.calls) == len(text.encode()) + 1  # no step after the end token


def test_max_tokens_and_result_timings():
    model = ScriptedModel(list(b"abcdefgh"), 257)
    result = generate(model, ByteTokenizer(), [5, 6], max_tokens=5)
    assert result.text == "abcde" and result.tokens == list(b"abcde")
    assert result.finish_reason == "length" and result.generation_tokens == 5 and result.prompt_tokens == 2
    assert result.prompt_seconds > 0 and result.decode_seconds > 0
    assert result.prompt_tps > 0 and result.generation_tps > 0


def test_context_full_ends_generation():
    model = ScriptedModel(list(b"abcdefgh"), 257)
    left = iter([2, 1, 0])
    result = generate(model, ByteTokenizer(), [5], max_tokens=50, room=lambda: next(left))
    assert result.text == "abc" and result.finish_reason == "length"


# ---- what mutation testing (mutmut on generate.py) found untested ------------------------

def test_min_p_keeps_a_token_exactly_at_the_threshold_and_composes():
    # 0.25 is exactly 0.5 * the top probability 0.5: kept ("less probable than" drops, equal stays)
    assert set(np.flatnonzero(distribution(EXACT, SamplingParams(temperature=1.0, min_p=0.5)))) == {1, 3}
    # min-p applies to what top-k left: it never brings a token back
    assert set(np.flatnonzero(distribution(EXACT, SamplingParams(temperature=1.0, top_k=1, min_p=0.01)))) == {1}
    SamplingParams(min_p=1.0)  # the closed end of [0, 1]


@pytest.mark.parametrize("bad,message", [(dict(temperature=-1), "temperature"), (dict(top_k=-1), "top-k"),
                                         (dict(top_p=0.0), "top-p"), (dict(min_p=2), "min-p")])
def test_bad_params_say_which(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_one_token_and_zero_tokens():
    model = ScriptedModel(list(b"abc"), 257)
    result = generate(model, ByteTokenizer(), [5, 6], max_tokens=1)
    assert result.tokens == [ord("a")] and result.text == "a" and result.generation_tokens == 1
    empty = generate(ScriptedModel(list(b"abc"), 257), ByteTokenizer(), [5, 6, 7], max_tokens=0)
    assert (empty.text, empty.token, empty.prompt_tokens, empty.generation_tokens, empty.finish_reason,
            empty.tokens, empty.prompt_seconds, empty.decode_seconds) == ("", -1, 3, 0, "length", [], 0.0, 0.0)


def test_token_zero_is_a_token_and_eos_ids_override():
    model = ScriptedModel([0, 65, 66, 256], 257)
    result = generate(model, ByteTokenizer(), [1], max_tokens=10, eos_ids=[66])
    assert result.tokens == [0, 65] and result.text == "\x00A" and result.finish_reason == "stop"
    assert result.token == 66


def test_context_full_closing_response():
    model = ScriptedModel(list(b"abcdefgh"), 257)
    left = iter([1, 0])
    responses = list(stream_generate(model, ByteTokenizer(), [5, 6, 7], max_tokens=50, room=lambda: next(left)))
    last = responses[-1]
    assert (last.token, last.prompt_tokens, last.generation_tokens, last.finish_reason) == (-1, 3, 2, "length")
    assert last.decode_seconds == responses[-2].decode_seconds and last.prompt_seconds == responses[0].prompt_seconds
    assert generate(ScriptedModel(list(b"ab"), 257), ByteTokenizer(), [5], max_tokens=50,
                    room=lambda: 0).token == -1


class SleepyModel(ScriptedModel):
    """Prefill takes 0.05 s, each decode step 0.01 s."""

    def forward(self, tokens):
        import time
        time.sleep(0.05 if not self.calls else 0.01)
        return super().forward(tokens)


def test_timings_add_up():
    result = generate(SleepyModel(list(b"abcdef"), 257), ByteTokenizer(), [5], max_tokens=6)
    assert 0.05 <= result.prompt_seconds < 30  # the prefill alone (it also produced the first token)
    assert 5 * 0.01 <= result.decode_seconds < 30  # the five decode steps, summed
