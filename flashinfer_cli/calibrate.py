"""Calibration: fit the sketch policy's predictor on text every machine has, and store it.

Runs a converted model (model.py, every expert resident) over calibration text of three domains,
a third of the tokens each by default (CalibrationConfig.shares), chosen deterministically from a
seed; no corpus ships with fic:
  prose  the standard library's docstrings and comments (texts.py's _prose), the language
         reference's help topics (pydoc_data) and the prose files beside the sources (LICENSE.txt,
         IDLE's notes), plus the model's own answers to prose instructions;
  code   the standard library's sources, plus its answers to code instructions;
  chat   that prose taught as the assistant's answer to a user's question about its topic, in the
         model's chat template (prefill only: no decoding), plus its answers to chat instructions.
The model's own samples are a small share (decode is the slow part). A domain whose text runs out
is weighed up in the fit (domain_weights), so each keeps its share; the result reports the tokens
of each domain.

For every layer it collects the FFN's input x (post-norm) and the token's L2-normalised |h| row
(h = silu(gate x) * up x: the GRIFFIN statistic the `exact` policy scores with, router.py), and
fits a reduced-rank ridge regression x -> target (rank r: a (r x d_model), b (d_out x r), centring
means). The target is the row itself (d_ff outputs, "neuron") or the norm of each expert's slice of
it ("expert": n_experts outputs, what selection ranks). fmt.write_predictor stores it beside the
dense block (temporary file + rename), so an interrupted calibration leaves the model as it was.
Conversion never runs this: calibration sits above the model and the format.

`activation_rows` is the collection on its own, for other statistics (co-activation clustering):
it yields, window after window, each layer's FFN inputs and normalised |h| rows.
"""
from __future__ import annotations

import ast
import os
import sys
import sysconfig
import time
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from flashinfer_cli import fmt, kernels, texts

