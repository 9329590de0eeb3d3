"""Mixture-of-experts routing: each layer's rule, applied to its router's logits.

A mixture-of-experts model's FFN layer has `n_routed` experts (one bundle each, in experts.bin),
a router (the dense tensor blk.{i}.ffn_gate_inp, (n_routed, d_model), f32) and, for some models,
a shared expert that every token runs (dense tensors blk.{i}.ffn_{gate,up,down}_shexp, scaled by
sigmoid(blk.{i}.ffn_gate_inp_shexp . x) when its gate is "sigmoid"). Per token:

    p     = softmax(router x)                     (softmax "before" the top-k)
    top   = the top_k experts of p (among the active set in prune mode)
    coef  = p[top], divided by their sum when norm_topk
  or, softmax "after" the top-k:
    coef  = softmax of the top_k logits           (sums to 1 by construction)
    y    += sum_{e in top} coef_e expert_e(x) [+ gate(x) * shared(x)]

Rules by family (transformers' modeling files): Mixtral before + norm; Qwen3-MoE before + norm
(norm_topk_prob); Qwen2-MoE before, no norm, a sigmoid-gated shared expert; OLMoE before, no norm.

The routing policy `router` scores a layer's experts for a prompt by the router probabilities
summed over its tokens (RouterScorer): the experts a prompt will keep asking for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

SOFTMAX_ORDERS = ("before", "after")
SHARED_GATES = ("none", "sigmoid")


@dataclass(frozen=True)
class RoutingRule:
    """One MoE layer: its routed experts and how a token picks and weighs them."""

    n_routed: int               # routed experts: the layer's bundles, in order
    top_k: int                  # experts per token
    softmax: str = "before"     # "before": softmax over every expert, then the top-k; "after": over the top-k logits
    norm_topk: bool = True      # "before" only: the top-k probabilities renormalised to sum 1
    shared_neurons: int = 0     # neurons of the shared expert (dense block); 0: none
    shared_gate: str = "none"   # "sigmoid": the shared expert's output times sigmoid(w . x)

    def check(self) -> None:
        """ValueError naming the first bad field."""
        for name in ("n_routed", "top_k", "shared_neurons"):
            v = getattr(self, name)
            if type(v) is not int or v < (0 if name == "shared_neurons" else 1):
                raise ValueError(f"{name} is {v!r}")
        if self.top_k > self.n_routed:
            raise ValueError(f"top_k {self.top_k} is more than the {self.n_routed} routed experts")
        if self.softmax not in SOFTMAX_ORDERS:
            raise ValueError(f"softmax {self.softmax!r} (choose from {', '.join(SOFTMAX_ORDERS)})")
        if type(self.norm_topk) is not bool:
            raise ValueError(f"norm_topk is {self.norm_topk!r}")
        if self.shared_gate not in SHARED_GATES:
            raise ValueError(f"shared_gate {self.shared_gate!r} (choose from {', '.join(SHARED_GATES)})")
        if self.shared_gate != "none" and not self.shared_neurons:
            raise ValueError("a shared-expert gate without a shared expert")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "RoutingRule":
        """ValueError for anything but an object of known fields that passes check()."""
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fields {', '.join(sorted(map(str, unknown)))}")
        try:
            rule = cls(**raw)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        rule.check()
        return rule

    def describe(self) -> str:
        order = "softmax, then top-%d" % self.top_k if self.softmax == "before" else "top-%d, then softmax" % self.top_k
        norm = ", renormalised" if self.softmax == "before" and self.norm_topk else ""
        shared = f", shared expert of {self.shared_neurons} neurons" if self.shared_neurons else ""
        gate = " (sigmoid gate)" if self.shared_gate == "sigmoid" else ""
        return f"{self.n_routed} routed experts, {order}{norm}{shared}{gate}"


def router_names(layer: int) -> dict[str, str]:
    """The dense tensors of a MoE layer (GGUF's names)."""
    b = f"blk.{layer}."
    return {"router": b + "ffn_gate_inp", "gate": b + "ffn_gate_shexp", "up": b + "ffn_up_shexp",
            "down": b + "ffn_down_shexp", "shared_gate": b + "ffn_gate_inp_shexp"}


def expected_dense(rule: RoutingRule, layer: int, d_model: int) -> dict[str, tuple[int, ...]]:
    """The dense tensors a layer's rule implies, with their shapes."""
    n = router_names(layer)
    out: dict[str, tuple[int, ...]] = {n["router"]: (rule.n_routed, d_model)}
    if rule.shared_neurons:
        s = rule.shared_neurons
        out.update({n["gate"]: (s, d_model), n["up"]: (s, d_model), n["down"]: (d_model, s)})
    if rule.shared_gate == "sigmoid":
        out[n["shared_gate"]] = (1, d_model)
    return out


# ---- routing -------------------------------------------------------------------------------

def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(rule: RoutingRule, logits: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(coef, probs) for router logits (t, n_routed): coef (t, n_routed) float32, zero outside
    each token's top-k; probs the softmax over every expert (the router policy's statistic).
    allowed: a boolean mask of the experts a token may pick (prune mode's active set), or None."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(logits)
    t, e = logits.shape
    k = rule.top_k
    pick_from = probs if allowed is None else np.where(allowed[None, :], probs, -1.0)
    k = min(k, e if allowed is None else int(allowed.sum()))
    # the top k, as torch.topk picks them (ties: the lower index; exact ties do not occur in practice)
    idx = np.argsort(-pick_from, axis=1, kind="stable")[:, :k]
    rows = np.arange(t)[:, None]
    if rule.softmax == "before":
        vals = probs[rows, idx]
        if rule.norm_topk:
            vals = vals / vals.sum(axis=1, keepdims=True)
    else:
        vals = softmax(logits[rows, idx])
    coef = np.zeros((t, e), dtype=np.float32)
    coef[rows, idx] = vals
    return coef, probs


class RouterScorer:
    """The `router` policy's statistic: each layer's router probabilities summed over tokens."""

    def __init__(self, n_layers: int, n_experts: int):
        self.acc = np.zeros((n_layers, n_experts), dtype=np.float64)
        self.n_tokens = np.zeros(n_layers, dtype=np.int64)

    def reset(self) -> None:
        self.acc[:] = 0
        self.n_tokens[:] = 0

    def add(self, layer: int, probs: np.ndarray) -> None:
        """probs: (t, n_experts) of one FFN call."""
        self.acc[layer] += probs.sum(axis=0, dtype=np.float64)
        self.n_tokens[layer] += probs.shape[0]

    def all_scores(self) -> np.ndarray:
        return self.acc.copy()


# ---- what `fic show` says of a mixture of experts --------------------------------------------

def show_lines(man: Any) -> list[str]:
    """Lines for `fic show` of a mixture of experts (an fmt.Manifest with moe), none for a dense
    model: routing per layer, total and active parameters per token, bytes per expert, and what
    a budget does with it."""
    import math

    from flashinfer_cli import fmt  # fmt imports this module: imported when called
    from flashinfer_cli.plan import ModelShape

    if not man.moe:
        return []
    s = ModelShape.from_manifest(man)
    # every parameter, the embedding left on flash included; a token uses one row of it
    total = sum(math.prod(t["shape"]) for t in man.tensors.values() if t["fmt"] != "i32") \
        + s.n_experts * s.expert_params
    active = s.routed_params + (s.d_model if fmt.flash_resident(man) else 0)
    rules = sorted({r.describe() for r in man.moe})
    n_layers = len(man.moe)
    out = [f"routing         {rule}" + (f" (every one of the {n_layers} layers)" if len(rules) == 1 else "")
           for rule in rules]
    shared = sum(r.shared_neurons for r in man.moe)
    out.append(f"parameters      {total / 1e6:.1f}M in all, {active / 1e6:.1f}M active per token "
               f"(dense block {s.dense_params / 1e6:.1f}M with the routers"
               f"{' and shared experts' if shared else ''}, top-{s.moe_top_k} of "
               f"{'/'.join(map(str, sorted(set(s.experts_per_layer))))} experts per layer)")
    sizes = sorted({e.length for layer in man.experts for e in layer})
    out.append(f"per expert      {', '.join(f'{b:,}' for b in sizes)} bytes ({s.expert_params / 1e6:.2f}M parameters),"
               f" one bundle each")
    out.append("under a budget  exact mode: the prompt's experts are a cold-start prefetch and a pin list; every "
               "token still runs its own top-k, reading a miss from flash (the full model's output). prune mode: "
               "each token's top-k only among the prompt's set, no reads: a trade in quality")
    return out
