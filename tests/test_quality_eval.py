"""`fic bench --quality`'s evaluation: held-out texts of three domains that calibration never reads,
the spread reported beside each mean, --reselect on the scored continuation, and the mixed policy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import bench, calibrate, kernels, router, texts
from flashinfer_cli.cli import cli
from flashinfer_cli.engine import Engine


# ---- the texts ------------------------------------------------------------------------------

def test_held_out_texts_hold_each_domain():
    every = texts.held_out_texts(texts.DOMAINS)
    by_domain = {d: [t for t in every if t.domain == d] for d in texts.DOMAINS}
    assert [len(by_domain[d]) for d in texts.DOMAINS] == [8, 8, 8]
    assert len({t.name for t in every}) == len(every) == 24
    assert [t.name for t in by_domain["prose"]] == [q.name for q in texts.quality_texts()]
    for t in by_domain["code"] + by_domain["docs"]:
        assert t.name.startswith(t.domain + "_")
        assert 3000 <= len(t.text) <= texts.HELD_OUT_CHARS, (t.name, len(t.text))
    assert all(t.text.lstrip().startswith(("class ", "def ")) for t in by_domain["code"])
    two = texts.held_out_texts(("docs", "code"), 2)
    assert [t.domain for t in two] == ["docs", "docs", "code", "code"]
    with pytest.raises(ValueError, match="unknown text domain"):
        texts.held_out_texts(("poetry",))


def test_held_out_modules_are_files_no_calibration_reads():
    import os
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    read = {os.path.realpath(p) for p in calibrate._stdlib_files()}  # every seed's calibration files
    read |= {os.path.realpath(p) for p in texts._calibration_files(stdlib)}  # the static policy's text
    for rel in sum(texts.HELD_OUT_MODULES.values(), ()):
        path = os.path.realpath(os.path.join(stdlib, rel))
        assert os.path.isfile(path) and path not in read, rel
        assert os.path.basename(rel) != "__init__.py" and "/" in rel  # never a top-level module
    assert not set(texts.HELD_OUT_MODULES["code"]) & set(texts.HELD_OUT_MODULES["docs"])


def _calibration_corpus() -> str:
    """Everything either calibration can read, for any seed: every top-level stdlib module (source,
    and its docstrings and comments as calibration extracts them), the help topics, the prose files,
    and the static policy's text."""
    parts = []
    for path in calibrate._stdlib_files():
        source = calibrate._read_source(path)
        if source:
            parts += [source, "\n\n".join(texts._prose(source))]
    parts += [t for _, t in calibrate._pydoc_topics()] + [t for _, t in calibrate._stdlib_prose_files()]
    parts.append(texts.calibration_text(10 ** 9))
    return "\x00".join(parts)


def test_held_out_texts_do_not_overlap_what_calibration_reads():
    corpus = _calibration_corpus()
    for t in texts.held_out_texts(texts.DOMAINS):
        windows = [t.text[i:i + 64] for i in range(0, len(t.text) - 64, 128)]
        found = [w for w in windows if w in corpus]
        # an idiom may recur between modules (measured: at most 1 of a text's 62 windows); a shared
        # passage (a license notice: why two modules were replaced) would show as many
        assert len(found) <= max(1, len(windows) // 20), (t.name, found)


# ---- the spread -----------------------------------------------------------------------------

def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile by bisection on its CDF, integrated numerically from the density."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 200001)
        dens = c * (1 + grid ** 2 / dof) ** (-(dof + 1) / 2)
        return 0.5 + float(np.trapezoid(dens, grid))

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 15, 23, 30])
def test_t975_is_students_quantile(dof):
    assert bench.t975(dof) == pytest.approx(_t_quantile(0.975, dof), abs=2e-3)


def test_spread_is_a_t_range_of_the_geometric_mean():
    ratios = [1.2, 1.5, 1.1, 2.0, 1.3, 1.25, 1.6, 1.4]
    sp = bench.spread(ratios)
    logs = np.log(ratios)
    half = _t_quantile(0.975, 7) * logs.std(ddof=1) / math.sqrt(8)
    assert sp.ci95 == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)), rel=1e-3)
    assert (sp.low, sp.high) == (pytest.approx(1.1), pytest.approx(2.0))
    assert sp.ci95[0] < math.exp(logs.mean()) < sp.ci95[1]
    assert bench.spread([1.3]).ci95 is None


# ---- the mixed policy -----------------------------------------------------------------------

def test_mix_averages_each_layers_unit_scores():
    prompt = np.array([[3.0, 1.5, 0.0, -np.inf], [1.0, 1.0, 2.0, 4.0]])
    static = np.array([[0.0, 1.0, 1.0, -np.inf], [8.0, 0.0, 0.0, 0.0]])
    want = np.array([[0.5 * (2 / 3 + 0.0), 0.5 * (1 / 3 + 0.5), 0.5 * (0.0 + 0.5), -np.inf],
                     [0.5 * (0.125 + 1.0), 0.5 * 0.125, 0.5 * 0.25, 0.5 * 0.5]])
    got = router.mix(prompt, static)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    assert np.allclose(got[np.isfinite(want)], want[np.isfinite(want)])
    assert router.top_k(got[0], 1).tolist() == [1]  # neither the prompt's best (0) nor static's tie


