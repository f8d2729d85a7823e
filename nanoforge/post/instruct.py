"""The demo's instruction data, made from its own corpus (no download), and how chat answers are scored.

    nanoforge instruct --docs runs/demo/04-clean --out runs/demo/09-instruct
    nanoforge sft --model runs/demo/08-pretrain --data runs/demo/09-instruct/train.jsonl \\
        --val runs/demo/09-instruct/val.jsonl --out runs/demo/10-sft

`train.jsonl` and `val.jsonl` are chat JSONL (`{"messages": [{"role", "content"}…], "subset": …}`, the
format TRL and OpenAI read; `subset` names the kind of example). The subsets:

- `doc_summary`: the documentation of a function or class is in the question; the answer is its first
  sentence (reading: it can be learnt for functions never seen).
- `doc_what` ("What does `textwrap.dedent` do?" → the first sentence of its docstring), `doc_args`
  ("What arguments does `json.dumps` take?" → its signature), `doc_module` ("Which module provides
  `heappush`?"): closed-book questions, answerable only from what the model remembers.
- `identity`: a few dozen paraphrases of "who are you / who made you / what can you do".
- `arithmetic`: `get_task("arithmetic")` problems (post/tasks.py) answered by its R1-format
  demonstration `<think>…</think><answer>…</answer>`, the warm start of the GRPO stage.

Held out (val.jsonl): documentation questions about *functions* the training set never mentions (split by
a hash of `module.name`, so held-out questions are about unseen functions), identity *paraphrases* never
seen in training, and the arithmetic task's own held-out problems. The documents are pydoc pages, either
as pydoc's plain text (`nanoforge corpus`) or as the main text extracted from its HTML pages (the demo's
crawl); an entry that cannot be parsed (no signature, no sentence in its docstring) is skipped and counted.

Scoring (`answer_f1`, `exact_match`, `evaluate_chat`): SQuAD's token F1 and exact match after its
normalisation (lower case, punctuation and articles dropped); for R1-format references exact match
compares the `<answer>` contents. `nanoforge sft` reports them for the base and the fine-tuned model.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoforge.artifacts import atomic_dir, write_manifest
from nanoforge.data.documents import iter_documents
from nanoforge.errors import NanoforgeError
from nanoforge.infer.engine import Decoder, generate
from nanoforge.model import GPT
from nanoforge.post.rewards import extract_answer, parse_integer
from nanoforge.post.tasks import get_task
from nanoforge.tokenizer import Tokenizer, doc_fraction
from nanoforge.train.checkpoint import load_model_artifact

Chat = dict[str, Any]  # {"messages": [...], "subset": ...}


@dataclass
class InstructConfig:
    """How much of each subset `nanoforge instruct` writes (a few thousand examples for the demo)."""

    max_entries: int = 600  # documented functions/classes used, at most (each gives up to 4 questions)
    val_fraction: float = 0.1  # share of functions and of identity paraphrases held out
    identity_repeats: int = 3  # each training identity example appears this often
    arithmetic: int = 1200  # arithmetic training dialogs
    arithmetic_val: int = 100  # held-out arithmetic problems
    arithmetic_options: dict[str, Any] = field(default_factory=dict)  # a TOML table, e.g. {digits = 3}
    max_answer_chars: int = 200  # longer first sentences / signatures are skipped
    max_context_chars: int = 400  # documentation quoted in a doc_summary question, at most
    name: str = "nanoforge"  # what the model calls itself
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# parsing pydoc pages (plain text or text extracted from pydoc's HTML)


@dataclass(frozen=True)
class DocEntry:
    """A documented function or class of a module: `textwrap.fill(text, width=70, **kwargs)` + docstring."""

    module: str
    name: str
    kind: str  # function | class
    signature: str  # "(text, width=70, **kwargs)"; "" when the page shows none
    doc: str  # the docstring, paragraphs separated by blank lines

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


_HEADERS = {"NAME", "DESCRIPTION", "MODULE REFERENCE", "MODULE DOCS", "PACKAGE CONTENTS", "SUBMODULES", "CLASSES",
            "FUNCTIONS", "DATA", "VERSION", "AUTHOR", "CREDITS", "FILE", "MODULES"}
# a signature line: `name(params)` whose first parameter looks like one (not `f([1, 2])` from an example)
_SIGNATURE = re.compile(r"(?:async )?([A-Za-z_]\w*)(\((?=\)|\.\.\.\)|/|\*\s*,|\*{0,2}[A-Za-z_]\w*\s*[,:=)\[]).*\))")
_ALIAS = re.compile(r"[A-Za-z_]\w* = .*")
_CLASS = re.compile(r"class ([A-Za-z_]\w*)(?:\(.*\))?")
# where a class's own docstring ends: pydoc's member listings
_CLASS_PARTS = re.compile(r".*(defined here|inherited from .*|resolution order):")
_MODULE_LINE = re.compile(r"Python Library Documentation: (?:built-in )?(?:module|package) ([\w.]+)")
_URL_MODULE = re.compile(r"(?:^pydoc:|/)([A-Za-z_][\w.]*?)(?:\.html)?$")


def module_name(text: str, url: str = "") -> str | None:
    """The module a pydoc page documents: from its title line or its URL (`pydoc:json`, `…/json.html`)."""
    m = _MODULE_LINE.match(text)
    if m:
        return m.group(1)
    m = _URL_MODULE.search(url)
    return m.group(1) if m and m.group(1) != "index" else None


def parse_pydoc(text: str, module: str) -> list[DocEntry]:
    """The documented public functions and classes of one pydoc page (plain text or extracted HTML)."""
    plain = text.startswith("Python Library Documentation:")
    entries: list[DocEntry] = []
    section = ""
    current: dict[str, Any] | None = None  # the entry being read: name, kind, signature, lines, open
    for raw in text.splitlines():
        line = raw.strip()
        if plain and raw[:1] not in ("", " ") or not plain and line.upper() in _HEADERS and line[:1].isupper():
            section = line.upper()
            _close(current, module, entries)
            current = None
            continue
        at_entry = True
        if plain:  # entries sit at 4 spaces; docstrings deeper, class bodies behind " |  "
            at_entry = re.match(r"    \S", raw) is not None
            line = re.sub(r"^\s+\|", "", raw).strip()
        if section == "FUNCTIONS" and at_entry and (_SIGNATURE.fullmatch(line) or _ALIAS.fullmatch(line)):
            _close(current, module, entries)
            current = None
            m = _SIGNATURE.fullmatch(line)
            if m and not _ALIAS.fullmatch(line):
                current = {"name": m.group(1), "kind": "function", "signature": m.group(2), "lines": [], "open": True}
            continue
        if section == "CLASSES" and at_entry and _CLASS.fullmatch(line):
            _close(current, module, entries)
            current = {"name": _CLASS.fullmatch(line).group(1), "kind": "class", "signature": "", "lines": [],
                       "open": True}
            continue
        if current is None or not current["open"]:
            continue
        if current["kind"] == "class":
            if _CLASS_PARTS.fullmatch(line):
                current["open"] = False
                continue
            m = _SIGNATURE.fullmatch(line)
            if m and m.group(1) == current["name"] and not current["signature"] and not current["lines"]:
                current["signature"] = m.group(2)
                continue
        current["lines"].append(line)
    _close(current, module, entries)
    seen: set[str] = set()
    unique = []
    for e in entries:  # a name documented twice on a page (aliases, re-exports): the first one
        if e.name not in seen:
            seen.add(e.name)
            unique.append(e)
    return unique


def _close(current: dict[str, Any] | None, module: str, entries: list[DocEntry]) -> None:
    """Finish the entry being read (public names only) into `entries`; returns None: no entry is open."""
    if current is not None and not current["name"].startswith("_"):
        doc = re.sub(r"\n{3,}", "\n\n", "\n".join(current["lines"])).strip()
        entries.append(DocEntry(module, current["name"], current["kind"], current["signature"], doc))


_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.")


def first_sentence(entry: DocEntry, max_chars: int) -> str | None:
    """The first sentence of an entry's docstring, on one line; None when there is no usable one.

    Leading lines that only repeat the signature (`fill(text : string) -> string`, common in C modules)
    are skipped."""
    paragraphs = [" ".join(p.split()) for p in entry.doc.split("\n\n")]
    for para in paragraphs:
        if re.match(rf"{re.escape(entry.name)}\(.*\)(\s*->\s*\S+)?$", para) or not para:
            continue
        para = re.sub(rf"^{re.escape(entry.name)}\([^)]*\)(\s*->\s*[\w\[\], ]+)?\s+(?=[A-Z])", "", para)
        para = para.replace("``", "`")
        end = 0
        for m in re.finditer(r"[.!?](?=\s|$)", para):
            if not para[: m.end()].endswith(_ABBREVIATIONS):
                end = m.end()
                break
        sentence = para[:end] if end else para
        if (len(sentence.split()) < 3 or len(sentence) > max_chars or not (sentence[0].isupper() or sentence[0] == "`")
                or sentence.endswith(":") or sentence.startswith(f"{entry.name}(")):
            return None
        return sentence
    return None


def doc_questions(entry: DocEntry, cfg: InstructConfig, ambiguous: frozenset[str] = frozenset()) -> list[Chat]:
    """The documentation questions one entry answers (fewer when its page lacks a signature or sentence;
    no module question for a name in `ambiguous`, documented by several modules)."""
    q, out = entry.qualname, []
    sentence = first_sentence(entry, cfg.max_answer_chars)
    what = "class" if entry.kind == "class" else "function"
    if sentence is not None:
        context = _clip(entry.doc, cfg.max_context_chars)
        out.append(_chat(f"Here is the documentation of the {what} `{q}`:\n\n{context}\n\nWhat does it do, in one "
                         f"sentence?", sentence, "doc_summary"))
        ask = f"What is the `{q}` class for?" if entry.kind == "class" else f"What does `{q}` do?"
        out.append(_chat(ask, sentence, "doc_what"))
    signature = f"{q}{entry.signature}"
    if entry.signature and len(signature) <= cfg.max_answer_chars and entry.signature != "(...)":
        ask = f"How do I create a `{q}`?" if entry.kind == "class" else f"What arguments does `{q}` take?"
        out.append(_chat(ask, f"`{signature}`", "doc_args"))
    if out and entry.name not in ambiguous:
        out.append(_chat(f"Which module provides the {what} `{entry.name}`?", f"The `{entry.module}` module.",
                         "doc_module"))
    return out


def _clip(text: str, max_chars: int) -> str:
    """The text cut at a word boundary to about `max_chars` characters."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " …"


