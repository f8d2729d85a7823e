"""Evaluate the model of any stage on the same tasks, so stages can be compared side by side.

    nanoforge eval --model runs/demo/08-pretrain --model runs/demo/10-sft \\
        --tokens runs/demo/07-tokens --instruct runs/demo/09-instruct \\
        --reward-model runs/demo/12-reward --reference runs/demo/10-sft --out /tmp/eval

Tasks (a task whose input is not given is left out, and the table says so):

- `bpb`: bits per byte of held-out corpus text (the tokens artifact's val split): compares across
  tokenizers and measures how well the model still models the corpus after post-training. Left out (and
  said so in `left_out`) for a model with a `word` tokenizer, whose unknown words carry no bytes.
- `doc_qa`: the documentation questions of the instruction data's held-out split (functions the SFT
  data never mentions), greedy reply vs reference: SQuAD token F1 and exact match.
- `identity`: the held-out "who are you" paraphrases, same scoring.
- `arithmetic`: the arithmetic task's held-out problems: greedy accuracy of the `<answer>` and pass@k
  (k samples at temperature `sample_temperature`, the unbiased estimator of Chen et al. 2021).
- `reward`: win rate against a reference model (e.g. the SFT model) as judged by a reward model on the
  held-out questions: P(reward(ours) > reward(reference)), ties counted as half.

The result (`eval.json`) is {"models": {name: {metric: value}}, "samples": {name: [...]},
"descriptions": {...}}; `nanoforge report` shows it as the eval table across stages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoforge.artifacts import atomic_dir, atomic_write_json, write_manifest
from nanoforge.console import info
from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import Decoder, generate
from nanoforge.model import GPT
from nanoforge.tokenizer import Tokenizer

TASKS = ("bpb", "doc_qa", "identity", "arithmetic", "reward")
DESCRIPTIONS = {
    "bpb": "bits per byte of held-out corpus text (lower is better)",
    "doc_qa_f1": "token F1 of greedy answers to held-out documentation questions",
    "doc_qa_em": "exact match of the same answers",
    "identity_f1": "token F1 of answers to held-out 'who are you' paraphrases",
    "arithmetic_acc": "greedy accuracy on held-out arithmetic problems",
    "arithmetic_pass@k": "pass@k on the same problems, k samples at the sampling temperature",
    "reward_win_rate": "reward-model win rate against the reference model (0.5 = as good)",
}


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    max_examples: int = 200  # per chat task (doc_qa, identity, reward prompts)
    arithmetic_problems: int = 100
    pass_k: int = 4
    sample_temperature: float = 0.8
    eval_batches: int = 8  # bpb: val batches of `batch_size` rows
    batch_size: int = 16
    max_new_tokens: int = 96
    samples: int = 3  # sample conversations kept per model
    seed: int = 0
    device: str = "cpu"


@dataclass
class EvalInputs:
    """What the tasks read, besides the models; a task whose input is None is left out."""

    tokens: Path | None = None
    instruct: Path | None = None  # the instruction data artifact (its val.jsonl)
    reward_model: Path | None = None
    reference: Path | None = None


def check_config(cfg: EvalConfig) -> None:
    """Refuse unknown tasks and non-positive counts (also called when a run config is read)."""
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise NanoforgeError(f"eval: unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if cfg.pass_k < 1 or cfg.max_examples < 1 or cfg.arithmetic_problems < 1:
        raise NanoforgeError("eval: pass_k, max_examples and arithmetic_problems must be positive")


def runnable(cfg: EvalConfig, inputs: EvalInputs) -> tuple[list[str], dict[str, str]]:
    """The tasks that can run, and why each of the others cannot."""
    needs = {"bpb": ("tokens",), "doc_qa": ("instruct",), "identity": ("instruct",), "arithmetic": (),
             "reward": ("instruct", "reward_model", "reference")}
    ok, missing = [], {}
    for t in cfg.tasks:
        lacking = [n for n in needs[t] if getattr(inputs, n) is None]
        if lacking:
            missing[t] = "needs --" + ", --".join(n.replace("_", "-") for n in lacking)
        else:
            ok.append(t)
    return ok, missing


def bpb_refused(model_dir: Path) -> str | None:
    """Why bits per byte cannot be measured for the model in `model_dir`, or None when it can.

    A `word` tokenizer maps every word outside its vocabulary to <|unk|>, which stands for no bytes: those
    words would drop out of both the loss and the byte count, and the figure would flatter the model by
    however much of the text is unknown words. It is left out rather than reported for the known words only,
    as it would not compare with the other models' figures in the same column."""
    try:
        tok = Tokenizer.load(model_dir)
    except NanoforgeError:
        return None  # loading the model reports a missing or damaged tokenizer
    return None if tok.bytes_exact else "its word tokenizer maps unknown words to <|unk|>, which stands for no bytes"


def bits_per_byte(model: GPT, tok: Tokenizer, tokens: Path, cfg: EvalConfig) -> float:
    from nanoforge.tokens import TokenLoader
    from nanoforge.train.loop import evaluate

    loader = TokenLoader(tokens, "val", batch_size=cfg.batch_size, seq_len=model.cfg.seq_len, seed=cfg.seed)
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64)
    token_bytes = torch.cat([token_bytes, torch.zeros(model.cfg.vocab_size - len(token_bytes), dtype=torch.int64)])
    device = next(model.parameters()).device
    return evaluate(model, loader, token_bytes.to(device), device, "fp32", cfg.eval_batches).get("val_bpb", math.nan)


def _val_chats(instruct: Path, subsets: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
    from nanoforge.post.instruct import read_chat_jsonl

    path = instruct / "val.jsonl" if instruct.is_dir() else instruct
    if not path.exists():
        raise NanoforgeError(f"{instruct}: no val.jsonl (make it with `nanoforge instruct`)")
    return [c for c in read_chat_jsonl(path) if any(str(c.get("subset", "")).startswith(s) for s in subsets)][:limit]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021). Needs n >= k: from fewer
    samples than k the estimator is undefined (it is not 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def arithmetic_scores(model: GPT, tok: Tokenizer, cfg: EvalConfig) -> dict[str, Any]:
    from nanoforge.post.tasks import get_task

    task = get_task("arithmetic")
    problems = task.heldout(cfg.arithmetic_problems)
    prompts = [tok.render_prompt([{"role": "user", "content": p.prompt}]) for p in problems]
    stop = (tok.special_id("assistant_end"), tok.bos_id)
    greedy = []
    decoder = Decoder(model)  # fixed weights over every batch and sample: the decode step is prepared once
    for i in range(0, len(prompts), cfg.batch_size):
        greedy += generate(model, prompts[i:i + cfg.batch_size], max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                           stop_tokens=stop, decoder=decoder)
    correct = [task.score(tok.decode(o), p)["correct"] for o, p in zip(greedy, problems, strict=True)]
    hits = [0] * len(problems)
    for k in range(cfg.pass_k):
        for i in range(0, len(prompts), cfg.batch_size):
            outs = generate(model, prompts[i:i + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.sample_temperature, stop_tokens=stop, seed=cfg.seed + 1000 * k + i,
                            decoder=decoder)
            for j, o in enumerate(outs):
                hits[i + j] += int(task.score(tok.decode(o), problems[i + j])["correct"] > 0)
    return {"arithmetic_acc": sum(correct) / len(correct),
            f"arithmetic_pass@{cfg.pass_k}": sum(pass_at_k(cfg.pass_k, h, cfg.pass_k) for h in hits) / len(hits),
            "sample": {"prompt": problems[0].prompt, "reply": tok.decode(greedy[0]), "reference": problems[0].answer}}


def _replies(model: GPT, tok: Tokenizer, chats: list[dict[str, Any]], cfg: EvalConfig) -> list[str]:
    prompts = [tok.render_prompt(c["messages"][:-1]) for c in chats]
    stop = (tok.special_id("assistant_end"), tok.bos_id)
    out: list[str] = []
    decoder = Decoder(model)
    for i in range(0, len(prompts), cfg.batch_size):
        out += [tok.decode(o) for o in generate(model, prompts[i:i + cfg.batch_size], temperature=0.0,
                                                max_new_tokens=cfg.max_new_tokens, stop_tokens=stop, decoder=decoder)]
    return out


def reward_win_rate(model: GPT, reference: GPT, tok: Tokenizer, reward_dir: Path, chats: list[dict[str, Any]],
                    cfg: EvalConfig) -> float:
    from nanoforge.post.reward import RewardModel

    rm = RewardModel.load(reward_dir, cfg.device)
    room = min(model.cfg.seq_len, reference.cfg.seq_len, rm.trunk.cfg.seq_len) - cfg.max_new_tokens - 1
    chats = [c for c in chats if len(tok.render_prompt(c["messages"][:-1])) <= room]  # reply and prompt must fit
    if not chats:
        raise NanoforgeError(f"eval: no held-out question leaves {cfg.max_new_tokens} tokens for the reply "
                             f"in a context of {room + cfg.max_new_tokens + 1}")
    prompts = [c["messages"][:-1] for c in chats]
    ours = rm.rewards(tok, prompts, _replies(model, tok, chats, cfg))
    theirs = rm.rewards(tok, prompts, _replies(reference, tok, chats, cfg))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)) / len(ours)


