"""AdamW with decoupled weight decay on matrices only, fused where the device supports it."""

from __future__ import annotations

import torch

from nanoforge.model import GPT


def build_adamw(model: GPT, *, lr: float, weight_decay: float, betas: tuple[float, float],
                device_type: str) -> torch.optim.AdamW:
    """Two groups (the model's `param_groups_for_weight_decay`): matrices decay; embeddings, norms and biases
    do not. Frozen parameters are left out.

    The fused kernel (one launch for all parameters) exists on CUDA and, since torch 2.4, on CPU.
    """
    decay, no_decay = model.param_groups_for_weight_decay()
    decay = [p for p in decay if p.requires_grad]
    no_decay = [p for p in no_decay if p.requires_grad]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device_type in ("cpu", "cuda"))
