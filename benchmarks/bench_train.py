"""Training-step throughput: nanoforge's GPT (llama flavour) vs `transformers`' LlamaForCausalLM of the same
shape, in the same process, fp32 and bf16 autocast, forward + backward + fused AdamW step.

    python benchmarks/bench_train.py                   # CPU, the cpu-tiny shape, fp32 and bf16
    python benchmarks/bench_train.py --vocab 8192 --d-model 384 --layers 6 --heads 6 --kv-heads 2 --batch 8
    python benchmarks/bench_train.py --quick           # tiny shape, few steps: a smoke test (< 30 s)
    python benchmarks/bench_train.py --compile         # also torch.compile both models
    python benchmarks/bench_train.py --device cuda --dtypes bf16 --compile --batch 32 --seq-len 1024

Both sides get the same treatment: the same shape (parameter counts are checked equal), the same batch
of tokens and next-token targets (the peer gets them as `shift_labels`, so both compute the loss on the
same B·T tokens), the same autocast, the same optimizer (`torch.optim.AdamW(fused=True)`, what the
`transformers` Trainer uses by default on torch >= 2.8), and `attn_implementation="sdpa"` for the peer.
Timed rounds alternate ours/peer to spread the noise of a shared machine evenly; each side's figure is
the median over rounds. GFLOP/s use one formula for both (`GPT.flops_per_token`: 6·N + 12·L·d·T),
against the matmul peak measured in the same run. One JSON line is appended to --out.

Two more modes:

    python benchmarks/bench_train.py --nproc 1,2                  # CPU scaling of DDP over processes
    python benchmarks/bench_train.py --nproc 1,2 --parallel fsdp
    python benchmarks/bench_train.py --gpu                        # the gpt2-124m preset on a GPU

`--nproc` launches `torchrun --nproc-per-node N` of this script for each N, each rank with `--threads`
threads (default 1), and times our training step as `nanoforge pretrain` runs it (the same
`parallelize`, `grad_sync` and fused AdamW, gloo on CPU) at a fixed global batch (`--global-batch`
sequences, split over the ranks and accumulated). It prints tokens/s, the speedup over one process and
its efficiency (speedup / N); the peer is one process with N threads on the same N cores, the other
way to use them.

`--gpu` times the gpt2-124m preset (12 × 768, seq 1024) as `nanoforge pretrain` runs it: micro-batch 32
(the preset's; `--batch`), gradients accumulated over the preset's 524,288-token batch (`--accum`),
clipped, fused AdamW, torch.compile and bf16 autocast. Ours and `transformers`' GPT2LMHeadModel of the
same shape (sdpa attention) run one after the other so each side's peak memory is its own; it prints
tokens/s, MFU against the GPU's datasheet bf16 peak (`nanoforge.train.hardware`; nanoGPT and torchtitan
report 45-55 % on A100/H100 for this size) and peak memory. `--sides ours` times ours alone (e.g. at
`--batch 16`), `--kernels 20` prints where one of our optimizer steps spends its GPU time (and how busy the
GPU was), `--cudagraphs` compiles both sides with CUDA graphs (`--compile-mode` any other mode). Settings
to compare before one becomes a default: `--inductor KEY=VALUE` (torch._inductor.config), `--sdpa` (one
attention backend), `--loss-chunk-elements` (our loss's chunk size). benchmarks/gpu_session.sh runs all of
it in one call.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import transformers
from benchlib import append_record, cpu_name

from nanoforge.config import CUDAGRAPH_MODES
from nanoforge.hf import transformers_model
from nanoforge.model import GPT, ModelConfig
from nanoforge.train.loop import to_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    # defaults: the cpu-tiny preset's model and micro-batch, the model `make demo` trains
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=None, help="default: 8/3·d rounded up to 64")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch (default 32; 8 per rank with --nproc; the preset's with --gpu)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default: both on CPU, bf16 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model after compiling (default 2; "
                   "1 with --gpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model per round (default 3; 1 with --gpu)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 3 with --gpu)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (both sides)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape and few steps, for smoke tests")
    p.add_argument("--nproc", help="comma list of process counts: time DDP/FSDP scaling under torchrun")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="with --nproc")
    p.add_argument("--global-batch", type=int, default=None,
                   help="with --nproc: sequences per optimizer step over all ranks (default 4 × --batch)")
    p.add_argument("--gpu", action="store_true", help="the gpt2-124m preset with compile + bf16 (on --device cuda)")
    p.add_argument("--sides", default="ours,transformers",
                   help="with --gpu: which models to time (ours alone to compare batch sizes or commits)")
    p.add_argument("--accum", type=int, default=None,
                   help="with --gpu: micro-batches per optimizer step (default: the preset's 524,288-token batch)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="with --gpu: compile with mode='reduce-overhead' (CUDA graphs), both sides")
    p.add_argument("--compile-mode", default=None,
                   help="with --gpu: torch.compile mode, both sides (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="with --gpu: set torch._inductor.config.KEY (repeatable; e.g. coordinate_descent_tuning=1)")
    p.add_argument("--sdpa", choices=["cudnn", "flash", "efficient"], default=None,
                   help="with --gpu: the one attention backend SDPA may use (default: torch's choice)")
    p.add_argument("--host-data", choices=["pinned", "pageable"], default=None,
                   help="with --gpu: keep the batches on the host and copy each micro-batch as pretrain does "
                        "(pinned) or did (pageable); default: the batches wait on the device")
    p.add_argument("--loss-chunk-elements", type=int, default=None,
                   help="with --gpu: logits per loss chunk on the GPU (default: the model's)")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="with --gpu: profile 3 of our steps and print the N kernels that take the most GPU time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank of --nproc
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_train.jsonl"))
    args = p.parse_args()
    if args.gpu and args.device == "cpu" and not args.quick:
        args.device = "cuda"
    timing = (1, 1, 3) if args.gpu else (2, 3, 5)  # an accumulated gpt2-124m step is ~1 s on an H100
    for name, default in zip(("warmup", "steps", "rounds"), timing, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.quick:
        args.vocab, args.d_model, args.layers, args.heads, args.kv_heads = 512, 64, 2, 4, 2
        args.seq_len, args.batch, args.warmup, args.steps, args.rounds = 64, 4, 1, 2, 2
    if args.nproc and args.threads is None:
        args.threads = 1
    if args.batch is None and not args.gpu:
        args.batch = 8 if args.nproc else 32
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if args.device == "cpu" else "bf16"
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str) -> float:
    """Best GFLOP/s of a large square matmul: the ceiling a training step could reach."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(6):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first call pays for kernel selection
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def build(cfg: ModelConfig, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = GPT(cfg).to(device)
    peer = build_peer(cfg, device)
    n_ours, n_peer = ours.num_params(), sum(p.numel() for p in peer.parameters())
    if n_ours != n_peer:
        raise SystemExit(f"shape mismatch: ours has {n_ours} parameters, transformers {n_peer}")
    return ours, peer


def build_peer(cfg: ModelConfig, device: str) -> torch.nn.Module:
    """`transformers`' model of our shape (what `nanoforge export` writes: GPT2LMHeadModel without dropout, or
    LlamaForCausalLM), sdpa attention."""
    return transformers_model(cfg, attn_implementation="sdpa").to(device)


def make_step(
    model: torch.nn.Module,
    is_ours: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    compiled: bool,
    *,
    mode: str | None = None,
    clip: float | None = None,
    feed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Callable[[], torch.Tensor], float]:
    """A closure running one training step; also returns the seconds spent compiling (first steps).

    x, y are one micro-batch (B, T), or (A, B, T): A micro-batches whose gradients accumulate before the
    optimizer step, as `nanoforge pretrain` does for its global batch. `clip` clips the gradient norm.
    `feed`: x and y stay on the host and each micro-batch goes through it to the model's device."""
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    fwd = torch.compile(model, mode=mode) if compiled else model
    xs, ys = (x, y) if x.ndim == 3 else (x[None], y[None])
    accum = xs.shape[0]

    def step() -> torch.Tensor:
        for micro in range(accum):
            if mode in CUDAGRAPH_MODES:  # a new run of the recorded CUDA graphs
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                xm, ym = (xs[micro], ys[micro]) if feed is None else (feed(xs[micro]), feed(ys[micro]))
                loss = fwd(xm, ym) if is_ours else fwd(input_ids=xm, labels=ym, shift_labels=ym).loss
            (loss / accum if accum > 1 else loss).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    compile_s = 0.0
    if compiled:  # compile forward and backward graphs now, so timing excludes it
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
    return step, compile_s


def time_pair(steps: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of each side, one figure per round; rounds alternate which side goes first."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync(args.device)
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[name]()
            sync(args.device)
            per_round[name].append((time.perf_counter() - t0) / args.steps)
            if not torch.isfinite(loss):
                raise SystemExit(f"{name}: loss is {loss.item()}")
    return per_round


def bench_shape(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(flavour="llama", vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.layers,
                       n_embd=args.d_model, n_head=args.heads, n_kv_head=args.kv_heads, mlp_hidden=args.mlp_hidden)


# ------------------------------------------------------------------------------------------ --nproc scaling


def scaling_worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: time `nanoforge pretrain`'s step (parallelize, grad_sync, autocast, clip,
    fused AdamW) at the global batch; rank 0 prints one `RESULT {json}` line."""
    from nanoforge.train.distributed import grad_sync, init_distributed, parallelize
    from nanoforge.train.loop import autocast
    from nanoforge.train.optim import build_adamw

    d, device = init_distributed("cpu")
    torch.set_num_threads(args.threads)
    cfg = bench_shape(args)
    torch.manual_seed(0)
    model = GPT(cfg)
    dtype = args.dtypes.split(",")[0]
    train_model = parallelize(model, d, device, parallel=args.parallel, bf16=dtype == "bf16", compile=args.compile)
    opt = build_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    accum = args.global_batch // (args.batch * d.world_size)
    g = torch.Generator().manual_seed(1 + d.rank)
    data = torch.randint(0, cfg.vocab_size, (accum, args.batch, cfg.seq_len + 1), generator=g)

    def step() -> None:
        for micro in range(accum):
            with grad_sync(train_model, micro == accum - 1):
                with autocast(device, dtype):
                    loss = train_model(data[micro, :, :-1], data[micro, :, 1:])
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    per_round = []
    for _ in range(args.rounds):
        if d.active:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if d.active:
            torch.distributed.barrier()
        per_round.append((time.perf_counter() - t0) / args.steps)
    if d.main:
        tok_s = args.global_batch * cfg.seq_len / statistics.median(per_round)
        print("RESULT " + json.dumps({"procs": d.world_size, "threads": args.threads, "accum": accum,
                                      "tok_s": round(tok_s, 1), "step_ms": [round(1e3 * t, 1) for t in per_round]}),
              flush=True)
    d.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, procs: int, threads: int) -> dict:
    """Run `scaling_worker` on `procs` torchrun ranks of `threads` threads each; rank 0's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker",
           "--threads", str(threads), "--parallel", args.parallel, "--global-batch", str(args.global_batch),
           "--vocab", str(args.vocab), "--d-model", str(args.d_model), "--layers", str(args.layers),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--dtypes", args.dtypes, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--rounds", str(args.rounds)]
    if args.mlp_hidden:
        cmd += ["--mlp-hidden", str(args.mlp_hidden)]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"torchrun with {procs} processes failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def scaling(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.nproc.split(",")]
    if args.global_batch is None:
        args.global_batch = 4 * args.batch
    for n in counts:
        if args.global_batch % (args.batch * n):
            raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --batch × {n}")
    cores = os.cpu_count() or 1
    cfg = bench_shape(args)
    print(f"CPU scaling ({cpu_name()}, {cores} cores), torch {torch.__version__}: {args.parallel} over gloo, "
          f"{args.threads} thread(s) per process, global batch {args.global_batch} × {cfg.seq_len} tokens, "
          f"micro-batch {args.batch}, {args.dtypes.split(',')[0]}; d {cfg.n_embd}, layers {cfg.n_layer}, "
          f"vocab {cfg.vocab_size}")
    if max(counts) * args.threads > cores:
        print(f"warning: {max(counts)} processes × {args.threads} threads > {cores} cores: oversubscribed")
    rows = []
    base = None
    for n in counts:
        ours = _launch(args, n, args.threads)
        if base is None:
            base = ours["tok_s"]
        row = {"procs": n, "ours_tok_s": ours["tok_s"], "ours_step_ms": ours["step_ms"]}
        line = f"{n} × {args.threads} thread(s): {ours['tok_s']:9.0f} tok/s"
        if n != counts[0]:
            speedup = ours["tok_s"] / base
            peer = _launch(args, 1, n * args.threads)  # the same cores as one process's threads
            row |= {"speedup": round(speedup, 3), "efficiency": round(speedup / (n / counts[0]), 3),
                    "threads_tok_s": peer["tok_s"], "ratio_vs_threads": round(ours["tok_s"] / peer["tok_s"], 3)}
            line += (f", speedup {speedup:.2f}x over {counts[0]} (efficiency {row['efficiency']:.0%}) | "
                     f"1 process × {n * args.threads} threads {peer['tok_s']:9.0f} tok/s | "
                     f"ratio {row['ratio_vs_threads']:.2f}x")
        print(line, flush=True)
        rows.append(row)
    append_record(args.out, {
        "bench": "train_scaling", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": cpu_name(), "cores": cores, "torch": torch.__version__, "parallel": args.parallel,
        "threads_per_process": args.threads, "dtype": args.dtypes.split(",")[0], "global_batch": args.global_batch,
        "micro_batch": args.batch, "shape": cfg.to_dict(), "compile": args.compile,
        "timing": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "stat": "median"},
        "results": rows,
    })


