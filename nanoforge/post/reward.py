"""The reward model: our GPT trunk with a scalar head, trained on preference pairs with the Bradley–Terry loss.

    nanoforge reward --model runs/demo/09-sft --prefs runs/demo/10-label/prefs.jsonl --out runs/demo/11-reward

The reward of a (prompt, response) is `score · h`, where h is the trunk's final hidden state (after the last
norm) at the last token of `render_prompt(prompt) + response + <|assistant_end|>`: the end-of-turn token has
seen the whole exchange. Bradley–Terry: P(chosen ≻ rejected) = σ(r_c − r_r), so the loss of a pair is
`−log σ(r_c − r_r − m)`, with m = `margin_scale` × the pair's margin (0 unless asked: the Llama 2 margin
term, which asks for a wider gap where the annotators agreed more). The trunk starts from `--model` (the
SFT model), the head from N(0, 1/(d+1)) (InstructGPT). Held-out pairs (`val_fraction`, split by prompt)
give the accuracy: the share of pairs where r_c > r_r.

The artifact, loadable with `RewardModel.load(dir)`:

    model.safetensors, config.json, tokenizer files   the trunk: a normal model artifact (`load_model_artifact`
                                                     reads it; its lm_head is the starting model's, unused)
    score.safetensors                                `score.weight` (1, n_embd): the head, named as in
                                                     transformers' `*ForSequenceClassification` (num_labels=1)
    config.json "reward"                             {"pooling": "last_token", "mean": μ, "std": σ}: μ and σ of
                                                     the rewards of the training responses (`normalize=True`
                                                     returns (r − μ)/σ, what PPO consumes)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from nanoforge.artifacts import atomic_write_bytes, write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT
from nanoforge.post.preference import (
    Message,
    Pair,
    PostTrainConfig,
    SequenceBatch,
    TrainRun,
    adamw,
    chunks,
    encode_pairs,
    epoch_batches,
    hidden_states,
    pair_batch,
    read_preferences,
    rows_across_ranks,
    sequence_batch,
    setup_ranks,
    split_pairs,
)
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact
from nanoforge.train.distributed import Dist, all_reduce_sum, run_then_close

SCORE_FILE = "score.safetensors"


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Mean of −log σ(r_c − r_r − m) over the pairs (m = 0 without margins)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


class RewardModel(nn.Module):
    """A GPT trunk and a linear scalar head on the hidden state of each sequence's last token."""

    def __init__(self, trunk: GPT, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(trunk.cfg.n_embd + 1))
        self.mean, self.std = mean, std

    def forward(self, idx: Tensor, last: Tensor) -> Tensor:
        """idx (B, T) right-padded sequences, last (B,) index of each one's last token -> rewards (B,)."""
        h = hidden_states(self.trunk, idx)  # (B, T, d)
        return self.score(h[torch.arange(idx.shape[0], device=idx.device), last]).squeeze(-1)

    @torch.no_grad()
    def rewards(self, tok: Tokenizer, prompts: Sequence[list[Message]], responses: Sequence[str], *,
                normalize: bool = False, batch_size: int = 32) -> list[float]:
        """The reward of each (chat prompt, response text) pair."""
        end = tok.special_id("assistant_end")
        seqs = [(tok.render_prompt(p), [*tok.encode(r), end]) for p, r in zip(prompts, responses, strict=True)]
        return self.rewards_of_ids(seqs, tok.pad_id, normalize=normalize, batch_size=batch_size)

    @torch.no_grad()
    def rewards_of_ids(self, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, *, normalize: bool = False,
                       batch_size: int = 32) -> list[float]:
        """The reward of each (prompt ids, response ids) pair; a sequence longer than the context keeps its
        last `seq_len` tokens."""
        was = self.training
        self.eval()
        limit = self.trunk.cfg.seq_len
        device = self.score.weight.device
        out: list[float] = []
        for part in chunks(list(seqs), batch_size):
            fitted = [(p + r)[-limit:] for p, r in part]
            batch = sequence_batch([(s[:1], s[1:]) for s in fitted], pad_id).to(device)
            r = self(batch.idx, batch.last)
            out += ((r - self.mean) / self.std if normalize else r).tolist()
        self.train(was)
        return out

    def save(self, out: Path, tokenizer_dir: Path | None, extra: dict[str, Any] | None = None) -> None:
        """The trunk as a model artifact, the head in score.safetensors, the statistics in config.json."""
        save_model_artifact(self.trunk, out, tokenizer_dir=tokenizer_dir,
                            extra={"reward": {"pooling": "last_token", "mean": self.mean, "std": self.std},
                                   **(extra or {})})
        blob = save({"score.weight": self.score.weight.detach().cpu().contiguous()}, metadata={"format": "pt"})
        atomic_write_bytes(out / SCORE_FILE, blob)

    @classmethod
    def load(cls, model_dir: Path | str, device: str | torch.device = "cpu") -> RewardModel:
        """The reward model saved in `model_dir` by `nanoforge reward`, in eval mode."""
        model_dir = Path(model_dir)
        path = model_dir / SCORE_FILE
        if not path.exists():
            raise NanoforgeError(f"{model_dir}: not a reward model (no {SCORE_FILE}; train one with "
                                 f"`nanoforge reward`)")
        stats = json.loads((model_dir / "config.json").read_text()).get("reward", {})
        rm = cls(load_model_artifact(model_dir, device), float(stats.get("mean", 0.0)), float(stats.get("std", 1.0)))
        try:
            weight = load_file(str(path))["score.weight"]
        except (SafetensorError, OSError, KeyError) as e:
            raise NanoforgeError(f"{path}: not a readable score head ({e})") from None
        if weight.shape != rm.score.weight.shape:
            raise NanoforgeError(f"{path}: score.weight has shape {tuple(weight.shape)}, the trunk needs "
                                 f"{tuple(rm.score.weight.shape)}")
        with torch.no_grad():
            rm.score.weight.copy_(weight)
        return rm.to(device).eval()


