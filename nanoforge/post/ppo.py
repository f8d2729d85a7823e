"""PPO against a reward model (InstructGPT's RLHF step): sample, score, penalise drift, update with clipping.

    nanoforge ppo --model runs/demo/09-sft --reward-model runs/demo/11-reward --prompts prompts.jsonl \\
        --out runs/demo/13-ppo

Under torchrun every rank holds the policy, its value head, the reference and the reward model, and takes an
equal share of each step's prompts (`batch_size` a multiple of the ranks): it samples and scores its own
responses, advantages are whitened over every rank's tokens, and each minibatch's gradients are averaged
over the ranks, so all ranks take the same updates.

Each step (one PPO iteration, as in TRL's PPOTrainer):

1. Rollout: `batch_size` prompts (the prompt-file formats of `nanoforge label`), one response each from the
   policy (the engine, `temperature`, no top-k so the samples follow the policy exactly), ending at
   `<|assistant_end|>` or `max_new_tokens`.
2. Score: the reward model's reward of each (prompt, response), normalised by the mean and std it was
   trained with. Per-token rewards: r_t = −kl_coef·(log π_old(a_t) − log π_ref(a_t)) (the KL penalty to the
   frozen starting model, π_ref), plus the score on the response's last token.
3. Advantages by GAE: δ_t = r_t + γ·V(s_{t+1}) − V(s_t), A_t = Σ_k (γλ)^k δ_{t+k} (V = 0 past the end),
   returns R_t = A_t + V(s_t); advantages are whitened over the batch's response tokens.
4. `ppo_epochs` passes over the rollout in `minibatches` minibatches, each minimising
   L = E[max(−A·ρ, −A·clip(ρ, 1 ± clip_range))] + vf_coef · ½·E[max((V − R)², (V_clip − R)²)],
   ρ = π(a_t)/π_old(a_t), V_clip = V_old + clip(V − V_old, ±clip_range_value), means over response tokens.

The value head is a linear layer on the policy's own trunk (shared, like TRL's `ValueHead`), initialised
to zero. Why PPO and not RLOO here: both were weighed; PPO is the issue's reference algorithm and its
per-token value baseline is what turns a single sample per prompt (our CPU budget) into a usable signal,
where RLOO needs k ≥ 2 samples of every prompt for its leave-one-out baseline. GRPO (`nanoforge grpo`)
covers the critic-free, group-baseline family. The output is the policy as a normal model artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoforge.artifacts import write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.feedback.items import PromptRecord, read_prompts
from nanoforge.infer.engine import generate
from nanoforge.model import GPT
from nanoforge.post.preference import (
    Message,
    PostTrainConfig,
    TrainRun,
    adamw,
    hidden_states,
    mean_of,
    rows_across_ranks,
    sequence_batch,
    setup_ranks,
)
from nanoforge.post.reward import RewardModel
from nanoforge.tokenizer import Tokenizer, doc_fraction
from nanoforge.train.checkpoint import load_model_artifact, save_model_artifact
from nanoforge.train.distributed import Dist, all_reduce_sum, run_then_close

RewardFn = Callable[[Sequence[list[Message]], Sequence[str]], Sequence[float]]


# ---------------------------------------------------------------------------------------------------
# the math (tests/test_ppo.py checks each against its formula)


def maskedmean_of(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, d: Dist | None = None) -> Tensor:
    """(x − mean) / std over the masked entries (0 elsewhere); with `d` of several ranks, mean and std are
    those of the entries of every rank."""
    d = d or Dist()
    count = all_reduce_sum(mask.sum(), d).clamp_min(1)
    mean = all_reduce_sum((x * mask).sum(), d) / count
    var = all_reduce_sum((((x - mean) ** 2) * mask).sum(), d) / count
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
               kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, L) and the per-token KL estimate log π − log π_ref (B, L): r_t = −kl_coef·kl_t,
    plus the sequence's score on its last response token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp_min(0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards * mask, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), each (B, L), by generalised advantage estimation over the response tokens."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
               returns: Tensor, mask: Tensor, clip_range: float, clip_range_value: float) -> dict[str, Tensor]:
    """The clipped policy loss, the clipped value loss (with its ½) and diagnostics, means over `mask`."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    with torch.no_grad():
        clipfrac = maskedmean_of(((ratio - 1).abs() > clip_range).float(), mask)
        approx_kl = maskedmean_of(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return {"pg_loss": maskedmean_of(pg, mask), "vf_loss": 0.5 * maskedmean_of(vf, mask), "clipfrac": clipfrac,
            "approx_kl": approx_kl}


# ---------------------------------------------------------------------------------------------------
# the models


class PolicyWithValue(nn.Module):
    """The policy GPT and a scalar value head on its final hidden states."""

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """idx (B, T) -> logits (B, T, V) float32, values (B, T)."""
        h = hidden_states(self.policy, idx)
        return self.policy.lm_head(h).float(), self.value_head(h).squeeze(-1).float()


@dataclass
class Rollout:
    """A batch of sampled responses, laid out per response token: (B, L) tensors, `mask` 1 on real tokens."""

    prompts: list[list[int]]
    responses: list[list[int]]
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor

    def select(self, rows: Tensor) -> Rollout:
        r = rows.tolist()
        return Rollout([self.prompts[i] for i in r], [self.responses[i] for i in r], self.mask[rows],
                       self.logprobs[rows], self.ref_logprobs[rows], self.values[rows], self.scores[rows])


def per_token(logits: Tensor, values: Tensor | None, prompts: list[list[int]], responses: list[list[int]],
              idx_targets: Tensor, temperature: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probabilities of the response tokens (and their values), as (B, L) tensors, with the mask."""
    B, T, V = logits.shape
    logp = -F.cross_entropy((logits / temperature).view(B * T, V), idx_targets.view(B * T), reduction="none",
                            ignore_index=-100).view(B, T)
    L = max(len(r) for r in responses)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)  # position predicting token 0
    index = (starts[:, None] + torch.arange(L, device=logits.device)[None]).clamp_max(T - 1)
    mask = (torch.arange(L, device=logits.device)[None] < torch.tensor([len(r) for r in responses],
                                                                         device=logits.device)[:, None]).float()
    return logp.gather(1, index) * mask, None if values is None else values.gather(1, index) * mask, mask


@dataclass
class PPOConfig(PostTrainConfig):
    """`nanoforge ppo`: one step = one rollout of `batch_size` prompts and its PPO updates."""

    max_steps: int = 50
    lr: float = 3e-5
    batch_size: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    # subtracted from the score of a response cut at max_new_tokens, which never ended its turn (TRL's
    # `missing_eos_penalty`): a reward model has only seen finished turns, so it may score the cut ones high
    missing_eos_penalty: float | None = None
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 2
    minibatches: int = 2
    val_fraction: float = 0.1  # prompts held out to measure the reward before and after
    max_val_prompts: int = 32
    max_prompts: int | None = None


class PPOTrainer:
    """Rollouts and updates for one run (see the module docstring for the algorithm)."""

    def __init__(self, cfg: PPOConfig, model: PolicyWithValue, ref: GPT, tok: Tokenizer, score: Callable[..., Tensor],
                 device: torch.device, d: Dist | None = None) -> None:
        self.cfg, self.model, self.ref, self.tok, self.score, self.device = cfg, model, ref, tok, score, device
        self.d = d or Dist()
        self.end = tok.special_id("assistant_end")

    def sample(self, records: Sequence[PromptRecord], seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids and response ids (with `<|assistant_end|>` when the policy ended its turn)."""
        policy, limit = self.model.policy, self.model.policy.cfg.seq_len
        prompts = [self.tok.render_prompt(r.messages) for r in records]
        outs = generate(policy, prompts, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                        stop_tokens=(self.end,), seed=seed)
        responses = []
        for p, o in zip(prompts, outs, strict=True):
            budget = min(self.cfg.max_new_tokens, limit - len(p))
            responses.append(o + [self.end] if len(o) < budget and len(p) + len(o) < limit else o)
        return prompts, [r if r else [self.end] for r in responses]

    @torch.no_grad()
    def rollout(self, records: Sequence[PromptRecord], seed: int) -> Rollout:
        prompts, responses = self.sample(records, seed)
        batch = sequence_batch(list(zip(prompts, responses, strict=True)), self.tok.pad_id).to(self.device)
        self.model.eval()
        logits, values = self.model(batch.idx)
        logprobs, values, mask = per_token(logits, values, prompts, responses, batch.targets, self.cfg.temperature)
        ref_logits = self.ref(batch.idx)
        ref_logprobs, _, _ = per_token(ref_logits, None, prompts, responses, batch.targets, self.cfg.temperature)
        self.model.train()
        scores = self.score([r.messages for r in records], prompts, responses).to(self.device)
        if self.cfg.missing_eos_penalty is not None:
            cut = torch.tensor([r[-1] != self.end for r in responses], device=self.device)
            scores = scores - self.cfg.missing_eos_penalty * cut
        return Rollout(prompts, responses, mask, logprobs, ref_logprobs, values, scores)

    def update(self, ro: Rollout, run: TrainRun) -> dict[str, float]:
        """The PPO epochs over one rollout; returns the mean of each loss and diagnostic."""
        cfg = self.cfg
        rewards, kl = kl_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, cfg.kl_coef)
        advantages, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, ro.mask, d=self.d)
        sums: dict[str, float] = {}
        n = 0
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + run.step)
        for _ in range(cfg.ppo_epochs):
            for rows in torch.randperm(len(ro.prompts), generator=gen).chunk(cfg.minibatches):
                mb = ro.select(rows)
                rows_d = rows.to(self.device)
                seqs = list(zip(mb.prompts, mb.responses, strict=True))
                batch = sequence_batch(seqs, self.tok.pad_id).to(self.device)
                logits, values = self.model(batch.idx)
                logprobs, values, _ = per_token(logits, values, mb.prompts, mb.responses, batch.targets,
                                                cfg.temperature)
                L = logprobs.shape[1]  # this minibatch's longest response
                losses = ppo_losses(logprobs, mb.logprobs[:, :L], advantages[rows_d][:, :L], values,
                                    mb.values[:, :L], returns[rows_d][:, :L], mb.mask[:, :L], cfg.clip_range,
                                    cfg.clip_range_value)
                run.update(losses["pg_loss"] + cfg.vf_coef * losses["vf_loss"])
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n += 1
        out = {k: v / n for k, v in sums.items()}
        out["loss"] = out["pg_loss"] + cfg.vf_coef * out["vf_loss"]
        out.update({"score": float(ro.scores.mean()), "kl": float(kl.sum(1).mean()),
                    "reward": float((ro.scores - cfg.kl_coef * kl.sum(1)).mean()),
                    "response_length": float(ro.mask.sum(1).mean())})
        return out

    @torch.no_grad()
    def evaluate(self, records: Sequence[PromptRecord]) -> float | None:
        """Mean score of the policy's responses to the held-out prompts (fixed seed); under torchrun each rank
        samples and scores its share of the prompts (every rank calls it)."""
        if not records:
            return None

        def scores(part: Sequence[PromptRecord]) -> Tensor:
            prompts, responses = self.sample(part, seed=self.cfg.seed + 10_000_019)
            return self.score([r.messages for r in part], prompts, responses).to(self.device)[:, None]

        return float(rows_across_ranks(scores, records, len(records), 1, self.d, self.device).mean())


