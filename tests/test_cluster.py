"""Clustered and shared experts (cluster.py) on tiny random checkpoints.

References: transformers (torch CPU) for logits, with inactive neurons masked in torch for prune
mode; the checkpoint's own weights (numpy) for the permutation. rel = max |fic - ref| / max |ref|
over every logit of a 40-token sequence.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import TEXT, VOCAB, make_checkpoint  # noqa: E402
from flashinfer_cli import cluster, fmt, kernels  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.engine import Engine  # noqa: E402
from flashinfer_cli.model import Model  # noqa: E402
from flashinfer_cli.plan import ModelShape, PlanRequest, make_plan  # noqa: E402

IDS = [int(i) for i in np.random.default_rng(0).integers(0, VOCAB, 40)]
SIZE = 16      # expert size: the tiny FFN's 128 neurons are 8 experts
TOKENS = 200   # calibration tokens (of _tiny.TEXT)


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cl")
    hf = make_checkpoint("llama", root / "hf")
    return root, hf


def converted(root: Path, quant: str, layout: str, size: int = SIZE) -> Path:
    dest = root / f"fic-{quant}-{layout}-{size}"
    if not dest.exists():
        convert(root / "hf", dest, name="tiny", options=ConvertOptions(quant=quant, expert_size=size, down_layout=layout),
                progress=False)
    return dest


def clustered(root: Path, src: Path, shared: float, seed: int = 0) -> Path:
    dest = root / f"{src.name}-c{shared}-s{seed}"
    if not dest.exists():
        cluster.cluster_model(src, dest, shared, seed, n_tokens=TOKENS, text=TEXT)
    return dest


def logits(path: Path) -> np.ndarray:
    m = Model(path, ctx=64, kv_dtype="f32")
    try:
        return m.forward(IDS, all_logits=True)
    finally:
        m.close()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---- the permutation is lossless ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_clustered_f32_gives_the_full_models_logits(tiny, layout, shared):
    root, hf = tiny
    src = converted(root, "f32", layout)
    out = clustered(root, src, shared)
    got, before, ref = logits(out), logits(src), hf_logits(hf, IDS)
    assert rel(got, before) < 1e-5  # only the order of fp32 sums differs
    assert rel(got, ref) < 1e-4     # as test_model's f32 parity
    man = fmt.parse_manifest(out / fmt.MANIFEST_FILE)
    assert man.shared_neurons == [int(shared * 128)] * 2


def test_clustered_q8_rows_keeps_every_weight_byte(tiny):
    """Quantized gate/up rows and rows-layout down are permuted as whole rows: the same bytes."""
    root, _ = tiny
    src = converted(root, "q8_0", "rows")
    out = clustered(root, src, 0.25)
    assert rel(logits(out), logits(src)) < 1e-5
    with fmt.ModelReader(src) as a, fmt.ModelReader(out) as b:
        for layer in range(2):
            order = b.neuron_order(layer)
            for part in ("gate", "up", "down"):
                old = np.concatenate([getattr(x, part).data.reshape(x.n_neurons, -1) for x in cluster._read_layer(a, layer)])
                new = [getattr(x, part).data.reshape(x.n_neurons, -1) for x in cluster._read_layer(b, layer)]
                sh = b.dense_tensor(fmt.shared_names(layer)[("gate", "up", "down").index(part)])
                new = np.concatenate([sh.data.reshape(sh.shape[0], -1)] + new)
                assert np.array_equal(new, old[order])


def test_neuron_order_matches_the_checkpoint(tiny):
    """Bundle neuron j's gate row is the checkpoint's gate row order[j] (numpy on the HF weights)."""
    root, hf = tiny
    out = clustered(root, converted(root, "f32", "rows"), 0.25)
    with fmt.ModelReader(out) as r:
        for layer in range(2):
            order = r.neuron_order(layer)
            assert sorted(order.tolist()) == list(range(128))
            sh = kernels.dequantize(r.dense_tensor(fmt.shared_names(layer)[0]))
            gate = np.concatenate([sh] + [kernels.dequantize(b.gate) for b in cluster._read_layer(r, layer)])
            want = hf.model.layers[layer].mlp.gate_proj.weight.detach().numpy()[order]
            assert np.array_equal(gate, want)


def test_columns_down_is_requantized_and_measured(tiny):
    """Quantized columns-layout down: a neuron's weights sit inside blocks that span neurons, so the
    permutation requantizes down; the change is measured and noted, the logits move by about that."""
    root, _ = tiny
    src = converted(root, "q8_0", "columns", 32)
    res = cluster.cluster_model(src, root / "q8col-c", 0.25, 0, n_tokens=TOKENS, text=TEXT)
    assert res.down_requantized and 0 < res.down_rel_rms < 1e-2  # q8_0 twice: measured ~5e-3
    man = fmt.parse_manifest(res.path / fmt.MANIFEST_FILE)
    assert any("requantized" in n for n in man.notes)
    assert rel(logits(res.path), logits(src)) < 3e-2  # measured ~6e-3


def _down_per_layer(src: Path, dest: Path, fmts: list[str]) -> Path:
    """src (columns down) rewritten with ffn_down in fmts[layer] (a Q4_K_M file's mixed down, in
    formats fic can quantize to), everything else as it is."""
    from flashinfer_cli.convert import as_float, column_slice, to_qtensor

    with fmt.ModelReader(src) as r:
        man = r.manifest
        lay = fmt.ExpertLayout.per_layer(man.expert_layout.d_model, man.expert_layout.gate_fmt,
                                         man.expert_layout.up_fmt, fmts, "columns")
        with fmt.ModelWriter(dest, name=man.name, arch=man.arch, layout=lay, provenance=man.provenance,
                             tokenizer={k: v for k, v in man.tokenizer.items() if k != "files"}) as w:
            for name, value in r.dense().items():
                if not name.endswith(".ffn_neuron_order"):
                    w.add_dense(name, value)
            for layer in range(len(man.experts)):
                keys = [(layer, e) for e in range(len(man.experts[layer]))]
                bundles = r.read_bundles(keys, [kernels.aligned_buffer(r.bundle_bytes(*k)) for k in keys])
                full = to_qtensor(np.concatenate([as_float(b.down) for b in bundles], axis=1), fmts[layer])
                start = 0
                for b in bundles:
                    w.add_expert(layer, b.gate, b.up, column_slice(full, start, start + b.n_neurons))
                    start += b.n_neurons
                w.set_neuron_order(layer, r.neuron_order(layer))
            for name in man.tokenizer.get("files", []):
                w.add_file(src / name, name)
    return dest


def test_down_formats_per_layer_survive_clustering(tiny):
    """A model whose ffn_down format differs by layer (version 5) clusters layer by layer: each
    layer's down requantized in its own format, the list kept, the note naming both."""
    root, _ = tiny
    src = _down_per_layer(converted(root, "q8_0", "columns", 32), root / "mixed-down", ["q8_0", "q4_0"])
    assert fmt.parse_manifest(src / fmt.MANIFEST_FILE).expert_layout.down_fmts == ("q8_0", "q4_0")
    res = cluster.cluster_model(src, root / "mixed-down-c", 0.25, 0, n_tokens=TOKENS, text=TEXT)
    man = fmt.parse_manifest(res.path / fmt.MANIFEST_FILE)
    assert man.expert_layout.down_fmts == ("q8_0", "q4_0")
    assert any("inside q4_0/q8_0 blocks: down requantized to q4_0/q8_0" in n for n in man.notes), man.notes
    assert res.down_requantized and 0 < res.down_rel_rms < 0.1  # q4_0 of q4_0 values, permuted: measured 5.2e-2
    assert rel(logits(res.path), logits(src)) < 0.1  # about the weights' change: measured 6.2e-2


# ---- the clusters ----------------------------------------------------------------------------

def test_balanced_clusters_are_a_balanced_permutation_and_find_planted_groups():
    rng = np.random.default_rng(1)
    n_groups, size, n_tok = 6, 8, 400
    on = rng.random((n_tok, n_groups)) < 0.3               # which group fires on each token
    truth = rng.permutation(np.repeat(np.arange(n_groups), size))  # each neuron's group, shuffled
    rows = on[:, truth] * (1 + rng.random((n_tok, n_groups * size))) + 0.05 * rng.random((n_tok, n_groups * size))
    order = cluster.balanced_clusters(rows.astype(np.float32), size, seed=3)
    assert sorted(order.tolist()) == list(range(n_groups * size))
    groups = order.reshape(n_groups, size)
    purity = np.mean([np.bincount(truth[g]).max() / size for g in groups])
    assert purity == 1.0  # planted co-activation is recovered exactly
    assert np.array_equal(order, cluster.balanced_clusters(rows.astype(np.float32), size, seed=3))


def test_balanced_clusters_with_a_remainder():
    rows = np.random.default_rng(2).random((50, 37)).astype(np.float32)
    order = cluster.balanced_clusters(rows, 8, seed=0)
    assert sorted(order.tolist()) == list(range(37))
    assert list(cluster._capacities(37, 8)) == [8, 8, 8, 8, 5]


