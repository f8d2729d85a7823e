"""Decode throughput: nanoforge's KV-cache engine (`nanoforge.infer.engine.generate`) vs `transformers`'
`generate()` on the same weights, in the same process, greedy, at batch 1 and batch 16.

    python benchmarks/bench_generate.py                  # CPU, a 7.7 M-parameter Llama (7 × 256, vocab 4096)
    python benchmarks/bench_generate.py --threads 1      # one core: less noise on a shared machine
    python benchmarks/bench_generate.py --quick          # tiny shape, few tokens: a smoke test (< 30 s)
    python benchmarks/bench_generate.py --device cuda --layers 16 --d-model 2048 --heads 32 --kv-heads 8

The peer is `LlamaForCausalLM` built from our weights by `nanoforge.hf.to_transformers` (what
`nanoforge export --format hf` writes), with `attn_implementation="sdpa"`, called as
`generate(do_sample=False, use_cache=True, min_new_tokens=N)` so both sides produce exactly N tokens per
sequence from the same prompts. Tokens/s count generated tokens over the whole call (prefill of the short
prompt included). Timed rounds alternate ours/peer to spread the noise of a shared machine; each side's
figure is the median over rounds (the best is printed too). One JSON line is appended to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import transformers
from benchlib import append_record, cpu_name

from nanoforge.hf import to_transformers
from nanoforge.infer.engine import generate
from nanoforge.model import GPT, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and KV cache, both sides")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="the model's context")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per batch size")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape and few tokens, for smoke tests")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_generate.jsonl"))
    args = p.parse_args()
    if args.quick:
        args.vocab, args.d_model, args.layers, args.heads, args.kv_heads = 512, 64, 2, 4, 2
        args.new_tokens, args.rounds = 16, 2
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_ours(model: GPT, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), max_new_tokens=n_new, temperature=0.0)


def decode_peer(peer: torch.nn.Module, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    with torch.inference_mode():
        out = peer.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].tolist()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, n_new = args.device, args.new_tokens
    cfg = ModelConfig(
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_kv_head=args.kv_heads,
    )
    if args.prompt_len + n_new > cfg.seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens must fit in --seq-len {cfg.seq_len}")
    torch.manual_seed(0)
    ours = GPT(cfg).to(device, DTYPES[args.dtype]).eval()
    peer = to_transformers(ours, attn_implementation="sdpa").to(device, DTYPES[args.dtype])
    hw = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    print(
        f"device {device} ({hw}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.dtype}"
    )
    print(
        f"shape: llama, vocab {cfg.vocab_size}, d {cfg.n_embd}, layers {cfg.n_layer}, heads {cfg.n_head}/"
        f"{cfg.n_kv_head} kv, mlp {cfg.mlp_hidden}: {ours.num_params() / 1e6:.2f} M parameters; "
        f"prompt {args.prompt_len} tokens, {n_new} new tokens per sequence, greedy"
    )

    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(9, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(device)
        sides = {
            "ours": partial(decode_ours, ours, prompts, n_new),
            "transformers": partial(decode_peer, peer, prompts, n_new),
        }
        outputs = {name: run() for name, run in sides.items()}  # warm-up, and the tokens to compare
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                sync(device)
                t0 = time.perf_counter()
                sides[name]()
                sync(device)
                seconds[name].append(time.perf_counter() - t0)
        row: dict = {"batch": batch}
        for name, secs in seconds.items():
            row[f"{name}_tok_s"] = round(batch * n_new / statistics.median(secs), 1)
            row[f"{name}_best_tok_s"] = round(batch * n_new / min(secs), 1)
            row[f"{name}_round_s"] = [round(s, 3) for s in secs]
        row["ratio"] = round(row["ours_tok_s"] / row["transformers_tok_s"], 3)
        same = [a == b for a, b in zip(outputs["ours"], outputs["transformers"], strict=True)]
        row["same_tokens"] = sum(same) / len(same)
        results.append(row)
        print(
            f"batch {batch:3d}: ours {row['ours_tok_s']:8.0f} tok/s (best {row['ours_best_tok_s']:.0f}) | "
            f"transformers {row['transformers_tok_s']:8.0f} tok/s (best {row['transformers_best_tok_s']:.0f}) | "
            f"ratio {row['ratio']:.2f}x | identical greedy tokens in {row['same_tokens']:.0%} of sequences",
            flush=True,
        )

    record = {
        "bench": "generate",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "hardware": hw,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "shape": {k: v for k, v in cfg.to_dict().items() if k != "init_std"} | {"params": ours.num_params()},
        "prompt_len": args.prompt_len,
        "new_tokens": n_new,
        "timing": {"rounds": args.rounds, "stat": "median"},
        "quick": args.quick,
        "results": results,
    }
    append_record(args.out, record)


if __name__ == "__main__":
    main()
