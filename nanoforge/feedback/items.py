"""What annotators judge: prompts read from a file, and two responses per prompt sampled from the model.

    prompts = read_prompts("prompts.jsonl")
    items, counts = sample_pairs(ChatModel.load("runs/demo/09-sft"), prompts, LabelConfig())

Prompt files:

- JSONL (`*.jsonl` / `*.json`), one object per line: `{"prompt": "text"}`, `{"prompt": [messages]}` or
  `{"messages": [messages]}`, with an optional reference answer in `"reference"` (or `"answer"`, as
  `nanoforge.post.tasks.Problem` has it). In `messages`, a final assistant message is the reference and
  not part of the prompt, so an SFT file (`train.jsonl`/`val.jsonl`) is a prompt file whose answers are
  references. `write_task_prompts` writes one from a verifiable task (`nanoforge.post.tasks`).
- any other file: one prompt per non-empty line.

Both responses of a pair come from the engine's batched generation (`nanoforge.infer.engine.generate`),
response 0 at `temperatures[0]`, response 1 at `temperatures[1]`, each batch with its own seed; each
response records its sampling settings (model, temperature, top_k, top_p, max_new_tokens, the seed of its
batch and its row in it), so any response can be regenerated. A pair whose two responses are identical
carries no preference and is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from nanoforge.artifacts import atomic_write_text
from nanoforge.errors import NanoforgeError
from nanoforge.feedback.store import Item
from nanoforge.infer.chat import ChatModel
from nanoforge.infer.engine import generate
from nanoforge.post.preference import Message, as_messages

if TYPE_CHECKING:
    from nanoforge.feedback.label import LabelConfig


@dataclass
class PromptRecord:
    messages: list[Message]
    reference: str | None = None


def read_prompts(path: Path | str) -> list[PromptRecord]:
    """The prompts of a JSONL or plain-text file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise NanoforgeError(f"{path}: no such prompt file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix not in (".jsonl", ".json"):
        out = [PromptRecord([{"role": "user", "content": line.strip()}]) for line in lines if line.strip()]
    else:
        out = [_record(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise NanoforgeError(f"{path}: no prompts")
    return out


def _record(line: str, where: str) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise NanoforgeError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
        raise NanoforgeError(f"{where}: expected an object with a prompt or messages")
    reference = obj.get("reference", obj.get("answer"))
    messages = as_messages(obj["prompt"] if "prompt" in obj else obj["messages"], where)
    if messages[-1]["role"] == "assistant":
        last = messages.pop()
        reference = reference if reference is not None else last["content"]
    if not messages:
        raise NanoforgeError(f"{where}: the prompt has no message before the assistant's answer")
    if reference is not None and not isinstance(reference, (str, int, float)):
        raise NanoforgeError(f"{where}: reference must be a text or a number")
    return PromptRecord(messages, None if reference is None else str(reference))


def sample_pairs(cm: ChatModel, prompts: list[PromptRecord], cfg: LabelConfig) -> tuple[list[Item], dict[str, int]]:
    """Two responses for every prompt; returns the items and counts (prompts too long, identical pairs)."""
    fitting, too_long = [], 0
    for rec in prompts:
        ids = cm.chat_prompt(rec.messages)
        if len(ids) >= cm.seq_len:
            too_long += 1
            continue
        fitting.append((rec, ids))
    if not fitting:
        raise NanoforgeError(f"no prompt fits the model's context of {cm.seq_len} tokens")
    items, identical = [], 0
    batches = range(0, len(fitting), cfg.batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling pairs", unit="batch", dynamic_ncols=True)):
        part = fitting[start : start + cfg.batch_size]
        sides = []
        for side, temperature in enumerate(cfg.temperatures):
            seed = cfg.seed + 2 * b + side
            with torch.inference_mode():
                outs = generate(cm.model, [ids for _, ids in part], max_new_tokens=cfg.max_new_tokens,
                                temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_tokens=cm.chat_stop,
                                seed=seed, decoder=cm.decoder)
            settings = {"model": cm.name, "temperature": temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                        "max_new_tokens": cfg.max_new_tokens, "seed": seed}
            sides.append([(cm.tok.decode(o), {**settings, "row": row}) for row, o in enumerate(outs)])
        for (rec, _), (text0, s0), (text1, s1) in zip(part, sides[0], sides[1], strict=True):
            if text0 == text1:
                identical += 1
                continue
            items.append(Item(rec.messages, (text0, text1), (s0, s1), rec.reference))
    return items, {"prompts": len(prompts), "too_long": too_long, "identical": identical, "items": len(items)}


def write_task_prompts(task: str, n: int, seed: int, out: Path | str, **options: Any) -> Path:
    """A prompt file of `n` training problems of a task from `nanoforge.post.tasks` (e.g. "arithmetic"), each
    with its reference answer: prompts on which the simulated judge's first rule (the correct answer wins)
    applies."""
    from nanoforge.post.tasks import get_task

    problems = get_task(task, **options).problems(seed, n)
    atomic_write_text(out, "".join(json.dumps({"prompt": p.prompt, "reference": p.answer}) + "\n" for p in problems))
    return Path(out)
