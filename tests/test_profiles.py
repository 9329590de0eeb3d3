"""Profiles (a catalog entry's [profiles.NAME], --profile) and --active auto (issue 7)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import catalog, plan as planlib, profiles
from flashinfer_cli.cli import cli
from flashinfer_cli.engine import Engine, make_engine_plan

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Explain why the sky is blue in two sentences."

ENTRY = '''name = "{name}"
description = "a test entry"
architecture = "llama"
license = "Apache-2.0"

[[sources]]
kind = "hf"
repo = "org/model"
'''

PROFILES = '''
[profiles.chat]
description = "the full model's answer"
mode = "exact"

[profiles.half]
description = "a test profile: prune at 0.5"
mode = "prune"
active = 0.5
reselect = 4
ctx = 512

[profiles.auto]
description = "a test profile: auto sizes"
mode = "prune"
active = "auto:0.95"
'''


def entry(profiles_text: str, name: str = "m") -> str:
    if not profiles_text.startswith("["):  # a top-level key: before the first table
        return ENTRY.format(name=name).replace("[[sources]]", profiles_text + "\n[[sources]]")
    return ENTRY.format(name=name) + profiles_text


# ---- parsing -------------------------------------------------------------------------------

def test_profiles_parse_from_a_catalog_entry():
    e = catalog.parse_entry(entry(PROFILES), "t.toml")
    assert list(e.profiles) == ["chat", "half", "auto"]
    assert e.profiles["chat"] == profiles.Profile("chat", "the full model's answer")
    half = e.profiles["half"]
    assert (half.mode, half.active, half.reselect, half.ctx) == ("prune", "0.5", 4, 512)
    assert e.profiles["auto"].active == "auto:0.95"
    assert "profiles" not in e.extra
    assert catalog.parse_entry(entry(""), "t.toml").profiles == {}


@pytest.mark.parametrize("table,says", [
    ('[profiles.x]\ndescription = "d"\nmode = "fast"\n', "mode 'fast'"),
    ('[profiles.x]\ndescription = "d"\nspeed = 1\n', "unknown key 'speed'"),
    ('[profiles.x]\nmode = "exact"\n', "description"),
    ('[profiles.x]\ndescription = ""\n', "description"),
    ('[profiles.x]\ndescription = """two\nlines"""\n', "description"),
    ('[profiles.x]\ndescription = "d"\nmode = "prune"\nactive = "lots"\n', "--active 'lots'"),
    ('[profiles.x]\ndescription = "d"\nmode = "prune"\nactive = 1.5\n', "fraction must be in (0, 1]"),
    ('[profiles.x]\ndescription = "d"\nmode = "prune"\nactive = true\n', "active must be"),
    ('[profiles.x]\ndescription = "d"\nactive = "auto"\n', "needs mode = \"prune\""),
    ('[profiles.x]\ndescription = "d"\nmode = "prune"\nactive = "auto:0"\n', "threshold in (0, 1]"),
    ('[profiles.x]\ndescription = "d"\nreselect = -1\n', "reselect must be an integer >= 0"),
    ('[profiles.x]\ndescription = "d"\nreselect = true\n', "reselect must be an integer >= 0"),
    ('[profiles.x]\ndescription = "d"\nctx = 0\n', "ctx must be an integer >= 1"),
    ('[profiles.x]\ndescription = "d"\nctx = 1.5\n', "ctx must be an integer >= 1"),
    ('[profiles.Bad]\ndescription = "d"\n', "a profile name is"),
    ('profiles = 3\n', "profiles must be a table"),
    ('profiles = {x = 3}\n', "not a table"),
])
def test_a_bad_profile_is_one_line(table, says):
    with pytest.raises(catalog.CatalogError) as err:
        catalog.parse_entry(entry(table), "t.toml")
    msg = str(err.value)
    assert says in msg and "\n" not in msg and msg.startswith("t.toml")


def test_the_shipped_profiles_promise_only_what_was_measured():
    """chat and code are the full model; a prune profile runs at 0.9 (measured x1.23-1.28), never
    the 0.75 whose measured cost was x1.9-3.0, and its description states the cost or says it was
    not measured."""
    for toml in sorted((REPO / "models").glob("*.toml")):
        e = catalog.parse_entry(toml.read_text(), toml.name)
        assert {"chat", "code", "summarize", "long"} <= set(e.profiles), toml.name
        for p in e.profiles.values():
            if p.name in ("chat", "code", "long"):
                assert p.mode == "exact"
            if p.mode == "prune":
                assert float(p.active) >= 0.9
                assert "measured" in p.description, (toml.name, p.name)
    assert all(p.mode == "exact" or "not measured" in p.description for p in profiles.DEFAULTS.values())


def test_a_model_without_a_catalog_entry_gets_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("FIC_CATALOG", str(tmp_path))
    assert profiles.for_model("no-such-model-xyz") == profiles.DEFAULTS
    with pytest.raises(catalog.CatalogError, match=r"has no profile 'nope' \(its profiles: chat, code, summarize, long\)"):
        profiles.get("no-such-model-xyz", "nope")


# ---- --active auto: parsing and sizing -----------------------------------------------------

def test_active_auto_parses():
    assert planlib.parse_active("auto") == planlib.AutoActive(0.9)
    assert planlib.parse_active("auto:0.95") == planlib.AutoActive(0.95)
    assert planlib.parse_active(" AUTO:1 ") == planlib.AutoActive(1.0)
    assert str(planlib.AutoActive(0.95)) == "auto:0.95"


@pytest.mark.parametrize("bad", ["auto:", "auto:0", "auto:1.5", "auto:x", "auto:nan", "auto:-0.5", "autox"])
def test_bad_active_auto_is_one_line(bad):
    with pytest.raises(ValueError) as err:
        planlib.parse_active(bad)
    assert "\n" not in str(err.value) and "--active" in str(err.value)


def test_auto_size_counts_the_score_mass():
    scores = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125])  # total 16
    auto = planlib.AutoActive
    assert planlib.auto_size(scores, auto(0.5, floor=0.0), 8) == 1      # 8/16
    assert planlib.auto_size(scores, auto(0.75, floor=0.0), 8) == 2     # 12/16
    assert planlib.auto_size(scores, auto(0.8, floor=0.0), 8) == 3      # 14/16
    assert planlib.auto_size(scores, auto(0.5), 8) == 2                 # the floor: 25% of 8
    assert planlib.auto_size(scores, auto(0.99), 5) == 5                # never more than the plan's largest
    assert planlib.auto_size(scores, auto(1.0), 8) == 8                 # 1: every expert
    assert planlib.auto_size(np.zeros(8), auto(0.5), 8) == 8            # no scores: nothing to choose by
    padded = np.concatenate([scores, [-np.inf, -np.inf]])               # a layer with fewer experts
    assert planlib.auto_size(padded, auto(1.0), 10) == 8


# ---- the engine under --active auto --------------------------------------------------------

@pytest.fixture(scope="module")
def full_logits(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=256)
    ids = eng.prompt_ids(PROMPT)
    out = eng.forward(ids + ids[:8], prompt_len=len(ids))
    eng.close()
    return ids, out


def test_auto_at_threshold_one_is_the_full_model(smollm2_model, full_logits):
    ids, ref = full_logits
    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active="auto:1")
    got = eng.forward(ids + ids[:8], prompt_len=len(ids))
    st = eng.stats()
    eng.close()
    assert st["prune"] and st["active_auto"] == 1.0 and st["active_per_layer"] == [24] * 30
    assert float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))) < 1e-6


def _sizes(path, active, **kw) -> tuple[list[int], int]:
    eng = Engine.open(str(path), ctx=256, mode="prune", active=active, **kw)
    list(eng.generate(PROMPT, max_tokens=2))
    st, k_max = eng.stats(), eng.plan.max_active_per_layer
    assert [len(a) for a in eng.model.runner.active] == st["active_per_layer"]  # the sets that ran
    eng.close()
    return st["active_per_layer"], k_max


def test_a_lower_threshold_chooses_fewer_experts_within_floor_and_plan(smollm2_model):
    low, k_max = _sizes(smollm2_model, "auto:0.3")
    high, _ = _sizes(smollm2_model, "auto:0.97")
    assert sum(low) < sum(high)
    assert all(math.ceil(0.25 * 24) <= k <= k_max for k in low + high)
    # under a budget whose arena holds about half of the experts: never more than the plan's largest
    plan, _ = make_engine_plan(smollm2_model, mem="64G", ctx=256)
    mem = plan.fixed_bytes + int(0.5 * plan.shape.n_experts * plan.slot_bytes) + 2 * planlib.HUGE_PAGE
    capped, k_cap = _sizes(smollm2_model, "auto:0.99", mem=mem)
    assert k_cap < 24 and max(capped) == k_cap
    floor, _ = _sizes(smollm2_model, "auto:0.01", mem=mem)
    assert floor == [6] * 30


def test_auto_with_the_static_policy_sizes_the_one_set(smollm2_model):
    sizes, k_max = _sizes(smollm2_model, "auto:0.5", policy="static")
    assert all(6 <= k <= k_max for k in sizes) and sum(sizes) < 30 * 24


def test_use_active_switches_to_and_from_auto(smollm2_model):
    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active=0.75)
    eng.use_active("auto:0.3")
    list(eng.generate(PROMPT, max_tokens=1))
    auto = eng.stats()
    eng.use_active(None)  # the engine's own: 0.75 of 24 per layer
    list(eng.generate(PROMPT, max_tokens=1))
    own = eng.stats()
    eng.close()
    assert auto["active_auto"] == 0.3 and sum(auto["active_per_layer"]) < 30 * 18
    assert own["active_auto"] is None and own["active_per_layer"] == [18] * 30


def test_auto_in_exact_mode_is_refused(smollm2_model):
    with pytest.raises(planlib.BudgetError, match="needs prune mode"):
        Engine.open(str(smollm2_model), ctx=256, active="auto")


# ---- the command line ----------------------------------------------------------------------

@pytest.fixture
def with_entry(smollm2_model, tmp_path, monkeypatch):
    """A private catalog entry named as the test model's store name, with PROFILES."""
    (tmp_path / f"{smollm2_model.name}.toml").write_text(entry(PROFILES, smollm2_model.name))
    monkeypatch.setenv("FIC_CATALOG", str(tmp_path))
    return smollm2_model


