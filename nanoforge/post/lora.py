"""LoRA: low-rank adapters on a frozen model, saved alone, merged back into a plain model.

    nanoforge sft --model base/ --data train.jsonl --out adapter/ --lora-rank 8 --lora-alpha 16
    nanoforge merge --model base/ --adapter adapter/ --out chat-model/

A LoRA layer keeps its pretrained weight W (out, in) frozen and learns a low-rank update: y = x Wᵀ +
(α/r)·x Aᵀ Bᵀ with A (r, in) random and B (out, r) zero, so training starts from the base model exactly
(Hu et al. 2021). Only A and B are trained and stored: AdamW holds two moments for r·(in + out) numbers per
layer instead of in·out. `LoRALinear` *is* an `nn.Linear` (it keeps `weight`/`bias` under their names), so
the base model's state-dict names, checkpoints and optimizer groups do not change; the adapter adds
`<layer>.lora_A` and `<layer>.lora_B`. Merging adds (α/r)·B A to W and gives back a plain `GPT`.

The adapter directory is PEFT's: `adapter_model.safetensors` (`base_model.model.<layer>.lora_A.weight`
(r, in) and `….lora_B.weight` (out, r)) and `adapter_config.json` (`peft_type` LORA, `r`, `lora_alpha`,
`target_modules`, `base_model_name_or_path`; nothing PEFT does not know, so it loads without a warning).
The base model's content hash is in the adapter's `manifest.json`, with the run's settings: `merge` refuses
another base. `PeftModel.from_pretrained(gpt, adapter_dir)` puts it on our `GPT` module, and an adapter that PEFT
saved for a `GPT` loads here (`load_adapter`; keys without the prefix, as nanoforge wrote them before, too).

Quantized base (QLoRA-style): `--lora-quantize int8` stores the frozen linear weights of the blocks in
8 bits with a scale per output channel (torchao's `Int8WeightOnlyConfig`, `pip install torchao`): a quarter
of their fp32 memory, on CPUs and GPUs, with the backward to the activations the adapters need. QLoRA's
4-bit NF4 base is not offered: torchao's 4-bit CPU path needs further packages and bitsandbytes' CPU
backend is not maintained for this torch. The adapter is trained against the quantized base and merged
into the full-precision one (as QLoRA does).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from nanoforge.artifacts import (
    SAFETENSORS_METADATA,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    input_hash,
    read_manifest,
    write_manifest,
)
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"
# the linear layers of a block, by their name in `nanoforge.model` (lm_head can be named explicitly)
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
PEFT_PREFIX = "base_model.model."  # PEFT names a weight by its path from the PeftModel


@dataclass
class LoRAConfig:
    """Which layers get adapters and their shape: `--lora-rank R --lora-alpha A --lora-targets …`."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # all-linear | qkv,proj,fc,lm_head …
    dropout: float = 0.0  # on the adapter's input only
    quantize: str | None = None  # int8: the frozen base weights in 8 bits (torchao), QLoRA-style

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise NanoforgeError(f"lora: quantize must be int8 or none, got {self.quantize!r}")
        if self.rank < 1:
            raise NanoforgeError(f"lora: rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise NanoforgeError(f"lora: alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise NanoforgeError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise NanoforgeError("lora: no target layers given")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An `nn.Linear` whose frozen weight gets a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: tying and names are kept
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0 so ΔW = 0 at start
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # (…, in) @ (in, r) @ (r, out): two thin matmuls instead of a dense (out, in) update
        return super().forward(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> Tensor:
        """(α/r)·B A, the (out, in) update that merging adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def effective_weight(self) -> Tensor:
        """W + (α/r)·B A, differentiable in A and B: what `GPT.forward`'s fused loss takes for an adapted
        lm_head, which it multiplies by its weight directly rather than calling the module."""
        return self.weight + self.delta_weight().to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def target_names(model: GPT, targets: list[str]) -> list[str]:
    """Names of the modules to adapt: `all-linear` is every linear layer of the blocks (not lm_head, as
    in PEFT); otherwise each target matches module names ending with it (`qkv`, `mlp.proj`, `lm_head`)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for t in targets:
        if t == ALL_LINEAR:
            found = [n for n in linears if n.endswith(BLOCK_LINEARS)]
        else:
            found = [n for n in linears if n == t or n.endswith("." + t)]
        if not found:
            raise NanoforgeError(f"lora: target {t!r} matches no linear layer (try {ALL_LINEAR}, qkv, proj, fc, "
                                 f"attn.proj, mlp.proj, lm_head)")
        chosen += [n for n in found if n not in chosen]
    if "lm_head" in chosen and model.cfg.tie_embeddings:
        raise NanoforgeError("lora: lm_head shares its weight with the token embeddings in this model; "
                             "an adapter on it would change the embeddings when merged")
    return chosen


def apply_lora(model: GPT, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and put a `LoRALinear` in place of each target; returns their names."""
    names = target_names(model, cfg.targets)
    if "lm_head" in names and cfg.dropout:  # the fused loss takes lm_head's adapted weight, not its forward
        raise NanoforgeError("lora: dropout cannot apply to an adapter on lm_head (the training loss uses its "
                             "weight, not its input); set the dropout to 0 or leave lm_head out")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def quantize_base(model: GPT) -> int:
    """Store the frozen linear weights of the blocks in int8 (per-channel scales, torchao), in place; returns
    how many layers were quantized. Embeddings and lm_head stay in full precision."""
    for noisy in ("torchao", "torch.utils._pytree"):  # importing torchao warns of GPU kernels and torch.compile
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise NanoforgeError("lora: --lora-quantize int8 needs torchao (pip install torchao)") from None
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(BLOCK_LINEARS)]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return len(names)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter weights among `params` (parameter name → tensor) under PEFT's names:
    `base_model.model.<layer>.lora_A.weight` (r, in) and `….lora_B.weight` (out, r)."""
    return {f"{PEFT_PREFIX}{n}.weight": t.detach().contiguous().cpu() for n, t in params.items()
            if n.endswith((".lora_A", ".lora_B"))}


def save_adapter(out: Path, cfg: LoRAConfig, layers: list[str], params: dict[str, Tensor], base_dir: Path) -> None:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's keys) into the existing directory `out`.

    `params` maps parameter names to tensors: `dict(model.named_parameters())`, or the gathered weights
    of a sharded model."""
    blob = save(adapter_state(params), metadata=SAFETENSORS_METADATA)
    atomic_write_bytes(out / ADAPTER_WEIGHTS, blob)
    atomic_write_json(out / ADAPTER_CONFIG, {
        "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": sorted(layers), "base_model_name_or_path": str(base_dir),
    })


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise NanoforgeError(f"{adapter_dir}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoforgeError(f"{path}: malformed JSON ({e.msg})") from None


def load_adapter(model: GPT, adapter_dir: Path) -> LoRAConfig:
    """Put the adapter saved in `adapter_dir` on `model` (its base); returns the adapter's config."""
    raw = read_adapter_config(adapter_dir)
    where = f"{adapter_dir}/{ADAPTER_CONFIG}"
    if (raw.get("peft_type", "LORA") != "LORA" or raw.get("bias", "none") != "none"
            or any(raw.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern"))):
        raise NanoforgeError(f"{where}: only plain LoRA adapters load here (peft_type LORA, bias none; no DoRA, "
                             "rsLoRA or per-layer ranks)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT's regex form: only a plain name (or all-linear) means what it says here
        if not re.fullmatch(r"[\w.-]+", targets):
            raise NanoforgeError(f"{where}: target_modules {targets!r} is a regular expression; list the layers")
        targets = [targets]
    try:
        cfg = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), targets=list(targets),
                         dropout=float(raw.get("lora_dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise NanoforgeError(f"{where}: missing or bad field ({e})") from None
    apply_lora(model, cfg)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NanoforgeError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = {k.removeprefix(PEFT_PREFIX): t for k, t in tensors.items()}
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(tensors) != expected:
        raise NanoforgeError(f"{path}: adapter weights do not match its config "
                             f"(missing {sorted(expected - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:3]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab, param in (("A", layer.lora_A), ("B", layer.lora_B)):
                t = tensors[f"{name}.lora_{ab}.weight"]
                if t.shape != param.shape:
                    raise NanoforgeError(f"{path}: {name}.lora_{ab} has shape {tuple(t.shape)}, the base model "
                                         f"needs {tuple(param.shape)} (another base model?)")
                param.copy_(t)
    return cfg


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its weight (W += (α/r)·B A) and put plain `nn.Linear`s back, in place."""
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
            plain.weight = layer.weight
            plain.bias = layer.bias
            plain.weight.add_(layer.delta_weight().to(layer.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge(model_dir: Path, adapter_dir: Path, out: Path) -> dict[str, Any]:
    """The `merge` stage: base model + adapter → a plain model artifact (usable by chat, serve, sft …)."""
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), Path(out)
    raw = read_adapter_config(adapter_dir)
    # the base the adapter was trained on: its hash as the sft stage's manifest records its input (as
    # adapter_config.json did before nanoforge kept that file to PEFT's fields)
    recorded = ((read_manifest(adapter_dir) or {}).get("inputs", {}).get("model", {}).get("hash")
                or raw.get("base_model_hash"))
    if recorded and recorded != input_hash(model_dir):
        raise NanoforgeError(f"{adapter_dir}: this adapter was trained on another base model "
                             f"({raw.get('base_model_name_or_path', raw.get('base_model'))}), not {model_dir}")
    model = load_model_artifact(model_dir)
    cfg = load_adapter(model, adapter_dir)
    merge_lora(model)
    with atomic_dir(out) as tmp:
        save_model_artifact(model, tmp, tokenizer_dir=model_dir, extra={"merged_from": str(adapter_dir)})
        figures = {"params": model.num_params(), "adapted_layers": len(raw["target_modules"]), "rank": cfg.rank}
        manifest = write_manifest(tmp, stage="merge", config=cfg,
                                  inputs={"model": model_dir, "adapter": adapter_dir}, figures=figures)
    return manifest
