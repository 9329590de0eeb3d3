"""What `fic bench MODEL --quality` measures: what prune mode costs (speed: bench_speed.py).

For each shipped text (texts.quality_texts), its first half is the prompt and its second half the
continuation. The full model scores the continuation teacher-forced; then, for each policy and
--active, prune mode chooses the active sets from the prompt (Engine.forward(ids, prompt_len=...))
and scores the same continuation. Reported per point: the continuation's perplexity relative to
the full model's (the geometric mean over texts of exp(mean NLL difference)) and greedy-token
agreement (the share of continuation positions whose argmax equals the full model's).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ACTIVES = (0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass
class QualityPoint:
    policy: str
    active: float
    ppl_ratio: float                 # geometric mean over texts
    agreement: float                 # mean over texts
    per_text: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (ratio, agreement)
    auto: float | None = None        # --active auto's threshold; active is then the mean size it chose
    per_text_active: dict[str, float] = field(default_factory=dict)  # name -> active fraction chosen


@dataclass
class QualityReport:
    model: str
    n_texts: int
    tokens_per_text: int
    full_ppl: float                  # the full model's continuation perplexity (geometric mean)
    points: list[QualityPoint]

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[str]:
        lines = [f"{'policy':<8}{'active':>8}{'ppl x':>10}{'agree':>8}"]
        for p in self.points:
            chosen = "" if p.auto is None else \
                f"  auto:{p.auto:g} (per text {min(p.per_text_active.values()):.2f}-{max(p.per_text_active.values()):.2f})"
            lines.append(f"{p.policy:<8}{p.active:>8.2f}{p.ppl_ratio:>10.3f}{p.agreement:>8.3f}{chosen}")
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
    fits = ("router",) if is_moe else ("exact", "static", "sketch")
    if asked is None:
        return list(fits) if has_predictor or is_moe else list(fits[:2])
    wrong = [p for p in asked if p not in fits]
    if wrong:
        kind = "a mixture of experts" if is_moe else "dense"
        raise ValueError(f"policy {wrong[0]!r} does not apply: the model is {kind} (use {' or '.join(fits)})")
    return list(asked)


def quality(model: str | Path, *, actives: Sequence[float | str] = ACTIVES, policies: Sequence[str] | None = None,
            max_tokens: int = 512, n_texts: int | None = None, prefill: str | None = None,
            progress: Callable[[str], None] | None = None) -> QualityReport:
    """policies: None compares the ones that suit the model (model_policies). actives: fractions,
    or "auto[:T]" (each text's prompt then chooses the sizes; the point's active is their mean).
    prefill: the sketch policy's (None: its default in prune mode)."""
    from flashinfer_cli import plan as planlib, texts
    from flashinfer_cli.engine import Engine

    docs = texts.quality_texts()[:n_texts] if n_texts else texts.quality_texts()
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
    points = []
    for policy in policies:
        for a in actives:
            if progress:
                progress(f"{policy} {a}")
            auto = planlib.parse_active(a)
            auto = auto if isinstance(auto, planlib.AutoActive) else None
            eng = Engine.open(str(model), ctx=max_tokens, mode="prune", active=a if auto else float(a), policy=policy,
                              prefill=prefill if policy == "sketch" else None)
            per, chosen = {}, {}
            for name, ids, split, nll_full, top_full in samples:
                logits = eng.forward(ids, prompt_len=split)
                ratio = math.exp(float(_nll(logits, ids, split).mean() - nll_full.mean()))
                agree = float((logits[split - 1:-1].argmax(axis=1) == top_full).mean())
                per[name] = (ratio, agree)
                chosen[name] = eng.active_fraction
            eng.close()
            points.append(QualityPoint(policy, float(np.mean(list(chosen.values()))) if auto else float(a),
                                       math.exp(float(np.mean([math.log(r) for r, _ in per.values()]))),
                                       float(np.mean([g for _, g in per.values()])), per,
                                       auto=auto.threshold if auto else None,
                                       per_text_active=chosen if auto else {}))
    return QualityReport(str(model), len(samples), max_tokens, full_ppl, points)
