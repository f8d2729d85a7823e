"""The pretraining stage: token shards in, a base model out, on one process or many.

    nanoforge pretrain --data runs/demo/06-tokens --out runs/demo/07-pretrain --preset cpu-tiny
    nanoforge pretrain --data … --out … --resume          # continue exactly where a killed run stopped
    torchrun --nproc-per-node 8 -m nanoforge pretrain --data … --out … --parallel fsdp --max-time 23h

One optimizer step consumes `batch_tokens` tokens: the same sequences at any world size (see
`TokenLoader`), split into micro-batches of `batch_size × seq_len` tokens per rank, `accum` of them on
each of the ranks; gradients are averaged over all of them, so one config is one optimisation whatever
fits in memory and however many ranks run it. Every `eval_every` steps the val split gives a loss and
bits-per-byte; every `ckpt_every` steps all ranks write a checkpoint that resumes at any world size
(train/checkpoint.py). Bad steps are skipped and a streak of them rolls back; SIGTERM and `max_time`
stop with a checkpoint (train/faults.py). `profile` writes a torch profiler trace of a few steps.
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
from nanoforge.config import CUDAGRAPH_MODES, PretrainConfig, model_config, parse_duration, resolve_pretrain
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import generate
from nanoforge.model import GPT
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokens import TokenLoader, TokenShardInfo, read_token_manifest
from nanoforge.train.checkpoint import (
    checkpoint_state,
    discard_after,
    load_checkpoint,
    load_model_state,
    read_model_config,
    resume_point,
    save_checkpoint,
    save_model_artifact,
)
from nanoforge.train.distributed import (
    Dist,
    all_reduce_sum,
    broadcast_object,
    checkpoint_activations,
    full_model_state,
    grad_sync,
    init_distributed,
    parallelize,
    replica,
    run_then_close,
    whole,
)
from nanoforge.train.faults import LossGuard, StopRequest, TrainingStopped, injected_nan_steps
from nanoforge.train.hardware import gpu_has_bf16, peak_flops, use_tf32
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
        return "bf16" if gpu_has_bf16() else "fp32"
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
def evaluate(model: GPT, loader: TokenLoader, token_bytes: torch.Tensor | None, device: torch.device,
             dtype: str, max_batches: int, d: Dist | None = None) -> dict[str, float]:
    """Mean val loss (nats/token) and bits per byte of UTF-8 text over the split's first `max_batches`
    batches, shared out over the ranks (the same figures at any world size). Without `token_bytes` (a
    tokenizer that is not `bytes_exact`) only the loss."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, text loss, tokens, bytes
    for x, y in loader.iter_batches(max_batches):
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device, dtype):
            losses = model(x, y, reduction="none").float()  # (B, T), 0 where the target is ignored
        counted = y != -100  # (B, T) False on the padding rows of the last batch
        nbytes = (token_bytes[y.clamp_min(0)] if token_bytes is not None else torch.zeros_like(y)) * counted
        # bits per byte counts only tokens that stand for text, so it compares across tokenizers
        sums += torch.stack([losses.sum(), (losses * (nbytes > 0)).sum(), counted.sum(), nbytes.sum()]).double()
    all_reduce_sum(sums, d or Dist())
    model.train(was_training)
    loss_sum, text_loss_sum, n_tokens, n_bytes = sums.tolist()
    if n_tokens == 0:
        return {}
    if token_bytes is None:
        return {"val_loss": loss_sum / n_tokens}
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
    """Train a GPT on the token shards in `data`; write the model artifact and manifest into `out`.

    Under torchrun every rank calls this with the same arguments. Raises `TrainingStopped` (after all
    ranks wrote a checkpoint) when SIGTERM or `max_time` ends the run before `max_steps`.
    """
    cfg = resolve_pretrain(cfg)
    d, device = init_distributed(cfg.device)
    return run_then_close(d, lambda: _pretrain(cfg, Path(data), Path(out), resume, tokenizer, d, device))


