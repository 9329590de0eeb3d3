"""fic's command line: click commands only (parse, call, print)."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import click

from flashinfer_cli import __version__
from flashinfer_cli.catalog import DEFAULT_MODEL

if TYPE_CHECKING:  # the engine (numpy, the C core) loads only when a command needs it
    from flashinfer_cli.engine import Engine


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fic")
def cli() -> None:
    """fic runs language models far larger than the memory it is given."""


@cli.command()
def info() -> None:
    """Show the kernels and the IO backend this machine gets."""
    from flashinfer_cli import kernels

    click.echo(f"fic {__version__}")
    amx = " + AMX tiles for the int8 prefill" if kernels.amx_available() else ""
    click.echo(f"kernels: {kernels.best_impl()}{amx} (available: {', '.join(kernels.available_impls())})")
    click.echo(f"threads: {kernels.get_threads()}")
    click.echo(f"weight formats: {', '.join(kernels.FORMATS)}")
    click.echo(f"io: {_io_line()}")


def _io_line() -> str:
    """How experts are read from the store's filesystem on this machine (FIC_IO can force pread)."""
    import os

    from flashinfer_cli import kernels
    from flashinfer_cli.store import fic_home

    home = fic_home()
    where = home if home.is_dir() else home.parent
    while not where.is_dir():  # the store is made on first pull: probe the nearest existing parent
        where = where.parent
    try:
        backend, direct, why = kernels.probe_io(where)
    except (OSError, NotImplementedError) as exc:  # NotImplementedError: FIC_IO=io_uring, refused
        return f"cannot probe {where}: {getattr(exc, 'strerror', None) or exc}"
    if os.environ.get("FIC_IO") and not (why or "").startswith("io_uring refused"):
        why = f"FIC_IO={os.environ['FIC_IO']}"
    return (f"{backend}{f' ({why})' if why else ''}, "
            f"{'O_DIRECT' if direct else 'page cache (no O_DIRECT on this filesystem)'}, store {home}")


# ---- the store: pull, ls, show, rm -----------------------------------------------------------

QUANT_FORMATS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q1_0")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad source, bad file, full disk) into one line, no traceback."""
    from flashinfer_cli import catalog, fmt, pull, store

    try:
        yield
    except KeyboardInterrupt:
        click.echo("fic: interrupted; no half model or partial download was left in the store", err=True)
        sys.exit(130)
    except (store.StoreError, pull.PullError, catalog.CatalogError, fmt.FormatError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}")
    except Exception as exc:
        if type(exc).__name__ == "ConvertError":  # convert.py loads lazily: match by name
            _fail(str(exc))
        raise


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@cli.command("pull")
@click.argument("source")
@click.option("--name", help="Store the model under this name (default: from the source).")
@click.option("--quant", type=click.Choice(QUANT_FORMATS), help="Format of the weights that are converted.")
@click.option("--expert-size", type=click.IntRange(1), help="FFN neurons per expert bundle.")
@click.option("--force", is_flag=True, help="Pull and convert again even if the name is in the store.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option("--calibrate", "then_calibrate", is_flag=True,
              help="Then fit the predictor for --policy sketch (`fic calibrate MODEL`: minutes, not seconds).")
def pull_cmd(source: str, name: str | None, quant: str | None, expert_size: int | None, force: bool,
             progress: bool, then_calibrate: bool) -> None:
    """Fetch SOURCE and convert it into the store.

    SOURCE: a catalog name (smollm2-135m, ...), a Hugging Face repo id (org/name), a directory in
    Hugging Face layout, or a .gguf file."""
    from flashinfer_cli.pull import pull

    with _user_errors():
        path = pull(source, name=name, quant=quant, expert_size=expert_size, force=force, progress=progress)
    if then_calibrate:
        from flashinfer_cli import calibrate

        with _user_errors():
            result = calibrate.calibrate(path, calibrate.CalibrationConfig(), progress=progress)
        click.echo(f"fic: calibrated {path.name}: predictor of {result.predictor_bytes:,} bytes in "
                   f"{result.seconds:.0f} s", err=True)
    click.echo(path)


@cli.command("ls")
@click.option("--downloads", is_flag=True, help="List the kept downloads instead of the models.")
def ls_cmd(downloads: bool) -> None:
    """List the models in the store, and what the kept downloads take."""
    from flashinfer_cli.store import Store

    store = Store()
    with _user_errors():
        if downloads:
            _list_downloads(store)
            return
        infos = store.list()
        kept = store.downloads()
    rows = [("NAME", "SIZE", "FORMAT", "SOURCE")]
    rows += [(i.name, _human(i.size), i.format, i.source) for i in infos]
    _print_table(rows)
    _list_catalog({i.name for i in infos})
    if kept:
        total = sum(d.size for d in kept)
        click.echo(f"\ndownloads kept for re-pulls: {len(kept)}, {_human(total)} in {store.cache_dir} "
                   "(`fic ls --downloads` lists them, `fic rm --downloads` deletes them)")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one is left as it is."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])


def _list_catalog(pulled: set[str]) -> None:
    """The catalog's models, with what each is good for, so a newcomer picks the right one."""
    from flashinfer_cli import catalog

    entries = []
    for name in catalog.names():
        try:
            entries.append(catalog.get(name))
        except catalog.CatalogError:  # a broken private entry: `fic pull` says what is wrong
            continue
    if not entries:
        return
    click.echo(f"\ncatalog (`fic run NAME` pulls on first use; the default is {DEFAULT_MODEL}):")
    rows = [("NAME", "DOWNLOAD", "", "GOOD FOR")]
    rows += [(e.name, _human(e.download_size) if e.download_size else "?", "pulled" if e.name in pulled else "",
              e.good_for or e.description) for e in entries]
    _print_table(rows)


