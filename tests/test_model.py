"""The GPT of nanoforge/model.py: config checks, exact equality with `transformers`, causality, training,
KV cache.

    python -m pytest tests/test_model.py -q
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoforge import model as model_module
from nanoforge.errors import NanoforgeError
from nanoforge.hf import to_transformers
from nanoforge.model import GPT, KVCache, ModelConfig

V, T = 97, 32


def tiny(flavour: str = "llama", **kw) -> ModelConfig:
    base = dict(vocab_size=V, seq_len=T, n_layer=2, n_embd=64, n_head=4, flavour=flavour)
    return ModelConfig(**(base | kw))


def model_of(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(B: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


# ---- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_embd=60, n_head=8), "not divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
        (dict(flavour="mamba"), "unknown flavour"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(flavour="gpt2", qk_norm=True), "qk_norm"),
    ],
)
def test_config_rejects_bad_shapes(kw: dict, message: str) -> None:
    with pytest.raises(NanoforgeError, match=message):
        tiny(**kw)


def test_config_defaults_round_trip_and_unknown_keys() -> None:
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    assert (llama.mlp_hidden, llama.tie_embeddings, llama.n_kv_head) == (192, False, 4)  # 8/3·64 -> 192
    assert (gpt2.mlp_hidden, gpt2.tie_embeddings) == (256, True)
    d = json.loads(json.dumps(llama.to_dict()))
    assert ModelConfig.from_dict(d) == llama
    with pytest.raises(NanoforgeError, match=r"unknown keys \['n_experts'\]"):
        ModelConfig.from_dict(d | {"n_experts": 8})


def test_num_params_and_flops_by_hand() -> None:
    d, L, hd, hidden = 64, 2, 16, 192
    m = model_of(tiny("llama", n_kv_head=2))
    per_layer = (4 + 2 * 2) * hd * d + d * d + 2 * hidden * d + hidden * d + 2 * d  # qkv, o, gate/up, down, norms
    non_embedding = L * per_layer + d + V * d  # + final norm + untied lm_head
    assert m.num_params(exclude_embeddings=True) == non_embedding
    assert m.num_params() == non_embedding + V * d  # + token table
    assert m.flops_per_token() == 6 * non_embedding + 12 * L * d * T

    g = model_of(tiny("gpt2"))
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert g.num_params() == L * per_layer + 2 * d + V * d + T * d  # tied: token table counted once
    assert g.num_params(exclude_embeddings=True) == L * per_layer + 2 * d + V * d  # tied table = lm_head


def test_weight_decay_groups() -> None:
    for flavour in ("llama", "gpt2"):
        m = model_of(tiny(flavour))
        decay, no_decay = m.param_groups_for_weight_decay()
        assert len(decay) + len(no_decay) == len(list(m.parameters()))
        assert all(p.ndim == 2 for p in decay) and all(p is not m.wte.weight for p in decay)
        assert any(p is m.lm_head.weight for p in decay) == (flavour == "llama")


def test_init_scales_residual_projections() -> None:
    m = model_of(tiny("llama", n_layer=8, n_embd=256, mlp_hidden=1024))
    assert m.h[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.h[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2·8)


# ---- exact equality with transformers ---------------------------------------------------------------------


def randomize_norms(m: GPT) -> None:
    """Norm gains/biases start at 1/0: perturb them so a wrong mapping of norms would show."""
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(
    "kw",
    [dict(n_kv_head=4), dict(n_kv_head=2), dict(n_kv_head=1, tie_embeddings=True), dict(rope_theta=500.0)],
)
def test_llama_logits_equal_transformers(kw: dict) -> None:
    m = model_of(tiny("llama", **kw))
    randomize_norms(m)
    hf = to_transformers(m, attn_implementation="eager")  # weights mapped by nanoforge/hf.py
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = tokens(2, T)
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_llama_qk_norm_logits_equal_transformers_qwen3() -> None:
    """QK-norm as in Qwen3: a Llama whose q and k are RMS-normalised per head before RoPE."""
    m = model_of(tiny("llama", n_kv_head=2, qk_norm=True))
    randomize_norms(m)
    hf = to_transformers(m, attn_implementation="eager")
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = tokens(2, T)
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_gpt2_logits_equal_transformers() -> None:
    m = model_of(tiny("gpt2"))
    randomize_norms(m)
    with torch.no_grad():  # biases start at 0: perturb them so a wrong bias mapping would show
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
    hf = to_transformers(m, attn_implementation="eager")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = tokens(2, T)
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-4, rtol=0)


# ---- behaviour ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_causal(flavour: str) -> None:
    m = model_of(tiny(flavour, n_kv_head=2))
    idx = tokens(2, T)
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % V
    with torch.no_grad():
        a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_loss_matches_logits_and_ignores_minus_100() -> None:
    m = model_of(tiny("llama"))
    idx, targets = tokens(2, T), tokens(2, T, seed=2)
    targets[0, :5] = -100
    with torch.no_grad():
        logits = m(idx)
        per_token = m(idx, targets, reduction="none")
        mean = m(idx, targets)
    expected = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100, reduction="none")
    torch.testing.assert_close(per_token, expected.view(2, T))
    assert per_token[0, :5].eq(0).all()
    torch.testing.assert_close(mean, per_token.sum() / (targets != -100).sum())


@pytest.mark.parametrize("chunk", ["in_place", "fused"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_plain_cross_entropy(
    monkeypatch: pytest.MonkeyPatch, autocast: bool, reduction: str, chunk: str
) -> None:
    """The fused lm_head + loss (forced into 5 chunks) gives the loss and gradients of the plain path, with
    either chunk implementation; the fused one pads the odd vocabulary (97) to 128 columns."""
    monkeypatch.setattr(model_module, "_LOSS_CHUNK_ELEMENTS", {"cpu": 13 * 128, "default": 13 * 128})
    if chunk == "fused":  # what GPUs and compiled models run
        monkeypatch.setattr(model_module, "_IN_PLACE_LOSS_DEVICES", set())
        calls = []
        real = model_module._chunk_fused
        monkeypatch.setattr(model_module, "_chunk_fused", lambda *a: calls.append(a[0].shape) or real(*a))
    m = model_of(tiny("llama", n_kv_head=2))
    idx, targets = tokens(2, T), tokens(2, T, seed=2)
    targets[1, 3:9] = -100

    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = m(idx, targets, reduction=reduction)
            else:
                logits = m(idx)
                assert logits.dtype == torch.float32
                loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction=reduction)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    (loss, grads), (ref_loss, ref_grads) = run(True), run(False)
    if chunk == "fused":
        assert calls == [(13, 128)] * 4 + [(12, 128)]  # 64 rows in 5 chunks, padded columns
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for n, g in grads.items():
        scale = ref_grads[n].abs().max()  # bf16 gradients: compare relative to the tensor's scale
        torch.testing.assert_close(g / scale, ref_grads[n] / scale, **tol, msg=n)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # a GPU machine checks its own path


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_gives_the_eager_loss_and_gradients_on_each_device(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """Under torch.compile (the default on GPUs) the traced loss is the fused chunk over a padded vocabulary,
    here in 13 chunks (the last one shorter, as at micro-batch 32 of gpt2-124m); loss and gradients equal
    the eager model's. On a GPU under bf16, whose eager loss accumulates dw inside the matmul."""
    monkeypatch.setattr(model_module, "_LOSS_CHUNK_ELEMENTS", {"cpu": 5 * 128, "default": 5 * 128})
    m = model_of(tiny("gpt2")).to(device)
    idx, targets = tokens(2, T).to(device), tokens(2, T, seed=2).to(device)
    targets[0, :4] = -100
    bf16 = device != "cpu"

    def run(module: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = module(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    (ref, ref_grads), (loss, grads) = run(m), run(torch.compile(m))
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ref, **tol)
    for n, g in grads.items():
        scale = ref_grads[n].abs().max() if bf16 else 1.0
        torch.testing.assert_close(g / scale, ref_grads[n] / scale, **tol, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_training_batches_reach_each_device_whole(device: str) -> None:
    """`to_device` (pretrain's and SFT's host-to-device copy; on a GPU queued from pinned memory) delivers
    every token, also when the next batch is made before the copy has run."""
    from nanoforge.train.loop import to_device

    batches = [torch.randint(0, 50304, (32, 1024), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    moved = [to_device(b, device) for b in batches]
    assert all(m.device.type == device and torch.equal(m.cpu(), b) for m, b in zip(moved, batches, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_on_each_device(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """LinearCrossEntropy on this machine's devices (on a GPU: the compiled fused chunk over a padded odd
    vocabulary, in 3 chunks of two shapes) gives the loss and gradients of the plain path under bf16."""
    vocab, n, d = 1003, 310, 64
    monkeypatch.setattr(model_module, "_LOSS_CHUNK_ELEMENTS", {"cpu": 110 * 1024, "default": 110 * 1024})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = (0.1 * torch.randn(vocab, d, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    targets[:7] = -100

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        x.grad = w.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            if fused:
                loss = model_module.LinearCrossEntropy.apply(x, w, targets, "mean")
            else:
                loss = F.cross_entropy((x @ w.T).float(), targets)
        loss.backward()
        return loss.detach(), x.grad.clone(), w.grad.clone()

    for got, want in zip(run(True), run(False), strict=True):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, atol=2e-2, rtol=2e-2)


def test_a_loss_chunk_that_does_not_compile_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an eager GPU the fused chunk is compiled; if the compiler fails (no working Triton, say), the loss
    warns once and computes the same values eagerly from then on."""
    def broken_compile(fn: object) -> object:
        def fails(*args: object) -> None:
            raise RuntimeError("no working Triton here\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(model_module, "_compiled_chunks", {})
    logits, targets = torch.randn(5, 128), torch.tensor([1, 2, 3, 4, 96])
    args = (logits, targets, torch.full((5,), 0.2), V, True)
    with pytest.warns(RuntimeWarning, match="could not be compiled .RuntimeError: no working Triton here.; it runs"):
        losses, grad = model_module._fused_chunk_for("cuda")(*args)
    want_losses, want_grad = model_module._chunk_fused(*args)
    assert torch.equal(losses, want_losses) and torch.equal(grad, want_grad)
    assert model_module._fused_chunk_for("cuda") is model_module._chunk_fused  # no second try, no second warning


def test_chunked_loss_without_weight_gradient() -> None:
    """A frozen lm_head (e.g. LoRA) gets no gradient; the rest still does."""
    m = model_of(tiny("llama"))
    m.lm_head.weight.requires_grad_(False)
    m(tokens(2, T), tokens(2, T, seed=2)).backward()
    assert m.lm_head.weight.grad is None and m.norm_f.weight.grad is not None


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_trains(flavour: str) -> None:
    """A fixed set of 8 sequences is memorised: the loss falls far below uniform (ln 97 = 4.57)."""
    torch.manual_seed(0)
    m = GPT(tiny(flavour, n_kv_head=2))
    data = tokens(8, T + 1, seed=3)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)
    assert sum(losses[-5:]) / 5 < 1.0


def test_gradient_accumulation_equals_large_batch() -> None:
    m = model_of(tiny("llama", n_kv_head=2))
    data = tokens(8, T + 1, seed=4)
    x, y = data[:, :-1], data[:, 1:]
    m(x, y).backward()
    full = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
        (m(xs, ys) / 4).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-6, rtol=1e-4, msg=n)


def test_sequence_longer_than_context_is_refused() -> None:
    m = model_of(tiny("llama"))
    with pytest.raises(NanoforgeError, match="exceeds seq_len"):
        m(tokens(1, T + 1))


# ---- KV cache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_cache_chunks_equal_full_forward(flavour: str) -> None:
    """Prefill, a chunk continuing an existing cache (offset causal mask) and single decode steps."""
    m = model_of(tiny(flavour, n_kv_head=2) if flavour == "llama" else tiny(flavour))
    idx = tokens(2, 20)
    with torch.no_grad():
        full = m(idx)
        cache = KVCache(2, 24, m.cfg)
        parts = [m(idx[:, :7], kv_cache=cache), m(idx[:, 7:15], kv_cache=cache)]
        parts += [m(idx[:, t : t + 1], kv_cache=cache) for t in range(15, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_cache_left_padding_equals_unpadded(flavour: str) -> None:
    m = model_of(tiny(flavour, qk_norm=flavour == "llama"))
    short, long = tokens(1, 5, seed=5), tokens(1, 9, seed=6)
    with torch.no_grad():
        ref_short, ref_long = m(torch.cat([short, tokens(1, 3, seed=7)], 1)), m(long)
        batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
        cache = KVCache(2, 12, m.cfg, pad=[4, 0])
        prefill = m(batch, kv_cache=cache)
        step = m(torch.cat([tokens(1, 3, seed=7), long[:, :3]]), kv_cache=cache)
    torch.testing.assert_close(prefill[0, 4:], ref_short[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[1], ref_long[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0], ref_short[0, 5:], atol=1e-5, rtol=0)
    assert torch.isfinite(prefill).all() and torch.isfinite(step).all()


def test_cache_overflow_is_refused() -> None:
    m = model_of(tiny("llama"))
    cache = KVCache(1, 4, m.cfg)
    with torch.no_grad(), pytest.raises(NanoforgeError, match="KV cache of 4 slots is full"):
        m(tokens(1, 5), kv_cache=cache)


def test_dw_accumulates_inside_the_matmul_only_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss's fp32 addmm accumulation of dw runs on GPUs, eagerly, for low-precision chunks: not on a
    CPU (no such kernel there), not for fp32 (the plain product is already fp32) or fp16 (not checked on a
    GPU yet), not under torch.compile
    (torch 2.11 cannot trace it)."""
    has_op = hasattr(torch.ops.aten.addmm, "dtype")
    assert model_module._dw_in_matmul("cuda", torch.bfloat16) is has_op
    assert not model_module._dw_in_matmul("cuda", torch.float32)
    assert not model_module._dw_in_matmul("cuda", torch.float16)
    assert not model_module._dw_in_matmul("cpu", torch.bfloat16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not model_module._dw_in_matmul("cuda", torch.bfloat16)