def evaluate_model(cfg: EvalConfig, model_dir: Path, inputs: EvalInputs) -> tuple[dict[str, float], list[dict]]:
    """(metrics, sample conversations) of one model artifact on the tasks that can run."""
    from nanoforge.post.instruct import evaluate_answers
    from nanoforge.train.checkpoint import load_model_artifact

    check_config(cfg)
    tasks, _ = runnable(cfg, inputs)
    model = load_model_artifact(model_dir, cfg.device)
    model.eval()
    tok = Tokenizer.load(model_dir)
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    with torch.no_grad():
        if "bpb" in tasks and tok.bytes_exact:  # else left out, as run_eval notes (`bpb_refused`)
            metrics["bpb"] = bits_per_byte(model, tok, Path(inputs.tokens), cfg)
        for task, subsets in (("doc_qa", ("doc_",)), ("identity", ("identity",))):
            if task in tasks:
                chats = _val_chats(Path(inputs.instruct), subsets, cfg.max_examples)
                if not chats:
                    raise NanoforgeError(f"{inputs.instruct}: no held-out {task} examples in val.jsonl")
                r = evaluate_answers(model, tok, chats, max_new_tokens=cfg.max_new_tokens, samples=cfg.samples)
                metrics[f"{task}_f1"], metrics[f"{task}_em"] = r["f1"], r["exact_match"]
                samples += [{"prompt": s["question"], "reply": s["reply"], "reference": s["reference"]}
                            for s in r["samples"]]
        if "arithmetic" in tasks:
            r = arithmetic_scores(model, tok, cfg)
            samples.append(r.pop("sample"))
            metrics.update(r)
        if "reward" in tasks:
            reference = load_model_artifact(inputs.reference, cfg.device)
            chats = _val_chats(Path(inputs.instruct), ("doc_", "identity"), cfg.max_examples)
            metrics["reward_win_rate"] = reward_win_rate(model, reference, tok, Path(inputs.reward_model), chats, cfg)
    return metrics, samples[: cfg.samples + 1]


def run_eval(cfg: EvalConfig, models: dict[str, Path], inputs: EvalInputs, out: Path) -> dict[str, Any]:
    """Evaluate every model of `models` (name → model dir); write `eval.json` and the manifest into `out`."""
    check_config(cfg)
    if not models:
        raise NanoforgeError("eval: no model given (--model DIR, or NAME=DIR, repeatable)")
    tasks, missing = runnable(cfg, inputs)
    for task, why in missing.items():
        info(f"eval: leaving out {task} ({why})")
    if not tasks:
        raise NanoforgeError("eval: no task can run with the inputs given (" + "; ".join(
            f"{t} {w}" for t, w in missing.items()) + ")")
    t0 = time.time()
    results, samples = {}, {}
    for name, d in models.items():
        info(f"eval: {name} ({d}) on {', '.join(tasks)}")
        why = bpb_refused(Path(d)) if "bpb" in tasks else None
        if why is not None:
            missing[f"bpb of {name}"] = why
            info(f"eval: leaving out bpb of {name} ({why})")
        results[name], samples[name] = evaluate_model(cfg, Path(d), inputs)
    data = {"models": results, "samples": samples, "tasks": tasks, "left_out": missing,
            "descriptions": DESCRIPTIONS}
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "eval.json", data)
        figures = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
        figures["seconds"] = round(time.time() - t0, 1)
        model_inputs = {f"model_{name}": Path(d) for name, d in models.items()}
        other = {k: Path(v) for k, v in vars(inputs).items() if v is not None}
        manifest = write_manifest(tmp, stage="eval", config=cfg, inputs={**model_inputs, **other}, figures=figures)
    return manifest


def eval_table(data: dict[str, Any]) -> str:
    """The eval.json models × metrics as a terminal table."""
    models = data["models"]
    metrics = sorted({k for r in models.values() for k in r})
    rows = [["model", *metrics]] + [[m, *(f"{r[k]:.3f}" if k in r else "-" for k in metrics)]
                                    for m, r in models.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines += [f"(left out {t}: {w})" for t, w in data.get("left_out", {}).items()]
    return "\n".join(lines)
