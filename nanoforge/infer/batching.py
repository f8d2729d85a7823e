"""Continuous batching: sequences join and leave one running batch between decode steps (the server's engine).

    batch = ContinuousBatch(model, max_batch=16)
    a = batch.add(prompt_ids, max_new_tokens=64, temperature=0.0, stop_tokens=[eos])
    while batch.busy:
        for handle, token in batch.step():   # token None: that sequence has ended
            ...
        b = batch.add(...)                   # joins at the next step, while `a` is still decoding

Each `step()` advances every running sequence by one token (one decode step for all of them: the cost of
a step grows far slower than the batch, see benchmarks/bench_generate.py), then admits waiting sequences
up to `max_batch`: their prompts are prefilled together and their KV caches merged with the running one.
The merged cache is right-aligned: each row's tokens end at the same slot and it is left-padded by what it
lacks (`KVCache.pad`), so positions, masks and the decode step work as in `engine.generate`; merging also
drops the slack of rows that have ended, so the cache never holds more slots than the longest sequence
plus the largest remaining budget.

Sampling is per sequence: its own temperature, top-k, top-p, stop tokens, budget and seeded generator, so
a seeded request draws what it would draw alone (up to float rounding: a batched matrix product may round
differently from a single one). `cancel(handle)` drops a sequence at the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import Decoder, _check, _sample, prefill
from nanoforge.model import GPT, KVCache


@dataclass
class _Seq:
    handle: int
    prompt: list[int]
    budget: int  # tokens it may still emit
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: frozenset[int]
    generator: torch.Generator | None
    last: int = -1  # the token sampled last, fed at the next step


class ContinuousBatch:
    """A running batch of sequences over one KV cache; see the module docstring. Not thread-safe: one thread
    calls `add`, `cancel` and `step` (the server's generation worker)."""

    def __init__(self, model: GPT, max_batch: int = 16, decoder: Decoder | None = None) -> None:
        if max_batch < 1:
            raise NanoforgeError(f"serve: --max-batch must be >= 1, got {max_batch}")
        self.model, self.cfg, self.max_batch = model.eval(), model.cfg, max_batch
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []  # row i of the cache is running[i]
        self.cache: KVCache | None = None
        self._decoder = Decoder.of(model, decoder, "serve")  # fixed weights while the server runs: prepared once
        self._cancelled: set[int] = set()
        self._ended: list[int] = []  # added with no room to generate: reported at the next step
        self._next = 0

    @property
    def busy(self) -> bool:
        """Whether a `step()` has work: sequences running or waiting."""
        return bool(self.running or self.waiting or self._ended)

    def add(
        self,
        prompt: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        seed: int | None = None,
    ) -> int:
        """Queue one sequence (checked as `engine.generate` checks its prompts); returns its handle."""
        _check(self.cfg.vocab_size, self.cfg.seq_len, [prompt], max_new_tokens, temperature, top_k, top_p)
        handle, self._next = self._next, self._next + 1
        budget = min(max_new_tokens, self.cfg.seq_len - len(prompt))
        if budget <= 0:
            self._ended.append(handle)
            return handle
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        self.waiting.append(
            _Seq(handle, list(prompt), budget, temperature, top_k, top_p, frozenset(stop_tokens), generator)
        )
        return handle

    def cancel(self, handle: int) -> None:
        """Drop a waiting or running sequence at the next step (it gets no end event)."""
        self._cancelled.add(handle)

    def step(self) -> list[tuple[int, int | None]]:
        """One token for every running sequence, then admission of waiting ones (their first token).

        Returns (handle, token) for each token emitted and (handle, None) for each sequence that ended
        (a stop token, which is not emitted, or its budget spent)."""
        events: list[tuple[int, int | None]] = [(h, None) for h in self._ended]
        self._ended = []
        with torch.inference_mode():
            if self._cancelled:
                self.waiting = deque(s for s in self.waiting if s.handle not in self._cancelled)
                self._keep([i for i, s in enumerate(self.running) if s.handle not in self._cancelled])
                self._cancelled.clear()
            if self.running:
                tokens = torch.tensor([s.last for s in self.running], device=self.device)
                self._emit(self.running, self._decode(tokens), events)
                self._keep([i for i, s in enumerate(self.running) if s.budget > 0])
            room = self.max_batch - len(self.running)
            if self.waiting and room > 0:
                joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                cache, logits = prefill(self.model, [s.prompt for s in joining], 0)  # merged next
                self._emit(joining, logits, events)
                alive = [i for i, s in enumerate(joining) if s.budget > 0]
                self._merge(cache, [joining[i] for i in alive], alive)
        return events

    # ---- internals

    def _decode(self, tokens: Tensor) -> Tensor:
        return self._decoder(tokens, self.cache)

    def _emit(self, seqs: list[_Seq], logits: Tensor, events: list[tuple[int, int | None]]) -> None:
        """Sample each sequence's next token with its own settings; record what it emits or that it ended."""
        greedy = [i for i, s in enumerate(seqs) if s.temperature == 0]
        tokens: list[int] = [0] * len(seqs)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
                tokens[i] = t
        for i, s in enumerate(seqs):
            if s.temperature != 0:
                tokens[i] = int(_sample(logits[i : i + 1], s.temperature, s.top_k, s.top_p, s.generator))
        for s, token in zip(seqs, tokens, strict=True):
            if token in s.stop:
                s.budget = 0
            else:
                events.append((s.handle, token))
                s.last, s.budget = token, s.budget - 1
            if s.budget == 0:
                events.append((s.handle, None))

    def _keep(self, rows: list[int]) -> None:
        """Keep only these running rows (in the cache too)."""
        if len(rows) == len(self.running):
            return
        self.running = [self.running[i] for i in rows]
        if not rows:
            self.cache = None
            self._decoder.release()  # the ended batch's cache is freed; the prepared weights stay
        else:
            self.cache.select(rows)
            self._decoder.refresh(self.cache)

    def _merge(self, cache: KVCache, seqs: list[_Seq], rows: list[int]) -> None:
        """Append rows `rows` of a freshly prefilled `cache` (sequences `seqs`) to the running batch, in one
        new right-aligned cache with room for every sequence's remaining budget."""
        if not seqs:
            return
        parts = [(self.cache, r) for r in range(len(self.running))] + [(cache, r) for r in rows]
        lengths = [c.pos - (0 if c.pad is None else int(c.pad[r])) for c, r in parts]  # tokens held per row
        self.running += seqs
        pos = max(lengths)
        merged = KVCache(len(parts), pos + max(s.budget for s in self.running), self.cfg, self.device, self.dtype,
                         pad=[pos - n for n in lengths])
        for i, ((c, r), n) in enumerate(zip(parts, lengths, strict=True)):
            merged.k[:, i, :, pos - n : pos] = c.k[:, r, :, c.pos - n : c.pos]
            merged.v[:, i, :, pos - n : pos] = c.v[:, r, :, c.pos - n : c.pos]
        merged.pos = pos
        self.cache = merged
