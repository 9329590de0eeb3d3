"""What `fic bench MODEL --quality` measures: what prune mode costs (speed: bench_speed.py).

For each held-out text (texts.held_out_texts: the shipped prose, and with --domains the standard
library's package modules that neither calibration reads), its first half is the prompt and its second
half the continuation. The full model scores the continuation teacher-forced; then, for each policy and
--active, prune mode chooses the active sets from the prompt (Engine.forward(ids, prompt_len=...))
and scores the same continuation. Reported per point: the continuation's perplexity relative to
the full model's (the geometric mean over texts of exp(mean NLL difference)) and greedy-token
agreement (the share of continuation positions whose argmax equals the full model's), and beside the
mean its spread: the per-text ratios' range and a 95% confidence range of the geometric mean (Student's
t over the texts' log ratios), so a difference between two policies can be told from the texts' noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from flashinfer_cli import router

ACTIVES = (0.25, 0.5, 0.75, 0.9, 1.0)
# Student's t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%); 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(dof: int) -> float:
    """Student's t distribution's 0.975 quantile (a two-sided 95% range) for dof >= 1."""
    if dof < 1:
        raise ValueError(f"degrees of freedom {dof} < 1")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


@dataclass(frozen=True)
class Spread:
    """How the per-text ratios of one point spread: their range, and the 95% confidence range of
    their geometric mean (exp of mean log ratio +- t * standard error; None with one text)."""

    low: float
    high: float
    ci95: tuple[float, float] | None


def spread(ratios: Sequence[float]) -> Spread:
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    if len(logs) < 2:
        return Spread(float(np.exp(logs.min())), float(np.exp(logs.max())), None)
    half = t975(len(logs) - 1) * float(logs.std(ddof=1)) / math.sqrt(len(logs))
    mean = float(logs.mean())
    return Spread(float(np.exp(logs.min())), float(np.exp(logs.max())), (math.exp(mean - half), math.exp(mean + half)))


@dataclass
class QualityPoint:
    policy: str
    active: float
    ppl_ratio: float                 # geometric mean over texts
    agreement: float                 # mean over texts
    per_text: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (ratio, agreement)
    auto: float | None = None        # --active auto's threshold; active is then the mean size it chose
    per_text_active: dict[str, float] = field(default_factory=dict)  # name -> active fraction chosen
    spread: Spread | None = None     # of the per-text ratios
    per_domain: dict[str, float] = field(default_factory=dict)  # domain -> geometric mean ratio
    reselect: int = 0                # the continuation's tokens between reselections (0: sets held)
    # against exact at the same active size, text by text (paired: the texts' own difficulty cancels):
    # the geometric mean of this point's ratio over exact's, and its spread
    vs_exact: float | None = None
    vs_exact_spread: Spread | None = None


@dataclass
class QualityReport:
    model: str
    n_texts: int
    tokens_per_text: int
    full_ppl: float                  # the full model's continuation perplexity (geometric mean)
    points: list[QualityPoint]
    domains: dict[str, str] = field(default_factory=dict)  # text name -> its domain

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[str]:
        lines = [f"{'policy':<8}{'active':>8}{'ppl x':>10}{'95% range':>16}{'texts min-max':>16}{'agree':>8}"]
        for p in self.points:
            chosen = "" if p.auto is None else \
                f"  auto:{p.auto:g} (per text {min(p.per_text_active.values()):.2f}-{max(p.per_text_active.values()):.2f})"
            sp = p.spread or spread([r for r, _ in p.per_text.values()])
            ci = f"{sp.ci95[0]:.3f}-{sp.ci95[1]:.3f}" if sp.ci95 else "-"
            domains = "" if len(p.per_domain) < 2 else "  " + " ".join(f"{d}:{r:.3f}" for d, r in p.per_domain.items())
            resel = f"  reselect {p.reselect}" if p.reselect else ""
            if p.vs_exact is not None:
                vs = p.vs_exact_spread
                resel += f"  vs exact x{p.vs_exact:.3f}" + (f" ({vs.ci95[0]:.3f}-{vs.ci95[1]:.3f})" if vs.ci95 else "")
            lines.append(f"{p.policy:<8}{p.active:>8.2f}{p.ppl_ratio:>10.3f}{ci:>16}{f'{sp.low:.3f}-{sp.high:.3f}':>16}"
                         f"{p.agreement:>8.3f}{chosen}{domains}{resel}")
        return lines


def _nll(logits: np.ndarray, ids: Sequence[int], start: int) -> np.ndarray:
    """NLL of ids[start:] under logits[start - 1:-1] (position t-1 predicts token t)."""
    z = logits[start - 1:len(ids) - 1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(ids) - start), np.asarray(ids[start:])]


def model_policies(is_moe: bool, asked: Sequence[str] | None, has_predictor: bool = False) -> list[str]:
    """The policies to compare: asked (each must suit the kind of model), else a dense model's
    (exact, static, and sketch when it has a predictor) or a mixture of experts' one (router)."""
    fits = ("router",) if is_moe else ("exact", "static", "sketch", "mixed", "sketch-mixed")
    if asked is None:
        return list(fits[:3]) if has_predictor or is_moe else list(fits[:2])
    wrong = [p for p in asked if p not in fits]
    if wrong:
        kind = "a mixture of experts" if is_moe else "dense"
        raise ValueError(f"policy {wrong[0]!r} does not apply: the model is {kind} (use {' or '.join(fits)})")
    return list(asked)


