"""Supervised fine-tuning (SFT): chat JSONL in, a chat model (or a LoRA adapter) out, on one process or many.

    nanoforge sft --model runs/demo/08-pretrain --data runs/demo/09-instruct/train.jsonl \\
        --val runs/demo/09-instruct/val.jsonl --out runs/demo/10-sft
    nanoforge sft --model base/ --data a.jsonl,b.jsonl --out adapter/ --lora-rank 8   # LoRA: adapter only
    nanoforge merge --model base/ --adapter adapter/ --out chat/                       # → a plain model
    torchrun --nproc-per-node 2 -m nanoforge sft --model … --data … --out …

Each conversation (`{"messages": [{"role", "content"}…]}`) is rendered by the tokenizer's chat template
(`Tokenizer.render_chat`); the loss counts only the tokens the model must write: assistant contents and
their `<|assistant_end|>`, never system or user tokens. Short conversations are packed into rows of
`seq_len` tokens with a document mask (`GPT.forward(..., segments=)`): no token attends across
conversations and positions restart at each one, so a packed conversation computes exactly what it would
alone (`packing = false` pads one conversation per row instead). The loss of a step is the sum over its
loss tokens divided by their number in the whole global batch, so packing, micro-batching and the number
of ranks change nothing but speed.

One optimizer step takes `batch_rows` packed rows (default: `batch_size` per rank), `accum` micro-batches
of `batch_size` rows on each rank; epoch e packs the training conversations in an order shuffled with
seed + e. Held-out conversations (`--val`, or a `val_fraction` of `--data` by hash) give a val loss every
`eval_every` steps; checkpoints, `--resume`, `metrics.jsonl`, `loss.png`, the progress bar, SIGTERM and
`max_time` work as in pretraining. With `answer_eval > 0` the greedy replies to held-out questions are
scored (token F1, exact match; `post/instruct.py`) before and after training: the manifest holds both.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanoforge.artifacts import input_hash, write_manifest
from nanoforge.config import parse_duration
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT
from nanoforge.post.instruct import Chat, evaluate_answers, iter_chat_jsonl
from nanoforge.post.lora import LoRAConfig, apply_lora, quantize_base, save_adapter
from nanoforge.tokenizer import Tokenizer, doc_fraction
from nanoforge.train.checkpoint import (
    checkpoint_state,
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
    full_model_state,
    grad_sync,
    init_distributed,
    parallelize,
    replica,
    run_then_close,
    whole,
)
from nanoforge.train.faults import StopRequest, TrainingStopped
from nanoforge.train.loop import autocast, choose_dtype, to_device
from nanoforge.train.metrics import MetricsLog, plot_losses
from nanoforge.train.optim import build_adamw
from nanoforge.train.schedule import lr_at


@dataclass
class SFTConfig:
    """Optimisation and data of `nanoforge sft`; `lora_rank > 0` trains a LoRA adapter instead of every weight."""

    epochs: float = 2.0  # passes over the training conversations (when max_steps is not given)
    max_steps: int | None = None
    lr: float | None = None  # None: 0.3× (full) or 1× (LoRA) the pretraining lr of this width, 6e-4·768/width
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 5% of the steps
    batch_size: int = 8  # packed rows per micro-batch (per rank)
    batch_rows: int | None = None  # packed rows per optimizer step, all ranks; None: batch_size × ranks
    seq_len: int | None = None  # row length; None: the model's context
    packing: bool = True  # several conversations per row (document mask) instead of one padded per row
    val_fraction: float = 0.05  # held out from --data when no --val file is given
    eval_every: int | None = None  # None: a fifth of the run
    eval_rows: int = 64  # packed val rows per val-loss evaluation (0: all)
    ckpt_every: int | None = None  # None: a fifth of the run
    answer_eval: int = 200  # held-out conversations whose greedy replies are scored before and after (0: off)
    answer_tokens: int = 64  # reply length cap for that scoring
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | fp32 | bf16, as in pretraining
    device: str = "auto"
    parallel: str = "ddp"  # ddp | fsdp under torchrun
    threads: int | None = None
    max_time: str | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_dropout: float = 0.0
    lora_quantize: str | None = None  # int8: the frozen base in 8 bits, QLoRA-style (needs torchao)
    seed: int = 0

    @property
    def lora(self) -> LoRAConfig | None:
        if self.lora_rank <= 0:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=list(self.lora_targets),
                          dropout=self.lora_dropout, quantize=self.lora_quantize)


# ---------------------------------------------------------------------------------------------------
# data: rendered conversations, packed rows, batches


@dataclass
class Example:
    """One rendered conversation: input ids and next-token targets (-100 where nothing is learnt)."""

    inputs: list[int]
    targets: list[int]


def encode_chat(tok: Tokenizer, messages: list[dict[str, Any]], seq_len: int) -> tuple[Example | None, bool]:
    """(example, truncated): the conversation as inputs/targets of at most `seq_len` tokens, or None when
    no assistant token is left to learn. Only assistant contents and `<|assistant_end|>` are targets."""
    ids, mask = tok.render_chat(messages)
    truncated = len(ids) - 1 > seq_len
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    if all(t == -100 for t in targets):
        return None, truncated
    return Example(ids[:-1], targets), truncated


def load_chats(files: list[Path]) -> list[tuple[str, Chat]]:
    """(where, conversation) from chat JSONL files; `where` is `file:line` for error messages."""
    out = []
    for path in files:
        if not Path(path).is_file():
            raise NanoforgeError(f"{path}: no such chat JSONL file")
        out += [(f"{path}:{i}", chat) for i, chat in iter_chat_jsonl(path)]
    if not out:
        raise NanoforgeError(f"{', '.join(map(str, files))}: no conversations")
    return out


def encode_all(tok: Tokenizer, chats: list[tuple[str, Chat]], seq_len: int) -> tuple[list[Example], Counter[str]]:
    """Examples of the conversations that leave something to learn, and counts of what was cut or dropped."""
    examples, counts = [], Counter()
    for where, chat in chats:
        try:
            ex, truncated = encode_chat(tok, chat["messages"], seq_len)
        except NanoforgeError as e:
            raise NanoforgeError(f"{where}: {e}") from None
        counts["truncated"] += truncated
        if ex is None:
            counts["dropped_no_assistant_tokens"] += 1
        else:
            examples.append(ex)
    return examples, counts


def pack_rows(lengths: list[int], order: list[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Example indices per row, in `order`: each row takes the next examples while they fit in `seq_len`
    tokens (one example per row without packing)."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        if row and (not packing or used + lengths[i] > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def make_batch(examples: list[Example], rows: list[list[int]], pad_id: int, packing: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, segments) (B, T) for these rows, T the longest row; padding is its own segment
    with ignored targets. Without packing, segments are None (one conversation per row, padding after it:
    plain causal attention is already right)."""
    width = max(sum(len(examples[i].inputs) for i in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            n = len(examples[i].inputs)
            x[b, pos : pos + n] = torch.tensor(examples[i].inputs)
            y[b, pos : pos + n] = torch.tensor(examples[i].targets)
            seg[b, pos : pos + n] = k
            pos += n
        seg[b, pos:] = len(row)
    return x, y, seg if packing else None


class RowStream:
    """The training rows of every epoch, one after the other: epoch e packs the examples in the order of
    a shuffle seeded by seed + e. Its state (epoch, offset) goes into checkpoints."""

    def __init__(self, lengths: list[int], seq_len: int, packing: bool, seed: int) -> None:
        self.lengths, self.seq_len, self.packing, self.seed = lengths, seq_len, packing, seed
        self.epoch, self.offset = 0, 0
        self.rows = self._pack(0)

    def _pack(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + epoch).shuffle(order)
        return pack_rows(self.lengths, order, self.seq_len, self.packing)

    def take(self, n: int) -> list[list[int]]:
        out: list[list[int]] = []
        while len(out) < n:
            if self.offset == len(self.rows):
                self.epoch, self.offset = self.epoch + 1, 0
                self.rows = self._pack(self.epoch)
            part = self.rows[self.offset : self.offset + n - len(out)]
            out += part
            self.offset += len(part)
        return out

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.offset / len(self.rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.rows = self._pack(self.epoch)


def step_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of the learnt tokens of one batch (divided by the step's count by the caller)."""
    return model(x, y, reduction="sum", segments=seg)


@torch.no_grad()
def val_loss(model: GPT, examples: list[Example], cfg: SFTConfig, seq_len: int, pad_id: int, device: torch.device,
             dtype: str, d: Dist) -> float | None:
    """Mean loss per learnt token over the first `eval_rows` packed val rows, shared out over the ranks.

    Every rank runs the same number of forwards (FSDP gathers each layer's weights in every one, all ranks
    together): a rank whose share ends early runs a batch of the first row and leaves its loss out."""
    if not examples:
        return None
    rows = pack_rows([len(e.inputs) for e in examples], list(range(len(examples))), seq_len, cfg.packing)
    rows = rows[: cfg.eval_rows or None]
    mine = rows[d.rank :: d.world_size]
    batches = -(-len(rows) // (cfg.batch_size * d.world_size))  # those of the rank with the most rows
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(batches):
        part = mine[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x, y, seg = make_batch(examples, part or rows[:1], pad_id, cfg.packing)
        with autocast(device, dtype):
            loss = step_loss(model, x.to(device), y.to(device), None if seg is None else seg.to(device))
        if part:
            sums += torch.stack([loss.double(), (y != -100).sum().double().to(device)])
    all_reduce_sum(sums, d)
    model.train(was_training)
    return float(sums[0] / sums[1]) if sums[1] > 0 else None


# ---------------------------------------------------------------------------------------------------
# the stage


def sft(cfg: SFTConfig, model_dir: Path, data: list[Path], out: Path, *, val: list[Path] | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Fine-tune the model artifact in `model_dir` on chat JSONL `data`; write the fine-tuned model (or,
    with `lora_rank > 0`, the adapter) and the manifest into `out`. Under torchrun every rank calls it."""
    d, device = init_distributed(cfg.device)
    return run_then_close(d, lambda: _sft(cfg, Path(model_dir), [Path(p) for p in data],
                                          [Path(p) for p in val or []], Path(out), resume, d, device))


def _check(cfg: SFTConfig, d: Dist) -> tuple[int, int]:
    """(global rows per step, micro-batches per rank) after checking the settings."""
    for name in ("batch_size", "answer_tokens"):
        if getattr(cfg, name) < 1:
            raise NanoforgeError(f"sft: {name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1 or cfg.max_steps is None and not cfg.epochs > 0:
        raise NanoforgeError(f"sft: need max_steps >= 1 or epochs > 0 (got {cfg.max_steps}, {cfg.epochs})")
    if not 0 <= cfg.val_fraction < 1:
        raise NanoforgeError(f"sft: val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.dtype not in ("auto", "fp32", "bf16") or cfg.parallel not in ("ddp", "fsdp"):
        raise NanoforgeError(f"sft: dtype must be auto|fp32|bf16 and parallel ddp|fsdp (got {cfg.dtype}, "
                             f"{cfg.parallel})")
    rows = cfg.batch_rows or cfg.batch_size * d.world_size
    if rows % (cfg.batch_size * d.world_size):
        raise NanoforgeError(f"sft: batch_rows={rows} is not a multiple of batch_size×ranks = "
                             f"{cfg.batch_size}×{d.world_size}")
    return rows, rows // (cfg.batch_size * d.world_size)


def _split(cfg: SFTConfig, chats: list[tuple[str, Chat]], val_chats: list[tuple[str, Chat]]
           ) -> tuple[list[tuple[str, Chat]], list[tuple[str, Chat]]]:
    """(train, val): the --val files, or a hash-chosen `val_fraction` of the data."""
    if val_chats or cfg.val_fraction == 0:
        return chats, val_chats
    held = [doc_fraction(json.dumps(c["messages"], sort_keys=True), cfg.seed) < cfg.val_fraction for _, c in chats]
    return [c for c, h in zip(chats, held, strict=True) if not h], [c for c, h in zip(chats, held, strict=True) if h]


def _sft(cfg: SFTConfig, model_dir: Path, data: list[Path], val_files: list[Path], out: Path, resume: bool,
         d: Dist, device: torch.device) -> dict[str, Any]:
    rows_per_step, accum = _check(cfg, d)
    ckpt_root = out / "checkpoints"
    ckpt = resume_point(out, resume, "sft")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.load(model_dir)
    model = load_model_artifact(model_dir, device).train()
    mcfg = model.cfg
    seq_len = min(cfg.seq_len or mcfg.seq_len, mcfg.seq_len)
    train_chats, val_chats = _split(cfg, load_chats(data), load_chats(val_files) if val_files else [])
    train, counts = encode_all(tok, train_chats, seq_len)
    val, val_counts = encode_all(tok, val_chats, seq_len)
    if not train:
        raise NanoforgeError(f"{', '.join(map(str, data))}: no conversation has an assistant token within "
                             f"{seq_len} tokens")
    data_hash = [input_hash(p) for p in data + val_files]
    stream = RowStream([len(e.inputs) for e in train], seq_len, cfg.packing, cfg.seed)
    rows_per_epoch = len(stream.rows)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * rows_per_epoch / rows_per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, max_steps // 20)
    eval_every = cfg.eval_every or max(1, max_steps // 5)
    ckpt_every = cfg.ckpt_every or max(1, max_steps // 5)

    lora = cfg.lora
    if lora is not None and lora.quantize and d.active and cfg.parallel == "fsdp":
        raise NanoforgeError("sft: an int8 base (--lora-quantize) is not sharded by FSDP; use --parallel ddp, "
                             "or FSDP with the base in full precision")
    adapted = apply_lora(model, lora) if lora is not None else []  # B = 0: still exactly the base model
    lr = cfg.lr if cfg.lr is not None else round((1.0 if lora else 0.3) * 6e-4 * 768 / mcfg.n_embd, 6)
    saved = checkpoint_state(ckpt) if ckpt is not None else None
    if saved is not None:
        if saved.get("data_hash") != data_hash:
            raise NanoforgeError(f"{ckpt}: the checkpoint was trained on other data; start a new --out")
        dtype = saved["dtype"]
    elif lora is not None and lora.quantize and cfg.dtype == "auto":
        dtype = "fp32"  # int8 weights are dequantized into the activations' dtype: nothing to measure
    else:  # measured on rank 0 (on a CPU), as in pretraining: the shape of a micro-batch is what counts
        shape = SimpleNamespace(dtype=cfg.dtype, batch_size=cfg.batch_size, seq_len=seq_len)
        dtype = broadcast_object(choose_dtype(model, shape, device) if d.main else None, d)
    base_answers = saved.get("base_answers") if saved is not None else None
    answer_chats = [c for _, c in val_chats][: cfg.answer_eval]
    if d.main and base_answers is None and answer_chats:  # before any sharding: rank 0 generates alone
        info(f"sft: scoring the base model's replies to {len(answer_chats)} held-out questions")
        base_answers = evaluate_answers(model, tok, answer_chats, max_new_tokens=cfg.answer_tokens)
    if lora is not None and lora.quantize:
        quantize_base(model)
    train_model = parallelize(model, d, device, parallel=cfg.parallel, bf16=dtype == "bf16", compile=False)
    # what checkpoints hold: every weight, or for LoRA the adapters alone (the frozen base is --model); made
    # after parallelize, which gives a sharded model new (DTensor) parameters
    trained = model if lora is None else _AdapterParams(model)
    opt = build_adamw(model, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                      device_type=device.type)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    step, tokens_seen, elapsed_before, skipped_steps = 0, 0, 0.0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, trained, opt, d)
        stream.load_state_dict(state["stream"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state.get("elapsed", 0.0)
        skipped_steps = state.get("skipped_steps", 0)
    metrics = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)
        what = f"LoRA r={lora.rank} on {len(adapted)} layers" if lora else "full"
        info(f"sft ({what}): {n_trainable / 1e6:.3g}M of {n_params / 1e6:.3g}M parameters trained, "
             f"{len(train)} conversations in {rows_per_epoch} rows of {seq_len} tokens, {len(val)} held out; "
             f"{max_steps} steps × {rows_per_step} rows (accum {accum}), lr {lr:g}, {dtype} on {device}")

    def resume_state() -> dict[str, Any]:
        return {"tokens_seen": tokens_seen, "stream": stream.state_dict(), "model": mcfg.to_dict(), "dtype": dtype,
                "elapsed": elapsed_before + time.time() - t_start, "data_hash": data_hash,
                "skipped_steps": skipped_steps, "base_answers": base_answers, "train_config": cfg}

    pad_id = tok.pad_id
    per_rank = rows_per_step // d.world_size
    t_start = time.time()
    last_val: float | None = None
    stop = StopRequest(parse_duration(cfg.max_time) if cfg.max_time is not None else None)
    bar = tqdm(total=max_steps, initial=step, desc="sft", unit="step", dynamic_ncols=True, disable=not d.main)
    with stop:
        while step < max_steps:
            t0 = time.perf_counter()
            lr_now = lr_at(step, peak=lr, warmup=warmup, total=max_steps, min_ratio=cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr_now
            mine = stream.take(rows_per_step)[d.rank * per_rank : (d.rank + 1) * per_rank]
            batches = [make_batch(train, mine[i : i + cfg.batch_size], pad_id, cfg.packing)
                       for i in range(0, per_rank, cfg.batch_size)]
            # the step's learnt tokens on all ranks: each summed loss is divided by it (×ranks: DDP averages)
            counts_now = all_reduce_sum(torch.tensor([float(sum(int((y != -100).sum()) for _, y, _ in batches)),
                                                      float(sum(int((x != pad_id).sum()) for x, _, _ in batches))],
                                                     device=device), d)
            n_learnt, n_tokens = counts_now.tolist()
            loss_sum = torch.zeros((), device=device)
            for micro, (x, y, seg) in enumerate(batches):
                x, y = to_device(x, device), to_device(y, device)
                seg = None if seg is None else to_device(seg, device)
                with grad_sync(train_model, micro == len(batches) - 1), autocast(device, dtype):
                    loss = step_loss(train_model, x, y, seg)
                (loss * d.world_size / max(1.0, n_learnt)).backward()
                loss_sum += loss.detach().float()
            stats = all_reduce_sum(torch.cat([loss_sum.reshape(1), torch.tensor(stop.flags(), device=device)]), d)
            loss_val = float(stats[0]) / max(1.0, n_learnt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                             cfg.grad_clip))
            if math.isfinite(loss_val) and math.isfinite(grad_norm):
                opt.step()
            else:
                skipped_steps += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_tokens)
            dt = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step, "lr": lr_now, "loss": loss_val, "grad_norm": grad_norm,
                                      "tokens": tokens_seen, "learnt_tokens": int(n_learnt), "tok_per_s": n_tokens / dt,
                                      "epoch": stream.epochs_done, "dt": dt, "skipped_steps": skipped_steps}
            last = step == max_steps
            if step % eval_every == 0 or last:
                last_val = val_loss(model, val, cfg, seq_len, pad_id, device, dtype, d)
                if last_val is not None:
                    record["val_loss"] = last_val
            if metrics is not None:
                metrics.log(record)
            reason = "SIGTERM" if stats[1] > 0 else "max_time" if stats[2] > 0 else None
            if step % ckpt_every == 0 or last or reason:
                path = save_checkpoint(ckpt_root, step, trained, opt, resume_state(), d)
                if reason and not last:
                    bar.close()
                    if metrics is not None:
                        metrics.close()
                    raise TrainingStopped(reason, step, str(path))
            bar.set_postfix(loss=f"{loss_val:.3f}", **({"val": f"{last_val:.3f}"} if last_val is not None else {}),
                            tok_s=f"{n_tokens / dt:,.0f}")
            bar.update(1)
    bar.close()

    # gathered from the shards under FSDP: every rank takes part
    weights = full_model_state(model, d) if lora is None else _adapter_weights(model)
    plain = replica(model, d, prepare=None if lora is None else lambda m: apply_lora(m, lora))
    manifest = None
    if d.main:
        assert metrics is not None and weights is not None and plain is not None
        metrics.close()
        answers = evaluate_answers(plain, tok, answer_chats, max_new_tokens=cfg.answer_tokens) if answer_chats else None
        figures = {"params": n_params, "trainable_params": n_trainable, "lora_layers": len(adapted),
                   "optimizer_state_bytes": optimizer_state_bytes(opt), "steps": step, "lr": lr,
                   "epochs": round(stream.epochs_done, 3), "train_conversations": len(train),
                   "val_conversations": len(val), "rows_per_epoch": rows_per_epoch, "seq_len": seq_len,
                   **{f"train_{k}": v for k, v in counts.items()}, **{f"val_{k}": v for k, v in val_counts.items()},
                   "tokens": tokens_seen, "dtype": dtype, "device": str(device), "world_size": d.world_size,
                   "skipped_steps": skipped_steps, "val_loss": last_val, "base_answers": base_answers,
                   "answers": answers, "seconds": round(elapsed_before + time.time() - t_start, 1)}
        manifest = _finish(cfg, model, weights, adapted, model_dir, data + val_files, out, figures)
    return broadcast_object(manifest, d)


class _AdapterParams(torch.nn.Module):
    """The trained parameters of a LoRA model (the same Parameter objects) under one module, so that a
    checkpoint holds the adapters and their optimizer state but not the frozen (possibly int8) base."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.adapters = torch.nn.ParameterDict({n.replace(".", "__"): p for n, p in model.named_parameters()
                                                if p.requires_grad})


def _adapter_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The trained (adapter) parameters, whole, on the CPU; gathered from the shards under FSDP (every rank
    must call it then)."""
    return {n: whole(p).detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (AdamW's two moments per trained number, plus step counters)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _finish(cfg: SFTConfig, model: GPT, weights: dict[str, torch.Tensor], adapted: list[str], model_dir: Path,
            data: list[Path], out: Path, figures: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the model artifact (or the adapter), the loss plot and the manifest."""
    rows = MetricsLog.read(out / "metrics.jsonl")
    plot_losses(out / "metrics.jsonl", out / "loss.png", title="sft" + (" (LoRA)" if adapted else ""))
    lora = cfg.lora
    if lora is not None:
        save_adapter(out, lora, adapted, weights, model_dir)
    else:
        save_model_artifact(model, out, tokenizer_dir=model_dir, state=weights,
                            extra={"sft_from": str(model_dir), "step": figures["steps"]})
    losses = [r["loss"] for r in rows if "loss" in r and math.isfinite(r["loss"])]
    figures["final_loss"] = losses[-1] if losses else None
    tail = [r["tok_per_s"] for r in rows[-50:] if "tok_per_s" in r]
    figures["tok_per_s"] = float(np.median(tail)) if tail else None
    inputs = {f"data{i}" if i else "data": p for i, p in enumerate(data)}
    manifest = write_manifest(out, stage="sft", config=cfg, inputs={"model": model_dir, **inputs}, figures=figures)
    base, now = figures.get("base_answers"), figures.get("answers")
    scores = f"; held-out F1 {base['f1']:.3f} → {now['f1']:.3f}, exact match {base['exact_match']:.3f} → " \
             f"{now['exact_match']:.3f}" if base and now else ""
    val = f", val loss {figures['val_loss']:.4g}" if figures.get("val_loss") is not None else ""
    info(f"sft done in {figures['seconds']:.0f}s: {figures['steps']} steps, final loss "
         f"{figures['final_loss'] or float('nan'):.4g}{val}{scores}")
    return manifest

