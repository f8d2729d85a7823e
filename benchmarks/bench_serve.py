"""Serving throughput: N requests at once through `nanoforge serve`'s engine (`ContinuousBatch`), decoded
together vs one at a time, and `transformers` `generate()` answering them one at a time, on the same weights.

    python benchmarks/bench_serve.py                  # CPU, the 7.7 M-parameter Llama of bench_generate, 16 requests
    python benchmarks/bench_serve.py --requests 32 --max-batch 16
    python benchmarks/bench_serve.py --quick          # tiny shape: a smoke test (< 30 s)

The requests differ as a server's do: prompts of 8..64 tokens and replies of 16..128 tokens (greedy, no
stop token, so every reply has its length), all arriving at time 0. Each side's figure is generated tokens
over the wall time to answer all of them (median over alternating rounds), plus the mean time a request
waits for its last token. The batched replies are checked against the one-at-a-time ones.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from benchlib import append_record

from nanoforge.hf import to_transformers
from nanoforge.infer.batching import ContinuousBatch
from nanoforge.model import GPT, ModelConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape, short replies")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_serve.jsonl"))
    return p.parse_args()


def serve_all(model: GPT, requests: list[tuple[list[int], int]], max_batch: int) -> tuple[list[list[int]], float]:
    """Every request through one ContinuousBatch; the replies and the mean seconds to each one's end."""
    batch, t0 = ContinuousBatch(model, max_batch), time.perf_counter()
    handles = {batch.add(p, max_new_tokens=n, temperature=0.0): i for i, (p, n) in enumerate(requests)}
    outs: list[list[int]] = [[] for _ in requests]
    done: list[float] = []
    while batch.busy:
        for handle, token in batch.step():
            if token is None:
                done.append(time.perf_counter() - t0)
            else:
                outs[handles[handle]].append(token)
    return outs, statistics.mean(done)


def peer_all(peer: torch.nn.Module, requests: list[tuple[list[int], int]]) -> tuple[list[list[int]], float]:
    t0, outs, done = time.perf_counter(), [], []
    with torch.inference_mode():
        for p, n in requests:
            idx = torch.tensor([p])
            out = peer.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, use_cache=True, pad_token_id=0)
            outs.append(out[0, len(p) :].tolist())
            done.append(time.perf_counter() - t0)
    return outs, statistics.mean(done)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_kv_head=2) if args.quick else \
        dict(vocab_size=4096, n_embd=256, n_layer=7, n_head=4, n_kv_head=4)
    cfg = ModelConfig(seq_len=256, **shape)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    peer = to_transformers(model, attn_implementation="sdpa")
    rng = random.Random(0)
    longest = 32 if args.quick else 128
    requests = [([rng.randrange(9, cfg.vocab_size) for _ in range(rng.randint(8, 64))], rng.randint(16, longest))
                for _ in range(args.requests)]
    n_tokens = sum(n for _, n in requests)
    print(f"{model.num_params() / 1e6:.2f} M-parameter llama, {torch.get_num_threads()} threads; "
          f"{args.requests} requests at once, {n_tokens} tokens to generate, greedy")

    sides = {
        f"batched (max {args.max_batch})": lambda: serve_all(model, requests, args.max_batch),
        "one at a time": lambda: serve_all(model, requests, 1),
        "transformers, one at a time": lambda: peer_all(peer, requests),
    }
    outputs = {name: run()[0] for name, run in sides.items()}  # warm-up, and the replies to compare
    secs: dict[str, list[float]] = {name: [] for name in sides}
    waits: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t0 = time.perf_counter()
            _, wait = sides[name]()
            secs[name].append(time.perf_counter() - t0)
            waits[name].append(wait)
    base = n_tokens / statistics.median(secs["one at a time"])
    rows = {}
    for name in sides:
        tok_s = n_tokens / statistics.median(secs[name])
        rows[name] = {"tok_s": round(tok_s, 1), "mean_wait_s": round(statistics.median(waits[name]), 3),
                      "vs_one_at_a_time": round(tok_s / base, 2),
                      "same_replies": outputs[name] == outputs["one at a time"]}
        print(f"{name:30s} {tok_s:8.0f} tok/s ({tok_s / base:.2f}x), a request waits {rows[name]['mean_wait_s']:.2f} s "
              f"on average; replies identical to one-at-a-time: {rows[name]['same_replies']}", flush=True)
    append_record(args.out, {"bench": "serve", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "threads": torch.get_num_threads(), "shape": cfg.to_dict(), "requests": args.requests,
                             "max_batch": args.max_batch, "tokens": n_tokens, "rounds": args.rounds,
                             "quick": args.quick, "results": rows})

if __name__ == "__main__":
    main()
