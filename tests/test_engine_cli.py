"""Engine and the `run` / `chat` commands on a tiny random Llama, against transformers: its logits,
its greedy generate() and its own tokenizer and chat-template rendering (PreTrainedTokenizerFast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import make_checkpoint  # noqa: E402
from flashinfer_cli import Engine  # noqa: E402
from flashinfer_cli.cli import cli  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import EngineError  # noqa: E402
from flashinfer_cli.generate import SamplingParams, distribution  # noqa: E402

EOS = 2  # <|im_end|> in the tiny tokenizer
MAX = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fic model dir, transformers model, transformers tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    hf = make_checkpoint("llama_tied", root / "hf", seed=1)
    dest = convert(root / "hf", root / "fic", name="tiny", options=ConvertOptions(quant="f32", expert_size=32),
                   progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "hf" / "tokenizer.json"))
    tok.chat_template = json.loads((root / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    return Path(dest), hf, tok


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.open(str(tiny[0]), ctx=256, kv_dtype="f32")  # fp32 cache: parity to 1e-4 (fp16: test_model)


def ref_ids(tok, messages=None, raw=None) -> list[int]:
    if raw is not None:
        return tok(raw, add_special_tokens=False)["input_ids"]
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def ref_answer(hf, tok, ids, max_tokens=MAX) -> str:
    """transformers' greedy answer, the end token excluded."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS,
                          pad_token_id=0)
    new = [t for t in out[0, len(ids):].tolist() if t != EOS]
    return tok.decode(new)


# ---- Engine --------------------------------------------------------------------------------

def test_forward_matches_transformers(engine, tiny):
    _, hf, tok = tiny
    ids = ref_ids(tok, raw="Berlin is the capital of Germany. def f(x): return 12345")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    for _ in range(2):  # every call starts from an empty context
        logits = engine.forward(ids)
        assert logits.dtype == np.float32 and logits.shape == (len(ids), 320)
        assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-4


def test_tokenize_matches_transformers(engine, tiny):
    text = "<|im_start|>user\ncafé 日本  12345<|im_end|>"
    assert engine.tokenize(text) == ref_ids(tiny[2], raw=text)


def test_generate_matches_transformers_greedy(engine, tiny):
    _, hf, tok = tiny
    expected = ref_answer(hf, tok, ref_ids(tok, [{"role": "user", "content": "What is the capital of Germany?"}]))
    assert "".join(engine.generate("What is the capital of Germany?", max_tokens=MAX)) == expected
    raw = ref_answer(hf, tok, ref_ids(tok, raw="The quick brown"))
    assert "".join(engine.generate("The quick brown", max_tokens=MAX, chat=False)) == raw
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert "".join(engine.generate("hi", system="Be brief.", max_tokens=MAX)) == ref_answer(hf, tok, ref_ids(tok, msgs))


def test_chat_multi_turn_matches_transformers(engine, tiny):
    _, hf, tok = tiny
    msgs = [{"role": "user", "content": "hi"}]
    first = "".join(engine.chat(msgs, max_tokens=MAX))
    assert first == ref_answer(hf, tok, ref_ids(tok, msgs))
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "and again?"}]
    assert "".join(engine.chat(msgs, max_tokens=MAX)) == ref_answer(hf, tok, ref_ids(tok, msgs))


def test_sampling_is_seeded(engine):
    a = "".join(engine.generate("hi", temperature=1.0, top_p=0.9, seed=5, max_tokens=MAX))
    b = "".join(engine.generate("hi", temperature=1.0, top_p=0.9, seed=5, max_tokens=MAX))
    assert a == b and engine.last.generation_tokens == MAX


# ---- sampling through the Engine, replayed step by step --------------------------------------
#
# The filters' reference is transformers' own logits processors (Temperature, TopK, TopP, MinP),
# applied in fic's order (top-k, then top-p, then min-p, each to what the previous left). Where
# the two could part: top-k keeps exactly k tokens in fic and every token tied with the k-th in
# transformers (model logits have no such ties); top-p is "the smallest set of most probable
# tokens whose mass reaches p" in both (test_generate checks the exact boundary).

SAMPLE_TOKENS = 24


