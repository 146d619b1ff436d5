"""The one decoding core: a step API that serves every task (DESIGN.md section 2).

`Generation` owns one response's KV cache and advances one step per `step()` call,
returning the step's text token, its 7 audio tokens (audio-out tasks) and the SNAC
frame that step completed, if any. `step_batch(gens)` steps several responses with one
forward (continuous batching). Stop rules, their order and the token budget follow
upstream Mini-Omni exactly, so greedy outputs are token-identical.

Steps are all-or-nothing: `begin_step` changes nothing, the forward commits a cache only
when it completes, and a response's state advances only in `finish_step` after its tokens
were sampled. A step that raised can therefore be retried (alone or batched) and yields the
tokens an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .codec import dedelay
from .llm import CacheRows, KVCache, OmniLM
from .prompts import Prompt


@dataclass(frozen=True)
class SamplingConfig:
    """Upstream's defaults: temperature 0.9 with top_k 1, i.e. greedy."""

    temperature: float = 0.9
    top_k: int | None = 1
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature <= 0.0


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (R, V) -> (R,) ids. Order as upstream: top-k, temperature, top-p, then draw."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        v, i = torch.topk(logits, cfg.top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, i, v)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # always keep the most probable token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class StepOutput:
    step: int  # 0 = the prefill step
    text: int  # text token as kept (after _pad_t replacement once text has ended)
    audio: tuple[int, ...] | None  # 7 local audio ids, audio-out tasks only
    frame: tuple[int, ...] | None  # the de-delayed frame this step completed (raw ids)


@dataclass(frozen=True)
class _Decision:
    """What a step sampled, before anything of the Generation changed."""

    text: int
    audio: torch.Tensor | None  # (7,)
    stop: str | None  # "eoa" | "eot": this step ends the answer and keeps nothing
    text_ends: bool = False


@dataclass
class GenerationResult:
    text_steps: list[int]  # text token of every kept step
    audio_steps: torch.Tensor  # (7, S) local audio ids of every kept step (empty for text-out)
    stop: str  # "eoa" | "eot" | "budget"
    eot: int = field(repr=False, default=-1)

    @property
    def num_steps(self) -> int:
        return len(self.text_steps)

    @property
    def text_tokens(self) -> list[int]:
        """The answer's text ids up to (not including) the first _eot."""
        out = []
        for t in self.text_steps:
            if t == self.eot:
                break
            out.append(t)
        return out

    @property
    def frames(self) -> torch.Tensor:
        """(N, 7) de-delayed frames (raw ids)."""
        if self.audio_steps.numel() == 0:
            return torch.zeros((0, 7), dtype=torch.long)
        return dedelay(self.audio_steps)


def shared_prefix(prompt: Prompt) -> int:
    """How many leading positions every row of `prompt` has alike (ids and spliced features),
    never the last (each row's last hidden state is sampled); 0 for one row."""
    if prompt.rows < 2:
        return 0
    differs = (prompt.ids != prompt.ids[:1]).flatten(0, 1).any(0)  # (T,)
    n = int(differs.to(torch.int8).argmax()) if bool(differs.any()) else prompt.length
    for splice in prompt.splices:
        f = splice.features
        if not all(torch.equal(f[i], f[0]) for i in range(1, f.shape[0])):
            n = min(n, splice.start)
    return min(n, prompt.length - 1)


