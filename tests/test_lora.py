"""LoRA: only the adapters train, they are saved alone, and `nanoforge merge` gives the adapter-on logits."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.instruct import InstructConfig, make_instruct
from nanoforge.post.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge,
    merge_lora,
    quantize_base,
    target_names,
)
from nanoforge.post.sft import SFTConfig, optimizer_state_bytes, sft
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact
from nanoforge.train.metrics import MetricsLog
from nanoforge.train.optim import build_adamw


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The stage sets torch's (process-wide) thread count from its config; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _model(flavour: str = "llama", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=96, seq_len=32, n_layer=2, n_embd=32, n_head=4, flavour=flavour))


def _randomize_adapters(model: GPT) -> None:
    """B starts at zero (the adapter is then a no-op); give it values so that merging has work to do."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)


def test_targets_select_the_linear_layers_by_name():
    model = _model()
    assert len(target_names(model, ["all-linear"])) == 2 * 4
    assert target_names(model, ["qkv"]) == ["h.0.attn.qkv", "h.1.attn.qkv"]
    assert target_names(model, ["mlp.proj", "lm_head"]) == ["h.0.mlp.proj", "h.1.mlp.proj", "lm_head"]
    assert len(target_names(model, ["proj"])) == 4  # attn.proj and mlp.proj
    with pytest.raises(NanoforgeError, match="matches no linear layer"):
        target_names(model, ["nonsense"])
    with pytest.raises(NanoforgeError, match="shares its weight"):
        target_names(_model("gpt2"), ["lm_head"])  # tied to the embeddings


def test_only_adapter_parameters_are_updated():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.lora_{x}" for a in adapted for x in "AB"}
    assert set(before) <= {n for n, _ in model.named_parameters()}  # base names unchanged
    opt = build_adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(0, 96, (4, 32))
    for _ in range(3):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(params[name], value), name  # frozen: bit for bit
        assert params[name].grad is None
    assert all(params[f"{a}.lora_B"].abs().sum() > 0 for a in adapted)  # B left zero: the adapters learnt
    # AdamW's state: two moments per trained number, not per model parameter
    n_adapter = sum(params[f"{a}.lora_{x}"].numel() for a in adapted for x in "AB")
    assert optimizer_state_bytes(opt) == 2 * 4 * n_adapter + 4 * len(trainable)  # + a step counter each
    n_all = sum(p.numel() for p in model.parameters())
    assert n_adapter < 0.3 * n_all


def test_an_adapted_lm_head_trains_through_the_fused_loss():
    """The loss multiplies by lm_head's weight without calling the module: it must see the adapter too."""
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=["all-linear", "lm_head"]))
    _randomize_adapters(model)
    x = torch.randint(0, 96, (2, 32))
    loss = model(x, x)
    logits_loss = torch.nn.functional.cross_entropy(model(x).view(-1, 96), x.view(-1))
    torch.testing.assert_close(loss, logits_loss, rtol=1e-5, atol=1e-5)  # the adapter-on model's loss
    loss.backward()
    head = model.lm_head
    assert head.lora_A.grad is not None and head.lora_A.grad.abs().sum() > 0 and head.lora_B.grad.abs().sum() > 0
    assert head.weight.grad is None  # the base stays frozen
    with pytest.raises(NanoforgeError, match="dropout cannot apply to an adapter on lm_head"):
        apply_lora(_model(), LoRAConfig(rank=4, targets=["lm_head"], dropout=0.1))


def test_peft_loads_our_adapter_and_we_load_peft_s(tmp_path):
    """The adapter directory is PEFT's: PeftModel puts ours on a GPT with the same outputs, and an adapter
    PEFT saved loads through `load_adapter`."""
    from peft import LoraConfig, PeftModel, get_peft_model  # a dev dependency: missing must fail, not skip

    x = torch.randint(0, 96, (2, 32))
    ours = _model()
    apply_lora(ours, LoRAConfig(rank=4, alpha=16, targets=["all-linear", "lm_head"]))
    _randomize_adapters(ours)
    (tmp_path / "base").mkdir()
    (tmp_path / "ours").mkdir()
    from nanoforge.post.lora import save_adapter
    save_adapter(tmp_path / "ours", LoRAConfig(rank=4, alpha=16), sorted(lora_layers(ours)),
                 dict(ours.named_parameters()), tmp_path / "base")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # adapter_config.json holds PEFT's fields only: PEFT has nothing to say
        peft_model = PeftModel.from_pretrained(_model(), str(tmp_path / "ours")).eval()
        base_logits, want = _model()(x), ours(x)
        assert (want - base_logits).abs().max() > 1e-2
        torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-5)

    theirs = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "mlp.proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        want = theirs(x)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = _model()
    cfg = load_adapter(loaded, tmp_path / "theirs")
    assert (cfg.rank, cfg.alpha, len(lora_layers(loaded))) == (4, 8.0, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_merged_weights_give_the_adapter_on_logits(flavour):
    model = _model(flavour)
    x = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        base_logits = model(x)
    targets = ["all-linear"] + (["lm_head"] if flavour == "llama" else [])  # gpt2's lm_head is tied
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=targets))
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B = 0: an untrained adapter changes nothing
        _randomize_adapters(model)
        adapter_on = model(x)
        merge_lora(model)
        merged = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (adapter_on - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapter_on, rtol=1e-5, atol=1e-5)
    if flavour == "gpt2":
        assert model.lm_head.weight is model.wte.weight  # still tied


