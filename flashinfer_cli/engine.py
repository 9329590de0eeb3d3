"""The engine: what the CLI, the tests and scripts drive.

    from flashinfer_cli import Engine
    eng = Engine.open("smollm2-135m")          # a store name (pulled on first use) or a model dir
    ids = eng.tokenize("Hello")
    logits = eng.forward(ids)                  # float32 (len(ids), vocab), from an empty context
    for text in eng.generate("What is the capital of Germany?"):
        print(text, end="")
    for text in eng.chat([{"role": "user", "content": "hi"}], temperature=0.7, seed=1): ...

The engine keeps the KV cache between calls and reuses the longest common prefix of the tokens
already in it, so a chat does not re-read its history every turn (`engine.last_prefix` says how
many tokens a prompt reused and how many it ran). Under a budget
(`Engine.open(name, mem="512M", mode="exact"|"prune", active=..., policy=..., reselect=N)`) each
prompt's prefill chooses the active sets (router.py) and the arena keeps them across calls; in
prune mode `engine.use_active(0.5)` changes the size of the next prompts' sets within what the
arena holds.

Where each prompt chooses its own sets, the reused prefix is at most the previous prompt: its keys
and values were computed with every expert and its selection statistics are kept, so the new
prompt's selection and cache are those of a fresh run; the previous answer (decoded with the sets
of its time) runs again as part of the new prompt.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np

from flashinfer_cli import fmt, kernels, moe, plan as planlib, router
from flashinfer_cli import generate as gen
from flashinfer_cli.model import PREFILL_ALIGN, Model

DEFAULT_RESELECT = 0  # tokens between reselections (0: off); see bench/RESULTS.md
# a reused prefix is cut to the prefill's alignment (model.PREFILL_ALIGN), so that what an engine
# computes depends on the requests, never on its budget (tests/test_soak.py)
PREFIX_ALIGN = PREFILL_ALIGN
PREFILLS = ("pruned", "full")
# the sketch policy's prefill per mode (bench/RESULTS.md, "Calibration and the sketch policy"):
# exact mode computes every expert anyway; in prune mode a pruned prefill read 3.7x fewer bytes at
# 0.75 active (each selected expert once; full re-streams what the arena cannot hold per chunk) but
# cost x4.74 perplexity against full's x3.65 and x75 against x26 at 0.5 (smollm2-135m): full until
# the predictor is better
DEFAULT_PREFILL = {"exact": "full", "prune": "full"}


class EngineError(ValueError):
    """A request the engine refuses (empty prompt, prompt longer than the context); one line."""


@dataclasses.dataclass(frozen=True)
class PrefixUse:
    """What the last prompt's prefill did with the KV cache: tokens reused from the previous
    request (their keys and values already there) and tokens run."""

    reused: int = 0
    computed: int = 0


class Engine:
    def __init__(self, path: Path, model: Model, tokenizer, *, policy: str | None = None,
                 reselect: int = DEFAULT_RESELECT, notes: list[str] | None = None, prefill: str | None = None):
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self._cached: list[int] = []  # the tokens whose keys and values are in the cache
        self.last_prefix = PrefixUse()  # the last prefill's reuse of the cache
        self.last: gen.Response | None = None  # timings of the last generation
        self.notes = list(notes or [])  # what the engine decided on its own (said on stderr by the CLI)
        self.details: list[str] = []  # what it did on its own that only --verbose says
        if policy is None:
            policy = default_policy(model.plan.prune, model.moe is not None)
            self.details.append(f"policy {policy} ({model.plan.mode} mode's default)")
        if policy not in router.POLICIES:
            raise EngineError(f"unknown policy {policy!r} (choose from {', '.join(router.POLICIES)})")
        is_moe = model.moe is not None
        if is_moe and policy == "exact":
            policy = "router"  # a mixture of experts' per-prompt statistic is its routers' (GRIFFIN's is a dense FFN's)
        if policy == "none" and (model.plan.prune or reselect):  # nothing chosen: nothing to prune to or rescore
            raise EngineError("policy none selects no experts: it runs in exact mode without --reselect")
        if policy != "none" and (policy == "router") != is_moe:  # static's calibration is GRIFFIN's: dense only
            raise EngineError(f"policy {policy!r} is for {'dense models' if is_moe else 'mixtures of experts'}; "
                              f"this model {'is a mixture of experts: use router' if is_moe else 'is dense: use exact or static'}")
        if reselect < 0:
            raise EngineError(f"--reselect must be >= 0, got {reselect}")
        self.predictor = self._load_predictor(model, policy) if policy in router.PREDICTED else None
        self.prefill = self._prefill_mode(policy, prefill, model.plan)
        self.policy = policy
        self.reselect = reselect
        plan = model.plan
        # a selection is made per prompt when it matters: something streams, or --active prunes
        self.selects = plan.prune or not plan.all_resident
        self.active_per_layer = list(plan.active_per_layer)  # the sets' sizes (use_active changes them)
        # --active auto: each prompt's sizes come from its scores (plan.auto_size), within the plan's
        self.auto = plan.request.active if isinstance(plan.request.active, planlib.AutoActive) else None
        self._since_select = 0
        # the selection statistics of the cached prompt's first _scored_len tokens (per-prompt
        # selection only): a next prompt that extends it reuses its cache and adds to them
        self._scored = np.zeros_like(model.scorer.acc) if self.selects and policy in router.PER_PROMPT else None
        self._scored_len = 0
        # the static scores a mixing policy averages in, loaded (or calibrated) at open: never inside a forward
        self._static = self._static_scores() if self.selects and policy in router.MIXES_STATIC else None
        if self.selects and policy == "static":
            router.apply_sets(model.arena, model.runner, self._static_sets(), prune=plan.prune)
        if self.selects and reselect and plan.prune:
            c = model.config
            model.window = np.zeros((c.n_layers, min(reselect, planlib.WINDOW_MAX, plan.prefill_chunk), c.d_model), dtype=np.float32)

    @staticmethod
    def _load_predictor(model: Model, policy: str) -> router.Predictor:
        if model.moe is not None:
            raise EngineError(f"policy {policy!r} is for dense models; this model is a mixture of experts: use router")
        pred = router.Predictor.load(model.reader, model.config.n_layers)
        if pred is None:
            raise EngineError(f"policy {policy!r} needs the model's predictor: run `fic calibrate {model.reader.manifest.name}`")
        return pred

    @staticmethod
    def _prefill_mode(policy: str, prefill: str | None, plan: planlib.MemoryPlan) -> str:
        """How the prompt runs: 'full' (every expert, then the sets chosen) or 'pruned' (the sketch
        policy: each layer's set chosen from its own FFN input, only it read and run)."""
        if prefill is not None and prefill not in PREFILLS:
            raise EngineError(f"unknown prefill {prefill!r} (choose from {', '.join(PREFILLS)})")
        if prefill == "pruned" and policy not in router.PREDICTED:
            raise EngineError("--prefill pruned needs --policy sketch or sketch-mixed (the other policies score experts by running them)")
        if prefill == "pruned" and not plan.prune:
            raise EngineError("--prefill pruned needs prune mode (exact mode runs every expert)")
        if prefill is None:
            return DEFAULT_PREFILL["prune" if plan.prune else "exact"] if policy in router.PREDICTED else "full"
        return prefill

    @classmethod
    def open(cls, name_or_path: str, *, mem: str | int | None = None, ctx: int | None = None,
             mode: str | None = None, active: str | float | int | None = None, policy: str | None = None,
             reselect: int | None = None, threads: int | None = None, auto_pull: bool = True,
             kv_dtype: str = "f16", prefill: str | None = None) -> "Engine":
        """Open a model directory, or a store name (a catalog name is pulled on first use).
        mem: the memory budget ('512M', '2G' or bytes; default: everything resident when the
        machine's available memory holds it with room to spare); ctx: KV cache length (default the
        model's, at most 4096); mode: 'exact' (default) or 'prune'; active: the active fraction of
        each layer's experts or a parameter count ('300M'); policy: 'exact', 'static', 'router',
        'sketch' (the calibrated predictor), 'mixed' (exact's and static's scores averaged),
        'sketch-mixed' (sketch's and static's) or 'none' (no selection, exact mode); default
        (None): default_policy; prefill: 'pruned' or 'full' (sketch; DEFAULT_PREFILL);
        reselect: tokens between reselections (0: off); threads: kernel threads; kv_dtype: the KV
        cache's element type, f16 (half the memory) or f32."""
        from flashinfer_cli.pull import resolve_model
        from flashinfer_cli.tokenizer import Tokenizer

        if threads is not None:
            kernels.set_threads(threads)
        path = resolve_model(name_or_path, auto_pull=auto_pull)
        plan, notes = make_engine_plan(path, mem=mem, ctx=ctx, mode=mode, active=active, kv_dtype=kv_dtype)
        model = Model(path, plan=plan)
        tokenizer = Tokenizer.from_model_dir(path, model.reader.manifest.tokenizer)
        try:
            return cls(path, model, tokenizer, policy=policy,
                       reselect=DEFAULT_RESELECT if reselect is None else reselect, notes=notes, prefill=prefill)
        except BaseException:
            model.close()
            raise

    @property
    def plan(self) -> planlib.MemoryPlan:
        return self.model.plan

    def stats(self) -> dict:
        """Arena statistics of the last request and in total, and what is resident."""
        out = self.model.arena.stats()
        p = self.plan
        out.update(mode=p.mode, policy=self.policy, prefill=self.prefill, prune=p.prune, active_fraction=self.active_fraction,
                   active_auto=None if self.auto is None else self.auto.threshold,
                   active_per_layer=list(self.active_per_layer),
                   reselect=self.reselect,
                   active_params=self.active_params, streamed_bytes_per_token=p.streamed_bytes_per_token,
                   budget_bytes=p.request.mem, planned_bytes=p.total_bytes)
        return out

    @property
    def active_fraction(self) -> float:
        """The share of the experts in the active sets (prune mode: all that runs)."""
        return sum(self.active_per_layer) / max(1, sum(self.plan.shape.experts_per_layer))

    @property
    def active_params(self) -> int:
        """Parameters a token uses: the dense block and the active sets (prune mode), else all."""
        s = self.plan.shape
        if s.is_moe:
            return s.routed_params
        if not self.plan.prune:
            return s.dense_params + s.n_experts * s.expert_params
        return s.dense_params + sum(self.active_per_layer) * s.expert_params

    def use_active(self, active: str | float | int | None) -> float:
        """Size the active sets of the next prompts (prune mode): a fraction of each layer's
        experts, active parameters ('300M') or auto[:T], as --active; None: the engine's own. Refused
        (BudgetError) when the arena cannot hold the sets, EngineError outside prune mode.
        Returns the active fraction now used."""
        p = self.plan
        if active is None:
            sizes = list(p.active_per_layer)
            auto = p.request.active if isinstance(p.request.active, planlib.AutoActive) else None
        else:
            if not p.prune:
                raise EngineError("an active size needs prune mode (--mode prune, with a budget or --active): "
                                  f"this engine runs in {p.mode} mode with every expert")
            parsed = planlib.parse_active(active)
            sizes = planlib.active_sizes(p, parsed)
            auto = parsed if isinstance(parsed, planlib.AutoActive) else None
        if auto is not None and auto == self.auto:
            return self.active_fraction  # the sizes are each prompt's own (the last prompt's here)
        if auto is not None or self.auto is not None:
            self.auto = auto
            self.active_per_layer = []  # sized again below (static: the sets are chosen again)
        if sizes != self.active_per_layer:
            self.active_per_layer = sizes
            if self.policy == "static" and self.selects:  # one set for every prompt: the cache was made with the old
                router.apply_sets(self.model.arena, self.model.runner, self._static_sets(), prune=p.prune)
                self.forget_context()
        return self.active_fraction

    @property
    def ctx(self) -> int:
        return self.model.ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text (special tokens parsed; bos prepended if the model wants it)."""
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int], *, prompt_len: int | None = None, reselect: bool = False) -> np.ndarray:
        """float32 logits (len(ids), vocab) of every position, from an empty context. Where a
        selection is made (a budget that streams, or --active), it is made from the first
        prompt_len tokens (default: all of them), which run with every expert, as that prompt's
        prefill would; the tokens after them run with the sets held, so a continuation is scored
        teacher-forced, or with reselect (and the engine's --reselect N) in chunks of N tokens, the
        sets rescored after each as generation would. The returned array (len(ids) x vocab floats)
        is the caller's and outside the budget; generation keeps only the last position's logits."""
        self._check_length(ids)
        ids = list(ids)
        n = len(ids) if prompt_len is None else prompt_len
        if not 0 < n <= len(ids):
            raise EngineError(f"prompt_len {prompt_len} outside 1..{len(ids)}")
        self.forget_context()
        self.model.arena.begin_request()
        try:
            logits = self._select_forward(ids[:n], all_logits=True, full_prompt=True)
            if n < len(ids):
                logits = np.concatenate([logits, self._continue(ids[n:], reselect)])
        except BaseException:
            self.model.arena.recover()
            raise
        self._cached = ids
        self.last_prefix = PrefixUse(0, n)
        return logits

    def _continue(self, ids: list[int], reselect: bool) -> np.ndarray:
        """All logits of a teacher-forced continuation: at once, or in --reselect chunks with a
        reselection after each (the model's window holds each chunk's last FFN inputs)."""
        step = self.reselect if reselect and self.selects else 0
        if not step:
            return self.model.forward(ids, all_logits=True)
        parts = []
        for i in range(0, len(ids), step):
            parts.append(self.model.forward(ids[i:i + step], all_logits=True))
            self._since_select += len(ids[i:i + step])
            if i + step < len(ids) and self._since_select >= self.reselect:
                self._reselect()
        return np.concatenate(parts)

    def forget_context(self) -> None:
        """Forget the KV cache: the next prompt runs whole (the arena keeps what it holds)."""
        self.model.reset()
        self._cached = []
        self._scored_len = 0

    # -- selection --
    def _select_forward(self, ids: list[int], *, start: int = 0, all_logits: bool = False,
                        full_prompt: bool = False) -> np.ndarray:
        """Run the prompt ids from position start (the tokens before it are in the cache); when
        this engine selects per prompt (policy exact), every expert runs and the prompt's GRIFFIN
        statistics choose each layer's active set, read once and pinned. full_prompt: the prompt
        runs with every expert whatever the policy (quality scoring)."""
        m = self.model
        if self.selects and self.prefill == "pruned":
            return self._pruned_forward(ids, start=start, all_logits=all_logits)
        if not (self.selects and self.policy in router.PER_PROMPT):
            if not full_prompt:
                return m.forward(ids[start:], all_logits=all_logits)
            m.full = True
            try:
                return m.forward(ids[start:], all_logits=all_logits)
            finally:
                m.full = not m.plan.prune
        # the previous prompt's statistics are kept when the cache is reused; the tokens before
        # `scored` run without adding theirs. Prune mode reuses at most the previous prompt
        # (_reusable): its tail cut by PREFIX_ALIGN runs again, its statistics already there.
        # Exact mode may reuse the previous answer too, which adds no statistics, and a tail cut
        # by PREFIX_ALIGN adds its own again: there the sets only decide what stays resident, and
        # one call from `start` keeps the prefill's alignment.
        scored = 0 if not start else self._scored_len if m.plan.prune else start
        if scored:
            m.scorer.acc[:] = self._scored
        else:
            m.scorer.reset()
        parts = []
        m.full = True
        try:
            if start < scored:  # the cached prompt again: its last tokens run, its statistics are there
                parts.append(m.forward(ids[start:scored], all_logits=all_logits))
            if len(ids) > max(start, scored):
                if self.predictor is not None:  # sketch, full prefill: predicted rows, every expert run
                    m.before_ffn = self._add_predicted
                else:
                    m.collect = m.scorer.add
                parts.append(m.forward(ids[max(start, scored):], all_logits=all_logits))
        finally:
            m.collect, m.before_ffn, m.full = None, None, not m.plan.prune
        logits = np.concatenate(parts) if all_logits else parts[-1]
        self._scored[:] = m.scorer.acc
        self._scored_len = len(ids)
        scores = self._mixed(m.scorer.all_scores())
        self._size_auto(scores)
        sets = [router.top_k(scores[l], k) for l, k in enumerate(self.active_per_layer)]
        router.apply_sets(m.arena, m.runner, sets, prune=m.plan.prune)
        m.scorer.reset()
        self._since_select = 0
        if self.reselect and not m.plan.prune:
            m.collect = m.scorer.add  # exact mode: decode sees every expert; its statistics are free
        return logits

    def _add_predicted(self, layer: int, xn: np.ndarray) -> None:
        self.model.scorer.add_predicted(layer, self.predictor.predict(layer, xn))

    def _pruned_forward(self, ids: list[int], *, start: int, all_logits: bool) -> np.ndarray:
        """Sketch policy, pruned prefill: the prompt runs with each layer's active set, chosen
        from the predictor's rows over the prompt's first chunk at that layer (the pruned model's
        own hidden states) before the layer's FFN runs; only selected experts are ever read."""
        m = self.model
        unset = np.zeros(0, dtype=np.int64)
        m.runner.drop_prefetch()
        m.arena.unpin_all()
        m.runner.active = [unset] * m.config.n_layers  # no layer runs (or prefetches) a stale set
        m.runner.prune = True
        chosen = [False] * m.config.n_layers
        sizes = list(self.active_per_layer)

        def choose(layer: int, xn: np.ndarray) -> None:
            if chosen[layer]:
                return  # the set holds for the prompt's later chunks
            chosen[layer] = True
            m.scorer.reset()
            m.scorer.add_predicted(layer, self.predictor.predict(layer, xn))
            scores = self._mixed(m.scorer.all_scores())
            if self.auto is not None:
                sizes[layer] = min(int(m.arena.experts_per_layer[layer]),
                                   planlib.auto_size(scores[layer], self.auto, self.plan.max_active_per_layer))
            s = router.top_k(scores[layer], sizes[layer])
            m.arena.load([(layer, int(e)) for e in s], pin=True)
            m.runner.active[layer] = s

        m.before_ffn, m.full = choose, False
        try:
            logits = m.forward(ids[start:], all_logits=all_logits)
        finally:
            m.before_ffn, m.full = None, False
        self.active_per_layer = sizes
        m.scorer.reset()
        self._since_select = 0
        self._scored_len = 0
        return logits

    def _reselect(self) -> None:
        """Rescore from the recent tokens and swap in the experts that now clearly beat the weakest
        selected ones; only the changed experts are read."""
        m = self.model
        if m.plan.prune and self.predictor is not None:  # the window's predicted rows: no expert is read
            w = m.window[:, :min(self._since_select, m.window.shape[1])]
            m.scorer.reset()
            for layer in range(m.config.n_layers):
                self._add_predicted(layer, w[layer])
        elif m.plan.prune and m.moe is not None:  # the window's router probabilities: no expert is read
            w = m.window[:, :min(self._since_select, m.window.shape[1])]
            m.scorer.reset()
            for layer in range(m.config.n_layers):
                m.scorer.add(layer, moe.softmax(w[layer] @ m.layers[layer].router.T))
        elif m.plan.prune:  # the window's FFN inputs, run once through every expert (reads counted)
            w = m.window[:, :min(self._since_select, m.window.shape[1])]
            m.scorer.reset()
            dummy = np.zeros((w.shape[1], w.shape[2]), dtype=np.float32)
            for layer in range(m.config.n_layers):
                m.runner.run(layer, np.ascontiguousarray(w[layer]), dummy, full=True, collect=m.scorer.add)
            m.runner.drop_prefetch()
        scores = self._mixed(m.scorer.all_scores())
        sets = []
        for layer in range(m.config.n_layers):
            current = m.runner.active[layer] if m.plan.prune else m.arena.pinned_experts(layer)
            sets.append(router.reselect(current, scores[layer]) if current is not None and len(current)
                        else router.top_k(scores[layer], self.active_per_layer[layer]))
        router.apply_sets(m.arena, m.runner, sets, prune=m.plan.prune)
        m.arena.count_reselection()
        m.scorer.reset()
        self._since_select = 0

    def _size_auto(self, scores: np.ndarray) -> None:
        """--active auto: each layer's set size from this selection's scores (per layer: a layer
        whose mass is spread out gets more experts; each stays within the plan's fitting size, so
        the arena's slots hold any mix)."""
        if self.auto is not None:
            k_max = self.plan.max_active_per_layer
            self.active_per_layer = [min(n, planlib.auto_size(scores[l], self.auto, k_max))
                                     for l, n in enumerate(self.plan.shape.experts_per_layer)]

    def _static_scores(self) -> np.ndarray:
        scores = router.load_static(self.path)
        if scores is None or scores.shape != self.model.arena.n_neurons.shape:
            scores = self.calibrate()
            stored = router.load_static(self.path) is not None
            self.details.append(f"no static scores stored beside the model: computed once from {router.STATIC_TOKENS:,} "
                                f"tokens of calibration text" + (" and stored" if stored else ", not stored (a context "
                                f"shorter than {router.STATIC_WINDOW} tokens, or a read-only store)")
                                + " (`fic calibrate` stores them)")
        return scores

    def _mixed(self, scores: np.ndarray) -> np.ndarray:
        """A mixing policy's scores from the prompt's (router.mix); any other policy's unchanged."""
        return scores if self._static is None else router.mix(scores, self._static)

    def _static_sets(self) -> list[np.ndarray]:
        scores = self._static_scores()
        self._size_auto(scores)
        return [router.top_k(scores[l], k) for l, k in enumerate(self.active_per_layer)]

    def calibrate(self) -> np.ndarray:
        """The static policy's scores (static_calibration), stored beside the model when they are
        the canonical ones (the context holds a whole router.STATIC_WINDOW): what any engine of the
        model would compute, whatever its context."""
        scores, window = self.static_calibration()
        if window == router.STATIC_WINDOW:
            try:
                router.save_static(self.path, scores)
            except OSError:
                pass  # a read-only store: the scores are recomputed next time
        return scores

    def static_calibration(self) -> tuple[np.ndarray, int]:
        """The static policy's scores: GRIFFIN statistics of every expert over the first
        router.STATIC_TOKENS tokens of calibration text (texts.calibration_text: the Python
        standard library's docstrings and comments), run with every expert in windows of
        router.STATIC_WINDOW tokens (fewer if the context is shorter), each from an empty cache, so
        the scores do not depend on the engine's context. Returns (n_layers, max_experts) scores
        and the window used."""
        from flashinfer_cli import texts

        m = self.model
        ids = self.tokenize(texts.calibration_text())[:router.STATIC_TOKENS]
        window = min(router.STATIC_WINDOW, self.ctx)
        m.scorer.reset()
        m.collect, m.full = m.scorer.add, True
        try:
            for w in range(0, len(ids), window):
                m.reset()
                part = ids[w:w + window]
                for i in range(0, len(part), m.prefill_chunk):
                    m.forward(part[i:i + m.prefill_chunk])
        finally:
            m.collect, m.full = None, not m.plan.prune
            self.forget_context()
        scores = m.scorer.all_scores()
        m.scorer.reset()
        return scores, window

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """The tokens of a prompt, wrapped in the chat template when chat and the model has one."""
        if chat and getattr(self.tokenizer, "chat_template", True):
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            return self.chat_ids(messages)
        if not prompt:
            raise EngineError("empty prompt")
        return self.tokenize(prompt if system is None else f"{system}\n\n{prompt}")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not messages or not any(m.get("content") for m in messages if m.get("role") == "user"):
            raise EngineError("empty prompt")
        ids = self.tokenize(self.tokenizer.render_chat(messages, add_generation_prompt=True))
        bos = self.tokenizer.bos_id
        if bos is not None and ids[:2] == [bos, bos]:  # the template wrote bos and encode added one
            ids = ids[1:]
        return ids

    def stream(self, ids: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None) -> Iterator[gen.Response]:
        """Generate after the token ids; yields generate.Response (text and timings)."""
        self._check_length(ids)
        sampler = gen.Sampler(gen.SamplingParams(temperature, top_k, top_p, min_p, seed))
        stepper = SimpleNamespace(forward=self._step)  # decode steps append to the cache
        try:
            for r in gen.stream_generate(stepper, self.tokenizer, list(ids), max_tokens=max_tokens,
                                         sampler=sampler, prefill=self._prefill,
                                         room=lambda: self.ctx - self.model.pos):
                self.last = r
                yield r
        except BaseException:  # a Ctrl-C, a read error, the caller closing the stream: whole again
            self.model.arena.recover()
            raise

    def generate(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, chat: bool = True,
                 system: str | None = None) -> Iterator[str]:
        """Stream the answer to prompt as text."""
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        for r in self.stream(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seed=seed):
            if r.text:
                yield r.text

    def chat(self, messages: list[dict], **sampling) -> Iterator[str]:
        """Stream the assistant's next message after messages ([{"role", "content"}, ...])."""
        for r in self.stream(self.chat_ids(messages), **sampling):
            if r.text:
                yield r.text

    # -- the model as generate.py sees it: forward appends to the cache --
    def _check_length(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise EngineError("empty prompt")
        if len(ids) > self.ctx:
            raise EngineError(f"the prompt has {len(ids)} tokens, more than the context of {self.ctx} (see --ctx)")

    def _prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Last logits after ids, reusing the cached common prefix (at least one token is run)."""
        ids = list(ids)
        keep = self._reusable(ids)
        self.model.truncate(keep)
        self._cached = self._cached[:keep]
        self.model.arena.begin_request()
        logits = self._select_forward(ids, start=keep)
        self._cached = ids
        self.last_prefix = PrefixUse(keep, len(ids) - keep)
        return logits

    def _reusable(self, ids: list[int]) -> int:
        """How many of ids' first tokens the cache holds as this engine would compute them in a
        session that sent the same requests: the common prefix; in prune mode, where each prompt
        chooses its sets, the previous prompt whole (its statistics are kept) or nothing (the
        previous answer was decoded with the sets of its time). Exact mode computes every expert
        whatever the sets, so it reuses the previous answer too, as an engine without a budget
        does. Rounded down to PREFIX_ALIGN; at least one token is left to run."""
        common, limit = 0, min(len(self._cached), len(ids))
        while common < limit and self._cached[common] == ids[common]:
            common += 1
        if self.prefill == "pruned":
            common = 0  # the cache was computed with the previous prompt's sets: the new prompt runs whole
        elif self._scored is not None and self.model.plan.prune:
            common = self._scored_len if common >= self._scored_len else 0
        common = min(common, len(ids) - 1)
        return common - common % PREFIX_ALIGN

    def _step(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.model.forward(list(ids))
        self._cached.extend(ids)
        self._since_select += len(ids)
        if self.selects and self.reselect and self._since_select >= self.reselect:
            self._reselect()
        return logits

    def close(self) -> None:
        self.model.close()


def default_policy(prune: bool, is_moe: bool) -> str:
    """The policy unless told: a mixture of experts' routers; in prune mode router.PRUNE_DEFAULT
    (exact: mixed lost to it on the 1.5B, bench/RESULTS.md); in exact mode exact whatever that is
    (every answer is the full model's whatever the policy: the cheapest, no static scores)."""
    if is_moe:
        return "router"
    return router.PRUNE_DEFAULT if prune else "exact"


def make_engine_plan(path: Path, *, mem=None, ctx=None, mode=None, active=None,
                     kv_dtype: str = "f16") -> tuple[planlib.MemoryPlan, list[str]]:
    """The memory plan for a model directory and the user's options; notes say what was decided
    for the user (a budget taken from the available memory)."""
    man = fmt.parse_manifest(Path(path) / fmt.MANIFEST_FILE)
    shape = planlib.ModelShape.from_manifest(man)
    tok_bytes = sum((Path(path) / f).stat().st_size for f in man.tokenizer.get("files", [])
                    if (Path(path) / f).is_file())
    ctx = min(ctx or min(shape.max_ctx, 4096), shape.max_ctx)
    req = planlib.PlanRequest(mem=planlib.parse_size(mem) if mem is not None else None, ctx=ctx,
                              mode=mode or "exact", active=planlib.parse_active(active),
                              tokenizer_file_bytes=tok_bytes, n_threads=kernels.get_threads(),
                              kv_dtype=kv_dtype)
    notes = []
    if req.mem is None:
        everything = planlib.make_plan(shape, req).total_bytes
        avail = planlib.available_memory()
        if avail is not None and everything > avail // 2:
            req = dataclasses.replace(req, mem=avail // 2)
            notes.append(f"the model needs {planlib.human(everything)} with everything resident, the machine has "
                         f"{planlib.human(avail)} available: using --mem {planlib.human(req.mem)}")
    return planlib.make_plan(shape, req), notes
