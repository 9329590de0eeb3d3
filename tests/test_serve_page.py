"""The chat page of `fic serve` in a real headless browser (Debian's chromium, driven by selenium):
it loads, sends a prompt, shows the streamed answer and, beside it, tokens/s, the bytes read from
flash and the active size. The model is SmolLM2-135M under a budget that streams part of its FFN
from flash every token (exact mode), so the figures show the arena at work.

A screenshot is kept at tests/artifacts/serve_page.png (ignored by git). Without chromium and its
driver the test skips on a developer's machine and fails in CI (CI=true): .ci/browser installs them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

from _server import fic_server
from flashinfer_cli import plan as planlib
from flashinfer_cli.engine import make_engine_plan

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CTX = 512
MAX_TOKENS = 24


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or a skip (a failure under CI=true) saying what is missing."""
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install '.[test]')")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None:
        missing.append("chromium")
    if driver is None:
        missing.append("chromedriver")
    if missing:
        reason = f"needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver; bash .ci/browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: the page must be tested in a browser: {reason}")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture
def browser(monkeypatch):
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    b.set_page_load_timeout(60)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture
def page_server(smollm2_model, tmp_path):
    plan, _ = make_engine_plan(smollm2_model, mem="64G", ctx=CTX)
    mem = plan.fixed_bytes + int(0.5 * plan.shape.n_experts * plan.slot_bytes) + 2 * planlib.HUGE_PAGE
    with fic_server(smollm2_model, "--ctx", str(CTX), "--mem", str(mem), env={"FIC_HOME": str(tmp_path)}) as srv:
        yield srv
    assert "Traceback" not in srv.log, srv.log


def _wait(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def test_page_streams_an_answer_with_its_figures(browser, page_server):
    import httpx
    from selenium.webdriver.common.by import By

    b = browser
    b.get(page_server.url + "/")
    header = _wait(lambda: (t := b.find_element(By.ID, "model").text) and "mode" in t and t, 30, "the server's figures")
    assert "exact mode" in header and "budget" in header
    b.find_element(By.ID, "max_tokens").clear()
    b.find_element(By.ID, "max_tokens").send_keys(str(MAX_TOKENS))
    b.find_element(By.ID, "prompt").send_keys("What is the capital of Germany?")
    b.find_element(By.ID, "send").click()
    # the answer streams in: text appears before the request is done
    answer = b.find_element(By.CSS_SELECTOR, ".turn.assistant .bubble")
    partial = _wait(lambda: answer.text, 120, "the first streamed text")
    turn = b.find_element(By.CSS_SELECTOR, ".turn.assistant")
    _wait(lambda: turn.get_attribute("data-done"), 180, "the end of the answer")
    assert turn.get_attribute("data-done") == "1", turn.text
    text = answer.text
    assert text.startswith(partial.strip()[:1]) and len(text) >= len(partial.strip())
    figures = turn.find_element(By.CSS_SELECTOR, ".figures")
    assert float(figures.get_attribute("data-tps")) > 0
    assert int(figures.get_attribute("data-bytes")) > 0          # exact mode streamed from flash
    assert float(figures.get_attribute("data-active")) == 1.0     # exact mode: every expert runs
    for label in ("tokens/s", "read from flash", "active", "experts"):
        assert label in figures.text
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    b.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 0
    # the page's answer is the API's for the same request (greedy), as the browser assembled it
    r = httpx.post(page_server.url + "/v1/chat/completions", timeout=180, json={
        "messages": [{"role": "user", "content": "What is the capital of Germany?"}], "temperature": 0,
        "max_tokens": MAX_TOKENS})
    assert r.status_code == 200
    want = r.json()["choices"][0]["message"]["content"]
    assert " ".join(text.split()) == " ".join(want.split())  # innerText folds the whitespace a browser shows