def run(args: list[str]):
    res = CliRunner().invoke(cli, args)
    return res.exit_code, res.stdout, res.stderr


def test_profile_takes_effect(with_entry):
    code, _, err = run(["run", str(with_entry), "--profile", "half", "--verbose", "--max-tokens", "2", PROMPT])
    assert code == 0, err
    assert "profile: half (prune mode, active 0.5, reselect 4, ctx 512): a test profile: prune at 0.5" in err
    assert "mode:                 prune, policy exact, active 0.50, reselect every 4 tokens" in err
    assert "context 512, mode prune" in err  # the plan's line


def test_flags_override_the_profile(with_entry):
    code, _, err = run(["run", str(with_entry), "--profile", "half", "--active", "0.75", "--reselect", "0",
                        "--ctx", "256", "--verbose", "--max-tokens", "2", PROMPT])
    assert code == 0, err
    assert "mode:                 prune, policy exact, active 0.75\n" in err
    assert "context 256, mode prune" in err
    code, _, err = run(["run", str(with_entry), "--profile", "half", "--mode", "exact", "--verbose",
                        "--max-tokens", "2", PROMPT])
    assert code == 0, err
    assert "mode:                 exact, policy exact" in err


def test_profile_auto_shows_the_chosen_sizes(with_entry):
    code, _, err = run(["run", str(with_entry), "--profile", "auto", "--verbose", "--max-tokens", "2", PROMPT])
    assert code == 0, err
    line = next(l for l in err.splitlines() if l.startswith("mode:"))
    assert "(auto 0.95: " in line and "experts per layer)" in line


