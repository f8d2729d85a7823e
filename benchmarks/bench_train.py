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
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from nanoforge.model import GPT, ModelConfig

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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default: both on CPU, bf16 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model (after compiling)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (both sides)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape and few steps, for smoke tests")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_train.jsonl"))
    args = p.parse_args()
    if args.quick:
        args.vocab, args.d_model, args.layers, args.heads, args.kv_heads = 512, 64, 2, 4, 2
        args.seq_len, args.batch, args.warmup, args.steps, args.rounds = 64, 4, 1, 2, 2
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


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def build(cfg: ModelConfig, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = GPT(cfg).to(device)
    peer_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    peer = LlamaForCausalLM(peer_cfg).to(device)
    n_ours, n_peer = ours.num_params(), sum(p.numel() for p in peer.parameters())
    if n_ours != n_peer:
        raise SystemExit(f"shape mismatch: ours has {n_ours} parameters, transformers {n_peer}")
    return ours, peer


def make_step(
    model: torch.nn.Module,
    is_ours: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    compiled: bool,
) -> tuple[Callable[[], torch.Tensor], float]:
    """A closure running one training step; also returns the seconds spent compiling (first steps)."""
    device = x.device.type
    fused = device in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    fwd = torch.compile(model) if compiled else model

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(x, y) if is_ours else fwd(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
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


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cfg = ModelConfig(
        flavour="llama",
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_kv_head=args.kv_heads,
        mlp_hidden=args.mlp_hidden,
    )
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
