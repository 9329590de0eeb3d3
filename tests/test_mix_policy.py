"""Static scores made by calibration, the default policy, and `sketch-mixed` (issue 7): `fic
calibrate` stores the static scores an engine would otherwise compute at its first open, an engine
that finds them runs no prefill at open, an engine told no policy takes router.PRUNE_DEFAULT in
prune mode (measured: exact, bench/RESULTS.md) and exact in exact mode without computing static
scores, and `sketch-mixed` averages the predictor's scores with static's as `mixed` does exact's.
Tiny random models (tests/_tiny.py): seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import convert_tiny_experts, copy_model  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from flashinfer_cli import calibrate as cal, router  # noqa: E402
from flashinfer_cli.cli import cli  # noqa: E402
from flashinfer_cli.engine import Engine  # noqa: E402
from flashinfer_cli.model import Model  # noqa: E402

TINY_CFG = cal.CalibrationConfig(seed=3, tokens=320, rank=32, window=64, sample_tokens=12, sample_share=0.2)
PROMPT = "The quick brown fox jumps over the lazy dog. Berlin is the capital of"
STREAMING = "24M"  # below the tiny model's everything-resident size: a selection is made per prompt


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A converted tiny model, neither predictor nor static scores: 8 experts of 16 neurons per layer."""
    return convert_tiny_experts(tmp_path_factory.mktemp("mix"))


@pytest.fixture(scope="module")
def calibrated(plain, tmp_path_factory) -> tuple[Path, cal.CalibrationResult]:
    dest = copy_model(plain, tmp_path_factory.mktemp("calibrated"))
    return dest, cal.calibrate(dest, TINY_CFG, progress=False, held_out=0)


def _fic(*args):
    return CliRunner().invoke(cli, list(args))