def test_plan_layer_puts_the_most_active_neurons_first():
    rows = np.random.default_rng(3).random((100, 64)).astype(np.float32)
    rows[:, [5, 40]] += 3.0  # active on every token
    plan = cluster.plan_layer(rows, 2, 2 / 64, seed=0)
    assert plan.n_shared == 2 and sorted(plan.order[:2].tolist()) == [5, 40]
    assert sorted(plan.order.tolist()) == list(range(64))


def test_deterministic_for_a_seed(tiny):
    root, _ = tiny
    src = converted(root, "f32", "rows")
    a, b = clustered(root, src, 0.25, seed=7), root / "again"
    cluster.cluster_model(src, b, 0.25, 7, n_tokens=TOKENS, text=TEXT)
    with fmt.ModelReader(a) as ra, fmt.ModelReader(b) as rb:
        for layer in range(2):
            assert np.array_equal(ra.neuron_order(layer), rb.neuron_order(layer))


# ---- shared experts --------------------------------------------------------------------------

def test_shared_experts_are_counted_in_the_dense_block(tiny):
    root, _ = tiny
    src = converted(root, "q8_0", "rows")
    out = clustered(root, src, 0.25)
    before = ModelShape.from_manifest(fmt.parse_manifest(src / fmt.MANIFEST_FILE))
    after = ModelShape.from_manifest(fmt.parse_manifest(out / fmt.MANIFEST_FILE))
    man = fmt.parse_manifest(out / fmt.MANIFEST_FILE)
    shared_bytes = sum(fmt._tensor_nbytes(man.tensors[n]) for l in range(2) for n in fmt.shared_names(l))
    assert shared_bytes > 0
    assert after.experts_per_layer == [6, 6] and before.experts_per_layer == [8, 8]
    # the dense block grows by the shared bytes (up to its 64-byte group alignment)
    assert 0 <= after.dense_bytes - before.dense_bytes - shared_bytes < 64 * 4
    assert after.bundle_bytes_total < before.bundle_bytes_total
    assert after.shared_neurons == 32
    lines = make_plan(after, PlanRequest(ctx=64)).lines()  # what `fic show` prints
    assert any(l.startswith("shared experts") and "32 neurons" in l for l in lines)


def _masked_hf(hf, keep: list[np.ndarray]):
    """A copy of the torch model whose FFN neurons outside keep[layer] are off (gate row zeroed:
    silu(0) = 0, so the neuron adds nothing)."""
    import copy

    m = copy.deepcopy(hf)
    with torch.no_grad():
        for layer, k in enumerate(keep):
            w = m.model.layers[layer].mlp.gate_proj.weight
            mask = torch.zeros(w.shape[0], dtype=torch.bool)
            mask[torch.as_tensor(k)] = True
            w[~mask] = 0
    return m


