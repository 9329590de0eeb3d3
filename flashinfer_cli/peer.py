"""fic against llama.cpp on the same GGUF, in one process run: `fic bench MODEL --vs llama.cpp[=PATH]`.

The peer is llama.cpp through the llama-cpp-python package (`--vs llama.cpp`) or a llama.cpp build
directory holding bin/llama-completion (`--vs llama.cpp=PATH`). Both engines get the same prompts,
the same threads, the same context length and greedy decoding:

    short   a code question through the model's chat template (tens of tokens)
    long    a document to summarise, cut to about --long tokens (2,000 by default)

Each repetition runs every prompt on both engines, the order alternated between repetitions (a
machine shared with other work drifts; alternation spreads the drift over both). The load average
is read before every step. Per engine and prompt the medians of the repetitions; the ratios are fic
over llama.cpp, so above 1 means fic is faster.

Timings, the same definition on both sides: prefill = prompt tokens / the time to the first token's
logits; decode = (generated tokens - 1) / the time of the steps after the first. Through
llama-cpp-python the peer is fed fic's own token ids (the very same input) and generates exactly as
many tokens as fic did (greedy: the tokens must agree with fic's up to near-ties; the report says
for how many). A llama.cpp binary reads the prompt as text (fic's ids decoded, special tokens
included) and its own perf lines give the times; its prompt token count is reported beside fic's.
"""
from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from flashinfer_cli.engine import Engine

PEER_NAME = "llama.cpp"
DEFAULT_LONG_TOKENS = 2000
DEFAULT_MAX_TOKENS = 64
TEMPLATE_ROOM = 64  # context beyond the long prompt's document: the chat template's tokens, a margin
SHORT_PROMPT = "Write a Python function is_prime(n) that returns True if n is prime."  # test_qwen's question
LONG_PROMPT = "Summarise the following document in a few paragraphs."

# llama.cpp's own timing lines (llama_perf_context_print / common_perf_print on stderr)
PERF = re.compile(r"(?:llama_perf_context_print|common_perf_print):\s+(prompt eval time|eval time|load time|total time)"
                  r"\s*=\s*([\d.]+) ms(?:\s*/\s*(\d+) (?:tokens|runs)\s*\(\s*[\d.]+ ms per token,"
                  r"\s*([\d.]+) tokens per second\))?")


class CompareError(ValueError):
    """A comparison that cannot run (no peer, no GGUF); one line."""


def parse_perf(stderr: str) -> dict:
    """llama.cpp's perf lines as {prompt_eval_time_ms, prompt_eval_time_tokens, ..._tok_s, eval_time_...}."""
    out = {}
    for m in PERF.finditer(stderr):
        key = m.group(1).replace(" ", "_")
        out[key + "_ms"] = float(m.group(2))
        if m.group(3):
            out[key + "_tokens"] = int(m.group(3))
            out[key + "_tok_s"] = float(m.group(4))
    return out


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as /proc/loadavg says them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the peer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerSpec:
    """--vs llama.cpp[=PATH]: PATH a build directory, its bin/, or llama-completion itself; None:
    the llama-cpp-python package."""

    name: str
    path: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({'binary ' + self.path if self.path else 'llama-cpp-python'})"


def parse_vs(value: str) -> PeerSpec:
    name, eq, path = value.partition("=")
    if name.strip().lower() not in (PEER_NAME, "llamacpp", "llama-cpp"):
        raise CompareError(f"--vs {value!r}: the peer is llama.cpp (--vs llama.cpp, or --vs llama.cpp=BUILD_DIR)")
    if eq and not path.strip():
        raise CompareError(f"--vs {value!r}: give the llama.cpp build directory after '='")
    return PeerSpec(PEER_NAME, path.strip() or None)


def completion_binary(path: str) -> Path:
    """llama-completion under PATH (PATH/bin/, PATH/, or PATH itself)."""
    p = Path(path).expanduser()
    for cand in (p / "bin" / "llama-completion", p / "llama-completion", p):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise CompareError(f"--vs llama.cpp={path}: no llama-completion binary there (looked in {p}/bin, {p} and "
                       "at the path itself)")


def source_gguf(model_dir: Path, cache_dirs: Sequence[Path] = ()) -> Path:
    """The GGUF a fic model was converted from: the manifest's source path, else the file of the
    recorded sha256 in a store's cache (cache/<sha256>/<file>)."""
    from flashinfer_cli import fmt

    prov = fmt.parse_manifest(Path(model_dir) / fmt.MANIFEST_FILE).provenance
    if prov.get("kind") != "gguf":
        raise CompareError(f"{Path(model_dir).name} was converted from a {prov.get('kind') or 'non-GGUF'} source: "
                           "llama.cpp needs a .gguf file (give the .gguf itself as MODEL)")
    src = Path(str(prov.get("source", "")))
    if src.suffix == ".gguf" and src.is_file():
        return src
    for name, digest in (prov.get("sha256") or {}).items():
        for d in cache_dirs:
            cand = Path(d) / str(digest) / name
            if cand.is_file():
                return cand
    raise CompareError(f"the GGUF {Path(model_dir).name} came from ({prov.get('source')}) is not on disk any more "
                       "(`fic show` names it): give the .gguf file as MODEL")


# A trial prompt of up to 32 tokens in a child process, before llama.cpp runs in fic's own: a
# llama.cpp that dies on this CPU (its AMX path did on a Xeon VM, bench/RESULTS.md "An AVX-512
# machine") must not take fic with it.
TRIAL_CODE = ("import sys, llama_cpp\n"
              "llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)\n"
              "llm.eval(list(range(min(32, llm.n_vocab()))))\n")


