"""A real `fic serve` process on a free loopback port, for the server's tests (test_serve.py,
test_serve_page.py): started with --port 0, its address read from the line it prints, stopped with
SIGTERM (then killed) at the end. Every wait is bounded."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

STARTUP_SECONDS = 120  # a model converted already opens in a few seconds; a busy 2-core machine is slow


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def fic_server(model: str | Path, *args: str, env: dict | None = None) -> Iterator[ServerProcess]:
    cmd = [sys.executable, "-m", "flashinfer_cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:  # the server's stderr, kept for failure messages
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving \S+ at (http://\S+) ", line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not found.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fic serve did not start (exit {proc.poll()}): {''.join(lines)}")
        yield ServerProcess(proc, url[0], lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reader.join(timeout=5)