# ------------------------------------------------------------------------------------------------ --gpu


def gpu_preset(args: argparse.Namespace) -> None:
    """gpt2-124m with compile + bf16: tokens/s, MFU and peak memory, ours then transformers'."""
    from nanoforge.config import PretrainConfig, model_config, resolve_pretrain
    from nanoforge.train.hardware import peak_flops

    device = args.device
    preset = resolve_pretrain(PretrainConfig(preset="gpt2-124m"))
    if args.quick:  # a smoke test of this path on any device: the same code, a tiny GPT-2
        preset.depth, preset.aspect, preset.head_dim, preset.seq_len = 2, 32, 16, 64
    cfg = model_config(preset, 512 if args.quick else 50257)
    batch = args.batch or preset.batch_size
    accum = args.accum or (2 if args.quick else max(1, preset.batch_tokens // (batch * cfg.seq_len)))
    mode = "reduce-overhead" if args.cudagraphs else args.compile_mode
    dtype = torch.bfloat16
    knobs = experiment_knobs(args)
    flops_per_token = GPT(cfg).flops_per_token()
    peak = peak_flops(torch.device(device), dtype)
    hw = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    print(f"gpt2-124m preset{' (--quick: a tiny GPT-2)' if args.quick else ''} on {hw}: "
          f"{flops_per_token / 1e6:.0f} MFLOP/token, micro-batch {batch} × {cfg.seq_len} × {accum} accumulated, "
          f"bf16 autocast, torch.compile{f' ({mode})' if mode else ''}, clip 1.0, fused AdamW; "
          f"peak {peak / 1e12:.0f} TFLOP/s; torch {torch.__version__}"
          + (f"; {', '.join(f'{k}={v}' for k, v in knobs.items())}" if knobs else ""))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (accum, batch, cfg.seq_len + 1), generator=g)
    feed = None
    if args.host_data == "pinned":  # what pretrain does: through page-locked memory, queued
        feed = partial(to_device, device=device)
    elif args.host_data == "pageable":  # what pretrain did before: may wait for the queued work first
        feed = partial(torch.Tensor.to, device=device, non_blocking=True)
    else:
        data = data.to(device)
    x, y = data[..., :-1].contiguous(), data[..., 1:].contiguous()
    build(cfg, "cpu")  # exits unless the two models have the same parameter count
    results = {}
    sides = [side.strip() for side in args.sides.split(",")]
    if not sides or set(sides) - {"ours", "transformers"}:
        raise SystemExit(f"--sides: expected ours and/or transformers, got {args.sides!r}")
    for side in sides:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = GPT(cfg).to(device) if side == "ours" else build_peer(cfg, device)
        step, compile_s = make_step(model, side == "ours", x, y, dtype, compiled=True, mode=mode, clip=1.0, feed=feed)
        for _ in range(args.warmup):
            step()
        secs = []
        for _ in range(args.rounds):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            sync(device)
            secs.append((time.perf_counter() - t0) / args.steps)
        if not torch.isfinite(loss):
            raise SystemExit(f"{side}: loss is {loss.item()}")
        tok_s = accum * batch * cfg.seq_len / statistics.median(secs)
        mem = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None
        results[side] = {"tok_s": round(tok_s, 1), "mfu": round(tok_s * flops_per_token / peak, 4),
                         "peak_memory_gb": None if mem is None else round(mem, 2), "compile_s": round(compile_s, 1),
                         "step_ms": [round(1e3 * t, 1) for t in secs]}
        r = results[side]
        print(f"{side:13s} {r['tok_s']:10.0f} tok/s, MFU {r['mfu']:.1%}"
              + (f", peak memory {mem:.1f} GB" if mem is not None else "") + f" (compiled in {compile_s:.0f}s)",
              flush=True)
        if side == "ours" and args.kernels:
            print(top_kernels(step, device, args.kernels))
        del model, step
    ratio = None
    if len(results) == 2:
        ratio = results["ours"]["tok_s"] / results["transformers"]["tok_s"]
        print(f"ratio {ratio:.2f}x")
    if "ours" in results:
        print(f"MFU target ≥ 45% (nanoGPT, torchtitan): {'met' if results['ours']['mfu'] >= 0.45 else 'not met'}")
    append_record(args.out, {
        "bench": "train_gpu", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
        "hardware": hw, "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": cfg.to_dict() | {"batch": batch, "accum": accum}, "flops_per_token": flops_per_token,
        "peak_flops": peak, "dtype": "bf16", "compile": mode or True, "knobs": knobs, "quick": args.quick,
        "timing": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "stat": "median"},
        "results": results, "ratio": None if ratio is None else round(ratio, 3),
    })