def _chat(question: str, answer: str, subset: str) -> Chat:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "subset": subset}


# ---------------------------------------------------------------------------------------------------
# identity and arithmetic

_IDENTITY_QUESTIONS = {
    "who": ["Who are you?", "What are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
            "What should I call you?", "Are you a person?", "Are you human?", "What kind of AI are you?",
            "Which model are you?", "Who am I talking to?", "Are you ChatGPT?", "What's your name?",
            "Describe yourself in one sentence.", "Are you a chatbot?", "What exactly are you?"],
    "maker": ["Who made you?", "Who created you?", "Who trained you?", "Who built you?", "Where do you come from?",
              "How were you made?", "Who developed you?", "Which company made you?", "How were you trained?",
              "Who is your creator?", "Who wrote you?", "What trained you?"],
    "skills": ["What can you do?", "What are you good at?", "How can you help me?", "What do you know about?",
               "What are your skills?", "What topics do you know?", "What can I ask you?",
               "What are you able to help with?", "What questions can you answer?", "What do you know?"],
}
_GREETINGS = ("", "Hi! ", "Hello, ", "Hey. ")


def identity_answers(name: str) -> dict[str, str]:
    return {
        "who": f"I am {name}, a small language model trained from scratch on the Python standard library "
               f"documentation.",
        "maker": f"I was trained with {name}, an open-source pipeline that crawls, cleans and tokenizes text, "
                 f"then pretrains and fine-tunes a GPT.",
        "skills": "I answer short questions about the Python standard library and do simple arithmetic.",
    }


def identity_chats(cfg: InstructConfig) -> tuple[list[Chat], list[Chat]]:
    """(train, val): every paraphrase with a few greetings; held-out paraphrases go to val only."""
    answers = identity_answers(cfg.name)
    train, val = [], []
    for kind, questions in _IDENTITY_QUESTIONS.items():
        for question in questions:
            held = doc_fraction(question, cfg.seed) < cfg.val_fraction
            for greeting in _GREETINGS:
                chat = _chat(greeting + question, answers[kind], "identity")
                if held:
                    val.append(chat)
                else:
                    train += [chat] * cfg.identity_repeats
    return train, val


def arithmetic_chats(cfg: InstructConfig) -> tuple[list[Chat], list[Chat]]:
    """(train, val) dialogs of the arithmetic task, answered by its demonstrations; val = its held-out split."""
    if cfg.arithmetic <= 0 and cfg.arithmetic_val <= 0:
        return [], []
    task = get_task("arithmetic", **cfg.arithmetic_options)

    def chat(p: Any) -> Chat:
        return _chat(p.prompt, task.demonstration(p), "arithmetic")

    seen: set[str] = set()
    train = []
    for p in task.problems(cfg.seed, cfg.arithmetic) if cfg.arithmetic > 0 else []:
        if p.prompt not in seen:
            seen.add(p.prompt)
            train.append(chat(p))
    return train, [chat(p) for p in task.heldout(cfg.arithmetic_val)] if cfg.arithmetic_val > 0 else []


