"""Hugging Face `transformers` checkpoints: export a model artifact, import a Llama- or GPT-2-family one.

    nanoforge export --model runs/demo/07-pretrain --format hf --out hf/   # AutoModelForCausalLM loads hf/
    nanoforge import --from hf/ --out model/                               # a nanoforge model artifact again

| nanoforge model | exported as | imported from (`model_type`) |
|---|---|---|
| llama | `LlamaForCausalLM` | llama, mistral (without a sliding window) |
| llama with `qk_norm` | `Qwen3ForCausalLM` (a Llama with per-head q/k RMSNorm) | qwen3 |
| gpt2 | `GPT2LMHeadModel` | gpt2 |

The weights map 1:1 (the table in nanoforge/model.py): our fused `qkv` and `[gate; up]` matrices are split
into q/k/v and gate/up projections, GPT-2's `Conv1D` matrices are our `nn.Linear` ones transposed. Tensors
keep their dtype unless `--dtype` asks for another (an import keeps the checkpoint's dtype on disk and
`load_model_artifact` upcasts it), so import → export gives back the same tensors and config.

An export holds `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer
(`tokenizer.json`, `tokenizer_config.json` with a Jinja `chat_template` that renders exactly what
`Tokenizer.render_chat` does, `special_tokens_map.json`); a nanoforge tokenizer is exported adding `<|bos|>`
before a text, as nanoforge's own prompts start, and `model_max_length` is the model's context. An import
reads `model.safetensors` or the shards named by `model.safetensors.index.json`, refuses pickled `.bin`
weights (never unpickled) and refuses, with the field named, what our GPT cannot compute: biases in the
attention (Qwen2), RoPE scaling (Llama 3.1), sliding windows, a `head_dim` other than hidden/heads, other
activations. Dropout rates are not part of the model's function and nanoforge trains without dropout: an
import lists them under `ignored` in its manifest, an export writes 0. The tokenizer files are copied as
they are; nanoforge's own stages need a nanoforge tokenizer (special tokens at ids 0..8).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from torch import Tensor

from nanoforge.artifacts import SAFETENSORS_METADATA, atomic_dir, atomic_write_json, write_manifest
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, ModelConfig
from nanoforge.tokenizer import SPECIAL_TOKENS
from nanoforge.train.checkpoint import read_model_config

FORMATS = ("hf",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# files of a `transformers` tokenizer that travel with the weights, both ways
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# tensors some checkpoints carry that are not weights: GPT-2's causal-mask buffers, old Llamas' RoPE table
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# training-time regularisation nanoforge does not apply: an import notes them, an export writes 0
_DROPOUTS = ("attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop")

# `Tokenizer.render_chat` as a Jinja template: <|bos|>, then <|role_start|> content <|role_end|> per message;
# `add_generation_prompt` opens the assistant's turn (`Tokenizer.render_prompt`). The same ids, except for
# content that spells a special token ("<|user_end|>"): `transformers` reads it as that token, ours as text.
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


@dataclass
class ExportConfig:
    """What `nanoforge export` writes: the format (only `hf`) and the dtype of the weights."""

    format: str = "hf"
    dtype: str | None = None  # fp32 | bf16 | fp16; None keeps the stored dtype


# ---------------------------------------------------------------------------------------------------
# configs


def hf_config(cfg: ModelConfig, token_ids: dict[str, Any] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of the `transformers` model computing what `cfg` computes (no dropout anywhere)."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None} | (token_ids or {})
    if cfg.flavour == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.seq_len, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
            "use_cache": True, "dtype": dtype, **ids,
        }
    model_type = "qwen3" if cfg.qk_norm else "llama"
    out = {
        "architectures": [_LLAMA_TYPES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "use_cache": True, "dtype": dtype, **ids,
    }
    if model_type == "qwen3":
        out |= {"use_sliding_window": False, "sliding_window": None}
    else:
        out["mlp_bias"] = False
    return out


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` for a `transformers` config, or a `NanoforgeError` naming the field we cannot compute."""
    try:
        return _model_config_from_hf(hf, where)
    except KeyError as e:
        raise NanoforgeError(f"{where}: missing field {e.args[0]!r}") from None
    except TypeError as e:  # e.g. a string where a number belongs
        raise NanoforgeError(f"{where}: a field has the wrong type ({e})") from None


