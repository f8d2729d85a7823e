"""Direct Preference Optimization (Rafailov et al., 2023): the policy learns the preferences directly, against
a frozen copy of the starting model, with no reward model and no sampling.

    nanoforge dpo --model runs/demo/09-sft --prefs runs/demo/10-label/prefs.jsonl --out runs/demo/12-dpo --beta 0.1

With π the policy, π_ref the reference (the starting model, frozen) and log-probabilities summed over the
response tokens (prompt and padding excluded), the loss of a pair (x, y_c, y_r) is

    −log σ(β · ((log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))))

β·(log π − log π_ref) is the implicit reward of a response; metrics.jsonl logs it under TRL's names:
`rewards_chosen`, `rewards_rejected`, `rewards_margin` (their difference, which training raises) and
`rewards_accuracy` (the share of pairs with a positive margin), on the batch and on the held-out pairs
(`val_*`). With `precompute_ref` (the default) the reference log-probabilities of every pair are computed
once before training and the reference model is dropped: one forward per pair instead of one per step, and
one model in memory. The output is a normal model artifact (model.safetensors + config.json + tokenizer).

Under torchrun every rank holds the policy (and the reference log-probabilities) and takes an equal share of
each step's pairs; gradients are averaged over the ranks, so a run on N GPUs takes the steps of one process
with the same `batch_size` (which must be a multiple of N). The reference log-probabilities and the held-out
evaluation are shared out too: each rank computes every N-th pair and the ranks exchange the results.

    torchrun --nproc-per-node 8 -m nanoforge dpo --model … --prefs … --out … --batch-size 64
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoforge.artifacts import write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT
from nanoforge.post.preference import (
    Pair,
    PostTrainConfig,
    TrainRun,
    epoch_batches,
    mean_of,
    pair_batch,
    response_logprobs,
    rows_across_ranks,
    setup_ranks,
)
from nanoforge.post.reward import load_pairs
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact
from nanoforge.train.distributed import Dist, all_reduce_sum, run_then_close
from nanoforge.train.optim import build_adamw


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, implicit rewards of the chosen (B,), of the rejected (B,)) from summed log-probabilities."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


@dataclass
class DPOConfig(PostTrainConfig):
    """`nanoforge dpo` (batch_size = pairs per step)."""

    max_steps: int = 100
    lr: float = 5e-5
    batch_size: int = 8
    beta: float = 0.1
    val_fraction: float = 0.1
    precompute_ref: bool = True  # reference log-probabilities once, up front (else a reference forward per step)
    eval_batch_size: int = 32


def pair_logprobs(model: GPT, pairs: Sequence[Pair], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(Σ log π(chosen), Σ log π(rejected), tokens in the batch) of `pairs` under `model`."""
    batch = pair_batch(pairs, pad_id).to(device)
    logps = response_logprobs(model, batch)
    half = len(pairs)
    return logps[:half], logps[half:], int((batch.last + 1).sum())


@torch.no_grad()
def all_pair_logprobs(model: GPT, pairs: Sequence[Pair], pad_id: int, device: torch.device,
                      batch_size: int, d: Dist) -> Tensor:
    """(N, 2) log-probabilities (chosen, rejected) of every pair under `model` (the reference, or the policy
    for evaluation), on every rank; under torchrun each rank computes its share."""
    return rows_across_ranks(lambda part: torch.stack(pair_logprobs(model, part, pad_id, device)[:2], dim=1),
                             pairs, batch_size, 2, d, device)


def _metrics(loss: Tensor, chosen: Tensor, rejected: Tensor, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}loss": float(loss.detach()), f"{prefix}rewards_chosen": float(chosen.mean()),
            f"{prefix}rewards_rejected": float(rejected.mean()),
            f"{prefix}rewards_margin": float((chosen - rejected).mean()),
            f"{prefix}rewards_accuracy": float((chosen > rejected).float().mean())}


@torch.no_grad()
def evaluate_dpo(policy: GPT, pairs: Sequence[Pair], ref_logps: Tensor, cfg: DPOConfig, pad_id: int,
                 device: torch.device, d: Dist) -> dict[str, float]:
    """Held-out DPO loss, implicit rewards, margin and accuracy; every rank calls it and scores its share."""
    if not pairs:
        return {}
    was = policy.training
    policy.eval()
    logps = all_pair_logprobs(policy, pairs, pad_id, device, cfg.eval_batch_size, d)
    policy.train(was)
    _, c, r = dpo_loss(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], cfg.beta)
    return _metrics(-F.logsigmoid(c - r).mean(), c, r, prefix="val_")


