"""What `fic bench` measures by default: speed, per prompt, under the engine's memory budget.

Each prompt runs from an empty KV cache (the arena keeps what earlier prompts left: that is what
`--runs` shows) and generates greedily up to max_tokens. Per prompt:

    ttft_s          time to first token: the prefill of the whole prompt and its first sampled token
    prefill_tps     prompt tokens / ttft_s
    decode_tps      decode steps (generated tokens after the first) / their seconds
    bytes_read      expert bytes read from flash during the request (prefill and decode), as the
                    arena counted them (slots loaded and bundles streamed through the ring)
    read_gbps       bytes_read / the request's wall time (ttft + decode), in GB/s (1e9): the rate
                    the request pulled from flash, not the disk's peak
    hit_rate        arena hits / (hits + misses) over the request: of every time an FFN call or a
                    load asked for an expert, the share found resident (1.0 when none was asked)
    reselections    rescorings of the active sets during the request (--reselect)
    peak_rss_bytes  the process's peak resident memory during the request

The first run of a fresh engine is "cold" (its arena holds only what the open put there: everything
when the budget holds the model, else nothing); later runs are "warm" (the arena keeps what the
earlier prompts left). Medians are reported over every prompt, and over the cold and warm runs apart.
`sweep` repeats the measure per --mem x --active point and adds quality (bench.quality).
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from flashinfer_cli.engine import Engine

DEFAULT_MAX_TOKENS = 64
SWEEP_TEXTS = 2            # quality texts per sweep point (a full --quality run uses all eight)
SWEEP_QUALITY_TOKENS = 256  # tokens of each quality text in a sweep
MEDIAN_KEYS = ("ttft_s", "prefill_tps", "decode_tps", "bytes_read", "read_gbps", "hit_rate",
               "reselections", "peak_rss_bytes", "prompt_tokens", "tokens")


class BenchError(ValueError):
    """A bench request that cannot run (a bad prompts file, a missing extra); one line."""


# ---- prompts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    """One bench prompt: a user message (text) or a whole conversation (messages), chat-templated."""

    id: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def ids(self, engine: "Engine") -> list[int]:
        if self.messages is not None:
            return engine.chat_ids([dict(m) for m in self.messages])
        return engine.prompt_ids(self.text)


def default_prompts() -> list[Prompt]:
    """The shipped prompts (data/bench_prompts.json): a short chat question, a ~1,500-token
    document to summarise (composed of shipped quality texts: "append_texts"), a code task and a
    multi-turn conversation."""
    from importlib import resources

    from flashinfer_cli import texts

    data = resources.files("flashinfer_cli").joinpath("data", "bench_prompts.json")  # works from a wheel
    raw = json.loads(data.read_text(encoding="utf-8"))
    docs = {t.name: t.text for t in texts.quality_texts()}
    out = []
    for item in raw:
        if "messages" in item:
            out.append(Prompt(item["id"], messages=tuple(item["messages"])))
        else:
            parts = [item["prompt"]] + [docs[name] for name in item.get("append_texts", [])]
            out.append(Prompt(item["id"], text="\n\n".join(parts)))
    return out


def _message_list(value, where: str) -> tuple[dict, ...]:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise BenchError(f"{where}: a conversation is a list of {{\"role\": ..., \"content\": ...}} objects")
    if not any(m["role"] == "user" and m["content"].strip() for m in value):
        raise BenchError(f"{where}: the conversation has no user message")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def load_prompts(path: str | Path) -> list[Prompt]:
    """--prompts FILE: a JSON list when its first non-blank character is '[' (each item a string,
    a list of messages, or {"id", "prompt" | "messages"}), else one prompt per non-blank line."""
    p = Path(path)
    try:
        data = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"--prompts {path}: not UTF-8 text") from None
    except OSError as exc:
        raise BenchError(f"--prompts {path}: {exc.strerror or exc}") from None
    if data.lstrip().startswith("["):
        try:
            items = json.loads(data)
        except json.JSONDecodeError as exc:
            raise BenchError(f"--prompts {path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
        if not isinstance(items, list):
            raise BenchError(f"--prompts {path}: a JSON file holds a list of prompts")
        out = []
        for i, item in enumerate(items, start=1):
            where = f"--prompts {path}: item {i}"
            pid = f"p{i}"
            if isinstance(item, dict):
                pid = str(item.get("id", pid))
                item = item.get("messages", item.get("prompt"))
            if isinstance(item, str):
                if not item.strip():
                    raise BenchError(f"{where}: an empty prompt")
                out.append(Prompt(pid, text=item))
            elif isinstance(item, list):
                out.append(Prompt(pid, messages=_message_list(item, where)))
            else:
                raise BenchError(f"{where}: a prompt is a string or a list of messages")
    else:
        out = [Prompt(f"line{n}", text=line.strip()) for n, line in enumerate(data.splitlines(), start=1)
               if line.strip()]
    if not out:
        raise BenchError(f"--prompts {path}: no prompts in the file")
    return out


# ---- peak resident memory ------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakRSS:
    """The process's peak resident memory inside a `with` block.

    Why clear_refs and not a sampling thread: writing "5" to /proc/self/clear_refs resets VmHWM to
    the current RSS (Linux 4.0+), so the kernel itself tracks the peak of the block: exact (a thread
    sampling VmRSS misses short spikes) and free (a sampler would take the GIL and a core from the
    measured run, on a 2-core machine). Where the reset is refused, `exact` is False and the peak
    is the whole process's VmHWM (an upper bound)."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self.exact = False

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        kib = _status_kib("VmHWM")
        self.peak_bytes = kib * 1024 if kib is not None else None


# ---- the measure ---------------------------------------------------------------------------

@dataclass
class PromptResult:
    run: int                  # 1-based; run 1 is the cold one
    cold: bool
    prompt: str               # the prompt's id
    prompt_tokens: int
    tokens: int               # generated tokens, the first (from the prefill) and an end token included
    finish: str               # "stop" (an end token) or "length" (max_tokens or the context)
    ttft_s: float
    prefill_tps: float
    decode_s: float
    decode_tps: float
    bytes_read: int
    read_wait_s: float        # time spent waiting for reads (not hidden behind compute)
    read_gbps: float
    hits: int
    misses: int
    hit_rate: float
    reselections: int
    peak_rss_bytes: int | None


@dataclass
class Medians:
    n: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    bytes_read: float
    read_gbps: float
    hit_rate: float
    reselections: float
    peak_rss_bytes: float | None
    prompt_tokens: float
    tokens: float

    @classmethod
    def of(cls, results: Sequence[PromptResult]) -> "Medians | None":
        if not results:
            return None
        vals = {}
        for k in MEDIAN_KEYS:
            xs = [getattr(r, k) for r in results if getattr(r, k) is not None]
            vals[k] = float(np.median(xs)) if xs else None
        return cls(n=len(results), **vals)


def machine_info() -> dict:
    from flashinfer_cli import kernels

    cpu = None
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else None
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": kernels.get_threads(), "kernels": kernels.best_impl() + ("+amx" if kernels.amx_available() else ""),
            "load_avg": load,
            "python": platform.python_version()}


