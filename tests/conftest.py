"""Shared test set-up."""
from __future__ import annotations

import os
from pathlib import Path

import flashinfer_cli

# Subprocesses (`python -m flashinfer_cli`, `python -c`) must import the same flashinfer_cli as the
# tests: the installed one, with its compiled core. Python puts the working directory first on
# sys.path for -m and -c, and from the repository root that is the source tree (no compiled core
# after a non-editable install). PYTHONSAFEPATH (3.11+) stops that; PYTHONPATH names the package the
# tests imported, so an in-place build works too.
PACKAGE_PARENT = str(Path(flashinfer_cli.__file__).resolve().parent.parent)
os.environ["PYTHONSAFEPATH"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_PARENT])