def _model_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    model_type = hf.get("model_type")

    def refuse(why: str) -> NanoforgeError:
        return NanoforgeError(f"{where}: cannot import this {model_type} model: {why}")

    if model_type == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise refuse(f"activation_function {hf['activation_function']!r} (nanoforge's GPT-2 uses tanh GELU)")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise refuse(f"{key}={hf[key]} (nanoforge supports only {want})")
        return ModelConfig(
            flavour="gpt2", vocab_size=hf["vocab_size"], seq_len=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"], n_embd=hf["n_embd"], n_head=hf["n_head"], mlp_hidden=hf.get("n_inner"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02),
        )
    if model_type not in _LLAMA_TYPES:
        extra = " (Qwen2 has q/k/v biases, which nanoforge's llama flavour lacks)" if model_type == "qwen2" else ""
        raise NanoforgeError(f"{where}: unsupported model_type {model_type!r}{extra}; nanoforge imports "
                             f"{', '.join([*_LLAMA_TYPES, 'gpt2'])}")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (nanoforge's llama uses SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise refuse(f"{key}=true (nanoforge's llama flavour has no biases)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise refuse(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = {n_embd // n_head}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse(f"RoPE scaling {rope_type!r} (nanoforge implements plain RoPE only)")
    window = hf.get("sliding_window")
    if (hf.get("use_sliding_window", model_type == "mistral") and window is not None
            and window < hf.get("max_position_embeddings", 2048)):
        raise refuse(f"sliding_window={window} (nanoforge attends over the whole context)")
    return ModelConfig(
        flavour="llama", vocab_size=hf["vocab_size"], seq_len=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_embd=n_embd, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, mlp_hidden=hf["intermediate_size"],
        qk_norm=model_type == "qwen3", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )


# ---------------------------------------------------------------------------------------------------
# weights


def _gpt2_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, theirs, transposed) for every GPT-2 tensor; `Conv1D` stores (in, out), the transpose of ours."""
    pairs = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False),
             ("norm_f.weight", "transformer.ln_f.weight", False), ("norm_f.bias", "transformer.ln_f.bias", False)]
    for i in range(cfg.n_layer):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            conv = ours not in ("norm1", "norm2")
            pairs.append((f"h.{i}.{ours}.weight", f"transformer.h.{i}.{theirs}.weight", conv))
            pairs.append((f"h.{i}.{ours}.bias", f"transformer.h.{i}.{theirs}.bias", False))
    return pairs


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(ours, theirs) for the Llama/Qwen3 tensors that map one to one (qkv and gate/up are split apart)."""
    pairs = [("wte.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        pairs += [(f"h.{i}.attn.proj.weight", p + "self_attn.o_proj.weight"),
                  (f"h.{i}.mlp.proj.weight", p + "mlp.down_proj.weight"),
                  (f"h.{i}.norm1.weight", p + "input_layernorm.weight"),
                  (f"h.{i}.norm2.weight", p + "post_attention_layernorm.weight")]
        if cfg.qk_norm:
            pairs += [(f"h.{i}.attn.q_norm.weight", p + "self_attn.q_norm.weight"),
                      (f"h.{i}.attn.k_norm.weight", p + "self_attn.k_norm.weight")]
    return pairs


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict (names of `GPT.state_dict()`; a tied lm_head may be absent) -> `transformers` names.

    Every tensor is a fresh contiguous one (safetensors refuses views that share storage). A tied lm_head
    is left out, as `save_pretrained` does."""
    out: dict[str, Tensor] = {}
    if cfg.flavour == "gpt2":
        for ours, theirs, transposed in _gpt2_pairs(cfg):
            out[theirs] = state[ours].t() if transposed else state[ours]
    else:
        for ours, theirs in _llama_pairs(cfg):
            out[theirs] = state[ours]
        hd = cfg.head_dim
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            q, k, v = state[f"h.{i}.attn.qkv.weight"].split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd])
            gate, up = state[f"h.{i}.mlp.fc.weight"].chunk(2)
            out |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def from_hf_state(hf: dict[str, Tensor], cfg: ModelConfig, where: str = "checkpoint") -> dict[str, Tensor]:
    """`transformers` tensors -> our state dict (a tied lm_head left out, as `save_model_artifact` stores it).

    Refuses a missing tensor, a tensor of the wrong shape and any tensor left over (e.g. Qwen2's q/k/v biases):
    an import computes exactly what the checkpoint computes, or nothing."""
    if cfg.flavour == "gpt2":  # hub GPT-2 checkpoints name the trunk without the `transformer.` prefix
        hf = {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
              for name, t in hf.items()}
    hf = {name: t for name, t in hf.items() if not name.endswith(_BUFFER_SUFFIXES)}
    expected = to_hf_state(_meta_state(cfg), cfg)  # the shapes this config implies, by HF name
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in hf:
            raise NanoforgeError(f"{where}: missing tensor {name!r} for a {cfg.flavour} model of this config")
        if hf[name].shape != expected[name].shape:
            raise NanoforgeError(f"{where}: {name} has shape {tuple(hf[name].shape)}, the config implies "
                                 f"{tuple(expected[name].shape)}")
        used.add(name)
        return hf[name]

    out: dict[str, Tensor] = {}
    if cfg.flavour == "gpt2":
        for ours, theirs, transposed in _gpt2_pairs(cfg):
            out[ours] = take(theirs).t() if transposed else take(theirs)
    else:
        for ours, theirs in _llama_pairs(cfg):
            out[ours] = take(theirs)
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            out[f"h.{i}.attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            out[f"h.{i}.mlp.fc.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
    if cfg.tie_embeddings:  # the embedding is the output matrix: a stored copy must be that matrix
        used.add("lm_head.weight")
        if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], out["wte.weight"]):
            raise NanoforgeError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the "
                                 f"token embeddings")
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    left = sorted(set(hf) - used)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise NanoforgeError(f"{where}: tensors nanoforge's {cfg.flavour} model has no place for: "
                             f"{', '.join(left[:3])}{more}")
    return {name: t.contiguous() for name, t in out.items()}


def _meta_state(cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict of a GPT of this config, without storage: the names and shapes to expect."""
    with torch.device("meta"):
        return GPT(cfg).state_dict()


def _check_ours(state: dict[str, Tensor], cfg: ModelConfig, where: str) -> None:
    """Every tensor of a GPT of this config, in its shape (a tied lm_head may be absent), and nothing else."""
    own = _meta_state(cfg)
    missing = sorted(set(own) - set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise NanoforgeError(f"{where}: does not match its config.json (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise NanoforgeError(f"{where}: {name} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(own[name].shape)}")


def transformers_model(cfg: ModelConfig, *, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A freshly initialised `transformers` model computing what a GPT of `cfg` computes (`hf_config`).

    Needs `transformers` installed (a dev dependency); export and import themselves do not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config(cfg))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def to_transformers(model: GPT, *, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A `transformers` model (eval mode) holding a copy of `model`'s weights: the peer in tests and benchmarks."""
    peer = transformers_model(model.cfg, attn_implementation=attn_implementation)
    state = to_hf_state(model.state_dict(), model.cfg)
    missing, unexpected = peer.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise NanoforgeError(f"transformers model: missing {missing}, unexpected {unexpected}")
    return peer.to(next(model.parameters()).device).eval()


# ---------------------------------------------------------------------------------------------------
# files


def read_hf_weights(src: Path) -> dict[str, Tensor]:
    """The tensors of a `transformers` checkpoint directory: `model.safetensors` or the shards listed in
    `model.safetensors.index.json`. Pickled weights (`*.bin`, `*.pt`) are refused, never loaded."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NanoforgeError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in src.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise NanoforgeError(f"{src}: only pickled weights ({', '.join(pickles)}); nanoforge never unpickles "
                                 f"a checkpoint: convert it to safetensors first")
        raise NanoforgeError(f"{src}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, Tensor] = {}
    for name in files:
        path = src / name
        if not path.exists():
            raise NanoforgeError(f"{index}: lists {name}, which does not exist")
        try:
            state |= load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise NanoforgeError(f"{path}: not a readable safetensors file ({e})") from None
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoforgeError(f"{path}: does not exist") from None
    except json.JSONDecodeError as e:
        raise NanoforgeError(f"{path}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise NanoforgeError(f"{path}: expected a JSON object")
    return data


def _token_ids(tok_dir: Path) -> tuple[dict[str, Any], bool]:
    """bos/eos/pad ids named by the tokenizer's config, and whether it is a nanoforge tokenizer (the chat
    specials at ids 0..8, so `CHAT_TEMPLATE` applies)."""
    try:
        hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
        raise NanoforgeError(f"{tok_dir / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
    ours = [hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    config_path = tok_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    ids: dict[str, Any] = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        ids[f"{role}_token_id"] = hf.token_to_id(token) if isinstance(token, str) else None
    return ids, ours


def _generation_config(model_dir: Path, ids: dict[str, Any], ours: bool) -> dict[str, Any]:
    """The model dir's own generation_config.json (an imported model keeps its own), else one stopping at
    end of text and, for a nanoforge tokenizer, at the end of an assistant turn."""
    own = model_dir / "generation_config.json"
    if own.exists():
        return _read_json(own)
    eos = ids["eos_token_id"]
    if ours and eos is not None:
        eos = sorted({eos, SPECIAL_TOKENS.index("<|assistant_end|>")})
    return {"bos_token_id": ids["bos_token_id"], "eos_token_id": eos, "pad_token_id": ids["pad_token_id"]}


def _check_distinct(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise NanoforgeError(f"{out}: the output would replace the input; choose another --out")


def _add_bos_processor(path: Path) -> None:
    """Make the `tokenizer.json` at `path` start every encoded text with `<|bos|>`, as nanoforge's text prompts
    do (`ChatModel.text_prompt`; every training document starts with it): without it `tokenizer(text)` and
    the text-generation pipeline feed the model a prompt it never saw the like of, and it continues
    differently. A pair of texts is two documents, each opened by `<|bos|>`. The chat template writes its
    own `<|bos|>` and `apply_chat_template` tokenizes with `add_special_tokens=False`, so chats get one;
    nanoforge's own `Tokenizer` never adds special tokens, so an import of this file encodes as before."""
    hf = HFTokenizer.from_file(str(path))
    bos = SPECIAL_TOKENS[0]
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                      special_tokens=[(bos, hf.token_to_id(bos))])
    path.write_text(hf.to_str(pretty=True), encoding="utf-8")


def export_hf(cfg: ExportConfig, model_dir: Path | str, out: Path | str,
              tokenizer: Path | str | None = None) -> dict[str, Any]:
    """Write the model artifact in `model_dir` as a `transformers` checkpoint directory `out`; the manifest.

    The tokenizer comes from `tokenizer` (default: the model directory)."""
    model_dir, out = Path(model_dir), Path(out)
    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    _check_distinct(model_dir, out)
    if cfg.format not in FORMATS:
        raise NanoforgeError(f"export: unknown format {cfg.format!r} (expected one of {', '.join(FORMATS)})")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise NanoforgeError(f"export: unknown dtype {cfg.dtype!r} (expected one of {', '.join(DTYPES)})")
    if not (tok_dir / "tokenizer.json").exists():
        raise NanoforgeError(f"{tok_dir}: no tokenizer.json to export with the model (give --tokenizer DIR)")
    mcfg = read_model_config(model_dir)
    weights = model_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise NanoforgeError(f"{weights}: not a readable safetensors file ({e})") from None
    _check_ours(state, mcfg, str(weights))
    hf_state = to_hf_state(state, mcfg)
    if cfg.dtype is not None:
        hf_state = {name: t.to(DTYPES[cfg.dtype]) for name, t in hf_state.items()}
    dtypes = {t.dtype for t in hf_state.values()}
    dtype = _DTYPE_NAMES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
    ids, ours = _token_ids(tok_dir)
    tok_config = _read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").exists() else {}
    tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tok_config["model_max_length"] = mcfg.seq_len  # what `transformers` truncates to and warns beyond
    if ours and not (tok_dir / "chat_template.jinja").exists():
        tok_config.setdefault("chat_template", CHAT_TEMPLATE)
    if ours:
        # says what tokenizer.json's post-processor (below) does, for tools that read the flag; transformers
        # takes the post-processor itself from tokenizer.json
        tok_config["add_bos_token"] = True
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(save(hf_state, metadata={"format": "pt"}))
        atomic_write_json(tmp / "config.json", hf_config(mcfg, ids, dtype))
        atomic_write_json(tmp / "generation_config.json", _generation_config(model_dir, ids, ours))
        atomic_write_json(tmp / "tokenizer_config.json", tok_config)
        for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tok_dir / name).exists():
                shutil.copyfile(tok_dir / name, tmp / name)
        if ours:
            _add_bos_processor(tmp / "tokenizer.json")
        has_template = "chat_template" in tok_config or (tok_dir / "chat_template.jinja").exists()
        figures = {"architecture": hf_config(mcfg)["architectures"][0], "dtype": dtype,
                   "parameters": sum(t.numel() for t in hf_state.values()), "chat_template": has_template}
        return write_manifest(tmp, stage="export", config=cfg, inputs={"model": model_dir}, figures=figures)


def import_hf(src: Path | str, out: Path | str) -> dict[str, Any]:
    """Read the `transformers` checkpoint directory `src` into the nanoforge model artifact `out`
    (`load_model_artifact` loads it; `nanoforge sample`/fine-tuning use it); returns the manifest."""
    src, out = Path(src), Path(out)
    _check_distinct(src, out)
    if not src.is_dir():
        raise NanoforgeError(f"{src}: not a directory (a transformers checkpoint has config.json + safetensors)")
    hf = _read_json(src / "config.json")
    cfg = model_config_from_hf(hf, str(src / "config.json"))
    state = from_hf_state(read_hf_weights(src), cfg, str(src))
    copied = [name for name in (*HF_TOKENIZER_FILES, "generation_config.json") if (src / name).exists()]
    nanoforge_tokenizer = (src / "tokenizer.json").exists() and _token_ids(src)[1]
    source = {"format": "hf", "model_type": hf.get("model_type"), "architectures": hf.get("architectures")}
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(save(state, metadata=SAFETENSORS_METADATA))
        atomic_write_json(tmp / "config.json", {"model": cfg.to_dict(), "source": source})
        for name in copied:
            shutil.copyfile(src / name, tmp / name)
        figures = {"model_type": hf.get("model_type"), "flavour": cfg.flavour,
                   "parameters": sum(t.numel() for t in state.values()),
                   "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
                   "tokenizer_files": copied, "nanoforge_tokenizer": nanoforge_tokenizer,
                   "ignored": {k: hf[k] for k in _DROPOUTS if hf.get(k)}}
        return write_manifest(tmp, stage="import", config={"format": "hf"}, inputs={"checkpoint": src},
                              figures=figures)