class ForwardCount:
    """Counts Model.forward calls (every prefill or decode chunk goes through it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = Model.forward

        def counted(model, *a, **kw):
            self.calls += 1
            return orig(model, *a, **kw)

        monkeypatch.setattr(Model, "forward", counted)


# ---- static scores made by calibration -------------------------------------------------------

def test_calibrate_stores_the_static_scores_an_open_would_compute(plain, calibrated, tmp_path):
    model, result = calibrated
    stored = router.load_static(model)
    assert stored is not None and stored.shape == (3, 8) and np.isfinite(stored).all() and (stored > 0).all()
    assert result.static_tokens == router.STATIC_TOKENS and result.static_seconds > 0
    # a model without them computes the same at its first open, under a budget (its own prefill
    # chunks, experts streamed), and stores them
    fresh = copy_model(plain, tmp_path)
    eng = Engine.open(str(fresh), ctx=256, mem=STREAMING, mode="prune", active=0.5, policy="mixed")
    eng.close()
    again = router.load_static(fresh)
    assert again is not None and np.allclose(again, stored, rtol=1e-4)


def test_static_scores_of_a_short_context_are_used_but_not_stored(plain, tmp_path):
    """A context shorter than a window computes them in shorter windows: not the canonical scores,
    so they are not stored for the next engine."""
    fresh = copy_model(plain, tmp_path)
    eng = Engine.open(str(fresh), ctx=router.STATIC_WINDOW // 2, mem=STREAMING, mode="prune", active=0.5,
                      policy="mixed")
    try:
        assert eng._static is not None and eng._static.shape == (3, 8)
    finally:
        eng.close()
    assert router.load_static(fresh) is None


def test_calibrate_without_write_or_static_leaves_no_static_scores(plain, tmp_path):
    for kw in ({"write": False}, {"static": False}):
        m = copy_model(plain, tmp_path, f"m{len(kw)}-{next(iter(kw))}")
        res = cal.calibrate(m, TINY_CFG, progress=False, held_out=0, **kw)
        assert router.load_static(m) is None
        assert res.static_tokens == (router.STATIC_TOKENS if "write" in kw else 0)


def test_no_prefill_at_open_when_static_scores_are_stored(plain, calibrated, tmp_path, monkeypatch):
    model, _ = calibrated
    count = ForwardCount(monkeypatch)
    Engine.open(str(model), ctx=256, mode="prune", active=0.5, policy="mixed").close()
    assert count.calls == 0
    # without them the first open runs the calibration text (16 windows of 256 tokens; everything
    # resident, the prefill chunk is 512: one forward call each) and the next one nothing
    fresh = copy_model(plain, tmp_path)
    Engine.open(str(fresh), ctx=256, mode="prune", active=0.5, policy="mixed").close()
    assert count.calls == router.STATIC_TOKENS // router.STATIC_WINDOW
    Engine.open(str(fresh), ctx=256, mode="prune", active=0.5, policy="mixed").close()
    assert count.calls == router.STATIC_TOKENS // router.STATIC_WINDOW


# ---- the default policy ------------------------------------------------------------------------

@pytest.mark.parametrize("prune_default", ["exact", "mixed"])
def test_prune_mode_default_policy_takes_effect(calibrated, monkeypatch, prune_default):
    """The default is one constant: whichever it names chooses the sets an engine told nothing
    uses (mixed's differ from exact's on this prompt, so the check tells them apart)."""
    model, _ = calibrated
    monkeypatch.setattr(router, "PRUNE_DEFAULT", prune_default)
    default = Engine.open(str(model), ctx=256, mem=STREAMING, mode="prune", active=0.5)
    told = {p: Engine.open(str(model), ctx=256, mem=STREAMING, mode="prune", active=0.5, policy=p)
            for p in ("exact", "mixed")}
    try:
        assert default.policy == prune_default and default.stats()["policy"] == prune_default
        assert f"policy {prune_default} (prune mode's default)" in default.details
        ids = default.tokenize(PROMPT)
        for eng in (default, *told.values()):
            eng.forward(ids)
        sets = lambda e: [s.tolist() for s in e.model.runner.active]  # noqa: E731
        assert sets(told["exact"]) != sets(told["mixed"])
        assert sets(default) == sets(told[prune_default])
    finally:
        for eng in (default, *told.values()):
            eng.close()


def test_the_measured_default_is_exact():
    """bench/RESULTS.md, "Static scores at calibration, mixed against exact, sketch-mixed": mixed was
    x1.09-1.16 of exact on Qwen2.5-Coder-1.5B at 0.75, so prune mode keeps exact."""
    from flashinfer_cli.engine import default_policy

    assert router.PRUNE_DEFAULT == "exact"
    assert [default_policy(prune, moe) for prune in (False, True) for moe in (False, True)] == \
        ["exact", "router", "exact", "router"]


def test_exact_mode_keeps_exact_and_computes_no_static_scores(plain, tmp_path, monkeypatch):
    fresh = copy_model(plain, tmp_path)
    count = ForwardCount(monkeypatch)
    eng = Engine.open(str(fresh), ctx=256, mem=STREAMING)  # streaming: exact mode selects what stays resident
    try:
        assert eng.selects and eng.policy == "exact" and eng._static is None
        assert count.calls == 0 and router.load_static(fresh) is None
    finally:
        eng.close()


def test_cli_default_policy_and_fallback_said_in_verbose(plain, tmp_path):
    fresh = copy_model(plain, tmp_path)
    prune = ["run", str(fresh), "hello", "--mode", "prune", "--active", "0.5", "--max-tokens", "2"]
    default = _fic(*prune, "--verbose")
    assert default.exit_code == 0, default.stderr
    assert f"policy {router.PRUNE_DEFAULT} (prune mode's default)" in default.stderr
    mixed = prune + ["--policy", "mixed"]
    quiet = _fic(*mixed)
    assert quiet.exit_code == 0, quiet.stderr
    assert "static scores" not in quiet.stderr and "default" not in quiet.stderr
    assert router.load_static(fresh) is not None  # the quiet run computed and stored them
    (fresh / router.STATIC_FILE).unlink()
    loud = _fic(*mixed, "--verbose")
    assert loud.exit_code == 0, loud.stderr
    assert "no static scores stored beside the model: computed once" in loud.stderr
    assert "policy mixed" in loud.stderr and "default" not in loud.stderr  # told, not defaulted
    again = _fic(*mixed, "--verbose")
    assert again.exit_code == 0 and "computed once" not in again.stderr
    exact = _fic("run", str(fresh), "hello", "--max-tokens", "2", "--verbose")
    assert exact.exit_code == 0 and "policy exact (exact mode's default)" in exact.stderr


def test_show_says_whether_static_scores_are_stored(plain, calibrated):
    model, _ = calibrated
    stored = _fic("show", str(model))
    assert stored.exit_code == 0 and "static scores   stored (3 layers x 8 experts" in stored.output
    none = _fic("show", str(plain))
    assert none.exit_code == 0 and "static scores   none" in none.output and f"fic calibrate {plain.name}" in none.output


def test_cli_calibrate_reports_the_static_scores(plain, tmp_path):
    model = copy_model(plain, tmp_path)
    res = _fic("calibrate", str(model), "--tokens", "200", "--rank", "32", "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert f"static scores (--policy static, mixed) from {router.STATIC_TOKENS:,} tokens" in res.output
    assert router.load_static(model) is not None


# ---- sketch-mixed ------------------------------------------------------------------------------

def _spy_mixed(eng: Engine) -> list[tuple[np.ndarray, np.ndarray]]:
    """Record every (prompt scores, scores chosen from) the engine's selection goes through."""
    seen, mixed = [], eng._mixed

    def spy(scores):
        seen.append((scores.copy(), mixed(scores)))
        return seen[-1][1]

    eng._mixed = spy
    return seen


