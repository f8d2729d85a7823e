"""AdamW with decoupled weight decay on matrices only, fused where the device supports it."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                device_type: str) -> torch.optim.AdamW:
    """Two groups: ≥2-D weights decay (except embeddings), norms/biases/embeddings do not.

    The fused kernel (one launch for all parameters) exists on CUDA and, since torch 2.4, on CPU.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "wte" in name or "wpe" in name or "embed" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None)
