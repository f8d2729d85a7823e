"""`transformers` export and import of nanoforge/hf.py: exported logits equal ours, import → export is
lossless, the chat template renders what `Tokenizer.render_chat` does, unsupported checkpoints are refused.

    python -m pytest tests/test_hf.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: missing must fail, not skip
from safetensors.torch import load_file, save_file

from nanoforge.cli import main as cli_main
from nanoforge.errors import NanoforgeError
from nanoforge.hf import ExportConfig, export_hf, import_hf, to_transformers
from nanoforge.infer.chat import ChatModel
from nanoforge.infer.engine import generate
from nanoforge.model import GPT, ModelConfig
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import TOKENIZER_FILES, load_model_artifact, save_model_artifact

V, T = 512, 32  # the tiny tokenizer has 512 tokens


def our_model(flavour: str, **kw) -> GPT:
    """A random GPT whose norms and biases are perturbed, so a wrong mapping of any tensor shows."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, seq_len=T, n_layer=2, n_embd=64, n_head=4, flavour=flavour, **kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def tokens(B: int = 2, n: int = T) -> torch.Tensor:
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(1))


def hf_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    peer = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return peer(idx).logits


CASES = {
    "llama-gqa": ("llama", dict(n_kv_head=2), "LlamaForCausalLM"),
    "llama-mqa-tied": ("llama", dict(n_kv_head=1, tie_embeddings=True, rope_theta=500.0), "LlamaForCausalLM"),
    "llama-qk-norm": ("llama", dict(n_kv_head=2, qk_norm=True), "Qwen3ForCausalLM"),
    "gpt2": ("gpt2", {}, "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_equal_ours(case: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    flavour, kw, architecture = CASES[case]
    m = our_model(flavour, **kw)
    save_model_artifact(m, tmp_path / "ours", tokenizer_dir=tiny_tokenizer)
    manifest = export_hf(ExportConfig(), tmp_path / "ours", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] == [manifest["figures"]["architecture"]]
    idx = tokens()
    with torch.no_grad():
        ours = m(idx)
    assert (ours - hf_logits(tmp_path / "hf", idx)).abs().max().item() <= 1e-4
    # the tokenizer travels with it and encodes as ours does
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def parse(s):\n    return json.loads(s)  # ünïcode"
    assert hf_tok.encode(text, add_special_tokens=False) == Tokenizer.load(tiny_tokenizer).encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 0, 1)


def test_chat_template_renders_like_render_chat(tiny_tokenizer: Path, tmp_path: Path) -> None:
    save_model_artifact(our_model("llama"), tmp_path / "ours", tokenizer_dir=tiny_tokenizer)
    export_hf(ExportConfig(dtype="bf16"), tmp_path / "ours", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = Tokenizer.load(tiny_tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?\n"},
            {"role": "assistant", "content": " It is 4."}, {"role": "user", "content": "And 3 + 3?"}]
    for messages in (chat, chat[:3], chat[1:2]):
        ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(ids) == tok.render_chat(messages)[0]
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(ids) == tok.render_prompt(messages)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, tok.special_id("assistant_end")]
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # --dtype bf16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_transformers_generates_what_nanoforge_does_from_text_and_chat(tiny_chat_model: Path, tmp_path: Path) -> None:
    """A text prompt starts with <|bos|> in nanoforge (`ChatModel.text_prompt`): the exported tokenizer adds it
    too, and the chat template's own <|bos|> is not doubled."""
    export_hf(ExportConfig(), tiny_chat_model, tmp_path / "hf")
    cm = ChatModel.load(tiny_chat_model, "cpu")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.model_max_length == cm.seq_len
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    pipe = transformers.pipeline("text-generation", model=peer, tokenizer=hf_tok)
    for text in ("json", "Return the", "def"):
        assert hf_tok(text)["input_ids"] == cm.text_prompt(text)
        ours = generate(cm.model, [cm.text_prompt(text)], max_new_tokens=8, temperature=0, stop_tokens=cm.text_stop)
        theirs = pipe(text, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert theirs == cm.tok.decode(ours[0]), text
    messages = [{"role": "user", "content": "What does json do?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert list(ids) == cm.chat_prompt(messages) and ids.count(hf_tok.bos_token_id) == 1
    ours = generate(cm.model, [cm.chat_prompt(messages)], max_new_tokens=8, temperature=0, stop_tokens=cm.chat_stop)
    theirs = pipe(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    assert theirs == {"role": "assistant", "content": cm.tok.decode(ours[0])}
    # nanoforge's own tokenizer never adds special tokens: an import of this tokenizer encodes as before
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert Tokenizer.load(tmp_path / "back").encode("json") == cm.tok.encode("json")


def hf_checkpoint(kind: str, out: Path, tokenizer: Path, dtype: torch.dtype = torch.float32, **save_kw) -> None:
    """A random `transformers` model of the given family saved with `save_pretrained`, plus our tokenizer."""
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    llama_shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=T, rms_norm_eps=1e-5)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, **llama_shape, rope_theta=20000.0)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, **llama_shape, head_dim=16, tie_word_embeddings=True)
    else:
        config = transformers.GPT2Config(**common, n_positions=T, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    peer = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1, biases away from 0
    peer.to(dtype).save_pretrained(out, **save_kw)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer / name, out / name)


@pytest.mark.parametrize("kind, dtype", [("llama", torch.float32), ("qwen3", torch.bfloat16), ("gpt2", torch.float32)])
def test_import_export_round_trip_is_lossless(kind: str, dtype: torch.dtype, tiny_tokenizer: Path,
                                              tmp_path: Path) -> None:
    src, ours, back = tmp_path / "src", tmp_path / "ours", tmp_path / "back"
    hf_checkpoint(kind, src, tiny_tokenizer, dtype)
    manifest = import_hf(src, ours)
    figures = manifest["figures"]
    assert figures["nanoforge_tokenizer"] and figures["dtypes"] == [str(dtype).removeprefix("torch.")]
    assert figures["ignored"] == ({"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1} if kind == "gpt2" else {})
    model = load_model_artifact(ours)  # upcast to fp32 for training
    assert model.cfg.qk_norm == (kind == "qwen3") and model.cfg.flavour == ("gpt2" if kind == "gpt2" else "llama")
    assert set(TOKENIZER_FILES[:3]) <= {p.name for p in ours.iterdir()}
    if dtype == torch.float32:
        idx = tokens()
        with torch.no_grad():
            assert (model(idx) - hf_logits(src, idx)).abs().max().item() <= 1e-4

    export_hf(ExportConfig(), ours, back)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config_a, config_b = (transformers.AutoConfig.from_pretrained(d).to_dict() for d in (src, back))
    assert config_a.pop("_name_or_path") != config_b.pop("_name_or_path")
    if kind == "gpt2":  # nanoforge trains without dropout and writes GPT-2's default MLP width out
        assert config_a["resid_pdrop"] == 0.1 and config_a["n_inner"] is None
        config_a |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "n_inner": 4 * config_a["n_embd"]}
        # the same tanh GELU, as the single kernel `F.gelu(approximate="tanh")` that nanoforge runs
        assert config_a["activation_function"] == "gelu_new"
        config_a["activation_function"] = "gelu_pytorch_tanh"
    assert config_a == config_b  # every other field, as transformers reads it


def test_sharded_import_equals_single_file(tiny_tokenizer: Path, tmp_path: Path) -> None:
    hf_checkpoint("llama", tmp_path / "one", tiny_tokenizer)
    hf_checkpoint("llama", tmp_path / "sharded", tiny_tokenizer, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    import_hf(tmp_path / "one", tmp_path / "a")
    import_hf(tmp_path / "sharded", tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_decodes_like_transformers_generate() -> None:
    """Greedy decoding with our engine (KV cache, batched, left-padded) gives transformers' tokens."""
    m = our_model("llama", n_kv_head=2)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)  # a peaked next-token distribution: no near-ties for rounding to flip
    peer = to_transformers(m)
    prompts = [[0, 17, 99, 4, 250], [0, 3]]
    ours = generate(m, prompts, max_new_tokens=12, temperature=0.0)
    for prompt, out in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        theirs = peer.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False, pad_token_id=1)
        assert theirs[0, len(prompt):].tolist() == out


def write_config(src: Path, **changes) -> None:
    path = src / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama_src(tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("hf") / "llama"
    hf_checkpoint("llama", src, tiny_tokenizer)
    return src


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(model_type="qwen2"), "Qwen2 has q/k/v biases"),
        (dict(model_type="mamba"), "unsupported model_type 'mamba'"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling 'llama3'"),
        (dict(attention_bias=True), "attention_bias=true"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(head_dim=32), "head_dim 32 differs"),
        (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
        (dict(num_key_value_heads=4), r"k_proj.weight has shape \(32, 64\), the config implies \(64, 64\)"),
        (dict(tie_word_embeddings=True), "lm_head.weight differs from the token embeddings"),
        (dict(hidden_size=None), "missing field 'hidden_size'"),
    ],
)
def test_unsupported_checkpoints_are_refused(edit: dict, message: str, llama_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    write_config(src, **edit)
    with pytest.raises(NanoforgeError, match=message):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extra_and_missing_tensors_and_pickles_are_refused(llama_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    weights = load_file(str(src / "model.safetensors"))
    save_file(weights | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(src / "model.safetensors"))
    with pytest.raises(NanoforgeError, match="no place for: model.layers.0.self_attn.q_proj.bias"):
        import_hf(src, tmp_path / "out")
    del weights["model.norm.weight"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(NanoforgeError, match="missing tensor 'model.norm.weight'"):
        import_hf(src, tmp_path / "out")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(NanoforgeError, match="never unpickles"):
        import_hf(src, tmp_path / "out")


def test_cli_export_and_import(tiny_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_model_artifact(our_model("gpt2"), tmp_path / "ours", tokenizer_dir=tiny_tokenizer)
    assert cli_main(["export", "--model", str(tmp_path / "ours"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours", "back"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert cli_main(["import", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err