def test_an_unknown_profile_is_one_line(with_entry):
    code, out, err = run(["run", str(with_entry), "--profile", "nope", "--max-tokens", "2", PROMPT])
    assert code == 1 and not out
    assert err == f"fic: model '{with_entry.name}' has no profile 'nope' (its profiles: chat, half, auto)\n"


def test_show_lists_the_profiles(with_entry, monkeypatch, tmp_path):
    code, out, _ = run(["show", str(with_entry)])
    assert code == 0
    assert "profiles        --profile NAME (catalog;" in out
    assert "  half  prune mode, active 0.5, reselect 4, ctx 512: a test profile: prune at 0.5" in out
    monkeypatch.setenv("FIC_CATALOG", str(tmp_path / "empty"))  # no entry: the built-in defaults
    code, out, _ = run(["show", str(with_entry)])
    assert code == 0 and "(built-in defaults;" in out
    assert all(f"  {n}" in out for n in profiles.DEFAULTS)


@pytest.mark.parametrize("args,says", [
    (["--mode", "prune", "--active", "auto:2"], "fic: --active 'auto:2': auto takes a score-mass threshold in (0, 1]"),
    (["--active", "auto"], "fic: --active auto:0.9: auto sizes what runs, so it needs prune mode"),
])
def test_bad_active_auto_on_the_command_line(smollm2_model, args, says):
    code, out, err = run(["run", str(smollm2_model), *args, "--max-tokens", "2", PROMPT])
    assert code == 1 and not out
    assert err.startswith(says) and err.count("\n") == 1