def _pretrain(cfg: PretrainConfig, data: Path, out: Path, resume: bool, tokenizer: Path | None, d: Dist,
              device: torch.device) -> dict[str, Any]:
    shards = read_token_manifest(data)  # a clear error if `data` is not the output of `nanoforge tokenize`
    tokenizer_dir = Path(tokenizer or shards.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise NanoforgeError(f"{tokenizer_dir}: tokenizer.json not found (pass --tokenizer DIR)")
    tok = Tokenizer.load(tokenizer_dir)
    check_tokenizer_matches(tok, tokenizer_dir, shards, data)

    ckpt_root = out / "checkpoints"
    ckpt = resume_point(out, resume, "pretrain")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, tok.vocab_size)
    model = GPT(mcfg).to(device)
    if cfg.init is not None and ckpt is None:
        load_init(model, Path(cfg.init), tokenizer_dir)
    per_step = cfg.batch_size * cfg.seq_len * d.world_size
    if cfg.batch_tokens % per_step:
        raise NanoforgeError(f"pretrain: batch_tokens={cfg.batch_tokens} is not a multiple of "
                             f"batch_size×seq_len×ranks = {cfg.batch_size}×{cfg.seq_len}×{d.world_size}")
    accum = cfg.batch_tokens // per_step
    loader = TokenLoader(data, "train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         rank=d.rank, world_size=d.world_size, seed=cfg.seed)
    try:
        val_loader: TokenLoader | None = TokenLoader(data, "val", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                                     rank=d.rank, world_size=d.world_size, seed=cfg.seed)
    except NanoforgeError as e:
        if d.main:
            info(f"note: no validation ({e})")
        val_loader = None

    saved = checkpoint_state(ckpt) if ckpt is not None else None
    if saved is not None:
        if (saved.get("model") or {}) != mcfg.to_dict():
            raise NanoforgeError(f"{ckpt}: checkpoint model config does not match this run's config "
                                 f"({_config_diff(saved.get('model') or {}, mcfg.to_dict())})")
        dtype = saved["dtype"]
    else:  # measured on rank 0 (on a CPU), so that every rank trains in the same precision
        dtype = broadcast_object(choose_dtype(model, cfg, device) if d.main else None, d)
    flops_per_token, n_params = model.flops_per_token(), model.num_params()
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    train_model = parallelize(model, d, device, parallel=cfg.parallel, bf16=dtype == "bf16", compile=compile_on,
                              compile_mode=cfg.compile_mode)
    graphs = compile_on and cfg.compile_mode in CUDAGRAPH_MODES
    opt = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                      device_type=device.type)
    guard = LossGuard(cfg.spike_factor, cfg.max_bad_steps, cfg.rollback_lr_factor)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, d)
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state.get("guard", {}))
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before = state.get("elapsed", 0.0)
    metrics = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)

    token_bytes: torch.Tensor | None = None  # (vocab,) bytes per id; none where bits per byte cannot be told
    if tok.bytes_exact:
        token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64)
        token_bytes = torch.cat([token_bytes, torch.zeros(mcfg.vocab_size - len(token_bytes), dtype=torch.int64)])
        token_bytes = token_bytes.to(device)
    use_tf32(device)
    peak = peak_flops(device, DTYPES[dtype]) * d.world_size
    entropy = unigram_entropy(data, tok.vocab_size, shards.dtype) if d.main else float("nan")
    if d.main:
        ranks = f" × {d.world_size} ranks ({cfg.parallel})" if d.active else ""
        info(f"pretrain: {n_params / 1e6:.2f}M parameters ({mcfg.flavour}, depth {mcfg.n_layer}, "
             f"width {mcfg.n_embd}), {cfg.max_steps} steps × {cfg.batch_tokens} tokens "
             f"(accum {accum}), {dtype}{' compiled' if compile_on else ''} on {device}{ranks}; "
             f"unigram entropy {entropy:.3f} nats/token")

    # domain adaptation: the init model's val figures on this data, before any step (kept across resumes)
    init_eval = saved.get("init_eval", {}) if saved is not None else {}
    if cfg.init is not None and ckpt is None and val_loader is not None:
        init_eval = {f"init_{k}": v for k, v in evaluate(model, val_loader, token_bytes, device, dtype,
                                                         cfg.eval_batches, d).items()}

    def resume_state() -> dict[str, Any]:
        return {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "model": mcfg.to_dict(),
                "dtype": dtype, "elapsed": elapsed_before + time.time() - t_start, "guard": guard.state_dict(),
                "init_eval": init_eval, "train_config": cfg, "last_eval": last_eval, "samples": samples}

    model.train()
    t_start = time.time()
    # the figures of the last evaluation and samples, also when a resume has no step left to run
    last_eval: dict[str, float] = saved.get("last_eval", {}) if saved is not None else {}
    samples: list[str] = saved.get("samples", []) if saved is not None else []
    tps_ema: float | None = None
    nan_steps = injected_nan_steps()
    stop = StopRequest(parse_duration(cfg.max_time) if cfg.max_time is not None else None)
    profiler = _profiler(out / "profile", d.rank, device) if cfg.profile else contextlib.nullcontext()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not d.main)
    with stop, profiler as prof:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = guard.lr_scale * lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps,
                                        schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio,
                                        decay_fraction=cfg.decay_fraction)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = loader.next_batch()
                x, y = to_device(x, device), to_device(y, device)
                with grad_sync(train_model, micro == accum - 1):
                    if graphs:  # each micro-batch is a new run of the recorded graphs (their outputs reused)
                        torch.compiler.cudagraph_mark_step_begin()
                    with autocast(device, dtype):
                        loss = train_model(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            if step + 1 in nan_steps:
                nan_steps.remove(step + 1)
                loss_sum = loss_sum * float("nan")
            # one all-reduce per step: the mean loss over ranks and any rank's reason to stop
            stats = all_reduce_sum(torch.cat([(loss_sum / accum).reshape(1).float(),
                                              torch.tensor(stop.flags(), device=device)]), d).tolist()
            loss_val = stats[0] / d.world_size
            grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))  # FSDP: DTensor
            bad = guard.judge(loss_val, grad_norm)
            if bad is None:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.batch_tokens
            if prof is not None:
                prof.step()
            if guard.must_roll_back:
                step, tokens_seen = _roll_back(ckpt_root, model, opt, guard, d, metrics, loss_val)
                bar.n = step
                bar.refresh()
                continue

            dt = time.perf_counter() - t0
            tps = cfg.batch_tokens / dt
            record: dict[str, Any] = {"step": step, "lr": lr, "grad_norm": _finite(grad_norm), "tokens": tokens_seen,
                                      "tok_per_s": tps, "mfu": flops_per_token * tps / peak, "dt": dt,
                                      "skipped_steps": guard.skipped, "rollbacks": guard.rollbacks}
            if math.isfinite(loss_val):
                record["loss"] = loss_val
            if bad is not None:
                record["skipped"] = bad
                if d.main:
                    info(f"step {step}: {bad} loss {loss_val:.4g}, update skipped "
                         f"({guard.bad_in_row} in a row, {guard.skipped} in all)")
            last = step == cfg.max_steps
            if val_loader is not None and (step % cfg.eval_every == 0 or last):
                last_eval = evaluate(model, val_loader, token_bytes, device, dtype, cfg.eval_batches, d)
                record.update(last_eval)
            if cfg.sample_every and (step % cfg.sample_every == 0 or last) and cfg.sample_prompts:
                plain = replica(model, d)  # gathered from the shards under FSDP; every rank takes part
                if plain is not None:
                    samples = _sample(plain, tok, cfg.sample_prompts, cfg.sample_tokens, cfg.seed)
                    record["samples"] = samples
                    for s in samples:
                        info(f"--- sample @ step {step}\n{s}")
            if metrics is not None:
                metrics.log(record)
            reason = "SIGTERM" if stats[1] > 0 else "max_time" if stats[2] > 0 else None
            # not in the middle of a streak of bad steps: a rollback must find weights from before it
            if (step % cfg.ckpt_every == 0 and not guard.bad_in_row) or last or reason:
                path = save_checkpoint(ckpt_root, step, model, opt, resume_state(), d)
                if reason and not last:
                    bar.close()
                    if metrics is not None:
                        metrics.close()
                    raise TrainingStopped(reason, step, str(path))
            tps_ema = tps if tps_ema is None else 0.9 * tps_ema + 0.1 * tps  # steadier display
            bar.set_postfix(loss=f"{loss_val:.3f}", **({"val": f"{last_eval['val_loss']:.3f}"} if last_eval else {}),
                            tok_s=f"{tps_ema:,.0f}", mfu=f"{100 * tps_ema * flops_per_token / peak:.1f}%")
            bar.update(1)
    bar.close()
    if cfg.profile and d.main:
        info(f"profiler trace: {out / 'profile'} (open in https://ui.perfetto.dev or chrome://tracing)")

    weights = full_model_state(model, d)  # gathered from the shards under FSDP: every rank takes part
    manifest = None
    if d.main:
        assert metrics is not None and weights is not None
        metrics.close()
        figures = {"params": n_params, "steps": step, "tokens": tokens_seen, "dtype": dtype, "device": str(device),
                   "world_size": d.world_size, "parallel": cfg.parallel if d.active else None,
                   "compile": compile_on, "activation_checkpointing": cfg.activation_checkpointing,
                   "unigram_entropy": entropy, "skipped_steps": guard.skipped, "rollbacks": guard.rollbacks,
                   "lr_scale": guard.lr_scale, **init_eval, **last_eval, "flops_per_token": flops_per_token,
                   "seconds": round(elapsed_before + time.time() - t_start, 1), "samples": samples}
        manifest = _finish(cfg, model, weights, out, data, tokenizer_dir, device, figures)
    return broadcast_object(manifest, d)


def check_tokenizer_matches(tok: Tokenizer, tokenizer_dir: Path, shards: TokenShardInfo, data: Path) -> None:
    """Refuse a tokenizer other than the one that encoded the shards: its ids would mean other strings (a
    smaller vocabulary fails mid-run, a larger one trains silently on text it cannot decode)."""
    if tok.vocab_size != shards.vocab_size:
        raise NanoforgeError(f"--tokenizer {tokenizer_dir}: its vocabulary has {tok.vocab_size} tokens, the shards "
                             f"in {data} were encoded with {shards.vocab_size} (by {shards.tokenizer or '?'})")
    recorded = Path(shards.tokenizer) / "tokenizer.json" if shards.tokenizer else None
    if recorded is not None and recorded.exists() and recorded.read_bytes() != (tokenizer_dir / "tokenizer.json"
                                                                                 ).read_bytes():
        raise NanoforgeError(f"--tokenizer {tokenizer_dir}: not the tokenizer that encoded {data} "
                             f"({shards.tokenizer}); leave --tokenizer out to use that one")


def load_init(model: GPT, init: Path, tokenizer_dir: Path) -> None:
    """Start from the weights of the model artifact `init` (`--init`): same shape, same tokenizer."""
    init_cfg = read_model_config(init)
    if init_cfg != model.cfg:
        raise NanoforgeError(f"--init {init}: its model does not match this run "
                             f"({_config_diff(init_cfg.to_dict(), model.cfg.to_dict())})")
    own, theirs = tokenizer_dir / "tokenizer.json", init / "tokenizer.json"
    if theirs.exists() and theirs.read_bytes() != own.read_bytes():
        raise NanoforgeError(f"--init {init}: the model was trained with another tokenizer than {tokenizer_dir}; "
                             f"tokenize the domain corpus with the model's own (--tokenizer {init})")
    load_model_state(model, init / "model.safetensors")


def _roll_back(ckpt_root: Path, model: GPT, opt: torch.optim.Optimizer, guard: LossGuard, d: Dist,
               metrics: MetricsLog | None, loss: float) -> tuple[int, int]:
    """Restore a checkpoint's weights and optimizer after a streak of bad steps; the loader keeps its
    position. Returns the checkpoint's (step, tokens seen).

    The checkpoint is the newest one written outside a streak of bad steps. A step is judged by the loss of
    the weights before its update, so an update that ruins the weights passes, and the next checkpoint
    can hold them: when a rollback is followed by another streak with no good step between them, the next
    one goes one checkpoint further back, and the run stops when none is left."""
    kept = sorted((p for p in ckpt_root.glob("step-*") if (p / "state.json").exists()), reverse=True)
    clean = [p for p in kept if not checkpoint_state(p).get("guard", {}).get("bad_in_row")]
    if guard.rollbacks_in_row >= len(clean):
        where = (f"rolling back to {', '.join(p.name for p in clean)} did not help" if clean
                 else "they came before the first checkpoint")
        raise NanoforgeError(f"pretrain: {guard.bad_in_row} bad steps in a row (last loss {loss:.4g}) and {where}; "
                             f"lower --lr or raise max_bad_steps, and start again")
    ckpt = clean[guard.rollbacks_in_row]
    state = load_checkpoint(ckpt, model, opt, d)
    if d.main and ckpt != kept[0]:  # so that a resume after a kill starts from here, not from those
        discard_after(ckpt_root, ckpt)
    guard.rolled_back(state.get("guard", {}))
    if metrics is not None:
        metrics.rewind(state["step"])
    if d.main:
        info(f"{guard.max_bad_steps} bad steps in a row: rolled back to {ckpt.name}, learning rate × "
             f"{guard.lr_scale:.3g} from now on (rollback {guard.rollbacks})")
    return state["step"], state["tokens_seen"]