def reward_scorer(reward: Path | RewardFn, tok: Tokenizer, device: torch.device) -> Callable[..., Tensor]:
    """score(messages, prompt ids, response ids) -> (B,) rewards: the reward model's, normalised, or a function's
    of the response texts."""
    if callable(reward):
        end = tok.special_id("assistant_end")

        def by_function(messages: Sequence[list[Message]], prompts: list[list[int]],
                        responses: list[list[int]]) -> Tensor:
            texts = [tok.decode(r[:-1] if r and r[-1] == end else r) for r in responses]
            return torch.tensor([float(x) for x in reward(messages, texts)])

        return by_function
    rm = RewardModel.load(reward, device)
    rm.requires_grad_(False)

    def by_model(messages: Sequence[list[Message]], prompts: list[list[int]], responses: list[list[int]]) -> Tensor:
        pairs = list(zip(prompts, responses, strict=True))
        return torch.tensor(rm.rewards_of_ids(pairs, tok.pad_id, normalize=True))

    return by_model


def train_ppo(cfg: PPOConfig, model_dir: Path | str, reward: Path | str | RewardFn, prompts: Path | str,
              out: Path | str, *, resume: bool = False, inputs: dict[str, Path] | None = None) -> dict[str, Any] | None:
    """PPO-train the model in `model_dir` against `reward` (a reward-model directory, or a function of
    (prompt messages, response texts)) on the prompts of `prompts`; write the policy to `out`. `inputs`: what
    the manifest records as inputs (default: the model, the prompt file and the reward model). Under torchrun
    every rank calls it; rank 0 writes and returns the manifest, the others return None."""
    cfg.check("ppo")
    if cfg.minibatches < 1 or cfg.ppo_epochs < 1 or cfg.minibatches > cfg.batch_size:
        raise NanoforgeError("ppo: need ppo_epochs >= 1 and 1 <= minibatches <= batch_size")
    if cfg.temperature <= 0 or cfg.max_new_tokens < 1:
        raise NanoforgeError("ppo: need temperature > 0 and max_new_tokens >= 1")
    d, device = setup_ranks(cfg)
    return run_then_close(d, lambda: _ppo(cfg, Path(model_dir), reward, Path(prompts), Path(out), resume, inputs,
                                          d, device))


