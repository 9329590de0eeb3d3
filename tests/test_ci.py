""".ci/cross-tools, the CI step that provides the AArch64 cross compiler and qemu-user for the NEON
tests: in CI (CI=true) their absence fails the run; on a developer's machine it is a note and the
NEON tests skip. Run with a PATH of fakes (id, apt-get, the tools) so no real install happens."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "cross-tools"
BASH = "/bin/bash"


def _exe(path: Path, body: str) -> None:
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, *, ci: bool, tools: bool, apt_installs: bool, root: bool = True):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _exe(bin_ / "id", f"echo {0 if root else 1000}")
    log = tmp_path / "apt.log"
    install = "".join(f"printf '#!{BASH}\\n' > {bin_}/{t}; chmod +x {bin_}/{t}; "
                      for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64"))
    _exe(bin_ / "apt-get", f'echo "$@" >> {log}; ' + (f'[ "$1" = install ] && {{ {install} }}; exit 0'
                                                      if apt_installs else "exit 100"))
    if tools:
        for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64"):
            _exe(bin_ / t, "exit 0")
    env = {"PATH": str(bin_), "HOME": str(tmp_path)}
    if ci:
        env["CI"] = "true"
    p = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return p, (log.read_text() if log.exists() else "")


@pytest.mark.skipif(not os.access(BASH, os.X_OK), reason="needs /bin/bash")
@pytest.mark.parametrize("ci", [True, False], ids=["ci", "developer"])
def test_missing_cross_tools(tmp_path, ci):
    p, apt = _run(tmp_path, ci=ci, tools=False, apt_installs=False)
    assert apt.startswith("update")  # it tried (and apt-get failed)
    if ci:
        assert p.returncode != 0 and "FAILED" in p.stderr and "NEON" in p.stderr
    else:
        assert p.returncode == 0 and "will skip" in p.stderr


@pytest.mark.skipif(not os.access(BASH, os.X_OK), reason="needs /bin/bash")
def test_missing_cross_tools_not_root_fails_in_ci(tmp_path):
    p, apt = _run(tmp_path, ci=True, tools=False, apt_installs=True, root=False)
    assert apt == "" and p.returncode != 0 and "FAILED" in p.stderr


@pytest.mark.skipif(not os.access(BASH, os.X_OK), reason="needs /bin/bash")
@pytest.mark.parametrize("tools,apt_installs", [(True, False), (False, True)], ids=["present", "installed"])
def test_cross_tools_present_or_installed(tmp_path, tools, apt_installs):
    p, apt = _run(tmp_path, ci=True, tools=tools, apt_installs=apt_installs)
    assert p.returncode == 0, p.stderr
    assert ("install" in apt) == (not tools)


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "developer"])
def test_missing_llama_cpp_skips_with_its_reason_and_fails_in_ci(ci, monkeypatch):
    """Without the `llamacpp` extra the llama.cpp comparisons skip and say how to get them; CI
    installs it, so there the same absence is a failure, not a silent skip."""
    import sys

    from _pytest.outcomes import Failed, Skipped

    from conftest import need_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed if ci else Skipped) as err:
        need_llama_cpp()
    assert "pip install '.[test,llamacpp]'" in str(err.value)


# ---- .ci/sanitizers: the C core under ASan + UBSan ------------------------------------------------

SANITIZERS = SCRIPT.parent / "sanitizers"


def test_ci_runs_the_sanitizers_after_the_suite_and_fails_with_them():
    run = (SCRIPT.parent / "run").read_text()
    assert run.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in run  # a failing step fails CI
    lines = [line.strip() for line in run.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    suite = next(i for i, line in enumerate(lines) if line.startswith("pytest "))
    assert lines[suite + 1:] == ["bash .ci/sanitizers"]


@pytest.mark.skipif(not os.access(BASH, os.X_OK), reason="needs /bin/bash")
def test_sanitizers_fail_without_libasan(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _exe(bin_ / "cc", 'echo "$2"')  # as gcc answers -print-file-name for a library it does not have
    p = subprocess.run([BASH, str(SANITIZERS)], env={"PATH": f"{bin_}:/usr/bin:/bin", "CC": str(bin_ / "cc")},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "FAILED" in p.stderr and "libasan" in p.stderr
