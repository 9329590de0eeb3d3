"""The soak: many prompts of varied length through one engine under a budget that forces
streaming, with reselection on, the way a long chat session runs.

- through one `fic chat` process (stdin lines, /clear between conversations): its resident memory,
  sampled every 50 ms from /proc/PID/status and its peak (VmHWM), stays within the budget plus
  the allowance tests/test_budget.py gives (RSS_MARGIN); no file descriptor or memory is leaked
  (/proc/PID/fd and VmRSS after the first answer and after the last); every answer (exact mode)
  is the full model's (an engine opened without --mem);
- in this process (half as many prompts), an Engine in exact mode and one in prune mode: the
  arena's invariants (Arena.check_invariants) hold after every request, exact answers are the
  full model's.

FIC_SOAK_PROMPTS sets the bounded count CI runs (default 40); the long run (300 prompts,
FIC_SOAK_LONG_PROMPTS) is marked `soak` and runs with `pytest -m soak`.

"The full model's answer", bit for bit: the FFN sums each expert in fixed point, so the streamed
pieces add up to what the resident call gives; a reused prefix is cut to the prefill's alignment
(engine.PREFIX_ALIGN); the full engine answers each turn right after the conversation's previous
one, as the session does, so both reuse the previous answer's keys and values as decoded.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import slow_report
from flashinfer_cli import fmt, texts
from test_budget import RSS_MARGIN, budget_for

HERE = Path(__file__).parent
SOAK_PROMPTS = int(os.environ.get("FIC_SOAK_PROMPTS") or 40)
LONG_PROMPTS = int(os.environ.get("FIC_SOAK_LONG_PROMPTS") or 300)
CTX = 1024
MAX_TOKENS = 8
RESELECT = 3
LEAK_MARGIN = 4 << 20  # VmRSS growth allowed from after the first answer to after the last


# ---- the arena's invariants ------------------------------------------------------------------

def test_arena_invariants_hold_and_each_broken_rule_is_caught(smollm2_model):
    from flashinfer_cli.arena import Arena

    with fmt.ModelReader(smollm2_model) as reader:
        arena = Arena(reader, n_slots=12, n_ring=2)
        arena.check_invariants()
        arena.load([(0, 0), (0, 1), (1, 5)], pin=True)
        arena.load([(2, e) for e in range(7)])
        arena.load([(3, 0), (3, 1)])  # evicts two
        arena.check_invariants()
        s = int(arena.slot_of[0, 0])
        breakages = {
            "a table entry whose slot names another owner": lambda: arena.owner.__setitem__(s, (3, 3)),
            "two experts in one slot": lambda: arena.slot_of.__setitem__((3, 3), s),
            "a ring slot in the table": lambda: arena.owner.__setitem__(int(arena.ring[0]), (4, 4)),
            "a pinned expert that is not resident": lambda: arena.pinned.__setitem__((5, 5), True),
            "a table entry outside the cache slots": lambda: arena.slot_of.__setitem__((6, 6), arena.n_slots - 1),
            "more streamed than missed": lambda: setattr(arena.total, "streamed", arena.total.misses + 1),
        }
        for what, breaks in breakages.items():
            saved = (arena.slot_of.copy(), arena.owner.copy(), arena.pinned.copy(), arena.total.streamed)
            breaks()
            with pytest.raises(AssertionError, match=what):
                arena.check_invariants()
            arena.slot_of[:], arena.owner[:], arena.pinned[:], arena.total.streamed = saved
            arena.check_invariants()
        # recover() rebuilds the owners from the table (what an interrupted eviction leaves)
        arena.owner[s] = (7, 7)
        arena.recover()
        arena.check_invariants()


# ---- the prompts ------------------------------------------------------------------------------

SHORT = ["Hi!", "Thanks.", "Why?", "Go on.", "What is 2 + 2?", "Name a color.", "Say it in French."]
ASKS = ["Summarize: ", "What is this about? ", "Continue this text: ", "Give this a title: ", ""]


def soak_conversations(n: int, seed: int = 7) -> list[list[str]]:
    """n user turns in conversations of 1-3 turns: short words, the questions fic ships, and
    passages of 5-120 words of its texts (a conversation stays well inside CTX)."""
    rng = random.Random(seed)
    questions = [p["prompt"] for p in texts.prompts()]
    passages = [t.text.split() for t in texts.quality_texts()]
    out, count = [], 0
    while count < n:
        turns = []
        for _ in range(min(rng.choice([1, 1, 2, 3]), n - count)):
            r = rng.random()
            if r < 0.35:
                turns.append(rng.choice(questions))
            elif r < 0.5:
                turns.append(rng.choice(SHORT))
            else:
                words = rng.choice(passages)
                k = rng.randint(5, 120)
                start = rng.randrange(0, len(words) - k)
                turns.append(rng.choice(ASKS) + " ".join(words[start:start + k]))
        out.append(turns)
        count += len(turns)
    return out


# ---- the full model's answers ------------------------------------------------------------------

_REFS: dict[tuple, tuple[str, list[int]]] = {}
_FULL_LAST: list[tuple] = [()]  # the history the full engine last answered (its cache holds it)


def history(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def printed(text: str) -> str:
    """What fic chat prints for an answer: the text, and a newline unless it ends with one."""
    return text if text.endswith("\n") else text + "\n"


def full_turn(full, messages: list[dict]) -> tuple[str, list[int]]:
    """The full engine's answer to messages, run as the session under test runs it: right after
    the conversation's previous turn (replayed first when the engine last ran something else), so
    that both reuse the previous answer's keys and values as they were decoded."""
    key = history(messages)
    if len(key) > 2 and _FULL_LAST[0] != key[:-2]:
        full_turn(full, messages[:-2])
    rs = list(full.stream(full.chat_ids(messages), max_tokens=MAX_TOKENS))
    tokens = [r.token for r in rs if r.token >= 0 and r.finish_reason != "stop"]
    answer = ("".join(r.text for r in rs), tokens)
    assert _REFS.setdefault(key, answer) == answer, "the full engine answered a replayed turn otherwise"
    _FULL_LAST[0] = key
    return answer