@dataclass
class RewardConfig(PostTrainConfig):
    """`nanoforge reward`: Bradley–Terry training of the trunk + head (batch_size = pairs per step)."""

    max_steps: int = 100
    lr: float = 1e-4
    batch_size: int = 16
    val_fraction: float = 0.1
    margin_scale: float = 0.0  # m = margin_scale × the pair's margin in the loss (0: plain Bradley–Terry)
    eval_batch_size: int = 64


def pairs_rewards(rm: RewardModel, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """(r_chosen, r_rejected) of a `pair_batch`."""
    r = rm(batch.idx, batch.last)
    half = r.shape[0] // 2
    return r[:half], r[half:]


@torch.no_grad()
def evaluate_reward(rm: RewardModel, pairs: Sequence[Pair], pad_id: int, device: torch.device,
                    batch_size: int, d: Dist) -> dict[str, float]:
    """Held-out loss, accuracy (share of pairs with r_c > r_r) and mean reward gap; under torchrun every
    rank calls it and scores its share of the pairs."""
    if not pairs:
        return {}
    was = rm.training
    rm.eval()
    r = rows_across_ranks(lambda part: torch.stack(pairs_rewards(rm, pair_batch(part, pad_id).to(device)), dim=1),
                          pairs, batch_size, 2, d, device)
    rm.train(was)
    rc, rr = r[:, 0], r[:, 1]
    return {"val_loss": float(bradley_terry_loss(rc, rr)), "val_accuracy": float((rc > rr).float().mean()),
            "val_reward_gap": float((rc - rr).mean())}


def load_pairs(tok: Tokenizer, prefs: Path, seq_len: int, val_fraction: float, seed: int,
               stage: str, *, quiet: bool = False) -> tuple[list[Pair], list[Pair], int]:
    """Read, encode and split a preference file: (train, held-out, pairs dropped as too long)."""
    pairs, dropped = encode_pairs(tok, read_preferences(prefs), seq_len)
    if not pairs:
        raise NanoforgeError(f"{prefs}: no pair fits the model's context of {seq_len} tokens")
    train, val = split_pairs(pairs, val_fraction, seed)
    if not quiet:
        info(f"{stage}: {len(train)} training pairs, {len(val)} held out"
             + (f", {dropped} dropped (longer than {seq_len} tokens)" if dropped else ""))
    return train, val, dropped


def train_reward(cfg: RewardConfig, model_dir: Path | str, prefs: Path | str, out: Path | str, *,
                 resume: bool = False, inputs: dict[str, Path] | None = None) -> dict[str, Any] | None:
    """Train a reward model from the model in `model_dir` on the pairs in `prefs`; write it to `out`.
    `inputs`: what the manifest records as inputs (default: the model and the preference file).
    Under torchrun every rank calls it (each takes an equal share of every step's pairs, gradients are
    averaged: the steps of one process); rank 0 writes and returns the manifest, the others return None."""
    cfg.check("reward")
    d, device = setup_ranks(cfg)
    return run_then_close(d, lambda: _reward(cfg, Path(model_dir), Path(prefs), Path(out), resume, inputs, d,
                                             device))


def _reward(cfg: RewardConfig, model_dir: Path, prefs: Path, out: Path, resume: bool,
            inputs: dict[str, Path] | None, d: Dist, device: torch.device) -> dict[str, Any] | None:
    tok = Tokenizer.load(model_dir)
    trunk = load_model_artifact(model_dir, device)
    train, val, dropped = load_pairs(tok, prefs, trunk.cfg.seq_len, cfg.val_fraction, cfg.seed, "reward",
                                     quiet=not d.main)

    rm = RewardModel(trunk).to(device)
    if not trunk.cfg.tie_embeddings:
        trunk.lm_head.weight.requires_grad_(False)  # not on the reward's path
    decay, no_decay = trunk.param_groups_for_weight_decay()
    opt = adamw([*decay, rm.score.weight], no_decay, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device)
    run = TrainRun("reward", cfg, out, rm, opt, resume=resume, dist=d)
    if run.step == 0:  # kept in the checkpoints, so a resumed run still reports it
        run.state["val_accuracy_before"] = evaluate_reward(rm, val, tok.pad_id, device,
                                                           cfg.eval_batch_size, d).get("val_accuracy")
    rm.train()
    last_eval: dict[str, float] = {}
    tokens = 0
    busy = 0.0
    for step in run.steps():
        t0 = time.perf_counter()
        part = [train[i] for i in run.shard(epoch_batches(len(train), cfg.batch_size, step - 1, cfg.seed))]
        batch = pair_batch(part, tok.pad_id).to(device)
        rc, rr = pairs_rewards(rm, batch)
        margin = torch.tensor([p.margin for p in part], device=device) * cfg.margin_scale
        loss = bradley_terry_loss(rc, rr, margin if cfg.margin_scale else None)
        run.update(loss)
        n_tokens = int((batch.last + 1).sum())
        dt = time.perf_counter() - t0
        tokens, busy = tokens + n_tokens, busy + dt
        gap = (rc - rr).detach()
        record: dict[str, Any] = {"loss": float(loss.detach()), "accuracy": float((gap > 0).float().mean()),
                                  "reward_gap": float(gap.mean()), "tok_per_s": n_tokens / dt}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_eval = evaluate_reward(rm, val, tok.pad_id, device, cfg.eval_batch_size, d)
            record.update(last_eval)
        run.log(record, show=("loss", "accuracy", "val_accuracy"))
    rows = run.finish("reward model (Bradley–Terry)")
    tokens = int(all_reduce_sum(torch.tensor([tokens]), d))  # every rank's share of the batches
    last_eval = last_eval or evaluate_reward(rm, val, tok.pad_id, device, cfg.eval_batch_size, d)  # resumed when done
    # the reward's scale over the training responses, which PPO normalises with (each rank scores its share)
    scores = rows_across_ranks(lambda part: torch.tensor(rm.rewards_of_ids(part, tok.pad_id, batch_size=len(part)),
                                                         device=device)[:, None],
                               [(p.prompt, r) for p in train for r in (p.chosen, p.rejected)],
                               cfg.eval_batch_size, 1, d, device)[:, 0]
    rm.mean, rm.std = float(scores.mean()), float(scores.std().clamp_min(1e-6))
    if not d.main:
        return None
    rm.save(out, model_dir, extra={"stage": "reward", "step": run.step})
    losses = [r["loss"] for r in rows if "loss" in r]
    figures = {"train_pairs": len(train), "val_pairs": len(val), "dropped_pairs": dropped, "steps": run.step,
               "final_loss": losses[-1] if losses else None, **last_eval,
               "val_accuracy_before": run.state.get("val_accuracy_before"),
               "reward_mean": rm.mean, "reward_std": rm.std, "world_size": d.world_size,
               "tok_per_s": tokens / busy if busy else None, "seconds": round(run.seconds, 1)}
    manifest = write_manifest(out, stage="reward", config=cfg, inputs=inputs or {"model": model_dir, "prefs": prefs},
                              figures=figures)
    info(f"reward done in {figures['seconds']:.0f}s: {figures['steps']} steps, held-out accuracy "
         f"{_pct(figures.get('val_accuracy'))} (before {_pct(figures['val_accuracy_before'])})")
    return manifest


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