def experiment_knobs(args: argparse.Namespace) -> dict[str, object]:
    """Apply --inductor, --sdpa and --loss-chunk-elements (settings to compare in one GPU session before
    one becomes a default); returns what was set, for the record."""
    import nanoforge.model as model_module

    knobs: dict[str, object] = {}
    for item in args.inductor:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--inductor: expected KEY=VALUE, got {item!r}")
        value: object = {"1": True, "true": True, "0": False, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        *parents, leaf = key.split(".")  # e.g. triton.cudagraphs
        obj = torch._inductor.config
        for part in parents:
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
        setattr(obj, leaf, value)
        knobs[f"inductor.{key}"] = value
    if args.sdpa is not None:
        backends = {"cudnn": torch.backends.cuda.enable_cudnn_sdp, "flash": torch.backends.cuda.enable_flash_sdp,
                    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
                    "math": torch.backends.cuda.enable_math_sdp}
        for name, enable in backends.items():
            enable(name == args.sdpa)
        knobs["sdpa"] = args.sdpa
    if args.host_data is not None:
        knobs["host_data"] = args.host_data
    if args.loss_chunk_elements is not None:
        model_module._LOSS_CHUNK_ELEMENTS["default"] = args.loss_chunk_elements
        knobs["loss_chunk_elements"] = args.loss_chunk_elements
    return knobs


def top_kernels(step: Callable[[], torch.Tensor], device: str, n: int) -> str:
    """The n kernels (or CPU ops, on a CPU) that take the most time in one profiled optimizer step, after
    a line with the step's wall time and, on a GPU, the kernels' total (the rest is the GPU idle)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - t0)
    events = prof.key_averages()
    head = f"profiled step: {wall_ms:.1f} ms wall"
    if cuda:
        busy_ms = sum(e.self_device_time_total for e in events) / 1e3
        head += f", {busy_ms:.1f} ms of kernels ({busy_ms / wall_ms:.1%} busy)"
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return head + "\n" + events.table(sort_by=key, row_limit=n, max_name_column_width=90)


# ------------------------------------------------------------------------------------------------ default


def main() -> None:
    args = parse_args()
    if args.worker:
        scaling_worker(args)
    elif args.nproc:
        scaling(args)
    elif args.gpu:
        gpu_preset(args)
    else:
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """The default mode: ours vs LlamaForCausalLM, alternating rounds (see the module docstring)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cfg = bench_shape(args)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    tokens_per_step = args.batch * cfg.seq_len
    flops_per_token = GPT(cfg).flops_per_token()
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    peaks = {d: matmul_peak(DTYPES[d], device) for d in dtypes}
    hw = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    print(
        f"device {device} ({hw}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"shape: vocab {cfg.vocab_size}, d {cfg.n_embd}, layers {cfg.n_layer}, heads {cfg.n_head}/"
        f"{cfg.n_kv_head} kv, mlp {cfg.mlp_hidden}, seq {cfg.seq_len}, batch {args.batch}: "
        f"{flops_per_token / 1e6:.1f} MFLOP/token"
    )
    print("matmul peak: " + ", ".join(f"{d} {peaks[d]:.0f} GFLOP/s" for d in dtypes))

    results = []
    for dtype_name in dtypes:
        for compiled in [False, True] if args.compile else [False]:
            ours, peer = build(cfg, device)
            step_ours, compile_ours = make_step(ours, True, x, y, DTYPES[dtype_name], compiled)
            step_peer, compile_peer = make_step(peer, False, x, y, DTYPES[dtype_name], compiled)
            per_round = time_pair({"ours": step_ours, "transformers": step_peer}, args)
            row = {"dtype": dtype_name, "compile": compiled}
            for name, secs in per_round.items():
                tok_s = tokens_per_step / statistics.median(secs)
                gflops = tok_s * flops_per_token / 1e9
                row |= {
                    f"{name}_tok_s": round(tok_s, 1),
                    f"{name}_gflops": round(gflops, 1),
                    f"{name}_peak_frac": round(gflops / peaks[dtype_name], 3),
                    f"{name}_step_ms": [round(s * 1e3, 1) for s in secs],
                }
            row["ratio"] = round(row["ours_tok_s"] / row["transformers_tok_s"], 3)
            if compiled:
                row["compile_s"] = {"ours": round(compile_ours, 1), "transformers": round(compile_peer, 1)}
            results.append(row)
            label = f"{dtype_name}{' compiled' if compiled else ''}"
            print(
                f"{label:14s} ours {row['ours_tok_s']:9.0f} tok/s ({row['ours_gflops']:.0f} GFLOP/s, "
                f"{row['ours_peak_frac']:.0%} of peak) | transformers {row['transformers_tok_s']:9.0f} tok/s "
                f"({row['transformers_gflops']:.0f} GFLOP/s, {row['transformers_peak_frac']:.0%}) | "
                f"ratio {row['ratio']:.2f}x",
                flush=True,
            )
            del ours, peer, step_ours, step_peer

    record = {
        "bench": "train",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "hardware": hw,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": {k: v for k, v in cfg.to_dict().items() if k not in ("init_std",)} | {"batch": args.batch},
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "matmul_peak_gflops": {d: round(p, 1) for d, p in peaks.items()},
        "timing": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "stat": "median"},
        "quick": args.quick,
        "results": results,
    }
    append_record(args.out, record)


if __name__ == "__main__":
    main()
