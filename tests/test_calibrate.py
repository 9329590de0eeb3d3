"""Calibration and the sketch policy (issue 7): the predictor in the format, its fit, the
determinism of calibration, pruned prefill and reselection reading only what they select, and
the CLI's options and errors. Tiny random models (tests/_tiny.py): seconds, not minutes."""
from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import convert_tiny_experts, copy_model, make_checkpoint  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from flashinfer_cli import calibrate as cal, fmt, kernels, router  # noqa: E402
from flashinfer_cli.cli import cli  # noqa: E402
from flashinfer_cli.engine import Engine, EngineError  # noqa: E402

# few tokens, short windows and samples: a calibration of the tiny model takes about a second
TINY_CFG = cal.CalibrationConfig(seed=3, tokens=320, rank=32, window=64, sample_tokens=12, sample_share=0.2)
PROMPT = "The quick brown fox jumps over the lazy dog. Berlin is the capital of"


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A converted tiny model without a predictor: 8 experts of 16 neurons per layer."""
    return convert_tiny_experts(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def calibrated(plain, tmp_path_factory) -> tuple[Path, cal.CalibrationResult]:
    dest = copy_model(plain, tmp_path_factory.mktemp("calibrated"))
    return dest, cal.calibrate(dest, TINY_CFG, progress=False, held_out=1)


def _random_tensors(n_layers: int, d_model: int, d_ff: int, rank: int, seed: int, fmt_name: str) -> dict:
    rng = np.random.default_rng(seed)
    fits = [(rng.standard_normal((rank, d_model)).astype(np.float32), rng.standard_normal((d_ff, rank)).astype(np.float32),
             rng.standard_normal(d_model).astype(np.float32), rng.standard_normal(d_ff).astype(np.float32))
            for _ in range(n_layers)]
    return cal.predictor_tensors(fits, fmt_name), fits


def _raw(v) -> bytes:
    return bytes(v.data) if isinstance(v, kernels.QTensor) else np.ascontiguousarray(v).tobytes()


# ---- the format -----------------------------------------------------------------------------

def test_predictor_round_trips_through_the_format(plain, tmp_path):
    model = copy_model(plain, tmp_path)
    assert fmt.ModelReader(model).predictor() is None  # a model converted before calibration: none
    man = fmt.parse_manifest(model / fmt.MANIFEST_FILE)
    d_model, d_ff, n_layers = man.arch["d_model"], man.arch["d_ff"], man.arch["n_layers"]
    tensors, _ = _random_tensors(n_layers, d_model, d_ff, 32, 0, "q8_0")
    fmt.write_predictor(model, tensors, {"rank": 32, "fmt": "q8_0"})
    with fmt.ModelReader(model) as reader:
        back = reader.predictor()
        assert set(back) == set(tensors)
        for name, value in tensors.items():
            assert _raw(back[name]) == _raw(value), name
            assert type(back[name]) is type(value)
        assert fmt.predictor_bytes(reader.manifest) == sum(v.nbytes for v in tensors.values())
    # written again: one predictor file, the new one; the dense block's bytes unchanged
    tensors2, _ = _random_tensors(n_layers, d_model, d_ff, 32, 1, "f16")
    fmt.write_predictor(model, tensors2, {"rank": 32, "fmt": "f16"})
    assert len(list(model.glob(fmt.PREDICTOR_PREFIX + "*"))) == 1
    assert (model / fmt.DENSE_FILE).read_bytes() == (plain / fmt.DENSE_FILE).read_bytes()
    with fmt.ModelReader(model) as reader:
        assert all(_raw(reader.predictor()[n]) == _raw(v) for n, v in tensors2.items())


def test_a_damaged_predictor_is_refused_with_its_file_named(plain, tmp_path):
    model = copy_model(plain, tmp_path)
    man = fmt.parse_manifest(model / fmt.MANIFEST_FILE)
    tensors, _ = _random_tensors(man.arch["n_layers"], man.arch["d_model"], man.arch["d_ff"], 32, 0, "f32")
    path = fmt.write_predictor(model, tensors, {"rank": 32, "fmt": "f32"})
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    with fmt.ModelReader(model) as reader, pytest.raises(fmt.FormatError, match=path.name):
        reader.predictor()


def _lines_of(fn) -> tuple:
    code = fn.__code__
    return code, sorted({line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno})


def test_write_predictor_interrupted_at_any_line_leaves_the_old_or_the_new(plain, tmp_path):
    """A Ctrl-C between any two statements of write_predictor (a trace function raises it): the
    model opens with its old predictor or the new one, whole, and no temporary file stays."""
    model = copy_model(plain, tmp_path)
    man = fmt.parse_manifest(model / fmt.MANIFEST_FILE)
    shape = (man.arch["n_layers"], man.arch["d_model"], man.arch["d_ff"])
    old, _ = _random_tensors(*shape, 32, 0, "q8_0")
    new, _ = _random_tensors(*shape, 32, 1, "q8_0")
    fmt.write_predictor(model, old, {"rank": 32})
    code, lines = _lines_of(fmt.write_predictor)
    seen = {"old": 0, "new": 0}
    for line in lines:
        armed = [True]

        def local(frame, event, arg, line=line):
            if armed[0] and event == "line" and frame.f_lineno == line:
                armed[0] = False
                raise KeyboardInterrupt
            return local

        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
        try:
            fmt.write_predictor(model, new, {"rank": 32})
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        with fmt.ModelReader(model) as reader:
            got = reader.predictor()
        which = "new" if all(_raw(got[n]) == _raw(v) for n, v in new.items()) else "old"
        assert all(_raw(got[n]) == _raw(v) for n, v in (new if which == "new" else old).items()), line
        seen[which] += 1
        assert not [p for p in model.iterdir() if p.name.startswith(".tmp")], line
        fmt.write_predictor(model, old, {"rank": 32})  # back to the old one for the next line
    assert seen["old"] and seen["new"], seen


# ---- the fit and the prediction -------------------------------------------------------------

def test_full_rank_fit_is_least_squares():
    """With the rank of the whole map and no ridge to speak of, the reduced-rank ridge fit is the
    ordinary least squares fit with an intercept (numpy.linalg.lstsq)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)).astype(np.float32)
    y = (x @ rng.standard_normal((12, 40)) + 0.1 * rng.standard_normal((500, 40)) + 0.5).astype(np.float32)
    st = cal.RidgeStats(12, 40)
    st.add(x[:200], y[:200])
    st.add(x[200:], y[200:])
    a, b, mu_x, mu_y = st.fit(rank=12, ridge=1e-9)
    ours = (x - mu_x) @ a.T @ b.T + mu_y
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((500, 1), np.float32)]).astype(np.float64), y.astype(np.float64),
                               rcond=None)
    ref = np.hstack([x, np.ones((500, 1))]) @ coef
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_reduced_rank_fit_keeps_the_leading_directions():
    """y of rank 3 plus noise: a rank-32 fit of 64 outputs explains it almost whole (R^2 > 0.95
    against the noise's ceiling), a rank-1 fit clearly less."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 48)).astype(np.float32)
    w = rng.standard_normal((48, 3)) @ rng.standard_normal((3, 64))
    y = (x @ w + 0.05 * rng.standard_normal((2000, 64))).astype(np.float32)
    st = cal.RidgeStats(48, 64)
    st.add(x, y)

    def r2(rank):
        a, b, mx, my = st.fit(rank, 1e-6)
        pred = (x - mx) @ a.T @ b.T + my
        return 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()

    assert r2(32) > 0.95
    assert r2(1) < r2(32) - 0.1


def test_reduced_rank_ridge_fit_matches_a_direct_svd():
    """The fit (whitened through L^-1, one product of Cxy) against the textbook route in numpy:
    W = (Cxx + lam I)^-1 Cxy, the full SVD of L^T W, W projected on its top-r right singular
    vectors. A strong ridge and a spectrum with a gap after r (subspace iteration converges):
    the rank-r maps agree to 1e-4 of their scale (measured 2e-7; rank r+1 would be 4e-4 off)."""
    rng = np.random.default_rng(5)
    d_in, d_out, rank, ridge = 40, 300, 8, 0.1
    x = (rng.standard_normal((3000, d_in)) * np.linspace(0.2, 3, d_in)).astype(np.float32)
    w_true = rng.standard_normal((d_in, rank)) @ rng.standard_normal((rank, d_out)) * 3
    y = (x @ w_true + rng.standard_normal((3000, d_out)) + 1.0).astype(np.float32)
    st = cal.RidgeStats(d_in, d_out)
    for i in range(0, 3000, 700):
        st.add(x[i:i + 700], y[i:i + 700])
    a, b, mu_x, mu_y = st.fit(rank, ridge)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    mx, my = xd.mean(0), yd.mean(0)
    cxx = (xd - mx).T @ (xd - mx) / len(xd)
    cxy = (xd - mx).T @ (yd - my) / len(xd)
    reg = cxx + ridge * np.trace(cxx) / d_in * np.eye(d_in)
    w = np.linalg.solve(reg, cxy)
    _, _, vt = np.linalg.svd(np.linalg.cholesky(reg).T @ w, full_matrices=False)
    ref = w @ vt[:rank].T @ vt[:rank]                     # (d_in, d_out)
    ours = a.T.astype(np.float64) @ b.T.astype(np.float64)
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.allclose(mu_x, mx, atol=1e-5) and np.allclose(mu_y, my, atol=1e-4)


@pytest.mark.parametrize("spread", [1.0, 1e6, 1e12])
def test_orthonormal_columns_span_what_numpy_qr_spans(spread):
    """Cholesky QR twice against numpy's Householder QR: orthonormal columns (to 1e-10) with the
    same span (projectors within 1e-8), from well-conditioned columns to columns 1e12 apart in
    scale (beyond CholQR2's reach: the Householder fallback)."""
    rng = np.random.default_rng(int(np.log10(spread)))
    q = rng.standard_normal((300, 24)) * np.geomspace(1, 1 / spread, 24)
    ours = cal.orthonormal_columns(q)
    ref = np.linalg.qr(q)[0]
    assert np.abs(ours.T @ ours - np.eye(24)).max() < 1e-10
    assert np.abs(ours @ ours.T - ref @ ref.T).max() < 1e-8


def test_predictor_predicts_as_numpy_does():
    """router.Predictor (matrices through the kernels) against the formula in numpy: f32 to
    float rounding; q8_0 within its quantization error (measured here: under 2% of the output's scale)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 64)).astype(np.float32)
    for fmt_name, tol in (("f32", 1e-4), ("q8_0", 2e-2)):
        tensors, fits = _random_tensors(2, 64, 96, 32, 3, fmt_name)
        pred = router.Predictor(tensors, 2)
        for layer, (a, b, mx, my) in enumerate(fits):
            ref = (x - mx) @ a.T.astype(np.float64) @ b.T.astype(np.float64) + my
            got = pred.predict(layer, x)
            assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), fmt_name


# ---- calibration ----------------------------------------------------------------------------

def test_calibration_is_deterministic_for_a_seed(calibrated, plain, tmp_path):
    model, first = calibrated
    with fmt.ModelReader(model) as reader:
        stored = {n: _raw(v) for n, v in reader.predictor().items()}
    again = copy_model(plain, tmp_path)
    cal.calibrate(again, TINY_CFG, progress=False, held_out=0)
    with fmt.ModelReader(again) as reader:
        assert {n: _raw(v) for n, v in reader.predictor().items()} == stored
    other = tmp_path / "other"
    shutil.copytree(plain, other)
    cal.calibrate(other, cal.CalibrationConfig(**{**TINY_CFG.__dict__, "seed": 4}), progress=False, held_out=0)
    with fmt.ModelReader(other) as reader:
        assert {n: _raw(v) for n, v in reader.predictor().items()} != stored
    assert first.n_tokens == TINY_CFG.tokens


def test_calibration_text_mixes_the_domains(plain):
    eng = Engine.open(str(plain), ctx=256)
    try:
        windows = cal.token_windows(eng, TINY_CFG)
    finally:
        eng.close()
    assert {d for d, _ in windows} == set(cal.DOMAINS)
    assert sum(len(w) for _, w in windows) == TINY_CFG.tokens
    assert all(0 < len(w) <= TINY_CFG.window for _, w in windows)


def test_activation_rows_are_the_normalised_activations(plain):
    """activation_rows' y against numpy: |silu(x Wg) * (x Wu)| / its L2 norm from the model's
    own dequantized weights (f32 model), with x the FFN input the hook saw."""
    eng = Engine.open(str(plain), ctx=256)
    try:
        ids = eng.tokenize(PROMPT)[:20]
        got = list(cal.activation_rows(eng, [ids]))
        reader = eng.model.reader
        assert [l for l, _, _ in got] == list(range(eng.model.config.n_layers))
        for layer, x, y in got:
            rows = []
            for e in range(int(eng.model.arena.experts_per_layer[layer])):
                buf = kernels.aligned_buffer(reader.bundle_bytes(layer, e))
                b = reader.read_bundles([(layer, e)], [buf])[0]
                g, u = kernels.dequantize(b.gate).astype(np.float64), kernels.dequantize(b.up).astype(np.float64)
                gx = x.astype(np.float64) @ g.T
                rows.append(gx / (1 + np.exp(-gx)) * (x.astype(np.float64) @ u.T))
            h = np.abs(np.hstack(rows))
            ref = h / np.linalg.norm(h, axis=1, keepdims=True)
            assert x.shape == (len(ids), eng.model.config.d_model)
            assert np.abs(y - ref).max() < 1e-4
    finally:
        eng.close()


def test_held_out_quality_is_reported_per_domain(calibrated):
    _, result = calibrated
    assert [q.domain for q in result.held_out] == list(cal.DOMAINS)
    for q in result.held_out:
        assert q.tokens > 0
        assert all(0 < v <= 1.0 + 1e-9 for v in q.mass_recall.values())
    assert 0 < result.predictor_bytes < result.ffn_bytes


# ---- the sketch policy ----------------------------------------------------------------------

class ReadLog:
    """Every (layer, expert) the model's reader is asked for, in order."""

    def __init__(self, reader):
        self.keys: list[tuple[int, int]] = []
        orig = reader.submit_bundles

        def submit(keys, dsts):
            self.keys.extend((int(l), int(e)) for l, e in keys)
            return orig(keys, dsts)

        reader.submit_bundles = submit


def _sketch(model: Path, **kw) -> Engine:
    # a budget below everything resident: nothing is read at open, every read is a prompt's
    return Engine.open(str(model), ctx=256, mem="24M", mode="prune", active=0.5, policy="sketch", **kw)


def test_pruned_prefill_never_reads_an_unselected_expert(calibrated):
    model, _ = calibrated
    eng = _sketch(model, prefill="pruned")
    try:
        assert eng.prefill == "pruned"
        m = eng.model
        assert m.arena.n_resident == 0  # a fresh engine: whatever the prompt needs is read
        log = ReadLog(m.reader)
        ids = eng.tokenize(PROMPT)
        eng.forward(ids)
        selected = {(l, int(e)) for l, s in enumerate(m.runner.active) for e in s}
        assert len(selected) == sum(eng.active_per_layer) and log.keys
        assert set(log.keys) <= selected
        assert len(log.keys) == len(set(log.keys))  # each read once
        assert eng.stats()["request"]["misses"] == len(log.keys)
        # full prefill of the same prompt reads every expert
        full = _sketch(model, prefill="full")
        flog = ReadLog(full.model.reader)
        full.forward(ids)
        assert set(flog.keys) | {(l, int(e)) for l in range(m.config.n_layers)
                                 for e in np.flatnonzero(full.model.arena.slot_of[l] >= 0)} == \
            {(l, e) for l in range(m.config.n_layers) for e in range(int(m.arena.experts_per_layer[l]))}
        full.close()
    finally:
        eng.close()


def test_pruned_prefill_sets_come_from_the_predictor(calibrated):
    """The set of layer 0 is the top-k of the predictor's scores over the prompt's FFN inputs at
    layer 0 (computed here from the recorded inputs, in numpy)."""
    model, _ = calibrated
    eng = _sketch(model, prefill="pruned")
    try:
        ids = eng.tokenize(PROMPT)
        seen = {}
        real = eng.predictor.predict

        def predict(layer, x):  # the FFN inputs the sets were chosen from
            seen.setdefault(layer, np.array(x))
            return real(layer, x)

        eng.predictor.predict = predict
        eng.forward(ids)
        pred = router.Predictor(fmt.ModelReader(model).predictor(), eng.model.config.n_layers)
        off = eng.model.scorer.offsets[0]
        n_exp = int(eng.model.arena.experts_per_layer[0])
        rows = np.maximum(pred.predict(0, seen[0]), 0).astype(np.float64)
        scores = np.add.reduceat(np.sqrt((rows ** 2).sum(0)), off[:n_exp])
        want = np.sort(np.argsort(-scores, kind="stable")[:eng.active_per_layer[0]])
        assert list(eng.model.runner.active[0]) == list(want)
    finally:
        eng.close()


def test_reselection_with_the_predictor_reads_only_changed_experts(calibrated):
    model, _ = calibrated
    eng = _sketch(model, prefill="pruned", reselect=2)
    try:
        m = eng.model
        log = ReadLog(m.reader)
        changes = []
        orig = eng._reselect

        def reselect():
            before = [set(map(int, s)) for s in m.runner.active]
            n0 = len(log.keys)
            orig()
            after = [set(map(int, s)) for s in m.runner.active]
            entered = {(l, e) for l in range(len(after)) for e in after[l] - before[l]}
            read = log.keys[n0:]
            changes.append((entered, read))
            assert set(read) <= entered  # nothing but the experts that came in
        eng._reselect = reselect
        "".join(eng.generate(PROMPT, max_tokens=9, chat=False))
        assert len(changes) >= 3
        assert eng.stats()["request"]["reselections"] == len(changes)
    finally:
        eng.close()


def test_sketch_refuses_what_it_cannot_do(plain, calibrated):
    with pytest.raises(EngineError, match="fic calibrate"):
        Engine.open(str(plain), ctx=256, mode="prune", active=0.5, policy="sketch")
    model, _ = calibrated
    with pytest.raises(EngineError, match="prune mode"):
        Engine.open(str(model), ctx=256, policy="sketch", prefill="pruned")
    with pytest.raises(EngineError, match="sketch"):
        Engine.open(str(model), ctx=256, mode="prune", active=0.5, policy="exact", prefill="pruned")


def test_sketch_full_prefill_at_active_one_is_the_full_model(calibrated):
    """Whatever the predictor says, every expert active gives the full model's logits."""
    model, _ = calibrated
    ref = Engine.open(str(model), ctx=256)
    eng = Engine.open(str(model), ctx=256, mode="prune", active=1.0, policy="sketch")
    try:
        ids = ref.tokenize(PROMPT)
        a, b = ref.forward(ids), eng.forward(ids)
        assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    finally:
        ref.close()
        eng.close()


# ---- the CLI --------------------------------------------------------------------------------

def _fic(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_sketch_and_prefill_take_effect(calibrated):
    model, _ = calibrated
    res = _fic("run", str(model), "hello", "--mode", "prune", "--active", "0.5", "--policy", "sketch",
               "--prefill", "pruned", "--max-tokens", "3", "--verbose")
    assert res.exit_code == 0, res.stderr
    assert "policy sketch" in res.stderr and "prefill pruned" in res.stderr
    res = _fic("run", str(model), "hello", "--mode", "prune", "--active", "0.5", "--policy", "sketch",
               "--prefill", "full", "--max-tokens", "3", "--verbose")
    assert res.exit_code == 0, res.stderr
    assert "prefill full" in res.stderr
    show = _fic("show", str(model))
    assert show.exit_code == 0 and "predictor" in show.output and "% of the FFN" in show.output


@pytest.mark.parametrize("args, says", [
    (["run", "{plain}", "hi", "--mode", "prune", "--active", "0.5", "--policy", "sketch"], "fic calibrate"),
    (["run", "{model}", "hi", "--policy", "sketch", "--prefill", "pruned"], "prune mode"),
    (["calibrate", "{plain}", "--rank", "33"], "multiple of 32"),
    (["calibrate", "{plain}", "--rank", "96"], "width"),
    (["calibrate", "/nonexistent/model"], "nonexistent"),
])
def test_cli_bad_input_is_one_line(plain, calibrated, args, says):
    model, _ = calibrated
    res = _fic(*[a.format(plain=plain, model=model) for a in args])
    assert res.exit_code != 0
    assert "Traceback" not in res.stderr and res.exception is None or isinstance(res.exception, SystemExit)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and says in lines[0], res.stderr


def test_cli_calibrate_writes_the_predictor(plain, tmp_path):
    model = copy_model(plain, tmp_path)
    res = _fic("calibrate", str(model), "--tokens", "200", "--rank", "32", "--seed", "1", "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert "rank 32" in res.output and "held-out" in res.output
    assert fmt.parse_manifest(model / fmt.MANIFEST_FILE).predictor["calibration"]["tokens"] == 200


def test_pull_calibrates_on_request(tmp_path, monkeypatch):
    """`fic pull SOURCE --calibrate` converts, then fits the predictor (default configuration);
    without the flag the model has none."""
    monkeypatch.setenv("FIC_HOME", str(tmp_path / "home"))
    # the default configuration but fewer tokens: the tiny model in seconds
    monkeypatch.setattr(cal, "CalibrationConfig",
                        functools.partial(cal.CalibrationConfig, tokens=200, window=64, sample_tokens=8))
    make_checkpoint("llama_tied", tmp_path / "hf", seed=2, n_layers=2)
    res = _fic("pull", str(tmp_path / "hf"), "--name", "plain", "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert fmt.parse_manifest(Path(res.stdout.strip().splitlines()[-1]) / fmt.MANIFEST_FILE).predictor is None
    res = _fic("pull", str(tmp_path / "hf"), "--name", "sketched", "--no-progress", "--calibrate")
    assert res.exit_code == 0, res.stderr
    pred = fmt.parse_manifest(Path(res.stdout.strip().splitlines()[-1]) / fmt.MANIFEST_FILE).predictor
    assert pred["rank"] == cal.CalibrationConfig().rank and pred["calibration"]["tokens"] > 0


def test_cli_calibrate_cluster_reorders_then_fits_and_keeps_the_model(plain, tmp_path):
    """--cluster rewrites the expert order (shared neurons first, in the dense block) before the
    predictor is fitted; the rewrite is a permutation, so at active 1 the logits are the model's."""
    model = copy_model(plain, tmp_path)
    ids = [1, 5, 9, 2, 7, 3]
    before = Engine.open(str(model), ctx=64).forward(ids)
    res = _fic("calibrate", str(model), "--cluster", "--shared", "0.25", "--tokens", "200", "--rank", "32",
               "--no-progress")
    assert res.exit_code == 0, res.stderr
    man = fmt.parse_manifest(model / fmt.MANIFEST_FILE)
    assert man.shared_neurons == [32, 32, 32]          # a quarter of 128 neurons per layer
    assert man.predictor is not None and man.predictor["calibration"]["tokens"] == 200
    after = Engine.open(str(model), ctx=64).forward(ids)
    assert np.max(np.abs(after - before)) <= 1e-4 * np.max(np.abs(before))


def test_cli_calibrate_shared_needs_cluster(plain, tmp_path):
    res = _fic("calibrate", str(copy_model(plain, tmp_path)), "--shared", "0.1", "--no-progress")
    assert res.exit_code != 0 and res.stderr.strip().count("\n") == 0 and "--cluster" in res.stderr


# ---- domain balance and the expert target (issue 7: "does not favour one domain") -------------

def test_calibration_text_gives_each_domain_its_share(plain):
    """The windows hold cfg.shares of the tokens per domain (default a third each), counted from
    the windows themselves; chat windows outside the model's own samples are a user's question in
    the chat template followed by standard-library prose, taught without decoding."""
    eng = Engine.open(str(plain), ctx=256)
    try:
        cfg = cal.CalibrationConfig(**{**TINY_CFG.__dict__, "tokens": 900, "sample_share": 0.0})
        windows = cal.token_windows(eng, cfg)
        counted = {d: sum(len(w) for dd, w in windows if dd == d) for d in cal.DOMAINS}
        assert counted == {"prose": 300, "code": 300, "chat": 300}
        assert cal.domain_tokens(windows) == counted
        taught = [w for d, w in windows if d == "chat"]
        starts = [eng.prompt_ids(q.format(topic="X"))[:3] for q in cal.CHAT_QUESTIONS]
        for w in taught:
            assert any(w[:3] == s for s in starts)   # the template's opening, then a question
            text = eng.tokenizer.decode(w)
            assert any(q.split("{topic}")[0] in text for q in cal.CHAT_QUESTIONS), text[:200]
        uneven = cal.CalibrationConfig(**{**cfg.__dict__, "shares": (0.5, 0.25, 0.25)})
        got = cal.domain_tokens(cal.token_windows(eng, uneven))
        assert got == {"prose": 450, "code": 225, "chat": 225}
    finally:
        eng.close()


def test_calibration_reports_its_domain_mix(calibrated):
    model, result = calibrated
    assert sum(result.domain_tokens.values()) == result.n_tokens == TINY_CFG.tokens
    budgets = cal.domain_budgets(TINY_CFG)
    # the model's own samples may overshoot nothing: every domain holds its budget exactly here
    assert result.domain_tokens == budgets
    meta = fmt.parse_manifest(model / fmt.MANIFEST_FILE).predictor
    assert meta["calibration"]["domain_tokens"] == result.domain_tokens
    assert "target" not in meta  # the neuron target writes no key: readers before it agree


def test_a_short_domain_is_weighed_up():
    """domain_weights gives each domain its share of the fit: weight * tokens = share * total."""
    tokens = {"prose": 100, "code": 300, "chat": 200}
    cfg = cal.CalibrationConfig()
    w = cal.domain_weights(cfg, tokens)
    assert [w[d] * tokens[d] for d in cal.DOMAINS] == pytest.approx([200.0] * 3)


def test_weighted_statistics_equal_repeated_rows():
    """add(x, y, weight=2) is the fit of x and y given twice (numpy's least squares on the
    rows repeated as the reference)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 10)).astype(np.float32)
    y = (x @ rng.standard_normal((10, 6)) + 0.3 * rng.standard_normal((300, 6))).astype(np.float32)
    st = cal.RidgeStats(10, 6)
    st.add(x[:100], y[:100], 2.0)
    st.add(x[100:], y[100:])
    a, b, mu_x, mu_y = st.fit(rank=32, ridge=1e-9)  # rank above the outputs: the full map
    assert a.shape == (32, 10) and b.shape == (6, 32)
    xs = np.vstack([x[:100], x]).astype(np.float64)
    ys = np.vstack([y[:100], y]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(np.hstack([xs, np.ones((400, 1))]), ys, rcond=None)
    ours = (x - mu_x) @ a.T.astype(np.float64) @ b.T.astype(np.float64) + mu_y
    ref = np.hstack([x, np.ones((300, 1))]) @ coef
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_expert_norms_are_the_slices_norms():
    rng = np.random.default_rng(6)
    y = np.abs(rng.standard_normal((5, 12))).astype(np.float32)
    off = np.array([0, 4, 6, 12])
    ref = np.stack([np.linalg.norm(y[:, 0:4], axis=1), np.linalg.norm(y[:, 4:6], axis=1),
                    np.linalg.norm(y[:, 6:12], axis=1)], axis=1)
    assert np.allclose(cal.expert_norms(y, off, 3), ref, rtol=1e-6)


def test_expert_target_round_trips_and_drives_the_sketch_policy(plain, tmp_path):
    """--target expert: the manifest says so, the predictor predicts one norm per expert (numpy's
    formula on the stored f32 matrices), the Scorer's rows keep each expert's norm spread over its
    neurons, and the sketch policy runs with it."""
    model = copy_model(plain, tmp_path)
    cfg = cal.CalibrationConfig(**{**TINY_CFG.__dict__, "target": "expert", "fmt": "f32"})
    result = cal.calibrate(model, cfg, progress=False, held_out=1)
    assert {q.domain for q in result.held_out} == set(cal.DOMAINS)
    man = fmt.parse_manifest(model / fmt.MANIFEST_FILE)
    assert man.predictor["target"] == "expert"
    n_exp = len(man.experts[0])
    with fmt.ModelReader(model) as reader:
        pred = router.Predictor.load(reader, man.arch["n_layers"])
        tensors = reader.predictor()
    assert pred.target == "expert"
    x = np.random.default_rng(7).standard_normal((4, man.arch["d_model"])).astype(np.float32)
    n = fmt.predictor_names(1)
    a, b, mx, my = (np.asarray(tensors[n[k]], np.float64) for k in ("a", "b", "mu_x", "mu_y"))
    ref = (x - mx) @ a.T @ b.T + my
    raw = pred.predict_raw(1, x)
    assert raw.shape == (4, n_exp) and np.abs(raw - ref).max() < 1e-4 * np.abs(ref).max()
    rows = pred.predict(1, x)
    sizes = [e.n_neurons for e in man.experts[1]]
    assert rows.shape == (4, sum(sizes))
    off = np.concatenate([[0], np.cumsum(sizes)])
    assert np.allclose(cal.expert_norms(rows, off, n_exp), np.maximum(ref, 0), rtol=1e-4, atol=1e-6)
    eng = _sketch(model)
    try:
        assert eng.predictor.target == "expert"
        out = "".join(eng.generate(PROMPT, max_tokens=3))
        assert isinstance(out, str)
    finally:
        eng.close()


def test_a_predictor_without_target_is_the_neuron_kind_and_a_bad_one_is_refused(calibrated, tmp_path):
    import json

    model = copy_model(calibrated[0], tmp_path)
    man_path = model / fmt.MANIFEST_FILE
    raw = json.loads(man_path.read_text())
    assert "target" not in raw["predictor"]            # as every predictor written before the key
    with fmt.ModelReader(model) as reader:
        assert router.Predictor.load(reader, 3).target == "neuron"
    raw["predictor"]["target"] = "bogus"
    man_path.write_text(json.dumps(raw))
    with pytest.raises(fmt.FormatError, match="target"):
        fmt.parse_manifest(man_path)


def test_cli_calibrate_target_and_domain_report(plain, tmp_path):
    model = copy_model(plain, tmp_path)
    res = _fic("calibrate", str(model), "--tokens", "240", "--rank", "32", "--target", "expert", "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert "calibration tokens per domain: prose 80, code 80, chat 80" in res.output
    assert fmt.parse_manifest(model / fmt.MANIFEST_FILE).predictor["target"] == "expert"
