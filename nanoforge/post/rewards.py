"""Rule-based rewards for GRPO: the R1 answer template, safe answer parsing and weighted reward sums.

A completion in the R1 template looks like `<think>7+5=12 …</think><answer>132</answer>`. The rules here
never raise on what a model writes (no tags, garbage, a 10 000-digit number): a malformed answer simply
earns nothing. Tasks (`nanoforge/post/tasks.py`) score a completion into named components such as
`{"correct": 1.0, "format": 1.0}`; `RewardWeights` turns the components into one scalar reward:

    nanoforge grpo --model sft/ --task arithmetic --reward-weights correct=1,format=0.2 --out grpo/
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from nanoforge.errors import NanoforgeError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# The whole completion must be exactly one think block then one answer block (whitespace around allowed).
_R1_TEMPLATE = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# digits, or digits grouped in threes by commas (`1,024`); longer numbers are refused, never parsed
_INTEGER = re.compile(r"[+-]?(\d{1,100}|\d{1,3}(,\d{3}){1,33})")
MAX_ANSWER_CHARS = 200


def format_reward(completion: str) -> float:
    """1.0 when the completion is exactly `<think>…</think><answer>…</answer>` with no stray tags, else 0.0."""
    m = _R1_TEMPLATE.fullmatch(completion)
    if m is None:
        return 0.0
    inner = m.group("think") + m.group("answer")
    return 0.0 if any(tag in inner for tag in ("<think>", "</think>", "<answer>", "</answer>")) else 1.0


def extract_answer(completion: str) -> str | None:
    """The text inside the last `<answer>…</answer>` (stripped), or None when there is none or it is too long."""
    found = _ANSWER.findall(completion)
    if not found:
        return None
    answer = found[-1].strip()
    return answer if len(answer) <= MAX_ANSWER_CHARS else None


def parse_integer(text: str | None) -> int | None:
    """An integer written plainly (`-132`, `1,024`), or None for anything else: commas that do not group
thousands (`3,4` is two answers, not 34), huge numbers."""
    if text is None:
        return None
    text = text.strip()
    return int(text.replace(",", "")) if _INTEGER.fullmatch(text) else None


@dataclass
class RewardWeights:
    """Weight of each scored component in the scalar reward; components not named weigh 0."""

    weights: dict[str, float] = field(default_factory=lambda: {"correct": 1.0, "format": 0.2})

    @classmethod
    def parse(cls, spec: str) -> RewardWeights:
        """`"correct=1,format=0.2"` → RewardWeights; a clear error for anything else."""
        weights: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not sep or not name or not math.isfinite(number):
                raise NanoforgeError(f"bad reward weight {part!r}: expected NAME=NUMBER, e.g. correct=1,format=0.2")
            if name in weights:
                raise NanoforgeError(f"reward weight {name!r} given twice in {spec!r}")
            weights[name] = number
        if not weights:
            raise NanoforgeError("no reward weights given: expected e.g. correct=1,format=0.2")
        return cls(weights)

    def total(self, components: dict[str, float]) -> float:
        """Weighted sum of the components."""
        return sum(w * components.get(name, 0.0) for name, w in self.weights.items())
