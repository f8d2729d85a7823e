"""RLHF throughput: reward-model and DPO training tokens/s, ours vs `transformers` models doing the same step,
and the labelling app's judgements/s under concurrent load, over HTTP vs the store alone.

    python benchmarks/bench_rlhf.py                 # the demo's cpu-tiny shape (4 × 128, vocab 4096), 20 clients
    python benchmarks/bench_rlhf.py --threads 1     # one core: less noise on a shared machine
    python benchmarks/bench_rlhf.py --quick         # tiny shape, few steps: a smoke test (< 1 min)

Training: one optimizer step on a batch of `--pairs` preference pairs (prompt 24 tokens, responses of 8–72
tokens, right-padded), fp32, AdamW. Reward: our `RewardModel` (trunk + score head on the last token) and
the Bradley–Terry loss vs `LlamaForSequenceClassification` (num_labels=1, the same weights, its own
last-non-pad-token pooling) and the same loss. DPO (reference log-probabilities precomputed, as both
`nanoforge dpo` and TRL do by option): our `response_logprobs` + `dpo_loss` vs `LlamaForCausalLM` logits →
log-softmax → gather → masked sum (TRL's `concatenated_forward`) + the same loss. Both sides start from the
same weights, so their first losses must agree (printed). Tokens/s count the non-padding tokens of the
2 × pairs sequences per step; timed rounds alternate ours/peer, each side's figure is the median step.

Labelling: a database of `--items` items, `--clients` annotators each making `--per-client` judgements
(GET /api/next, POST /api/judgements) concurrently against `nanoforge label` running in its own process
(as in production); judgements/s over the whole run, and the request latencies. The reference is the
store alone in this process (`next_item` + `record`, no HTTP): the ceiling the server can approach.
One JSON line is appended to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import torch
import transformers
from benchlib import append_record, cpu_name

from nanoforge.feedback.store import FeedbackStore, Item
from nanoforge.hf import hf_config, to_hf_state, to_transformers
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.dpo import dpo_loss
from nanoforge.post.preference import Pair, pair_batch, response_logprobs
from nanoforge.post.reward import RewardModel, bradley_terry_loss

PAD = 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating timed rounds")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-client", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape, few steps and clients: a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_rlhf.jsonl"))
    args = p.parse_args()
    if args.quick:
        args.vocab, args.d_model, args.layers, args.heads, args.pairs = 512, 64, 2, 4, 4
        args.steps, args.rounds, args.items, args.clients, args.per_client = 1, 2, 40, 4, 10
    return args


# ---------------------------------------------------------------------------------------------------
# training steps


def synthetic_pairs(n: int, vocab: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(9, vocab) for _ in range(k)]  # noqa: E731  (no special tokens, no padding)
    return [Pair(draw(24), draw(rng.randint(8, 72)), draw(rng.randint(8, 72))) for _ in range(n)]


def peer_reward_model(rm: RewardModel) -> torch.nn.Module:
    """`LlamaForSequenceClassification` holding the reward model's trunk and head."""
    values = {**hf_config(rm.trunk.cfg), "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
              "pad_token_id": PAD}
    config = transformers.AutoConfig.for_model(**values)
    peer = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    state = {k: v for k, v in to_hf_state(rm.trunk.state_dict(), rm.trunk.cfg).items() if k.startswith("model.")}
    state["score.weight"] = rm.score.weight.detach().clone()
    missing, unexpected = peer.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return peer


def timed(steps: dict[str, Callable[[], float]], n_steps: int, rounds: int) -> dict[str, list[float]]:
    """Per-step seconds of each side over alternating rounds (after one warm-up step each)."""
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            for _ in range(n_steps):
                t0 = time.perf_counter()
                steps[name]()
                seconds[name].append(time.perf_counter() - t0)
    return seconds


def bench_training(args: argparse.Namespace) -> list[dict]:
    cfg = ModelConfig(vocab_size=args.vocab, seq_len=256, n_layer=args.layers, n_embd=args.d_model, n_head=args.heads)
    torch.manual_seed(0)
    pairs = synthetic_pairs(args.pairs, cfg.vocab_size, 0)
    batch = pair_batch(pairs, PAD)
    mask = (batch.idx != PAD).long()
    n_tokens = int(mask.sum())
    results = []

    # reward model: trunk + head, Bradley–Terry
    rm = RewardModel(GPT(cfg))
    peer_rm = peer_reward_model(rm).train()
    opt_ours = torch.optim.AdamW(rm.parameters(), lr=1e-5)
    opt_peer = torch.optim.AdamW(peer_rm.parameters(), lr=1e-5)
    half = args.pairs

    def reward_ours() -> float:
        r = rm(batch.idx, batch.last)
        loss = bradley_terry_loss(r[:half], r[half:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reward_peer() -> float:
        r = peer_rm(input_ids=batch.idx, attention_mask=mask).logits.squeeze(-1)
        loss = bradley_terry_loss(r[:half], r[half:])
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = (reward_ours(), reward_peer())  # the same weights: the same loss
    results.append(report("reward", timed({"ours": reward_ours, "transformers": reward_peer}, args.steps,
                                          args.rounds), n_tokens, first))

    # DPO: policy log-probabilities of the response tokens, reference precomputed
    policy = GPT(cfg).train()
    peer = to_transformers(policy).train()
    with torch.no_grad():
        ref = response_logprobs(policy, batch) - 0.5  # any fixed reference works for timing
    opt_ours = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-5)
    targets = batch.targets

    def dpo_ours() -> float:
        logps = response_logprobs(policy, batch)
        loss = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], 0.1)[0]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(loss.detach())

    def dpo_peer() -> float:
        logits = peer(input_ids=batch.idx, attention_mask=mask).logits  # (2B, T, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, targets.clamp_min(0)[..., None]).squeeze(-1)
        logps = (logp * (targets != -100)).sum(1)
        loss = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], 0.1)[0]
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = (dpo_ours(), dpo_peer())
    results.append(report("dpo", timed({"ours": dpo_ours, "transformers": dpo_peer}, args.steps, args.rounds),
                          n_tokens, first))
    return results


