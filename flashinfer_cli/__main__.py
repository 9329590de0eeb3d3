"""`python -m flashinfer_cli` and the `fic` console script."""
import sys


def console() -> None:
    try:
        from flashinfer_cli.cli import main
    except KeyboardInterrupt:  # Ctrl-C while fic starts (importing click takes a while): nothing began
        print("fic: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


def _forget_inner_interrupts() -> None:
    """Under `python -m`, CPython ends the process by SIGINT, whatever exit code fic chose, once a
    KeyboardInterrupt has left any string exec (dataclasses and namedtuple build their methods so);
    fic handles every Ctrl-C it sees, so that mark is stale here. The start of a string exec clears
    it; one raised past this point still gets the signal's end."""
    exec("")


if __name__ == "__main__":
    try:
        console()
    finally:
        _forget_inner_interrupts()
