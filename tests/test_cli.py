"""The command line, through click's CliRunner and a real subprocess."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from flashinfer_cli import __version__, kernels
from flashinfer_cli.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fic, version {__version__}"


def test_info_names_the_kernels_this_cpu_gets():
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0, result.output
    assert f"kernels: {kernels.best_impl()}" in result.output
    assert "ref" in result.output and "q1_0" in result.output


def test_info_names_the_io_backend_the_store_gets(tmp_path, monkeypatch):
    """The help promises the IO backend: the one a Reader opens with on the store's filesystem,
    and pread when FIC_IO forces it."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("FIC_HOME", str(store))
    monkeypatch.delenv("FIC_IO", raising=False)
    (store / "probe").write_bytes(b"x" * 8192)
    reader = kernels.Reader(store / "probe")
    out = CliRunner().invoke(cli, ["info"]).output
    assert f"io: {reader.backend}, {'O_DIRECT' if reader.direct else 'page cache'}" in out
    assert out.rstrip().endswith(f"store {store}")
    monkeypatch.setenv("FIC_IO", "pread")
    assert "io: pread (FIC_IO=pread), " in CliRunner().invoke(cli, ["info"]).output
    assert sorted(p.name for p in store.iterdir()) == ["probe"]  # the probe file is gone


def test_unknown_command_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "flashinfer_cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "No such command 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr
