"""Checkpoints and model artifacts, all in safetensors + JSON (nothing is ever unpickled).

A training checkpoint is a directory `checkpoints/step-0000100/` written by every rank together:

    dcp/shard-0000R-model-00001-of-00001.safetensors
                            weights and AdamW moments, as `torch.distributed.checkpoint` (DCP) saves
                            them: each rank writes the pieces it holds (its FSDP shards; under DDP
                            the replicated tensors are split among the ranks), each piece's offsets
                            in the whole tensor in the file header
    rng/rank-0000R.safetensors
                            each rank's torch RNG states (CPU and CUDA)
    state.json              step, tokens seen, the loader's global position, optimizer hyper-parameters,
                            fault counters, configs (rank 0)

DCP reads the pieces back into whatever layout the resuming run has, so a checkpoint written by 8
FSDP ranks resumes on 1 process, on 2 DDP ranks, or the reverse. The files are the safetensors that
DCP's `HuggingFaceStorageWriter` writes, whose reader rebuilds the layout from the headers, so loading
unpickles nothing. All ranks write into `.step-0000100.tmp/`, meet at a barrier, and rank 0 renames it
into place and then points `checkpoints/latest` at it: a kill at any moment leaves the previous
checkpoint usable. (Across nodes, `--out` must be on a filesystem every node sees.)

A model artifact (the output of pretrain, sft, …) is `model.safetensors` + `config.json` + the
tokenizer files, loadable with `load_model_artifact(dir)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanoforge.artifacts import (
    SAFETENSORS_METADATA,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
)
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, ModelConfig
from nanoforge.train.distributed import Dist, barrier, stored_names

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


def save_model_artifact(model: GPT, out: Path, *, tokenizer_dir: Path | None, extra: dict | None = None,
                        state: dict[str, torch.Tensor] | None = None) -> None:
    """Write model.safetensors + config.json (+ tokenizer files) into the existing directory `out`.

    `state` gives the weights when `model` does not hold them whole (gathered from FSDP shards)."""
    out.mkdir(parents=True, exist_ok=True)
    blob = save(model_state(model) if state is None else state, metadata=SAFETENSORS_METADATA)
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


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it works "in a single process" even when told to: one process is a normal run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _tensor_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """{"model": weights, "optim": AdamW state} keyed by parameter name (sharded views under FSDP), and
    the optimizer's param groups. A tied weight is kept once (safetensors refuses shared storage)."""
    msd, osd = get_state_dict(model, opt)
    names = set(stored_names(model))
    return {"model": {k: v for k, v in msd.items() if k in names}, "optim": osd["state"]}, osd["param_groups"]


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], d: Dist, keep: int = 2) -> Path:
    """Write checkpoint `step` from every rank, point `latest` at it, prune all but the `keep` newest.

    Collective: every rank calls it with the same step; `state` (JSON-able) is taken from rank 0.
    """
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    if d.main:
        for stale in ckpt_root.glob(".step-*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier(d)
    tensors, groups = _tensor_state(model, opt)
    with _single_process_quiet():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True),
                 no_dist=not d.active)
    save_file(_rng_tensors(), str(tmp / "rng" / f"rank-{d.rank:05d}.safetensors"))
    barrier(d)
    if d.main:
        atomic_write_json(tmp / "state.json", {**state, "step": step, "world_size": d.world_size,
                                               "param_groups": groups})
        fsync_tree(tmp)
        old = ckpt_root / f".{final.name}.old"
        if final.exists():  # the same step saved again (after a rollback): replace it
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
        for stale in done[:-keep] if keep > 0 else []:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    barrier(d)  # nobody reads `latest` (a rollback) or exits before it is in place
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


def discard_after(ckpt_root: Path, ckpt: Path) -> None:
    """Make `ckpt` the latest checkpoint again and delete the newer ones (their weights went wrong)."""
    atomic_write_text(ckpt_root / "latest", ckpt.name + "\n")
    for newer in ckpt_root.glob("step-*"):
        if newer.name > ckpt.name:
            shutil.rmtree(newer, ignore_errors=True)


def resume_point(out: Path, resume: bool, stage: str = "training") -> Path | None:
    """The checkpoint a training stage writing to `out` starts from: the latest one with `resume`, else
    None. Refuses `resume` without a checkpoint, and a fresh start over a run already in `out`."""
    ckpt_root = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if resume and ckpt is None:
        raise NanoforgeError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and (ckpt is not None or (out / "manifest.json").exists()):
        raise NanoforgeError(f"{out} already holds a {stage} run; pass --resume to continue it or choose another --out")
    return ckpt


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json: step, loader position, configs (read before deciding to load it)."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanoforgeError(f"{path}: damaged checkpoint (state.json: {e}); delete it to resume from the one "
                             f"before") from None


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from checkpoint `path` into this run's layout (any world
    size, DDP or FSDP); returns its `checkpoint_state`. Collective under torchrun."""
    state = checkpoint_state(path)
    if not (path / "dcp").is_dir():
        raise NanoforgeError(f"{path}: no dcp/ directory (a checkpoint from an older nanoforge?); "
                             f"start the run again in a new --out")
    tensors, _ = _tensor_state(model, opt)
    try:
        with _single_process_quiet():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "dcp")), no_dist=not d.active)
    except (CheckpointException, RuntimeError, KeyError, ValueError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoforgeError(f"{path}: checkpoint does not fit this model and optimizer, or its files are "
                             f"damaged ({first})") from None
    # the saved groups say which parameters each holds; their settings (weight decay, betas, …) are this
    # run's, so that a resume with other settings uses the ones its manifest records
    groups = state["param_groups"]
    if len(groups) == len(opt.param_groups):
        groups = [{**saved, **{k: v for k, v in now.items() if k != "params"}}
                  for saved, now in zip(groups, opt.param_groups, strict=True)]
    set_state_dict(model, opt, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optim"], "param_groups": groups},
                   options=StateDictOptions(strict=False))  # strict=False: a tied weight is stored once
    rng_dir = path / "rng"
    mine = rng_dir / f"rank-{d.rank:05d}.safetensors"
    try:
        rng = load_file(str(mine if mine.exists() else rng_dir / "rank-00000.safetensors"))  # ranks added: rank 0's
    except (OSError, SafetensorError) as e:
        raise NanoforgeError(f"{path}: damaged checkpoint (rng/: {e}); delete it to resume from the one before"
                             ) from None
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return state
