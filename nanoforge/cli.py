"""The one entry point, `nanoforge <stage> …`: each subcommand parses its flags and calls one stage.

    nanoforge demo                                   # the whole path on the built-in config
    nanoforge site --out site/                       # the embedded web site (stdlib docs as HTML)
    nanoforge crawl http://127.0.0.1:8000/ --out crawl/   # WARC files (`nanoforge site --serve site/`)
    nanoforge extract crawl/ --out docs/             # main text → Parquet documents
    nanoforge clean docs/ --out clean/               # filters, PII, dedup; report.json of every removal
    nanoforge stats docs/ --tokenizer tok/           # corpus size, bytes/token, 30T-token projection
    nanoforge tokenizer train docs/ --vocab-size 4096 --out tok/
    nanoforge tokenize docs/ --tokenizer tok/ --out tokens/
    nanoforge pretrain --data tokens/ --out model/ --preset cpu-tiny
    nanoforge instruct --docs clean/ --out instruct/  # chat JSONL made from the docs (+ identity, arithmetic)
    nanoforge sft --model model/ --data instruct/train.jsonl --val instruct/val.jsonl --out chat/
    nanoforge sft --model model/ --data … --out adapter/ --lora-rank 8   # LoRA: the adapter alone
    nanoforge merge --model model/ --adapter adapter/ --out chat/        # the adapter folded into a plain model
    nanoforge sample --model model/ --prompt "Return the"
    nanoforge chat --model model/                    # talk in the terminal (streams tokens)
    nanoforge serve --model model/ --port 8000       # OpenAI-compatible API + web chat on 127.0.0.1
    nanoforge export --model model/ --format hf --out hf/   # a transformers checkpoint + tokenizer
    nanoforge import --from hf/ --out model/         # a Llama/Qwen3/GPT-2 transformers checkpoint → ours
    nanoforge run my-run.toml                        # stages in order, skipping what is done
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nanoforge import __version__
from nanoforge.errors import NanoforgeError


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags every training stage shares, with the same meaning everywhere (DESIGN.md §4)."""
    g = p.add_argument_group("training (common to every stage that trains)")
    g.add_argument("--out", type=Path, required=True, help="output directory (the model artifact)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run (default: from the preset)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: derived from width)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch on each rank")
    g.add_argument("--seed", type=int, help="seed for initialisation and data order (default 0)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--config", type=Path, help="TOML file with settings (a [pretrain] table or top-level keys)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any setting, repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoforge",
        description="Train a large language model step by step: crawl → extract → clean → stats → tokenizer → "
                    "token shards → pretraining → sampling. Every stage reads and writes artifacts in standard "
                    "formats.",
        epilog="Run `nanoforge demo` to see the whole path on a laptop CPU.")
    parser.add_argument("--version", action="version", version=f"nanoforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the built-in pipeline end to end on the embedded corpus",
                       description="Serve the embedded docs site on 127.0.0.1, crawl it, extract it, train a "
                                   "tokenizer, measure the corpus, tokenize, pretrain the cpu-tiny GPT and print "
                                   "samples. A rerun skips finished stages; a killed one resumes.")
    p.add_argument("--preset", help="model/training preset (see `nanoforge presets`)")
    p.add_argument("--root", default=None, help="directory holding runs (default runs/)")
    p.add_argument("--name", default=None, help="run name (default demo)")
    p.add_argument("--max-steps", type=int, help="pretraining steps")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("run", help="run the stages of a TOML run config in order, skipping finished ones")
    p.add_argument("config", type=Path, help="run config (see nanoforge/configs/demo.toml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("site", help="build (or --serve) the embedded web site: the stdlib docs as HTML pages")
    p.add_argument("--out", type=Path, help="directory to write the static site into")
    p.add_argument("--serve", type=Path, metavar="DIR", help="serve a built site on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="port for --serve (default: a free one)")
    p.add_argument("--modules", help="comma-separated module names (default: the whole stdlib)")
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("crawl", help="crawl web pages politely into WARC files",
                       description="An asynchronous crawler that obeys robots.txt, stays in the allowed domains, "
                                   "rate-limits per host and records every exchange as WARC 1.1 (gzip per record). "
                                   "Run the same command again to resume a stopped crawl.")
    p.add_argument("urls", nargs="+", metavar="URL", help="seed URLs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-pages", type=int)
    p.add_argument("--max-depth", type=int)
    p.add_argument("--allow-domain", action="append", dest="allow_domains", metavar="DOMAIN",
                   help="stay within these hosts and their subdomains (default: the seeds' hosts)")
    p.add_argument("--delay", type=float, help="seconds between requests to one host (robots Crawl-delay wins)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--user-agent")
    p.add_argument("--sitemaps", action="store_true", default=None, help="also start from the sites' sitemaps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = sub.add_parser("extract", help="extract the main text of WARC/WET/HTML/JSONL/Parquet into documents",
                       description="Read WARC and WARC.gz (ours and Common Crawl's), WET, folders of HTML files, "
                                   "JSONL and Parquet; extract the main text of HTML pages; write Parquet "
                                   "document shards. Bad records are counted by reason and skipped.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extractor", choices=["resiliparse", "trafilatura"])
    p.add_argument("--workers", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = sub.add_parser("clean", help="filter, redact and deduplicate documents, with a report of every removal",
                       description="A chain of curation steps (language, Gopher quality and repetition, C4, FineWeb, "
                                   "harmful content, PII redaction, exact and MinHash near-duplicate removal). "
                                   "Writes clean shards, the removed documents with their reason, and report.json.")
    p.add_argument("docs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, help="TOML with a [clean] table: steps = [...], [clean.options.STEP]")
    p.add_argument("--steps", help="comma-separated steps, in order (overrides the config)")
    p.add_argument("--workers", type=int, help="parallel shard tasks (default: one per core)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where shard tasks run: a local process pool, or Ray (pip install 'nanoforge[ray]'); "
                        "a killed run started again resumes at the first unfinished shard")
    p.add_argument("--ray-address", help="a running Ray cluster (default: $RAY_ADDRESS, else a local Ray); "
                                         "input and output must be on a filesystem every node sees")

    p = sub.add_parser("stats", help="measure a corpus (documents, bytes, words, tokens) and project its size",
                       description="Count documents, bytes, words and tokens (with --tokenizer, else estimated at 4 "
                                   "bytes/token), measure bytes/token, and project --target-tokens to terabytes.")
    p.add_argument("docs", type=Path)
    p.add_argument("--tokenizer", type=Path, help="count tokens with this tokenizer (default: estimate)")
    p.add_argument("--target-tokens", type=float, default=30e12, help="token budget to project (default 30e12)")
    p.add_argument("--out", type=Path, help="write stats.json and a manifest here")

    p = sub.add_parser("corpus", help="write the stdlib docs (pydoc plain text) directly as documents, no crawl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--modules", help="comma-separated module names (default: the whole stdlib)")
    p.add_argument("--max-modules", type=int)
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("tokenizer", help="tokenizer commands")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a tokenizer (byte-level BPE by default) on documents",
                        description="Train a tokenizer with HF tokenizers. DOCS is a directory or file of "
                                    "Parquet shards, JSONL (text field) or .txt files.")
    t.add_argument("docs", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--kind", default="bpe", choices=["bpe", "unigram", "word", "char"],
                   help="bpe: byte-level BPE (default); unigram; word: whole words; char: characters")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = sub.add_parser("tokenize", help="encode documents into flat token shards with a train/val split")
    p.add_argument("docs", type=Path)
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with tokenizer.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--workers", type=int, help="encoding processes (default: all cores)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = sub.add_parser("pretrain", help="pretrain a GPT on token shards",
                       description="Pretrain a GPT (GPT-2 or Llama flavour) on token shards. Model shape and "
                                   "optimisation come from --preset and the --depth dial; every setting can "
                                   "be overridden with --config/--set.")
    p.add_argument("--data", type=Path, required=True, help="token-shard directory (from `tokenize`)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the one the shards used)")
    p.add_argument("--init", help="continue pretraining from this model artifact (domain adaptation): its "
                                  "weights and shape, a fresh optimizer and schedule")
    p.add_argument("--preset", help="cpu-tiny (default), cpu-small, gpt2-124m, llama-1b")
    p.add_argument("--depth", type=int, help="the scaling dial: transformer blocks (rescales width, lr)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA, off on CPU)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate the model on every rank (ddp, default) or shard it (fsdp)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward: less memory, ~30%% more compute")
    p.add_argument("--max-time", help="stop cleanly with a checkpoint after this long: seconds, 90m, 2h")
    p.add_argument("--profile", action="store_true", default=None,
                   help="write a torch profiler trace of a few steps into OUT/profile/")
    _add_training_flags(p)

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
    _add_training_flags(p)

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
    _add_training_flags(p)

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
                                   "preference pairs (JSONL prompt/chosen/rejected); reports held-out accuracy.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (the SFT model)")
    p.add_argument("--prefs", type=Path, required=True, help="preference pairs (from `nanoforge label export`)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    _add_training_flags(p)

    p = sub.add_parser("dpo", help="Direct Preference Optimization of a model on preference pairs",
                       description="DPO against a frozen copy of --model (reference log-probabilities precomputed "
                                   "unless --set precompute_ref=false); logs implicit reward margins and accuracies.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (also the reference)")
    p.add_argument("--prefs", type=Path, required=True, help="preference pairs (from `nanoforge label export`)")
    p.add_argument("--beta", type=float, help="strength of the KL constraint to the reference (default 0.1)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    _add_training_flags(p)

    p = sub.add_parser("ppo", help="PPO against a reward model (value head, KL penalty, GAE, clipping)",
                       description="Sample responses to --prompts, score them with --reward-model, penalise the KL to "
                                   "the starting model per token, and update policy and value head with PPO.")
    p.add_argument("--model", type=Path, required=True, help="model artifact to start from (also the reference)")
    p.add_argument("--reward-model", type=Path, required=True, help="reward model (from `nanoforge reward`)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts, in the formats of `nanoforge label`")
    p.add_argument("--kl-coef", type=float, help="per-token KL penalty coefficient (default 0.05)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    _add_training_flags(p)

    p = sub.add_parser("sample", help="continue a prompt with a trained model (KV-cache generation)")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("chat", help="talk with a model in the terminal (chat template, streamed tokens)",
                       description="A multi-turn chat: each reply streams as it is generated. /reset starts over, "
                                   "/exit or Ctrl-D leaves, Ctrl-C stops a reply. The oldest turns are dropped "
                                   "when the conversation outgrows the model's context.")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--system", help="system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply, at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0, help="reply i is sampled with seed + i")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")

    p = sub.add_parser("serve", help="serve a model: OpenAI-compatible HTTP API and a web chat page",
                       description="/v1/chat/completions and /v1/completions (streaming by Server-Sent Events "
                                   "or not), /v1/models, /health, and a web chat at /. Requests are queued and "
                                   "answered one at a time.")
    p.add_argument("--model", type=Path, required=True, help="model directory (its name is the model id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: $NANOFORGE_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")

    p = sub.add_parser("export", help="write a model as a transformers checkpoint (with its tokenizer)",
                       description="Write the model artifact as a Hugging Face transformers checkpoint that "
                                   "AutoModelForCausalLM/AutoTokenizer load: LlamaForCausalLM (Qwen3ForCausalLM "
                                   "with qk_norm) or GPT2LMHeadModel, safetensors weights, a chat template.")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: transformers (the only format)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as stored)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model directory)")

    p = sub.add_parser("import", help="read a transformers checkpoint (Llama, Mistral, Qwen3, GPT-2) as a model",
                       description="Read a Hugging Face transformers checkpoint directory (config.json + "
                                   "safetensors, sharded or not; pickled .bin weights are refused) into a "
                                   "nanoforge model artifact for sampling and fine-tuning.")
    p.add_argument("--from", dest="src", type=Path, required=True, metavar="DIR",
                   help="transformers checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")

    p = sub.add_parser("eval", help="score models of any stage on the same tasks (bpb, doc QA, identity, "
                                    "arithmetic, reward win rate)",
                       description="Each task whose input is given runs on every --model; prints a table and "
                                   "writes eval.json (+ manifest) to --out. See nanoforge/eval/evaluate.py.")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="a model directory, repeatable; NAME defaults to the directory's name")
    p.add_argument("--tasks", help="comma-separated, from bpb,doc_qa,identity,arithmetic,reward (default: all)")
    p.add_argument("--tokens", type=Path, help="token shards (bpb on their val split)")
    p.add_argument("--instruct", type=Path, help="instruction data from `nanoforge instruct` (its val.jsonl)")
    p.add_argument("--reward-model", type=Path, help="reward model for the win rate")
    p.add_argument("--reference", type=Path, help="the model the win rate is against (e.g. the SFT model)")
    p.add_argument("--max-examples", type=int, help="per chat task (default 200)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("report", help="one HTML page (and a Markdown twin) of everything a run did",
                       description="Reads every stage's manifest.json and metrics.jsonl under RUN_DIR: the corpus "
                                   "funnel, size projection, tokenizer, training curves, throughput and MFU, the "
                                   "eval table and samples, the environment. Plots are embedded in the HTML.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="where to write it (default: RUN_DIR/report)")

    sub.add_parser("presets", help="list the model/training presets and their sizes")
    return parser


def _overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Flags the user actually gave (argparse leaves the others None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_pretrain(args: argparse.Namespace) -> None:
    import os
    import signal

    from nanoforge.config import PretrainConfig, build, load_toml, parse_sets
    from nanoforge.train.faults import TrainingStopped
    from nanoforge.train.loop import pretrain

    values: dict[str, Any] = {}
    if args.config:
        raw = load_toml(args.config)
        values.update(raw.get("pretrain", {k: v for k, v in raw.items() if not isinstance(v, dict)}))
    values.update(parse_sets(args.set))
    values.update(_overrides(args, ["init", "preset", "depth", "dtype", "compile", "device", "threads", "parallel",
                                    "activation_checkpointing", "max_time", "profile",
                                    "max_steps", "lr", "batch_size", "seed"]))
    cfg = build(PretrainConfig, values, "pretrain")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one rank speaks
    try:
        pretrain(cfg, args.data, args.out, resume=args.resume, tokenizer=args.tokenizer)
    except TrainingStopped as e:  # a checkpoint is written: SIGTERM exits as killed by it, max_time cleanly
        if main_rank:
            print(e, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM if e.reason == "SIGTERM" else 0) from None
    if main_rank:
        print(f"model written to {args.out}")


def cmd_instruct(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.post.instruct import InstructConfig, make_instruct

    values = {**parse_sets(args.set), **_overrides(args, ["seed"])}
    f = make_instruct(build(InstructConfig, values, "instruct"), args.docs, args.out)["figures"]
    print(f"{f['train']} training and {f['val']} held-out conversations written to {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in f['train_by_subset'].items())})")


def cmd_sft(args: argparse.Namespace) -> None:
    import os
    import signal

    from nanoforge.config import build, load_toml, parse_sets
    from nanoforge.post.sft import SFTConfig, sft
    from nanoforge.train.faults import TrainingStopped

    values: dict[str, Any] = {}
    if args.config:
        raw = load_toml(args.config)
        values.update(raw.get("sft", {k: v for k, v in raw.items() if not isinstance(v, dict)}))
    values.update(parse_sets(args.set))
    values.update(_overrides(args, ["epochs", "seq_len", "packing", "lora_rank", "lora_alpha", "lora_targets",
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

    from nanoforge.config import build, load_toml, parse_sets
    from nanoforge.post.grpo import GRPOConfig, grpo
    from nanoforge.post.rewards import RewardWeights

    values: dict[str, Any] = {}
    if args.config:
        raw = load_toml(args.config)
        tables = ("task_options", "reward_weights")  # the config's own tables, at the top level of the file
        values.update(raw.get("grpo", {k: v for k, v in raw.items() if not isinstance(v, dict) or k in tables}))
    values.update(parse_sets(args.set))
    values.update(_overrides(args, ["task", "reward_weights", "group_size", "beta", "epsilon", "epsilon_high",
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
    from nanoforge.config import build, load_toml, parse_sets

    values: dict[str, Any] = {}
    if args.config:
        raw = load_toml(args.config)
        values.update(raw.get(section, {k: v for k, v in raw.items() if not isinstance(v, dict)}))
    values.update(parse_sets(args.set))
    values.update(_overrides(args, [*names, "device", "threads", "max_steps", "lr", "batch_size", "seed"]))
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
    values = {**parse_sets(args.set), **_overrides(args, ["seed"])}
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

    f = train_reward(_post_config(args, RewardConfig, "reward", []), args.model, args.prefs, args.out,
                     resume=args.resume)["figures"]
    acc = f.get("val_accuracy")
    print(f"reward model written to {args.out}" + (f"; held-out accuracy {100 * acc:.1f}%" if acc is not None else ""))


def cmd_dpo(args: argparse.Namespace) -> None:
    from nanoforge.post.dpo import DPOConfig, train_dpo

    f = train_dpo(_post_config(args, DPOConfig, "dpo", ["beta"]), args.model, args.prefs, args.out,
                  resume=args.resume)["figures"]
    margin = f.get("val_rewards_margin", f.get("rewards_margin"))
    print(f"model written to {args.out}" + (f"; reward margin {margin:.3g}" if margin is not None else ""))


def cmd_ppo(args: argparse.Namespace) -> None:
    from nanoforge.post.ppo import PPOConfig, train_ppo

    f = train_ppo(_post_config(args, PPOConfig, "ppo", ["kl_coef"]), args.model, args.reward_model, args.prompts,
                  args.out, resume=args.resume)["figures"]
    print(f"model written to {args.out}; reward {f['score_first']:.3g} → {f['score_last']:.3g} during training")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.tokenizer import TokenizerConfig, train_tokenizer

    values = {**parse_sets(args.set), "kind": args.kind, "vocab_size": args.vocab_size, "seed": args.seed}
    m = train_tokenizer(build(TokenizerConfig, values, "tokenizer"), args.docs, args.out)
    f = m["figures"]
    print(f"tokenizer ({f.get('kind')}, vocab {f.get('vocab_size')}) written to {args.out}; "
          f"held-out bytes/token {f.get('bytes_per_token', float('nan')):.3f}")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.tokens import TokenizeConfig, tokenize

    values = {**parse_sets(args.set), **_overrides(args, ["val_fraction", "workers", "seed"])}
    m = tokenize(build(TokenizeConfig, values, "tokenize"), args.docs, args.tokenizer, args.out)
    f = m["figures"]
    print(f"{f.get('documents')} documents → {f.get('tokens')} tokens in {args.out}")


def cmd_sample(args: argparse.Namespace) -> None:
    from nanoforge.infer.sample import SampleConfig, sample

    cfg = SampleConfig(prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed)
    for i, text in enumerate(sample(cfg, args.model, device=args.device)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)


def cmd_chat(args: argparse.Namespace) -> None:
    from nanoforge.infer.chat import ChatConfig, ChatModel, chat

    cfg = ChatConfig(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    chat(ChatModel.load(args.model, args.device), cfg)


def cmd_serve(args: argparse.Namespace) -> None:
    from nanoforge.infer.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device,
          max_pending=args.max_queue)


def cmd_export(args: argparse.Namespace) -> None:
    from nanoforge.hf import ExportConfig, export_hf

    f = export_hf(ExportConfig(format=args.format, dtype=args.dtype), args.model, args.out, args.tokenizer)["figures"]
    print(f"{f['architecture']} ({f['parameters'] / 1e6:.1f}M parameters, {f['dtype']}) written to {args.out}")


def cmd_import(args: argparse.Namespace) -> None:
    from nanoforge.hf import import_hf

    f = import_hf(args.src, args.out)["figures"]
    print(f"{f['model_type']} model ({f['flavour']} flavour, {f['parameters'] / 1e6:.1f}M parameters) "
          f"written to {args.out}")
    if not f["nanoforge_tokenizer"]:
        print("note: its tokenizer is not a nanoforge tokenizer (special tokens at ids 0..8), so `sample`, "
              "`chat` and fine-tuning need one", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from nanoforge.eval.evaluate import EvalConfig, EvalInputs, eval_table, run_eval

    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        models[name if sep else Path(spec).name] = Path(path if sep else spec)
    cfg = EvalConfig()
    if args.tasks:
        cfg.tasks = [t for t in args.tasks.split(",") if t]
    if args.max_examples:
        cfg.max_examples = args.max_examples
    run_eval(cfg, models, EvalInputs(args.tokens, args.instruct, args.reward_model, args.reference), args.out)
    print(eval_table(json.loads((args.out / "eval.json").read_text())))


def cmd_report(args: argparse.Namespace) -> None:
    from nanoforge.eval.report import ReportConfig, report

    out = args.out or args.run_dir / "report"
    report(ReportConfig(), args.run_dir, out)
    print(f"report written to {out / 'index.html'} (and {out / 'report.md'})")


def cmd_site(args: argparse.Namespace) -> None:
    from nanoforge.data.docsite import build_site, serve_site
    from nanoforge.data.pydoc_corpus import CorpusConfig

    if args.serve:
        with serve_site(args.serve, port=args.port) as url:
            print(f"serving {args.serve} at {url} (Ctrl-C to stop)", flush=True)
            import threading

            threading.Event().wait()
    if not args.out:
        raise NanoforgeError("site: give --out DIR to build a site or --serve DIR to serve one")
    cfg = CorpusConfig(modules=[m for m in (args.modules or "").split(",") if m], workers=args.workers)
    f = build_site(cfg, args.out)["figures"]
    print(f"{f['pages']} pages ({f['bytes'] / 1e6:.1f} MB) written to {args.out}")


def cmd_crawl(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.data.crawl import CrawlConfig, crawl

    values = {**parse_sets(args.set), "seeds": args.urls,
              **_overrides(args, ["max_pages", "max_depth", "allow_domains", "delay", "concurrency",
                                  "user_agent", "sitemaps"])}
    f = crawl(build(CrawlConfig, values, "crawl"), args.out)["figures"]
    print(f"crawl written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in f.items() if not isinstance(v, dict)))


def cmd_extract(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.data.extract import ExtractConfig, extract

    values = {**parse_sets(args.set), **_overrides(args, ["extractor", "workers"])}
    f = extract(build(ExtractConfig, values, "extract"), args.inputs, args.out)["figures"]
    print(f"documents written to {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in f.items() if not isinstance(v, dict)))


def cmd_clean(args: argparse.Namespace) -> None:
    import json

    from nanoforge.config import build, load_toml
    from nanoforge.data.clean import CleanConfig, clean, report_table

    values: dict[str, Any] = dict(load_toml(args.config).get("clean", {})) if args.config else {}
    if args.steps:
        values["steps"] = [s for s in args.steps.split(",") if s]
    if args.workers is not None:
        values["workers"] = args.workers
    clean(build(CleanConfig, values, "clean"), args.docs, args.out, executor=args.executor,
          address=args.ray_address)
    print(report_table(json.loads((args.out / "report.json").read_text())))


def cmd_stats(args: argparse.Namespace) -> None:
    import tempfile

    from nanoforge.data.stats import StatsConfig, corpus_stats, stats_table

    cfg = StatsConfig(target_tokens=args.target_tokens)
    if args.out:
        stats = corpus_stats(cfg, args.docs, args.out, args.tokenizer)["figures"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            stats = corpus_stats(cfg, args.docs, Path(tmp) / "stats", args.tokenizer)["figures"]
    print(stats_table(stats))


def cmd_corpus(args: argparse.Namespace) -> None:
    from nanoforge.data.pydoc_corpus import CorpusConfig, build_corpus

    cfg = CorpusConfig(modules=[m for m in (args.modules or "").split(",") if m],
                       max_modules=args.max_modules, workers=args.workers)
    f = build_corpus(cfg, args.out)["figures"]
    print(f"{f['documents']} documents ({f['bytes'] / 1e6:.1f} MB) written to {args.out}")


def cmd_run(args: argparse.Namespace, *, demo: bool = False) -> None:
    from nanoforge.config import parse_sets
    from nanoforge.pipeline import load_pipeline_config, run_pipeline, run_summary

    sets = parse_sets(args.set)
    if demo:
        for flag, key in (("preset", "pretrain.preset"), ("root", "run.root"), ("name", "run.name"),
                          ("max_steps", "pretrain.max_steps")):
            if getattr(args, flag) is not None:
                sets[key] = str(getattr(args, flag))
    p = load_pipeline_config(None if demo else args.config, sets)
    outputs = run_pipeline(p)
    print(run_summary(p, outputs))


def cmd_presets(_: argparse.Namespace) -> None:
    import torch

    from nanoforge.config import PRESETS, PretrainConfig, model_config, resolve_pretrain
    from nanoforge.model import GPT

    print(f"{'preset':<10} {'flavour':<7} {'depth':>5} {'width':>5} {'heads':>7} {'seq':>5} "
          f"{'params (vocab)':>20} {'batch tokens':>12} {'lr':>8}")
    for name in PRESETS:
        cfg = resolve_pretrain(PretrainConfig(preset=name))
        vocab = {"cpu-tiny": 4096, "cpu-small": 8192, "gpt2-124m": 50257, "llama-1b": 128256}[name]
        mcfg = model_config(cfg, vocab)
        with torch.device("meta"):
            n = GPT(mcfg).num_params()
        print(f"{name:<10} {mcfg.flavour:<7} {mcfg.n_layer:>5} {mcfg.n_embd:>5} "
              f"{mcfg.n_head:>3}/{mcfg.n_kv_head:<3} {mcfg.seq_len:>5} {n / 1e6:>10.1f}M ({vocab:>6}) "
              f"{cfg.batch_tokens:>12} {cfg.lr:>8.2e}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "pretrain": cmd_pretrain, "tokenize": cmd_tokenize, "sample": cmd_sample, "corpus": cmd_corpus,
        "run": cmd_run, "demo": lambda a: cmd_run(a, demo=True), "presets": cmd_presets,
        "tokenizer": cmd_tokenizer_train, "site": cmd_site, "crawl": cmd_crawl, "extract": cmd_extract,
        "stats": cmd_stats, "clean": cmd_clean, "chat": cmd_chat, "serve": cmd_serve,
        "report": cmd_report, "eval": cmd_eval,
        "export": cmd_export, "import": cmd_import, "instruct": cmd_instruct, "sft": cmd_sft, "merge": cmd_merge,
        "grpo": cmd_grpo,
        "label": cmd_label, "reward": cmd_reward, "dpo": cmd_dpo, "ppo": cmd_ppo,
    }
    try:
        handlers[args.command](args)
    except NanoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
