"""Where models live: $FIC_HOME (else $XDG_CACHE_HOME/fic, else ~/.cache/fic).

    <root>/models/<name>/   one fic model directory per name (fmt.py)
    <root>/cache/<sha256>   downloaded source files, keyed by content, so a re-pull does not download
    <root>/tmp/             work space of pulls in progress (same filesystem: renames are atomic)
    <root>/.lock            flock'ed while a pull writes, so two pulls never write the same model
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from flashinfer_cli import fmt


class StoreError(Exception):
    """A store operation that cannot be done; the message is one line for the user."""


class StoreBusy(StoreError):
    """Another process holds the store's lock."""


def fic_home() -> Path:
    """The store's root: $FIC_HOME, else $XDG_CACHE_HOME/fic, else ~/.cache/fic."""
    if os.environ.get("FIC_HOME"):
        return Path(os.environ["FIC_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fic"
    return Path.home() / ".cache" / "fic"


def validate_name(name: str) -> str:
    """A model name is one path component: no '/', no '..', not hidden, not empty, at most 255
    bytes, a file name the filesystem can hold (fmt.is_plain_name)."""
    bad = not fmt.is_plain_name(name) or ".." in name or len(os.fsencode(name)) > 255
    if bad:
        raise StoreError(f"invalid model name {name!r}: use letters, digits, '.', '-' or '_' (no '/' or '..')")
    return name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    size: int        # bytes on disk, every file of the model directory
    format: str      # weight formats, e.g. "q4_1+q8_0" (most bytes first)
    source: str      # where it came from (manifest provenance)
    arch: str


@dataclass(frozen=True)
class DownloadInfo:
    sha256: str
    path: Path
    size: int
    files: tuple[str, ...]
    used_by: tuple[str, ...]  # store models converted from it


def _source_sha256s(model_dir: Path) -> set[str]:
    """The sha256 of each file a model was converted from, as its manifest records them."""
    try:
        prov = fmt.parse_manifest(model_dir / fmt.MANIFEST_FILE).provenance
    except fmt.FormatError:
        return set()
    out = set((prov.get("sha256") or {}).values()) if isinstance(prov.get("sha256"), dict) else set()
    verified = (prov.get("fetched") or {}).get("verified_sha256")
    return out | ({verified} if verified else set())


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _format_summary(manifest: fmt.Manifest) -> str:
    """The weight formats of the matrices, the one holding most parameters first."""
    weight: dict[str, int] = {}
    for spec in manifest.tensors.values():
        if spec["fmt"] == "i32" or len(spec["shape"]) < 2:
            continue  # neuron orders and norms say nothing about the quantization
        n = 1
        for d in spec["shape"]:
            n *= d
        weight[spec["fmt"]] = weight.get(spec["fmt"], 0) + n
    if manifest.expert_layout is not None:
        for li, layer in enumerate(manifest.experts):
            layout = manifest.expert_layout.layer(li)
            for e in layer:
                for f in (layout.gate_fmt, layout.up_fmt, layout.down_fmt):
                    weight[f] = weight.get(f, 0) + e.n_neurons * layout.d_model
    return "+".join(sorted(weight, key=lambda f: -weight[f])) or "-"


def _source_summary(provenance: dict) -> str:
    return str(provenance.get("source_desc") or provenance.get("source") or "-")


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else fic_home()
        self.models_dir = self.root / "models"
        self.cache_dir = self.root / "cache"
        self.tmp_dir = self.root / "tmp"

    def path(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / fmt.MANIFEST_FILE).is_file()

    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir()
                      if not p.name.startswith(".") and (p / fmt.MANIFEST_FILE).is_file())

    def info(self, name: str) -> ModelInfo:
        path = self.path(name)
        if not self.exists(name):
            raise StoreError(f"no model {name!r} in {self.models_dir} (see `fic ls`)")
        manifest = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
        return ModelInfo(name=name, path=path, size=dir_size(path), format=_format_summary(manifest),
                         source=_source_summary(manifest.provenance), arch=str(manifest.arch.get("arch", "?")))

    def list(self) -> list[ModelInfo]:
        """Every model; one a reader found damaged (fmt.damage) or cannot read says so in place of
        its format and source, and is still listed, so it can be removed."""
        out = []
        for name in self.names():
            path = self.path(name)
            try:
                info = self.info(name)
            except fmt.FormatError as exc:
                out.append(ModelInfo(name, path, dir_size(path), "broken", f"({exc.fault})", "?"))
                continue
            damage = fmt.damage(path)
            out.append(info if damage is None else replace(info, format="damaged", source=f"({damage})"))
        return out

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.is_dir():
            raise StoreError(f"no model {name!r} in {self.models_dir} (see `fic ls`)")
        # rename first so a half-deleted model never shows under its name
        with self.lock(blocking=False):
            gone = self.models_dir / f".rm-{name}-{os.getpid()}"
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, *, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Exclusive lock on the store for writers (flock on <root>/.lock; the kernel drops it if
        we die). When another process holds it: wait (calling on_wait first), or StoreBusy."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    raise StoreBusy(f"another fic is writing to {self.root}; try again when it is done") from None
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def downloads(self) -> list["DownloadInfo"]:
        """The verified source files pulls keep in cache/ (so a re-pull does not download again),
        each with the store's models converted from it."""
        if not self.cache_dir.is_dir():
            return []
        users: dict[str, list[str]] = {}
        for name in self.names():
            for sha in _source_sha256s(self.path(name)):
                users.setdefault(sha, []).append(name)
        out = []
        for entry in sorted(p for p in self.cache_dir.iterdir()
                            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
            files = tuple(sorted(f.name for f in entry.iterdir() if f.is_file()))
            out.append(DownloadInfo(entry.name, entry, dir_size(entry), files, tuple(users.get(entry.name, ()))))
        return out

    def remove_downloads(self) -> int:
        """Delete every kept download (models stay: they no longer need their source); returns
        the bytes freed. Refused while a pull is writing."""
        freed = 0
        with self.lock(blocking=False):
            for d in self.downloads():
                gone = self.cache_dir / f".rm-{d.sha256}-{os.getpid()}"
                os.rename(d.path, gone)  # a cache entry is whole or absent, never half
                shutil.rmtree(gone, ignore_errors=True)
                freed += d.size
        return freed

    def make_tmp(self, prefix: str) -> Path:
        """A fresh work directory inside the store (same filesystem as models/ and cache/)."""
        import tempfile

        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))


