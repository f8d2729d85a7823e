"""Checkpoints and model artifacts, all in safetensors + JSON (nothing is ever unpickled).

A training checkpoint is a directory `checkpoints/step-000100/` holding

    model.safetensors       weights
    optimizer.safetensors   AdamW moments and step counts, keyed by parameter name
    rng.safetensors         torch RNG states (CPU and every CUDA device)
    state.json              step, tokens seen, loader position, optimizer hyper-parameters, configs

written into a temp directory and renamed into place; `checkpoints/latest` (written atomically after)
names the newest complete one. A kill at any moment leaves the previous checkpoint usable.

A model artifact (the output of pretrain, sft, …) is `model.safetensors` + `config.json` + the
tokenizer files, loadable with `load_model_artifact(dir)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from nanoforge.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "heldout_sample.jsonl")


def _stored_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The first name of each distinct storage: tied weights (e.g. a tied lm_head) are stored once."""
    seen: set[int] = set()
    names = []
    for name, t in state.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            names.append(name)
    return names


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    return {name: state[name].detach().contiguous().cpu() for name in _stored_names(state)}


def load_model_state(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, with a one-line error naming what does not match."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NanoforgeError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    tied = set(own) - set(_stored_names(own))  # restored through the weight they share
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise NanoforgeError(f"{path}: weights do not match the model config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in state.items():
        if own[name].shape != t.shape:
            raise NanoforgeError(f"{path}: {name} has shape {tuple(t.shape)} but the model config "
                                 f"expects {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)


def save_model_artifact(model: GPT, out: Path, *, tokenizer_dir: Path | None, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json (+ tokenizer files) into the existing directory `out`."""
    out.mkdir(parents=True, exist_ok=True)
    blob = save(model_state(model), metadata={"format": "pt", "producer": "nanoforge"})
    atomic_write_bytes(out / "model.safetensors", blob)
    atomic_write_json(out / "config.json", {"model": model.cfg.to_dict(), **(extra or {})})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                atomic_write_text(out / name, src.read_text(encoding="utf-8"))


def read_model_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise NanoforgeError(f"{model_dir}: not a model directory (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoforgeError(f"{path}: malformed JSON ({e.msg})") from None
    return ModelConfig.from_dict(raw.get("model", raw))


def load_model_artifact(model_dir: Path | str, device: str | torch.device = "cpu") -> GPT:
    """The GPT saved in `model_dir` (config.json + model.safetensors), in eval mode."""
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise NanoforgeError(f"{model_dir}: no model.safetensors")
    model = GPT(cfg)
    load_model_state(model, weights)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------
# training checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{names[id(p)]}::{key}"] = t.detach().contiguous().cpu()
    return out


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune all but the `keep` newest."""
    names = {id(p): n for n, p in model.named_parameters()}
    final = ckpt_root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(model_state(model), str(tmp / "model.safetensors"))
        save_file(_optimizer_tensors(opt, names), str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
                  for g in opt.param_groups]
        atomic_write_json(tmp / "state.json", {**state, "step": step, "param_groups": groups})
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = ckpt_root / "latest"
    if pointer.exists():
        cand = ckpt_root / pointer.read_text().strip()
        if (cand / "state.json").exists():
            return cand
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json: step, loader position, configs (read before deciding to load it)."""
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Restore weights, optimizer and RNG states from checkpoint `path`, whose `checkpoint_state` is `state`."""
    load_model_state(model, path / "model.safetensors")
    by_name = dict(model.named_parameters())
    tensors = load_file(str(path / "optimizer.safetensors"))
    if len(state["param_groups"]) != len(opt.param_groups):
        raise NanoforgeError(f"{path}: optimizer groups do not match this model")
    # Rebuild torch's own state-dict shape (parameters by index) so that torch places each tensor
    # on the right device for the (fused or not) AdamW implementation.
    index: dict[str, int] = {}
    groups = []
    for group, saved in zip(opt.param_groups, state["param_groups"], strict=True):
        if [id(by_name[n]) for n in saved["params"] if n in by_name] != [id(p) for p in group["params"]]:
            raise NanoforgeError(f"{path}: optimizer parameters do not match this model")
        for n in saved["params"]:
            index[n] = len(index)
        groups.append({**saved, "params": [index[n] for n in saved["params"]]})
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pname, field = key.split("::")
        per_param.setdefault(index[pname], {})[field] = t
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