def train_dpo(cfg: DPOConfig, model_dir: Path | str, prefs: Path | str, out: Path | str, *,
              resume: bool = False, inputs: dict[str, Path] | None = None) -> dict[str, Any] | None:
    """DPO-train the model in `model_dir` on the pairs in `prefs`; write the policy to `out`.
    `inputs`: what the manifest records as inputs (default: the model and the preference file).
    Under torchrun every rank calls it; rank 0 writes and returns the manifest, the others return None."""
    cfg.check("dpo")
    if not cfg.beta > 0:
        raise NanoforgeError(f"dpo: beta must be > 0, got {cfg.beta}")
    d, device = setup_ranks(cfg)
    return run_then_close(d, lambda: _dpo(cfg, Path(model_dir), Path(prefs), Path(out), resume, inputs, d, device))


def _dpo(cfg: DPOConfig, model_dir: Path, prefs: Path, out: Path, resume: bool, inputs: dict[str, Path] | None,
         d: Dist, device: torch.device) -> dict[str, Any] | None:
    tok = Tokenizer.load(model_dir)
    policy = load_model_artifact(model_dir, device)
    train, val, dropped = load_pairs(tok, prefs, policy.cfg.seq_len, cfg.val_fraction, cfg.seed, "dpo",
                                     quiet=not d.main)

    ref = load_model_artifact(model_dir, device)
    ref.requires_grad_(False)
    ref_val = all_pair_logprobs(ref, val, tok.pad_id, device, cfg.eval_batch_size, d)
    ref_train = None
    if cfg.precompute_ref:
        t0 = time.perf_counter()
        ref_train = all_pair_logprobs(ref, train, tok.pad_id, device, cfg.eval_batch_size, d)
        if d.main:
            info(f"dpo: reference log-probabilities of {len(train) + len(val)} pairs in "
                 f"{time.perf_counter() - t0:.1f}s")
        del ref
    opt = build_adamw(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), device_type=device.type)
    run = TrainRun("dpo", cfg, out, policy, opt, resume=resume, dist=d)
    policy.train()
    last_eval: dict[str, float] = {}
    tokens, busy = 0, 0.0
    for step in run.steps():
        t0 = time.perf_counter()
        index = run.shard(epoch_batches(len(train), cfg.batch_size, step - 1, cfg.seed))
        part = [train[i] for i in index]
        pc, pr, n_tokens = pair_logprobs(policy, part, tok.pad_id, device)
        if ref_train is not None:
            rc, rr = ref_train[index, 0], ref_train[index, 1]
        else:
            with torch.no_grad():
                rc, rr, _ = pair_logprobs(ref, part, tok.pad_id, device)
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, cfg.beta)
        run.update(loss)
        dt = time.perf_counter() - t0
        tokens, busy = tokens + n_tokens, busy + dt
        record: dict[str, Any] = {**_metrics(loss, chosen, rejected), "tok_per_s": n_tokens / dt}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_eval = evaluate_dpo(policy, val, ref_val, cfg, tok.pad_id, device, d)
            record.update(last_eval)
        run.log(record, show=("loss", "rewards_margin", "val_rewards_accuracy"))
    rows = run.finish(f"DPO (beta {cfg.beta})")
    tokens = int(all_reduce_sum(torch.tensor([tokens]), d))  # every rank's share of the batches
    last_eval = last_eval or evaluate_dpo(policy, val, ref_val, cfg, tok.pad_id, device, d)  # resumed when done
    if not d.main:
        return None

    save_model_artifact(policy, out, tokenizer_dir=model_dir, extra={"stage": "dpo", "step": run.step})
    tail = rows[-10:]
    figures = {"train_pairs": len(train), "val_pairs": len(val), "dropped_pairs": dropped, "steps": run.step,
               "beta": cfg.beta, "final_loss": rows[-1].get("loss") if rows else None,
               "rewards_margin": mean_of(r.get("rewards_margin") for r in tail),
               "rewards_accuracy": mean_of(r.get("rewards_accuracy") for r in tail), **last_eval,
               "tok_per_s": tokens / busy if busy else None, "world_size": d.world_size,
               "seconds": round(run.seconds, 1)}
    manifest = write_manifest(out, stage="dpo", config=cfg, inputs=inputs or {"model": model_dir, "prefs": prefs},
                              figures=figures)
    info(f"dpo done in {figures['seconds']:.0f}s: {run.step} steps, held-out margin "
         f"{figures.get('val_rewards_margin', float('nan')):.3g}, accuracy "
         f"{100 * figures.get('val_rewards_accuracy', float('nan')):.1f}%")
    return manifest
