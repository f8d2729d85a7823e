"""GRPO step throughput: nanoforge's `grpo` stage vs TRL's `GRPOTrainer` on the same weights and task, in one
process: rollout tokens/s, training tokens/s and the share of step time spent generating.

    python benchmarks/bench_grpo.py                    # CPU, the demo's cpu-tiny shape (4 × 128, llama)
    python benchmarks/bench_grpo.py --threads 1        # one core: less noise on a shared machine
    python benchmarks/bench_grpo.py --quick            # tiny shape, 3 steps: a smoke test (< 1 min)
    python benchmarks/bench_grpo.py --device cuda --layers 12 --d-model 768 --heads 12 --prompts 16 --steps 8

Both sides run the same GRPO step on `arithmetic`: `--prompts` prompts × `--group-size` sampled completions of
at most `--new-tokens` tokens (temperature 1), rewards from the task's rules, group-normalised advantages,
loss `grpo`, β = 0 (no reference model), one optimizer update per batch. The model is random (from seed 0),
so completions rarely stop early and both sides generate about the same number of tokens. The peer is
TRL's GRPOTrainer on the `transformers` export of the same weights (`nanoforge export --format hf`),
generating with `transformers`' `generate()` and `per_device_train_batch_size` = prompts × group size.

Rollout tokens/s = completion tokens / generation seconds; training tokens/s = (prompt + completion) tokens
/ the rest of the step (scoring, log-probs, backward, optimizer). Ours come from the stage's metrics.jsonl,
the peer's from a timed `generate` and per-step wall time; each figure is the median over steps 2…N (the
first step warms up). One JSON line is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from benchlib import append_record

from nanoforge.data.pydoc_corpus import CorpusConfig, build_corpus
from nanoforge.hf import ExportConfig, export_hf
from nanoforge.model import GPT, ModelConfig
from nanoforge.post.grpo import GRPOConfig, grpo, render_prompt
from nanoforge.post.rewards import RewardWeights
from nanoforge.post.tasks import get_task
from nanoforge.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from nanoforge.train.checkpoint import save_model_artifact
from nanoforge.train.metrics import MetricsLog

MODULES = ["json", "textwrap", "string", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "base64",
           "calendar", "difflib", "argparse", "collections", "pathlib", "functools"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary (trained on a few stdlib docs)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="completion tokens, at most")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per side (the first is warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape, few steps: a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_grpo.jsonl"))
    args = p.parse_args()
    if args.quick:
        args.vocab, args.d_model, args.layers, args.heads = 512, 64, 2, 4
        args.prompts, args.group_size, args.new_tokens, args.steps = 4, 4, 32, 3
    return args


def build_model(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """A tokenizer trained on a few stdlib docs, a random model of the asked shape, and its transformers export."""
    build_corpus(CorpusConfig(modules=MODULES, workers=1), work / "docs")
    train_tokenizer(TokenizerConfig(vocab_size=args.vocab), work / "docs", work / "tok")
    tok = Tokenizer.load(work / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=-(-tok.vocab_size // 64) * 64, seq_len=args.seq_len, n_layer=args.layers,
                            n_embd=args.d_model, n_head=args.heads))
    save_model_artifact(model, work / "model", tokenizer_dir=work / "tok")
    export_hf(ExportConfig(), work / "model", work / "hf")
    return work / "model", work / "hf"


def run_ours(args: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, float]:
    cfg = GRPOConfig(task="arithmetic", group_size=args.group_size, batch_size=args.prompts, micro_batch=256,
                     max_steps=args.steps, max_new_tokens=args.new_tokens, lr=1e-5, eval_problems=0,
                     ckpt_every=10**9, device=args.device, threads=args.threads, dtype="fp32")
    grpo(cfg, model_dir, out)
    rows = MetricsLog.read(out / "metrics.jsonl")[1:]
    return {"rollout_tok_s": statistics.median(r["rollout_tok_per_s"] for r in rows),
            "train_tok_s": statistics.median(r["train_tok_per_s"] for r in rows),
            "generation_share": statistics.median(r["generation_share"] for r in rows),
            "step_s": statistics.median(r["rollout_s"] + r["train_s"] for r in rows),
            "completion_len": statistics.mean(r["completion_len"] for r in rows)}


def run_trl(args: argparse.Namespace, hf_dir: Path, tok: Tokenizer, out: Path) -> dict[str, float]:
    import trl
    from datasets import Dataset

    task, weights = get_task("arithmetic"), RewardWeights()
    problems = task.problems(0, args.steps * args.prompts)
    by_prompt = {p.prompt: p for p in problems}
    prompt_len = {p.prompt: len(render_prompt(tok, p)) for p in problems}
    steps: list[dict[str, float]] = []

    def reward(prompts, completions, completion_ids, **_):
        """The task's rules, as in ours; also counts the step's tokens."""
        users = [m[-1]["content"] for m in prompts]
        steps[-1]["completion_tokens"] += sum(len(c) for c in completion_ids)
        steps[-1]["train_tokens"] += sum(prompt_len[u] + len(c) for u, c in zip(users, completion_ids, strict=True))
        return [weights.total(task.score(c[-1]["content"], by_prompt[u]))
                for u, c in zip(users, completions, strict=True)]

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            steps.append({"start": time.perf_counter(), "gen_s": 0.0, "completion_tokens": 0, "train_tokens": 0})

        def on_step_end(self, *_, **__):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1]["start"]

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            steps[-1]["gen_s"] += time.perf_counter() - t0

    model.generate = timed_generate
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}]} for p in problems])
    cfg = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.group_size,
                         num_generations=args.group_size, max_completion_length=args.new_tokens, max_steps=args.steps,
                         learning_rate=1e-5, beta=0.0, loss_type="grpo", scale_rewards="group", temperature=1.0,
                         use_cpu=args.device == "cpu", bf16=False, logging_steps=1, report_to="none",
                         save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                              processing_class=transformers.AutoTokenizer.from_pretrained(hf_dir),
                              callbacks=[StepTimer()])
    trainer.train()
    rows = steps[1:]
    return {"rollout_tok_s": statistics.median(r["completion_tokens"] / r["gen_s"] for r in rows),
            "train_tok_s": statistics.median(r["train_tokens"] / (r["step_s"] - r["gen_s"]) for r in rows),
            "generation_share": statistics.median(r["gen_s"] / r["step_s"] for r in rows),
            "step_s": statistics.median(r["step_s"] for r in rows),
            "completion_len": statistics.mean(r["completion_tokens"] for r in rows) / (args.prompts * args.group_size)}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, hf_dir = build_model(args, work)
        tok = Tokenizer.load(model_dir)
        n_params = GPT(ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text())["model"])).num_params()
        print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}; model {args.layers} × {args.d_model} "
              f"({n_params / 1e6:.2f} M parameters), {args.prompts} prompts × {args.group_size} completions of ≤ "
              f"{args.new_tokens} tokens, {args.steps} steps", file=sys.stderr)
        results = {"ours": run_ours(args, model_dir, work / "ours"), "trl": run_trl(args, hf_dir, tok, work / "trl")}
    print(f"{'':6} {'rollout tok/s':>14} {'train tok/s':>12} {'generating':>11} {'step s':>8} {'completion':>11}")
    for name, r in results.items():
        print(f"{name:6} {r['rollout_tok_s']:14.0f} {r['train_tok_s']:12.0f} {r['generation_share']:11.1%} "
              f"{r['step_s']:8.2f} {r['completion_len']:11.1f}")
    ratios = {k: round(results["ours"][k] / results["trl"][k], 3) for k in ("rollout_tok_s", "train_tok_s")}
    ratios["step_speedup"] = round(results["trl"]["step_s"] / results["ours"]["step_s"], 3)
    print(f"ratio ours/trl: rollout {ratios['rollout_tok_s']:.2f}x, train {ratios['train_tok_s']:.2f}x, "
          f"whole step {ratios['step_speedup']:.2f}x faster")
    record = {"bench": "grpo", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl.__version__, "params": n_params,
              "shape": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "vocab": args.vocab},
              "prompts": args.prompts, "group_size": args.group_size, "new_tokens": args.new_tokens,
              "steps": args.steps, "quick": args.quick, "timing": {"stat": "median over steps 2..N"},
              "results": {k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()}, "ratio": ratios}
    append_record(args.out, record)


if __name__ == "__main__":
    main()
