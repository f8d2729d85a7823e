"""SFT step throughput and memory: full fine-tuning vs LoRA (and LoRA on an int8 base) on the same model, the
same packed batches, in one run.

    python benchmarks/bench_sft.py                       # CPU: a 6 × 384 llama (≈ 14 M parameters), LoRA r=8
    python benchmarks/bench_sft.py --quick               # tiny shape, few steps: a smoke test
    python benchmarks/bench_sft.py --device cuda --layers 12 --d-model 768 --batch 16 --seq-len 1024

Each variant runs in its own child process (so that its peak memory is its own): the model is built from
one seed, the SFT step of `nanoforge sft` (packed rows under the document mask, loss on the learnt tokens
only, fused AdamW) runs `--warmup` + `--steps` times on the same batches, and the child reports tokens/s
(median over the timed steps), the trained parameters, the bytes of the training state (weights as stored,
int8 ones included; gradients; optimizer state) and peak memory: the process's peak resident set on a CPU
(`ru_maxrss`, which also holds activations, the allocator's cache and, for qlora, the fp32 weights that
existed before quantization), `torch.cuda.max_memory_allocated` on a GPU. Rounds alternate the variants to
spread a shared machine's noise; each variant's figure is its best round (fastest tokens/s, lowest peak).
`qlora` (LoRA on the int8 base of `--lora-quantize int8`) runs when torchao is installed. One JSON line is
appended to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 × rank, all linear layers)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (1 on a shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a 2 × 64 model, 3 steps, one round")
    p.add_argument("--variant", choices=["full", "lora", "qlora"], help=argparse.SUPPRESS)  # set in the children
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_sft.jsonl"))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.vocab, args.seq_len = 2, 64, 2, 512, 128
        args.steps, args.warmup, args.rounds = 3, 1, 1
    return args


def _batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Packed rows of random conversations (60-200 tokens, the second half of each learnt), as `make_batch`
    lays them out."""
    from nanoforge.post.sft import Example, make_batch, pack_rows

    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch * (args.steps + args.warmup) * 3):
        n = int(torch.randint(60, 200, (1,), generator=gen)) if args.seq_len >= 200 else args.seq_len // 2
        ids = torch.randint(9, args.vocab, (n + 1,), generator=gen).tolist()
        targets = [-100] * (n // 2) + ids[n // 2 + 1 :]
        examples.append(Example(ids[:-1], targets))
    rows = pack_rows([len(e.inputs) for e in examples], list(range(len(examples))), args.seq_len, True)
    return [make_batch(examples, rows[i : i + args.batch], 1, True)
            for i in range(0, args.batch * (args.steps + args.warmup), args.batch)]


def _child(args: argparse.Namespace) -> dict:
    """One variant: build, train `warmup + steps` steps, measure."""
    from nanoforge.model import GPT, ModelConfig
    from nanoforge.post.lora import LoRAConfig, apply_lora, quantize_base
    from nanoforge.post.sft import optimizer_state_bytes, step_loss
    from nanoforge.train.optim import build_adamw

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = _batches(args)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.layers, n_embd=args.d_model,
                            n_head=args.heads)).to(device)
    if args.variant in ("lora", "qlora"):
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    if args.variant == "qlora":
        quantize_base(model)
    opt = build_adamw(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), device_type=device.type)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, grad_bytes = [], 0
    for i, (x, y, seg) in enumerate(batches):
        t0 = time.perf_counter()
        loss = step_loss(model, x.to(device), y.to(device), seg.to(device)) / max(1, int((y != -100).sum()))
        loss.backward()
        grad_bytes = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append((time.perf_counter() - t0, int((x != 1).sum())))
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "tok_per_s": statistics.median(n / t for t, n in times),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "weight_bytes": sum(_nbytes(p) for p in model.parameters()), "grad_bytes": grad_bytes,
            "optimizer_state_bytes": optimizer_state_bytes(opt), "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_peak,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; a tensor subclass (torchao's Int8Tensor) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, name)) for name in inner if getattr(t, name) is not None)
    return t.numel() * t.element_size()


def _run_child(argv: list[str], variant: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--variant", variant]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{variant} child failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.variant:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    if importlib.util.find_spec("torchao") is not None:
        runs["qlora"] = []
    for _ in range(args.rounds):
        for variant, results in runs.items():
            results.append(_run_child(argv, variant))
    best = {v: {**max(rs, key=lambda r: r["tok_per_s"]), "rss_peak_bytes": min(r["rss_peak_bytes"] for r in rs)}
            for v, rs in runs.items()}
    full, lora = best["full"], best["lora"]
    mb = 1 / 2**20
    memory = "cuda_peak_bytes" if args.device.startswith("cuda") else "rss_peak_bytes"
    print(f"model {args.layers} × {args.d_model} (vocab {args.vocab}), {full['params'] / 1e6:.1f}M parameters; "
          f"{args.batch} packed rows × {args.seq_len} tokens; LoRA r={args.rank} on all linear layers; {args.device}")
    print(f"{'':<6} {'trained':>9} {'tok/s':>7} {'weights':>9} {'grads':>9} {'optimizer':>10} {'state':>9} "
          f"{'peak memory':>12}")
    for r in best.values():
        r["state_bytes"] = r["weight_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"]
        print(f"{r['variant']:<6} {r['trainable_params'] / 1e6:>8.2f}M {r['tok_per_s']:>7,.0f} "
              + " ".join(f"{r[k] * mb:>{w}.1f} MB" for k, w in (("weight_bytes", 6), ("grad_bytes", 6),
                                                               ("optimizer_state_bytes", 7), ("state_bytes", 6)))
              + f" {r[memory] * mb:>9.0f} MB")
    ratio = lora["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    for name, r in best.items():
        if name != "full":
            print(f"{name} / full: optimizer state {r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.3f}×, "
                  f"training state {r['state_bytes'] / full['state_bytes']:.2f}×, peak memory "
                  f"{r[memory] / full[memory]:.2f}×, tokens/s {r['tok_per_s'] / full['tok_per_s']:.2f}×")
    record = {"bench": "sft", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "torch": torch.__version__, "device": args.device,
              "shape": {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab, "seq_len": args.seq_len,
                        "batch": args.batch, "rank": args.rank}, **best, "optimizer_state_ratio": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
