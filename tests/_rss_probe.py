"""Run one generation under a budget and report the process's peak resident memory beyond what it
held just before the model was opened (tests/test_budget.py runs this in a subprocess).

    python _rss_probe.py MODEL '{"mem": "130M", "ctx": 1024, "mode": "exact"}' PROMPT MAX_TOKENS
prints one JSON line: {"base_rss": .., "peak_rss": .., "delta": .., "text": .., "stats": {..}}
"""
from __future__ import annotations

import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    model, opts, prompt, max_tokens = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import numpy  # noqa: F401  (imports are the interpreter's, not the engine's)
    from flashinfer_cli import kernels
    from flashinfer_cli.engine import Engine  # noqa: F401
    from flashinfer_cli import tokenizer  # noqa: F401

    kernels.get_threads()  # the pool exists before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _status("VmRSS")
    engine = Engine.open(model, auto_pull=False, **opts)
    texts = list(engine.generate(prompt, max_tokens=max_tokens))
    texts += list(engine.generate(prompt + " Answer briefly.", max_tokens=max_tokens))
    peak = _status("VmHWM")
    print(json.dumps({"workspace_grows": kernels.workspace_grows() + kernels.attention_ws_growths(), "base_rss": base, "peak_rss": peak, "delta": peak - base, "text": "".join(texts),
                      "stats": engine.stats(), "planned": engine.plan.total_bytes}))


if __name__ == "__main__":
    main()