@dataclass
class SpeedReport:
    model: str
    path: str                     # the model directory
    mem: str | None
    mode: str
    active: str | None           # as asked (None: the largest that fits)
    policy: str
    active_fraction: float
    active_params: int
    budget_bytes: int | None
    planned_bytes: int
    all_resident: bool
    max_tokens: int
    runs: int
    io: str
    rss_exact: bool               # PeakRSS: the peak of each request (False: the process's VmHWM)
    machine: dict
    prompts: list[PromptResult]
    medians: Medians
    cold: Medians
    warm: Medians | None

    def as_dict(self) -> dict:
        d = asdict(self)
        # the medians over every prompt at the top, for scripts
        top = {k: d["medians"][k] for k in MEDIAN_KEYS}
        return {**top, **{k: v for k, v in d.items() if k != "medians"}, "medians": d["medians"]}

    @classmethod
    def from_dict(cls, d: dict) -> "SpeedReport":
        """A report back from its as_dict() (a saved --json), to print its table again."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["prompts"] = [PromptResult(**p) for p in d["prompts"]]
        for k in ("medians", "cold", "warm"):
            kw[k] = Medians(**d[k]) if d.get(k) is not None else None
        return cls(**kw)

    def lines(self) -> list[str]:
        """What `fic bench` prints: the setting, the machine, the table."""
        from flashinfer_cli.plan import human

        m = self.machine
        budget = human(self.budget_bytes) if self.budget_bytes else "none"
        out = [f"{self.model}: --mem {budget}, mode {self.mode}, policy {self.policy}, "
               f"active {self.active_fraction:.2f} ({self.active_params / 1e6:.1f}M params), "
               f"{'everything resident' if self.all_resident else 'experts streamed'}; {self.io}",
               f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, load {m['load_avg']}"]
        out += self.table()
        if self.warm is not None:
            out.append("cold: run 1, a fresh engine's arena; warm: later runs, the arena keeps what earlier prompts left")
        return out

    def table(self) -> list[str]:
        head = (f"{'run':<10}{'prompt':<12}{'in':>6}{'out':>5}{'ttft s':>8}{'prefill/s':>10}{'decode/s':>9}"
                f"{'read MB':>9}{'GB/s':>7}{'hit':>6}{'resel':>6}{'peak MB':>9}")
        lines = [head]

        def row(label: str, r) -> str:
            rss = f"{r.peak_rss_bytes / 1e6:>9.1f}" if r.peak_rss_bytes is not None else f"{'-':>9}"
            return (f"{label:<22}{r.prompt_tokens:>6.0f}{r.tokens:>5.0f}{r.ttft_s:>8.2f}{r.prefill_tps:>10.1f}"
                    f"{r.decode_tps:>9.2f}{r.bytes_read / 1e6:>9.1f}{r.read_gbps:>7.2f}{r.hit_rate:>6.2f}"
                    f"{r.reselections:>6.0f}{rss}")

        for r in self.prompts:
            lines.append(row(f"{f'{r.run} ' + ('cold' if r.cold else 'warm'):<10}{r.prompt[:11]:<12}", r))
        lines.append(row("median", self.medians))
        if self.warm is not None:
            lines.append(row("median cold", self.cold))
            lines.append(row("median warm", self.warm))
        return lines


def _one(engine: "Engine", prompt: Prompt, ids: list[int], run: int, max_tokens: int) -> tuple[PromptResult, bool]:
    # every prompt prefills whole: a cache reused from the previous prompt would flatter the prefill
    engine.forget_context()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        last = None
        for last in engine.stream(ids, max_tokens=max_tokens):
            pass
        wall = time.perf_counter() - t0
    st = engine.stats()["request"]
    lookups = st["hits"] + st["misses"]
    ttft = last.prompt_seconds
    busy = ttft + last.decode_seconds
    return PromptResult(
        run=run, cold=run == 1, prompt=prompt.id, prompt_tokens=len(ids), tokens=last.generation_tokens,
        finish=last.finish_reason or "length", ttft_s=ttft, prefill_tps=last.prompt_tps,
        decode_s=last.decode_seconds, decode_tps=last.generation_tps, bytes_read=int(st["bytes_read"]),
        read_wait_s=st["read_seconds"], read_gbps=st["bytes_read"] / (busy if busy > 0 else wall) / 1e9,
        hits=int(st["hits"]), misses=int(st["misses"]), hit_rate=st["hits"] / lookups if lookups else 1.0,
        reselections=int(st["reselections"]), peak_rss_bytes=rss.peak_bytes), rss.exact


def measure(engine: "Engine", prompts: Sequence[Prompt], *, runs: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
            mem: str | None = None, active: str | None = None, progress: bool = True,
            desc: str = "bench") -> SpeedReport:
    """Run every prompt `runs` times on an open engine (fresh: run 1 is cold) and report."""
    from tqdm import tqdm

    all_ids = []
    for p in prompts:  # tokenized up front: a prompt the model cannot take fails before any measure
        ids = p.ids(engine)
        if len(ids) + 1 > engine.ctx:
            raise BenchError(f"prompt {p.id!r} has {len(ids)} tokens, more than the context of {engine.ctx} "
                             "(see --ctx)")
        all_ids.append(ids)
    results: list[PromptResult] = []
    exact = True
    with tqdm(total=runs * len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for run in range(1, runs + 1):
            for p, ids in zip(prompts, all_ids):
                bar.set_postfix_str(f"run {run} {p.id}")
                r, ok = _one(engine, p, ids, run, max_tokens)
                exact &= ok
                results.append(r)
                bar.update(1)
    st = engine.stats()
    plan = engine.plan
    return SpeedReport(
        model=engine.path.name, path=str(engine.path), mem=mem, mode=st["mode"], active=None if active is None else str(active),
        policy=st["policy"], active_fraction=float(st["active_fraction"]), active_params=int(st["active_params"]),
        budget_bytes=st["budget_bytes"], planned_bytes=int(st["planned_bytes"]), all_resident=plan.all_resident,
        max_tokens=max_tokens, runs=runs, io=engine.model.reader.io_description(), rss_exact=exact,
        machine=machine_info(), prompts=results, medians=Medians.of(results),
        cold=Medians.of([r for r in results if r.cold]), warm=Medians.of([r for r in results if not r.cold]))


# ---- sweep and plot --------------------------------------------------------------------------

@dataclass
class SweepPoint:
    mem: str | None
    active: str | None
    mode: str
    policy: str
    active_fraction: float
    active_params: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    bytes_read: float
    read_gbps: float
    hit_rate: float
    peak_rss_bytes: float | None
    ppl: float | None = None          # the continuation perplexity (bench.quality's texts)
    ppl_ratio: float | None = None    # relative to the full model's
    agreement: float | None = None    # greedy-token agreement with the full model
    speed: dict = field(default_factory=dict)  # the point's whole SpeedReport


@dataclass
class SweepReport:
    model: str
    machine: dict
    quality_texts: int
    quality_tokens: int
    full_ppl: float | None
    points: list[SweepPoint]

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[str]:
        lines = [f"{'mem':>8}{'active':>8}{'frac':>6}{'params M':>10}{'ttft s':>8}{'prefill/s':>10}{'decode/s':>9}"
                 f"{'read MB':>9}{'GB/s':>7}{'hit':>6}{'peak MB':>9} {'ppl':>9} {'ppl x':>8}{'agree':>7}"]
        for p in self.points:
            q = (f" {p.ppl:>9.4g} {p.ppl_ratio:>8.4g}{p.agreement:>7.3f}" if p.ppl is not None
                 else f" {'-':>9} {'-':>8}{'-':>7}")
            rss = f"{p.peak_rss_bytes / 1e6:>9.1f}" if p.peak_rss_bytes is not None else f"{'-':>9}"
            lines.append(f"{p.mem or '-':>8}{p.active or '-':>8}{p.active_fraction:>6.2f}{p.active_params / 1e6:>10.1f}"
                         f"{p.ttft_s:>8.2f}{p.prefill_tps:>10.1f}{p.decode_tps:>9.2f}{p.bytes_read / 1e6:>9.1f}"
                         f"{p.read_gbps:>7.2f}{p.hit_rate:>6.2f}{rss}{q}")
        return lines


def sweep_point(report: SpeedReport) -> SweepPoint:
    m = report.medians
    return SweepPoint(mem=report.mem, active=report.active, mode=report.mode, policy=report.policy,
                      active_fraction=report.active_fraction, active_params=report.active_params,
                      ttft_s=m.ttft_s, prefill_tps=m.prefill_tps, decode_tps=m.decode_tps, bytes_read=m.bytes_read,
                      read_gbps=m.read_gbps, hit_rate=m.hit_rate, peak_rss_bytes=m.peak_rss_bytes,
                      speed=report.as_dict())


def add_quality(model: str, points: list[SweepPoint], *, n_texts: int = SWEEP_TEXTS,
                max_tokens: int = SWEEP_QUALITY_TOKENS,
                progress: Callable[[str], None] | None = None) -> float:
    """Each point's quality from bench.quality, in one call (the full model is scored once): a
    prune point at its engine's active fraction and policy; an exact point runs every expert, so it
    is the full model (ratio and agreement 1 by definition). Returns the full model's perplexity."""
    from flashinfer_cli import bench

    by_policy: dict[str, set[float]] = {}
    for p in points:
        if p.mode == "prune":
            by_policy.setdefault(p.policy, set()).add(round(p.active_fraction, 6))
    full_ppl = None
    found: dict[tuple[str, float], object] = {}
    for policy, fracs in sorted(by_policy.items()) or [(None, set())]:  # no prune point: the full model's only
        rep = bench.quality(model, actives=sorted(fracs), policies=[policy] if policy else None, max_tokens=max_tokens,
                            n_texts=n_texts, progress=progress)
        full_ppl = rep.full_ppl
        for q in rep.points:
            found[(policy, round(q.active, 6))] = q
    for p in points:
        if p.mode == "prune":
            q = found[(p.policy, round(p.active_fraction, 6))]
            p.ppl, p.ppl_ratio, p.agreement = full_ppl * q.ppl_ratio, q.ppl_ratio, q.agreement
        else:
            p.ppl, p.ppl_ratio, p.agreement = full_ppl, 1.0, 1.0
    return full_ppl