def hf_filtered(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution transformers' logits processors leave (float64)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    scores = torch.tensor(np.asarray(logits, np.float64))[None]
    for proc in procs:
        scores = proc(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.fixture(scope="module")
def replayer(tiny):
    """A second engine on the same model (and the same fp32 cache as `engine`), whose model the
    replays step by hand."""
    return Engine.open(str(tiny[0]), ctx=256, kv_dtype="f32")


def step_logits(replayer, ids, tokens) -> list[np.ndarray]:
    """fic's logits before each of tokens, run as Engine.stream runs them: a prefill of ids, then
    one decode step per token."""
    m = replayer.model
    m.reset()
    rows = [m.forward(list(ids))]
    for t in tokens[:-1]:
        rows.append(m.forward([t]))
    return rows


def sampled(engine, ids, params: SamplingParams, max_tokens=SAMPLE_TOKENS) -> list[int]:
    return [r.token for r in engine.stream(ids, max_tokens=max_tokens, temperature=params.temperature,
                                           top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                           seed=params.seed) if r.token >= 0]


SAMPLING_CASES = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=1.5, top_k=5, seed=2),
    SamplingParams(temperature=1.2, top_p=0.6, seed=3),
    SamplingParams(temperature=2.0, min_p=0.2, seed=4),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_p=0.05, seed=5),
]


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampling_replays_step_by_step(engine, replayer, tiny, params):
    """Engine.stream's tokens are the draws of a generator seeded with the seed, from
    generate.distribution of fic's logits at each step, and that distribution is transformers'."""
    ids = ref_ids(tiny[2], [{"role": "user", "content": "Tell me a story."}])
    tokens = sampled(engine, ids, params)
    assert len(tokens) >= 8, tokens  # enough steps to mean something (an early end token is rare here)
    rows = step_logits(replayer, ids, tokens)
    rng = np.random.default_rng(params.seed)
    replay = []
    for row in rows:
        probs = distribution(row, params)
        np.testing.assert_allclose(probs, hf_filtered(row, params), rtol=1e-9, atol=1e-12)
        replay.append(int(rng.choice(probs.size, p=probs)))
    assert replay == tokens


def test_no_token_outside_the_nucleus_and_seeds_differ(engine, replayer, tiny):
    """Many seeded generations under a tight nucleus: every token is inside transformers' nucleus
    of its step, and different seeds give different generations."""
    ids = ref_ids(tiny[2], [{"role": "user", "content": "hi"}])
    params = [SamplingParams(temperature=1.5, top_p=0.5, seed=s) for s in range(12)]
    runs = [sampled(engine, ids, p) for p in params]
    outside, total, excluded_mass = 0, 0, 0.0
    for p, tokens in zip(params, runs):
        for row, tok in zip(step_logits(replayer, ids, tokens), tokens):
            kept = hf_filtered(row, p) > 0
            excluded_mass += hf_filtered(row, SamplingParams(temperature=p.temperature))[~kept].sum()
            outside += not kept[tok]
            total += 1
    # Without the filter about this many of the tokens would have fallen outside the nucleus
    # (each step's mass outside it, summed): a sampler that ignores top_p shows.
    assert excluded_mass > 40, excluded_mass
    assert outside == 0, f"{outside} of {total} tokens outside the nucleus"
    assert len({tuple(t) for t in runs}) == len(runs), "two seeds gave the same generation"


# ---- sampling through `fic run` ------------------------------------------------------------

# Each case after the first changes one option of the first: through the Engine each gives
# another answer than the first (so each option is seen to act), and `fic run` with the flags
# gives exactly the Engine's answer.
CLI_SAMPLING = [
    dict(temperature=1.3, seed=7),
    dict(temperature=1.3, seed=8),
    dict(temperature=0.5, seed=7),
    dict(temperature=1.3, top_k=3, seed=7),
    dict(temperature=1.3, top_p=0.5, seed=7),
    dict(temperature=1.3, min_p=0.3, seed=7),
]


def test_run_sampling_flags_equal_engine(tiny, env):
    path = tiny[0]
    engine = Engine.open(str(path), ctx=256)  # as `fic run` opens it: the default fp16 cache
    prompt = "Tell me a story."
    answers = []
    for opts in CLI_SAMPLING:
        want = "".join(engine.generate(prompt, max_tokens=SAMPLE_TOKENS, **opts))
        args = ["run", str(path), prompt, "--max-tokens", str(SAMPLE_TOKENS)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert res.stdout == want + "\n", (opts, res.stdout, want)
        answers.append(want)
    for opts, answer in zip(CLI_SAMPLING[1:], answers[1:]):
        assert answer != answers[0], f"{opts} gives the answer of {CLI_SAMPLING[0]}: the option had no effect"
    # and a real process gives the same
    p = fic({**env}, "run", str(path), prompt, "--max-tokens", str(SAMPLE_TOKENS), "--temperature", "1.3",
            "--top-k", "40", "--top-p", "0.8", "--min-p", "0.05", "--seed", "11")
    want = "".join(engine.generate(prompt, max_tokens=SAMPLE_TOKENS, temperature=1.3, top_k=40, top_p=0.8,
                                   min_p=0.05, seed=11))
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n"


def test_engine_refuses_bad_prompts(tiny):
    eng = Engine.open(str(tiny[0]), ctx=8)
    with pytest.raises(EngineError, match="empty"):
        list(eng.generate("", chat=False))
    with pytest.raises(EngineError, match="empty"):
        eng.forward([])
    with pytest.raises(EngineError, match="context"):
        list(eng.generate("a prompt that is much longer than eight tokens, surely", chat=False))


# ---- CLI through CliRunner -----------------------------------------------------------------

@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    return {**os.environ, "FIC_HOME": str(tmp_path / "home")}  # conftest set PYTHONPATH


def test_run_prompt_from_args_and_stdin(tiny, env):
    path, hf, tok = tiny
    expected = ref_answer(hf, tok, ref_ids(tok, [{"role": "user", "content": "What is the capital of Germany?"}]))
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(path), "What", "is", "the", "capital", "of", "Germany?", "--max-tokens", str(MAX)])
    assert res.exit_code == 0, res.output
    assert res.stdout == expected + "\n"
    res = runner.invoke(cli, ["run", str(path), "--max-tokens", str(MAX)], input="What is the capital of Germany?\n")
    assert res.exit_code == 0 and res.stdout == expected + "\n"


