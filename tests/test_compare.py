"""`fic bench --vs llama.cpp[=PATH]` (peer.py): argument parsing, medians and ratios from given
numbers (checked against numpy's medians), the report's JSON shape, one-line errors for a missing
peer, a binary peer's timings read from its perf lines (a stand-in script prints them), and one real
run against llama-cpp-python on a tiny GGUF (the gguf package writes it). No speed is asserted."""
from __future__ import annotations

import json
import stat
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_cli import peer
from flashinfer_cli.cli import cli
from test_bench_speed import fail_line  # the one-line-error check bench already has

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama GGUF and its fic conversion: (gguf path, model dir)."""
    from test_convert import tiny_model, write_gguf

    from flashinfer_cli.convert import convert

    root = tmp_path_factory.mktemp("cmp")
    gguf_path = root / "tiny.gguf"
    write_gguf(gguf_path, tiny_model("llama", seed=3))
    return gguf_path, convert(gguf_path, root / "model", name="tiny", progress=False)


# ---- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, path", [("llama.cpp", None), ("llama.cpp=/opt/ll", "/opt/ll"), ("llamacpp=b", "b")])
def test_parse_vs(value, path):
    spec = peer.parse_vs(value)
    assert spec.name == "llama.cpp" and spec.path == path


@pytest.mark.parametrize("value, words", [("ollama", "the peer is llama.cpp"), ("llama.cpp=", "build directory")])
def test_parse_vs_refuses(value, words):
    with pytest.raises(peer.CompareError, match=words):
        peer.parse_vs(value)


def test_parse_perf_reads_llama_cpps_lines():
    text = ("llama_perf_context_print:        load time =     120.50 ms\n"
            "llama_perf_context_print: prompt eval time =     400.00 ms /   100 tokens (    4.00 ms per token,   "
            "250.00 "
            "tokens per second)\n"
            "llama_perf_context_print:        eval time =     700.00 ms /    63 runs   (   11.11 ms per token,    "
            "90.00 "
            "tokens per second)\n")
    p = peer.parse_perf(text)
    assert p["prompt_eval_time_ms"] == 400.0 and p["prompt_eval_time_tokens"] == 100
    assert p["eval_time_ms"] == 700.0 and p["eval_time_tokens"] == 63 and p["load_time_ms"] == 120.5


# ---- medians, ratios, the report ------------------------------------------------------------------

def given_runs() -> list[peer.Run]:
    """Three repetitions of two prompts on both engines, numbers chosen by hand."""
    fic = {"short": ([100.0, 130.0, 110.0], [20.0, 22.0, 18.0]), "long": ([300.0, 280.0, 290.0], [9.0, 10.0, 11.0])}
    ll = {"short": ([50.0, 60.0, 40.0], [10.0, 12.0, 11.0]), "long": ([150.0, 100.0, 120.0], [12.0, 10.0, 11.0])}
    runs = []
    for rep in range(3):
        for prompt in ("short", "long"):
            for who, table, toks in (("fic", fic, [1, 2, 3, 4]), ("llama.cpp", ll, [1, 2, 9, 4])):
                pre, dec = table[prompt]
                runs.append(peer.Run(rep + 1, who, prompt, 40 if prompt == "short" else 2000, 4, pre[rep], dec[rep],
                                     f"{rep}.00 1.00 1.00", toks))
    return runs


def test_summarize_medians_and_ratios_from_given_numbers():
    runs = given_runs()
    rows = {r.prompt: r for r in peer.summarize(runs)}
    assert list(rows) == ["short", "long"]
    for prompt, row in rows.items():
        def med(who, key):
            return float(np.median([getattr(r, key) for r in runs if r.prompt == prompt and r.engine == who]))
        assert row.fic_prefill_tps == med("fic", "prefill_tps")
        assert row.peer_prefill_tps == med("llama.cpp", "prefill_tps")
        assert row.fic_decode_tps == med("fic", "decode_tps") and row.peer_decode_tps == med("llama.cpp", "decode_tps")
        assert row.prefill_ratio == pytest.approx(row.fic_prefill_tps / row.peer_prefill_tps)
        assert row.decode_ratio == pytest.approx(row.fic_decode_tps / row.peer_decode_tps)
        assert row.greedy_agree == 2  # the token lists part at their third token
        assert len(row.loads) == 6
    assert rows["short"].prefill_ratio == pytest.approx(110 / 50)
    assert rows["long"].decode_ratio == pytest.approx(10 / 11)


def test_summarize_refuses_a_prompt_run_by_one_engine():
    with pytest.raises(ValueError, match="only one engine"):
        peer.summarize([r for r in given_runs() if not (r.prompt == "long" and r.engine == "fic")])


def test_ratio_of_zero_is_none():
    assert peer.ratio(3.0, 0.0) is None and peer.ratio(3.0, 2.0) == 1.5


def test_report_json_shape_and_table():
    runs = given_runs()
    rep = peer.CompareReport(model="m", gguf="/x.gguf", peer="llama.cpp (llama-cpp-python)", threads=2, ctx=2100,
                             max_tokens=4, reps=3, machine={"cpu": "c", "cores": 2, "kernels": "avx2"}, date="d",
                             rows=peer.summarize(runs), runs=runs)
    d = json.loads(json.dumps(rep.as_dict()))
    assert {"model", "gguf", "peer", "threads", "ctx", "max_tokens", "reps", "machine", "date", "rows",
            "runs"} <= set(d)
    assert {"prompt", "fic_prefill_tps", "peer_prefill_tps", "prefill_ratio", "fic_decode_tps", "peer_decode_tps",
            "decode_ratio", "greedy_agree", "loads"} <= set(d["rows"][0])
    assert len(d["runs"]) == 12 and {"engine", "load", "prefill_tps", "decode_tps"} <= set(d["runs"][0])
    lines = rep.lines()
    short = next(line for line in lines if line.startswith("short"))
    assert f"{110 / 50:.2f}" in short and "0.00 1.00 1.00" in short


# ---- errors --------------------------------------------------------------------------------------

def test_vs_a_missing_binary_is_one_line(tiny, tmp_path):
    line = fail_line([str(tiny[1]), "--vs", f"llama.cpp={tmp_path / 'nowhere'}"])
    assert "no llama-completion binary" in line


def test_vs_without_llama_cpp_python_is_one_line(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert "needs the llama-cpp-python package" in fail_line([str(tiny[1]), "--vs", "llama.cpp", "--long", "32",
                                                              "--max-tokens", "2"])


@pytest.mark.parametrize("extra", [["--mem", "100M"], ["--quality"], ["--ctx", "512"]])
def test_vs_with_a_budget_or_another_measure_is_refused(tiny, extra):
    assert "--vs runs both engines unconstrained" in fail_line([str(tiny[1]), "--vs", "llama.cpp", *extra])


def test_vs_when_the_gguf_is_gone_is_one_line(tiny, tmp_path):
    from flashinfer_cli.convert import convert

    gone = tmp_path / "gone.gguf"
    gone.write_bytes(tiny[0].read_bytes())
    model = convert(gone, tmp_path / "m", name="gone", progress=False)
    gone.unlink()
    assert "is not on disk any more" in fail_line([str(model), "--vs", "llama.cpp"])


# ---- a binary peer (a stand-in for llama-completion) ---------------------------------------------

def test_binary_peer_times_come_from_its_perf_lines(tiny, tmp_path):
    build = tmp_path / "build" / "bin"
    build.mkdir(parents=True)
    exe = build / "llama-completion"
    args_file = tmp_path / "args.txt"
    exe.write_text("#!/bin/sh\n"
                   f"echo \"$@\" > {args_file}\n"
                   "echo 'llama_perf_context_print: prompt eval time =  250.00 ms /  50 tokens ( 5.00 ms per token, "
                   "200.00 tokens per second)' >&2\n"
                   "echo 'llama_perf_context_print:        eval time =  500.00 ms /  10 runs   ( 50.00 ms per token, "
                   "20.00 tokens per second)' >&2\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    p = peer.open_peer(peer.PeerSpec("llama.cpp", str(tmp_path / "build")), tiny[0], threads=2, ctx=300)
    t = p.run([1, 2, 3], 11, "hello")
    assert (t.prompt_tokens, t.gen_tokens, t.prefill_tps, t.decode_tps) == (50, 11, 200.0, 20.0)
    args = args_file.read_text().split()
    for flag, value in (("-t", "2"), ("-c", "300"), ("-n", "11"), ("--temp", "0"), ("-m", str(tiny[0]))):
        assert args[args.index(flag) + 1] == value
    assert "--ignore-eos" in args


def test_binary_peer_failure_is_a_compare_error(tiny, tmp_path):
    exe = tmp_path / "llama-completion"
    exe.write_text("#!/bin/sh\necho 'error: cannot load model' >&2\nexit 3\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    p = peer.open_peer(peer.PeerSpec("llama.cpp", str(exe)), tiny[0], threads=1, ctx=64)
    with pytest.raises(peer.CompareError, match="exit 3.*cannot load model"):
        p.run([1], 2, "x")


# ---- the trial run in a child (a llama.cpp that dies must not take fic with it) -------------------

def test_trial_run_that_dies_by_a_signal_is_a_compare_error(tiny):
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"  # as llama.cpp's AMX path died
    with pytest.raises(peer.CompareError, match=r"llama.cpp died \(SIGILL\).*AMX"):
        peer.trial_run(tiny[0], 1, code=kill)


def test_trial_run_that_fails_is_a_compare_error(tiny):
    with pytest.raises(peer.CompareError, match="exit 3.*cannot load"):
        peer.trial_run(tiny[0], 1, code="import sys; sys.stderr.write('cannot load\\n'); sys.exit(3)")


def test_vs_when_llama_cpp_dies_is_one_line(tiny, monkeypatch):
    from conftest import need_llama_cpp

    need_llama_cpp()
    monkeypatch.setattr(peer, "TRIAL_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    line = fail_line([str(tiny[1]), "--vs", "llama.cpp", "--long", "32", "--max-tokens", "2"])
    assert "llama.cpp died (SIGILL)" in line


# ---- one real run: llama-cpp-python on the tiny GGUF ----------------------------------------------

def test_real_tiny_run_against_llama_cpp_python(tiny):
    from conftest import need_llama_cpp

    need_llama_cpp()
    r = CliRunner().invoke(cli, ["bench", str(tiny[1]), "--vs", "llama.cpp", "--long", "96", "--max-tokens", "6",
                                 "--runs", "2", "--threads", "1", "--json", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.stderr)
    d = json.loads(r.stdout)
    assert [row["prompt"] for row in d["rows"]] == ["short", "long"] and d["threads"] == 1
    assert d["gguf"] == str(tiny[0])
    runs = d["runs"]
    order = [x["engine"] for x in runs if x["prompt"] == "short"]
    assert order == ["fic", "llama.cpp", "llama.cpp", "fic"]  # alternated
    for row in d["rows"]:
        mine = [x for x in runs if x["prompt"] == row["prompt"] and x["engine"] == "fic"]
        theirs = [x for x in runs if x["prompt"] == row["prompt"] and x["engine"] == "llama.cpp"]
        assert row["peer_prompt_tokens"] == row["prompt_tokens"]  # the very same ids
        assert {x["gen_tokens"] for x in mine + theirs} == {row["gen_tokens"]}  # as many tokens on both sides
        assert all(x["prefill_tps"] > 0 and x["decode_tps"] > 0 and len(x["load"].split()) == 3 for x in mine + theirs)
        assert row["prefill_ratio"] == pytest.approx(np.median([x["prefill_tps"] for x in mine]) /
                                                     np.median([x["prefill_tps"] for x in theirs]))
        assert row["decode_ratio"] == pytest.approx(np.median([x["decode_tps"] for x in mine]) /
                                                    np.median([x["decode_tps"] for x in theirs]))
        assert 0 <= row["greedy_agree"] <= row["gen_tokens"]
    long_row = d["rows"][1]
    assert abs(long_row["prompt_tokens"] - 96) <= 8  # cut to about --long tokens (re-tokenizing the cut text moves it)
