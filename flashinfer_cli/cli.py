"""fic's command line: click commands only (parse, call, print)."""
from __future__ import annotations

import sys

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


def main() -> None:
    try:
        cli.main(prog_name="fic", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("fic: interrupted", err=True)
        sys.exit(130)
