"""Generation of nanoforge/infer/engine.py: the KV-cache path (and its fast decode step) equals recomputing
from scratch.

python -m pytest tests/test_engine.py -q
"""

import pytest
import torch

from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import CpuDecodeStep, Decoder, _DecodeStep, _draw, _sample, generate, stream
from nanoforge.model import GPT, KVCache, ModelConfig

V, T = 61, 48


def model_of(flavour: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, seq_len=T, n_layer=2, n_embd=32, n_head=4, flavour=flavour, **kw)
    m = GPT(cfg)
    with torch.no_grad():  # sharpen the random model a little so sampled text is not uniform noise
        m.lm_head.weight.mul_(20)
    return m


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]


@pytest.mark.parametrize(
    "flavour, kw",
    [("llama", dict(n_kv_head=2)), ("llama", dict(n_kv_head=1, qk_norm=True)), ("gpt2", {})],
)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)])
def test_cache_equals_no_cache(flavour: str, kw: dict, sampling: dict) -> None:
    m = model_of(flavour, **kw)
    cached = generate(m, PROMPTS, max_new_tokens=12, **sampling)
    recomputed = generate(m, PROMPTS, max_new_tokens=12, use_cache=False, **sampling)
    assert cached == recomputed
    assert [len(o) for o in cached] == [12, 12, 12]
    # a prompt batched with others gives what it gives alone (left padding is invisible)
    if "seed" not in sampling:
        assert generate(m, PROMPTS[1:2], max_new_tokens=12, **sampling)[0] == cached[1]


@pytest.mark.parametrize("step_class", [_DecodeStep, CpuDecodeStep])
@pytest.mark.parametrize(
    "flavour, kw", [("llama", dict(n_kv_head=2, qk_norm=True)), ("llama", dict(n_kv_head=1)), ("gpt2", {})]
)
def test_decode_step_equals_model_forward(flavour: str, kw: dict, step_class: type) -> None:
    """Each decode step (torch ops; compiled CPU kernels) gives the logits and the cache contents of
    `GPT.forward` on the same KV cache, padded rows too, also after finished rows are dropped."""
    m = model_of(flavour, **kw).eval()
    prompts = torch.tensor([[0, 0, 0, 5, 9, 2], [3, 1, 4, 1, 5, 9], [0, 6, 6, 2, 7, 1]])
    with torch.inference_mode():
        caches = [KVCache(3, 12, m.cfg, pad=[3, 0, 1]) for _ in range(2)]
        for cache in caches:
            m(prompts, kv_cache=cache)
        step = step_class(m, caches[1])
        for i, token in enumerate(([7, 8, 9], [1, 2, 3], [40, 3], [5, 6])):
            if i == 2:  # the middle row finished: both caches drop it
                for cache in caches:
                    cache.select([0, 2])
                step.refresh()
            fast = step(torch.tensor(token))
            ref = m(torch.tensor(token)[:, None], kv_cache=caches[0])[:, -1]
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=0)
            torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=0)
    assert caches[0].pos == caches[1].pos == 10


def test_cpu_float32_models_take_the_compiled_step_and_bf16_the_torch_step(monkeypatch) -> None:
    built = []
    for cls in (CpuDecodeStep, _DecodeStep):
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _init=cls.__init__, **k: built.append(type(self))
                            or _init(self, *a, **k))
    m = model_of("llama", n_kv_head=2)
    generate(m, PROMPTS, max_new_tokens=3, temperature=0.0)
    assert built == [CpuDecodeStep]
    out = generate(m.to(torch.bfloat16), PROMPTS, max_new_tokens=3, temperature=0.0)
    assert built == [CpuDecodeStep, _DecodeStep] and [len(o) for o in out] == [3, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kept_decoder_prepares_the_weights_once_and_holds_no_cache_between_calls(monkeypatch, dtype) -> None:
    """One `Decoder` across generate/stream calls (a chat's turns, an evaluation's batches) builds its step
    once and gives every call's tokens unchanged; between calls it keeps the weights, not the last cache."""
    built = []
    for cls in (CpuDecodeStep, _DecodeStep):
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _init=cls.__init__, **k: built.append(type(self))
                            or _init(self, *a, **k))
    m = model_of("gpt2").to(dtype)
    sampling = dict(max_new_tokens=9, temperature=0.9, top_k=20, seed=3, stop_tokens=[17])
    fresh = [generate(m, PROMPTS, **sampling), generate(m, PROMPTS[1:], **sampling),
             list(stream(m, PROMPTS[0], **sampling))]
    assert len(built) == 3
    decoder = Decoder(m)
    kept = [generate(m, PROMPTS, **sampling, decoder=decoder), generate(m, PROMPTS[1:], **sampling, decoder=decoder),
            list(stream(m, PROMPTS[0], **sampling, decoder=decoder))]
    assert kept == fresh and len(built) == 4
    assert decoder.step.cache is None and decoder.step.k is None  # the last call's KV cache is not kept alive
    with pytest.raises(NanoforgeError, match="another model"):
        generate(model_of("gpt2"), PROMPTS, max_new_tokens=2, decoder=decoder)


