""".ci/cross-tools and .ci/browser, the CI steps that provide what some tests need (the AArch64 cross
compiler and qemu-user for the NEON tests; chromium and chromedriver for the chat page's browser
test): in CI (CI=true) their absence fails the run; on a developer's machine it is a note and the
tests skip. Run with a PATH of fakes (id, apt-get, the tools) so no real install happens. The same
rule for the llamacpp extra, which CI installs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CI_DIR = Path(__file__).resolve().parents[1] / ".ci"
BASH = "/bin/bash"
# script -> (the tools it provides, the Debian packages it installs, a word its CI failure names)
SCRIPTS = {
    "cross-tools": (("aarch64-linux-gnu-gcc", "qemu-aarch64"), ("gcc-aarch64-linux-gnu", "qemu-user"), "NEON"),
    "browser": (("chromium", "chromedriver"), ("chromium", "chromium-driver"), "page"),
}
needs_bash = pytest.mark.skipif(not os.access(BASH, os.X_OK), reason="needs /bin/bash")


def _exe(path: Path, body: str) -> None:
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, script: str, *, ci: bool, tools: bool, apt_installs: bool, root: bool = True):
    names = SCRIPTS[script][0]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _exe(bin_ / "id", f"echo {0 if root else 1000}")
    log = tmp_path / "apt.log"
    install = "".join(f"printf '#!{BASH}\\n' > {bin_}/{t}; chmod +x {bin_}/{t}; " for t in names)
    _exe(bin_ / "apt-get", f'echo "$@" >> {log}; ' + (f'[ "$1" = install ] && {{ {install} }}; exit 0'
                                                      if apt_installs else "exit 100"))
    if tools:
        for t in names:
            _exe(bin_ / t, "exit 0")
    env = {"PATH": str(bin_), "HOME": str(tmp_path)}
    if ci:
        env["CI"] = "true"
    p = subprocess.run([BASH, str(CI_DIR / script)], env=env, capture_output=True, text=True, timeout=60)
    return p, (log.read_text() if log.exists() else "")


@needs_bash
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("ci", [True, False], ids=["ci", "developer"])
def test_missing_tools(tmp_path, script, ci):
    p, apt = _run(tmp_path, script, ci=ci, tools=False, apt_installs=False)
    assert apt.startswith("update")  # it tried (and apt-get failed)
    if ci:
        assert p.returncode != 0 and "FAILED" in p.stderr and SCRIPTS[script][2] in p.stderr
    else:
        assert p.returncode == 0 and "will skip" in p.stderr


@needs_bash
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_missing_tools_not_root_fails_in_ci(tmp_path, script):
    p, apt = _run(tmp_path, script, ci=True, tools=False, apt_installs=True, root=False)
    assert apt == "" and p.returncode != 0 and "FAILED" in p.stderr


@needs_bash
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("tools,apt_installs", [(True, False), (False, True)], ids=["present", "installed"])
def test_tools_present_or_installed(tmp_path, script, tools, apt_installs):
    p, apt = _run(tmp_path, script, ci=True, tools=tools, apt_installs=apt_installs)
    assert p.returncode == 0, p.stderr
    assert ("install" in apt) == (not tools)
    if not tools:
        assert all(pkg in apt.split() for pkg in SCRIPTS[script][1])


def test_ci_run_calls_every_step():
    run = (CI_DIR / "run").read_text()
    for script in SCRIPTS:
        assert f"bash .ci/{script}" in run


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

SANITIZERS = CI_DIR / "sanitizers"


def test_ci_runs_the_sanitizers_after_the_suite_and_fails_with_them():
    run = (CI_DIR / "run").read_text()
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
