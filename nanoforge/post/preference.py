"""What the reward, DPO and PPO stages share: preference pairs as token ids, the trunk's hidden states,
response log-probabilities, and the bookkeeping of a post-training run (`TrainRun`).

    rows = read_preferences("prefs.jsonl")              # TRL format, one JSON object per line
    pairs, dropped = encode_pairs(tok, rows, seq_len)   # chat template, `<|assistant_end|>` appended
    batch = sequence_batch([(p.prompt, p.chosen) for p in pairs], tok.pad_id)

Preferences are TRL's format (`nanoforge label export` writes it), either *standard*
`{"prompt": "text", "chosen": "text", "rejected": "text"}` or *conversational*
`{"prompt": [{"role": "user", "content": …}], "chosen": [{"role": "assistant", "content": …}], …}`; an
optional `"margin"` (a number ≥ 0) says how clear the preference is. A text prompt is one user message:
every sequence is the chat template's prompt (`Tokenizer.render_prompt`) followed by the response and
`<|assistant_end|>`, exactly what the chat model generates, so log-probabilities and rewards are those of
the turn the model would write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT, _rope_cos_sin
from nanoforge.tokenizer import Tokenizer, doc_fraction
from nanoforge.train.checkpoint import load_checkpoint, resume_point, save_checkpoint
from nanoforge.train.distributed import Dist, all_reduce_max, all_reduce_sum, gather_strided, init_distributed
from nanoforge.train.metrics import MetricsLog, plot_losses
from nanoforge.train.schedule import lr_at

Message = dict[str, str]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# preference data


@dataclass
class Pair:
    """One preference as ids: `prompt` ends with `<|assistant_start|>`, each response with `<|assistant_end|>`."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


def as_messages(prompt: Any, where: str) -> list[Message]:
    """A prompt as chat messages: a text is one user message; a list must be {role, content} messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise NanoforgeError(f"{where}: message {i} needs a role (system/user/assistant) and a text content")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise NanoforgeError(f"{where}: a prompt must be a text or a non-empty list of messages")


def response_text(response: Any, where: str) -> str:
    """A response as text: a text, or (conversational format) a list ending with an assistant message."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        last = response[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    raise NanoforgeError(f"{where}: a response must be a text or a list ending with an assistant message")


def read_preferences(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a TRL preference JSONL file, checked: prompt, chosen, rejected (and an optional margin)."""
    path = Path(path)
    if not path.is_file():
        raise NanoforgeError(f"{path}: no such preference file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoforgeError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= set(row):
            raise NanoforgeError(f"{where}: expected an object with prompt, chosen and rejected")
        margin = row.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin >= 0:
            raise NanoforgeError(f"{where}: margin must be a number >= 0, got {margin!r}")
        rows.append({"prompt": as_messages(row["prompt"], where), "chosen": response_text(row["chosen"], where),
                     "rejected": response_text(row["rejected"], where), "margin": float(margin)})
    if not rows:
        raise NanoforgeError(f"{path}: no preference pairs")
    return rows


def encode_pairs(tok: Tokenizer, rows: Sequence[dict[str, Any]], seq_len: int) -> tuple[list[Pair], int]:
    """Rows (as `read_preferences` gives them) as token ids; pairs whose longer sequence does not fit in
    `seq_len` tokens are dropped (their count is returned: truncating would cut the very tokens compared)."""
    end = tok.special_id("assistant_end")
    pairs, dropped = [], 0
    for row in rows:
        prompt = tok.render_prompt(row["prompt"])
        chosen, rejected = [*tok.encode(row["chosen"]), end], [*tok.encode(row["rejected"]), end]
        if len(prompt) + max(len(chosen), len(rejected)) > seq_len:
            dropped += 1
            continue
        pairs.append(Pair(prompt, chosen, rejected, row["margin"]))
    return pairs, dropped


def split_pairs(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) split by a hash of the prompt, so no prompt is on both sides."""
    train, val = [], []
    for p in pairs:
        (val if doc_fraction(",".join(map(str, p.prompt)), seed) < val_fraction else train).append(p)
    if not train:
        raise NanoforgeError(f"all {len(pairs)} pairs fell into the held-out split; lower val_fraction")
    return train, val


@dataclass
class SequenceBatch:
    """Prompt + response sequences, right-padded: `idx` (N, T) inputs, `targets` (N, T) the next token where
    it is a response token (-100 elsewhere), `last` (N,) the index of each sequence's last token."""

    idx: Tensor
    targets: Tensor
    last: Tensor

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(self.idx.to(device), self.targets.to(device), self.last.to(device))


def sequence_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """(prompt, response) id lists → one right-padded batch (padding is never attended: attention is causal)."""
    T = max(len(p) + len(r) for p, r in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    last = torch.empty(len(seqs), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        idx[i, :n] = torch.tensor(p + r)
        targets[i, len(p) - 1 : n - 1] = torch.tensor(r)  # position t predicts token t+1
        last[i] = n - 1
    return SequenceBatch(idx, targets, last)


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> SequenceBatch:
    """The chosen sequences of `pairs` (rows 0..B-1), then their rejected ones (rows B..2B-1)."""
    return sequence_batch([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], pad_id)


# ---------------------------------------------------------------------------------------------------
# model helpers


def hidden_states(model: GPT, idx: Tensor) -> Tensor:
    """The trunk's output (B, T, d): `GPT.forward` up to the final norm, without the lm_head
    (tests/test_reward.py checks that `model.lm_head(hidden_states(m, x))` is `m(x)`)."""
    T = idx.shape[1]
    if T > model.cfg.seq_len:
        raise NanoforgeError(f"model: sequence of {T} tokens exceeds seq_len={model.cfg.seq_len}")
    x = model.wte(idx)  # (B, T, d)
    rope = None
    if model.wpe is not None:
        x = x + model.wpe.weight[:T]
    else:
        rope = _rope_cos_sin(torch.arange(T, device=idx.device), model.cfg)
    for layer, block in enumerate(model.h):
        x = block(x, rope, None, None, layer)
    return model.norm_f(x)


def response_logprobs(model: GPT, batch: SequenceBatch) -> Tensor:
    """Σ log π(response | prompt) of each sequence (B,).

    The lm_head runs on the positions that predict a response token only, not on the prompt or padding:
    the (N, V) logits are most of the memory and time of a step with a small model and a large vocabulary."""
    h = hidden_states(model, batch.idx)  # (B, T, d)
    where = batch.targets != -100  # (B, T)
    logits = model.lm_head(h[where]).float()  # (N, V), N = response tokens in the batch
    logp = -F.cross_entropy(logits, batch.targets[where], reduction="none")  # (N,)
    rows = torch.arange(batch.idx.shape[0], device=h.device)[:, None].expand_as(where)[where]
    return torch.zeros(batch.idx.shape[0], device=h.device, dtype=logp.dtype).index_add(0, rows, logp)


def adamw(decay: list[nn.Parameter], no_decay: list[nn.Parameter], *, lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on the matrices only (the `train/optim.py` policy), for models with extra heads."""
    groups = [{"params": [p for p in decay if p.requires_grad], "weight_decay": weight_decay},
              {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cpu", "cuda"))


# ---------------------------------------------------------------------------------------------------
# the run


@dataclass
class PostTrainConfig:
    """The settings every post-training stage shares (`--max-steps --lr --batch-size --seed`)."""

    max_steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    ckpt_every: int = 50
    device: str = "auto"
    threads: int | None = None

    def check(self, stage: str) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise NanoforgeError(f"{stage}: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise NanoforgeError(f"{stage}: need lr > 0, warmup_steps >= 0, grad_clip > 0")


class TrainRun:
    """The bookkeeping of one post-training run in `out`: the refusal to overwrite a finished run, the
    warmup + cosine learning rate, gradient clipping, checkpoints that resume exactly (weights, AdamW,
    RNG; the data order is a function of the step), `metrics.jsonl`, `loss.png` and the progress bar.

        run = TrainRun("dpo", cfg, out, module, opt, resume=resume, dist=d)
        for step in run.steps():            # starts after the checkpoint's step when resuming
            index = run.shard(epoch_batches(…))   # this rank's part of the step's batch
            loss = …; run.update(loss)      # backward, average over ranks, clip, AdamW step
            run.log({"loss": …})            # averaged over ranks; rank 0 writes it

    Under torchrun (`dist` of several ranks) every rank holds the whole model and takes `batch_size /
    world_size` of each step's pairs; the gradients (of a mean over the rank's pairs) are averaged over the
    ranks before clipping, so every rank takes the update of the whole batch, the one a single process
    takes. Only rank 0 writes files.
    """

    def __init__(self, stage: str, cfg: PostTrainConfig, out: Path, module: nn.Module, opt: torch.optim.Optimizer,
                 *, resume: bool, dist: Dist) -> None:
        self.stage, self.cfg, self.out, self.module, self.opt = stage, cfg, Path(out), module, opt
        self.ckpt_root = self.out / "checkpoints"
        self.dist = dist
        if cfg.batch_size % self.dist.world_size:
            raise NanoforgeError(f"{stage}: batch_size {cfg.batch_size} does not split over {self.dist.world_size} "
                                 f"ranks; use a multiple of {self.dist.world_size}")
        ckpt = resume_point(self.out, resume, stage)
        self.step, self.elapsed_before = 0, 0.0
        self.state: dict[str, Any] = {}  # figures to carry across a resume (saved in every checkpoint)
        if ckpt is not None:
            saved = load_checkpoint(ckpt, module, opt, self.dist)
            self.step, self.elapsed_before = saved["step"], saved.get("elapsed", 0.0)
            self.state.update(saved.get("extra", {}))
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if ckpt is not None else None) \
            if self.dist.main else None
        self.grad_norm = 0.0
        self._t0 = time.time()
        self._bar: tqdm | None = None

    def steps(self) -> Iterator[int]:
        """The remaining step numbers (1-based: the step being taken), with the learning rate set for each."""
        self._bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.stage, unit="step",
                         dynamic_ncols=True, disable=not self.dist.main)
        while self.step < self.cfg.max_steps:
            lr = lr_at(self.step, peak=self.cfg.lr, warmup=self.cfg.warmup_steps, total=self.cfg.max_steps,
                       min_ratio=self.cfg.min_lr_ratio)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.lr = lr
            yield self.step + 1
            self.step += 1
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.max_steps:
                self.checkpoint()
            self._bar.update(1)
        self._bar.close()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of a step's batch: every world_size-th item from its rank on (all of it alone)."""
        return list(items[self.dist.rank :: self.dist.world_size])

    def update(self, loss: Tensor) -> None:
        """Backward, average the gradients over the ranks, clip the gradient norm, take the optimizer step."""
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        average_gradients(params, self.dist)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def log(self, record: dict[str, Any], show: Sequence[str] = ("loss",),
            sums: Sequence[str] = ("tok_per_s",)) -> None:
        """Append the step's figures (plus step, lr, grad norm) to metrics.jsonl; show some on the bar. Under
        torchrun every rank calls it: numbers are averaged over the ranks (each rank's figure is a mean over
        an equal share of the batch), those named in `sums` added (throughput)."""
        if self.dist.active:
            keys = [k for k, v in record.items() if isinstance(v, (int, float))]
            values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
            all_reduce_sum(values, self.dist)
            record = record | {k: v if k in sums else v / self.dist.world_size
                               for k, v in zip(keys, values.tolist(), strict=True)}
        row = {"step": self.step + 1, "lr": self.lr, "grad_norm": self.grad_norm, **record}
        if self.metrics is not None:
            self.metrics.log(row)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{row[k]:.3g}" for k in show if isinstance(row.get(k), (int, float))})

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_root, self.step, self.module, self.opt,
                        {"elapsed": self.seconds, "stage": self.stage, "extra": self.state}, self.dist)

    @property
    def seconds(self) -> float:
        return self.elapsed_before + time.time() - self._t0

    def finish(self, title: str) -> list[dict[str, Any]]:
        """Close the log, draw loss.png; returns the logged rows (on rank 0; [] on the others). Under
        torchrun it first checks that every rank ends with the same weights (they take the same updates)."""
        if self.dist.active and not replicas_agree(self.module, self.dist) and self.dist.main:
            info(f"{self.stage}: warning: the ranks ended with different weights (replicas diverged); rank 0's "
                 f"are written. Please report this with the command that ran.")
        if self.metrics is None:
            return []
        self.metrics.close()
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", title=title)
        return MetricsLog.read(self.out / "metrics.jsonl")


def setup_ranks(cfg: PostTrainConfig) -> tuple[Dist, torch.device]:
    """Threads, seed, this rank's place (one of one outside torchrun) and device for a stage."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return init_distributed(cfg.device)


def replicas_agree(module: nn.Module, d: Dist) -> bool:
    """Whether every rank holds the same weights: each parameter's float64 sum and sum of squares, compared
    across ranks by one max-reduce of the values and their negatives (max = −max(−x) only when all agree)."""
    local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in module.parameters()]).flatten().cpu()
    both = all_reduce_max(torch.cat([local, -local]), d)
    return bool(torch.equal(both[: len(local)], -both[len(local) :]))


def average_gradients(params: Sequence[Tensor], d: Dist) -> None:
    """Replace each gradient by its mean over the ranks: one all-reduce of all of them, flattened (the
    models of these stages are called through helpers that read the trunk's blocks, not through a DDP
    wrapper's forward, so the averaging is done here, after backward)."""
    if not d.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, d).div_(d.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def epoch_batches(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The indices of step `step`'s batch (0-based): epochs of seeded permutations of range(n), so a resumed
    run sees exactly the batches it would have seen."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


def rows_across_ranks(fn: Callable[[Sequence[T]], Tensor], items: Sequence[T], batch_size: int, width: int,
                      d: Dist, device: torch.device) -> Tensor:
    """`fn` over `items` in batches of `batch_size`, each returning (len(batch), width) rows; under torchrun
    each rank computes every world_size-th item (from its rank on) and every rank gets all the rows, in the
    items' order. Evaluation and reference passes cost 1/world_size each instead of the whole set per rank."""
    parts = [fn(part).float() for part in chunks(list(items[d.rank :: d.world_size]), batch_size)]
    local = torch.cat(parts) if parts else torch.empty(0, width, device=device)
    return gather_strided(local, len(items), d)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def mean_of(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