def test_bench_refuses_a_profile_with_quality(with_entry):
    code, _, err = run(["bench", str(with_entry), "--quality", "--profile", "half"])
    assert code == 1 and err.startswith("fic: --profile picks one configuration")


def test_bench_quality_takes_auto(smollm2_model):
    from flashinfer_cli import bench

    rep = bench.quality(smollm2_model, actives=["auto:1", "auto:0.5"], policies=["exact"], max_tokens=32, n_texts=1)
    every, half = rep.points
    assert (every.auto, every.active, every.ppl_ratio, every.agreement) == (1.0, 1.0, 1.0, 1.0)
    assert half.auto == 0.5 and 0.25 <= half.active < 1 and list(half.per_text_active.values()) == [half.active]
    assert "auto:0.5 (per text" in rep.table()[2]


def test_serve_takes_fic_active_auto(smollm2_model):
    serve = pytest.importorskip("flashinfer_cli.serve")
    from flashinfer_cli import serve_api

    eng = Engine.open(str(smollm2_model), ctx=256, mode="prune", active=0.75)
    try:
        server = serve.Server(eng, serve.ServeConfig())
        server.check_active("auto:0.95")           # accepted before queueing
        with pytest.raises(serve_api.ApiError) as err:
            server.check_active("auto:2")
        assert err.value.status == 400 and "fic.active 'auto:2'" in str(err.value)
    finally:
        eng.close()


def test_auto_on_a_mixture_of_experts_sizes_from_the_router(tmp_path):
    """The router policy's scores (the prompt's router probabilities): auto:1 is every expert (the
    full model), a low threshold fewer, never below the floor (2 of 8)."""
    pytest.importorskip("torch")
    from test_moe import IDS, make_moe_checkpoint
    from flashinfer_cli.convert import ConvertOptions, convert

    make_moe_checkpoint("mixtral", tmp_path / "hf")
    dest = convert(tmp_path / "hf", tmp_path / "fic", name="mix", options=ConvertOptions(quant="f32"), progress=False)
    full = Engine.open(str(dest), ctx=128, kv_dtype="f32", auto_pull=False)
    ref = full.forward(IDS, prompt_len=12)
    sizes = {}
    for t in ("1", "0.99", "0.3"):
        eng = Engine.open(str(dest), ctx=128, kv_dtype="f32", mode="prune", active=f"auto:{t}", auto_pull=False)
        got = eng.forward(IDS, prompt_len=12)
        sizes[t] = eng.stats()["active_per_layer"]
        if t == "1":
            assert float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))) < 1e-5
        eng.close()
    assert sizes["1"] == [8, 8]
    assert sum(sizes["0.3"]) < sum(sizes["0.99"]) and all(2 <= k <= 8 for k in sizes["0.3"])
