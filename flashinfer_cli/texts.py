"""The texts fic ships, and the calibration text every machine running fic already has.

Shipped with the package (read through importlib.resources, so they work from an installed wheel):

    flashinfer_cli/data/quality/*.txt   eight original English prose texts (350-500 words each, one
                                        everyday domain each: a story scene, travel, cooking, a
                                        fictional history, a letter, nature, a sports report, a
                                        household how-to). The first part of a text is a prompt, the
                                        rest the continuation whose perplexity measures quality.
    flashinfer_cli/data/prompts.json    six short chat prompts, a list of {"id": ..., "prompt": ...}.

Held-out texts of two more domains (`held_out_texts`), not shipped either: modules inside the
standard library's packages (json/decoder.py, http/cookiejar.py, ...: HELD_OUT_MODULES), which neither
calibration reads (calibrate.py takes top-level modules only; calibration_text top-level modules and
a few packages' __init__.py): "code" is a module's source from its first class or function on,
"docs" a module's docstrings and comments. The shipped texts are the "prose" domain.

The calibration text (`calibration_text`) is not shipped: it is read from the Python standard
library's own sources, which every Python has. It is a different domain from the quality texts
(technical English about programming), so calibrating on it never sees the evaluation texts.

This module uses only the standard library and never imports fic's compiled core.
"""
from __future__ import annotations

import ast
import io
import json
import os
import sysconfig
import tokenize
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

_DATA = "data"

# The standard-library modules calibration_text reads first, in this (sorted) order. Each exists in
# every Python fic supports (3.10+), as <name>.py or as a package <name>/__init__.py.
CALIBRATION_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "codecs", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq",
    "inspect", "locale", "logging", "os", "pathlib", "pickle", "queue", "random", "shutil",
    "socket", "statistics", "string", "subprocess", "tempfile", "textwrap", "threading", "typing",
    "warnings", "weakref", "zipfile",
)


# Held-out standard-library modules, per domain: package submodules (never a top-level module nor a
# package's __init__.py, which calibration may read), present in every Python fic supports (3.10+);
# "docs" ones hold at least 4,000 characters of docstrings and comments.
HELD_OUT_MODULES: dict[str, tuple[str, ...]] = {
    "code": ("json/decoder.py", "email/feedparser.py", "concurrent/futures/_base.py", "asyncio/locks.py",
             "multiprocessing/pool.py", "xml/dom/minidom.py", "http/client.py", "wsgiref/handlers.py"),
    "docs": ("email/message.py", "http/cookiejar.py", "urllib/parse.py", "unittest/case.py",
             "email/_header_value_parser.py", "http/server.py", "asyncio/tasks.py", "urllib/request.py"),
}
DOMAINS = ("prose", "code", "docs")  # held_out_texts' domains: the shipped texts, then HELD_OUT_MODULES'
HELD_OUT_CHARS = 4000  # of each standard-library text: over 512 tokens with every tokenizer fic knows


@dataclass(frozen=True)
class QualityText:
    """One quality text: `name` (a shipped file's name without .txt, or domain_module), `text` its
    content, `domain` one of DOMAINS."""

    name: str
    text: str
    domain: str = "prose"


def _data_dir():
    return resources.files("flashinfer_cli").joinpath(_DATA)


def quality_texts() -> list[QualityText]:
    """The shipped quality texts (data/quality/*.txt), sorted by name, surrounding whitespace stripped."""
    folder = _data_dir().joinpath("quality")
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".txt") and entry.is_file():
            out.append(QualityText(entry.name[: -len(".txt")], entry.read_text(encoding="utf-8").strip()))
    return sorted(out, key=lambda t: t.name)


def _module_code(source: str) -> str:
    """The source from its first top-level class or function on (past the license and imports)."""
    import ast as _ast

    lines = source.splitlines(keepends=True)
    defs = [n.lineno for n in _ast.parse(source).body if isinstance(n, (_ast.ClassDef, _ast.FunctionDef))]
    return "".join(lines[min(defs) - 1:] if defs else lines)


def stdlib_held_out(domain: str) -> list[QualityText]:
    """HELD_OUT_MODULES[domain] as quality texts, HELD_OUT_CHARS each; a module this Python lacks
    or cannot parse is skipped."""
    stdlib = _stdlib_dir()
    out = []
    for rel in HELD_OUT_MODULES[domain] if stdlib else ():
        try:
            with tokenize.open(os.path.join(stdlib, rel)) as f:
                source = f.read()
            text = _module_code(source) if domain == "code" else "\n\n".join(_prose(source))
        except Exception:  # a missing, undecodable or unparsable file is skipped
            continue
        name = rel[:-len(".py")].replace("/", "_").strip("_")
        out.append(QualityText(f"{domain}_{name}", text[:HELD_OUT_CHARS].strip(), domain))
    return out


