"""Calibration: fit the sketch policy's predictor on text every machine has, and store it.

Runs a converted model (model.py, every expert resident) over calibration text: files of the
Python standard library (found through sysconfig; half as source code, half as their docstrings
and comments, texts.py's prose) chosen deterministically from a seed, plus answers the model
writes itself to a few varied instructions (prose, code, chat). No corpus ships with fic.

For every layer it collects the FFN's input x (post-norm) and the token's L2-normalised |h| row
(h = silu(gate x) * up x: the GRIFFIN statistic the `exact` policy scores with, router.py), and
fits a reduced-rank ridge regression x -> row (rank r: a (r x d_model), b (d_ff x r), centring
means). fmt.write_predictor stores it beside the dense block (temporary file + rename), so an
interrupted calibration leaves the model as it was. Conversion never runs this: calibration sits
above the model and the format.

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
from typing import Iterator, Sequence

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
RANK_FORMATS = ("q8_0", "f16", "f32")


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


@dataclass
class DomainQuality:
    """How well the predictor's sets match exact's (GRIFFIN's) on held-out text of one domain:
    at each active fraction, the share of exact's top-k score mass that the predicted top-k holds
    (1.0: the same set), averaged over layers and windows; and R^2 of the predicted rows."""

    domain: str
    tokens: int
    mass_recall: dict[str, float]
    r2: float


@dataclass
class CalibrationResult:
    config: CalibrationConfig
    n_tokens: int
    seconds: float
    predictor_bytes: int
    ffn_bytes: int
    held_out: list[DomainQuality] = field(default_factory=list)

    @property
    def share_of_ffn(self) -> float:
        return self.predictor_bytes / max(1, self.ffn_bytes)

    def as_meta(self) -> dict:
        """What the manifest records about how the predictor was made."""
        return {"rank": self.config.rank, "fmt": self.config.fmt,
                "calibration": {"seed": self.config.seed, "tokens": self.n_tokens, "ridge": self.config.ridge,
                                "seconds": round(self.seconds, 1),
                                "held_out": [asdict(q) for q in self.held_out]}}


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


def token_windows(engine, cfg: CalibrationConfig) -> list[tuple[str, list[int]]]:
    """The calibration windows: (domain, ids of at most cfg.window tokens), the model's own
    samples first, then standard-library text, cfg.tokens in all."""
    windows = []
    n_samples = max(1, int(round(cfg.tokens * cfg.sample_share / max(1, cfg.sample_tokens))))
    prompts = list(INSTRUCTIONS[:min(n_samples, len(INSTRUCTIONS))])
    total = 0
    for domain, ids in own_samples(engine, prompts, cfg.seed, cfg.sample_tokens):
        w = ids[:min(cfg.window, cfg.tokens - total)]
        if w:
            windows.append((domain, w))
            total += len(w)
    for domain, text in stdlib_documents(cfg.seed):
        ids = engine.tokenize(text)
        for i in range(0, len(ids) - 16, cfg.window):  # windows of one document; a scrap is dropped
            if total >= cfg.tokens:
                return windows
            w = ids[i:i + min(cfg.window, cfg.tokens - total)]
            windows.append((domain, w))
            total += len(w)
    return windows


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

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.n += x.shape[0]
        self.sx += x.sum(axis=0, dtype=np.float64)
        self.sy += y.sum(axis=0, dtype=np.float64)
        self.sxx += x.T @ x  # float32 products of one window (fast), summed in float64
        self.sxy += x.T @ y

    def fit(self, rank: int, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(a (r, d_in), b (d_out, r), mu_x, mu_y): reduced-rank ridge regression (the rank-r
        projection of the ridge solution W that keeps most of the fitted rows' variance,
        W^T (C + lam I) W's top eigenvectors).

        With C + lam I = L L^T and m = L^T W = L^-1 Cxy, only m m^T (d_in x d_in) is needed, and it
        is L^-1 (Cxy Cxy^T) L^-T: one symmetric product of Cxy (syrk) is the only work on the d_out
        side, against a general solve with d_out right-hand sides and two more d_in x d_in x d_out
        products before (RESULTS.md, "Calibrating Qwen2.5-Coder-1.5B": the time measured)."""
        n = max(1, self.n)
        mu_x, mu_y = self.sx / n, self.sy / n
        cxx = self.sxx / n - np.outer(mu_x, mu_x)
        cxy = self.sxy / n - np.outer(mu_x, mu_y)
        lam = ridge * max(np.trace(cxx) / cxx.shape[0], 1e-12)
        chol = np.linalg.cholesky(cxx + lam * np.eye(cxx.shape[0]))
        linv = np.linalg.inv(chol)                   # L^-1 (lower triangular; d_in^3, small)
        g = linv @ (cxy @ cxy.T) @ linv.T            # m m^T: the fitted rows' covariance
        u, evals = top_eigenvectors(g, rank)
        s = np.sqrt(np.maximum(evals, 1e-30))
        lt_u = linv.T @ u                            # L^-T u
        v = (cxy.T @ lt_u) / s                       # (d_out, r): m^T u / s, top right singular vectors of m
        a = (linv.T @ (g @ u) / s).T                 # (r, d_in): W v = L^-T m m^T u / s
        return a.astype(np.float32), v.astype(np.float32), mu_x.astype(np.float32), mu_y.astype(np.float32)


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
    off = m.scorer.offsets
    n_exp = m.arena.experts_per_layer
    out = []
    for domain, wins in windows.items():
        recalls = {f"{a:g}": [] for a in actives}
        ss_res = ss_tot = 0.0
        for layer, x, y in activation_rows(engine, wins):
            pred = predictor.predict(layer, x)
            ss_res += float(((pred - y) ** 2).sum())
            ss_tot += float(((y - y.mean(axis=0)) ** 2).sum())
            true_s = expert_scores((y * y).sum(axis=0), off[layer], int(n_exp[layer]))
            p = np.maximum(pred, 0)
            pred_s = expert_scores((p * p).sum(axis=0), off[layer], int(n_exp[layer]))
            for a in actives:
                recalls[f"{a:g}"].append(mass_recall(true_s, pred_s, max(1, int(round(a * n_exp[layer])))))
        out.append(DomainQuality(domain, sum(len(w) for w in wins),
                                 {k: float(np.mean(v)) for k, v in recalls.items()},
                                 1.0 - ss_res / max(ss_tot, 1e-30)))
    return out


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


def calibrate(model_dir: str | os.PathLike, cfg: CalibrationConfig = CalibrationConfig(), *,
              progress: bool = True, held_out: int = 2, write: bool = True) -> CalibrationResult:
    """Fit the predictor of the model in model_dir and store it there (write). held_out: windows
    per domain for the held-out quality (0: none)."""
    from tqdm import tqdm

    from flashinfer_cli.engine import Engine
    from flashinfer_cli.router import Predictor

    t0 = time.perf_counter()
    engine = Engine.open(str(model_dir), ctx=max(cfg.window, 256), auto_pull=False)
    try:
        c = engine.model.config
        check_config(cfg, c.d_model)
        if engine.model.moe is not None:
            raise CalibrationError("the sketch predictor is for dense models; this one is a mixture of experts "
                                   "(its routers already score its experts)")
        if not engine.plan.all_resident:
            raise CalibrationError("calibration runs every expert resident: the machine has too little memory free")
        d_ff = int(engine.model.scorer.d_ff)
        stats = [RidgeStats(c.d_model, d_ff) for _ in range(c.n_layers)]
        with tqdm(total=cfg.tokens, desc="calibrating", unit="tok", file=sys.stderr, disable=not progress,
                  leave=False) as bar:
            windows = token_windows(engine, cfg)
            for k, (layer, x, y) in enumerate(activation_rows(engine, [w for _, w in windows])):
                stats[layer].add(x, y)
                if layer == c.n_layers - 1:
                    bar.update(x.shape[0])
        n_tokens = stats[0].n
        fits = [s.fit(cfg.rank, cfg.ridge) for s in stats]
        del stats
        tensors = predictor_tensors(fits, cfg.fmt)
        man = engine.model.reader.manifest
        result = CalibrationResult(cfg, n_tokens, 0.0, tensor_bytes(tensors), ffn_bytes(man))
        if held_out:
            predictor = Predictor(tensors, c.n_layers)
            result.held_out = evaluate(engine, predictor, held_out_windows(engine, cfg.seed, cfg.window, held_out))
        result.seconds = time.perf_counter() - t0
    finally:
        engine.close()
    if write:
        fmt.write_predictor(model_dir, tensors, result.as_meta())
    return result
