"""The texts fic ships (quality texts, chat prompts) and the stdlib calibration text."""
from __future__ import annotations

import re

from flashinfer_cli import texts


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_quality_texts_load():
    qs = texts.quality_texts()
    assert len(qs) == 8
    assert [q.name for q in qs] == sorted(q.name for q in qs)
    assert len({q.name for q in qs}) == 8
    for q in qs:
        assert isinstance(q, texts.QualityText)
        n = len(q.text.split())
        assert 350 <= n <= 500, (q.name, n)
        assert q.text == q.text.strip()


def test_quality_texts_distinct():
    qs = texts.quality_texts()
    assert len({q.text for q in qs}) == len(qs)
    # no two texts share a 10-word passage
    seen: dict[tuple[str, ...], str] = {}
    for q in qs:
        w = _words(q.text)
        for i in range(len(w) - 9):
            key = tuple(w[i:i + 10])
            assert seen.setdefault(key, q.name) == q.name, (key, seen[key], q.name)


def test_prompts_parse():
    ps = texts.prompts()
    assert isinstance(ps, list) and len(ps) == 6
    ids = [p["id"] for p in ps]
    assert len(set(ids)) == len(ids)
    for p in ps:
        assert set(p) == {"id", "prompt"}
        assert isinstance(p["id"], str) and p["id"]
        assert isinstance(p["prompt"], str) and p["prompt"].strip()


def test_calibration_text_deterministic_and_sized():
    a = texts.calibration_text()
    b = texts.calibration_text()
    assert a == b
    assert len(a) == 60000
    assert a.strip()
    small = texts.calibration_text(1000)
    assert len(small) == 1000
    assert a.startswith(small)
    assert texts.calibration_text(0) == ""


def test_calibration_text_disjoint_from_quality_texts():
    cal = " ".join(_words(texts.calibration_text()))
    for q in texts.quality_texts():
        w = _words(q.text)
        for i in range(len(w) - 7):
            passage = " ".join(w[i:i + 8])
            assert passage not in cal, (q.name, passage)


def test_calibration_text_odd_stdlib(tmp_path, monkeypatch):
    # A stdlib with an unparsable file, an undecodable one and a good one: the bad ones are skipped.
    (tmp_path / "abc.py").write_text("def f(:\n    pass\n", encoding="utf-8")
    (tmp_path / "bad.py").write_bytes(b"# -*- coding: no-such-codec -*-\nx = 1\n")
    (tmp_path / "zzz.py").write_text('"""Module doc."""\n# a comment\n# goes on\nx = 1  # inline\n', encoding="utf-8")
    monkeypatch.setattr(texts, "_stdlib_dir", lambda: str(tmp_path))
    assert texts.calibration_text(1000) == "Module doc.\n\na comment goes on\n\ninline"
    monkeypatch.setattr(texts, "_stdlib_dir", lambda: None)
    assert texts.calibration_text() == ""