def test_run_raw_and_verbose(tiny, env):
    path, hf, tok = tiny
    res = CliRunner().invoke(cli, ["run", str(path), "The quick brown", "--raw", "--verbose", "--max-tokens", str(MAX)])
    assert res.exit_code == 0
    assert res.stdout == ref_answer(hf, tok, ref_ids(tok, raw="The quick brown")) + "\n"
    for label in ("prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert label in res.stderr
    assert f"eval count:           {MAX} token(s)" in res.stderr


@pytest.mark.parametrize("args,stdin,message", [
    (["run", "{path}"], "   \n", "empty prompt"),
    (["run", "{path}", "a b c d e f g h i j k l", "--ctx", "4"], None, "more than the context"),
    (["run", "./no-such-model-xyz", "hi"], None, "no such file: ./no-such-model-xyz"),
    (["run", "{bad}", "hi"], None, "manifest.json"),
    (["chat", "{bad}"], "hi\n", "manifest.json"),
])
def test_cli_errors_are_one_line(tiny, env, tmp_path, args, stdin, message):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    args = [a.format(path=tiny[0], bad=bad) for a in args]
    res = CliRunner().invoke(cli, args, input=stdin)
    assert res.exit_code != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("fic: ") and message in res.stderr
    assert "Traceback" not in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


# ---- real processes with piped stdin -------------------------------------------------------

def fic(env, *args, stdin=""):
    return subprocess.run([sys.executable, "-m", "flashinfer_cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_subprocess_run_and_chat(tiny, env):
    path, hf, tok = tiny
    q = "What is the capital of Germany?"
    p = fic(env, "run", str(path), "--max-tokens", str(MAX), stdin=q + "\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ref_answer(hf, tok, ref_ids(tok, [{"role": "user", "content": q}])) + "\n"

    msgs = [{"role": "user", "content": "hi"}]
    first = ref_answer(hf, tok, ref_ids(tok, msgs))
    msgs += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "and again?"}]
    second = ref_answer(hf, tok, ref_ids(tok, msgs))
    p = fic(env, "chat", str(path), "--max-tokens", str(MAX), stdin="hi\nand again?\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{first}\n{second}\n"
    p = fic(env, "chat", str(path), "--max-tokens", str(MAX), stdin="hi\n/bye\nand again?\n")
    assert p.returncode == 0 and p.stdout == f"{first}\n"


def test_subprocess_errors(tiny, env):
    for args, stdin in ((["run", str(tiny[0])], ""), (["run", "./no-such-model-xyz", "hi"], ""),
                        (["run", str(tiny[0] / "manifest.json"), "hi"], "")):
        p = fic(env, *args, stdin=stdin)
        assert p.returncode != 0
        assert p.stderr.startswith("fic: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_interactive_chat_on_a_terminal(tiny, env):
    """On a TTY: a prompt, answers with history, /bye leaves with status 0."""
    import pty
    import select

    path, hf, tok = tiny
    msgs = [{"role": "user", "content": "hi"}]
    first = ref_answer(hf, tok, ref_ids(tok, msgs))
    msgs += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "and again?"}]
    second = ref_answer(hf, tok, ref_ids(tok, msgs))

    pid, fd = pty.fork()
    if pid == 0:  # the child: fic chat on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "flashinfer_cli", "chat", str(path), "--max-tokens", str(MAX)],
                  {**env, "TERM": "dumb"})
    out = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal out
        while out.count(marker) < count:
            ready, _, _ = select.select([fd], [], [], 120)
            assert ready, f"no prompt; output so far: {out!r}"
            out += os.read(fd, 4096)

    read_until(b">>> ", 1)
    os.write(fd, b"hi\n")
    read_until(b">>> ", 2)
    os.write(fd, b"and again?\n")
    read_until(b">>> ", 3)
    os.write(fd, b"/bye\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    text = out.decode("utf-8", errors="replace").replace("\r\n", "\n")
    assert first.replace("\r", "") in text and second.replace("\r", "") in text


def test_closed_pipe_stops_quietly(tiny, env):
    proc = subprocess.Popen([sys.executable, "-m", "flashinfer_cli", "run", str(tiny[0]), "hi", "--max-tokens", "200",
                             "--raw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err
