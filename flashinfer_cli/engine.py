"""The engine: what the CLI, the tests and scripts drive.

    from flashinfer_cli import Engine
    eng = Engine.open("smollm2-135m")          # a store name (pulled on first use) or a model dir
    ids = eng.tokenize("Hello")
    logits = eng.forward(ids)                  # float32 (len(ids), vocab), from an empty context
    for text in eng.generate("What is the capital of Germany?"):
        print(text, end="")
    for text in eng.chat([{"role": "user", "content": "hi"}], temperature=0.7, seed=1): ...

The engine keeps the KV cache between calls and reuses the longest common prefix of the tokens
already in it, so a chat does not re-read its history every turn. Under a budget
(`Engine.open(name, mem="512M", mode="exact"|"prune", active=..., policy=..., reselect=N)`) each
prompt's prefill chooses the active sets (router.py) and the arena keeps them across calls.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np

from flashinfer_cli import fmt, kernels, plan as planlib, router
from flashinfer_cli import generate as gen
from flashinfer_cli.model import Model

DEFAULT_RESELECT = 0  # tokens between reselections (0: off); see bench/RESULTS.md


class EngineError(ValueError):
    """A request the engine refuses (empty prompt, prompt longer than the context); one line."""


class Engine:
    def __init__(self, path: Path, model: Model, tokenizer, *, policy: str = "exact",
                 reselect: int = DEFAULT_RESELECT, notes: list[str] | None = None):
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self._cached: list[int] = []  # the tokens whose keys and values are in the cache
        self.last: gen.Response | None = None  # timings of the last generation
        self.notes = list(notes or [])  # what the engine decided on its own (said on stderr by the CLI)
        if policy not in router.POLICIES:
            raise EngineError(f"unknown policy {policy!r} (choose from {', '.join(router.POLICIES)})")
        if reselect < 0:
            raise EngineError(f"--reselect must be >= 0, got {reselect}")
        self.policy = policy
        self.reselect = reselect
        plan = model.plan
        # a selection is made per prompt when it matters: something streams, or --active prunes
        self.selects = plan.prune or not plan.all_resident
        self._since_select = 0
        if self.selects and policy == "static":
            router.apply_sets(model.arena, model.runner, self._static_sets(), prune=plan.prune)
        if self.selects and reselect and plan.prune:
            c = model.config
            model.window = np.zeros((c.n_layers, min(reselect, planlib.WINDOW_MAX, plan.prefill_chunk), c.d_model), dtype=np.float32)

    @classmethod
    def open(cls, name_or_path: str, *, mem: str | int | None = None, ctx: int | None = None,
             mode: str | None = None, active: str | float | int | None = None, policy: str | None = None,
             reselect: int | None = None, threads: int | None = None, auto_pull: bool = True,
             kv_dtype: str = "f16") -> "Engine":
        """Open a model directory, or a store name (a catalog name is pulled on first use).
        mem: the memory budget ('512M', '2G' or bytes; default: everything resident when the
        machine's available memory holds it with room to spare); ctx: KV cache length (default the
        model's, at most 4096); mode: 'exact' (default) or 'prune'; active: the active fraction of
        each layer's experts or a parameter count ('300M'); policy: 'exact' (default) or 'static';
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
        return cls(path, model, tokenizer, policy=policy or "exact",
                   reselect=DEFAULT_RESELECT if reselect is None else reselect, notes=notes)

    @property
    def plan(self) -> planlib.MemoryPlan:
        return self.model.plan

    def stats(self) -> dict:
        """Arena statistics of the last request and in total, and what is resident."""
        out = self.model.arena.stats()
        p = self.plan
        out.update(mode=p.mode, policy=self.policy, prune=p.prune, active_fraction=p.active_fraction,
                   streamed_bytes_per_token=p.streamed_bytes_per_token, budget_bytes=p.request.mem,
                   planned_bytes=p.total_bytes)
        return out

    @property
    def ctx(self) -> int:
        return self.model.ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text (special tokens parsed; bos prepended if the model wants it)."""
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int], *, prompt_len: int | None = None) -> np.ndarray:
        """float32 logits (len(ids), vocab) of every position, from an empty context. Where a
        selection is made (a budget that streams, or --active), it is made from the first
        prompt_len tokens (default: all of them), which run with every expert, as that prompt's
        prefill would; the tokens after them run with the sets held (no reselection), so a
        continuation is scored teacher-forced. The returned array (len(ids) x vocab floats) is the
        caller's and outside the budget; generation keeps only the last position's logits."""
        self._check_length(ids)
        ids = list(ids)
        n = len(ids) if prompt_len is None else prompt_len
        if not 0 < n <= len(ids):
            raise EngineError(f"prompt_len {prompt_len} outside 1..{len(ids)}")
        self.model.reset()
        self._cached = []
        self.model.arena.begin_request()
        try:
            logits = self._select_forward(ids[:n], all_logits=True, full_prompt=True)
            if n < len(ids):
                logits = np.concatenate([logits, self.model.forward(ids[n:], all_logits=True)])
        except BaseException:
            self.model.arena.recover()
            raise
        self._cached = ids
        return logits

    # -- selection --
    def _select_forward(self, ids: list[int], *, all_logits: bool = False, full_prompt: bool = False) -> np.ndarray:
        """Run a prompt; when this engine selects per prompt (policy exact), every expert runs and
        the prompt's GRIFFIN statistics choose each layer's active set, read once and pinned.
        full_prompt: the prompt runs with every expert whatever the policy (quality scoring)."""
        m = self.model
        if not (self.selects and self.policy == "exact"):
            if not full_prompt:
                return m.forward(ids, all_logits=all_logits)
            m.full = True
            try:
                return m.forward(ids, all_logits=all_logits)
            finally:
                m.full = not m.plan.prune
        m.scorer.reset()
        m.collect, m.full = m.scorer.add, True
        try:
            logits = m.forward(ids, all_logits=all_logits)
        finally:
            m.collect, m.full = None, not m.plan.prune
        scores = m.scorer.all_scores()
        sets = [router.top_k(scores[l], k) for l, k in enumerate(m.plan.active_per_layer)]
        router.apply_sets(m.arena, m.runner, sets, prune=m.plan.prune)
        m.scorer.reset()
        self._since_select = 0
        if self.reselect and not m.plan.prune:
            m.collect = m.scorer.add  # exact mode: decode sees every expert; its statistics are free
        return logits

    def _reselect(self) -> None:
        """Rescore from the recent tokens and swap in the experts that now clearly beat the weakest
        selected ones; only the changed experts are read."""
        m = self.model
        if m.plan.prune:  # the window's FFN inputs, run once through every expert (reads counted)
            w = m.window[:, :min(self._since_select, m.window.shape[1])]
            m.scorer.reset()
            dummy = np.zeros((w.shape[1], w.shape[2]), dtype=np.float32)
            for layer in range(m.config.n_layers):
                m.runner.run(layer, np.ascontiguousarray(w[layer]), dummy, full=True, collect=m.scorer.add)
            m.runner.drop_prefetch()
        scores = m.scorer.all_scores()
        sets = []
        for layer in range(m.config.n_layers):
            current = m.runner.active[layer] if m.plan.prune else m.arena.pinned_experts(layer)
            sets.append(router.reselect(current, scores[layer]) if current is not None and len(current)
                        else router.top_k(scores[layer], m.plan.active_per_layer[layer]))
        router.apply_sets(m.arena, m.runner, sets, prune=m.plan.prune)
        m.arena.count_reselection()
        m.scorer.reset()
        self._since_select = 0

    def _static_sets(self) -> list[np.ndarray]:
        scores = router.load_static(self.path)
        m = self.model
        if scores is None or scores.shape != m.arena.n_neurons.shape:
            scores = self.calibrate()
        return [router.top_k(scores[l], k) for l, k in enumerate(m.plan.active_per_layer)]

    def calibrate(self, n_tokens: int = 4096) -> np.ndarray:
        """The static policy's scores: GRIFFIN statistics of every expert over calibration text
        (texts.calibration_text: the Python standard library's docstrings and comments), run with
        every expert; stored beside the model."""
        from flashinfer_cli import texts

        m = self.model
        ids = self.tokenize(texts.calibration_text())[:min(n_tokens, self.ctx)]
        m.reset()
        m.scorer.reset()
        m.collect, m.full = m.scorer.add, True
        try:
            for i in range(0, len(ids), m.prefill_chunk):
                m.forward(ids[i:i + m.prefill_chunk])
        finally:
            m.collect, m.full = None, not m.plan.prune
            m.reset()
            self._cached = []
        scores = m.scorer.all_scores()
        m.scorer.reset()
        try:
            router.save_static(self.path, scores)
        except OSError:
            pass  # a read-only store: the scores are recomputed next time
        return scores

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
        keep = 0
        limit = min(len(self._cached), len(ids) - 1)
        while keep < limit and self._cached[keep] == ids[keep]:
            keep += 1
        self.model.truncate(keep)
        self._cached = self._cached[:keep]
        self.model.arena.begin_request()
        logits = self._select_forward(list(ids[keep:]))
        self._cached = list(ids)
        return logits

    def _step(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.model.forward(list(ids))
        self._cached.extend(ids)
        self._since_select += len(ids)
        if self.selects and self.reselect and self._since_select >= self.reselect:
            self._reselect()
        return logits

    def close(self) -> None:
        self.model.close()


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