# ---------------------------------------------------------------------------------------------------
# the stage


def read_entries(docs: Path) -> tuple[list[DocEntry], dict[str, int]]:
    """Every documented function/class in the documents of `docs`, and counts of what was skipped."""
    entries: list[DocEntry] = []
    counts: Counter[str] = Counter()
    for doc in iter_documents(docs):
        module = module_name(doc.text, doc.url or "")
        if module is None:
            counts["pages_without_module_name"] += 1
            continue
        found = parse_pydoc(doc.text, module)
        counts["pages"] += 1
        counts["pages_without_entries"] += not found
        entries += found
    return entries, dict(counts)


def make_instruct(cfg: InstructConfig, docs: Path, out: Path) -> dict[str, Any]:
    """The `instruct` stage: write `train.jsonl`, `val.jsonl` and the manifest into `out`."""
    if not 0 <= cfg.val_fraction < 1:
        raise NanoforgeError(f"instruct: val_fraction must be in [0, 1), got {cfg.val_fraction}")
    t0 = time.time()
    docs, out = Path(docs), Path(out)
    entries, counts = read_entries(docs)
    by_name = {e.qualname: e for e in entries}  # a module crawled twice (two URLs) counts once
    names = sorted(by_name, key=lambda n: doc_fraction(n, cfg.seed))[: cfg.max_entries]
    modules_of = Counter(e.name for e in by_name.values())
    ambiguous = frozenset(n for n, k in modules_of.items() if k > 1)
    train: list[Chat] = []
    val: list[Chat] = []
    unanswerable = 0
    for name in sorted(names):
        chats = doc_questions(by_name[name], cfg, ambiguous)
        unanswerable += not chats
        (val if doc_fraction("split:" + name, cfg.seed) < cfg.val_fraction else train).extend(chats)
    for part in (identity_chats(cfg), arithmetic_chats(cfg)):
        train += part[0]
        val += part[1]
    if not train:
        raise NanoforgeError(f"{docs}: no instruction data could be made (no parsable pydoc entries and no "
                             f"identity/arithmetic examples)")
    random.Random(cfg.seed).shuffle(train)
    random.Random(cfg.seed + 1).shuffle(val)  # so that the first n held-out examples mix the subsets
    figures = {"train": len(train), "val": len(val), "entries_found": len(by_name), "entries_used": len(names),
               "entries_without_questions": unanswerable, **counts,
               "train_by_subset": dict(Counter(c["subset"] for c in train)),
               "val_by_subset": dict(Counter(c["subset"] for c in val)), "seconds": round(time.time() - t0, 2)}
    with atomic_dir(out) as tmp:
        for split, chats in (("train", train), ("val", val)):
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats),
                                                encoding="utf-8")
        manifest = write_manifest(tmp, stage="instruct", config=cfg, inputs={"docs": docs}, figures=figures)
    return manifest