@pytest.fixture(scope="module")
def lora_run(tiny_tokenizer, tiny_corpus, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A LoRA SFT run through the CLI: (base model, adapter directory, data)."""
    root = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.load(tiny_tokenizer)
    torch.manual_seed(0)
    base = root / "base"
    save_model_artifact(GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, n_embd=64, n_head=4)),
                        base, tokenizer_dir=tiny_tokenizer)
    make_instruct(InstructConfig(max_entries=20, arithmetic=100, arithmetic_val=10), tiny_corpus, root / "data")
    adapter = root / "adapter"
    assert main(["sft", "--model", str(base), "--data", str(root / "data" / "train.jsonl"), "--out", str(adapter),
                 "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "12", "--batch-size", "4", "--lr", "1e-2",
                 "--dtype", "fp32", "--device", "cpu", "--threads", "1", "--set", "answer_eval=0"]) == 0
    return base, adapter, root / "data"


def test_the_adapter_is_saved_alone_and_merges_into_a_plain_model(lora_run, tmp_path):
    base, adapter, _ = lora_run
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 4 and all(k.startswith("base_model.model.h.") for k in tensors)  # PEFT's names
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert not (adapter / "model.safetensors").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and len(cfg["target_modules"]) == 8
    f = json.loads((adapter / "manifest.json").read_text())["figures"]
    assert f["trainable_params"] == sum(t.numel() for t in tensors.values()) < f["params"] / 5
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    merged = load_model_artifact(out)
    with_adapter = load_model_artifact(base)
    load_adapter(with_adapter, adapter)
    x = torch.randint(0, merged.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_adapter(x), rtol=1e-5, atol=1e-5)
        assert (merged(x) - load_model_artifact(base)(x)).abs().max() > 1e-3
    assert (out / "tokenizer.json").exists() and json.loads((out / "manifest.json").read_text())["stage"] == "merge"


def test_merge_refuses_an_adapter_of_another_base(lora_run, tiny_tokenizer, tmp_path):
    base, adapter, _ = lora_run
    other = tmp_path / "other"
    model = load_model_artifact(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    save_model_artifact(model, other, tokenizer_dir=tiny_tokenizer)
    with pytest.raises(NanoforgeError, match="another base model"):
        merge(other, adapter, tmp_path / "merged")
    with pytest.raises(NanoforgeError, match="not a LoRA adapter"):
        merge(base, tmp_path, tmp_path / "merged")


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(lora_run, tmp_path):
    base, _, data = lora_run
    cfg = SFTConfig(lora_rank=4, max_steps=4, ckpt_every=2, batch_size=4, lr=1e-2, dtype="fp32", device="cpu",
                    threads=1, answer_eval=0, eval_rows=4)
    ref = tmp_path / "ref"
    sft(cfg, base, [data / "train.jsonl"], ref)
    saved = load_file(str(next((ref / "checkpoints" / "step-0000004" / "dcp").glob("*.safetensors"))))
    assert saved and all("lora_" in k for k in saved)  # adapters and their AdamW moments: no base weight
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002\n")
    for name in ("manifest.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    sft(cfg, base, [data / "train.jsonl"], out, resume=True)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int8_base_trains_adapters_on_a_quarter_of_the_weight_memory(lora_run, tmp_path):
    import torchao  # noqa: F401  (a dev dependency: missing must fail, not skip)
    model = _model()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_lora(model, LoRAConfig(rank=4, quantize="int8"))
    assert quantize_base(model) == 8
    for name, layer in lora_layers(model).items():
        qdata, scale = layer.weight.qdata, layer.weight.scale
        assert qdata.dtype == torch.int8 and qdata.shape == dense[name].shape  # 1 byte instead of 4 per weight
        # per-output-channel scales: the dequantized weight is within half a step (and rounding) of the original
        torch.testing.assert_close(qdata.float() * scale.reshape(-1, 1), dense[name], atol=0.51 * float(scale.max()),
                                   rtol=0)
    assert model.lm_head.weight.dtype == torch.float32

    base, adapter, data = lora_run  # the same run as lora_run's, on the int8 base: the same losses, nearly
    out = tmp_path / "qlora"
    m = sft(SFTConfig(lora_rank=4, lora_alpha=8, lora_quantize="int8", max_steps=12, batch_size=4, lr=1e-2,
                      device="cpu", threads=1, answer_eval=0, eval_rows=4), base, [data / "train.jsonl"], out)
    rows, dense_rows = MetricsLog.read(out / "metrics.jsonl"), MetricsLog.read(adapter / "metrics.jsonl")
    assert m["figures"]["dtype"] == "fp32" and rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in dense_rows], abs=0.02)
    assert json.loads((out / "manifest.json").read_text())["config"]["lora_quantize"] == "int8"
    merged = merge(base, out, tmp_path / "merged")  # into the full-precision base, as QLoRA does
    assert merged["figures"]["adapted_layers"] == 8
