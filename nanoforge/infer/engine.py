"""Text generation with the KV cache: prefill the prompts once, then decode one token per step.

    from nanoforge.infer.engine import generate, stream
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=50, temperature=0.8, top_p=0.9, seed=0)
    for token in stream(model, [1, 2, 3], max_new_tokens=50, stop_tokens=[eos]):
        print(token)

A batch of prompts of different lengths is left-padded into one KV cache (see `nanoforge.model.KVCache`);
each sequence ends on its own (stop token, `max_new_tokens`, or the context limit) and is then dropped
from the batch, so finished sequences cost nothing.

Context limit: prompt + generated tokens never exceed `cfg.seq_len`. A sequence that reaches it simply
stops (its output is shorter than `max_new_tokens`); a prompt of `seq_len` tokens or more is refused with
a `NanoforgeError` (the caller must truncate it: only it knows which end of a chat may be dropped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, KVCache


def generate(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The generated tokens of each prompt (stop token excluded). `temperature=0` is greedy decoding;
    `seed` makes sampling reproducible. `use_cache=False` recomputes every sequence from scratch at each
    step: slow, it is the reference the cached path is tested against (same tokens, same random draws)."""
    outs: list[list[int]] = [[] for _ in prompts]
    for emitted in _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache):
        for row, token in emitted:
            outs[row].append(token)
    return outs


def stream(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """The tokens `generate` would return for this one prompt, each yielded as soon as it is sampled.

    The model stays in eval mode until the iterator is exhausted or closed; autograd is off only inside
    each step, never while the caller's code runs between tokens."""
    steps = _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache)
    try:
        for emitted in steps:
            for _, token in emitted:
                yield token
    finally:  # closing this iterator early closes the decoder now (restoring the training mode)
        steps.close()


def _decode(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int],
    seed: int | None,
    use_cache: bool,
) -> Iterator[list[tuple[int, int]]]:
    """Yields, per decoding step, the (prompt index, token) pairs emitted by the still-active sequences."""
    cfg = model.cfg
    _check(cfg.vocab_size, cfg.seq_len, prompts, max_new_tokens, temperature, top_k, top_p)
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    stop = set(stop_tokens)
    # tokens each sequence may still produce: its share of max_new_tokens and of the context
    budget = [min(max_new_tokens, cfg.seq_len - len(p)) for p in prompts]
    active = [i for i, b in enumerate(budget) if b > 0]
    if not active:
        return

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                longest = max(len(prompts[i]) for i in active)
                pad = [longest - len(prompts[i]) for i in active]
                idx = torch.tensor([[0] * n + prompts[i] for n, i in zip(pad, active, strict=True)])
                cache = KVCache(len(active), longest + max(budget), cfg, param.device, param.dtype, pad=pad)
                logits = model(idx.to(param.device), kv_cache=cache, last_only=True)[:, -1]
            else:
                seqs = {i: list(prompts[i]) for i in active}
                logits = _full_logits(model, [seqs[i] for i in active], param.device)
            tokens = _sample(logits, temperature, top_k, top_p, generator).tolist()

        while True:
            emitted, keep = [], []
            for j, (row, token) in enumerate(zip(active, tokens, strict=True)):
                if token in stop:
                    continue
                emitted.append((row, token))
                budget[row] -= 1
                if budget[row] > 0:
                    keep.append(j)
            yield emitted
            if not keep:
                return
            tokens = [tokens[j] for j in keep]
            with torch.inference_mode():
                if use_cache:
                    if len(keep) < len(active):
                        cache.select(keep)
                    step = torch.tensor(tokens, device=param.device)[:, None]  # (B, 1)
                    logits = model(step, kv_cache=cache)[:, -1]
                else:
                    for row, token in zip([active[j] for j in keep], tokens, strict=True):
                        seqs[row].append(token)
                    logits = _full_logits(model, [seqs[active[j]] for j in keep], param.device)
                active = [active[j] for j in keep]
                tokens = _sample(logits, temperature, top_k, top_p, generator).tolist()
    finally:
        model.train(was_training)


def _full_logits(model: GPT, seqs: list[list[int]], device: torch.device) -> Tensor:
    """Last-position logits (B, V) of each sequence run alone from its first token (no cache, no padding)."""
    return torch.cat([model(torch.tensor([s], device=device), last_only=True)[:, -1] for s in seqs])


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Next token per row of logits (B, V): greedy at temperature 0, else a draw from the softmax of the
    logits / temperature restricted to the top_k tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps at least one)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(
    vocab_size: int,
    seq_len: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if max_new_tokens < 0:
        raise NanoforgeError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise NanoforgeError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise NanoforgeError(f"generate: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise NanoforgeError(f"generate: top_p must be in (0, 1], got {top_p}")
    for i, p in enumerate(prompts):
        if not p:
            raise NanoforgeError(f"generate: prompt {i} is empty (it needs at least one token, e.g. BOS)")
        if len(p) >= seq_len:
            raise NanoforgeError(
                f"generate: prompt {i} has {len(p)} tokens; the model's context is {seq_len} "
                f"(prompt + generated tokens must fit), truncate it"
            )
        if min(p) < 0 or max(p) >= vocab_size:
            raise NanoforgeError(f"generate: prompt {i} has a token id outside [0, {vocab_size})")