def quality(model: str | Path, *, actives: Sequence[float | str] = ACTIVES, policies: Sequence[str] | None = None,
            max_tokens: int = 512, n_texts: int | None = None, prefill: str | None = None,
            domains: Sequence[str] = ("prose",), reselect: int = 0,
            progress: Callable[[str], None] | None = None) -> QualityReport:
    """policies: None compares the ones that suit the model (model_policies). actives: fractions,
    or "auto[:T]" (each text's prompt then chooses the sizes; the point's active is their mean).
    prefill: the sketch policy's (None: its default in prune mode). domains: the texts' domains
    (texts.DOMAINS), n_texts of each (None: all). reselect: every that many continuation tokens
    the sets are rescored from the recent tokens, as generation would (0: held)."""
    from flashinfer_cli import texts
    from flashinfer_cli.engine import Engine

    docs = texts.held_out_texts(domains, n_texts)
    full = Engine.open(str(model), ctx=max_tokens)
    try:
        policies = model_policies(full.model.moe is not None, policies,
                                  full.model.reader.manifest.predictor is not None)
    except ValueError:
        full.close()
        raise
    samples = []
    for d in docs:
        ids = full.tokenize(d.text)[:max_tokens]
        split = len(ids) // 2
        logits = full.forward(ids, prompt_len=split)
        samples.append((d.name, ids, split, _nll(logits, ids, split), logits[split - 1:-1].argmax(axis=1)))
    full_ppl = math.exp(float(np.mean([s[3].mean() for s in samples])))
    full.close()
    domain_of = {d.name: d.domain for d in docs}
    points = [_point(model, policy, a, samples, domain_of, max_tokens, prefill, reselect, progress)
              for policy in policies for a in actives]
    _pair_with_exact(points)
    return QualityReport(str(model), len(samples), max_tokens, full_ppl, points, domain_of)


def _pair_with_exact(points: list[QualityPoint]) -> None:
    """Fill each non-exact point's vs_exact from the exact point at the same active size, if any."""
    exact = {p.active: p for p in points if p.policy == "exact" and p.auto is None}
    for p in points:
        base = exact.get(p.active)
        if p.policy != "exact" and p.auto is None and base is not None:
            ratios = [p.per_text[name][0] / base.per_text[name][0] for name in p.per_text]
            p.vs_exact, p.vs_exact_spread = _geomean(ratios), spread(ratios)


def _geomean(ratios: Sequence[float]) -> float:
    return math.exp(float(np.mean([math.log(r) for r in ratios])))


def _point(model, policy: str, a, samples, domain_of: dict[str, str], max_tokens: int, prefill: str | None,
           reselect: int, progress) -> QualityPoint:
    """One policy at one active size over every sample: its ratios, agreement and their spread."""
    from flashinfer_cli import plan as planlib
    from flashinfer_cli.engine import Engine

    if progress:
        progress(f"{policy} {a}")
    auto = planlib.parse_active(a)
    auto = auto if isinstance(auto, planlib.AutoActive) else None
    # a context that holds a window of the static scores' text: computed where missing, they are stored
    eng = Engine.open(str(model), ctx=max(max_tokens, router.STATIC_WINDOW), mode="prune", active=a if auto else float(a), policy=policy,
                      prefill=prefill if policy in router.PREDICTED else None, reselect=reselect)
    per, chosen = {}, {}
    try:
        for name, ids, split, nll_full, top_full in samples:
            logits = eng.forward(ids, prompt_len=split, reselect=bool(reselect))
            ratio = math.exp(float(_nll(logits, ids, split).mean() - nll_full.mean()))
            agree = float((logits[split - 1:-1].argmax(axis=1) == top_full).mean())
            per[name] = (ratio, agree)
            chosen[name] = eng.active_fraction
    finally:
        eng.close()
    by_domain: dict[str, list[float]] = {}
    for name, (r, _) in per.items():
        by_domain.setdefault(domain_of[name], []).append(r)
    ratios = [r for r, _ in per.values()]
    return QualityPoint(policy, float(np.mean(list(chosen.values()))) if auto else float(a), _geomean(ratios),
                        float(np.mean([g for _, g in per.values()])), per,
                        auto=auto.threshold if auto else None, per_text_active=chosen if auto else {},
                        spread=spread(ratios), per_domain={d: _geomean(r) for d, r in by_domain.items()},
                        reselect=reselect)