def report(name: str, seconds: dict[str, list[float]], n_tokens: int, first: tuple[float, float]) -> dict:
    row: dict = {"stage": name, "tokens_per_step": n_tokens, "first_loss_ours": first[0],
                 "first_loss_transformers": first[1], "same_loss": abs(first[0] - first[1]) < 1e-4}
    for side, secs in seconds.items():
        row[f"{side}_tok_s"] = round(n_tokens / statistics.median(secs), 1)
        row[f"{side}_best_tok_s"] = round(n_tokens / min(secs), 1)
    row["ratio"] = round(row["ours_tok_s"] / row["transformers_tok_s"], 3)
    print(f"{name:6s} training: ours {row['ours_tok_s']:8.0f} tok/s (best {row['ours_best_tok_s']:.0f}) | "
          f"transformers {row['transformers_tok_s']:8.0f} tok/s (best {row['transformers_best_tok_s']:.0f}) | "
          f"ratio {row['ratio']:.2f}x | first loss {first[0]:.6f} vs {first[1]:.6f}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------
# the labelling app


def make_db(path: Path, n_items: int, tokens: list[str]) -> None:
    rng = random.Random(0)
    text = lambda: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "<b>"]) for _ in range(40))  # noqa: E731
    store = FeedbackStore(path, seed=0)
    store.add_items([Item([{"role": "user", "content": f"question {i}"}], (text(), text()),
                          ({"row": i, "side": 0}, {"row": i, "side": 1}), reference=None) for i in range(n_items)])
    for i, token in enumerate(tokens):
        store.add_annotator(f"annotator-{i:03d}", token)
    store.close()


async def client(session: aiohttp.ClientSession, url: str, token: str, n: int, latencies: list[float]) -> None:
    headers, rng = {"Authorization": f"Bearer {token}"}, random.Random(token)
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url + "api/next", headers=headers) as r:
            item = await r.json()
        body = {"item_id": item["item_id"], "choice": rng.choice("AB"), "reason": "benchmark"}
        async with session.post(url + "api/judgements", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
        latencies.append(time.perf_counter() - t0)


def bench_labelling(args: argparse.Namespace, tmp: Path) -> dict:
    tokens = [secrets.token_urlsafe(16) for _ in range(args.clients)]
    total = args.clients * args.per_client
    if args.per_client > args.items:
        raise SystemExit("--per-client must be at most --items (an annotator judges an item once)")

    # the store alone, in this process
    make_db(tmp / "direct.sqlite", args.items, tokens)
    store = FeedbackStore(tmp / "direct.sqlite", seed=0)
    who = [store.annotator(t) for t in tokens]
    t0 = time.perf_counter()
    for _ in range(args.per_client):
        for w in who:
            store.record(w, store.next_item(w)["item_id"], "A")
    direct = total / (time.perf_counter() - t0)
    store.close()

    # the app in its own process, concurrent clients over HTTP
    db = tmp / "served.sqlite"
    make_db(db, args.items, tokens)
    team = tmp / "team.txt"
    team.write_text("".join(f"annotator-{i:03d} {t}\n" for i, t in enumerate(tokens)))
    server = subprocess.Popen([sys.executable, "-m", "nanoforge", "label", "--db", str(db), "--annotators", str(team),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = server.stdout.readline()
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        latencies: list[float] = []

        async def run() -> float:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                t0 = time.perf_counter()
                await asyncio.gather(*(client(session, url, t, args.per_client, latencies) for t in tokens))
                return time.perf_counter() - t0

        seconds = asyncio.run(run())
    finally:
        server.terminate()
        server.wait(timeout=30)
    check = FeedbackStore(db)
    stored = len(check.judgements())
    check.close()
    lat = sorted(latencies)
    row = {"clients": args.clients, "judgements": total, "stored": stored, "seconds": round(seconds, 3),
           "http_judgements_per_s": round(total / seconds, 1), "store_judgements_per_s": round(direct, 1),
           "ratio": round(total / seconds / direct, 3), "latency_p50_ms": round(1000 * lat[len(lat) // 2], 2),
           "latency_p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2)}
    print(f"labelling: {args.clients} concurrent clients × {args.per_client} judgements over HTTP: "
          f"{row['http_judgements_per_s']:.0f} judgements/s (p50 {row['latency_p50_ms']:.1f} ms, p95 "
          f"{row['latency_p95_ms']:.1f} ms per next+judge), {stored} rows stored | the store alone "
          f"{row['store_judgements_per_s']:.0f}/s | ratio {row['ratio']:.2f}x", flush=True)
    return row


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = cpu_name()
    print(f"cpu ({hw}), {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; shape: llama, vocab {args.vocab}, d {args.d_model}, layers {args.layers}, "
          f"{args.pairs} pairs per step")
    training = bench_training(args)
    with tempfile.TemporaryDirectory() as tmp:
        labelling = bench_labelling(args, Path(tmp))
    record = {"bench": "rlhf", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": hw,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "dtype": "fp32",
              "shape": {"vocab": args.vocab, "d_model": args.d_model, "layers": args.layers, "heads": args.heads},
              "pairs": args.pairs, "timing": {"steps": args.steps, "rounds": args.rounds, "stat": "median"},
              "quick": args.quick, "training": training, "labelling": labelling}
    append_record(args.out, record)


if __name__ == "__main__":
    main()
