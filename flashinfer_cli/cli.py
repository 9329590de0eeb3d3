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


# ---- run and chat --------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m"


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
        click.option("--verbose", is_flag=True, help="Print timings to stderr."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _fail(message: str, code: int = 1):
    click.echo(f"fic: {message}", err=True)
    sys.exit(code)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _open_engine(model: str, ctx, threads):
    from flashinfer_cli.engine import Engine

    try:
        return Engine.open(model, ctx=ctx, threads=threads)
    except Exception as exc:  # unknown model, unreadable file, bad format: one line, no traceback
        _fail(f"cannot open model {model!r}: {_one_line(exc)}")


def _answer(engine, ids, opts, verbose: bool, t_load: float) -> str:
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
    last = engine.last
    if verbose and last is not None:
        total = time.perf_counter() - t0 + t_load
        for label, value in (("total duration", f"{total:.3f}s"), ("load duration", f"{t_load * 1000:.1f}ms"),
                             ("prompt eval count", f"{last.prompt_tokens} token(s)"),
                             ("prompt eval duration", f"{last.prompt_seconds * 1000:.1f}ms"),
                             ("prompt eval rate", f"{last.prompt_tps:.2f} tokens/s"),
                             ("eval count", f"{last.generation_tokens} token(s)"),
                             ("eval duration", f"{last.decode_seconds * 1000:.1f}ms"),
                             ("eval rate", f"{last.generation_tps:.2f} tokens/s")):
            click.echo(f"{label + ':':<22}{value}", err=True)
    return text


@cli.command()
@click.argument("args", nargs=-1)
@click.option("--raw", is_flag=True, help="Send the prompt as it is (no chat template).")
@_sampling_options
def run(args, raw, verbose, system, ctx, threads, **sampling):
    """Answer one prompt: fic run [MODEL] [PROMPT]. The prompt is the arguments after MODEL, else
    all of stdin. MODEL defaults to smollm2-135m (pulled on first use); a first argument with a
    space in it that is not a directory is taken as the prompt."""
    import time
    from pathlib import Path

    args = list(args)
    model = DEFAULT_MODEL
    if args and not (" " in args[0] and not Path(args[0]).is_dir()):
        model = args.pop(0)
    if args:
        prompt = " ".join(args)
    elif sys.stdin.isatty():
        _fail("no prompt: give one after the model name or on stdin (or use `fic chat`)")
    else:
        try:
            # echo's newline is not part of the question (and changes a small model's answer)
            prompt = sys.stdin.read().rstrip("\n") if raw else sys.stdin.read().strip()
        except UnicodeDecodeError:
            _fail("stdin is not UTF-8 text")
    if not prompt.strip():
        _fail("empty prompt")
    t0 = time.perf_counter()
    engine = _open_engine(model, ctx, threads)
    t_load = time.perf_counter() - t0
    try:
        ids = engine.prompt_ids(prompt, chat=not raw, system=system)
        if len(ids) > engine.ctx:
            _fail(f"the prompt has {len(ids)} tokens, more than the context of {engine.ctx} (see --ctx)")
        _answer(engine, ids, sampling, verbose, t_load)
    except (ValueError, OSError) as exc:
        _fail(_one_line(exc))


def _chat_lines(interactive: bool):
    """User turns: readline prompts on a terminal, else one per line of stdin."""
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
                click.echo("\n(/bye or Ctrl-D leaves)")
                continue
            yield line
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@_sampling_options
def chat(model, verbose, system, ctx, threads, **sampling):
    """Talk with MODEL (default smollm2-135m). On a terminal: line editing, /bye or Ctrl-D
    leaves. Otherwise each line of stdin is one user turn of the same conversation."""
    import time

    interactive = sys.stdin.isatty()
    t0 = time.perf_counter()
    engine = _open_engine(model, ctx, threads)
    t_load = time.perf_counter() - t0
    messages = [{"role": "system", "content": system}] if system else []
    for line in _chat_lines(interactive):
        if line.strip() == "/bye":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = engine.chat_ids(messages)
            if len(ids) > engine.ctx:
                _fail(f"the conversation has {len(ids)} tokens, more than the context of {engine.ctx} (see --ctx)")
            answer = _answer(engine, ids, sampling, verbose, t_load)
        except KeyboardInterrupt:
            if not interactive:
                raise
            click.echo()
            messages.pop()
            continue
        except (ValueError, OSError) as exc:
            _fail(_one_line(exc))
        t_load = 0.0
        messages.append({"role": "assistant", "content": answer.strip()})


def main() -> None:
    try:
        cli.main(prog_name="fic", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("fic: interrupted", err=True)
        sys.exit(130)