def test_shared_experts_are_always_active_in_prune_mode(tiny):
    """Prune mode at a small active set: fic's logits are the model whose only FFN neurons are the
    shared ones and the active routed experts' (transformers, the others masked); the shared
    experts are never read from flash and never among the routed sets."""
    root, hf = tiny
    out = clustered(root, converted(root, "f32", "rows"), 0.25)
    eng = Engine.open(str(out), ctx=64, mode="prune", active=0.34, kv_dtype="f32")
    try:
        eng.forward(IDS[:20])  # the prompt chooses the sets
        m = eng.model
        assert m.runner.prune and all(len(a) == 2 for a in m.runner.active)  # 2 of 6 routed experts
        keep = []
        with fmt.ModelReader(out) as r:
            for layer in range(2):
                order = r.neuron_order(layer)
                routed = np.concatenate([32 + 16 * e + np.arange(16) for e in m.runner.active[layer]])
                keep.append(order[np.concatenate([np.arange(32), routed])])
        before = m.arena.stats()["total"]["misses"]
        m.reset()
        got = m.forward(IDS, all_logits=True)
        assert m.arena.stats()["total"]["misses"] == before  # the sets were read once, when chosen
        assert max(m.arena.n_neurons.sum(axis=1)) == 96  # the arena holds routed neurons only
    finally:
        eng.close()
    ref = hf_logits(_masked_hf(hf, keep), IDS)
    assert rel(got, ref) < 1e-4
    # and without the shared experts the output would be far off: they do run
    assert rel(got, hf_logits(_masked_hf(hf, [k[32:] for k in keep]), IDS)) > 1e-2


def test_shared_experts_with_exact_mode_streaming(tiny):
    """Exact mode under a budget that streams: the full model's logits (shared in the dense block,
    routed streamed)."""
    root, hf = tiny
    out = clustered(root, converted(root, "f32", "rows"), 0.25)
    full = Engine.open(str(out), ctx=64, kv_dtype="f32")
    want = full.plan.total_bytes - full.plan.arena_bytes  # fixed parts
    full.close()
    eng = Engine.open(str(out), ctx=64, mem=want + (1 << 20), kv_dtype="f32")  # 10 of 12 routed resident
    try:
        assert not eng.plan.all_resident and eng.plan.n_ring > 0
        got = eng.forward(IDS)
        assert eng.model.arena.stats()["total"]["streamed"] > 0
    finally:
        eng.close()
    assert rel(got, hf_logits(hf, IDS)) < 1e-4


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "abc", "nan"])
def test_shared_bad_input_is_one_line(tiny, bad):
    root, _ = tiny
    src = converted(root, "f32", "rows")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(cluster.__file__).parents[1])] + sys.path))
    p = subprocess.run([sys.executable, "-m", "flashinfer_cli.cluster", str(src), "--shared", bad, "--out",
                        str(root / "never")], capture_output=True, text=True, env=env)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and "--shared" in p.stderr and "Traceback" not in p.stderr
    assert not (root / "never").exists()
    with pytest.raises(cluster.ClusterError, match="--shared"):
        cluster.cluster_model(src, root / "never", 1.0)


def test_clustering_a_clustered_model_is_refused(tiny):
    root, _ = tiny
    out = clustered(root, converted(root, "f32", "rows"), 0.25)
    with pytest.raises(cluster.ClusterError, match="already has shared experts"):
        cluster.cluster_model(out, root / "twice", 0.1, n_tokens=TOKENS, text=TEXT)


def test_interrupted_rewrite_leaves_the_model_untouched(tiny, monkeypatch):
    root, _ = tiny
    src = converted(root, "f32", "rows")
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt.ModelWriter, "add_expert", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cluster.cluster_model(src, None, 0.25, n_tokens=TOKENS, text=TEXT)  # in place
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