def _finish(cfg: PretrainConfig, model: GPT, weights: dict[str, torch.Tensor], out: Path, data: Path,
            tokenizer_dir: Path, device: torch.device, figures: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the model artifact, the loss plot and the manifest with the run's figures."""
    rows = MetricsLog.read(out / "metrics.jsonl")
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"pretrain {cfg.preset}")
    save_model_artifact(model, out, tokenizer_dir=tokenizer_dir, extra={"preset": cfg.preset,
                                                                        "step": figures["steps"]}, state=weights)
    losses = [r["loss"] for r in rows if "loss" in r]
    tail = [r["tok_per_s"] for r in rows[-50:] if "tok_per_s" in r]
    figures["final_loss"] = losses[-1] if losses else None
    figures["tok_per_s"] = float(np.median(tail)) if tail else None
    figures["mfu"] = float(np.median([r["mfu"] for r in rows[-50:] if "mfu" in r])) if rows else None
    if device.type == "cuda":
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    manifest = write_manifest(out, stage="pretrain", config=cfg,
                              inputs={"tokens": data, "tokenizer": tokenizer_dir,
                                      **({"init": Path(cfg.init)} if cfg.init else {})}, figures=figures)
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                        if k in ("steps", "final_loss", "val_loss", "val_bpb", "unigram_entropy", "tok_per_s",
                                 "mfu", "skipped_steps"))
    info(f"pretrain done in {figures['seconds']:.0f}s: {summary}")
    return manifest


def _profiler(trace_dir: Path, rank: int, device: torch.device) -> torch.profiler.profile:
    """Skip one step, warm up one, record three, then write a Chrome/Perfetto trace per rank."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def export(prof: torch.profiler.profile) -> None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"trace-rank{rank}.json"))

    return torch.profiler.profile(activities=activities, on_trace_ready=export,
                                  schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1))


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A loader's host batch on `device`. To a GPU through page-locked memory, queued without waiting: a
    copy from pageable memory may first wait for the work queued on the stream (CUDA stages it through a
    pinned buffer), which would drain the GPU at every micro-batch while the CPU launches the next one."""
    if torch.device(device).type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned block until the copy ends


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _config_diff(a: dict, b: dict) -> str:
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) or "no differences"