def held_out_texts(domains: Sequence[str] = ("prose",), per_domain: int | None = None) -> list[QualityText]:
    """The quality texts of each domain in `domains` (DOMAINS), at most per_domain of each, in the
    order asked: "prose" the shipped texts, "code" and "docs" stdlib_held_out's."""
    out = []
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown text domain {domain!r} (choose from {', '.join(DOMAINS)})")
        docs = quality_texts() if domain == "prose" else stdlib_held_out(domain)
        out += docs[:per_domain] if per_domain else docs
    return out


def prompts() -> list[dict]:
    """The shipped chat prompts (data/prompts.json): a list of {"id": str, "prompt": str}."""
    return json.loads(_data_dir().joinpath("prompts.json").read_text(encoding="utf-8"))


def _stdlib_dir() -> str | None:
    candidates = []
    try:
        candidates.append(sysconfig.get_paths()["stdlib"])
    except Exception:
        pass
    candidates.append(os.path.dirname(os.__file__))
    for path in candidates:
        if path and os.path.isdir(path):
            return path
    return None


def _module_path(stdlib: str, name: str) -> str | None:
    for path in (os.path.join(stdlib, name + ".py"), os.path.join(stdlib, name, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _calibration_files(stdlib: str):
    """CALIBRATION_MODULES in order, then every other top-level <name>.py of the stdlib, sorted."""
    seen = set()
    for name in CALIBRATION_MODULES:
        path = _module_path(stdlib, name)
        if path is not None:
            seen.add(os.path.normcase(os.path.abspath(path)))
            yield path
    try:
        names = sorted(os.listdir(stdlib))
    except OSError:
        return
    for fname in names:
        path = os.path.join(stdlib, fname)
        if fname.endswith(".py") and os.path.normcase(os.path.abspath(path)) not in seen and os.path.isfile(path):
            yield path


def _comment_text(token: str) -> str | None:
    text = token.lstrip("#").strip()
    if not any(c.isalpha() for c in text):  # separators such as "#####" or "# --"
        return None
    if text.startswith("!") or "-*-" in text:  # shebang, coding line
        return None
    return text


def _prose(source: str) -> list[str]:
    """Docstrings (module, class, function) and # comments of one source, as paragraphs in line order."""
    tree = ast.parse(source)
    items: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                items.append((node.body[0].lineno, doc.strip()))
    # Comments alone on consecutive lines form one paragraph, joined with single spaces; a comment
    # after code is a paragraph of its own.
    run: list[str] = []
    run_start = run_end = -1
    run_own_line = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = _comment_text(tok.string)
        line = tok.start[0]
        if text is None:
            continue
        own_line = tok.line.lstrip().startswith("#")
        if run and own_line and run_own_line and line == run_end + 1:
            run.append(text)
        else:
            if run:
                items.append((run_start, " ".join(run)))
            run, run_start, run_own_line = [text], line, own_line
        run_end = line
    if run:
        items.append((run_start, " ".join(run)))
    items.sort(key=lambda item: item[0])  # stable: equal lines keep discovery order
    return [text for _, text in items]


def calibration_text(n_chars: int = 60000) -> str:
    """English technical prose from the running Python's own standard library, `n_chars` long.

    Exactly what is used: the directory `sysconfig.get_paths()["stdlib"]` (or, if that is not a
    directory, the one holding `os.py`); in it, the modules of CALIBRATION_MODULES in that order
    (each `<name>.py`, or `<name>/__init__.py` for a package), then every other top-level `*.py`
    file in sorted file-name order. From each file, read with its declared encoding
    (tokenize.open) and parsed with ast, the docstrings of the module and of every class and
    function (ast.get_docstring, cleaned), and the `#` comments (the `#`s and surrounding
    whitespace removed; comments with no letter, shebangs and coding lines skipped; comments alone
    on consecutive lines joined with spaces into one paragraph, a comment after code a paragraph of
    its own), all in source-line order. Paragraphs
    are joined with blank lines ("\\n\\n"), files likewise, and the result is cut to its first
    `n_chars` characters. A file that cannot be read, decoded, parsed or tokenized is skipped.

    The result is deterministic for a given Python installation (the same version gives the same
    text). It is shorter than `n_chars` only if the whole stdlib holds less prose; it is "" if no
    stdlib is found. It never raises because of the stdlib's content.
    """
    if n_chars <= 0:
        return ""
    stdlib = _stdlib_dir()
    if stdlib is None:
        return ""
    parts: list[str] = []
    total = 0
    for path in _calibration_files(stdlib):
        try:
            with tokenize.open(path) as f:
                source = f.read()
            paragraphs = _prose(source)
        except Exception:  # SyntaxError, UnicodeDecodeError, tokenize.TokenError, OSError, ...
            continue
        for paragraph in paragraphs:
            parts.append(paragraph)
            total += len(paragraph) + 2
        if total >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars]
