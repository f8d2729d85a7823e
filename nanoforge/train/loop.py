"""The pretraining stage: token shards in, a base model out.

    nanoforge pretrain --data runs/demo/06-tokens --out runs/demo/07-pretrain --preset cpu-tiny
    nanoforge pretrain --data … --out … --resume          # continue exactly where a killed run stopped

One optimizer step consumes `batch_tokens` tokens: `accum` micro-batches of `batch_size × seq_len`
tokens, their losses averaged, so the optimisation is the same whatever fits in memory. Every
`eval_every` steps the val split gives a loss and bits-per-byte; every `ckpt_every` steps a checkpoint
holds everything a resumed run needs to produce the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanoforge.artifacts import write_manifest
from nanoforge.config import PretrainConfig, model_config, resolve_pretrain
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import generate
from nanoforge.model import GPT
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokens import TokenLoader, read_token_manifest
from nanoforge.train.checkpoint import (
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model_artifact,
)
from nanoforge.train.hardware import peak_flops, pick_device
from nanoforge.train.metrics import MetricsLog, plot_losses
from nanoforge.train.optim import build_adamw
from nanoforge.train.schedule import lr_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def choose_dtype(model: GPT, cfg: PretrainConfig, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it; on a CPU, whichever is faster for *this* model, measured."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    timings = {}
    for dtype in ("fp32", "bf16", "fp32", "bf16"):  # interleaved, first round is warmup
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, x)
        loss.backward()
        timings[dtype] = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"


def unigram_entropy(data: Path, vocab_size: int, dtype: np.dtype, max_tokens: int = 50_000_000) -> float:
    """Entropy (nats/token) of the train split's token frequencies: the loss of a model with no context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    for shard in sorted(Path(data).glob("train-*.bin")):
        arr = np.memmap(shard, dtype=dtype, mode="r")[: max_tokens - seen]
        counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        seen += len(arr)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def evaluate(model: GPT, loader: TokenLoader, token_bytes: torch.Tensor, device: torch.device,
             dtype: str, max_batches: int) -> dict[str, float]:
    """Mean val loss (nats/token) and bits per byte of UTF-8 text over the first `max_batches` batches."""
    was_training = model.training
    model.eval()
    loss_sum, text_loss_sum, n_tokens, n_bytes = 0.0, 0.0, 0, 0
    for x, y in loader.iter_batches(max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            losses = model(x, y, reduction="none").float()  # (B, T)
        nbytes = token_bytes[y]  # (B, T) UTF-8 bytes each target stands for; 0 for special tokens
        loss_sum += float(losses.sum())
        n_tokens += y.numel()
        # bits per byte counts only tokens that stand for text, so it compares across tokenizers
        text_loss_sum += float((losses * (nbytes > 0)).sum())
        n_bytes += int(nbytes.sum())
    model.train(was_training)
    if n_tokens == 0:
        return {}
    return {"val_loss": loss_sum / n_tokens, "val_bpb": text_loss_sum / (math.log(2) * max(1, n_bytes))}


def _sample(model: GPT, tok: Tokenizer, prompts: list[str], max_new: int, seed: int) -> list[str]:
    out = []
    for i, prompt in enumerate(prompts):
        ids = [tok.bos_id, *tok.encode(prompt)]
        new = generate(model, [ids], max_new_tokens=max_new, temperature=0.8, top_k=50,
                       stop_tokens=(tok.bos_id,), seed=seed + i)[0]
        out.append(prompt + tok.decode(new))
    return out


def pretrain(cfg: PretrainConfig, data: Path, out: Path, *, resume: bool = False,
             tokenizer: Path | None = None) -> dict[str, Any]:
    """Train a GPT on the token shards in `data`; write the model artifact and manifest into `out`."""
    cfg = resolve_pretrain(cfg)
    data, out = Path(data), Path(out)
    shards = read_token_manifest(data)  # a clear error if `data` is not the output of `nanoforge tokenize`
    tokenizer_dir = Path(tokenizer or shards.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise NanoforgeError(f"{tokenizer_dir}: tokenizer.json not found (pass --tokenizer DIR)")
    tok = Tokenizer.load(tokenizer_dir)

    ckpt_root = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if resume and ckpt is None:
        raise NanoforgeError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and (ckpt is not None or (out / "manifest.json").exists()):
        raise NanoforgeError(f"{out} already holds a training run; pass --resume to continue it "
                             f"or choose another --out")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, tok.vocab_size)
    model = GPT(mcfg).to(device)
    world, rank = 1, 0
    per_step = cfg.batch_size * cfg.seq_len * world
    if cfg.batch_tokens % per_step:
        raise NanoforgeError(f"pretrain: batch_tokens={cfg.batch_tokens} is not a multiple of "
                             f"batch_size×seq_len×ranks = {per_step}")
    accum = cfg.batch_tokens // per_step
    loader = TokenLoader(data, "train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         rank=rank, world_size=world, seed=cfg.seed)
    try:
        val_loader: TokenLoader | None = TokenLoader(data, "val", batch_size=cfg.batch_size,
                                                     seq_len=cfg.seq_len, seed=cfg.seed)
    except NanoforgeError as e:
        info(f"note: no validation ({e})")
        val_loader = None
    opt = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                      device_type=device.type)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        state = checkpoint_state(ckpt)
        saved_model = state.get("model") or {}
        if saved_model != mcfg.to_dict():
            raise NanoforgeError(f"{ckpt}: checkpoint model config does not match this run's config "
                                 f"({_config_diff(saved_model, mcfg.to_dict())})")
        load_checkpoint(ckpt, state, model, opt)
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before = state.get("elapsed", 0.0)
        dtype = state["dtype"]
    else:
        dtype = choose_dtype(model, cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)

    train_model = torch.compile(model) if cfg.compile else model
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64)
    token_bytes = torch.cat([token_bytes, torch.zeros(mcfg.vocab_size - len(token_bytes), dtype=torch.int64)])
    token_bytes = token_bytes.to(device)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, DTYPES[dtype])
    entropy = unigram_entropy(data, tok.vocab_size, shards.dtype)
    n_params = model.num_params()
    info(f"pretrain: {n_params / 1e6:.2f}M parameters ({mcfg.flavour}, depth {mcfg.n_layer}, "
         f"width {mcfg.n_embd}), {cfg.max_steps} steps × {cfg.batch_tokens} tokens "
         f"(accum {accum}), {dtype} on {device}; unigram entropy {entropy:.3f} nats/token")

    def resume_state() -> dict[str, Any]:
        return {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "model": mcfg.to_dict(),
                "dtype": dtype, "elapsed": elapsed_before + time.time() - t_start,
                "train_config": cfg}

    model.train()
    t_start = time.time()
    last_eval: dict[str, float] = {}
    samples: list[str] = []
    tps_ema: float | None = None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps,
                   schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, dtype):
                loss = train_model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_tokens
        loss_val = float(loss_sum) / accum
        dt = time.perf_counter() - t0
        tps = cfg.batch_tokens / dt
        mfu = flops_per_token * tps / peak
        record: dict[str, Any] = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm),
                                  "tokens": tokens_seen, "tok_per_s": tps, "mfu": mfu, "dt": dt}
        if not math.isfinite(loss_val):
            raise NanoforgeError(f"pretrain: loss became {loss_val} at step {step}; lower --lr")
        last = step == cfg.max_steps
        if val_loader is not None and (step % cfg.eval_every == 0 or last):
            last_eval = evaluate(model, val_loader, token_bytes, device, dtype, cfg.eval_batches)
            record.update(last_eval)
        if cfg.sample_every and (step % cfg.sample_every == 0 or last) and cfg.sample_prompts:
            samples = _sample(model, tok, cfg.sample_prompts, cfg.sample_tokens, cfg.seed)
            record["samples"] = samples
            for s in samples:
                info(f"--- sample @ step {step}\n{s}")
        metrics.log(record)
        if step % cfg.ckpt_every == 0 or last:
            save_checkpoint(ckpt_root, step, model, opt, resume_state())
        tps_ema = tps if tps_ema is None else 0.9 * tps_ema + 0.1 * tps  # steadier display
        bar.set_postfix(loss=f"{loss_val:.3f}", **({"val": f"{last_eval['val_loss']:.3f}"} if last_eval else {}),
                        tok_s=f"{tps_ema:,.0f}", mfu=f"{100 * tps_ema * flops_per_token / peak:.1f}%")
        bar.update(1)
    bar.close()
    metrics.close()

    elapsed = elapsed_before + time.time() - t_start
    rows = MetricsLog.read(out / "metrics.jsonl")
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"pretrain {cfg.preset}")
    save_model_artifact(model, out, tokenizer_dir=tokenizer_dir,
                        extra={"preset": cfg.preset, "step": step})
    tail = [r["tok_per_s"] for r in rows[-50:] if "tok_per_s" in r]
    figures = {
        "params": n_params, "steps": step, "tokens": tokens_seen, "dtype": dtype, "device": str(device),
        "final_loss": rows[-1]["loss"] if rows else None, "unigram_entropy": entropy,
        **{k: v for k, v in last_eval.items()},
        "tok_per_s": float(np.median(tail)) if tail else None,
        "mfu": float(np.median([r["mfu"] for r in rows[-50:] if "mfu" in r])) if rows else None,
        "flops_per_token": flops_per_token, "seconds": round(elapsed, 1), "samples": samples,
    }
    if device.type == "cuda":
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    manifest = write_manifest(out, stage="pretrain", config=cfg,
                              inputs={"tokens": data, "tokenizer": tokenizer_dir}, figures=figures)
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                        if k in ("steps", "final_loss", "val_loss", "val_bpb", "unigram_entropy", "tok_per_s"))
    info(f"pretrain done in {elapsed:.0f}s: {summary}")
    return manifest


def _config_diff(a: dict, b: dict) -> str:
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) or "no differences"
