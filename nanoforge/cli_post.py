"""The post-training subcommands of `nanoforge`: instruct, sft, merge, grpo, label, reward, dpo, ppo.

    nanoforge instruct --docs clean/ --out instruct/
    nanoforge sft --model model/ --data instruct/train.jsonl --val instruct/val.jsonl --out chat/
    nanoforge grpo --model chat/ --task arithmetic --out reasoner/

`nanoforge.cli` builds the parser and dispatches; this module adds these stages' flags and their handlers,
each of which only parses and calls one stage (DESIGN.md §1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoforge.errors import NanoforgeError


def given_flags(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Flags the user actually gave (argparse leaves the others None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def config_file_values(path: Path, table: str, own_tables: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings a training command reads from its `--config` file: its `[table]`, else the top-level keys
    (and `own_tables`, the config's own table settings). A note names what it leaves unread, such as the other
    stages' tables of a run config, so that a setting there is not believed to apply."""
    from nanoforge.config import load_toml
    from nanoforge.console import info

    raw = load_toml(path)
    if table in raw:
        values = raw[table]
        if not isinstance(values, dict):
            raise NanoforgeError(f"{path}: {table} must be a [{table}] table of settings, not a value")
        unread = [f"[{k}]" if isinstance(v, dict) else k for k, v in raw.items() if k != table]
    else:
        values = {k: v for k, v in raw.items() if not isinstance(v, dict) or k in own_tables}
        unread = [f"[{k}]" for k, v in raw.items() if isinstance(v, dict) and k not in own_tables]
    if unread:
        info(f"note: {path}: not read: {', '.join(unread)} (`nanoforge {table}` reads the [{table}] table, or "
             f"top-level keys when there is none)")
    return dict(values)