def full_answer(full, messages: list[dict]) -> tuple[str, list[int]]:
    return _REFS.get(history(messages)) or full_turn(full, messages)


def check_exact(full, messages: list[dict], got: str) -> None:
    """got (as printed) is the full model's answer to messages, token for token."""
    want, _ = full_answer(full, messages)
    assert printed(want) == got, ("exact mode parted from the full model", messages[-1]["content"][:80], got, want)


# ---- memory of another process ----------------------------------------------------------------

def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def n_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler(threading.Thread):
    """VmRSS of a process every 50 ms, in a thread: the largest seen and how many samples."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, status(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, StopIteration):
                return
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ---- the soak through fic chat ------------------------------------------------------------------

@pytest.fixture(scope="module")
def mem(smollm2_model) -> int:
    """A budget whose arena holds about 30% of SmolLM2's experts at CTX: exact mode streams
    the rest from flash every token."""
    return budget_for(smollm2_model, CTX, 0.3)


@pytest.fixture(scope="module")
def full(smollm2_model):
    from flashinfer_cli.engine import Engine

    eng = Engine.open(str(smollm2_model), ctx=CTX)
    assert eng.plan.all_resident
    return eng


def chat_soak(model: Path, mem: int, full, n: int) -> dict:
    convs = soak_conversations(n)
    args = [sys.executable, str(HERE / "_fic_rss.py"), "chat", str(model), "--mem", str(mem), "--ctx", str(CTX),
            "--max-tokens", str(MAX_TOKENS), "--reselect", str(RESELECT), "--verbose"]
    proc = subprocess.Popen(args, env={**os.environ, "FIC_THREADS": "1"}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said: list[str] = []

    def stderr_line() -> str:
        line = proc.stderr.readline().decode()
        if not line:
            proc.kill()
            raise AssertionError("fic chat ended early:\n" + "".join(said[-20:]))
        said.append(line)
        return line

    while not (line := stderr_line()).startswith("fic-test-baseline-rss: "):
        pass
    base = int(line.split()[1])
    sampler = RssSampler(proc.pid)
    sampler.start()
    os.set_blocking(proc.stdout.fileno(), False)
    t0 = time.perf_counter()
    done = streamed = 0
    fds0 = rss0 = None
    try:
        for ci, turns in enumerate(convs):
            if ci:
                proc.stdin.write(b"/clear\n")
            messages: list[dict] = []
            for turn in turns:
                proc.stdin.write(turn.encode() + b"\n")
                proc.stdin.flush()
                messages.append({"role": "user", "content": turn})
                full_answer(full, messages)  # while fic answers
                while not (line := stderr_line()).startswith("reselections:"):  # --verbose's last line
                    if line.startswith("hits / misses:"):
                        streamed += int(line.split("(")[1].split()[0])
                out = b""
                while True:  # the answer was flushed before its statistics: all of it is in the pipe
                    try:
                        chunk = os.read(proc.stdout.fileno(), 65536)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    out += chunk
                got = out.decode()
                check_exact(full, messages, got)
                messages.append({"role": "assistant", "content": got.strip()})
                done += 1
                if done == 1:
                    fds0, rss0 = n_fds(proc.pid), status(proc.pid, "VmRSS")
        fds1, rss1, hwm = n_fds(proc.pid), status(proc.pid, "VmRSS"), status(proc.pid, "VmHWM")
    finally:
        sampler.stop()
        proc.stdin.close()
    rest = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, "".join(said[-20:]) + rest
    assert "Traceback" not in "".join(said) + rest
    seconds = time.perf_counter() - t0
    figures = dict(prompts=done, conversations=len(convs), seconds=seconds, budget=mem, base=base,
                   peak_sampled=sampler.peak - base, peak_hwm=hwm - base, samples=sampler.samples,
                   fds=(fds0, fds1), rss_growth=rss1 - rss0, streamed=streamed)
    assert done == n
    assert streamed > 0, "the budget did not make fic stream"
    assert sampler.samples > seconds * 5, figures  # sampled throughout
    assert sampler.peak - base <= mem + RSS_MARGIN, figures
    assert hwm - base <= mem + RSS_MARGIN, figures
    assert fds1 == fds0, figures
    assert rss1 - rss0 <= LEAK_MARGIN, figures
    return figures


def report(kind: str, f: dict) -> None:
    mib = 1 << 20
    slow_report(f"soak ({kind}): {f['prompts']} prompts in {f['conversations']} conversations, {f['seconds']:.0f} s; "
                f"budget {f['budget'] / mib:.1f} MiB, peak beyond the baseline {f['peak_hwm'] / mib:.1f} MiB "
                f"(VmHWM; {f['peak_sampled'] / mib:.1f} MiB in {f['samples']} samples); fds {f['fds'][0]} -> "
                f"{f['fds'][1]}, VmRSS {f['rss_growth'] / 1024:+.0f} KiB from the first answer to the last; "
                f"{f['streamed']} experts streamed; every answer the full model's, token for token")


@pytest.mark.slow
def test_soak_chat_under_a_budget_that_streams(smollm2_model, mem, full):
    report("fic chat", chat_soak(smollm2_model, mem, full, SOAK_PROMPTS))


# ---- the soak in this process: the arena's invariants after every request -----------------------

def engine_soak(model: Path, mem: int, full, n: int) -> dict:
    """Conversations alternate between an exact engine (answers checked against the full model)
    and a prune engine, both under the budget with reselection; the arena's invariants after
    every request, and no file descriptor more at the end."""
    from flashinfer_cli.engine import Engine

    engines = {"exact": Engine.open(str(model), ctx=CTX, mem=mem, reselect=RESELECT),
               "prune": Engine.open(str(model), ctx=CTX, mem=mem, mode="prune", reselect=RESELECT)}
    assert not engines["exact"].plan.all_resident and engines["prune"].plan.prune
    done = 0
    fds0 = None
    t0 = time.perf_counter()
    for ci, turns in enumerate(soak_conversations(n)):
        mode = "exact" if ci % 2 == 0 else "prune"
        eng = engines[mode]
        messages: list[dict] = []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            got = "".join(eng.chat(messages, max_tokens=MAX_TOKENS))
            eng.model.arena.check_invariants()
            if mode == "exact":
                check_exact(full, messages, printed(got))
            messages.append({"role": "assistant", "content": got.strip()})
            done += 1
            if fds0 is None:
                fds0 = n_fds(os.getpid())
    assert n_fds(os.getpid()) == fds0
    for mode, eng in engines.items():
        total = eng.stats()["total"]
        assert total["reselections"] > 0 and total["bytes_read"] > 0, (mode, total)
    assert engines["exact"].stats()["total"]["streamed"] > 0
    return dict(prompts=done, seconds=time.perf_counter() - t0)


@pytest.mark.slow
def test_soak_engines_keep_the_arena_whole(smollm2_model, mem, full):
    f = engine_soak(smollm2_model, mem, full, max(2, SOAK_PROMPTS // 2))  # half: the chat soak has the count
    slow_report(f"soak (Engine, exact and prune): {f['prompts']} prompts, {f['seconds']:.0f} s, arena invariants "
                f"after each; every exact answer the full model's, token for token")


# ---- the long run --------------------------------------------------------------------------------

@pytest.mark.soak
def test_soak_long(smollm2_model, mem, full):
    """The same, LONG_PROMPTS (300) prompts each: `pytest -m soak`."""
    report("fic chat, long", chat_soak(smollm2_model, mem, full, LONG_PROMPTS))
    f = engine_soak(smollm2_model, mem, full, LONG_PROMPTS)
    slow_report(f"soak (Engine, long): {f['prompts']} prompts, {f['seconds']:.0f} s")
