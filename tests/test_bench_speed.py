"""`fic bench` speed (bench_speed.py, the bench command): the JSON's keys and the relations between
its numbers, checked against what is known apart from the bench: the model's files (what an
all-resident engine holds), the reader's own bytes (a spy on the model reader), the manifest's bundle
sizes (what exact mode with no resident expert must stream per forward pass), numpy's medians.
No wall-clock speed is asserted."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import bench_speed, fmt
from flashinfer_cli.cli import cli
from flashinfer_cli.engine import Engine, make_engine_plan

TOP_KEYS = ("ttft_s", "prefill_tps", "decode_tps", "bytes_read", "read_gbps", "hit_rate", "peak_rss_bytes")
CTX = 512
STREAM_MEM = "125M"  # SmolLM2 at ctx 512: the fixed parts and the ring only, no resident expert
MAX_TOKENS = 6


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("What is the capital of Germany?\n\nName three colours.\n", encoding="utf-8")
    return f


def bench_json(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, ["bench", *args, "--json", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)


def fail_line(args: list[str]) -> str:
    """The one-line error of a bench that must be refused."""
    r = CliRunner().invoke(cli, ["bench", *args, "--no-progress"])
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # no traceback
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fic: "), r.stderr
    return lines[0]


def check_tokens(prompts: list[dict], max_tokens: int) -> None:
    for p in prompts:
        assert p["tokens"] == max_tokens if p["finish"] == "length" else \
            (p["finish"] == "stop" and 1 <= p["tokens"] <= max_tokens), p


# ---- everything resident -------------------------------------------------------------------

def test_resident_json_keys_medians_and_nothing_read(smollm2_model, prompts_file):
    runs = 2
    d = bench_json([str(smollm2_model), "--prompts", str(prompts_file), "--max-tokens", str(MAX_TOKENS),
                    "--runs", str(runs), "--ctx", str(CTX), "--mem", "2G"])
    for k in TOP_KEYS + ("prompts", "machine", "model", "mem", "mode", "active", "policy", "cold", "warm"):
        assert k in d, k
    for k in ("cpu", "cores", "threads"):
        assert d["machine"][k], k
    assert (d["mem"], d["mode"], d["policy"]) == ("2G", "exact", "exact") and d["all_resident"]
    ps = d["prompts"]
    assert len(ps) == 2 * runs
    assert [p["run"] for p in ps] == [1, 1, 2, 2] and [p["cold"] for p in ps] == [True, True, False, False]
    check_tokens(ps, MAX_TOKENS)
    for k in TOP_KEYS:
        assert d[k] == pytest.approx(float(np.median([p[k] for p in ps])), rel=1e-12), k
        assert d["cold"][k] == pytest.approx(float(np.median([p[k] for p in ps if p["cold"]])), rel=1e-12), k
        assert d["warm"][k] == pytest.approx(float(np.median([p[k] for p in ps if not p["cold"]])), rel=1e-12), k
    # every expert was read at open: a request reads nothing and finds every expert it asks for
    for p in ps:
        assert p["bytes_read"] == 0 and p["read_gbps"] == 0
        assert p["hits"] > 0 and p["misses"] == 0 and p["hit_rate"] == 1.0
        assert p["ttft_s"] > 0 and p["prefill_tps"] > 0 and p["decode_tps"] > 0
    back = bench_speed.SpeedReport.from_dict(d)  # a saved --json prints its table again
    assert back.as_dict() == d and len(back.table()) == 1 + len(ps) + 3
    # the whole model is in memory: the peak holds at least its weight files
    weights = sum((smollm2_model / f).stat().st_size for f in ("dense.safetensors", "experts.bin"))
    assert all(p["peak_rss_bytes"] >= weights for p in ps)


# ---- a budget that streams -----------------------------------------------------------------

def test_streaming_cli_reads_and_misses(smollm2_model, prompts_file):
    d = bench_json([str(smollm2_model), "--prompts", str(prompts_file), "--max-tokens", str(MAX_TOKENS),
                    "--ctx", str(CTX), "--mem", STREAM_MEM])
    assert not d["all_resident"]
    check_tokens(d["prompts"], MAX_TOKENS)
    for p in d["prompts"]:
        assert p["bytes_read"] > 0 and p["read_gbps"] > 0
        assert 0 <= p["hit_rate"] < 1 and p["misses"] > 0
    assert d["bytes_read"] > 0 and 0 <= d["hit_rate"] < 1


def test_streaming_bytes_agree_with_the_reader_and_the_manifest(smollm2_model):
    plan, _ = make_engine_plan(smollm2_model, mem=STREAM_MEM, ctx=CTX)
    assert not plan.all_resident and sum(plan.active_per_layer) == 0, "the budget must leave no expert resident"
    eng = Engine.open(str(smollm2_model), mem=STREAM_MEM, ctx=CTX)
    seen = []  # bytes the reader was asked to read, at the reader
    real = eng.model.reader.submit_bundles

    def spy(keys, dsts):
        seen.append(sum(d.nbytes for d in dsts))
        return real(keys, dsts)

    eng.model.reader.submit_bundles = spy
    prompts = [bench_speed.Prompt("a", text="What is the capital of Germany?"),
               bench_speed.Prompt("b", messages=({"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                                 {"role": "user", "content": "Name a colour."}))]
    try:
        rep = bench_speed.measure(eng, prompts, runs=2, max_tokens=MAX_TOKENS, progress=False)
    finally:
        eng.close()
    assert sum(r.bytes_read for r in rep.prompts) == sum(seen)
    # with no expert resident, each forward pass (the prefill's, one per decode step) reads every bundle
    man = fmt.parse_manifest(smollm2_model / fmt.MANIFEST_FILE)
    every = sum(e.padded_length for layer in man.experts for e in layer)
    for r in rep.prompts:
        assert r.prompt_tokens <= plan.prefill_chunk  # one prefill pass
        assert r.bytes_read >= r.tokens * every
        assert r.hits == 0 and r.hit_rate == 0.0


# ---- prompts -------------------------------------------------------------------------------

def test_default_prompts_cover_the_four_kinds(smollm2_model):
    ps = bench_speed.default_prompts()
    assert [p.id for p in ps] == ["chat", "summarise", "code", "multi-turn"]
    eng = Engine.open(str(smollm2_model), ctx=4096)
    try:
        n = {p.id: len(p.ids(eng)) for p in ps}
    finally:
        eng.close()
    assert 1200 <= n["summarise"] <= 2000, n
    assert n["chat"] < 100 and n["code"] < 200
    turns = ps[3].messages
    assert sum(m["role"] == "user" for m in turns) >= 2 and any(m["role"] == "assistant" for m in turns)


def test_load_prompts_lines_and_json(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n  second  \n", encoding="utf-8")
    assert [(p.id, p.text) for p in bench_speed.load_prompts(f)] == [("line1", "first"), ("line3", "second")]
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    f.write_text(json.dumps(["one", conv, {"id": "x", "prompt": "two"}, {"id": "y", "messages": conv}]),
                 encoding="utf-8")
    ps = bench_speed.load_prompts(f)
    assert [p.id for p in ps] == ["p1", "p2", "x", "y"]
    assert ps[0].text == "one" and ps[2].text == "two"
    assert [dict(m) for m in ps[1].messages] == conv and ps[3].messages == ps[1].messages


@pytest.mark.parametrize("content,words", [
    (b"", "no prompts"),
    (b"\n  \n", "no prompts"),
    (b"[1, 2", "not valid JSON"),
    (b"[]", "no prompts"),
    (b"[3]", "item 1: a prompt is a string or a list of messages"),
    (b'["ok", ""]', "item 2: an empty prompt"),
    (b'[[{"role": "assistant", "content": "x"}]]', "no user message"),
    (b'[[{"role": "user"}]]', "a conversation is a list of"),
    (b"\xff\xfe bad", "not UTF-8"),
])
def test_bad_prompts_file_is_one_line(tmp_path, content, words):
    f = tmp_path / "p.json"
    f.write_bytes(content)
    with pytest.raises(bench_speed.BenchError, match=words):
        bench_speed.load_prompts(f)
    assert words in fail_line([str(tmp_path), "--prompts", str(f)])  # before the model is opened


def test_a_prompt_longer_than_the_context_is_one_line(smollm2_model):
    line = fail_line([str(smollm2_model), "--ctx", "256"])  # the shipped document is ~1,700 tokens
    assert "'summarise'" in line and "more than the context of 256" in line


def test_missing_prompts_file(tmp_path):
    line = fail_line(["smollm2-135m", "--prompts", str(tmp_path / "nope.txt")])
    assert "nope.txt" in line and "No such file" in line


@pytest.mark.parametrize("args,words", [
    (["--active", "0.5,1"], "needs --sweep"),
    (["--mem", "1G,2G"], "needs --sweep"),
    (["--plot", "x.png"], "--plot draws a --sweep"),
    (["--policy", "exact,static"], "one policy per speed run"),
    (["--policy", "bogus"], "--policy 'bogus'"),
    (["--mem", "abc"], "cannot read 'abc' as a size"),
    (["--sweep", "--active", "0.5,zz"], "--active 'zz'"),
    (["--quality", "--mem", "1G"], "--quality runs prune mode"),
])
def test_bad_options_are_one_line(smollm2_model, args, words):
    assert words in fail_line([str(smollm2_model), *args])


# ---- sweep and plot ------------------------------------------------------------------------

def test_plot_without_matplotlib_fails_before_measuring(smollm2_model, prompts_file, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    measured = []
    monkeypatch.setattr(bench_speed, "measure", lambda *a, **k: measured.append(1))
    out = tmp_path / "sweep.png"
    line = fail_line([str(smollm2_model), "--prompts", str(prompts_file), "--sweep", "--mode", "prune",
                      "--active", "0.5,1", "--plot", str(out)])
    assert "matplotlib" in line and "[plot]" in line
    assert not measured and not out.exists()


def test_sweep_one_row_per_point_with_quality(smollm2_model, prompts_file):
    d = bench_json([str(smollm2_model), "--prompts", str(prompts_file), "--max-tokens", "3", "--ctx", str(CTX),
                    "--sweep", "--mode", "prune", "--active", "0.5,1", "--texts", "1"])
    pts = d["points"]
    assert [p["active"] for p in pts] == ["0.5", "1"]
    assert [p["active_fraction"] for p in pts] == pytest.approx([0.5, 1.0], abs=0.05)
    assert pts[0]["active_params"] < pts[1]["active_params"]
    for p in pts:
        assert p["speed"]["mode"] == "prune" and len(p["speed"]["prompts"]) == 2
        assert p["ppl"] > 0 and 0 <= p["agreement"] <= 1
    # prune mode with every expert active is the full model
    assert pts[1]["ppl_ratio"] == pytest.approx(1.0, abs=1e-3) and pts[1]["agreement"] > 0.99
    assert pts[1]["ppl"] == pytest.approx(d["full_ppl"], rel=1e-3)


def test_sweep_text_table_has_a_row_per_point(smollm2_model, prompts_file):
    r = CliRunner().invoke(cli, ["bench", str(smollm2_model), "--prompts", str(prompts_file), "--max-tokens", "2",
                                 "--ctx", str(CTX), "--sweep", "--mem", f"{STREAM_MEM},2G", "--texts", "1",
                                 "--no-progress"])
    assert r.exit_code == 0, (r.output, r.stderr)
    rows = [ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in (STREAM_MEM, "2G")]
    assert len(rows) == 2


def test_quality_keeps_its_lists(smollm2_model):
    d = bench_json([str(smollm2_model), "--quality", "--active", "0.5,1", "--policy", "exact", "--texts", "1",
                    "--max-tokens", "32"])
    assert [(p["policy"], p["active"]) for p in d["points"]] == [("exact", 0.5), ("exact", 1.0)]


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    pts = [bench_speed.SweepPoint(mem=mem, active=a, mode="prune", policy="exact", active_fraction=f,
                                  active_params=int(f * 1e8), ttft_s=0.1, prefill_tps=100.0, decode_tps=10 / f,
                                  bytes_read=0.0, read_gbps=0.0, hit_rate=1.0, peak_rss_bytes=1e8,
                                  ppl=20 / f, ppl_ratio=1 / f, agreement=f)
           for mem in ("150M", "1G") for a, f in (("0.5", 0.5), ("1", 1.0))]
    out = tmp_path / "sweep.png"
    bench_speed.plot(bench_speed.SweepReport("m", {}, 1, 256, 20.0, pts), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
