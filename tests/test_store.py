"""The model store: where it lives, names, listing, removal, locking."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashinfer_cli import fmt, kernels
from flashinfer_cli.store import Store, StoreBusy, StoreError, describe, fic_home, validate_name

D_MODEL, N_NEURONS, VOCAB = 64, 32, 48


def write_tiny_model(store: Store, name: str, *, quant: str = "q4_0", layers: int = 2, experts: int = 3,
                     source: str = "test source", down_fmts: list[str] | None = None) -> Path:
    """A small valid model written with fmt.ModelWriter: q8_0 embeddings, f32 norm, `quant` experts
    (down_fmts: ffn_down's format per layer instead)."""
    rng = np.random.default_rng(0)
    layout = fmt.ExpertLayout.per_layer(D_MODEL, quant, quant, down_fmts or [quant] * layers, "columns")
    q = lambda shape, f=quant: kernels.quantize(rng.standard_normal(shape).astype(np.float32), f)
    with fmt.ModelWriter(store.path(name), name=name, arch={"arch": "llama", "n_layers": layers, "d_model": D_MODEL},
                         layout=layout, provenance={"source": source}) as w:
        w.add_dense("token_embd", q((VOCAB, D_MODEL), "q8_0"))
        w.add_dense("output_norm", np.ones(D_MODEL, np.float32))
        for layer in range(layers):
            for _ in range(experts):
                w.add_expert(layer, q((N_NEURONS, D_MODEL)), q((N_NEURONS, D_MODEL)),
                             q((D_MODEL, N_NEURONS), layout.layer(layer).down_fmt))
    return store.path(name)


def tiny_model_params(layers: int = 2, experts: int = 3) -> int:
    return VOCAB * D_MODEL + D_MODEL + layers * experts * 3 * N_NEURONS * D_MODEL


def du(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ---- where the store is --------------------------------------------------------------------

def test_fic_home_prefers_fic_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fic_home() == tmp_path / "h"
    assert Store().models_dir == tmp_path / "h" / "models"


def test_fic_home_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FIC_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fic_home() == tmp_path / "x" / "fic"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fic_home() == tmp_path / "home" / ".cache" / "fic"


def test_empty_env_vars_count_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("FIC_HOME", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fic_home() == tmp_path / "fic"


# ---- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "a/b", "..", "../x", "x/..", ".hidden", "a..b", "a\\b", "/etc", "/",
                                 "x\0y", "a" * 256, "\ud800", "~/../x", None, 5])
def test_bad_names_are_refused(bad, tmp_path):
    with pytest.raises(StoreError, match="invalid model name"):
        validate_name(bad)
    with pytest.raises(StoreError):
        Store(tmp_path).path(bad)


@pytest.mark.parametrize("good", ["smollm2-135m", "qwen2.5-coder-1.5b", "my_model.q4_0", "~", "a" * 255])
def test_good_names(good, tmp_path):
    assert Store(tmp_path).path(good) == tmp_path / "models" / good


@settings(max_examples=2000, deadline=None)
@given(name=st.text(alphabet=st.sampled_from("a./\\\0~-_ \ud800é"), max_size=12) | st.text(max_size=300))
def test_no_model_name_leaves_the_store(name):
    """Whatever a name is, it is refused or names a directory directly inside models/."""
    root = Path("/tmp/fic-store-names")
    try:
        path = Store(root).path(name)
    except StoreError as exc:
        assert "invalid model name" in str(exc)
        return
    assert path.parent == root / "models" and path.name == name
    assert os.path.normpath(path) == str(path) and len(os.fsencode(path.name)) <= 255


def test_a_symlinked_cache_entry_is_not_listed_or_removed(tmp_path):
    """cache/ holds sha256-named directories a pull made; a link to elsewhere is not one of them
    (removing downloads would otherwise measure and try to delete what it points to)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.gguf").write_bytes(b"x" * 100)
    store = Store(tmp_path / "store")
    store.cache_dir.mkdir(parents=True)
    (store.cache_dir / ("a" * 64)).symlink_to(outside)
    assert store.downloads() == []
    assert store.remove_downloads() == 0
    assert (outside / "precious.gguf").exists()


# ---- list, info, remove --------------------------------------------------------------------

def test_empty_store_lists_nothing(tmp_path):
    assert Store(tmp_path / "never-made").list() == []


def test_list_reports_size_format_and_source(tmp_path):
    store = Store(tmp_path)
    write_tiny_model(store, "b-model", quant="q4_0", source="pip example==1.0")
    write_tiny_model(store, "a-model", quant="q8_0", source="/some/file.gguf")
    (store.models_dir / ".tmp-half-written").mkdir()  # a writer's temp dir is not a model
    (store.models_dir / "not-a-model").mkdir()        # nor is a dir without a manifest
    infos = store.list()
    assert [i.name for i in infos] == ["a-model", "b-model"]
    a, b = infos
    assert a.size == du(store.path("a-model")) and b.size == du(store.path("b-model"))
    # experts (3 matrices of 2*3*32*64) outweigh the q8_0 embedding (48*64): most bytes first
    assert b.format == "q4_0+q8_0"
    assert a.format == "q8_0"
    assert b.source == "pip example==1.0" and a.source == "/some/file.gguf"
    assert a.arch == "llama"


def test_a_broken_model_is_listed_so_it_can_be_removed(tmp_path):
    store = Store(tmp_path)
    path = write_tiny_model(store, "m")
    (path / fmt.MANIFEST_FILE).write_text("{not json")
    (info,) = store.list()
    assert info.format == "broken"
    store.remove("m")
    assert not path.exists() and store.list() == []


def test_a_model_found_damaged_is_listed_as_damaged(tmp_path):
    store = Store(tmp_path)
    path = write_tiny_model(store, "m")
    header, base = fmt.safetensors_header(path / fmt.DENSE_FILE)
    with open(path / fmt.DENSE_FILE, "r+b") as f:  # one bit of output_norm rots
        f.seek(base + header["output_norm"]["data_offsets"][0])
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    assert store.list()[0].format != "damaged"  # nobody has read it yet: `ls` reads no weights
    with fmt.ModelReader(path) as r, pytest.raises(fmt.FormatError, match="output_norm"):
        r.dense()
    (info,) = store.list()
    assert info.format == "damaged" and "tensor 'output_norm' is damaged" in info.source
    assert "`fic pull m --force`" in info.source


def test_remove(tmp_path):
    store = Store(tmp_path)
    write_tiny_model(store, "keep")
    write_tiny_model(store, "drop")
    store.remove("drop")
    assert store.names() == ["keep"]
    assert sorted(p.name for p in store.models_dir.iterdir()) == ["keep"]  # no leftovers


def test_remove_unknown_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="no model 'ghost'"):
        Store(tmp_path).remove("ghost")
    with pytest.raises(StoreError, match="invalid model name"):
        Store(tmp_path).remove("../outside")


def test_describe_counts_parameters_and_bundles(tmp_path):
    store = Store(tmp_path)
    path = write_tiny_model(store, "m", quant="q4_0", layers=2, experts=3)
    d = describe(path)
    assert d.parameters == tiny_model_params(2, 3)
    assert d.experts_per_layer == [3, 3]
    assert d.bundle_neurons == [N_NEURONS]
    # a q4_0 row of 64 weights is 2 blocks of 18 bytes; a column slice of 32 is 1 block
    payload = 2 * N_NEURONS * 36 + D_MODEL * 18
    assert d.bundle_bytes == [-(-payload // 4096) * 4096]
    assert d.dense_bytes == (path / fmt.DENSE_FILE).stat().st_size
    assert d.formats["q4_0"] == (6, 2 * 3 * 3 * N_NEURONS * D_MODEL)
    assert d.formats["q8_0"] == (1, VOCAB * D_MODEL)
    assert d.formats["f32"] == (1, D_MODEL)


def test_describe_refuses_a_truncated_model(tmp_path):
    path = write_tiny_model(Store(tmp_path), "m")
    with open(path / fmt.EXPERTS_FILE, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(fmt.FormatError, match="experts.bin"):
        describe(path)


# ---- locking -------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys
    from flashinfer_cli.store import Store
    with Store(sys.argv[1]).lock():
        print("locked", flush=True)
        sys.stdin.read()   # hold it until the test closes our stdin
""")


def _holder(root: Path) -> subprocess.Popen:
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_kept_out_while_the_first_holds_the_lock(tmp_path):
    store = Store(tmp_path)
    holder = _holder(tmp_path)
    try:
        with pytest.raises(StoreBusy, match="another fic is writing"):
            with store.lock(blocking=False):
                pass
        write_tiny_model(store, "m")
        with pytest.raises(StoreBusy):  # removal is a write too
            store.remove("m")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with store.lock(blocking=False):  # released when the holder is done
        pass
    store.remove("m")


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    with Store(tmp_path).lock(blocking=False):
        pass


def test_a_blocking_lock_says_it_waits(tmp_path):
    store = Store(tmp_path)
    holder = _holder(tmp_path)
    said = []

    def on_wait():
        said.append("waiting")
        holder.stdin.close()  # let the holder finish, so our blocking flock returns

    try:
        with store.lock(on_wait=on_wait):
            pass
    finally:
        holder.wait(timeout=30)
    assert said == ["waiting"]