DOMAINS = ("prose", "code", "chat")
# the model's own samples: (domain, instruction); the held-out ones are never calibrated on
INSTRUCTIONS = (
    ("prose", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("code", "Write a Python function that parses a CSV file and returns the average of each column."),
    ("chat", "Hi! I'm planning a weekend trip with my kids. Any ideas for what we could do?"),
    ("prose", "Describe how bread is made, from the field to the bakery."),
    ("code", "Implement a binary search tree in Python with insert, find and delete."),
    ("chat", "Can you help me write a polite email asking my landlord to fix the heating?"),
)
HELD_OUT_INSTRUCTIONS = (
    ("chat", "What are some good habits for sleeping better? Please keep it friendly."),
    ("chat", "I feel nervous about a job interview tomorrow. What should I do tonight?"),
)
# the model's chat, taught without decoding: a question about a topic, stdlib prose as the answer
CHAT_QUESTIONS = (
    "Can you explain {topic} to me?",
    "Hi! What should I know about {topic}?",
    "I'm new to Python. How does {topic} work, in plain words?",
    "Could you give me a short overview of {topic}, please?",
    "What is {topic} about? Thanks in advance!",
)
# prose files shipped beside the standard library's sources by most Pythons (relative to stdlib)
PROSE_FILES = (
    ("LICENSE.txt", "Python's license and history"),
    ("idlelib/README.txt", "IDLE's files"),
    ("idlelib/NEWS.txt", "what changed in IDLE"),
    ("idlelib/HISTORY.txt", "IDLE's history"),
    ("idlelib/TODO.txt", "IDLE's to-do list"),
    ("idlelib/extend.txt", "writing IDLE extensions"),
    ("idlelib/CREDITS.txt", "who made IDLE"),
)
MIN_WINDOW = 16   # a shorter scrap of a document is dropped
PER_DOC = 2       # windows at most from one document: many documents, not a few long ones
CHARS_PER_TOKEN = 6  # generous: an excerpt of window * 6 characters fills a window of English or code
RANK_FORMATS = ("q8_0", "f16", "f32")
TARGETS = ("neuron", "expert")


@dataclass(frozen=True)
class CalibrationConfig:
    seed: int = 0
    tokens: int = 16000          # calibration tokens in all (stdlib text and the model's samples)
    rank: int = 64               # the predictor's rank (a multiple of 32: q8_0 rows)
    fmt: str = "q8_0"            # the stored matrices' format
    ridge: float = 1e-1          # relative to the inputs' mean eigenvalue; 0.1 generalised best to prose (RESULTS.md)
    window: int = 256            # tokens per forward pass (each window starts a fresh context)
    sample_share: float = 0.1    # share of the tokens from the model's own samples (decode is slow)
    sample_tokens: int = 160     # tokens generated per instruction
    shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # of the tokens: prose, code, chat (DOMAINS)
    target: str = "neuron"       # what the predictor predicts (TARGETS): each neuron's |h|, or each expert's norm


@dataclass
class DomainQuality:
    """How well the predictor's sets match exact's (GRIFFIN's) on held-out text of one domain:
    at each active fraction, the share of exact's top-k score mass that the predicted top-k holds
    (1.0: the same set), averaged over layers and windows; and R^2 of the predicted rows."""

    domain: str
    tokens: int
    mass_recall: dict[str, float]
    r2: float              # of what the predictor predicts (neuron rows, or expert norms)
    r2_expert: float = float("nan")  # of the rows' expert norms (expert_norms): comparable across targets


@dataclass
class CalibrationResult:
    config: CalibrationConfig
    n_tokens: int
    seconds: float
    predictor_bytes: int
    ffn_bytes: int
    held_out: list[DomainQuality] = field(default_factory=list)
    domain_tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens of each domain
    static_tokens: int = 0       # tokens the static scores (--policy static, mixed) were gathered over; 0: not made
    static_seconds: float = 0.0  # what gathering them took (part of seconds)

    @property
    def share_of_ffn(self) -> float:
        return self.predictor_bytes / max(1, self.ffn_bytes)

    def as_meta(self) -> dict:
        """What the manifest records about how the predictor was made."""
        meta = {"rank": self.config.rank, "fmt": self.config.fmt,
                "calibration": {"seed": self.config.seed, "tokens": self.n_tokens, "ridge": self.config.ridge,
                                "domain_tokens": self.domain_tokens, "seconds": round(self.seconds, 1),
                                "held_out": [_json_safe(asdict(q)) for q in self.held_out]}}
        if self.config.target != "neuron":  # the key is absent for the neuron target: older readers agree
            meta["target"] = self.config.target
        return meta


def _json_safe(d: dict) -> dict:
    """NaN (a figure not computed) as None: the manifest is strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


class CalibrationError(ValueError):
    """A calibration that cannot run (bad options, a model it does not apply to); one line."""


# ---- the text -------------------------------------------------------------------------------

def _stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    try:
        names = sorted(os.listdir(stdlib))
    except OSError:
        return []
    return [os.path.join(stdlib, n) for n in names if n.endswith(".py") and not n.startswith("_")]


def _read_source(path: str) -> str | None:
    try:
        with tokenize.open(path) as f:
            source = f.read()
        ast.parse(source)
        return source
    except Exception:  # an undecodable or unparsable file is skipped
        return None


def stdlib_documents(seed: int, *, held_out: bool = False) -> Iterator[tuple[str, str]]:
    """(domain, text) from the standard library, in an order fixed by the seed: a file's source
    ("code") or its docstrings and comments ("prose"), alternately. The files are split by the
    seed into calibration (3 in 4) and held-out ones (held_out=True)."""
    files = _stdlib_files()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    picked = [files[i] for k, i in enumerate(order) if (k % 4 == 3) == held_out]
    for k, path in enumerate(picked):
        source = _read_source(path)
        if source is None:
            continue
        if k % 2 == 0:
            yield "code", source
        else:
            prose = "\n\n".join(texts._prose(source))
            if prose:
                yield "prose", prose


def own_samples(engine, instructions: Sequence[tuple[str, str]], seed: int, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(domain, token ids of the chat: instruction and the model's sampled answer) per instruction."""
    out = []
    for k, (domain, instruction) in enumerate(instructions):
        ids = engine.prompt_ids(instruction)
        answer = "".join(engine.generate(instruction, max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                                         seed=seed * 1000 + k))
        out.append((domain, ids + engine.tokenize(answer)))
    return out


def _text_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _stdlib_prose_files() -> list[tuple[str, str]]:
    """(topic, text) of the English prose files some Pythons ship beside the sources (the
    license and its history, IDLE's notes); a missing one is skipped (distributions differ)."""
    stdlib = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    out = []
    for rel, topic in PROSE_FILES:
        text = _text_file(os.path.join(stdlib, rel))
        if text and text.strip():
            out.append((topic, text))
    return out


def _pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) of the language reference's help topics (pydoc_data), sorted by name."""
    try:
        from pydoc_data.topics import topics
    except Exception:  # absent from some distributions' minimal Pythons
        return []
    return [(name.replace("-", " "), text) for name, text in sorted(topics.items()) if text.strip()]