class Generation:
    """One response: prefill on the first `step()`, one decode step per later call."""

    def __init__(
        self,
        model: OmniLM,
        prompt: Prompt,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        stop_rules: bool = True,
    ) -> None:
        """stop_rules=False runs exactly the budget (benchmarks time steps, not answers)."""
        self.model = model
        self.stop_rules = stop_rules
        self.prompt = prompt
        self.layout = model.layout
        self.sampling = sampling or SamplingConfig()
        block = model.config.block_size
        if prompt.length >= block:
            raise ValueError(f"prompt of {prompt.length} positions does not fit the model's {block}-token window")
        # Upstream: max_returned_tokens = block_size, i.e. at most block_size - T kept steps.
        self.max_steps = block - prompt.length
        if max_new_tokens is not None:
            self.max_steps = max(1, min(self.max_steps, max_new_tokens))
        # On the model's device (a CPU generator cannot draw for CUDA logits). seed=None draws a
        # fresh seed from the OS per Generation; `self.seed` records it so a run can be replayed.
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        if not self.sampling.greedy:
            self.generator = torch.Generator(device=model.device)
            if self.sampling.seed is None:
                self.seed = self.generator.seed()
            else:
                self.seed = self.sampling.seed
                self.generator.manual_seed(self.seed)
        self.cache = model.new_cache()
        self.prefilled = 0  # prompt positions already in the cache (prefill_part)
        self._prompt_embeds: torch.Tensor | None = None
        # Positions every row of the prompt has alike (A1->A2's two rows differ only in the
        # last): prefilled for one row, then copied to the others (_forward_prompt).
        self.shared_prefix = shared_prefix(prompt)
        self._shared_cache: KVCache | None = None
        self.steps_done = 0
        self.text_ended = False
        self.stop: str | None = None
        self.text_steps: list[int] = []
        self.audio_steps: list[torch.Tensor] = []  # each (7,)
        self._feedback: torch.Tensor | None = None  # (B, 8, 1) global ids for the next step
        n = self.layout.num_audio_layers
        self._audio_shift = self.layout.audio_shifts()  # (7,)
        self._pad_a_ids = torch.full((n,), self.layout.pad_a, dtype=torch.long) + self._audio_shift

    @property
    def done(self) -> bool:
        return self.stop is not None

    def step(self) -> StepOutput | None:
        """Run one step on this response alone: the prefill first, then one decode step per call."""
        return step_batch([self])[0]

    @property
    def in_prefill(self) -> bool:
        return self.steps_done == 0

    @property
    def prefill_left(self) -> int:
        """Prompt positions not yet in the cache (all of them before the first step)."""
        return self.prompt.length - self.prefilled if self.steps_done == 0 else 0

    @torch.inference_mode()
    def prefill_part(self, max_positions: int) -> bool:
        """Run part of the prefill (no sampling) when more than `max_positions` prompt
        positions are left: the next of equal parts of at most `max_positions`, so no part is
        much smaller than the others. False (nothing done) when the rest fits one part: the
        next `step()` prefills it and samples. A runner interleaves these parts with other
        responses' decode steps, so a long prompt does not hold them for its whole prefill.

        The same positions and masks as one prefill (exact math; floats may round differently
        in other GEMM shapes). If it raises, nothing changed (the retry rewrites the cache)."""
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        left = self.prefill_left
        if left <= max_positions or self.stop is not None:
            return False
        parts = -(-left // max_positions)
        stop = self.prefilled + -(-left // parts)
        if self.prefilled < self.shared_prefix:  # a part ends where the rows start to differ
            stop = min(stop, self.shared_prefix)
        self._forward_prompt(stop)
        return True

    def _forward_prompt(self, stop: int) -> None:
        """Prompt positions [prefilled, stop) into the cache. Those of the shared prefix go
        through one row, into a cache of its own that becomes every row's once the prefix is
        done (exact: the rows' inputs there are equal). If it raises, nothing changed."""
        embeds, start = self._embedded_prompt(), self.prefilled
        if stop <= self.shared_prefix:
            cache = self._shared_cache or self.model.new_cache()
            self.model.hidden(embeds[:1, start:stop], cache, start)
            self._shared_cache = cache
            if stop == self.shared_prefix:
                self.cache, self._shared_cache = cache.repeat_rows(self.prompt.rows), None
        else:
            self.model.hidden(embeds[:, start:stop], self.cache, start)
        self.prefilled = stop

    def prefill_shared_prefix(self) -> None:
        """The rest of the shared prefix, if any is left (step_batch does this first)."""
        if self.steps_done == 0 and self.prefilled < self.shared_prefix and self.stop is None:
            self._forward_prompt(self.shared_prefix)

    def _embedded_prompt(self) -> torch.Tensor:
        if self._prompt_embeds is None:
            self._prompt_embeds = self.model.embed(self.prompt.ids.to(self.model.device), self.prompt.splices)
        return self._prompt_embeds

    @torch.inference_mode()
    def begin_step(self) -> tuple[torch.Tensor, int] | None:
        """The next step's input embeddings (B, T, C) and first position, or None when done.
        Changes nothing: call it again after a failed step.

        With the model's `hidden_batched` and `finish_step`, lets a runner put the steps of
        many responses into one forward (what `step_batch` does)."""
        if self.stop is not None or self.steps_done >= self.max_steps:
            return None
        if self.steps_done == 0:  # the prefill, or what prefill_part left of it
            return self._embedded_prompt()[:, self.prefilled :], self.prefilled
        assert self._feedback is not None
        return self.model.embed(self._feedback.to(self.model.device)), self.prompt.length + self.steps_done - 1

    @torch.inference_mode()
    def finish_step(self, h: torch.Tensor) -> StepOutput | None:
        """Sample from the step's last hidden states h (B, C) and apply upstream's stop rules.
        If it raises, the Generation (sampling generator included) is as before."""
        state = self._rng_state()
        try:
            decision = self._decide(*head_logits(self.model, [(h, self._head_rows())])[0])
        except BaseException:
            self._restore_rng(state)
            raise
        return self._commit(decision)

    def _rng_state(self) -> torch.Tensor | None:
        return self.generator.get_state() if self.generator is not None else None

    def _restore_rng(self, state: torch.Tensor | None) -> None:
        if self.generator is not None and state is not None:
            self.generator.set_state(state)

    def _head_rows(self) -> tuple[int | None, int | None]:
        """The rows of this step's hidden states that the audio and the text head read (None:
        that head is not read)."""
        task = self.prompt.task
        audio = self.prompt.audio_row if task.audio_out else None
        text = None if task.audio_out and self.text_ended else self.prompt.text_row
        return audio, text

    def _decide(self, audio_logits: torch.Tensor | None, text_logits: torch.Tensor | None) -> _Decision:
        """Sample this step's tokens from its head logits (`head_logits`, for `_head_rows`) and
        judge the stop rules; changes nothing but the generator."""
        task, layout = self.prompt.task, self.layout
        first = self.steps_done == 0
        audio: torch.Tensor | None = None
        if audio_logits is not None:
            audio = sample(audio_logits, self.sampling, self.generator).cpu()  # (7,)
        if text_logits is None:
            text = layout.pad_t  # rule (1): once text has ended, _pad_t in output and feedback
        else:
            text = int(sample(text_logits, self.sampling, self.generator)[0])
        if not first and self.stop_rules:
            if task.audio_out:
                assert audio is not None
                if int(audio[-1]) == layout.eoa:  # rule (2): the last layer's _eoa ends the answer
                    return _Decision(text, audio, "eoa")
                if text == layout.eot:  # rule (3): the _eot itself is kept
                    return _Decision(text, audio, None, text_ends=True)
            elif text == layout.eot:
                return _Decision(text, audio, "eot")
        return _Decision(text, audio, None)

    def _commit(self, d: _Decision) -> StepOutput | None:
        """Advance the state by a decided step (cannot fail: plain bookkeeping)."""
        if d.stop is not None:
            self.stop = d.stop
            return None
        self.text_ended = self.text_ended or d.text_ends
        s = self.steps_done
        self.text_steps.append(d.text)
        frame = None
        if d.audio is not None:
            self.audio_steps.append(d.audio)
            n = self.layout.num_audio_layers
            if len(self.audio_steps) > n:
                f = len(self.audio_steps) - n - 1
                frame = tuple(int(self.audio_steps[f + i + 1][i]) for i in range(n))
        self._feedback = self._make_feedback(d.text, d.audio)
        if self.steps_done == 0:
            self.prefilled, self._prompt_embeds = self.prompt.length, None
        self.steps_done += 1
        if self.steps_done >= self.max_steps:
            self.stop = "budget"
        audio = tuple(int(a) for a in d.audio) if d.audio is not None else None
        return StepOutput(s, d.text, audio, frame)

    def _make_feedback(self, text: int, audio: torch.Tensor | None) -> torch.Tensor:
        rows = self.prompt.rows
        ids = torch.empty((rows, self.layout.num_streams, 1), dtype=torch.long)
        ids[:, : self.layout.num_audio_layers, 0] = self._pad_a_ids
        if audio is not None:
            ids[self.prompt.audio_row, : self.layout.num_audio_layers, 0] = audio + self._audio_shift
        ids[:, self.layout.text_stream, 0] = text
        return ids

    def __iter__(self) -> Iterator[StepOutput]:
        while (out := self.step()) is not None:
            yield out

    def run(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        audio = (
            torch.stack(self.audio_steps, dim=1)
            if self.audio_steps
            else torch.zeros((self.layout.num_audio_layers, 0), dtype=torch.long)
        )
        return GenerationResult(list(self.text_steps), audio, self.stop or "running", eot=self.layout.eot)


def head_logits(
    model: OmniLM, steps: Sequence[tuple[torch.Tensor, tuple[int | None, int | None]]]
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per response (its step's hidden states (B, C), the rows its audio and text head read)
    -> its audio logits (7, V_audio) and text logits (1, V_text), None where not read. Each
    head runs once over every response's row: a call reads the whole slice (the text slice is
    136 MB in int8, ~8 ms here), so one call for four rows costs ~1.2 of one for one row. The
    int8 heads compute each row alone (bit-identical to a call per response, tested)."""
    audio_rows = [h[a] for h, (a, _) in steps if a is not None]
    text_rows = [h[t] for h, (_, t) in steps if t is not None]
    audio = iter(model.audio_logits(torch.stack(audio_rows))) if audio_rows else iter(())
    text = iter(model.text_logits(torch.stack(text_rows))) if text_rows else iter(())
    return [
        (next(audio) if a is not None else None, next(text)[None] if t is not None else None) for _, (a, t) in steps
    ]


@torch.inference_mode()
def step_batch(gens: Sequence[Generation]) -> list[StepOutput | None]:
    """One step of each generation (of one model): one forward per distinct step length, so
    all decode steps share one, then sampling. Returns each one's `step()` result (None: done,
    `gen.stop` says why).

    All or nothing: if it raises, no Generation has changed and no cache lost a valid position
    (a failed forward commits nothing; after a completed one a cache may hold this step's keys,
    which the retry rewrites in place: model.llm.KVCache), except that a prompt's shared
    prefix, prefilled first through one row, may stay done (a retry goes on from there). So
    the caller may retry each response alone with `step()` (or any subset with `step_batch`)
    and gets the tokens of an uninterrupted run."""
    if len({id(g) for g in gens}) != len(gens):
        raise ValueError("a Generation appears twice in one batch")
    outs: list[StepOutput | None] = [None] * len(gens)
    if not gens:
        return outs
    model = gens[0].model
    by_length: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
    for i, g in enumerate(gens):
        if g.model is not model:
            raise ValueError("step_batch steps generations of one model")
        g.prefill_shared_prefix()
        nxt = g.begin_step()
        if nxt is not None:
            by_length.setdefault(nxt[0].shape[1], []).append((i, *nxt))
    hidden: dict[int, torch.Tensor] = {}
    for items in by_length.values():
        groups, row = [], 0
        for i, embeds, pos in items:
            groups.append(CacheRows(gens[i].cache, pos, slice(row, row + embeds.shape[0])))
            row += embeds.shape[0]
        h = model.hidden_batched(torch.cat([e for _, e, _ in items]), groups)[:, -1]  # (N, C)
        for (i, _, _), grp in zip(items, groups, strict=True):
            hidden[i] = h[grp.rows]
    # Sample every response before committing any, so a failure leaves all as they were.
    states = [g._rng_state() for g in gens]
    try:
        order = sorted(hidden)
        logits = head_logits(model, [(hidden[i], gens[i]._head_rows()) for i in order])
        decisions = {i: gens[i]._decide(*lg) for i, lg in zip(order, logits, strict=True)}
    except BaseException:
        for g, state in zip(gens, states, strict=True):
            g._restore_rng(state)
        raise
    for i, d in decisions.items():
        outs[i] = gens[i]._commit(d)
    return outs
