"""Damaged and truncated files end to end, in real processes: a model whose dense block rots on disk
(`fic run`, `fic ls`), and a GGUF file cut short (`fic pull`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import make_checkpoint  # noqa: E402
from flashinfer_cli import fmt  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.store import Store  # noqa: E402


def fic(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FIC_HOME": str(home)}  # conftest set PYTHONPATH to the package under test
    return subprocess.run([sys.executable, "-m", "flashinfer_cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny Llama with its own output matrix: its token embedding stays on flash (fmt.DenseRows)."""
    root = tmp_path_factory.mktemp("hf")
    make_checkpoint("llama", root, seed=2)
    return root


@pytest.fixture
def home(tmp_path: Path, tiny_hf: Path) -> Path:
    """A store holding the tiny model, converted, as `tiny`."""
    convert(tiny_hf, Store(tmp_path / "home").path("tiny"), name="tiny",
            options=ConvertOptions(quant="q8_0", expert_size=32), progress=False)
    return tmp_path / "home"


def flip_inside(model: Path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s data in dense.safetensors."""
    header, base = fmt.safetensors_header(model / fmt.DENSE_FILE)
    begin, end = header[tensor]["data_offsets"]
    with open(model / fmt.DENSE_FILE, "r+b") as f:
        f.seek(base + (begin + end) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def test_an_intact_model_runs_and_lists(home: Path):
    p = fic(home, "run", "tiny", "hello there", "--max-tokens", "3")
    assert p.returncode == 0, p.stderr
    p = fic(home, "ls")
    assert p.returncode == 0 and "damaged" not in p.stdout


# blk.0.attn_q and output_norm live in the resident dense block; token_embd stays on flash here
@pytest.mark.parametrize("tensor", ["blk.0.attn_q", "output_norm", "token_embd"])
def test_a_damaged_dense_tensor_stops_run_and_shows_in_ls(home: Path, tensor: str):
    model = Store(home).path("tiny")
    assert tensor in fmt.parse_manifest(model / fmt.MANIFEST_FILE).tensors
    assert (tensor == "token_embd") == (tensor in fmt.flash_resident(fmt.parse_manifest(model / fmt.MANIFEST_FILE)))
    flip_inside(model, tensor)
    p = fic(home, "run", "tiny", "hello there", "--max-tokens", "3")
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("fic: ") and fmt.DENSE_FILE in lines[0]
    assert f"tensor '{tensor}' is damaged" in lines[0]
    assert "run `fic pull " in lines[0] and " --force` to fetch and convert it again" in lines[0]
    p = fic(home, "ls")
    assert p.returncode == 0, p.stderr
    (row,) = [r for r in p.stdout.splitlines() if r.startswith("tiny ")]
    assert row.split()[3] == "damaged" and f"tensor '{tensor}'" in row


# ---- truncated sources ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from test_convert import tiny_model, write_gguf

    path = tmp_path_factory.mktemp("gguf") / "full.gguf"
    write_gguf(path, tiny_model("llama"))
    return path


@pytest.mark.parametrize("where", ["header", "metadata", "first tensor's data"])
def test_pull_of_a_truncated_gguf_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_gguf: Path, where: str):
    from test_convert import gguf_cuts

    keep, message = gguf_cuts(tiny_gguf)[where]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:keep])
    home = tmp_path / "home"
    p = fic(home, "pull", str(cut), "--no-progress")
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.fullmatch(f"fic: {re.escape(str(cut))}: {message}", lines[0]), lines[0]
    assert Store(home).names() == []
    assert [p for p in home.rglob("*") if p.is_file() and p.name != ".lock"] == []  # no half model, no work files
