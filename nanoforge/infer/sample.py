"""The `sample` stage: continue a prompt with a trained model, using the KV-cache engine.

    nanoforge sample --model runs/demo/07-pretrain --prompt "Return the" --seed 1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import generate
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact


@dataclass
class SampleConfig:
    prompt: str = ""
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    num_samples: int = 1
    seed: int = 0


def sample(cfg: SampleConfig, model_dir: Path | str, device: str = "cpu") -> list[str]:
    """`num_samples` continuations of `cfg.prompt` (prompt included), stopping at a document boundary."""
    if cfg.max_new_tokens <= 0:
        raise NanoforgeError(f"--max-new-tokens must be positive, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise NanoforgeError(f"--temperature must be ≥ 0, got {cfg.temperature}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise NanoforgeError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    model = load_model_artifact(model_dir, device)
    tok = Tokenizer.load(Path(model_dir))
    ids = [tok.bos_id, *tok.encode(cfg.prompt)]
    room = model.cfg.seq_len - len(ids)
    if room <= 0:
        raise NanoforgeError(f"prompt is {len(ids)} tokens; the model's context is {model.cfg.seq_len}")
    with torch.inference_mode():
        outs = generate(model, [ids] * cfg.num_samples, max_new_tokens=min(cfg.max_new_tokens, room),
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        stop_tokens=(tok.bos_id,), seed=cfg.seed)
    return [cfg.prompt + tok.decode(o) for o in outs]
