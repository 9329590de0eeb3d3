"""fic: run language models far larger than the memory they are given."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Engine is imported on first use: `import flashinfer_cli` stays light (no compiled module).
    if name == "Engine":
        from flashinfer_cli.engine import Engine

        return Engine
    raise AttributeError(f"module 'flashinfer_cli' has no attribute {name!r}")