def _list_downloads(store) -> None:
    kept = store.downloads()
    if not kept:
        click.echo(f"no downloads kept in {store.cache_dir}")
        return
    rows = [("SHA256", "SIZE", "FILE", "USED BY")]
    rows += [(d.sha256[:12], _human(d.size), ", ".join(d.files), ", ".join(d.used_by) or "-") for d in kept]
    _print_table(rows)


@cli.command("show")
@click.argument("model")
@click.option("--mem", default=None, metavar="SIZE", help="Print the memory plan for this budget (512M, 2G).")
@click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context length the plan holds.")
@click.option("--mode", type=click.Choice(["exact", "prune"]), default="exact", show_default=True)
@click.option("--active", default=None, metavar="A", help="Active fraction or parameters (prune mode).")
def show_cmd(model: str, mem: str | None, ctx: int | None, mode: str, active: str | None) -> None:
    """Describe a model: architecture, parameters, dense block, experts, quantization, and the
    memory plan (with --mem: what fits that budget)."""
    from flashinfer_cli import fmt
    from flashinfer_cli.engine import make_engine_plan
    from flashinfer_cli.pull import resolve_model
    from flashinfer_cli.store import describe

    with _user_errors():
        path = resolve_model(model, auto_pull=False)
        d = describe(path)
        try:
            plan, _ = make_engine_plan(path, mem=mem, ctx=ctx, mode=mode, active=active)
        except KeyError as exc:  # a manifest without the architecture fields a plan needs
            if mem is not None:
                raise fmt.FormatError(path, f"no memory plan: the architecture lacks {exc}") from None
            plan = None
    arch = d.arch
    click.echo(f"name            {d.name}")
    click.echo(f"path            {d.path}")
    click.echo(f"architecture    {arch.get('arch', '?')}: {arch.get('n_layers', '?')} layers, "
               f"d_model {arch.get('d_model', '?')}, d_ff {arch.get('d_ff', '?')}, "
               f"{arch.get('n_heads', '?')} heads ({arch.get('n_kv_heads', '?')} KV), "
               f"vocab {arch.get('vocab_size', '?')}, context {arch.get('max_ctx', '?')}")
    click.echo(f"parameters      {d.parameters:,} ({d.parameters / 1e6:.1f}M)")
    click.echo(f"dense block     {d.dense_bytes:,} bytes ({_human(d.dense_bytes)})")
    click.echo(f"predictor       {_predictor_line(path)}")
    click.echo(f"static scores   {_static_line(path)}")
    per_layer = sorted(set(d.experts_per_layer))
    if per_layer:
        counts = "/".join(map(str, per_layer))
        lo, hi = d.bundle_bytes[0], d.bundle_bytes[-1]  # sorted: a smaller last expert, per-layer formats
        sizes = f"{lo:,} bytes" if lo == hi else f"{lo:,} to {hi:,} bytes"
        neurons = "/".join(map(str, d.bundle_neurons))
        click.echo(f"experts         {counts} per layer x {len(d.experts_per_layer)} layers; "
                   f"bundles of {neurons} neurons, {sizes} on disk")
    else:
        click.echo("experts         none")
    quant = ", ".join(f"{f} ({t} tensors, {n / 1e6:.1f}M params)"
                      for f, (t, n) in sorted(d.formats.items(), key=lambda kv: -kv[1][1]))
    click.echo(f"quantization    {quant}")
    click.echo(f"size on disk    {_human(d.size)}")
    click.echo(f"source          {d.provenance.get('source', '-')}")
    for note in d.notes:
        click.echo(f"note            {note}")
    from flashinfer_cli import moe  # a mixture of experts: routing, total/active parameters (issue 8)
    for line in moe.show_lines(fmt.parse_manifest(path / fmt.MANIFEST_FILE)):
        click.echo(line)
    _show_profiles(path.name)
    if plan is not None:
        click.echo("memory plan")
        for line in plan.lines():
            click.echo(f"  {line}")


def _predictor_line(path) -> str:
    """The sketch policy's predictor as `fic show` reports it: size, share of the FFN, how made."""
    from flashinfer_cli import calibrate, fmt

    man = fmt.parse_manifest(path / fmt.MANIFEST_FILE)
    if man.predictor is None:
        return f"none (`fic calibrate {path.name}` fits one for --policy sketch)"
    n = fmt.predictor_bytes(man)
    ffn = calibrate.ffn_bytes(man)
    cal = man.predictor.get("calibration", {})
    return (f"{n:,} bytes ({_human(n)}, {100 * n / max(1, ffn):.1f}% of the FFN's bytes), rank {man.predictor['rank']}, "
            f"{man.predictor.get('fmt', '?')}, calibrated on {cal.get('tokens', '?')} tokens (seed {cal.get('seed', '?')})")


def _static_line(path) -> str:
    """Whether the static scores (the static and mixed policies') are stored, as `fic show` says it."""
    from flashinfer_cli import fmt, router

    if fmt.parse_manifest(path / fmt.MANIFEST_FILE).moe is not None:
        return "- (a mixture of experts: its routers score its experts)"
    scores = router.load_static(path)
    if scores is None:
        return (f"none (--policy static or mixed computes them at its first open; "
                f"`fic calibrate {path.name}` stores them)")
    return f"stored ({scores.shape[0]} layers x {scores.shape[1]} experts; --policy static, mixed, sketch-mixed)"


def _show_profiles(store_name: str) -> None:
    """The model's profiles (`--profile NAME`): its catalog entry's, else the built-in defaults."""
    from flashinfer_cli import catalog, profiles

    try:
        found = profiles.for_model(store_name)
    except catalog.CatalogError as exc:
        click.echo(f"profiles        none: {_one_line(exc)}")
        return
    where = "catalog" if catalog.has(store_name) and catalog.get(store_name).profiles else "built-in defaults"
    click.echo(f"profiles        --profile NAME ({where}; flags override a profile's values)")
    width = max(len(n) for n in found)
    for p in found.values():
        click.echo(f"  {p.name:<{width}}  {p.summary()}: {p.description}")


