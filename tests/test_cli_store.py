"""fic pull / ls / show / rm through click's CliRunner and real subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashinfer_cli import fmt
from flashinfer_cli.cli import cli
from flashinfer_cli.store import Store
from test_store import D_MODEL, N_NEURONS, du, tiny_model_params, write_tiny_model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FIC_CATALOG", raising=False)
    return Store()


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def fic(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "flashinfer_cli", *args], input=stdin, capture_output=True,
                          text=True, env=full, timeout=600)


def one_error_line(stderr: str) -> str:
    """The error, alone on its line; before it only the note that says where a pull is fetching from."""
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("fic: pulling ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_ls_of_an_empty_store_prints_the_header_and_the_catalog(home):
    from flashinfer_cli import catalog

    result = run("ls")
    assert result.exit_code == 0
    models, cat = result.output.split("\n\n")
    assert models.split() == ["NAME", "SIZE", "FORMAT", "SOURCE"]
    head, columns, *rows = cat.splitlines()
    assert head == f"catalog (`fic run NAME` pulls on first use; the default is {catalog.DEFAULT_MODEL}):"
    assert columns.split() == ["NAME", "DOWNLOAD", "GOOD", "FOR"]
    assert [r.split()[0] for r in rows] == catalog.names()
    for r in rows:  # each says what it is good for, in the catalog's own words
        entry = catalog.get(r.split()[0])
        assert entry.good_for and r.endswith(entry.good_for) and "pulled" not in r
    write_tiny_model(home, "smollm2-135m")
    rows = run("ls").output.split("\n\n")[1].splitlines()[2:]
    assert [r.split()[0] for r in rows if " pulled " in r] == ["smollm2-135m"]


def test_ls_lists_name_size_format_source(home):
    write_tiny_model(home, "tiny-q4", quant="q4_0", source="pip example==1.0")
    write_tiny_model(home, "tiny-q8", quant="q8_0", source="/models/x.gguf")
    result = run("ls")
    assert result.exit_code == 0, result.output
    header, *rows = result.output.split("\n\n")[0].splitlines()
    assert header.split() == ["NAME", "SIZE", "FORMAT", "SOURCE"]
    assert [r.split()[0] for r in rows] == ["tiny-q4", "tiny-q8"]
    q4 = rows[0].split()
    size_kb = du(home.path("tiny-q4")) / 1000
    assert q4[1:3] == [f"{size_kb:.1f}", "KB"] and q4[3] == "q4_0+q8_0"
    assert rows[0].endswith("pip example==1.0") and rows[1].endswith("/models/x.gguf")


def test_show_describes_the_model(home):
    write_tiny_model(home, "tiny", quant="q4_0", layers=2, experts=3, source="pip example==1.0")
    result = run("show", "tiny")
    assert result.exit_code == 0, result.output
    out = {l[:16].strip(): l[16:] for l in result.output.splitlines()}
    assert out["architecture"].startswith("llama: 2 layers, d_model 64")
    assert out["parameters"].startswith(f"{tiny_model_params(2, 3):,} ")
    dense = (home.path("tiny") / fmt.DENSE_FILE).stat().st_size
    assert out["dense block"].startswith(f"{dense:,} bytes")
    assert out["experts"] == f"3 per layer x 2 layers; bundles of {N_NEURONS} neurons, 4,096 bytes on disk"
    assert out["quantization"].startswith(f"q4_0 (6 tensors, {2 * 3 * 3 * N_NEURONS * D_MODEL / 1e6:.1f}M params)")
    assert "q8_0 (1 tensors" in out["quantization"] and "f32 (1 tensors" in out["quantization"]
    assert out["source"] == "pip example==1.0"


def test_show_counts_down_formats_per_layer(home):
    """ffn_down in a format per layer: the bundles' sizes as a range, each layer's matrices counted in
    their own format."""
    write_tiny_model(home, "mixed", quant="q4_0", layers=2, experts=3, down_fmts=["q4_0", "q8_0"])
    result = run("show", "mixed")
    assert result.exit_code == 0, result.output
    out = {l[:16].strip(): l[16:] for l in result.output.splitlines()}
    assert out["experts"] == f"3 per layer x 2 layers; bundles of {N_NEURONS} neurons, 4,096 to 8,192 bytes on disk"
    assert out["quantization"].startswith(f"q4_0 (5 tensors, {(2 * 3 * 3 - 3) * N_NEURONS * D_MODEL / 1e6:.1f}M params)")
    assert "q8_0 (2 tensors, " in out["quantization"]


def test_show_takes_a_model_dir_path_too(home, tmp_path):
    path = write_tiny_model(Store(tmp_path / "elsewhere"), "m")
    result = run("show", str(path))
    assert result.exit_code == 0 and f"path            {path}" in result.output


def test_show_of_a_catalog_model_not_pulled_says_how(home):
    result = run("show", "smollm2-135m")
    assert result.exit_code == 1
    assert "in the catalog but not pulled yet: `fic pull smollm2-135m`" in result.output


def test_show_of_a_broken_model_is_one_error(home):
    path = write_tiny_model(home, "m")
    (path / fmt.EXPERTS_FILE).write_bytes(b"short")
    proc = fic("show", "m", env={"FIC_HOME": str(home.root)})
    assert proc.returncode == 1
    assert "experts.bin" in one_error_line(proc.stderr)


def test_rm_removes_and_refuses_unknown(home):
    write_tiny_model(home, "a")
    write_tiny_model(home, "b")
    result = run("rm", "a")
    assert result.exit_code == 0 and "deleted 'a'" in result.output
    assert home.names() == ["b"]
    result = run("rm", "ghost")
    assert result.exit_code == 1 and "no model 'ghost'" in result.output
    assert home.names() == ["b"]
    result = run("rm", "../b")
    assert result.exit_code == 1 and "invalid model name" in result.output


def test_bad_sources_are_one_line_errors(home, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf" * 100)
    for args in (["pull", "no-such-model"], ["pull", "fic-test/no-such-repo"], ["pull", str(tmp_path / "missing.gguf")], ["pull", str(junk)],
                 ["pull", "smollm2-135m", "--name", "../escape"], ["show", "ghost"], ["rm", "ghost"]):
        proc = fic(*args, env={"FIC_HOME": str(home.root), "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 1, (args, proc.stderr)
        assert one_error_line(proc.stderr).startswith("fic: "), args
    assert not home.models_dir.exists() or home.names() == []


def test_pull_refuses_an_unknown_quant(home):
    result = run("pull", "smollm2-135m", "--quant", "q3_k")
    assert result.exit_code == 2 and "q3_k" in result.output


def test_ctrl_c_during_pull_is_one_line_and_leaves_nothing(home, tmp_path, monkeypatch):
    from flashinfer_cli import pull

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pull, "_convert", interrupted)
    result = CliRunner().invoke(cli, ["pull", str(gguf)])
    assert result.exit_code == 130
    assert "fic: interrupted; no half model or partial download was left in the store" in result.output
    assert home.names() == [] and list(home.tmp_dir.iterdir()) == []


def test_pull_ls_show_rm_through_subprocesses(home, tmp_path, smollm2_gguf):
    """A whole session as a user types it, on a real GGUF (the one the suite downloads once)."""
    gguf = smollm2_gguf
    env = {"FIC_HOME": str(home.root)}
    proc = fic("pull", str(gguf), "--name", "smol", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == home.path("smol")
    proc = fic("ls", env=env)
    assert proc.returncode == 0 and proc.stdout.splitlines()[1].split()[0] == "smol"
    proc = fic("show", "smol", env=env)
    assert proc.returncode == 0 and "llama: 30 layers" in proc.stdout
    proc = fic("rm", "smol", env=env)
    assert proc.returncode == 0 and home.names() == []