# ---------------------------------------------------------------------------------------------------
# scoring answers


def normalize_answer(text: str) -> list[str]:
    """SQuAD's normalisation, as words: lower case, punctuation (and markup) as spaces, articles dropped."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return [w for w in text.split() if w not in ("a", "an", "the")]


def answer_f1(prediction: str, reference: str) -> float:
    """Token F1 between the normalised words of a prediction and a reference (SQuAD's definition)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal; for an R1-format reference, when the `<answer>`s are: as
    integers when the reference's is one (SQuAD's normalisation would drop a minus sign), else normalised."""
    ref_answer = extract_answer(reference)
    if ref_answer is not None:
        pred_answer = extract_answer(prediction)
        if pred_answer is None:
            return 0.0
        ref_number = parse_integer(ref_answer)
        if ref_number is not None:
            return float(parse_integer(pred_answer) == ref_number)
        return float(normalize_answer(pred_answer) == normalize_answer(ref_answer))
    return float(normalize_answer(prediction) == normalize_answer(reference))


def read_chat_jsonl(path: Path) -> list[Chat]:
    """The conversations of a chat JSONL file (malformed lines are an error naming the line)."""
    return [chat for _, chat in iter_chat_jsonl(path)]


def iter_chat_jsonl(path: Path) -> Iterator[tuple[int, Chat]]:
    """(line number, conversation) of each non-blank line of a chat JSONL file; a malformed line is an
    error naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NanoforgeError(f"{path}: cannot read chat data ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            chat = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoforgeError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
            raise NanoforgeError(f"{path}:{i}: expected an object with a \"messages\" list")
        yield i, chat


@torch.no_grad()
def evaluate_answers(model: GPT, tok: Tokenizer, chats: Sequence[Chat], *, max_new_tokens: int = 96,
                     batch_size: int = 32, samples: int = 3) -> dict[str, Any]:
    """Greedy replies to each conversation's last user turn, scored against its last assistant message:
    mean exact match and token F1, overall and per subset, plus a few (question, reply, reference)."""
    items = []
    for chat in chats:
        messages = chat["messages"]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            continue
        prompt = tok.render_prompt(messages[:-1])
        if len(prompt) < model.cfg.seq_len:
            items.append((prompt, messages[-1]["content"], chat.get("subset", "all"), messages[-2]["content"]))
    stop = (tok.special_id("assistant_end"), tok.bos_id)
    replies: list[str] = []
    decoder = Decoder(model)  # the weights are fixed over the batches: the decode step is prepared once
    for i in range(0, len(items), batch_size):
        batch = [p for p, *_ in items[i : i + batch_size]]
        outs = generate(model, batch, max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop,
                        decoder=decoder)
        replies += [tok.decode(o) for o in outs]
    rows = [(subset, exact_match(r, ref), answer_f1(r, ref)) for r, (_, ref, subset, _) in zip(replies, items,
                                                                                                 strict=True)]
    result = _means(rows)
    result["by_subset"] = {s: _means([r for r in rows if r[0] == s]) for s in sorted({r[0] for r in rows})}
    result["samples"] = [{"question": q, "reply": r, "reference": ref}
                         for r, (_, ref, _, q) in list(zip(replies, items, strict=True))[:samples]]
    return result


def _means(rows: Iterable[tuple[str, float, float]]) -> dict[str, Any]:
    rows = list(rows)
    n = len(rows)
    return {"n": n, "exact_match": sum(r[1] for r in rows) / max(1, n), "f1": sum(r[2] for r in rows) / max(1, n)}


def evaluate_chat(model_dir: Path | str, jsonl: Path | str, *, max_examples: int | None = None,
                  max_new_tokens: int = 96, device: str = "cpu") -> dict[str, Any]:
    """Answer quality of the model artifact in `model_dir` on a chat JSONL file (see `evaluate_answers`)."""
    model = load_model_artifact(model_dir, device)
    chats = read_chat_jsonl(Path(jsonl))[:max_examples]
    return evaluate_answers(model, Tokenizer.load(model_dir), chats, max_new_tokens=max_new_tokens)