def _ppo(cfg: PPOConfig, model_dir: Path, reward: Path | str | RewardFn, prompts: Path, out: Path, resume: bool,
         inputs: dict[str, Path] | None, d: Dist, device: torch.device) -> dict[str, Any] | None:
    if cfg.minibatches > cfg.batch_size // d.world_size:
        raise NanoforgeError(f"ppo: {cfg.minibatches} minibatches need at least as many prompts per rank; "
                             f"batch_size {cfg.batch_size} over {d.world_size} ranks gives "
                             f"{cfg.batch_size // d.world_size}")
    tok = Tokenizer.load(model_dir)
    records = read_prompts(prompts)[: cfg.max_prompts]
    train = [r for r in records if doc_fraction(repr(r.messages), cfg.seed) >= cfg.val_fraction]
    val = [r for r in records if doc_fraction(repr(r.messages), cfg.seed) < cfg.val_fraction][: cfg.max_val_prompts]
    if not train:
        raise NanoforgeError(f"{prompts}: no training prompt left after holding out val_fraction={cfg.val_fraction}")
    score = reward_scorer(reward if callable(reward) else Path(reward), tok, device)
    model = PolicyWithValue(load_model_artifact(model_dir, device)).to(device)
    ref = load_model_artifact(model_dir, device)
    ref.requires_grad_(False)
    decay, no_decay = model.policy.param_groups_for_weight_decay()
    opt = adamw([*decay, model.value_head.weight], [*no_decay, model.value_head.bias], lr=cfg.lr,
                weight_decay=cfg.weight_decay, device=device)
    trainer = PPOTrainer(cfg, model, ref, tok, score, device, d)
    run = TrainRun("ppo", cfg, out, model, opt, resume=resume, dist=d)
    if run.step == 0:  # the ranks share the held-out prompts (the same weights, a fixed seed per share)
        run.state["val_score_before"] = trainer.evaluate(val)
    model.train()
    last_val = None
    tokens, busy = 0, 0.0
    if d.main:
        info(f"ppo: {len(train)} training prompts, {len(val)} held out")
    for step in run.steps():
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        chosen = [train[i] for i in torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()]
        ro = trainer.rollout(run.shard(chosen), seed=cfg.seed * 1_000_003 + step + 7_919 * d.rank)
        record: dict[str, Any] = trainer.update(ro, run)
        dt = time.perf_counter() - t0
        n_tokens = int(ro.mask.sum())
        tokens, busy = tokens + n_tokens, busy + dt
        record["tok_per_s"] = n_tokens / dt
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_val = trainer.evaluate(val)
            record["val_score"] = last_val
        run.log(record, show=("score", "kl", "val_score"))
    rows = run.finish("PPO")
    tokens = int(all_reduce_sum(torch.tensor([tokens]), d))  # every rank's share of the rollouts
    if not d.main:
        return None
    save_model_artifact(model.policy, out, tokenizer_dir=model_dir, extra={"stage": "ppo", "step": run.step})
    first, tail = rows[: max(1, len(rows) // 5)], rows[-max(1, len(rows) // 5) :]
    figures = {"train_prompts": len(train), "val_prompts": len(val), "steps": run.step,
               "score_first": mean_of(r.get("score") for r in first),
               "score_last": mean_of(r.get("score") for r in tail),
               "kl_last": mean_of(r.get("kl") for r in tail), "val_score_before": run.state.get("val_score_before"),
               "val_score": last_val, "tok_per_s": tokens / busy if busy else None, "world_size": d.world_size,
               "seconds": round(run.seconds, 1)}
    if inputs is None:
        inputs = {"model": model_dir, "prompts": prompts}
        if not callable(reward):
            inputs["reward_model"] = Path(reward)
    manifest = write_manifest(out, stage="ppo", config=cfg, inputs=inputs, figures=figures)
    info(f"ppo done in {figures['seconds']:.0f}s: score {figures['score_first']:.3g} → {figures['score_last']:.3g}"
         f" (held-out {figures['val_score_before']} → {figures['val_score']})")
    return manifest
