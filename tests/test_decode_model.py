"""The fused decode step on whole models (tiny random checkpoints of tests/_tiny.py): the fused
decode (Model.fused_decode, the default with the fp16 cache) against the numpy decode step on the
same model and against transformers; no workspace grows; the FFN's prepared per-layer calls follow
the arena. The block alone is tests/test_decode.py."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_cli import kernels

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import VOCAB, make_checkpoint  # noqa: E402
from flashinfer_cli.convert import ConvertOptions, convert  # noqa: E402
from flashinfer_cli.model import Model  # noqa: E402

IDS = [int(i) for i in np.random.default_rng(0).integers(0, VOCAB, 40)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (fic model dir, torch model), f32 weights."""
    root = tmp_path_factory.mktemp("dec")
    out = {}
    for kind in ("llama", "qwen2", "qwen3"):
        hf = make_checkpoint(kind, root / kind)
        dest = root / f"{kind}-fic"
        convert(root / kind, dest, name=kind, options=ConvertOptions(quant="f32", expert_size=32), progress=False)
        out[kind] = (dest, hf)
    return out


def decode_rows(m: Model, split: int) -> np.ndarray:
    m.reset()
    m.forward(IDS[:split])
    return np.stack([m.forward([t]) for t in IDS[split:]])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_decode_equals_numpy_decode_and_transformers(kind, converted):
    """Model decode (fp16 cache) fused against the numpy step on the same model: the same fp16
    cache and kernels, the sums in another order (and a k/v element's fp16 rounding may fall the
    other way): measured 4.4e-7 (llama), 8.6e-7 (qwen2), 6.0e-6 (qwen3) of the largest logit, bound
    5e-5; against transformers' fp32 logits within four fp16 roundings (the cache), as test_model's
    fp16 test: measured 5.2e-4 to 7.5e-4, the numpy step's own distance to within 1e-6."""
    path, hf = converted[kind]
    m = Model(path, ctx=128)
    assert m.fused_decode
    fused = decode_rows(m, 20)
    m.fused_decode = False
    plain = decode_rows(m, 20)
    rel = np.abs(fused - plain).max() / np.abs(plain).max()
    assert rel < 5e-5
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float().numpy()[20:]
    assert np.abs(fused - ref).max() / np.abs(ref).max() < 4 * 2.0 ** -11
    m.close()


def test_decode_allocates_no_workspace(converted):
    """After open, decode steps grow none of the workspaces (the kernels', the attention's, the
    fused block's) and the FFN runs through the prepared per-layer calls."""
    path, _ = converted["qwen3"]
    m = Model(path, ctx=128)
    m.forward(IDS[:10])
    grows, att = kernels.workspace_grows(), kernels.attention_ws_growths()
    for t in IDS[10:30]:
        m.forward([t])
    assert kernels.workspace_grows() == grows and kernels.attention_ws_growths() == att
    assert m._decode_attn.growths == 0
    assert all(c is not None for c in m.runner._resident)
    m.close()


def test_prepared_ffn_follows_arena_changes(converted):
    """Evicting and reloading a layer's experts changes the arena's version: the next decode step
    rebuilds that layer's prepared call (the slots may differ) and the logits stay the same."""
    path, _ = converted["llama"]
    m = Model(path, ctx=128)
    want = decode_rows(m, 20)
    arena = m.arena
    stale = m.runner._resident[0]
    experts = [int(e) for e in np.flatnonzero(arena.slot_of[0] >= 0)]
    arena._evict([int(arena.slot_of[0, e]) for e in experts])
    arena.load([(0, e) for e in reversed(experts)])
    got = decode_rows(m, 20)
    assert m.runner._resident[0] is not stale and m.runner._resident[0][0] == arena.version
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6
    m.close()