def prose_documents(seed: int) -> list[tuple[str, str]]:
    """(topic, text) of every English prose source of the standard library, in an order fixed by
    the seed: the calibration files' docstrings and comments, the help topics, the prose files."""
    docs = []
    for path in _calibration_files(seed)[1::2]:
        source = _read_source(path)
        paragraphs = texts._prose(source) if source else []
        if paragraphs:
            docs.append((f"the {Path(path).stem} module", "\n\n".join(paragraphs)))
    docs += _pydoc_topics() + _stdlib_prose_files()
    order = np.random.default_rng(seed + 1).permutation(len(docs))
    return [docs[i] for i in order]


def code_documents(seed: int) -> list[str]:
    """The source of every other calibration file (the rest give prose_documents their docstrings)."""
    return [src for path in _calibration_files(seed)[0::2] if (src := _read_source(path)) is not None]


def _calibration_files(seed: int) -> list[str]:
    """The standard-library files calibration may read: 3 in 4, chosen by the seed (the 4th are
    held out: stdlib_documents(held_out=True))."""
    files = _stdlib_files()
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for k, i in enumerate(order) if k % 4 != 3]


def chat_ids(engine, topic: str, answer: list[int], k: int) -> list[int]:
    """A conversation taught to the model without decoding: a user turn asking about the topic in
    the model's chat template, then the prose's tokens as the assistant's answer."""
    question = CHAT_QUESTIONS[k % len(CHAT_QUESTIONS)].format(topic=topic)
    return engine.prompt_ids(question) + list(answer)


