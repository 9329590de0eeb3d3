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


def test_unknown_command_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "flashinfer_cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "No such command 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr
