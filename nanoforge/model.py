"""The GPT: one decoder-only transformer, in a GPT-2 or a Llama flavour chosen by `ModelConfig.flavour`.

    from nanoforge.model import GPT, ModelConfig
    model = GPT(ModelConfig(vocab_size=8192, seq_len=256, n_layer=6, n_embd=384, n_head=6))
    loss = model(idx, targets)          # idx, targets: (B, T) int64 -> scalar cross-entropy
    logits = model(idx)                 # (B, T, vocab_size) float32

Both flavours compute exactly the math of their `transformers` peer, so an exporter maps weights 1:1:

| flavour | positions | norm | MLP | biases | embeddings | `transformers` peer |
|---|---|---|---|---|---|---|
| gpt2 | learned | LayerNorm | GELU (tanh) | yes | tied | `GPT2LMHeadModel` |
| llama | RoPE (rotate_half) | RMSNorm | SwiGLU | no | untied | `LlamaForCausalLM` |

Weight mapping (ours -> `transformers`, per layer `h.{i}` -> `transformer.h.{i}` / `model.layers.{i}`):

- `attn.qkv` is one fused matmul: its weight rows are `[q; k; v]` (n_head·hd, n_kv_head·hd, n_kv_head·hd).
  Llama: `cat(q_proj, k_proj, v_proj)`. GPT-2: `c_attn.weight.T` (GPT-2's `Conv1D` stores (in, out)).
- `mlp.fc` (llama) is the fused gate/up matmul: weight rows `[gate; up]` = `cat(gate_proj, up_proj)`.
  GPT-2: `mlp.fc` = `c_fc.weight.T`; `mlp.proj` = `c_proj.weight.T`.
- `attn.proj` = `o_proj` / `attn.c_proj.weight.T`; `norm1`/`norm2` = `input_layernorm`/
  `post_attention_layernorm` (`ln_1`/`ln_2`); `norm_f` = `model.norm` (`ln_f`); `wte`, `wpe`, `lm_head`
  map by name. `qk_norm` (llama only) matches Qwen3's `q_norm`/`k_norm`: RMSNorm over each head before RoPE.

Speed (measured on CPU by benchmarks/bench_train.py): the loss never materialises the (B·T, V) logits
(`LinearCrossEntropy`), RoPE has a hand-written backward (`Rotary`), attention is
`F.scaled_dot_product_attention`. Generation uses a preallocated `KVCache` (left padding for prompts of
different lengths). The model is pure math: no devices beyond `.to`, no parallelism, no checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from nanoforge.errors import NanoforgeError

FLAVOURS = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """Shape of the network. `None` fields are resolved from the flavour when the config is built."""

    vocab_size: int
    seq_len: int  # max context: positions 0 .. seq_len-1
    n_layer: int
    n_embd: int
    n_head: int
    flavour: str = "llama"
    n_kv_head: int | None = None  # GQA: key/value heads shared by n_head // n_kv_head query heads
    mlp_hidden: int | None = None  # gpt2: 4·d; llama: 8/3·d rounded up to a multiple of 64
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # gpt2: True; llama: False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise NanoforgeError(f"model config: unknown flavour {self.flavour!r} (expected one of {FLAVOURS})")
        for name in ("vocab_size", "seq_len", "n_layer", "n_embd", "n_head"):
            if getattr(self, name) < 1:
                raise NanoforgeError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise NanoforgeError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise NanoforgeError(f"model config: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2 and self.flavour == "llama":
            raise NanoforgeError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        if self.qk_norm and self.flavour == "gpt2":
            raise NanoforgeError("model config: qk_norm is only available in the llama flavour")
        if self.mlp_hidden is None:
            if self.flavour == "gpt2":
                self.mlp_hidden = 4 * self.n_embd
            else:  # SwiGLU has 3 matrices instead of 2: 8/3·d keeps the parameter count of a 4·d MLP
                self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.flavour == "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """All fields, resolved (no `None`), JSON-able."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NanoforgeError(f"model config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)


class KVCache:
    """Preallocated keys/values of every layer for `batch` sequences of up to `max_len` slots.

    `pos` counts the slots already filled; `GPT.forward(idx, kv_cache=cache)` writes the next T slots and
    advances it. Prompts of different lengths are **left-padded**: `pad[b]` is the number of padding slots in
    front of sequence b. Its tokens then sit at positions `slot - pad[b]` (so RoPE / learned positions are
    those of the unpadded sequence) and no query attends to a padding slot.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        cfg: ModelConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        pad: list[int] | None = None,
    ) -> None:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        if pad is not None and len(pad) != batch:
            raise NanoforgeError(f"KV cache: got {len(pad)} padding lengths for a batch of {batch}")
        self.pad = None if pad is None or not any(pad) else torch.tensor(pad, device=device)

    def select(self, rows: list[int]) -> None:
        """Keep only the sequences `rows` (e.g. drop the finished ones from a batch)."""
        index = torch.tensor(rows, device=self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.flavour == "gpt2"
        # q, k and v in one matmul: one launch, one weight cast under autocast, one weight gradient
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)  # (B, T, H + 2·KV, hd)
        qk, v = qkv.split([H + KV, KV], dim=2)  # q and k heads side by side: RoPE'd in one call
        if self.q_norm is not None:  # in the norm's dtype (fp32 under autocast), like Qwen3
            q, k = qk.to(self.q_norm.weight.dtype).split([H, KV], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if rope is not None:
            qk = Rotary.apply(qk, *rope)
        q, k = qk.split([H, KV], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            # write this chunk into slots [pos, pos+T) and attend over every filled slot [0, pos+T)
            end = cache.pos + T
            cache.k[layer, :, :, cache.pos : end] = k
            cache.v[layer, :, :, cache.pos : end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            if k.dtype != q.dtype:
                q = q.to(k.dtype)
        # without a mask a chunk of T > 1 tokens is the start of the sequence: plain causal attention
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=KV != H
        )  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class Rotary(torch.autograd.Function):
    """RoPE on x (B, T, heads, hd) with cos/sin (B|1, T, 1, hd/2): HF's non-interleaved convention, each
    pair (i, i + hd/2) rotated by its position's angle, i.e. `x·cos + rotate_half(x)·sin`.

    The backward is the rotation by the opposite angle, so nothing but cos/sin is saved and autograd
    records one node instead of the chunk/mul/sub/add/cat/cast chain of the plain expression (a few %
    of a CPU training step). The rotation runs in fp32 and is rounded once to x's dtype: under autocast
    that is HF's fp32 rotation followed by the cast to bf16 that attention does.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    rotated = (torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin))
    return torch.cat(rotated, dim=-1).to(x.dtype)  # (x1·cos - x2·sin, x2·cos + x1·sin)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.flavour == "llama"
        bias = not self.swiglu
        # llama: gate and up projections fused into one matmul (rows [gate; up]), like qkv
        self.fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.mlp_hidden, bias=bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, 2·hidden) or (B, T, hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.flavour == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return nn.RMSNorm(dim, eps=cfg.norm_eps)  # F.rms_norm: a fused kernel on GPUs


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.flavour == "gpt2" else None
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices and embeddings, zero biases, unit norm gains; the residual output
        projections get init_std / sqrt(2·n_layer) so the residual stream's variance stays O(1) with depth
        (GPT-2 paper), which keeps training stable from ~1M to ~1B parameters."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        reduction: str = "mean",
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        segments: Tensor | None = None,
    ) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, V) float32; with `targets` (B, T) (-100 = ignored) -> the
        cross-entropy: a scalar (`reduction="mean"`/`"sum"`) or per-token losses (B, T) (`"none"`, 0 where
        ignored). With `kv_cache`, idx continues the cached sequences from slot `kv_cache.pos`.
        `last_only` computes the logits of the last position only, (B, 1, V): what generation needs.
        `segments` (B, T) packs several sequences into each row (SFT): equal ids mark one sequence, a
        contiguous run; a token attends only within its run and its position counts from the run's start,
        so each packed sequence computes exactly what it would alone."""
        B, T = idx.shape
        if segments is not None and kv_cache is not None:
            raise NanoforgeError("model: packed segments cannot be combined with a KV cache")
        start = 0 if kv_cache is None else kv_cache.pos
        pad = None if kv_cache is None else kv_cache.pad
        # the furthest position this call reaches; padded rows start at a negative offset (see KVCache)
        last_pos = start + T - (0 if pad is None else int(pad.min()))
        if last_pos > self.cfg.seq_len:
            raise NanoforgeError(f"model: sequence of {last_pos} tokens exceeds seq_len={self.cfg.seq_len}")
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise NanoforgeError(f"model: KV cache of {kv_cache.max_len} slots is full (pos={start}, T={T})")

        # positions of the tokens: (T,), or with left padding (B, T) with padding slots at position 0
        pos = torch.arange(start, start + T, device=idx.device)
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp_min(0)
        mask = None if kv_cache is None else _cache_mask(start, T, pad, idx.device)
        if segments is not None:
            pos, mask = _segment_positions_mask(segments)

        x = self.wte(idx)  # (B, T, d)
        rope = None
        if self.wpe is not None:  # positions shared by all rows: a slice of the table, cheaper than a lookup
            x = x + (self.wpe(pos) if pos.ndim == 2 else self.wpe.weight[start : start + T])
        else:
            rope = _rope_cos_sin(pos, self.cfg)
        for layer, block in enumerate(self.h):
            x = block(x, rope, mask, kv_cache, layer)
        x = self.norm_f(x)
        if kv_cache is not None:
            kv_cache.pos += T

        if targets is None:
            if last_only:
                x = x[:, -1:]
            return self.lm_head(x).float()
        if reduction == "none":  # per-token losses: used without gradients (bits per byte) or with masks
            logits = self.lm_head(x).view(B * T, -1)
            return F.cross_entropy(logits, targets.reshape(B * T), reduction="none").view(B, T)
        if reduction not in ("mean", "sum"):
            raise NanoforgeError(f"model: unknown loss reduction {reduction!r} (mean | sum | none)")
        # the fused loss multiplies by the head's weight itself; a head that adapts its weight (a LoRA layer)
        # hands over the weight it computes with
        head = self.lm_head
        w = head.effective_weight() if hasattr(head, "effective_weight") else head.weight
        return LinearCrossEntropy.apply(x.view(B * T, -1), w, targets.reshape(B * T), reduction)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once). `exclude_embeddings` drops the lookup tables that do no
        matmul: the position table and, when untied, the input token table (a tied table is the output
        projection and stays counted), the convention of nanoGPT/nanochat for FLOP counting."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context, PaLM/nanoGPT convention:
        6·N (N = `num_params(exclude_embeddings=True)`: 2 FLOPs per weight per token forward, 4 backward)
        plus 12·n_layer·n_embd·seq_len for the attention scores and weighted sums (QKᵀ and AV, 2+2 FLOPs
        forward per (query, key, channel), times 3 for backward), counted without the causal halving."""
        c = self.cfg
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layer * c.n_embd * c.seq_len

    def param_groups_for_weight_decay(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decay, no_decay): weight decay applies to the matrices of the linear layers (2-D weights),
        not to embedding tables (a tied lm_head is the embedding), norm gains or biases."""
        embeddings = {id(self.wte.weight)} | ({id(self.wpe.weight)} if self.wpe is not None else set())
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
        return decay, no_decay


def _rope_cos_sin(pos: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin of each (position, frequency) angle, (1|B, T, 1, hd/2) to broadcast over heads.

    Computed in fp32 at every call (a few thousand values) rather than stored in a buffer that
    `model.to(torch.bfloat16)` would round: angles of late positions need fp32 precision."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)
    angles = pos[..., None].float() * inv_freq  # (T, hd/2) or (B, T, hd/2)
    if angles.ndim == 2:
        angles = angles[None]
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def _segment_positions_mask(segments: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (B, T) counted from the start of each token's run of equal segment ids, and the boolean
    attention mask (B, 1, T, T) of packed rows: causal, and only within the run (block diagonal)."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    run_start = torch.where(starts, t, 0).cummax(dim=1).values  # (B, T) index where each token's run began
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return t - run_start, (same & (t[None, :] <= t[:, None]))[:, None]


def _cache_mask(start: int, T: int, pad: Tensor | None, device: torch.device) -> Tensor | None:
    """Boolean attention mask (True = attend) for the chunk in cache slots [start, start+T) over the
    slots [0, start+T).

    None when plain causal attention is right: a chunk starting at slot 0 without padding, or a single
    decode token without padding (it sees every filled slot).
    """
    if pad is None and (start == 0 or T == 1):
        return None
    slots = torch.arange(start, start + T, device=device)  # (T,) query slots
    keys = torch.arange(start + T, device=device)  # (S,) key slots
    mask = keys[None, :] <= slots[:, None]  # (T, S): causal, offset by the cache position
    if pad is None:
        return mask
    # (B, 1, T, S): padding slots are never attended, except a padding query attends to itself (its row
    # would otherwise be all -inf, and the NaN it produced would poison the values cached for it)
    real = keys[None, :] >= pad[:, None]  # (B, S)
    diag = keys[None, :] == slots[:, None]  # (T, S)
    return (mask[None] & (real[:, None, :] | diag[None]))[:, None]


# logits per chunk of LinearCrossEntropy: ~16 MB of fp32 stays in a CPU's cache; GPUs want big chunks
_LOSS_CHUNK_ELEMENTS = {"cpu": 2**22, "default": 2**27}
# devices whose eager (uncompiled) loss runs the in-place chunk code; elsewhere the fusible one runs
_IN_PLACE_LOSS_DEVICES = {"cpu"}
# the vocabulary is padded to a multiple of this inside the loss, so each matmul's rows are 128-byte aligned
_VOCAB_ALIGN = 64
# devices whose eager loss accumulates the chunks' dw inside the matmul (cuBLAS addmm, low-precision inputs,
# fp32 output and accumulator); elsewhere each chunk's dw is a separate product added to the accumulator
_DW_IN_MATMUL_DEVICES = {"cuda"}


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `x @ w.T` against targets (-100 = ignored), computed in row chunks whose logits
    never exist all at once; the gradients of x and w are computed in the same pass.

    The plain path materialises the (N, V) logits, an fp32 copy of them under autocast, the saved
    log-softmax, a zero-filled (N, V) gradient and its low-precision copy: many passes over N·V floats
    (on a CPU about as long as the lm_head matmuls themselves) and N·V·14 bytes of memory. Here each
    chunk's logits go through log-softmax, softmax - one_hot and the three matmuls, and are dropped.
    Backward only scales the saved gradients by the incoming scalar (so a graph whose loss is never
    differentiated pays for gradients it does not use: evaluation runs under `torch.no_grad()`, where none
    are computed). Under autocast the matmuls run in the autocast dtype and the softmax in fp32, like the
    plain path.

    Two implementations of a chunk, the same math:
    - on a CPU, eager: in-place passes over ~16 MB chunks that stay in cache (`_chunk_in_place`);
    - on a GPU, or wherever the model is compiled: `_chunk_fused`, written so that the compiler fuses the
      softmax, the one-hot subtraction, the scaling and the cast into one pass that writes the gradient in
      the matmul dtype. It runs over the vocabulary padded to a multiple of 64 with zero rows of `w` (an
      odd vocabulary such as GPT-2's 50257 gives unaligned matrix rows, which cuBLAS runs on slower
      kernels; nanoGPT pads its embedding table to 50304 for the same reason); the padded columns are
      masked out of the softmax and get zero gradient, so the model keeps its real vocabulary. Run
      eagerly on a GPU (under FSDP, where only the blocks are compiled), the chunk is compiled on its own.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w: Tensor, targets: Tensor, reduction: str) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        in_place = device in _IN_PLACE_LOSS_DEVICES and not torch.compiler.is_compiling()
        with torch.autocast(device, enabled=False):
            xc, wc = x.to(dtype), w.to(dtype)  # (N, d), (V, d)
            N, V = xc.shape[0], wc.shape[0]
            if not in_place and V % _VOCAB_ALIGN:
                wc = F.pad(wc, (0, 0, 0, -V % _VOCAB_ALIGN))  # (V_padded, d), zero rows
            valid = targets != -100  # (N,)
            n_valid = valid.sum()
            safe_targets = targets.clamp_min(0)
            # d loss / d logit of each row: 1/n_valid for the mean, 1 for the sum, 0 for ignored rows
            row_scale = valid / n_valid.clamp_min(1) if reduction == "mean" else valid.float()
            # the chunks' summed losses: a compiled model that writes per-row losses into one (N,) buffer
            # fuses every chunk's gather into one reduction indexed by row·V over all N rows, which
            # overflows int32 past 2^31 logits (GPT-2 at 64k tokens: an illegal memory access)
            total = torch.zeros((), device=x.device)
            dx = torch.empty_like(xc) if want_dx else None
            dw = torch.zeros(wc.shape, device=x.device) if want_dw else None  # fp32 accumulator
            budget = _LOSS_CHUNK_ELEMENTS.get(device, _LOSS_CHUNK_ELEMENTS["default"])
            n_chunks = math.ceil(N * wc.shape[0] / budget)
            rows = math.ceil(N / n_chunks)  # equal chunks but the last: at most two shapes to compile
            chunk = _chunk_in_place if in_place else _fused_chunk_for(device)
            dw_in_matmul = want_dw and _dw_in_matmul(device, dtype)
            for start in range(0, N, rows):
                s = slice(start, start + rows)
                losses, grad = chunk(xc[s] @ wc.T, safe_targets[s], row_scale[s], V, want_dx or want_dw)
                total = total + (losses * valid[s]).sum()
                if want_dx:
                    dx[s] = grad @ wc  # (C, d)
                if dw_in_matmul:  # dw + grad.T @ x in one cuBLAS call, accumulated in fp32
                    dw = torch.addmm(dw, grad.T, xc[s], out_dtype=torch.float32)
                elif want_dw:
                    dw += grad.T @ xc[s]  # (V, d)
        if dw is not None and dw.shape[0] != V:
            dw = dw[:V]
        ctx.save_for_backward(dx, dw)
        ctx.x_dtype = x.dtype
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        dx, dw = ctx.saved_tensors
        dx = None if dx is None else (dx * grad_loss).to(ctx.x_dtype)
        dw = None if dw is None else dw * grad_loss
        return dx, dw, None, None


def _dw_in_matmul(device: str, dtype: torch.dtype) -> bool:
    """Whether the loss's dw accumulates inside the matmul: eagerly on the devices of
    `_DW_IN_MATMUL_DEVICES`, for bf16 chunks (the dtype checked on an H100), where this torch has `addmm`
    with an fp32 `out_dtype` (2.8 on). One cuBLAS call per chunk then reads and writes the fp32 accumulator
    in its epilogue, and the chunks' products are summed in fp32. Otherwise each chunk's product is rounded
    to the matmul dtype and added in a separate pass. Not under torch.compile: torch 2.11's fake-tensor
    rule for this `addmm` fails (seen on an H100), and a compiled model sums the products in one fused
    kernel anyway."""
    return (device in _DW_IN_MATMUL_DEVICES and dtype == torch.bfloat16
            and not torch.compiler.is_compiling() and hasattr(torch.ops.aten.addmm, "dtype"))


def _chunk_in_place(
    logits: Tensor, targets: Tensor, row_scale: Tensor, vocab: int, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """One chunk's losses (C,) fp32 and d loss / d logits (C, V) in the logits' dtype, by in-place passes."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # one fused upcast + normalise
    losses = -logp.gather(1, targets[:, None]).squeeze(1)
    if not want_grad:
        return losses, None
    grad = logp.exp_()  # softmax, in place: (C, V)
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1
    return losses, grad.mul_(row_scale[:, None]).to(logits.dtype)


def _chunk_fused(
    logits: Tensor, targets: Tensor, row_scale: Tensor, vocab: int, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """`_chunk_in_place` as pure element-wise and reduction ops (no in-place update, no scatter), which a
    compiler fuses into a logsumexp pass and one gradient pass. Columns from `vocab` on are padding:
    masked out of the softmax, zero gradient."""
    z = logits.float()
    cols = torch.arange(z.shape[1], device=z.device)
    if z.shape[1] != vocab:
        z = z.masked_fill(cols >= vocab, float("-inf"))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (C, 1)
    losses = (lse - z.gather(1, targets[:, None])).squeeze(1)
    if not want_grad:
        return losses, None
    grad = (torch.exp(z - lse) - (cols == targets[:, None]).float()) * row_scale[:, None]
    return losses, grad.to(logits.dtype)


_compiled_chunks: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {}


def _fused_chunk_for(device: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """`_chunk_fused` itself while a compiler traces the model (it fuses it there); on an eager GPU a
    compiled copy of it (compiled on the first call: a few seconds, once per process and shape). Where the
    compiler fails (no working Triton, say), the loss warns once and runs `_chunk_fused` eagerly."""
    if torch.compiler.is_compiling() or device != "cuda":
        return _chunk_fused
    if device not in _compiled_chunks:
        compiled = torch.compile(_chunk_fused)

        def first_call(*args: object) -> tuple[Tensor, Tensor | None]:
            try:
                result = compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure; the eager call below re-raises real errors
                warnings.warn(f"nanoforge: the loss chunk could not be compiled ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it runs eagerly, slower",
                              RuntimeWarning, stacklevel=2)
                _compiled_chunks[device] = _chunk_fused
                return _chunk_fused(*args)
            _compiled_chunks[device] = compiled
            return result

        _compiled_chunks[device] = first_call
    return _compiled_chunks[device]