def test_hooks_and_adapters_are_not_bypassed() -> None:
    """A model whose modules are changed from outside (a hook here, a LoRA adapter in practice) is decoded
    through its modules: the decode step must not read the plain weights past them."""
    m = model_of("llama", n_kv_head=2)
    plain = generate(m, PROMPTS, max_new_tokens=6, temperature=0.0)
    m.h[0].mlp.register_forward_hook(lambda module, args, out: out)  # computes the same: same tokens
    assert generate(m, PROMPTS, max_new_tokens=6, temperature=0.0) == plain

    def favour_token_5(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out[..., 5] += 1e4
        return out

    m.lm_head.register_forward_hook(favour_token_5)
    assert generate(m, PROMPTS, max_new_tokens=6, temperature=0.0) == [[5] * 6] * 3


def test_sequences_stop_independently_and_stop_token_is_excluded() -> None:
    m = model_of("llama")
    free = generate(m, PROMPTS, max_new_tokens=10, temperature=0.0)
    stop = free[0][3]  # a token the first sequence emits at step 3
    outs = generate(m, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=[stop])
    assert outs == generate(m, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=[stop], use_cache=False)
    for free_i, out in zip(free, outs, strict=True):
        cut = free_i.index(stop) if stop in free_i else len(free_i)
        assert out == free_i[:cut]
    assert len(outs[0]) == 3


def test_seeded_sampling_is_reproducible_and_seed_matters() -> None:
    m = model_of("llama")
    a = generate(m, PROMPTS, max_new_tokens=16, seed=1)
    assert a == generate(m, PROMPTS, max_new_tokens=16, seed=1)
    assert a != generate(m, PROMPTS, max_new_tokens=16, seed=2)


def test_top_k_1_is_greedy() -> None:
    m = model_of("gpt2")
    greedy = generate(m, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert generate(m, PROMPTS, max_new_tokens=8, temperature=1.3, top_k=1, seed=3) == greedy
    assert generate(m, PROMPTS, max_new_tokens=8, temperature=1.3, top_p=1e-6, seed=3) == greedy


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45, 5e-324])
def test_tiny_temperatures_are_greedy_not_nan(temperature: float) -> None:
    # logits / 1e-38 overflow float32 to inf, inf - inf is NaN in the softmax; 5e-324 is 0 in float32
    m = model_of("gpt2")
    greedy = generate(m, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert generate(m, PROMPTS, max_new_tokens=8, temperature=temperature, seed=3) == greedy
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 50
    assert torch.equal(_sample(logits, temperature, 5, 0.9, None), logits.argmax(dim=-1))


def test_stream_yields_what_generate_returns() -> None:
    m = model_of("llama", n_kv_head=2)
    kw = dict(max_new_tokens=15, temperature=0.8, seed=5)
    assert list(stream(m, PROMPTS[0], **kw)) == generate(m, PROMPTS[:1], **kw)[0]


def test_context_limit_stops_cleanly_and_long_prompt_is_refused() -> None:
    m = model_of("gpt2")  # learned positions: running past seq_len would be an index error
    prompts = [list(range(1, T - 3)), [1, 2]]
    outs = generate(m, prompts, max_new_tokens=10, temperature=0.0)
    assert [len(o) for o in outs] == [4, 10]  # the first fills the context (T - 4 + 4 = T) and stops
    assert outs == generate(m, prompts, max_new_tokens=10, temperature=0.0, use_cache=False)
    with pytest.raises(NanoforgeError, match="prompt 0 has 48 tokens"):
        generate(m, [list(range(T))], max_new_tokens=1)


def test_training_and_grad_modes_are_restored() -> None:
    m = model_of("llama")
    m.train()
    generate(m, PROMPTS, max_new_tokens=3)
    assert m.training
    m.eval()
    list(stream(m, PROMPTS[0], max_new_tokens=3))
    assert not m.training
    m.train()
    tokens = stream(m, PROMPTS[0], max_new_tokens=3)
    next(tokens)
    assert torch.is_grad_enabled()  # autograd is on again between tokens
    tokens.close()
    assert m.training


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1, V]]), "outside"),
    ],
)
def test_bad_arguments_are_refused(kw: dict, message: str) -> None:
    m = model_of("llama")
    prompts = kw.pop("prompts", PROMPTS)
    with pytest.raises(NanoforgeError, match=message):
        generate(m, prompts, max_new_tokens=3, **kw)


def test_compiled_step_handles_norms_without_gain_or_bias() -> None:
    m = model_of("gpt2").eval()
    for b in m.h:
        b.norm1, b.norm2 = torch.nn.LayerNorm(32, bias=False), torch.nn.LayerNorm(32, elementwise_affine=False)
    with torch.inference_mode():
        caches = [KVCache(1, 12, m.cfg) for _ in range(2)]
        for cache in caches:
            m(torch.tensor([[3, 4, 5]]), kv_cache=cache)
        fast = CpuDecodeStep(m, caches[1])(torch.tensor([7]))
        torch.testing.assert_close(fast, m(torch.tensor([[7]]), kv_cache=caches[0])[:, -1], atol=1e-5, rtol=0)


def test_draws_follow_the_probabilities_and_never_pick_a_zero(monkeypatch) -> None:
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7, 0.0]]).expand(200_000, -1)
    counts = torch.bincount(_draw(probs, torch.Generator().manual_seed(0)), minlength=5) / probs.shape[0]
    torch.testing.assert_close(counts, probs[0], atol=0.005, rtol=0)  # 5 standard errors at most
    assert counts[2] == counts[4] == 0
    # u·total rounding up to the total: the last token with any probability, never a zero one
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert _draw(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]), None).tolist() == [1, 2]