@cli.command("calibrate")
@click.argument("model")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the text chosen and of the model's samples.")
@click.option("--tokens", type=click.IntRange(min=64), default=None, metavar="N",
              help="Calibration tokens (default 16000).")
@click.option("--rank", type=click.IntRange(min=1), default=None, metavar="R",
              help="The predictor's rank, a multiple of 32 (default 64).")
@click.option("--format", "fmt_name", type=click.Choice(["q8_0", "f16", "f32"]), default="q8_0", show_default=True,
              help="Format of the predictor's matrices.")
@click.option("--target", type=click.Choice(["neuron", "expert"]), default="neuron", show_default=True,
              help="What the predictor predicts from each token: every neuron's activation, or each expert's norm.")
@click.option("--cluster", "do_cluster", is_flag=True,
              help="First group the FFN's neurons into experts by co-activation, with --shared of them always on.")
@click.option("--shared", type=float, default=None, metavar="F",
              help="With --cluster: the fraction of each layer's neurons kept always on (default 0.1).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
def calibrate_cmd(model: str, seed: int, tokens: int | None, rank: int | None, fmt_name: str, target: str,
                  do_cluster: bool, shared: float | None, progress: bool) -> None:
    """Fit MODEL's predictor for --policy sketch and store its static scores (--policy static,
    mixed, sketch-mixed): run it over standard-library text and its own samples, fit per
    layer a small map from the FFN's input to its activations, store it in the model (the old one
    is kept if this stops), then gather every expert's score over 4,096 tokens of calibration text. --cluster first rewrites the model's expert order
    (co-activation clusters and shared experts), since the predictor scores experts in that order."""
    from flashinfer_cli import calibrate, cluster
    from flashinfer_cli.pull import resolve_model

    if shared is not None and not do_cluster:
        _fail("--shared is a clustering option: add --cluster")
    defaults = calibrate.CalibrationConfig()
    cfg = calibrate.CalibrationConfig(seed=seed, tokens=tokens or defaults.tokens, rank=rank or defaults.rank,
                                      fmt=fmt_name, target=target)
    with _user_errors():
        path = resolve_model(model, auto_pull=False)
        if do_cluster:
            try:
                res = cluster.cluster_model(path, None, cluster.DEFAULT_SHARED if shared is None else shared, seed,
                                            progress=progress)
            except cluster.ClusterError as exc:
                _fail(str(exc))
            click.echo(f"{path.name}: neurons clustered into experts, {sum(res.shared_neurons):,} shared neurons "
                       "always on")
        result = calibrate.calibrate(path, cfg, progress=progress)
    click.echo(f"{path.name}: predictor of rank {cfg.rank} ({cfg.fmt}), {result.predictor_bytes:,} bytes "
               f"({100 * result.share_of_ffn:.1f}% of the FFN), {result.n_tokens} tokens in {result.seconds:.0f} s")
    click.echo("  calibration tokens per domain: " + ", ".join(f"{d} {n}" for d, n in result.domain_tokens.items()))
    click.echo(f"  static scores (--policy static, mixed) from {result.static_tokens:,} tokens in {result.static_seconds:.0f} s"
               if result.static_tokens else "  static scores not stored: the model's context is shorter than a window")
    for q in result.held_out:
        recall = ", ".join(f"{k}: {v:.3f}" for k, v in q.mass_recall.items())
        click.echo(f"  held-out {q.domain:<6} score mass kept at active {recall}; R^2 {q.r2:.3f} "
                   f"(experts' norms {q.r2_expert:.3f})")


@cli.command("rm")
@click.argument("models", nargs=-1)
@click.option("--downloads", is_flag=True,
              help="Delete the kept downloads too (a later re-pull downloads again).")
def rm_cmd(models: tuple[str, ...], downloads: bool) -> None:
    """Remove models from the store (and, with --downloads, the source files kept for re-pulls)."""
    from flashinfer_cli.store import Store

    if not models and not downloads:
        _fail("nothing to remove: name the models, or give --downloads")
    store = Store()
    with _user_errors():
        for name in models:
            store.remove(name)
            click.echo(f"deleted '{name}'")
        if downloads:
            freed = store.remove_downloads()
            click.echo(f"deleted the kept downloads ({_human(freed)})")

@cli.command("synth")
@click.argument("name")
@click.option("--params", default=None, metavar="N", help="Parameters in all (20B, 50M). Default: 20B; "
              "with --dense, Bonsai-8B's shape exactly.")
@click.option("--quant", default="q1_0", show_default=True, metavar="[q1_0|q4_0]", help="Format of every matrix.")
@click.option("--layers", type=int, default=None, help="Layers (default: fitted to --params).")
@click.option("--experts", type=int, default=None, help="Routed experts per layer (default 64).")
@click.option("--top-k", type=int, default=None, help="Experts per token (default 8).")
@click.option("--shared", type=int, default=None, help="Shared experts per layer (default 2).")
@click.option("--dense", is_flag=True, help="A dense model of Qwen3-8B's (Bonsai-8B's) proportions.")
@click.option("--vocab", type=int, default=None, help="Vocabulary size (default 151936, Qwen3's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights.")
@click.option("--force", is_flag=True, help="Replace a model of that name.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
def synth_cmd(name, params, quant, layers, experts, top_k, shared, dense, vocab, seed, force, progress) -> None:
    """Write NAME into the store: random weights in the shape of a large model (a mixture of
    experts of Qwen3-30B-A3B's proportions, or --dense, Bonsai-8B's), to measure speed at scale.
    Routing on random weights says nothing of quality; it measures speed."""
    import time

    from flashinfer_cli import synth

    with _user_errors():
        synth.check_new(name, force)
        if dense and any(v is not None for v in (experts, top_k, shared)):
            raise synth.SynthError("--experts, --top-k and --shared describe a mixture of experts; --dense has none")
        shape = synth.derive_shape(
            synth.parse_params(params) if params is not None else None, dense=dense, layers=layers,
            experts=64 if experts is None else experts, top_k=8 if top_k is None else top_k,
            shared=2 if shared is None else shared, quant=quant, vocab=synth.VOCAB if vocab is None else vocab)
        for line in shape.lines():
            click.echo(line)
        t0 = time.perf_counter()
        path = synth.synthesize(name, shape, seed=seed, force=force, progress=progress)
    click.echo(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


# ---- run and chat --------------------------------------------------------------------------


def _sampling_options(f):
    """The generation options `run` and `chat` share."""
    opts = [
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 is greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Keep the k most probable tokens (0: off)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
                     help="Keep the smallest set of tokens whose probability reaches p (1: off)."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.0,
                     help="Drop tokens less probable than min-p times the most probable (0: off)."),
        click.option("--seed", type=int, default=None, help="Seed of the sampler."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True),
        click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context length (KV cache)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Kernel threads (default: all cores)."),
        click.option("--system", default=None, help="System message."),
        click.option("--verbose", is_flag=True, help="Print timings and the arena's statistics to stderr."),
    ] + _budget_options()
    for opt in reversed(opts):
        f = opt(f)
    return f


POLICY_CHOICES = ("exact", "static", "router", "sketch", "mixed", "sketch-mixed")


def _budget_options(lists: str = "") -> list:
    """The memory budget and selection options `run`, `chat` (and, in part, `show`) share. lists:
    `bench` takes comma lists of --mem, --active and --policy (this says when); each item is then
    checked by _engine_options as run's one value is."""
    many = f" Comma-separated with {lists}." if lists else ""
    return [
        click.option("--mem", default=None, metavar="SIZE",
                     help="Memory budget for everything the engine holds (512M, 2G). Default: everything "
                          "resident when the machine has room." + many),
        click.option("--mode", type=click.Choice(["exact", "prune"]), default="exact", show_default=True,
                     help="exact: the full model's answer; prune: only each prompt's active experts run."),
        click.option("--active", default=None, metavar="A",
                     help="Active experts: a fraction of each layer's (0.5), active parameters (300M), or auto[:T] "
                          "(prune mode: per prompt and layer, the fewest experts holding T of the selection's "
                          "score mass, default 0.9). Default: the largest that fits." + many),
        click.option("--policy", type=click.STRING if lists else click.Choice(list(POLICY_CHOICES)),
                     default=None, metavar="[" + "|".join(POLICY_CHOICES) + "]" if lists else None,
                     help="How experts are chosen: exact, from the prompt's activations; static, one set from "
                          "calibration text; sketch, the calibrated predictor's guess from each layer's input "
                          "(`fic calibrate`), never reading the experts it rejects (a mixture of experts: router); "
                          "mixed / sketch-mixed: exact's / sketch's prompt scores averaged with static's. "
                          "Default: exact (router for a mixture of experts)."
                          + many),
        click.option("--prefill", type=click.Choice(["pruned", "full"]), default=None,
                     help="--policy sketch or sketch-mixed: pruned chooses each layer's set from the pruned "
                          "model's own hidden states and reads only the chosen experts; full reads every expert "
                          "once while the prompt runs, then chooses (the default)."),
        click.option("--reselect", type=click.IntRange(min=0), default=None, metavar="N",
                     help="Rescore the active sets every N generated tokens (0: never)."),
        click.option("--profile", default=None, metavar="NAME",
                     help="A use case's settings from the model's profiles (`fic show MODEL` lists them: chat, "
                          "code, ...); --mode, --active, --reselect and --ctx given here override it."),
    ]


def _with_budget_options(f):
    for opt in reversed(_budget_options()):
        f = opt(f)
    return f


def _engine_options(opts: dict) -> dict:
    """The engine's options out of a command's parameters, --mem and --active checked here so a
    typo reads as what it is, not as a model that cannot be opened."""
    from flashinfer_cli import plan

    out = {k: opts.pop(k) for k in ("mem", "mode", "active", "policy", "reselect", "prefill")}
    name = opts.pop("profile", None)
    if name is not None:  # applied by _open_engine once the model (and so its profiles) is known
        ctx = click.get_current_context()
        given = {k for k in ("mode", "active", "reselect", "ctx")
                 if k in ctx.params and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
        out["profile"] = ProfileChoice(name, frozenset(given))
    try:
        if out["mem"] is not None:
            plan.parse_size(out["mem"])
        plan.parse_active(out["active"])
    except ValueError as exc:
        _fail(_one_line(exc))
    return out


@dataclass(frozen=True)
class ProfileChoice:
    """--profile NAME and the options the command line gave, which the profile does not override."""

    name: str
    given: frozenset


def _apply_profile(path, choice: ProfileChoice, options: dict, ctx, verbose: bool):
    """Options (in place) and ctx with the model's profile's values where no flag gave one."""
    from flashinfer_cli import profiles

    with _user_errors():
        prof = profiles.get(path.name, choice.name)
    for key, value in prof.options().items():
        if key == "ctx":
            ctx = value if "ctx" not in choice.given and value is not None else ctx
        elif key not in choice.given:
            options[key] = value
    if verbose:
        click.echo(f"profile: {prof.name} ({prof.summary()}): {prof.description}", err=True)
    return ctx


def _fail(message: str, code: int = 1):
    click.echo(f"fic: {message}", err=True)
    sys.exit(code)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class OpenTimes:
    """Where the time before the first token went: fetching and converting the model (first use
    only), and opening it (dense block, arena, tokenizer)."""

    pull_seconds: float = 0.0
    load_seconds: float = 0.0


def _open_engine(model: str, ctx, threads, options: dict | None = None,
                 verbose: bool = False) -> tuple[Engine, OpenTimes]:
    import time

    from flashinfer_cli.engine import Engine
    from flashinfer_cli.plan import BudgetError
    from flashinfer_cli.pull import print_to_stderr, resolve_model

    times = OpenTimes()
    said: list[str] = []

    def log(message: str) -> None:
        said.append(message)
        print_to_stderr(message)

    t0 = time.perf_counter()
    with _user_errors():
        path = resolve_model(model, log=log)
    choice = (options or {}).pop("profile", None)
    if choice is not None:
        ctx = _apply_profile(path, choice, options, ctx, verbose)
    if said:  # it pulled or converted: report that apart from the load
        times.pull_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        engine = Engine.open(str(path), ctx=ctx, threads=threads, **(options or {}))
    except BudgetError as exc:
        _fail(_one_line(exc))
    except Exception as exc:  # unreadable file, bad format: one line, no traceback
        _fail(f"cannot open model {model!r}: {_one_line(exc)}")
    times.load_seconds = time.perf_counter() - t1
    for note in engine.notes:
        click.echo(f"fic: {note}", err=True)
    if verbose:
        for line in engine.details:
            click.echo(f"fic: {line}", err=True)
        for line in engine.plan.lines():
            click.echo(f"plan: {line}", err=True)
        click.echo(f"io: {engine.model.reader.io_description()}", err=True)
    return engine, times


def _print_stats(engine) -> None:
    from flashinfer_cli.plan import human

    st = engine.stats()
    r = st["request"]
    last = engine.last
    n_tok = max(1, last.generation_tokens) if last is not None else 1
    for label, value in (
            ("arena", f"{st['resident']} experts resident ({st['pinned']} pinned) in {st['slots']} slots of "
                      f"{human(st['slot_bytes'])}, {st['ring']} for streaming"),
            ("mode", f"{st['mode']}, policy {st['policy']}"
             + (f", prefill {st['prefill']}" if st['policy'] in ("sketch", "sketch-mixed") else "") + (f", active {st['active_fraction']:.2f}" if st["prune"] else "")
             + (f" (auto {st['active_auto']:g}: {min(st['active_per_layer'])}-{max(st['active_per_layer'])} "
                f"experts per layer)" if st.get("active_auto") is not None else "")
             + (f", reselect every {st['reselect']} tokens" if st.get("reselect") else "")),
            ("hits / misses", f"{r['hits']} / {r['misses']} ({r['streamed']} streamed, {r['evictions']} evictions)"),
            ("bytes read", f"{human(r['bytes_read'])} ({human(r['bytes_read'] / n_tok)} per token), "
                           f"{r['read_seconds'] * 1000:.1f}ms waiting"),
            ("reselections", f"{r['reselections']}")):
        click.echo(f"{label + ':':<22}{value}", err=True)
    if r.get("predicted"):  # a mixture of experts' next-layer prefetch (issue 8)
        click.echo(f"{'next-layer prefetch:':<22}{r['predicted_right']} of {r['predicted']} predicted experts routed to; "
                   f"{r['prefetched']} read ahead, {r['prefetch_used']} used, "
                   f"{r['prefetched'] - r['prefetch_used']} wasted", err=True)


def _answer(engine, ids, opts, verbose: bool, opened: OpenTimes) -> str:
    """Stream one answer to stdout; return its text."""
    import time

    t0 = time.perf_counter()
    texts = []
    sampling = {k: opts[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed")}
    try:
        for r in engine.stream(ids, **sampling):
            if r.text:
                texts.append(r.text)
                sys.stdout.write(r.text)
                sys.stdout.flush()
        text = "".join(texts)
        if not text.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`fic run ... | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except BaseException:  # the answer stops half way (a read error, Ctrl-C): end its line
        if texts and not texts[-1].endswith("\n"):
            try:
                sys.stdout.write("\n")
                sys.stdout.flush()
            except OSError:
                pass
        raise
    last = engine.last
    if verbose and last is not None:
        total = time.perf_counter() - t0 + opened.pull_seconds + opened.load_seconds
        lines = [("total duration", f"{total:.3f}s")]
        if opened.pull_seconds:
            lines.append(("pull duration", f"{opened.pull_seconds:.3f}s (fetch and convert, first use)"))
        lines.append(("load duration", f"{opened.load_seconds * 1000:.1f}ms"))
        for label, value in (*lines,
                             ("prompt eval count", f"{last.prompt_tokens} token(s)"),
                             ("prompt eval duration", f"{last.prompt_seconds * 1000:.1f}ms"),
                             ("prompt eval rate", f"{last.prompt_tps:.2f} tokens/s"),
                             ("eval count", f"{last.generation_tokens} token(s)"),
                             ("eval duration", f"{last.decode_seconds * 1000:.1f}ms"),
                             ("eval rate", f"{last.generation_tps:.2f} tokens/s")):
            click.echo(f"{label + ':':<22}{value}", err=True)
        _print_stats(engine)
    return text


def _model_and_prompt(args: list[str]) -> tuple[str, list[str]]:
    """`fic run [MODEL] [PROMPT...]`: the first argument is the model when it names one (a store or
    catalog name, a path, a repo id), else it starts the prompt; say so when a word that looks like
    a model name is taken as the prompt."""
    import difflib
    from pathlib import Path

    from flashinfer_cli import catalog
    from flashinfer_cli.pull import model_reference
    from flashinfer_cli.store import Store

    if not args:
        return DEFAULT_MODEL, args
    first = args[0]
    with _user_errors():
        store = Store()
        kind = model_reference(first, store)
        if kind is not None:
            if kind in ("store", "catalog") and Path(first).exists():
                click.echo(f"fic: {first!r} is a model name and a path here; using the model "
                           f"(./{first} for the path)", err=True)
            return first, args[1:]
        names = sorted(set(store.names()) | set(catalog.names()))
    near = []
    if " " not in first:  # a one-word first argument that is close to a model's name: a typo?
        near = [n for n in names if len(first) >= 4 and n.startswith(first.lower())] or \
            difflib.get_close_matches(first.lower(), names, n=1, cutoff=0.7)
    if near:
        click.echo(f"fic: {first!r} names no model here; taking it as the prompt to {DEFAULT_MODEL} "
                   f"(did you mean {near[0]!r}?)", err=True)
    return DEFAULT_MODEL, args


@cli.command()
@click.argument("args", nargs=-1)
@click.option("--raw", is_flag=True, help="Send the prompt as it is (no chat template).")
@_sampling_options
def run(args, raw, verbose, system, ctx, threads, **sampling):
    """Answer one prompt: fic run [MODEL] [PROMPT]. The prompt is the arguments after MODEL, else
    all of stdin. MODEL is a store or catalog name (pulled on first use), a .gguf file or a Hugging
    Face directory (converted into the store on first use), or a repo id; a first argument that
    names no model starts the prompt to the default model (`fic ls` names it)."""
    engine_opts = _engine_options(sampling)
    model, args = _model_and_prompt(list(args))
    if args:
        prompt = " ".join(args)
    elif sys.stdin.isatty():
        _fail(f"no prompt: {model!r} is the model; give the prompt after it or on stdin (or use `fic chat`)")
    else:
        try:
            # echo's newline is not part of the question (and changes a small model's answer)
            prompt = sys.stdin.read().rstrip("\n") if raw else sys.stdin.read().strip()
        except UnicodeDecodeError:
            _fail("stdin is not UTF-8 text")
    if not prompt.strip():
        _fail("empty prompt")
    engine, opened = _open_engine(model, ctx, threads, engine_opts, verbose)
    from flashinfer_cli.fmt import FormatError

    try:
        ids = engine.prompt_ids(prompt, chat=not raw, system=system)
        if len(ids) > engine.ctx:
            _fail(f"the prompt has {len(ids)} tokens, more than the context of {engine.ctx} (see --ctx)")
        _answer(engine, ids, sampling, verbose, opened)
    except (ValueError, OSError, FormatError) as exc:  # FormatError: a model file that fails its checks
        _fail(_one_line(exc))


def _chat_lines(interactive: bool, interrupted: list[bool]):
    """User turns: readline prompts on a terminal, else one per line of stdin. On a terminal a
    Ctrl-C at the prompt right after another (one that stopped an answer, or one at the prompt)
    leaves; interrupted[0] says whether the last thing was a Ctrl-C."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                if interrupted[0]:
                    click.echo()
                    return
                interrupted[0] = True
                click.echo("\n(Ctrl-C again, Ctrl-D or /bye leaves)")
                continue
            interrupted[0] = False
            yield line
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@_sampling_options
def chat(model, verbose, system, ctx, threads, **sampling):
    """Talk with MODEL (default: the default model, which `fic ls` names). On a terminal: line
    editing; Ctrl-C stops an answer; /bye, Ctrl-D or a second Ctrl-C leaves. Otherwise each line of stdin is one user turn
    of the same conversation. /clear starts a new conversation. A turn the model's files fail
    (a checksum) is said in one line and dropped; the exit status is then 1."""
    engine_opts = _engine_options(sampling)
    interactive = sys.stdin.isatty()
    engine, opened = _open_engine(model, ctx, threads, engine_opts, verbose)
    from flashinfer_cli.fmt import FormatError

    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interrupted = [False]
    failed = False
    for line in _chat_lines(interactive, interrupted):
        if line.strip() == "/bye":
            break
        if line.strip() == "/clear":  # a new conversation (the system message stays)
            messages = list(start)
            if interactive:
                click.echo("(a new conversation)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = engine.chat_ids(messages)
            if len(ids) > engine.ctx:
                _fail(f"the conversation has {len(ids)} tokens, more than the context of {engine.ctx} (see --ctx)")
            answer = _answer(engine, ids, sampling, verbose, opened)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the turn is forgotten
            if not interactive:
                raise
            click.echo()
            messages.pop()
            interrupted[0] = True
            continue
        except (FormatError, OSError) as exc:  # a model file that cannot be read or trusted now
            # (changed under us, an I/O error): this turn fails, in one line; the next may work
            click.echo(f"fic: {_one_line(exc)}", err=True)
            messages.pop()
            failed = True
            continue
        except ValueError as exc:
            _fail(_one_line(exc))
        opened = OpenTimes()  # later turns load nothing
        messages.append({"role": "assistant", "content": answer.strip()})
    if failed:
        sys.exit(1)


@cli.command("serve")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: a free one, printed at start).")
@click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context length (KV cache).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Kernel threads (default: all cores).")
@click.option("--api-key", envvar="FIC_API_KEY", default=None, metavar="KEY",
              help="Refuse requests without 'Authorization: Bearer KEY' (401). Also $FIC_API_KEY.")
@click.option("--max-waiting", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait for the engine; beyond them a 503 with Retry-After.")
@_with_budget_options
def serve_cmd(model, host, port, ctx, threads, api_key, max_waiting, **budget):
    """Serve MODEL (default: the default model, which `fic ls` names) over an OpenAI-compatible API, with a chat page at /.
    One engine and one arena for every request: each reads only what the last did not leave."""
    engine_opts = _engine_options(budget)
    try:
        from flashinfer_cli import serve as serving
    except ImportError as exc:
        _fail(f"fic serve needs uvicorn and starlette ({exc.name or exc} is missing): "
              f"pip install 'flashinfer-cli[serve]'")
    engine, _ = _open_engine(model, ctx, threads, engine_opts)
    model_id, aliases = serving.model_names(model, engine.path)
    config = serving.ServeConfig(host=host, port=port, api_key=api_key or None, max_waiting=max_waiting,
                                 model_id=model_id, aliases=aliases)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"fic: listening on {host} without --api-key: anyone who reaches it can use the model", err=True)
    try:
        serving.serve(engine, config)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        engine.close()


def _with_bench_budget(f):
    for opt in reversed(_budget_options(lists="--sweep (--mem, --active) or --quality (--active, --policy)")):
        f = opt(f)
    return f


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--quality", is_flag=True, help="Measure prune mode's quality cost against the full model instead.")
@click.option("--sweep", is_flag=True,
              help="One point per --mem x --active value (comma lists): speed, and quality on --texts texts.")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE",
              help="Prompts: one per line, or a JSON list (strings, or message lists for multi-turn). "
                   "Default: the shipped chat, long-document, code and multi-turn prompts.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Speed: tokens generated per prompt (default 64). --quality: tokens of each text, "
                   "half prompt, half continuation (default 512).")
@click.option("--runs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the prompts on one engine: run 1 is cold (a fresh arena), later runs warm.")
@click.option("--texts", "n_texts", type=click.IntRange(min=1), default=None,
              help="Quality texts to use (--quality: all of each --domains; --sweep: 2).")
@click.option("--domains", default="prose", show_default=True, metavar="LIST",
              help="--quality: the held-out texts' domains, comma-separated: prose (the 8 shipped texts), "
                   "code and docs (8 each: sources and docstrings of standard-library package modules that "
                   "calibration never reads), or all.")
@click.option("--plot", "plot_file", default=None, metavar="FILE.png",
              help="With --sweep: decode speed and continuation perplexity against active parameters "
                   "(needs matplotlib: the plot extra).")
@click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context length (KV cache).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Kernel threads (default: all cores).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--vs", "vs", default=None, metavar="llama.cpp[=PATH]",
              help="Against llama.cpp on the GGUF MODEL came from (llama-cpp-python, or a build directory's "
                   "llama-completion): a short and a --long prompt, same threads, greedy, --runs repetitions "
                   "alternated; prefill and decode tokens/s and their ratios.")
@click.option("--long", "long_tokens", type=click.IntRange(min=16), default=None,
              help="With --vs: tokens of the long prompt (default 2000).")
@_with_bench_budget
def bench(model, quality, sweep, prompts_file, max_tokens, runs, n_texts, domains, plot_file, ctx, threads, progress,
          as_json, vs, long_tokens, **budget):
    """Measure MODEL's speed under --mem/--mode/--active/--policy: per prompt and as medians, time
    to first token, prefill and decode tokens/s, expert bytes read from flash and the rate, the
    arena's hit rate (hits / (hits + misses): of every time the FFN asked for an expert, the share
    found resident), reselections and peak resident memory. --quality: for each policy and
    --active in prune mode, the continuation perplexity relative to the full model's and
    greedy-token agreement, on the texts fic ships."""
    from flashinfer_cli import bench_speed
    from flashinfer_cli.fmt import FormatError
    from flashinfer_cli.router import POLICIES

    if vs is not None:
        _bench_vs(model, vs, quality or sweep or prompts_file or plot_file or ctx or any(
            budget[k] is not None for k in ("mem", "active", "reselect", "profile")),
            threads, runs, max_tokens, long_tokens, progress, as_json)
        return
    if long_tokens is not None:
        _fail("--long sizes the long prompt of --vs")
    if domains != "prose" and not quality:
        _fail("--domains chooses --quality's texts")
    mems, actives, policies = (_comma_list(budget[k]) for k in ("mem", "active", "policy"))
    if any(p is not None and p not in POLICIES for p in policies):
        _fail(f"--policy {budget['policy']!r}: comma-separated names from {', '.join(POLICIES)}")
    if budget.get("profile") is not None and (quality or sweep):
        _fail("--profile picks one configuration; --quality and --sweep compare several (give --active lists)")
    if quality:
        if sweep or prompts_file or plot_file or runs != 1 or budget["mem"] is not None:
            _fail("--quality runs prune mode against the full model, everything resident: "
                  "--mem, --sweep, --prompts, --runs and --plot measure speed")
        _bench_quality(model, actives, policies, max_tokens or 512, n_texts, as_json, budget.get("prefill"),
                       _text_domains(domains), budget.get("reselect") or 0)
        return
    if len(policies) > 1:
        _fail(f"--policy {budget['policy']!r}: one policy per speed run (a list is for --quality)")
    if not sweep and (len(mems) > 1 or len(actives) > 1):
        _fail("a list of --mem or --active values needs --sweep")
    if plot_file and not sweep:
        _fail("--plot draws a --sweep: add --sweep with --mem and/or --active lists")
    points = [_engine_options(dict(budget, mem=m, active=a, policy=policies[0])) for m in mems for a in actives]
    try:
        if plot_file:
            bench_speed.need_matplotlib()  # before any measure
        prompts = bench_speed.load_prompts(prompts_file) if prompts_file else bench_speed.default_prompts()
    except bench_speed.BenchError as exc:
        _fail(_one_line(exc))
    max_tokens = max_tokens or bench_speed.DEFAULT_MAX_TOKENS
    if sweep:
        model = _check_sweep(model, ctx, points)
    reports = []
    for i, opts in enumerate(points, start=1):
        engine, _ = _open_engine(model, ctx, threads, opts)
        desc = f"point {i}/{len(points)}" if sweep else "bench"
        try:
            reports.append(bench_speed.measure(engine, prompts, runs=runs, max_tokens=max_tokens, mem=opts["mem"],
                                               active=opts["active"], progress=progress, desc=desc))
        except (ValueError, OSError, FormatError) as exc:  # BenchError, EngineError; FormatError: a model
            _fail(_one_line(exc))                          # file failing its checks
        finally:
            engine.close()
    if not sweep:
        _print_speed(reports[0], as_json)
        return
    sp = [bench_speed.sweep_point(r) for r in reports]
    n_q = n_texts or bench_speed.SWEEP_TEXTS
    try:
        say = (lambda s: click.echo(f"fic: quality {s}", err=True)) if progress else None
        full_ppl = bench_speed.add_quality(reports[0].path, sp, n_texts=n_q, progress=say)
    except (ValueError, OSError, FormatError) as exc:
        _fail(_one_line(exc))
    rep = bench_speed.SweepReport(reports[0].model, reports[0].machine, n_q, bench_speed.SWEEP_QUALITY_TOKENS,
                                  full_ppl, sp)
    if plot_file:
        try:
            bench_speed.plot(rep, plot_file)
        except (OSError, ValueError) as exc:
            _fail(f"--plot {plot_file}: {_one_line(exc)}")
    _emit_report(rep, as_json, f"{rep.model}: {len(sp)} points, {len(prompts)} prompts x {runs} run(s), up to "
                               f"{max_tokens} tokens; quality on {n_q} texts (full model's continuation "
                               f"perplexity {full_ppl:.2f})")
    if plot_file:
        click.echo(f"plot: {plot_file}")


def _bench_vs(model, vs, other_options, threads, runs, max_tokens, long_tokens, progress, as_json) -> None:
    """fic bench --vs: fic (everything resident) against llama.cpp on the same GGUF (peer.py)."""
    import json
    import os

    from flashinfer_cli import peer
    from flashinfer_cli.fmt import FormatError

    if other_options:
        _fail("--vs runs both engines unconstrained on its own short and --long prompts (--threads, --runs, "
              "--max-tokens); a budget against a memory cgroup is bench/compare.py's")
    try:
        spec = peer.parse_vs(vs)
        say = (lambda s: click.echo(f"fic: {s}", err=True)) if progress else None
        with _user_errors():
            report = peer.run_comparison(model, spec, threads=threads or os.cpu_count() or 1, reps=runs,
                                         max_tokens=max_tokens or peer.DEFAULT_MAX_TOKENS,
                                         long_tokens=long_tokens or peer.DEFAULT_LONG_TOKENS, say=say)
    except (ValueError, OSError, FormatError) as exc:  # CompareError, EngineError, a model failing its checks
        _fail(_one_line(exc))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
        return
    for line in report.lines():
        click.echo(line)


def _check_sweep(model: str, ctx, points: list[dict]) -> str:
    """Every point's memory plan before any is measured (a point the budget cannot hold fails
    now, not after the others ran); returns the model's directory."""
    from flashinfer_cli.engine import make_engine_plan
    from flashinfer_cli.plan import BudgetError
    from flashinfer_cli.pull import print_to_stderr, resolve_model

    with _user_errors():
        path = resolve_model(model, log=print_to_stderr)
        for opts in points:
            try:
                make_engine_plan(path, mem=opts["mem"], ctx=ctx, mode=opts["mode"], active=opts["active"])
            except BudgetError as exc:
                _fail(f"sweep point --mem {opts['mem']} --active {opts['active']}: {_one_line(exc)}")
    return str(path)


def _comma_list(value: str | None) -> list[str | None]:
    """A comma list option's items; [None] when it was not given."""
    if value is None:
        return [None]
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    return items or [None]


def _print_speed(report, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
        return
    for line in report.lines():
        click.echo(line)


def _text_domains(text: str) -> list[str]:
    """--domains: comma-separated texts.DOMAINS, or all."""
    from flashinfer_cli.texts import DOMAINS

    names = list(DOMAINS) if text.strip() == "all" else _comma_list(text)
    wrong = [d for d in names if d not in DOMAINS]
    if wrong or not names:
        _fail(f"--domains {text!r}: comma-separated names from {', '.join(DOMAINS)}, or all")
    return list(dict.fromkeys(names))


def _bench_quality(model, actives, policies, max_tokens, n_texts, as_json, prefill=None, domains=("prose",),
                   reselect=0) -> None:
    from flashinfer_cli import bench as benchlib, plan
    from flashinfer_cli.plan import parse_active

    if click.get_current_context().get_parameter_source("policy") == click.core.ParameterSource.DEFAULT:
        policies = None  # --quality compares every policy that suits the model unless told
    if max_tokens < 8:
        _fail(f"--max-tokens {max_tokens}: --quality needs at least 8 tokens per text")
    a_list = list(benchlib.ACTIVES)
    if actives != [None]:
        try:
            a_list = [parse_active(a) for a in actives]
        except ValueError as exc:
            _fail(_one_line(exc))
        if any(not isinstance(a, (float, plan.AutoActive)) for a in a_list):
            _fail(f"--active {','.join(actives)}: --quality takes fractions in (0, 1] or auto[:T]")
        a_list = [str(a) if isinstance(a, plan.AutoActive) else a for a in a_list]
    try:
        report = benchlib.quality(model, actives=a_list, policies=policies, max_tokens=max_tokens, n_texts=n_texts,
                                  prefill=prefill, domains=domains, reselect=reselect, progress=lambda s: click.echo(f"fic: measuring {s}", err=True))
    except (ValueError, OSError) as exc:
        _fail(_one_line(exc))
    _emit_report(report, as_json, f"{report.model}: {report.n_texts} texts ({', '.join(domains)}), up to "
                                  f"{report.tokens_per_text} tokens each, full model's continuation perplexity "
                                  f"{report.full_ppl:.2f}" + (f", reselect every {reselect} tokens" if reselect else "")
                                  + "; 95% range: of the geometric mean over texts")


def _emit_report(report, as_json: bool, heading: str) -> None:
    """A bench report: its JSON, or a heading and its table."""
    import json

    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
        return
    click.echo(heading)
    for line in report.table():
        click.echo(line)


def main() -> None:
    try:
        cli.main(prog_name="fic", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("fic: interrupted", err=True)
        sys.exit(130)