def trial_run(gguf: Path, threads: int, code: str | None = None) -> None:
    """Runs code (TRIAL_CODE: a llama-cpp-python trial of gguf on threads) in a child; CompareError
    if it dies or fails."""
    r = subprocess.run([sys.executable, "-c", code or TRIAL_CODE, str(gguf), str(threads)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:  # a signal Python has no name for
            name = f"signal {-r.returncode}"
        raise CompareError(f"llama.cpp died ({name}) in a trial run on this CPU; on an x86 CPU with AMX, rebuild "
                           "llama-cpp-python without it (the README says how)")
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompareError(f"llama.cpp failed in a trial run (exit {r.returncode}): {tail}")


class PyLlama:
    """llama.cpp through llama-cpp-python, fed token ids, greedy."""

    def __init__(self, gguf: Path, *, threads: int, ctx: int):
        try:
            import llama_cpp
        except ImportError:
            raise CompareError("--vs llama.cpp needs the llama-cpp-python package (pip install "
                               "'flashinfer-cli[llamacpp]') or a llama.cpp build: --vs llama.cpp=BUILD_DIR") from None
        trial_run(gguf, threads)
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax_last(self) -> int:
        """The greedy token from the last evaluated position's logits (read in place: llm.scores
        holds only n_batch rows)."""
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def run(self, ids: list[int], n_gen: int, text: str) -> "Timing":
        llm = self.llm
        llm.reset()  # from an empty cache, as fic's every prompt
        t0 = time.perf_counter()
        llm.eval(ids)
        tokens = [self._argmax_last()]
        t1 = time.perf_counter()
        while len(tokens) < n_gen:
            llm.eval([tokens[-1]])
            tokens.append(self._argmax_last())
        t2 = time.perf_counter()
        return Timing(len(ids), len(tokens), t1 - t0, t2 - t1, tokens)

    def close(self) -> None:
        self.llm.close()


class BinLlama:
    """llama.cpp's llama-completion, one process per prompt, the prompt as text; its perf lines time it."""

    def __init__(self, path: str, gguf: Path, *, threads: int, ctx: int):
        self.exe, self.gguf, self.threads, self.ctx = completion_binary(path), gguf, threads, ctx

    def command(self, prompt_file: str, n_gen: int) -> list[str]:
        return [str(self.exe), "-m", str(self.gguf), "-t", str(self.threads), "-c", str(self.ctx), "-n", str(n_gen),
                "--temp", "0", "--seed", "0", "-no-cnv", "--ignore-eos", "-f", prompt_file, "--no-display-prompt",
                "--no-warmup"]

    def run(self, ids: list[int], n_gen: int, text: str) -> "Timing":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            r = subprocess.run(self.command(f.name, n_gen), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        perf = parse_perf(r.stderr)
        if r.returncode != 0 or "eval_time_ms" not in perf:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise CompareError(f"llama-completion failed (exit {r.returncode}): {tail}")
        # llama.cpp counts the first token's sampling in neither line; its "eval" is the decode steps
        return Timing(perf.get("prompt_eval_time_tokens", len(ids)), perf.get("eval_time_tokens", 0) + 1,
                      perf["prompt_eval_time_ms"] / 1e3, perf["eval_time_ms"] / 1e3, None)

    def close(self) -> None:
        pass


def open_peer(spec: PeerSpec, gguf: Path, *, threads: int, ctx: int):
    return BinLlama(spec.path, gguf, threads=threads, ctx=ctx) if spec.path else PyLlama(gguf, threads=threads, ctx=ctx)


# ---- one run ---------------------------------------------------------------------------------

@dataclass
class Timing:
    prompt_tokens: int
    gen_tokens: int            # the first (from the prefill) included
    prefill_s: float
    decode_s: float            # the gen_tokens - 1 steps after the first
    tokens: list[int] | None   # the greedy tokens (None: a binary peer does not say)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        steps = self.gen_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def fic_run(engine: "Engine", ids: list[int], max_tokens: int) -> Timing:
    engine.forget_context()  # the whole prompt prefills, as the peer's
    last, tokens = None, []
    for last in engine.stream(ids, max_tokens=max_tokens):
        if last.token >= 0:
            tokens.append(last.token)
    return Timing(len(ids), last.generation_tokens, last.prompt_seconds, last.decode_seconds, tokens)


@dataclass
class Run:
    rep: int
    engine: str                # "fic" or "llama.cpp"
    prompt: str                # "short" / "long"
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float
    decode_tps: float
    load: str                  # /proc/loadavg before the step
    tokens: list[int] | None = None


@dataclass
class Row:
    """One prompt: medians of each engine and their ratios (fic / llama.cpp)."""

    prompt: str
    prompt_tokens: int
    peer_prompt_tokens: int
    gen_tokens: int
    fic_prefill_tps: float
    peer_prefill_tps: float
    prefill_ratio: float | None
    fic_decode_tps: float
    peer_decode_tps: float
    decode_ratio: float | None
    greedy_agree: int | None   # leading generated tokens equal in fic's and the peer's first repetition
    loads: list[str] = field(default_factory=list)


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(runs: Sequence[Run], peer: str = PEER_NAME) -> list[Row]:
    """A Row per prompt (in order of first appearance) from the runs' numbers."""
    rows = []
    for prompt in dict.fromkeys(r.prompt for r in runs):
        mine = [r for r in runs if r.prompt == prompt and r.engine == "fic"]
        theirs = [r for r in runs if r.prompt == prompt and r.engine == peer]
        if not mine or not theirs:
            raise ValueError(f"prompt {prompt!r} has runs of only one engine")
        med = lambda rs, k: statistics.median(getattr(r, k) for r in rs)  # noqa: E731
        agree = None
        if mine[0].tokens is not None and theirs[0].tokens is not None:
            agree = next((i for i, (a, b) in enumerate(zip(mine[0].tokens, theirs[0].tokens)) if a != b),
                         min(len(mine[0].tokens), len(theirs[0].tokens)))
        fp, pp, fd, pd = (med(mine, "prefill_tps"), med(theirs, "prefill_tps"), med(mine, "decode_tps"),
                          med(theirs, "decode_tps"))
        rows.append(Row(prompt, mine[0].prompt_tokens, theirs[0].prompt_tokens, mine[0].gen_tokens, fp, pp,
                        ratio(fp, pp), fd, pd, ratio(fd, pd), agree,
                        [r.load for r in runs if r.prompt == prompt]))
    return rows


# ---- the comparison --------------------------------------------------------------------------

@dataclass
class Prompts:
    """name -> (token ids, the same prompt as text, special tokens written out)."""

    items: dict[str, tuple[list[int], str]]


def make_prompts(engine: "Engine", long_tokens: int = DEFAULT_LONG_TOKENS) -> Prompts:
    """The short code question and a document of quality texts cut to about long_tokens, both
    through the chat template."""
    from flashinfer_cli import texts

    tok = engine.tokenizer
    short = engine.prompt_ids(SHORT_PROMPT)
    doc_ids: list[int] = []
    for t in texts.quality_texts():
        doc_ids += tok.encode(("\n\n" if doc_ids else "") + t.text, add_bos=False)
        if len(doc_ids) >= long_tokens:
            break
    if not doc_ids:
        raise CompareError("no quality texts to build the long prompt from (a broken installation)")
    while len(doc_ids) < long_tokens:  # the texts repeated when they are shorter than asked
        doc_ids += doc_ids
    overhead = len(engine.prompt_ids(LONG_PROMPT + "\n\n"))
    doc = tok.decode(doc_ids[:max(1, long_tokens - overhead)])
    long = engine.prompt_ids(LONG_PROMPT + "\n\n" + doc)
    return Prompts({"short": (short, tok.decode(short)), "long": (long, tok.decode(long))})


@dataclass
class CompareReport:
    model: str
    gguf: str
    peer: str
    threads: int
    ctx: int
    max_tokens: int
    reps: int
    machine: dict
    date: str
    rows: list[Row]
    runs: list[Run]

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        m = self.machine
        out = [f"{self.model} against {self.peer} on {self.gguf}",
               f"{self.threads} threads, context {self.ctx}, greedy, up to {self.max_tokens} tokens, "
               f"{self.reps} repetitions alternated; medians; {self.date}",
               f"machine: {m.get('cpu')}, {m.get('cores')} cores, fic kernels {m.get('kernels')}",
               f"{'prompt':<7}{'in':>6}{'out':>5}{'prefill fic':>13}{'llama.cpp':>11}{'ratio':>7}"
               f"{'decode fic':>12}{'llama.cpp':>11}{'ratio':>7}{'agree':>7}  load (1/5/15 min) per step"]
        for r in self.rows:
            fmt_ratio = lambda x: f"{x:>7.2f}" if x is not None else f"{'-':>7}"  # noqa: E731
            agree = f"{r.greedy_agree:>7}" if r.greedy_agree is not None else f"{'-':>7}"
            tokens = f"{r.prompt_tokens}"
            if r.peer_prompt_tokens != r.prompt_tokens:  # a binary peer tokenized the text itself
                tokens += f"/{r.peer_prompt_tokens}"
            out.append(f"{r.prompt:<7}{tokens:>6}{r.gen_tokens:>5}{r.fic_prefill_tps:>13.1f}{r.peer_prefill_tps:>11.1f}"
                       f"{fmt_ratio(r.prefill_ratio)}{r.fic_decode_tps:>12.2f}{r.peer_decode_tps:>11.2f}"
                       f"{fmt_ratio(r.decode_ratio)}{agree}  {'; '.join(r.loads)}")
        out.append("ratio: fic / llama.cpp (above 1: fic faster); agree: leading greedy tokens equal (of 'out')")
        return out


def compare(engine: "Engine", peer, prompts: Prompts, *, reps: int, max_tokens: int, peer_name: str = PEER_NAME,
            say: Callable[[str], None] | None = None) -> list[Run]:
    """Every prompt on both engines, reps times, the order alternated; a Run per step."""
    runs: list[Run] = []
    for rep in range(1, reps + 1):
        for name, (ids, text) in prompts.items.items():
            order = ("fic", peer_name) if rep % 2 else (peer_name, "fic")
            n_gen = None
            for who in order:
                load = loadavg()
                if who == "fic":
                    t = fic_run(engine, ids, max_tokens)
                else:  # as many tokens as fic made (its first repetition, when the peer goes first)
                    t = peer.run(ids, n_gen or _fic_tokens(runs, name) or max_tokens, text)
                n_gen = n_gen or t.gen_tokens
                runs.append(Run(rep, who, name, t.prompt_tokens, t.gen_tokens, t.prefill_tps, t.decode_tps, load,
                                t.tokens))
                if say:
                    say(f"rep {rep} {name} {who}: prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.2f} tok/s "
                        f"(load {load})")
    return runs


def _fic_tokens(runs: Sequence[Run], prompt: str) -> int | None:
    return next((r.gen_tokens for r in runs if r.engine == "fic" and r.prompt == prompt), None)


def run_comparison(model: str, spec: PeerSpec, *, threads: int, reps: int, max_tokens: int,
                   long_tokens: int = DEFAULT_LONG_TOKENS, say: Callable[[str], None] | None = None) -> CompareReport:
    """Open fic (everything resident) and the peer on the GGUF MODEL came from; compare."""
    from flashinfer_cli import kernels
    from flashinfer_cli.bench_speed import machine_info
    from flashinfer_cli.engine import Engine
    from flashinfer_cli.pull import resolve_model
    from flashinfer_cli.store import Store, fic_home

    path = resolve_model(model)
    gguf = source_gguf(path, [Store().cache_dir, fic_home() / "cache"])
    if spec.path:
        completion_binary(spec.path)  # a missing binary fails before fic's model is opened
    kernels.set_threads(threads)
    ctx = long_tokens + max_tokens + TEMPLATE_ROOM
    engine = Engine.open(str(path), ctx=ctx, threads=threads)
    try:
        prompts = make_prompts(engine, long_tokens)
        peer = open_peer(spec, gguf, threads=threads, ctx=ctx)
        try:
            runs = compare(engine, peer, prompts, reps=reps, max_tokens=max_tokens, say=say)
        finally:
            peer.close()
    finally:
        engine.close()
    return CompareReport(model=path.name, gguf=str(gguf), peer=spec.describe(), threads=threads, ctx=ctx,
                         max_tokens=max_tokens, reps=reps, machine=machine_info(),
                         date=time.strftime("%Y-%m-%d %H:%M %Z"), rows=summarize(runs), runs=runs)