def test_mixed_policy_selects_the_top_of_the_mixed_scores(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=128, mode="prune", active=0.5, policy="mixed")
    seen = {}
    mixed = eng._mixed

    def spy(scores):
        seen["prompt"], seen["out"] = scores.copy(), mixed(scores)
        return seen["out"]

    eng._mixed = spy
    try:
        eng.forward(eng.tokenize(texts.quality_texts()[0].text)[:64], prompt_len=32)
        static = router.load_static(smollm2_model)
        assert static is not None  # the policy loaded (or computed and stored) static's scores at open
        unit = lambda s: s / s.sum(axis=1, keepdims=True)  # noqa: E731 (smollm2: every expert finite)
        assert np.allclose(seen["out"], 0.5 * (unit(seen["prompt"]) + unit(static)))
        for layer, k in enumerate(eng.active_per_layer):
            want = np.sort(np.argsort(-seen["out"][layer], kind="stable")[:k])
            assert eng.model.runner.active[layer].tolist() == want.tolist()
    finally:
        eng.close()


# ---- --reselect on the scored continuation --------------------------------------------------

def test_reselect_rescores_the_continuation_from_its_own_ffn_inputs(smollm2_model):
    """forward(reselect=True) reselects every N continuation tokens from a window that holds the
    same FFN inputs as token-by-token decoding of those tokens would (the generation path)."""
    ids = Engine.open(str(smollm2_model), ctx=128).tokenize(texts.quality_texts()[1].text)[:48]
    prompt, n = 24, 6
    windows = {}
    for how in ("chunks", "decode"):
        eng = Engine.open(str(smollm2_model), ctx=128, mode="prune", active=0.5, reselect=n)
        got, orig = [], eng._reselect

        def capture(orig=orig, got=got, eng=eng):
            got.append(eng.model.window.copy())
            orig()

        eng._reselect = capture
        try:
            # float arithmetic on both paths: the window is compared, not int8's rounding
            with kernels.decode_mode("exact"), kernels.prefill_mode("exact"):
                if how == "chunks":
                    eng.forward(ids, prompt_len=prompt, reselect=True)
                else:
                    eng.forward(ids[:prompt])
                    for tok in ids[prompt:]:
                        eng._step([tok])
            assert eng.stats()["request"]["reselections"] >= len(got)
        finally:
            eng.close()
        windows[how] = got
    # 24 continuation tokens, every 6: after tokens 6, 12 and 18 (decode also after 24)
    assert len(windows["chunks"]) == 3 and len(windows["decode"]) == 4
    for w_chunks, w_decode in zip(windows["chunks"], windows["decode"]):
        assert np.abs(w_chunks).sum() > 0
        assert np.allclose(w_chunks, w_decode, rtol=2e-2, atol=2e-2 * np.abs(w_decode).max())


def test_bench_quality_domains_spread_and_reselect(smollm2_model):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_model), "--quality", "--domains", "code,docs", "--texts", "1",
                                 "--max-tokens", "32", "--policy", "exact,mixed", "--active", "0.5",
                                 "--reselect", "4", "--json", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.stderr)
    d = json.loads(r.stdout)
    assert d["n_texts"] == 2 and sorted(d["domains"].values()) == ["code", "docs"]
    for p in d["points"]:
        ratios = [v[0] for v in p["per_text"].values()]
        assert p["reselect"] == 4 and sorted(p["per_domain"]) == ["code", "docs"]
        assert p["spread"]["low"] == pytest.approx(min(ratios)) and p["spread"]["high"] == pytest.approx(max(ratios))
        assert p["spread"]["ci95"][0] <= p["ppl_ratio"] <= p["spread"]["ci95"][1]
    assert [p["policy"] for p in d["points"]] == ["exact", "mixed"]
    exact, mixed = d["points"]
    paired = [mixed["per_text"][k][0] / exact["per_text"][k][0] for k in exact["per_text"]]
    assert exact["vs_exact"] is None
    assert mixed["vs_exact"] == pytest.approx(math.exp(np.mean(np.log(paired))))
    assert mixed["vs_exact_spread"]["low"] == pytest.approx(min(paired))


def test_bench_quality_table_shows_the_spread(smollm2_model):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_model), "--quality", "--texts", "2", "--max-tokens", "24",
                                 "--policy", "static", "--active", "0.75", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.stderr)
    header, row = [ln for ln in r.stdout.splitlines() if ln.startswith(("policy", "static"))]
    assert "95% range" in header and "texts min-max" in header
    lo, hi = (float(x) for x in row.split()[3].split("-"))
    assert lo <= float(row.split()[2]) <= hi


@pytest.mark.parametrize("args, says", [
    (["--quality", "--domains", "poetry"], "--domains 'poetry'"),
    (["--domains", "code"], "--domains chooses --quality's texts"),
])
def test_bench_refuses_bad_domains_in_one_line(smollm2_model, args, says):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_model), *args, "--no-progress"])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fic: ") and says in lines[0], r.stderr
