"""fic: run language models far larger than the memory they are given."""

__version__ = "0.1.0"
