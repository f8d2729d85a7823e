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
from nanoforge.cli_post import POST_TRAINING_COMMANDS, add_post_training_parsers, config_file_values, given_flags
from nanoforge.errors import NanoforgeError


def _add_training_flags(p: argparse.ArgumentParser, table: str) -> None:
    """The flags every training stage shares, with the same meaning everywhere (DESIGN.md §4); `table` is the
    stage's table in a --config file."""
    g = p.add_argument_group("training (common to every stage that trains)")
    g.add_argument("--out", type=Path, required=True, help="output directory (the model artifact)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run (default: from the preset)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: derived from width)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch on each rank")
    g.add_argument("--seed", type=int, help="seed for initialisation and data order (default 0)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--config", type=Path, help=f"TOML file with settings: its [{table}] table, or top-level keys "
                                               f"when it has none (other tables are not read)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any setting, repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoforge",
        description="Train a large language model step by step: crawl → extract → clean → stats → tokenizer → "
                    "token shards → pretraining → SFT/LoRA → preference labelling → reward/DPO/PPO → GRPO → eval "
                    "→ report; chat, serve, export. Every stage reads and writes artifacts in standard formats.",
        epilog="Run `nanoforge demo` to see the whole path on a laptop CPU.")
    parser.add_argument("--version", action="version", version=f"nanoforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the built-in pipeline end to end on the embedded corpus",
                       description="Serve the embedded docs site on 127.0.0.1, crawl it, extract and clean it, "
                                   "measure it, train a tokenizer, tokenize, pretrain the cpu-tiny GPT, make "
                                   "instruction data, SFT, label pairs with simulated annotators, train a reward "
                                   "model, DPO, GRPO, evaluate every model and write an HTML report (about 9 "
                                   "minutes on 2 CPU cores). A rerun skips finished stages; a killed one continues "
                                   "from the last finished stage.")
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
    _add_training_flags(p, "pretrain")

    add_post_training_parsers(sub, _add_training_flags)

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
                                   "or not), /v1/models, /health, and a web chat at /. Concurrent requests are "
                                   "decoded together (continuous batching): each joins the running batch at "
                                   "the next token step.")
    p.add_argument("--model", type=Path, required=True, help="model directory (its name is the model id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: $NANOFORGE_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running at most; more get 503")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together at most (default 16; 1 = one at a time); the rest wait")
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


def cmd_pretrain(args: argparse.Namespace) -> None:
    import os
    import signal

    from nanoforge.config import PretrainConfig, build, parse_sets
    from nanoforge.train.faults import TrainingStopped
    from nanoforge.train.loop import pretrain

    values: dict[str, Any] = config_file_values(args.config, "pretrain") if args.config else {}
    values.update(parse_sets(args.set))
    values.update(given_flags(args, ["init", "preset", "depth", "dtype", "compile", "device", "threads", "parallel",
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

    values = {**parse_sets(args.set), **given_flags(args, ["val_fraction", "workers", "seed"])}
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
          max_pending=args.max_queue, max_batch=args.max_batch)


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

    models: dict[str, Path] = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        name, model = (name, Path(path)) if sep else (Path(spec).name, Path(spec))
        if name in models:  # one would silently replace the other in the table
            raise NanoforgeError(f"eval: two models are named {name!r} ({models[name]} and {model}); name them "
                                 f"with --model NAME=DIR")
        models[name] = model
    cfg = EvalConfig()
    if args.tasks:
        cfg.tasks = [t for t in args.tasks.split(",") if t]
    if args.max_examples is not None:  # 0 is refused by the eval, not taken for "the default"
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
              **given_flags(args, ["max_pages", "max_depth", "allow_domains", "delay", "concurrency",
                                  "user_agent", "sitemaps"])}
    f = crawl(build(CrawlConfig, values, "crawl"), args.out)["figures"]
    print(f"crawl written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in f.items() if not isinstance(v, dict)))


def cmd_extract(args: argparse.Namespace) -> None:
    from nanoforge.config import build, parse_sets
    from nanoforge.data.extract import ExtractConfig, extract

    values = {**parse_sets(args.set), **given_flags(args, ["extractor", "workers"])}
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
    import signal

    from nanoforge.config import parse_sets
    from nanoforge.pipeline import load_pipeline_config, run_pipeline, run_summary
    from nanoforge.train.faults import TrainingStopped

    sets = parse_sets(args.set)
    if demo:
        for flag, key in (("preset", "pretrain.preset"), ("root", "run.root"), ("name", "run.name"),
                          ("max_steps", "pretrain.max_steps")):
            if getattr(args, flag) is not None:
                sets[key] = str(getattr(args, flag))
    p = load_pipeline_config(None if demo else args.config, sets)
    try:
        outputs = run_pipeline(p)
    except TrainingStopped as e:  # a checkpoint is written: SIGTERM exits as killed by it, max_time cleanly
        again = "nanoforge demo" if demo else f"nanoforge run {args.config}"
        stage = Path(e.checkpoint).parent.parent.name  # RUN_DIR/08-pretrain/checkpoints/step-…
        print(f"{stage}: stopped by {e.reason} after step {e.step}; checkpoint {e.checkpoint}; rerun `{again}`"
              f"{' with the same options' if sets else ''} to continue", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM if e.reason == "SIGTERM" else 0) from None
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
        "export": cmd_export, "import": cmd_import, **POST_TRAINING_COMMANDS,
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