def add_post_training_parsers(sub: Any, add_training_flags: Callable[[argparse.ArgumentParser, str], None]) -> None:
    """Add the post-training subcommands to `sub` (the subparsers of `nanoforge`)."""
    p = sub.add_parser("instruct", help="make the demo's instruction data (chat JSONL) from pydoc documents",
                       description="Questions about the documented functions and classes of the documents "
                                   "(answered from their docstrings and signatures), identity questions and "
                                   "arithmetic dialogs; held-out functions, paraphrases and problems go to "
                                   "val.jsonl.")
    p.add_argument("--docs", type=Path, required=True, help="pydoc documents (`corpus`, or the demo's clean docs)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. max_entries=600, arithmetic=1200")

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (full, or LoRA with --lora-rank)",
                       description="Fine-tune a model on conversations ({\"messages\": [...]} per line), rendered "
                                   "by the chat template, with the loss on assistant tokens only and short "
                                   "conversations packed under a document mask. With --lora-rank the base stays "
                                   "frozen and only the adapter is written (`nanoforge merge` folds it in).")
    p.add_argument("--model", type=Path, required=True, help="model artifact to fine-tune")
    p.add_argument("--data", required=True, help="chat JSONL file(s), comma-separated")
    p.add_argument("--val", help="held-out chat JSONL file(s), comma-separated (default: val_fraction of --data)")
    p.add_argument("--epochs", type=float, help="passes over the data when --max-steps is not given (default 2)")
    p.add_argument("--seq-len", type=int, help="packed row length (default: the model's context)")
    p.add_argument("--no-packing", dest="packing", action="store_false", default=None,
                   help="one padded conversation per row instead of packing several")
    p.add_argument("--lora-rank", type=int, help="train a LoRA adapter of this rank (default 0: every weight)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: the update is alpha/rank·BA (16)")
    p.add_argument("--lora-targets", help="comma-separated layers: all-linear (default), qkv, proj, fc, lm_head …")
    p.add_argument("--lora-quantize", choices=["int8"], help="keep the frozen base in int8 (QLoRA-style; torchao)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: ddp (default) or fsdp")
    p.add_argument("--max-time", help="stop cleanly with a checkpoint after this long: seconds, 90m, 2h")
    add_training_flags(p, "sft")

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a plain model artifact")
    p.add_argument("--model", type=Path, required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", type=Path, required=True, help="adapter directory (from `sft --lora-rank`)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("grpo", help="reinforcement learning from rule-based rewards (GRPO) on a verifiable task",
                       description="Sample --group-size completions per prompt of a task with checkable answers "
                                   "(arithmetic, countdown), reward each by rules (correct answer, R1 "
                                   "<think>…</think><answer>…</answer> format), and update the policy with the "
                                   "clipped group-relative objective; held-out accuracy is measured before and "
                                   "after. --batch-size is prompts per step; --max-steps counts batches.")
    p.add_argument("--model", type=Path, required=True, help="chat model artifact to train (e.g. from `sft`)")
    p.add_argument("--task", help="arithmetic (default), countdown, or a task registered with @register_task")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="a task setting, repeatable: digits=3, mul_digits=2, ops=+-, count=4, max_number=50 …")
    p.add_argument("--reward-weights", help="weight of each reward component (default correct=1,format=0.2)")
    p.add_argument("--group-size", type=int, help="completions per prompt, G (default 8)")
    p.add_argument("--beta", type=float, help="KL weight to the frozen starting model (default 0: none loaded)")
    p.add_argument("--epsilon", type=float, help="clip range of the importance ratio (default 0.2)")
    p.add_argument("--epsilon-high", type=float, help="upper clip range (DAPO clip-higher; default = --epsilon)")
    p.add_argument("--iterations", type=int, help="optimizer updates per generated batch, μ (default 1)")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo", "dapo"], help="token averaging (default grpo)")
    p.add_argument("--scale-rewards", choices=["group", "batch", "none"],
                   help="divide advantages by the group's or batch's reward std, or not (default: group; none "
                        "for dr_grpo)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per completion, at most (default 64)")
    p.add_argument("--temperature", type=float, help="sampling temperature of the rollouts (default 1.0)")
    p.add_argument("--eval-problems", type=int, help="held-out problems scored before and after (default 100)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    add_training_flags(p, "grpo")

    p = sub.add_parser("label", help="label preferences in a web app (two responses per prompt), or export them",
                       description="Sample two responses per prompt from --model into a SQLite database and serve "
                                   "a labelling page where annotators (tokens from --annotators) choose A, B, tie "
                                   "or skip; /stats shows progress and agreement. --simulate N lets N rule-based "
                                   "simulated annotators label every item through the same HTTP API, then exits. "
                                   "`nanoforge label export --db DB --out prefs.jsonl` writes TRL preference pairs.")
    p.add_argument("action", nargs="?", choices=["export"], help="export: write the judgements as TRL JSONL")
    p.add_argument("--db", type=Path, required=True, help="the labelling database (SQLite, created if missing)")
    p.add_argument("--model", type=Path, help="model artifact to sample the responses from")
    p.add_argument("--prompts", type=Path, help="prompts: JSONL ({prompt|messages, reference?}) or one per line")
    p.add_argument("--annotators", type=Path, help="`name token` per line, or JSON {name: token}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100; 0 = a free one)")
    p.add_argument("--simulate", type=int, metavar="N", help="N simulated annotators label every item, then exit")
    p.add_argument("--out", type=Path, help="export: the preference file to write")
    p.add_argument("--who", choices=["all", "human", "simulated"], default="all",
                   help="export: whose judgements count (default all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="sampling settings, e.g. temperatures=0.7,1.1 max_new_tokens=64 max_prompts=300")

    p = sub.add_parser("reward", help="train a reward model (trunk + scalar head) on preference pairs",
                       description="Bradley–Terry training of the model's trunk with a scalar head on TRL "
                                   "preference pairs (JSONL prompt/chosen/rejected); reports held-out accuracy. "
                                   "Under torchrun the ranks share each step's pairs (--batch-size a multiple of "
                                   "the ranks) and take the steps of one process.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (the SFT model)")
    p.add_argument("--prefs", type=Path, required=True, help="preference pairs (from `nanoforge label export`)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    add_training_flags(p, "reward")

    p = sub.add_parser("dpo", help="Direct Preference Optimization of a model on preference pairs",
                       description="DPO against a frozen copy of --model (reference log-probabilities precomputed "
                                   "unless --set precompute_ref=false); logs implicit reward margins and accuracies. "
                                   "Under torchrun the ranks share each step's pairs (--batch-size a multiple of "
                                   "the ranks) and take the steps of one process.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (also the reference)")
    p.add_argument("--prefs", type=Path, required=True, help="preference pairs (from `nanoforge label export`)")
    p.add_argument("--beta", type=float, help="strength of the KL constraint to the reference (default 0.1)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    add_training_flags(p, "dpo")

    p = sub.add_parser("ppo", help="PPO against a reward model (value head, KL penalty, GAE, clipping)",
                       description="Sample responses to --prompts, score them with --reward-model, penalise the KL to "
                                   "the starting model per token, and update policy and value head with PPO. Under "
                                   "torchrun the ranks share each step's prompts (--batch-size a multiple of the "
                                   "ranks) and take the same averaged updates.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (also the reference)")
    p.add_argument("--reward-model", type=Path, required=True, help="reward model (from `nanoforge reward`)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts, in the formats of `nanoforge label`")
    p.add_argument("--kl-coef", type=float, help="per-token KL penalty coefficient (default 0.05)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    add_training_flags(p, "ppo")


def cmd_instruct(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.post.instruct import InstructConfig, make_instruct

    values = {**parse_sets(args.set), **given_flags(args, ["seed"])}
    f = make_instruct(build(InstructConfig, values, "instruct"), args.docs, args.out)["figures"]
    print(f"{f['train']} training and {f['val']} held-out conversations written to {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in f['train_by_subset'].items())})")


def cmd_sft(args: argparse.Namespace) -> None:
    import os
    import signal

    from nanoforge.config import build, parse_sets
    from nanoforge.post.sft import SFTConfig, sft
    from nanoforge.train.faults import TrainingStopped

    values: dict[str, Any] = config_file_values(args.config, "sft") if args.config else {}
    values.update(parse_sets(args.set))
    values.update(given_flags(args, ["epochs", "seq_len", "packing", "lora_rank", "lora_alpha", "lora_targets",
                                    "lora_quantize", "dtype", "device", "threads", "parallel", "max_time",
                                    "max_steps", "lr", "batch_size", "seed"]))
    cfg = build(SFTConfig, values, "sft")
    files = [Path(f) for f in args.data.split(",") if f]
    val = [Path(f) for f in (args.val or "").split(",") if f]
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        m = sft(cfg, args.model, files, args.out, val=val, resume=args.resume)
    except TrainingStopped as e:
        if main_rank:
            print(e, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM if e.reason == "SIGTERM" else 0) from None
    if main_rank:
        what = "adapter" if cfg.lora_rank > 0 else "model"
        f = m["figures"]
        scores = ""
        if f.get("answers") and f.get("base_answers"):
            scores = (f"; held-out answers: token F1 {f['base_answers']['f1']:.3f} (base) → {f['answers']['f1']:.3f}, "
                      f"exact match {f['base_answers']['exact_match']:.3f} → {f['answers']['exact_match']:.3f}")
        print(f"{what} written to {args.out}{scores}")


def cmd_merge(args: argparse.Namespace) -> None:
    from nanoforge.post.lora import merge

    f = merge(args.model, args.adapter, args.out)["figures"]
    print(f"{f['adapted_layers']} adapted layers (rank {f['rank']}) merged; model written to {args.out}")


def cmd_grpo(args: argparse.Namespace) -> None:
    import os

    from nanoforge.config import build, parse_sets
    from nanoforge.post.grpo import GRPOConfig, grpo
    from nanoforge.post.rewards import RewardWeights

    # task_options and reward_weights: the config's own tables, at the top level of the file
    values: dict[str, Any] = config_file_values(args.config, "grpo", ("task_options", "reward_weights")) \
        if args.config else {}
    values.update(parse_sets(args.set))
    values.update(given_flags(args, ["task", "reward_weights", "group_size", "beta", "epsilon", "epsilon_high",
                                    "iterations", "loss_type", "scale_rewards", "max_new_tokens", "temperature",
                                    "eval_problems", "dtype", "device", "threads", "max_steps", "lr", "batch_size",
                                    "seed"]))
    if isinstance(values.get("reward_weights"), str):
        values["reward_weights"] = RewardWeights.parse(values["reward_weights"]).weights
    if args.task_option:
        values["task_options"] = {**values.get("task_options", {}), **parse_sets(args.task_option)}
    m = grpo(build(GRPOConfig, values, "grpo"), args.model, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        f = m["figures"]
        print(f"model written to {args.out}; held-out accuracy {f['heldout_accuracy_before']} → "
              f"{f['heldout_accuracy_after']} ({f['heldout_problems']} problems)")


def _post_config(args: argparse.Namespace, cls: type, section: str, names: list[str]) -> Any:
    """A post-training stage's config from --config (its [section] table), --set and the flags given."""
    from nanoforge.config import build, parse_sets

    values: dict[str, Any] = config_file_values(args.config, section) if args.config else {}
    values.update(parse_sets(args.set))
    values.update(given_flags(args, [*names, "device", "threads", "max_steps", "lr", "batch_size", "seed"]))
    return build(cls, values, section)


def cmd_label(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.feedback.export import export_preferences
    from nanoforge.feedback.label import LabelConfig, add_annotators, fill, run_simulated, serve_labels

    if args.action == "export":
        if args.out is None:
            raise NanoforgeError("label export: give --out FILE (the preference JSONL to write)")
        c = export_preferences(args.db, args.out, args.who)
        print(f"{c['pairs']} preference pairs written to {args.out} ({c['items_voted']} items voted on, "
              f"{c['dropped_even']} dropped as even)")
        return
    values = {**parse_sets(args.set), **given_flags(args, ["seed"])}
    if args.simulate is not None:
        values["simulated_annotators"] = args.simulate
    cfg = build(LabelConfig, values, "label")
    if (args.model is None) != (args.prompts is None):
        raise NanoforgeError("label: give both --model and --prompts (to sample pairs), or neither (to serve the db)")
    if args.model is not None:
        fill(cfg, args.db, args.model, args.prompts)
    elif not args.db.is_file():
        raise NanoforgeError(f"{args.db}: no such database; give --model and --prompts to create it")
    if args.simulate is not None:
        f = run_simulated(args.db, cfg, args.host, 0)
        print(f"{f['judgements']} simulated judgements stored in {args.db}")
        return
    token = add_annotators(args.db, args.annotators)
    if token is not None:
        print(f"annotator `annotator` created; its token (shown once): {token}", flush=True)
    serve_labels(args.db, args.host, args.port, seed=cfg.seed)


def cmd_reward(args: argparse.Namespace) -> None:
    from nanoforge.post.reward import RewardConfig, train_reward

    m = train_reward(_post_config(args, RewardConfig, "reward", []), args.model, args.prefs, args.out,
                     resume=args.resume)
    if m is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    acc = m["figures"].get("val_accuracy")
    print(f"reward model written to {args.out}" + (f"; held-out accuracy {100 * acc:.1f}%" if acc is not None else ""))


def cmd_dpo(args: argparse.Namespace) -> None:
    from nanoforge.post.dpo import DPOConfig, train_dpo

    m = train_dpo(_post_config(args, DPOConfig, "dpo", ["beta"]), args.model, args.prefs, args.out,
                  resume=args.resume)
    if m is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    f = m["figures"]
    margin = f.get("val_rewards_margin", f.get("rewards_margin"))
    print(f"model written to {args.out}" + (f"; reward margin {margin:.3g}" if margin is not None else ""))


def cmd_ppo(args: argparse.Namespace) -> None:
    from nanoforge.post.ppo import PPOConfig, train_ppo

    m = train_ppo(_post_config(args, PPOConfig, "ppo", ["kl_coef"]), args.model, args.reward_model, args.prompts,
                  args.out, resume=args.resume)
    if m is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    f = m["figures"]
    print(f"model written to {args.out}; reward {f['score_first']:.3g} → {f['score_last']:.3g} during training")


POST_TRAINING_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "instruct": cmd_instruct, "sft": cmd_sft, "merge": cmd_merge, "grpo": cmd_grpo, "label": cmd_label,
    "reward": cmd_reward, "dpo": cmd_dpo, "ppo": cmd_ppo,
}
