"""`python -m flashinfer_cli` and the `fic` console script."""
import sys


def console() -> None:
    try:
        from flashinfer_cli.cli import main
    except KeyboardInterrupt:  # Ctrl-C while fic starts (importing click takes a while): nothing began
        print("fic: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    console()