def need_matplotlib() -> None:
    """Raise BenchError (before any measure) when the `plot` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'flashinfer-cli[plot]'") from None


def plot(report: SweepReport, path: str | Path) -> None:
    """Decode tokens/s and continuation perplexity against active parameters, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pts = sorted(report.points, key=lambda p: p.active_params)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    handles = []
    mems = list(dict.fromkeys(p.mem for p in pts))
    for mem in mems:  # one speed line per budget
        sel = [p for p in pts if p.mem == mem]
        label = "decode tokens/s" + (f", --mem {mem}" if mem else "")
        handles += ax.plot([p.active_params / 1e6 for p in sel], [p.decode_tps for p in sel], "o-", label=label)
    ax.set_xlabel("active parameters (M)")
    ax.set_ylabel("decode tokens/s")
    q = sorted({p.active_params: p.ppl for p in pts if p.ppl is not None}.items())  # quality ignores --mem
    if q:
        ax2 = ax.twinx()
        handles += ax2.plot([a / 1e6 for a, _ in q], [v for _, v in q], "s--", color="tab:red",
                            label="continuation perplexity")
        ax2.set_ylabel("continuation perplexity (log)", color="tab:red")
        ax2.set_yscale("log")  # pruning a small dense model costs orders of magnitude at low --active
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(f"fic bench {report.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

