"""Text generation with the KV cache: prefill the prompts once, then decode one token per step.

    from nanoforge.infer.engine import generate, stream
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=50, temperature=0.8, top_p=0.9, seed=0)
    for token in stream(model, [1, 2, 3], max_new_tokens=50, stop_tokens=[eos]):
        print(token)

A batch of prompts of different lengths is left-padded into one KV cache (see `nanoforge.model.KVCache`);
each sequence ends on its own (stop token, `max_new_tokens`, or the context limit) and is then dropped
from the batch, so finished sequences cost nothing.

Speed. The prompts go through `GPT.forward` once (prefill); each later step is one token per sequence,
where a CPU spends its time on per-operation overhead and on streaming every weight from memory, not on
arithmetic. So the decode step runs the model's math for T = 1 with the per-call work hoisted out of the
loop: the weight matrices are taken once (on a CPU as contiguous transposed copies: `x @ Wᵀ` with a
(in, out) row-major matrix is ~1.5x faster there than `F.linear`), the RoPE angles and each row's padding
are prepared once, each layer writes its cache slot in place, and the sampled tokens stay a tensor.
- `CpuDecodeStep` (a float32 model on a CPU): the matrix products are torch calls into preallocated
  buffers, and everything between them (norms, QK-norm, RoPE, cache write, attention, activation) is one
  compiled numba kernel per piece and layer (`nanoforge.infer.kernels`): ~8 calls per layer instead of ~40
  torch ops, which at batch 1 leaves the step bound by the weights' memory traffic.
- `_DecodeStep` (GPUs, bf16): the same math as torch ops, residual additions riding on `addmm`.
A model whose modules are not plain `nn.Linear`/norm layers (LoRA adapters, FSDP, hooks) takes
`GPT.forward` for every step instead. Preparing a step copies the weights on a CPU; a `Decoder` keeps it
across calls for callers whose weights stay fixed (chat turns, evaluation batches, the server).
tests/test_engine.py proves every path gives the tokens of recomputing from scratch;
benchmarks/bench_generate.py measures them against `transformers`.

Context limit: prompt + generated tokens never exceed `cfg.seq_len`. A sequence that reaches it simply
stops (its output is shorter than `max_new_tokens`); a prompt of `seq_len` tokens or more is refused with
a `NanoforgeError` (the caller must truncate it: only it knows which end of a chat may be dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoforge.errors import NanoforgeError
from nanoforge.infer import kernels
from nanoforge.model import GPT, MLP, Attention, Block, KVCache, _rope_cos_sin


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
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """The generated tokens of each prompt (stop token excluded). `temperature=0` is greedy decoding;
    `seed` makes sampling reproducible. `use_cache=False` recomputes every sequence from scratch at each
    step: slow, it is the reference the cached path is tested against (same tokens, same random draws).
    `decoder`: a `Decoder(model)` kept across calls while the weights stay fixed (see `Decoder`)."""
    outs: list[list[int]] = [[] for _ in prompts]
    for emitted in _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache,
                           decoder):
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
    decoder: Decoder | None = None,
) -> Iterator[int]:
    """The tokens `generate` would return for this one prompt, each yielded as soon as it is sampled.

    The model stays in eval mode until the iterator is exhausted or closed; autograd is off only inside
    each step, never while the caller's code runs between tokens."""
    steps = _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache,
                    decoder)
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
    decoder: Decoder | None,
) -> Iterator[list[tuple[int, int]]]:
    """Yields, per decoding step, the (prompt index, token) pairs emitted by the still-active sequences."""
    cfg = model.cfg
    _check(cfg.vocab_size, cfg.seq_len, prompts, max_new_tokens, temperature, top_k, top_p)
    decoder = Decoder.of(model, decoder, "generate")
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
                cache, logits = prefill(model, [prompts[i] for i in active], max(budget))
            else:
                seqs = {i: list(prompts[i]) for i in active}
                logits = _full_logits(model, [seqs[i] for i in active], param.device)
            sampled = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
            tokens = sampled.tolist()

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
            with torch.inference_mode():
                if len(keep) < len(active):
                    sampled = sampled[torch.tensor(keep, device=sampled.device)]
                    tokens = [tokens[j] for j in keep]
                if use_cache:
                    if len(keep) < len(active):
                        cache.select(keep)
                        decoder.refresh(cache)
                    logits = decoder(sampled, cache)
                else:
                    for row, token in zip([active[j] for j in keep], tokens, strict=True):
                        seqs[row].append(token)
                    logits = _full_logits(model, [seqs[active[j]] for j in keep], param.device)
                active = [active[j] for j in keep]
                sampled = _sample(logits, temperature, top_k, top_p, generator)
                tokens = sampled.tolist()
    finally:
        model.train(was_training)
        decoder.release()


def prefill(model: GPT, prompts: list[list[int]], room: int) -> tuple[KVCache, Tensor]:
    """Run the prompts, left-padded to the longest, into a new KV cache with `room` free slots after them;
    returns the cache and each prompt's next-token logits (B, V)."""
    param = next(model.parameters())
    longest = max(map(len, prompts))
    pad = [longest - len(p) for p in prompts]
    idx = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=param.device)
    cache = KVCache(len(prompts), longest + room, model.cfg, param.device, param.dtype, pad=pad)
    return cache, model(idx, kv_cache=cache, last_only=True)[:, -1]


class Decoder:
    """One model's decode step, kept across `generate`/`stream` calls (their `decoder=`) and cache changes.

    `decoder(tokens, cache)` is `model(tokens[:, None], kv_cache=cache)[:, -1]`: through `_DecodeStep` or
    `CpuDecodeStep`, built at the first call, where the model is plain (`_plain`), else through the modules.
    Building a step copies the weight matrices on a CPU (transposed, see the module docstring): for
    gpt2-124m 0.4 s, as long as a dozen decode steps there. A caller whose weights stay fixed between calls
    (a chat's turns, an evaluation's batches, the server's requests) keeps one `Decoder` and pays that once.
    Weights that change (training between two generations) need a new `Decoder`: on a CPU the step decodes
    from its copies, and in-place optimizer updates leave no trace to check (fused AdamW does not even bump
    the parameters' version counters). `generate` and `stream` without `decoder=` build their own per call.
    One caller at a time: a step is bound to one KV cache (the server decodes in one worker thread).
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.fast = _plain(model)
        self.step: _DecodeStep | CpuDecodeStep | None = None

    @classmethod
    def of(cls, model: GPT, decoder: Decoder | None, who: str) -> Decoder:
        """`decoder` if given (it must be `model`'s), else a new one for `model`."""
        if decoder is None:
            return cls(model)
        if decoder.model is not model:
            raise NanoforgeError(f"{who}: the decoder was made for another model")
        return decoder

    def __call__(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """tokens (B,) -> next-token logits (B, V) float32; advances `cache` by one slot."""
        if not self.fast:  # adapters, hooks: through the modules
            return self.model(tokens[:, None], kv_cache=cache)[:, -1]
        if self.step is None:
            param = next(self.model.parameters())
            cpu_f32 = param.device.type == "cpu" and param.dtype == torch.float32
            self.step = (CpuDecodeStep if cpu_f32 else _DecodeStep)(self.model, cache)
        elif self.step.cache is not cache:
            self.step.bind(cache)
        return self.step(tokens)

    def refresh(self, cache: KVCache) -> None:
        """`cache` dropped rows (`cache.select`): re-derive the step's views of it if it decodes into it."""
        if self.step is not None and self.step.cache is cache:
            self.step.refresh()

    def release(self) -> None:
        """Forget the cache decoded into last (its memory goes with it); the prepared weights stay."""
        if self.step is not None:
            self.step.release()


def _plain(model: GPT) -> bool:
    """Whether `model` is exactly the math of `nanoforge.model`, so `_DecodeStep` may read its weights:
    no subclass, wrapper or hook may change what a module computes (LoRA adapters, FSDP, quantisation)."""
    allowed = (GPT, Block, Attention, MLP, nn.ModuleList, nn.Embedding, nn.Linear, nn.RMSNorm, nn.LayerNorm)
    return all(type(m) in allowed and not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


class _DecodeStep:
    """`model(tokens[:, None], kv_cache=cache)[:, -1]` for one token per sequence, with what does not
    change between steps prepared once: per-layer weights (transposed copies on a CPU), norms as direct
    calls, the cache's per-layer views, RoPE cos/sin of every slot and each row's padding mask. Residual
    additions ride on the projections' matmuls (`addmm`).

    `cache.select(rows)` (dropping finished sequences) must be followed by `refresh()`.
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        cfg = model.cfg
        self.cfg, self.cache = cfg, cache
        self.gqa = bool(cfg.n_kv_head != cfg.n_head)
        cpu = next(model.parameters()).device.type == "cpu"

        def matrix(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
            w = linear.weight.detach().t()  # (in, out)
            return (w.contiguous() if cpu else w), linear.bias

        self.layers = [
            (
                _norm(b.norm1),
                *matrix(b.attn.qkv),
                None if b.attn.q_norm is None else (_norm(b.attn.q_norm), _norm(b.attn.k_norm)),
                *matrix(b.attn.proj),
                _norm(b.norm2),
                *matrix(b.mlp.fc),
                *matrix(b.mlp.proj),
            )
            for b in model.h
        ]
        self.wte, self.wpe, self.norm_f = model.wte.weight, model.wpe, _norm(model.norm_f)
        self.lm_head = matrix(model.lm_head)[0]
        self.cos_sin = None
        if cfg.flavour == "llama":  # the angles `GPT.forward` computes, for every position: (seq_len, 1, hd) each
            cos, sin = _rope_cos_sin(torch.arange(cfg.seq_len, device=self.wte.device), cfg)
            self.cos_sin = torch.cat([cos[0], cos[0]], dim=-1), torch.cat([-sin[0], sin[0]], dim=-1)
        self.refresh()

    def bind(self, cache: KVCache) -> None:
        """Decode into another cache (of the same model) from now on; the prepared weights are kept."""
        self.cache = cache
        self.refresh()

    def release(self) -> None:
        """Drop every reference to the cache until the next `bind`."""
        self.cache = self.k = self.v = self.mask = None

    def refresh(self) -> None:
        """Re-derive what depends on the cache's rows (after `cache.select`)."""
        cache = self.cache
        self.slots = torch.arange(cache.max_len, device=self.wte.device)
        self.k, self.v = cache.k.unbind(0), cache.v.unbind(0)  # per layer (B, KV, S, hd)
        # (B, 1, 1, S): a row never attends to its padding slots
        self.mask = None if cache.pad is None else (self.slots[None, :] >= cache.pad[:, None])[:, None, None]

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B,) -> next-token logits (B, V) float32; advances the cache by one slot."""
        cfg, cache = self.cfg, self.cache
        B, pos = tokens.shape[0], cache.pos
        if pos >= cache.max_len:
            raise NanoforgeError(f"model: KV cache of {cache.max_len} slots is full (pos={pos}, T=1)")
        H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        at = pos if cache.pad is None else pos - cache.pad  # each row's position: scalar or (B,)
        x = F.embedding(tokens, self.wte)  # (B, d)
        if self.wpe is not None:
            x = x + self.wpe.weight[at]
        rope = None
        if self.cos_sin is not None:  # (1|B, 1, hd) to broadcast over (B, heads, hd)
            cos, sin = self.cos_sin
            rope = cos[at], sin[at]
        mask = None if self.mask is None else self.mask[..., : pos + 1]
        swiglu = cfg.flavour == "llama"
        for layer, (norm1, w_qkv, b_qkv, qk_norm, w_o, b_o, norm2, w_fc, b_fc, w_down, b_down) in enumerate(
            self.layers
        ):
            h = norm1(x)
            qkv = (h @ w_qkv if b_qkv is None else torch.addmm(b_qkv, h, w_qkv)).view(B, H + 2 * KV, hd)
            qk, v = qkv.split([H + KV, KV], dim=1)
            if qk_norm is not None:
                q, k = qk.split([H, KV], dim=1)
                qk = torch.cat([qk_norm[0](q), qk_norm[1](k)], dim=1)
            if rope is not None:  # `Rotary`'s x·cos + rotate_half(x)·sin, bit for bit, in 3 ops instead of 8
                qk = torch.addcmul(qk * rope[0], qk.roll(hd // 2, dims=-1), rope[1]).to(qk.dtype)
            q, k = qk.split([H, KV], dim=1)
            k_cache, v_cache = self.k[layer], self.v[layer]
            k_cache.select(2, pos).copy_(k)
            v_cache.select(2, pos).copy_(v)
            keys, values = k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1)
            y = F.scaled_dot_product_attention(
                q[:, :, None].to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=self.gqa
            )  # (B, H, 1, hd)
            x = torch.addmm(x, y.view(B, H * hd), w_o)  # x + attention @ W_o
            if b_o is not None:
                x += b_o
            h = norm2(x)
            h = h @ w_fc if b_fc is None else torch.addmm(b_fc, h, w_fc)
            if swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate="tanh")
            x = torch.addmm(x, h, w_down)
            if b_down is not None:
                x += b_down
        cache.pos += 1
        return (self.norm_f(x) @ self.lm_head).float()


class CpuDecodeStep:
    """`_DecodeStep` for a float32 model on a CPU: the matrix products stay torch (MKL) calls into
    preallocated buffers, and everything between them is one compiled call per piece and layer
    (`nanoforge.infer.kernels`: embedding, norms, QK-norm + RoPE + cache write + attention, activation),
    on numpy views of the same memory. Same interface and results as `_DecodeStep` (float32 rounding aside).
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        cfg = model.cfg
        self.cfg, self.cache = cfg, cache

        def matrix(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:  # (in, out) row-major, see _DecodeStep
            bias = None if linear.bias is None else linear.bias.detach()
            return linear.weight.detach().t().contiguous(), bias

        def norm(module: nn.Module | None) -> tuple[np.ndarray, np.ndarray, float]:
            """(gain, bias, eps) as the kernels take them; a norm without gain or bias gets ones or zeros."""
            if module is None:
                return _EMPTY, _EMPTY, 0.0
            eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
            size = module.normalized_shape[-1]
            gain = np.ones(size, np.float32) if module.weight is None else module.weight.detach().numpy()
            bias = getattr(module, "bias", None)
            return gain, np.zeros(size, np.float32) if bias is None else bias.detach().numpy(), eps

        self.layers = [
            (
                norm(b.norm1),
                *matrix(b.attn.qkv),
                norm(b.attn.q_norm)[0],  # empty without QK-norm
                norm(b.attn.k_norm)[0],
                *matrix(b.attn.proj),
                norm(b.norm2),
                *matrix(b.mlp.fc),
                *matrix(b.mlp.proj),
            )
            for b in model.h
        ]
        self.centered = cfg.flavour == "gpt2"  # LayerNorm, else RMSNorm
        self.qk_eps = norm(model.h[0].attn.q_norm)[2]  # QK-norm's eps (unused without QK-norm)
        self.wte = model.wte.weight.detach().numpy()
        self.wpe = _EMPTY2 if model.wpe is None else model.wpe.weight.detach().numpy()
        self.norm_f = norm(model.norm_f)
        self.lm_head = matrix(model.lm_head)[0]
        self.cos = self.sin = _EMPTY2
        if cfg.flavour == "llama":  # (seq_len, hd/2): the angles `GPT.forward` computes, by position
            cos, sin = _rope_cos_sin(torch.arange(cfg.seq_len), cfg)
            self.cos, self.sin = cos[0, :, 0].contiguous().numpy(), sin[0, :, 0].contiguous().numpy()
        self.refresh()

    bind = _DecodeStep.bind

    def release(self) -> None:
        """Drop every reference to the cache (and the batch-sized buffers) until the next `bind`."""
        self.cache = self.k = self.v = self.pad = None
        self.x = self.h = self.qkv = self.y = self.fc = self.act = None

    def refresh(self) -> None:
        """Re-derive what depends on the cache's rows (after `cache.select`): views and scratch buffers."""
        cfg, cache = self.cfg, self.cache
        B, hd = cache.k.shape[1], cfg.head_dim
        self.k, self.v = cache.k.numpy(), cache.v.numpy()  # (L, B, KV, S, hd), shared with the cache
        self.pad = np.zeros(B, np.int64) if cache.pad is None else cache.pad.numpy()
        w_fc, w_down = self.layers[0][8], self.layers[0][10]

        def buffer(width: int) -> tuple[Tensor, np.ndarray]:
            t = torch.empty(B, width)
            return t, t.numpy()

        self.x, self.h = buffer(cfg.n_embd), buffer(cfg.n_embd)  # residual stream, normed input
        self.qkv, self.y = buffer((cfg.n_head + 2 * cfg.n_kv_head) * hd), buffer(cfg.n_head * hd)
        self.fc, self.act = buffer(w_fc.shape[1]), buffer(w_down.shape[0])

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B,) -> next-token logits (B, V) float32; advances the cache by one slot."""
        cfg, cache = self.cfg, self.cache
        slot = cache.pos
        if slot >= cache.max_len:
            raise NanoforgeError(f"model: KV cache of {cache.max_len} slots is full (pos={slot}, T=1)")
        (x, xn), (h, hn), (qkv, qkvn), (y, yn), (fc, fcn), (act, actn) = (
            self.x, self.h, self.qkv, self.y, self.fc, self.act
        )
        # the kernels' thread pool follows torch's thread count (per calling thread: set at each step)
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        kernels.embed(tokens.numpy(), self.wte, self.wpe, slot - self.pad, xn)
        for layer, (norm1, w_qkv, b_qkv, q_gain, k_gain, w_o, b_o, norm2, w_fc, b_fc, w_down, b_down) in enumerate(
            self.layers
        ):
            kernels.norm(xn, *norm1, self.centered, hn)
            _matmul(h, w_qkv, b_qkv, qkv)
            kernels.attend(
                qkvn, self.k[layer], self.v[layer], slot, self.pad, self.cos, self.sin,
                q_gain, k_gain, self.qk_eps, cfg.n_head, yn,
            )  # fmt: skip
            x.addmm_(y, w_o)
            if b_o is not None:
                x += b_o
            kernels.norm(xn, *norm2, self.centered, hn)
            _matmul(h, w_fc, b_fc, fc)
            kernels.activate(fcn, cfg.flavour == "llama", actn)
            x.addmm_(act, w_down)
            if b_down is not None:
                x += b_down
        cache.pos += 1
        kernels.norm(xn, *self.norm_f, self.centered, hn)
        return h @ self.lm_head


def _matmul(x: Tensor, w: Tensor, bias: Tensor | None, out: Tensor) -> None:
    if bias is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(bias, x, w, out=out)


_EMPTY = np.empty(0, np.float32)  # an absent bias, gain or table, for kernels that take them
_EMPTY2 = np.empty((0, 0), np.float32)


def _norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The norm layer as a direct call of its ATen op (skipping `nn.Module.__call__`)."""
    if isinstance(module, nn.LayerNorm):
        return partial(
            torch.layer_norm,
            normalized_shape=module.normalized_shape,
            weight=module.weight,
            bias=module.bias,
            eps=module.eps,
        )
    return partial(torch.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)


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
    if np.float32(temperature) == 0:  # 0, or below float32's least number (1.4e-45): the division would be by 0
        return logits.argmax(dim=-1)
    # less the row's max first, every value is <= 0: a tiny temperature (1e-45) then sends the others to -inf
    # (probability 0) and keeps the max at 0, where logits / temperature alone would overflow to inf and the
    # softmax would be NaN. A shift of the logits leaves their softmax as it was.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps at least one)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return _draw(logits.softmax(dim=-1), generator)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row of probs (B, V), drawn by inverting the CDF: the first token whose cumulative
    probability exceeds u·total, u uniform in [0, 1). Exact like `torch.multinomial` (float64 sums), and on a
    CPU 7x (batch 1) to 37x (batch 64) faster: one uniform per row instead of multinomial's per-row setup,
    which cost more than the whole decode step of a small model. A zero-probability token spans an empty
    interval, so it is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    over = token == probs.shape[-1]  # u·total rounded up to the total: take the last possible token
    if over.any():
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        token = torch.where(over, last, token)
    return token


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