@dataclass(frozen=True)
class ModelDetails:
    """What `fic show` prints about a model directory."""

    name: str
    path: Path
    arch: dict
    parameters: int
    dense_bytes: int            # the dense block file
    experts_per_layer: list[int]
    bundle_neurons: list[int]   # distinct expert sizes (neurons per bundle)
    bundle_bytes: list[int]     # distinct padded bundle sizes on disk
    formats: dict[str, tuple[int, int]]  # weight format -> (tensors, parameters); experts as gate/up/down
    size: int
    provenance: dict
    notes: list[str]


def describe(path: Path) -> ModelDetails:
    """Validate a model directory (headers and tables, not every checksum) and summarize it."""
    with fmt.ModelReader(path) as reader:
        man = reader.manifest
        formats: dict[str, list[int]] = {}

        def count(f: str, n: int, tensors: int = 1) -> None:
            slot = formats.setdefault(f, [0, 0])
            slot[0] += tensors
            slot[1] += n

        params = 0
        for spec in man.tensors.values():
            if spec["fmt"] == "i32":
                continue  # neuron orders are bookkeeping, not parameters
            n = 1
            for d in spec["shape"]:
                n *= d
            params += n
            count(spec["fmt"], n)
        if man.expert_layout is not None:
            for li, layer in enumerate(man.experts):
                layout = man.expert_layout.layer(li)
                parts = (layout.gate_fmt, layout.up_fmt, layout.down_fmt)
                for e in layer:
                    n = e.n_neurons * layout.d_model
                    params += 3 * n
                    for f in parts:
                        count(f, n, 0)
                for f in set(parts) if layer else ():  # one ffn matrix per layer and part
                    formats[f][0] += parts.count(f)
        return ModelDetails(
            name=man.name, path=Path(path), arch=man.arch, parameters=params,
            dense_bytes=reader.dense_path.stat().st_size,
            experts_per_layer=[len(layer) for layer in man.experts],
            bundle_neurons=sorted({e.n_neurons for layer in man.experts for e in layer}),
            bundle_bytes=sorted({e.padded_length for layer in man.experts for e in layer}),
            formats={f: (t, n) for f, (t, n) in formats.items()},
            size=dir_size(Path(path)), provenance=man.provenance, notes=man.notes,
        )