def _excerpt(text: str, n_chars: int, rng: np.random.Generator) -> str:
    """About n_chars of text from an offset the rng picks, moved on to a line's start: tokenizing
    a whole long document for the few windows taken from it would cost more than the forward."""
    if len(text) <= n_chars:
        return text
    start = int(rng.integers(0, len(text) - n_chars))
    line = text.find("\n", start, start + n_chars // 2)
    start = line + 1 if line >= 0 else start
    return text[start:start + n_chars]


def _doc_windows(ids: list[int], window: int, rng: np.random.Generator, per_doc: int) -> list[list[int]]:
    """At most per_doc windows of one document at offsets the rng picks (not always its head,
    which is licence and imports for most sources); scraps under MIN_WINDOW are dropped."""
    starts = list(range(0, max(1, len(ids) - MIN_WINDOW), window))
    picked = sorted(rng.choice(len(starts), size=min(per_doc, len(starts)), replace=False))
    return [w for i in picked if len(w := ids[starts[i]:starts[i] + window]) >= MIN_WINDOW]


def domain_budgets(cfg: CalibrationConfig) -> dict[str, int]:
    """Tokens each domain is given: cfg.shares of cfg.tokens (the last takes the rounding)."""
    budgets = {d: int(cfg.tokens * share) for d, share in zip(DOMAINS, cfg.shares)}
    budgets[DOMAINS[-1]] += cfg.tokens - sum(budgets.values())
    return budgets


def token_windows(engine, cfg: CalibrationConfig) -> list[tuple[str, list[int]]]:
    """The calibration windows: (domain, ids of at most cfg.window tokens), cfg.tokens in all,
    each domain its share (domain_budgets): the model's own samples first (in their domains), then
    prose (the standard library's docstrings, help topics and prose files), code (its sources) and
    chat (that prose taught as the answer to a user's question in the chat template: prefill only).
    A domain whose text runs out leaves its remainder unfilled: calibrate() weighs it up."""
    budgets = domain_budgets(cfg)
    filled = dict.fromkeys(DOMAINS, 0)
    windows: list[tuple[str, list[int]]] = []

    def take(domain: str, ids: list[int]) -> bool:
        room = budgets[domain] - filled[domain]
        w = ids[:min(cfg.window, room)]
        if room > 0 and len(w) >= min(MIN_WINDOW, room):
            windows.append((domain, w))
            filled[domain] += len(w)
        return filled[domain] >= budgets[domain]

    n_samples = max(1, int(round(cfg.tokens * cfg.sample_share / max(1, cfg.sample_tokens))))
    for domain, ids in own_samples(engine, INSTRUCTIONS[:min(n_samples, len(INSTRUCTIONS))], cfg.seed,
                                   cfg.sample_tokens):
        take(domain, ids)
    rng = np.random.default_rng(cfg.seed + 2)
    prose = prose_documents(cfg.seed)
    for topic, text in prose[0::2]:  # half of the prose as prose, the other half as chat answers
        ids = engine.tokenize(_excerpt(text, CHARS_PER_TOKEN * cfg.window * PER_DOC, rng))
        if any(take("prose", w) for w in _doc_windows(ids, cfg.window, rng, PER_DOC)):
            break
    for source in code_documents(cfg.seed):
        ids = engine.tokenize(_excerpt(source, CHARS_PER_TOKEN * cfg.window * PER_DOC, rng))
        if any(take("code", w) for w in _doc_windows(ids, cfg.window, rng, PER_DOC)):
            break
    for k, (topic, text) in enumerate(prose[1::2]):
        answers = _doc_windows(engine.tokenize(_excerpt(text, CHARS_PER_TOKEN * cfg.window, rng)), cfg.window, rng, 1)
        if answers and take("chat", chat_ids(engine, topic, answers[0], k)):
            break
    return windows


def domain_tokens(windows: Sequence[tuple[str, Sequence[int]]]) -> dict[str, int]:
    out = dict.fromkeys(DOMAINS, 0)
    for domain, ids in windows:
        out[domain] += len(ids)
    return out


def domain_weights(cfg: CalibrationConfig, tokens: dict[str, int]) -> dict[str, float]:
    """Per-token weight of each domain in the fit, so that each carries its share of the ridge's
    statistics even when its text ran short: share * total / tokens (1.0 when it was filled)."""
    total = sum(tokens.values())
    return {d: (share * total / tokens[d] if tokens[d] else 0.0) for d, share in zip(DOMAINS, cfg.shares)}


# ---- the statistics -------------------------------------------------------------------------

def activation_rows(engine, windows: Sequence[Sequence[int]]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each window (token ids, run from an empty context with every expert) and each layer:
    (layer, x (t, d_model) the FFN's input, y (t, d_ff) the L2-normalised |h| rows, neurons in
    bundle order). Arrays are the caller's. The engine must hold every expert (no budget)."""
    m = engine.model
    if m.moe is not None:
        raise CalibrationError("calibration fits a dense model's FFN neurons; this model is a mixture of experts")
    inputs: dict[int, np.ndarray] = {}
    rows: dict[int, np.ndarray] = {}

    def before(layer: int, xn: np.ndarray) -> None:
        inputs[layer] = np.array(np.atleast_2d(xn), dtype=np.float32)

    def collect(layer: int, t: int, calls) -> None:
        rows[layer] = np.sqrt(m.scorer.normalized_sq(m.scorer.assemble(layer, t, calls)))

    for ids in windows:
        m.reset()
        m.before_ffn, m.collect, m.full = before, collect, True
        try:
            for i in range(0, len(ids), m.prefill_chunk):
                m.forward(list(ids[i:i + m.prefill_chunk]))
                for layer in range(m.config.n_layers):
                    yield layer, inputs.pop(layer), rows.pop(layer)
        finally:
            m.before_ffn, m.collect, m.full = None, None, not m.plan.prune
            engine.forget_context()


class RidgeStats:
    """One layer's sufficient statistics for the ridge regression x -> y (float64 sums)."""

    def __init__(self, d_in: int, d_out: int):
        self.n = 0
        self.sx = np.zeros(d_in)
        self.sy = np.zeros(d_out)
        self.sxx = np.zeros((d_in, d_in))
        self.sxy = np.zeros((d_in, d_out))

    def add(self, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> None:
        """Add the rows of x and y, each counted `weight` times (a domain's balance)."""
        self.n += weight * x.shape[0]
        self.sx += weight * x.sum(axis=0, dtype=np.float64)
        self.sy += weight * y.sum(axis=0, dtype=np.float64)
        self.sxx += weight * (x.T @ x)  # float32 products of one window (fast), summed in float64
        self.sxy += weight * (x.T @ y)

    def fit(self, rank: int, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(a (r, d_in), b (d_out, r), mu_x, mu_y): reduced-rank ridge regression (the rank-r
        projection of the ridge solution W that keeps most of the fitted rows' variance,
        W^T (C + lam I) W's top eigenvectors).

        With C + lam I = L L^T and m = L^T W = L^-1 Cxy, only m m^T (d_in x d_in) is needed, and it
        is L^-1 (Cxy Cxy^T) L^-T: one symmetric product of Cxy (syrk) is the only work on the d_out
        side, against a general solve with d_out right-hand sides and two more d_in x d_in x d_out
        products before (RESULTS.md, "Calibrating Qwen2.5-Coder-1.5B": the time measured)."""
        n = self.n if self.n > 0 else 1.0
        mu_x, mu_y = self.sx / n, self.sy / n
        cxx = self.sxx / n - np.outer(mu_x, mu_x)
        cxy = self.sxy / n - np.outer(mu_x, mu_y)
        lam = ridge * max(np.trace(cxx) / cxx.shape[0], 1e-12)
        reg = cxx + lam * np.eye(cxx.shape[0])
        if rank >= cxy.shape[1]:  # few outputs (expert target): the full ridge map, padded to the rank
            w = np.linalg.solve(reg, cxy)            # (d_in, d_out)
            a = np.zeros((rank, w.shape[0]))
            a[:w.shape[1]] = w.T
            return a.astype(np.float32), np.eye(w.shape[1], rank, dtype=np.float32), \
                mu_x.astype(np.float32), mu_y.astype(np.float32)
        chol = np.linalg.cholesky(reg)
        linv = np.linalg.inv(chol)                   # L^-1 (lower triangular; d_in^3, small)
        g = linv @ (cxy @ cxy.T) @ linv.T            # m m^T: the fitted rows' covariance
        u, evals = top_eigenvectors(g, rank)
        s = np.sqrt(np.maximum(evals, 1e-30))
        lt_u = linv.T @ u                            # L^-T u
        v = (cxy.T @ lt_u) / s                       # (d_out, r): m^T u / s, top right singular vectors of m
        a = (linv.T @ (g @ u) / s).T                 # (r, d_in): W v = L^-T m m^T u / s
        return a.astype(np.float32), v.astype(np.float32), mu_x.astype(np.float32), mu_y.astype(np.float32)


def expert_norms(y: np.ndarray, offsets: np.ndarray, n_experts: int) -> np.ndarray:
    """(t, n_experts): the L2 norm of each expert's slice of each normalised row (the expert
    target: what selection ranks, one output per expert instead of per neuron)."""
    return np.sqrt(np.add.reduceat(y * y, offsets[:n_experts], axis=1))


def top_eigenvectors(g: np.ndarray, k: int, *, iters: int = 8, extra: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The k leading eigenvectors and eigenvalues of the symmetric PSD g, by subspace iteration
    (matrix products; LAPACK's full eigh on a shared, loaded machine was 10x slower with two
    threads than with one). Deterministic: a fixed start."""
    n = g.shape[0]
    q = np.random.default_rng(0).standard_normal((n, min(n, k + extra)))
    for _ in range(iters):
        q = orthonormal_columns(g @ q)
    evals, u = np.linalg.eigh(q.T @ g @ q)
    top = np.argsort(evals)[::-1][:k]
    return q @ u[:, top], evals[top]


def orthonormal_columns(q: np.ndarray) -> np.ndarray:
    """An orthonormal basis of q's columns (tall, full rank): Cholesky QR twice, matrix products
    and a small Cholesky. The same span as numpy's Householder QR, whose many small threaded BLAS
    calls took 0.4-2.9 s for a 1536 x 80 block on the loaded 2-core machine against 0.03 s with one
    thread (RESULTS.md); Householder QR when the columns are too close to dependent for it."""
    try:
        for _ in range(2):  # the second pass restores orthogonality lost to rounding (CholQR2)
            r = np.linalg.cholesky(q.T @ q).T
            q = q @ np.linalg.inv(r)
        return q
    except np.linalg.LinAlgError:
        return np.linalg.qr(q)[0]


# ---- the predictor's tensors ----------------------------------------------------------------

def predictor_tensors(fits: Sequence[tuple], fmt_name: str) -> dict[str, kernels.QTensor | np.ndarray]:
    """The stored tensors of every layer's fit: matrices in fmt_name, means in f32."""
    out = {}
    for layer, (a, b, mu_x, mu_y) in enumerate(fits):
        n = fmt.predictor_names(layer)
        for name, mat in (("a", a), ("b", b)):
            out[n[name]] = kernels.quantize(np.ascontiguousarray(mat), fmt_name) if fmt_name != "f32" \
                else np.ascontiguousarray(mat, dtype=np.float32)
        out[n["mu_x"]], out[n["mu_y"]] = mu_x, mu_y
    return out


def tensor_bytes(tensors: dict) -> int:
    return sum(v.nbytes for v in tensors.values())


def ffn_bytes(manifest: fmt.Manifest) -> int:
    return sum(e.length for layer in manifest.experts for e in layer)


# ---- held-out quality -----------------------------------------------------------------------

def held_out_windows(engine, seed: int, window: int, per_domain: int) -> dict[str, list[list[int]]]:
    """Windows of each domain the calibration never saw: the shipped prose texts, held-out
    standard-library files' source, the model's answers to held-out chat instructions."""
    out = {"prose": [], "code": [], "chat": []}
    for doc in texts.quality_texts()[:per_domain]:
        out["prose"].append(engine.tokenize(doc.text)[:window])
    for domain, text in stdlib_documents(seed, held_out=True):
        if domain == "code" and len(out["code"]) < per_domain:
            out["code"].append(engine.tokenize(text)[:window])
        if len(out["code"]) >= per_domain:
            break
    for _, ids in own_samples(engine, HELD_OUT_INSTRUCTIONS[:per_domain], seed + 7919, min(window, 128)):
        out["chat"].append(ids[:window])
    return out


def expert_scores(sq_sum: np.ndarray, offsets: np.ndarray, n_experts: int) -> np.ndarray:
    """GRIFFIN expert scores from the per-neuron sums of squared normalised rows."""
    return np.add.reduceat(np.sqrt(sq_sum), offsets[:n_experts])


def mass_recall(true: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """The share of the true top-k experts' score mass that the predicted top-k holds."""
    best = np.sort(true)[::-1][:k].sum()
    chosen = true[np.argsort(-predicted, kind="stable")[:k]].sum()
    return float(chosen / best) if best > 0 else 1.0


def evaluate(engine, predictor, windows: dict[str, list[list[int]]],
             actives: Sequence[float] = (0.5, 0.75, 0.9)) -> list[DomainQuality]:
    """Each domain's DomainQuality of `predictor` (router.Predictor) against the true rows."""
    m = engine.model
    return [evaluate_rows(predictor, domain, activation_rows(engine, wins), m.scorer.offsets,
                          m.arena.experts_per_layer, sum(len(w) for w in wins), actives)
            for domain, wins in windows.items()]


def evaluate_rows(predictor, domain: str, rows: Iterable[tuple[int, np.ndarray, np.ndarray]], offsets: np.ndarray,
                  n_exp: np.ndarray, tokens: int, actives: Sequence[float] = (0.5, 0.75, 0.9)) -> DomainQuality:
    """One domain's DomainQuality from its (layer, x, y) rows (activation_rows' or a saved copy)."""
    recalls = {f"{a:g}": [] for a in actives}
    r2_raw, r2_exp = R2(), R2()
    for layer, x, y in rows:
        ne = int(n_exp[layer])
        true_e = expert_norms(y, offsets[layer], ne)
        raw = predictor.predict_raw(layer, x)
        r2_raw.add(y if predictor.target == "neuron" else true_e, raw)
        pred = predictor.predict(layer, x)  # the rows the Scorer is given
        p = np.maximum(pred, 0)
        r2_exp.add(true_e, raw if predictor.target == "expert" else expert_norms(p, offsets[layer], ne))
        true_s = expert_scores((y * y).sum(axis=0), offsets[layer], ne)
        pred_s = expert_scores((p * p).sum(axis=0), offsets[layer], ne)
        for a in actives:
            recalls[f"{a:g}"].append(mass_recall(true_s, pred_s, max(1, int(round(a * ne)))))
    return DomainQuality(domain, tokens, {k: float(np.mean(v)) for k, v in recalls.items()}, r2_raw.value,
                         r2_exp.value)


class R2:
    """R^2 of predictions against targets, pooled over the layers and windows added (each against
    its own window's mean: what a predictor adds beyond knowing the prompt's average row)."""

    def __init__(self):
        self.res = self.tot = 0.0

    def add(self, true: np.ndarray, pred: np.ndarray) -> None:
        self.res += float(((pred - true) ** 2).sum())
        self.tot += float(((true - true.mean(axis=0)) ** 2).sum())

    @property
    def value(self) -> float:
        return 1.0 - self.res / max(self.tot, 1e-30)


# ---- the whole calibration ------------------------------------------------------------------

def check_config(cfg: CalibrationConfig, d_model: int) -> None:
    if cfg.rank <= 0 or cfg.rank % 32:
        raise CalibrationError(f"--rank must be a positive multiple of 32, got {cfg.rank}")
    if cfg.rank > d_model:
        raise CalibrationError(f"--rank {cfg.rank} is above the model's width {d_model}")
    if cfg.tokens < 64:
        raise CalibrationError(f"--tokens must be at least 64, got {cfg.tokens}")
    if cfg.fmt not in RANK_FORMATS:
        raise CalibrationError(f"predictor format {cfg.fmt!r} (choose from {', '.join(RANK_FORMATS)})")
    if cfg.target not in TARGETS:
        raise CalibrationError(f"predictor target {cfg.target!r} (choose from {', '.join(TARGETS)})")
    if len(cfg.shares) != len(DOMAINS) or min(cfg.shares) < 0 or abs(sum(cfg.shares) - 1) > 1e-6:
        raise CalibrationError(f"domain shares must be {len(DOMAINS)} non-negative numbers adding up to 1, got {cfg.shares}")


def calibrate(model_dir: str | os.PathLike, cfg: CalibrationConfig = CalibrationConfig(), *,
              progress: bool = True, held_out: int = 2, write: bool = True, static: bool = True) -> CalibrationResult:
    """Fit the predictor of the model in model_dir and store it there (write). held_out: windows
    per domain for the held-out quality (0: none). static: also gather the static scores (the
    static and mixed policies'; Engine.static_calibration) and store them beside the model (write),
    so no engine has to compute them at open."""
    from tqdm import tqdm

    from flashinfer_cli import router
    from flashinfer_cli.engine import Engine
    from flashinfer_cli.router import Predictor

    t0 = time.perf_counter()
    # the context holds a window of the static scores' text too (their canonical, stored form)
    engine = Engine.open(str(model_dir), ctx=max(cfg.window, 256, router.STATIC_WINDOW if static else 0),
                         auto_pull=False)
    static_scores = None
    try:
        c = engine.model.config
        check_config(cfg, c.d_model)
        if engine.model.moe is not None:
            raise CalibrationError("the sketch predictor is for dense models; this one is a mixture of experts "
                                   "(its routers already score its experts)")
        if not engine.plan.all_resident:
            raise CalibrationError("calibration runs every expert resident: the machine has too little memory free")
        off, n_exp = engine.model.scorer.offsets, engine.model.arena.experts_per_layer
        d_out = [int(engine.model.scorer.d_ff) if cfg.target == "neuron" else int(n_exp[l]) for l in range(c.n_layers)]
        stats = [RidgeStats(c.d_model, d_out[l]) for l in range(c.n_layers)]
        with tqdm(total=cfg.tokens, desc="calibrating", unit="tok", file=sys.stderr, disable=not progress,
                  leave=False) as bar:
            windows = token_windows(engine, cfg)
            tokens = domain_tokens(windows)
            weights = domain_weights(cfg, tokens)
            for domain, ids in windows:
                for layer, x, y in activation_rows(engine, [ids]):
                    if cfg.target == "expert":
                        y = expert_norms(y, off[layer], int(n_exp[layer]))
                    stats[layer].add(x, y, weights[domain])
                    if layer == c.n_layers - 1:
                        bar.update(x.shape[0])
        n_tokens = sum(tokens.values())
        fits = [s.fit(cfg.rank, cfg.ridge) for s in stats]
        del stats
        tensors = predictor_tensors(fits, cfg.fmt)
        man = engine.model.reader.manifest
        result = CalibrationResult(cfg, n_tokens, 0.0, tensor_bytes(tensors), ffn_bytes(man), domain_tokens=tokens)
        if held_out:
            predictor = Predictor(tensors, c.n_layers, target=cfg.target,
                                  n_neurons=[[e.n_neurons for e in layer] for layer in man.experts])
            result.held_out = evaluate(engine, predictor, held_out_windows(engine, cfg.seed, cfg.window, held_out))
        if static:
            t1 = time.perf_counter()
            static_scores, window = engine.static_calibration()
            if window != router.STATIC_WINDOW:  # a model whose context is shorter than a window
                static_scores = None
            else:
                result.static_seconds = time.perf_counter() - t1
                result.static_tokens = router.STATIC_TOKENS
        result.seconds = time.perf_counter() - t0
    finally:
        engine.close()
    if write:
        fmt.write_predictor(model_dir, tensors, result.as_meta())
        if static_scores is not None:
            router.save_static(model_dir, static_scores)
    return result
