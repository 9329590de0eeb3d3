"""fic's command line: click commands only (parse, call, print)."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import click

from flashinfer_cli import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fic")
def cli() -> None:
    """fic runs language models far larger than the memory it is given."""


@cli.command()
def info() -> None:
    """Show the kernels and the IO backend this machine gets."""
    from flashinfer_cli import kernels

    click.echo(f"fic {__version__}")
    click.echo(f"kernels: {kernels.best_impl()} (available: {', '.join(kernels.available_impls())})")
    click.echo(f"threads: {kernels.get_threads()}")
    click.echo(f"weight formats: {', '.join(kernels.FORMATS)}")


# ---- the store: pull, ls, show, rm -----------------------------------------------------------

QUANT_FORMATS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q1_0")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad source, bad file, full disk) into one line, no traceback."""
    from flashinfer_cli import catalog, fmt, pull, store

    try:
        yield
    except KeyboardInterrupt:
        click.echo("fic: interrupted; nothing was installed and partial downloads were removed", err=True)
        sys.exit(130)
    except (store.StoreError, pull.PullError, catalog.CatalogError, fmt.FormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise click.ClickException(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:
        if type(exc).__name__ == "ConvertError":  # convert.py loads lazily: match by name
            raise click.ClickException(str(exc)) from None
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
def pull_cmd(source: str, name: str | None, quant: str | None, expert_size: int | None, force: bool,
             progress: bool) -> None:
    """Fetch SOURCE and convert it into the store.

    SOURCE: a catalog name (smollm2-135m, ...), a Hugging Face repo id (org/name), a directory in
    Hugging Face layout, or a .gguf file."""
    from flashinfer_cli.pull import pull

    with _user_errors():
        path = pull(source, name=name, quant=quant, expert_size=expert_size, force=force, progress=progress)
    click.echo(path)


@cli.command("ls")
def ls_cmd() -> None:
    """List the models in the store."""
    from flashinfer_cli.store import Store

    with _user_errors():
        infos = Store().list()
    rows = [("NAME", "SIZE", "FORMAT", "SOURCE")]
    rows += [(i.name, _human(i.size), i.format, i.source) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])


@cli.command("show")
@click.argument("model")
def show_cmd(model: str) -> None:
    """Describe a model: architecture, parameters, dense block, experts, quantization."""
    from flashinfer_cli.pull import resolve_model
    from flashinfer_cli.store import describe

    with _user_errors():
        d = describe(resolve_model(model, auto_pull=False))
    arch = d.arch
    click.echo(f"name            {d.name}")
    click.echo(f"path            {d.path}")
    click.echo(f"architecture    {arch.get('arch', '?')}: {arch.get('n_layers', '?')} layers, "
               f"d_model {arch.get('d_model', '?')}, d_ff {arch.get('d_ff', '?')}, "
               f"{arch.get('n_heads', '?')} heads ({arch.get('n_kv_heads', '?')} KV), "
               f"vocab {arch.get('vocab_size', '?')}, context {arch.get('max_ctx', '?')}")
    click.echo(f"parameters      {d.parameters:,} ({d.parameters / 1e6:.1f}M)")
    click.echo(f"dense block     {d.dense_bytes:,} bytes ({_human(d.dense_bytes)})")
    per_layer = sorted(set(d.experts_per_layer))
    if per_layer:
        counts = "/".join(map(str, per_layer))
        sizes = ", ".join(f"{b:,} bytes" for b in d.bundle_bytes)
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


@cli.command("rm")
@click.argument("models", nargs=-1, required=True)
def rm_cmd(models: tuple[str, ...]) -> None:
    """Remove models from the store."""
    from flashinfer_cli.store import Store

    store = Store()
    with _user_errors():
        for name in models:
            store.remove(name)
            click.echo(f"deleted '{name}'")


def main() -> None:
    try:
        cli.main(prog_name="fic", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("fic: interrupted", err=True)
        sys.exit(130)