def _unit(s: np.ndarray) -> np.ndarray:
    return s / s.sum(axis=1, keepdims=True)  # every expert finite in the tiny model


def test_sketch_mixed_averages_the_predictors_scores_with_static(calibrated):
    model, _ = calibrated
    static = router.load_static(model)
    sketch = Engine.open(str(model), ctx=256, mem=STREAMING, mode="prune", active=0.5, policy="sketch")
    both = Engine.open(str(model), ctx=256, mem=STREAMING, mode="prune", active=0.5, policy="sketch-mixed")
    try:
        assert both.prefill == sketch.prefill == "full" and both.predictor is not None
        seen_sketch, seen_both = _spy_mixed(sketch), _spy_mixed(both)
        ids = both.tokenize(PROMPT)
        sketch.forward(ids)
        both.forward(ids)
        (p_sketch, out_sketch), = seen_sketch
        (p_both, out_both), = seen_both
        assert np.array_equal(out_sketch, p_sketch)  # plain sketch: the predictor's scores as they are
        assert np.allclose(p_both, p_sketch)  # the same prompt scores ...
        assert np.allclose(out_both, 0.5 * (_unit(p_sketch) + _unit(static)))  # ... averaged with static's
        for layer, k in enumerate(both.active_per_layer):
            want = np.sort(np.argsort(-out_both[layer], kind="stable")[:k])
            assert both.model.runner.active[layer].tolist() == want.tolist()
    finally:
        sketch.close()
        both.close()


def test_sketch_mixed_pruned_prefill_mixes_each_layers_choice(calibrated):
    model, _ = calibrated
    static = router.load_static(model)
    eng = Engine.open(str(model), ctx=256, mem=STREAMING, mode="prune", active=0.5, policy="sketch-mixed",
                      prefill="pruned")
    try:
        seen = _spy_mixed(eng)
        eng.forward(eng.tokenize(PROMPT))
        assert len(seen) == 3  # one choice per layer, in layer order, from that layer's predicted rows
        for layer, (prompt, out) in enumerate(seen):
            assert prompt[layer].sum() > 0
            want = 0.5 * (prompt[layer] / prompt[layer].sum() + _unit(static)[layer])
            assert np.allclose(out[layer], want)
            k = eng.active_per_layer[layer]
            assert eng.model.runner.active[layer].tolist() == np.sort(np.argsort(-want, kind="stable")[:k]).tolist()
    finally:
        eng.close()


def test_sketch_mixed_needs_the_predictor_in_one_line(plain):
    res = _fic("run", str(plain), "hi", "--mode", "prune", "--active", "0.5", "--policy", "sketch-mixed")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "fic calibrate" in lines[0], res.stderr
