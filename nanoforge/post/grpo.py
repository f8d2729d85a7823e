"""GRPO: reinforcement learning from rule-based rewards on verifiable tasks (DeepSeek-R1's recipe).

    nanoforge grpo --model runs/demo/09-sft --task arithmetic --out runs/demo/10-grpo
    nanoforge grpo --model sft/ --task countdown --group-size 16 --loss-type dapo --epsilon-high 0.28 --out grpo/
    torchrun --nproc-per-node 8 -m nanoforge grpo --model sft/ --task arithmetic --out grpo/ --beta 0.04

One step: `batch_size` prompts from the task's training stream (`post/tasks.py`; shared out over the
ranks), `group_size` (G) completions each from the KV-cache engine (`infer/engine.py`), rendered with the
chat template and ended by `<|assistant_end|>`; each completion is scored by the task's rules into
components (`correct`, `format`) that `reward_weights` sum into a reward r. Advantages are relative to the
group, A = (r − mean_group(r)) / (std + 1e-4), with the std of the group, of the batch, or none
(`scale_rewards`). Then `iterations` (μ) optimizer updates on that batch minimise, per completion token,

    −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·KL,   ρ = π(t) / π_old(t),   KL = e^(ref − logπ) − (ref − logπ) − 1

where π_old is the policy that generated the batch (ρ = 1 at the first update, whose forward pass gives
π_old's log-probs) and the KL (the k3 estimator) to the frozen starting model only exists when β > 0:
with β = 0 no reference model is loaded at all.
`loss_type` says how token terms are averaged: `grpo` per sequence then over sequences, `dr_grpo` summed
and divided by the constant (sequences × max_new_tokens) (and no std scaling by default), `dapo` over all
tokens of the batch. A group whose G rewards are equal has A = 0 and contributes no gradient; the share of
such groups is logged as `zero_std_frac`. Held-out accuracy (greedy) is measured before and after.

Checkpoints resume like pretraining (`train/checkpoint.py`): a step's problems and sampling seed are
functions of (seed, step), so a resumed run repeats exactly. Under torchrun each rank generates for its
share of prompts (whole groups) and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from nanoforge.artifacts import write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import Decoder, generate
from nanoforge.model import GPT
from nanoforge.post.rewards import RewardWeights
from nanoforge.post.tasks import Problem, Task, get_task
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import (
    load_checkpoint,
    load_model_artifact,
    resume_point,
    save_checkpoint,
    save_model_artifact,
)
from nanoforge.train.distributed import (
    Dist,
    all_reduce_sum,
    broadcast_object,
    grad_sync,
    init_distributed,
    parallelize,
    run_then_close,
)
from nanoforge.train.hardware import gpu_has_bf16
from nanoforge.train.metrics import MetricsLog, plot_series
from nanoforge.train.optim import build_adamw

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """The task, its rewards, sampling, and the GRPO objective of `nanoforge grpo`."""

    task: str = "arithmetic"
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"digits": 3} (see tasks.py)
    reward_weights: dict[str, float] = field(default_factory=lambda: {"correct": 1.0, "format": 0.2})
    group_size: int = 8  # G completions per prompt
    batch_size: int = 8  # prompts per step, over all ranks
    micro_batch: int = 64  # sequences per forward/backward (gradients accumulate over micro-batches)
    max_steps: int = 50  # GRPO steps: each generates one batch and takes `iterations` optimizer updates on it
    iterations: int = 1  # μ
    lr: float = 1e-4  # constant after a linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0  # KL weight; 0 = no reference model
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon; DAPO's clip-higher uses e.g. 0.28
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo
    scale_rewards: str | None = None  # group | batch | none; None = none for dr_grpo, else group
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eval_problems: int = 100  # held-out problems scored (greedy) before, every eval_every steps and after
    eval_every: int = 0  # 0 = only before and after
    ckpt_every: int = 10
    dtype: str = "auto"  # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16
    device: str = "auto"
    threads: int | None = None
    seed: int = 0


def resolve_grpo(cfg: GRPOConfig) -> GRPOConfig:
    """Fill the derived settings (epsilon_high, scale_rewards) and refuse impossible ones in one line."""
    out = replace(cfg, epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
                  scale_rewards=cfg.scale_rewards or ("none" if cfg.loss_type == "dr_grpo" else "group"))
    checks = [
        (out.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {out.loss_type!r}"),
        (out.scale_rewards in SCALES, f"scale_rewards must be one of {', '.join(SCALES)}, got {out.scale_rewards!r}"),
        (out.group_size >= 2, f"group_size must be at least 2 (advantages compare completions), got {out.group_size}"),
        (min(out.batch_size, out.micro_batch, out.max_steps, out.iterations, out.max_new_tokens) >= 1,
         "batch_size, micro_batch, max_steps, iterations and max_new_tokens must be positive"),
        (out.beta >= 0 and out.epsilon >= 0 and out.epsilon_high >= 0, "beta, epsilon and epsilon_high must be >= 0"),
        (out.temperature > 0, f"temperature must be > 0 (completions are sampled), got {out.temperature}"),
        (out.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {out.dtype!r}"),
        (out.eval_problems >= 0 and out.eval_every >= 0 and out.ckpt_every >= 1,
         "eval_problems and eval_every must be >= 0, ckpt_every >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise NanoforgeError(f"grpo: {message}")
    return out


# ---------------------------------------------------------------------------------------------------
# the objective, on tensors


def group_advantages(rewards: Tensor, scale: str, batch_std: Tensor | float | None = None) -> Tensor:
    """rewards (P, G) → advantages (P, G): each reward minus its group's mean, divided by (std + 1e-4) with
    the std (unbiased) of its group (`group`), of all rewards (`batch`; `batch_std` when the batch spans
    ranks) or not at all (`none`). A group whose rewards are all equal gets exactly 0: its float mean can be
    off by an ulp (1.2 is not a binary fraction), which the division would blow up into a gradient."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    centered = centered.masked_fill((rewards == rewards[:, :1]).all(dim=1, keepdim=True), 0.0)
    if scale == "none":
        return centered
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True)
    elif scale == "batch":
        std = rewards.std() if batch_std is None else torch.as_tensor(batch_std, dtype=rewards.dtype)
    else:
        raise NanoforgeError(f"grpo: scale_rewards must be one of {', '.join(SCALES)}, got {scale!r}")
    return centered / (std + 1e-4)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str,
                epsilon: float, epsilon_high: float, beta: float = 0.0, ref_logp: Tensor | None = None,
                max_completion_len: int | None = None, num_sequences: float | None = None,
                num_tokens: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO loss of completion tokens and its statistics.

    logp, old_logp, ref_logp, mask: (N, T), one row per completion, mask 1 on its tokens; advantages (N,).
    `num_sequences`/`num_tokens` are the batch's counts when this is one micro-batch of it (default: this
    one's), so the losses of the micro-batches add up to the batch's. Returns the loss and sums over the
    masked tokens: `clipped` (tokens whose ratio the clip holds), `kl`, `tokens`.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon_high) * adv)
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise NanoforgeError("grpo: beta > 0 needs the reference model's log-probs")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    n_seq = logp.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum() / n_seq
    elif loss_type == "dr_grpo":
        if max_completion_len is None:
            raise NanoforgeError("grpo: loss_type dr_grpo needs max_completion_len")
        loss = (per_token * mask).sum() / (n_seq * max_completion_len)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (mask.sum().clamp_min(1) if num_tokens is None else num_tokens)
    else:
        raise NanoforgeError(f"grpo: loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        stats = {"clipped": (clipped * mask).sum(), "kl": (kl * mask).sum(), "tokens": mask.sum()}
    return loss, stats


def token_logprobs(model: nn.Module, idx: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(target) of every position (B, T) under the sampling temperature (0 where the target is -100)."""
    logits = model(idx)  # (B, T, V) float32
    if temperature != 1.0:
        logits = logits / temperature
    B, T = targets.shape
    return -F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), reduction="none").view(B, T)


# ---------------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Rollout:
    """G completions for each of P prompts, packed for training (rows are prompt-major)."""

    idx: Tensor  # (N, T) prompt + completion tokens, right-padded; N = P·G
    targets: Tensor  # (N, T) the next token at completion positions, -100 elsewhere
    rewards: Tensor  # (P, G)
    components: dict[str, Tensor]  # name → (N,) reward components
    lengths: Tensor  # (N,) completion tokens (the end-of-turn token included when it was produced)
    texts: list[str]

    @property
    def tokens(self) -> int:
        """Positions a forward pass reads: prompt + completion − 1 per row (padding excluded)."""
        return int((self.targets != -100).cumsum(1).argmax(1).add(1).sum())


def render_prompt(tok: Tokenizer, problem: Problem) -> list[int]:
    """The chat prompt of a problem: its user message, then `<|assistant_start|>`."""
    return tok.render_prompt([{"role": "user", "content": problem.prompt}])


def rollout(model: GPT, tok: Tokenizer, task: Task, problems: list[Problem], weights: RewardWeights,
            cfg: GRPOConfig, seed: int) -> Rollout:
    """Sample `group_size` completions per problem with the KV-cache engine and score them."""
    G, end = cfg.group_size, tok.special_id("assistant_end")
    prompts = [ids for p in problems for ids in [render_prompt(tok, p)] * G]
    outs = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p, stop_tokens=(end,), seed=seed)
    texts = [tok.decode(o) for o in outs]
    scores = [task.score(text, problems[i // G]) for i, text in enumerate(texts)]
    names = sorted({k for s in scores for k in s})
    components = {k: torch.tensor([s.get(k, 0.0) for s in scores]) for k in names}
    rewards = torch.tensor([weights.total(s) for s in scores]).view(len(problems), G)
    rows, completions = [], []
    for p, o in zip(prompts, outs, strict=True):
        # a completion shorter than its budget ended on <|assistant_end|>: the model learns to emit it
        stopped = len(o) < min(cfg.max_new_tokens, model.cfg.seq_len - len(p))
        completion = [*o, end] if stopped else o
        rows.append(p + completion)
        completions.append(len(completion))
    width = max(len(r) for r in rows) - 1
    idx = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, completions, strict=True)):
        idx[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n:])
    return Rollout(idx, targets, rewards, components, torch.tensor(completions), texts)


@torch.no_grad()
def heldout_scores(model: GPT, tok: Tokenizer, task: Task, problems: list[Problem], max_new_tokens: int,
                   d: Dist | None = None, chunk: int = 128) -> tuple[dict[str, float], list[str]]:
    """Mean reward components of greedy replies to `problems` (`correct` is the accuracy), shared out over
    the ranks, and this rank's replies."""
    d = d or Dist()
    mine = problems[d.rank::d.world_size]
    end = tok.special_id("assistant_end")
    replies: list[str] = []
    decoder = Decoder(model)  # fixed weights over the chunks: the decode step is prepared once
    for i in range(0, len(mine), chunk):
        outs = generate(model, [render_prompt(tok, p) for p in mine[i:i + chunk]], max_new_tokens=max_new_tokens,
                        temperature=0.0, stop_tokens=(end,), decoder=decoder)
        replies += [tok.decode(o) for o in outs]
    scores = [task.score(r, p) for r, p in zip(replies, mine, strict=True)]
    names = ("correct", "format")
    sums = torch.tensor([[s.get(k, 0.0) for k in names] for s in scores] or [[0.0] * len(names)],
                        dtype=torch.float64).sum(0)
    sums = all_reduce_sum(torch.cat([sums, torch.tensor([float(len(scores))], dtype=torch.float64)]), d)
    return {k: float(v) / max(1.0, float(sums[-1])) for k, v in zip(names, sums[:-1], strict=True)}, replies


# ---------------------------------------------------------------------------------------------------
# the stage


def grpo(cfg: GRPOConfig, model_dir: Path, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train the chat model in `model_dir` with GRPO on `cfg.task`; write the model artifact, metrics.jsonl
    and the manifest into `out`. Under torchrun every rank calls this with the same arguments."""
    cfg = resolve_grpo(cfg)
    d, device = init_distributed(cfg.device)
    return run_then_close(d, lambda: _grpo(cfg, Path(model_dir), Path(out), resume, d, device))


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grpo(cfg: GRPOConfig, model_dir: Path, out: Path, resume: bool, d: Dist, device: torch.device) -> dict[str, Any]:
    task = get_task(cfg.task, **cfg.task_options)
    weights = RewardWeights(dict(cfg.reward_weights))
    if cfg.batch_size % d.world_size:
        raise NanoforgeError(f"grpo: batch_size {cfg.batch_size} prompts do not split over {d.world_size} ranks")
    ckpt_root = out / "checkpoints"
    ckpt = resume_point(out, resume, "grpo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    tok = Tokenizer.load(model_dir)
    model = load_model_artifact(model_dir, device)
    # the frozen reference exists only for the KL term
    reference = load_model_artifact(model_dir, device).requires_grad_(False) if cfg.beta > 0 else None
    heldout = task.heldout(cfg.eval_problems) if cfg.eval_problems else []
    longest = max((len(render_prompt(tok, p)) for p in [*heldout, *task.problems(cfg.seed, 64)]), default=0)
    if longest >= model.cfg.seq_len:
        raise NanoforgeError(f"grpo: task {cfg.task!r} prompts reach {longest} tokens but the model's context is "
                             f"{model.cfg.seq_len}")
    dtype = cfg.dtype if cfg.dtype != "auto" else \
        "bf16" if device.type == "cuda" and gpu_has_bf16() else "fp32"
    model.train()
    train_model = parallelize(model, d, device, parallel="ddp", bf16=dtype == "bf16", compile=False)
    opt = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), device_type=device.type)

    step, elapsed_before, before = 0, 0.0, None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, d)
        step, elapsed_before, before = state["step"], state.get("elapsed", 0.0), state.get("heldout_before")
    metrics = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)
        info(f"grpo: {model.num_params() / 1e6:.2f}M parameters, task {cfg.task}, {cfg.max_steps} steps × "
             f"{cfg.batch_size} prompts × {cfg.group_size} completions, loss {cfg.loss_type}, β={cfg.beta}"
             f"{' (no reference model)' if reference is None else ''}, {dtype} on {device}"
             f"{f' × {d.world_size} ranks' if d.active else ''}")
    if before is None and heldout:
        before = heldout_scores(model, tok, task, heldout, cfg.max_new_tokens, d)[0]
        if d.main:
            info(f"held-out before: accuracy {before['correct']:.3f}, format {before['format']:.3f}")

    t_start = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", unit="step", dynamic_ncols=True, disable=not d.main)
    while step < cfg.max_steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        record = _step(cfg, step, model, train_model, reference, opt, tok, task, weights, d, device, dtype)
        step += 1
        record["step"], record["lr"] = step, opt.param_groups[0]["lr"]
        if heldout and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            scores = heldout_scores(model, tok, task, heldout, cfg.max_new_tokens, d)[0]
            record.update(heldout_accuracy=scores["correct"], heldout_format=scores["format"])
        if metrics is not None:
            metrics.log(record)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(ckpt_root, step, model, opt, {"model": model.cfg.to_dict(), "train_config": cfg,
                                                          "heldout_before": before,
                                                          "elapsed": elapsed_before + time.time() - t_start}, d)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record.get('accuracy', 0.0):.2f}",
                        len=f"{record['completion_len']:.0f}")
        bar.update(1)
    bar.close()

    after, replies = heldout_scores(model, tok, task, heldout, cfg.max_new_tokens, d) if heldout else ({}, [])
    manifest = None
    if d.main:
        assert metrics is not None
        metrics.close()
        figures = _figures(cfg, out, model, before or {}, after, heldout, replies, reference is not None,
                           elapsed_before + time.time() - t_start, d)
        save_model_artifact(model, out, tokenizer_dir=model_dir, extra={"stage": "grpo", "step": step})
        manifest = write_manifest(out, stage="grpo", config=cfg, inputs={"model": model_dir}, figures=figures)
        scores = f"held-out accuracy {before['correct']:.3f} → {after['correct']:.3f}, " if before and after else ""
        info(f"grpo done in {figures['seconds']:.0f}s: {scores}rollout {figures['rollout_tok_per_s']:.0f} tok/s, "
             f"train {figures['train_tok_per_s']:.0f} tok/s, {figures['generation_share']:.0%} of step time generating")
    return broadcast_object(manifest, d)


def _step(cfg: GRPOConfig, step: int, model: GPT, train_model: nn.Module, reference: GPT | None,
          opt: torch.optim.Optimizer, tok: Tokenizer, task: Task, weights: RewardWeights, d: Dist,
          device: torch.device, dtype: str) -> dict[str, Any]:
    """One GRPO step: generate and score this rank's groups, then `iterations` updates; the step's metrics."""
    t0 = time.perf_counter()
    problems = task.problems(cfg.seed * 1_000_003 + step, cfg.batch_size)[d.rank::d.world_size]
    ro = rollout(model, tok, task, problems, weights, cfg, seed=(cfg.seed * 1_000_003 + step) * 4099 + d.rank)
    t_rollout = time.perf_counter() - t0

    N = ro.idx.shape[0]
    mask = ro.targets != -100
    # batch-wide counts over all ranks: the normalisers of the loss and the std of `batch` scaling
    sums = all_reduce_sum(torch.tensor([float(N), float(mask.sum()), float(ro.rewards.sum()),
                                        float((ro.rewards**2).sum())], dtype=torch.float64), d).tolist()
    n_all, tokens_all, r_sum, r_sq = sums
    batch_std = np.sqrt(max(0.0, (r_sq - r_sum**2 / n_all) / max(1.0, n_all - 1)))
    adv = group_advantages(ro.rewards, cfg.scale_rewards, batch_std).reshape(N).to(device)
    idx, targets, mask = ro.idx.to(device), ro.targets.to(device), mask.to(device)
    chunks = [slice(i, min(N, i + cfg.micro_batch)) for i in range(0, N, cfg.micro_batch)]

    def logp_of(net: nn.Module, s: slice) -> Tensor:
        with _autocast(device, dtype):
            return token_logprobs(net, idx[s], targets[s], cfg.temperature).float()

    with torch.no_grad():
        ref = [logp_of(reference, s) for s in chunks] if reference is not None else None
    # π_old is the policy that generated the batch: its log-probs are those of the first iteration's forward
    # (no update happens before every chunk has had it), so ρ = 1 there and no extra forward pass is needed
    old: list[Tensor] = []
    # DDP averages gradients over ranks, so each rank's loss is normalised by the global counts / world size
    scale = {"num_sequences": n_all / d.world_size, "num_tokens": tokens_all / d.world_size,
             "max_completion_len": cfg.max_new_tokens}
    totals = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.iterations):
        for j, s in enumerate(chunks):
            with grad_sync(train_model, j == len(chunks) - 1):
                logp = logp_of(train_model, s)
                if len(old) <= j:
                    old.append(logp.detach())
                loss, stats = policy_loss(logp, old[j], adv[s], mask[s], loss_type=cfg.loss_type,
                                          epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                          ref_logp=None if ref is None else ref[j], **scale)
                loss.backward()
            totals["loss"] += float(loss.detach()) / cfg.iterations
            for k, v in stats.items():
                totals[k] += float(v)
        totals["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) / cfg.iterations
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_train = time.perf_counter() - t0 - t_rollout

    # one all-reduce for the step's figures over all ranks
    names = sorted(ro.components)
    zero_std = (ro.rewards.std(dim=1) == 0).sum()
    local = [totals["loss"] / d.world_size, totals["grad_norm"] / d.world_size, totals["clipped"], totals["kl"],
             totals["tokens"], float(ro.lengths.sum()), float(zero_std), float(ro.rewards.shape[0]),
             float(ro.tokens * cfg.iterations), t_rollout, t_train, *[float(ro.components[k].sum()) for k in names]]
    g = all_reduce_sum(torch.tensor(local, dtype=torch.float64), d).tolist()
    loss, grad_norm, clipped, kl, tokens, gen_tokens, zero, groups, train_tokens, t_r, t_t = g[:11]
    t_r, t_t = t_r / d.world_size, t_t / d.world_size  # mean seconds per rank
    record = {"loss": loss, "grad_norm": grad_norm, "reward_mean": r_sum / n_all, "reward_std": batch_std,
              **{("accuracy" if k == "correct" else k): v / n_all for k, v in zip(names, g[11:], strict=True)},
              "completion_len": gen_tokens / n_all, "clip_frac": clipped / max(1.0, tokens),
              "zero_std_frac": zero / groups, "rollout_s": t_r, "train_s": t_t,
              "rollout_tok_per_s": gen_tokens / max(t_r, 1e-9), "train_tok_per_s": train_tokens / max(t_t, 1e-9),
              "generation_share": t_r / max(t_r + t_t, 1e-9)}
    if reference is not None:
        record["kl"] = kl / max(1.0, tokens)
    return record


def _figures(cfg: GRPOConfig, out: Path, model: GPT, before: dict[str, float], after: dict[str, float],
             heldout: list[Problem], replies: list[str], has_reference: bool, seconds: float,
             d: Dist) -> dict[str, Any]:
    """The manifest's headline numbers, from metrics.jsonl and the held-out scores; draws rewards.png."""
    rows = MetricsLog.read(out / "metrics.jsonl")
    tail = rows[-max(1, len(rows) // 5):]

    def median(key: str) -> float | None:
        values = [r[key] for r in rows[1:] or rows if key in r]  # step 1 includes warm-up costs
        return round(float(np.median(values)), 3) if values else None

    plot_series(rows, out / "rewards.png", [(k, style, k) for k, style in (
        ("reward_mean", "-"), ("accuracy", "-"), ("heldout_accuracy", "o-"))], f"grpo on {cfg.task}")
    mine = heldout[d.rank::d.world_size]  # the problems `replies` answer
    samples = [{"prompt": p.prompt, "answer": p.answer, "reply": r} for p, r in zip(mine[:5], replies, strict=False)]
    return {"params": model.num_params(), "steps": rows[-1]["step"] if rows else 0, "world_size": d.world_size,
            "heldout_problems": len(heldout), "heldout_accuracy_before": before.get("correct"),
            "heldout_accuracy_after": after.get("correct"), "heldout_format_before": before.get("format"),
            "heldout_format_after": after.get("format"),
            "final_reward_mean": float(np.mean([r["reward_mean"] for r in tail])) if rows else None,
            "final_accuracy": float(np.mean([r.get("accuracy", 0.0) for r in tail])) if rows else None,
            "rollout_tok_per_s": median("rollout_tok_per_s"), "train_tok_per_s": median("train_tok_per_s"),
            "generation_share": median("generation_share"), "reference_model": has_reference,
            "seconds": round(seconds, 1), "samples": samples}


