"""The simulated annotator's rule: a deterministic judge of two responses, with an optional reference answer.

    judge = RuleJudge()
    judge.compare("<answer>12</answer>", "<answer>13</answer>", reference="12")   # ("A", "A is correct …")

The rule, in order; the first step that separates the two responses decides:

0. An empty (whitespace-only) response loses to a non-empty one.
1. With a reference: a response is *correct* when its answer matches the reference's. An answer is the
   text inside the last `<answer>…</answer>` (`nanoforge.post.rewards.extract_answer`) or, without tags, the
   whole text — for the reference too, so a full demonstration (`<think>…</think><answer>93</answer>`, as
   in SFT data) is a reference of "93"; when the reference's answer is an integer, a response's answer is
   the last integer in it. Numbers compare as integers (`parse_integer`), text as lowercase words
   (punctuation and spacing ignored). Exactly one correct → it wins.
2. With a reference: the higher token F1 with the reference (lowercase words, as in SQuAD) wins when the
   two differ by at least `f1_gap`.
3. The less repetitive wins when the two differ by at least `repetition_gap` (repetition: the share of
   word bigrams that repeat an earlier one).
4. The shorter wins when it has at most `length_ratio` × the other's words.
5. Otherwise: a tie.

`noise` makes the judge human-like: with that probability it prefers a response picked at random instead,
so two simulated annotators disagree now and then and agreement statistics mean something. The draw is a
hash of the judge's seed and the two texts, so a judge gives the same verdict on the same pair whichever
side each response is on and whatever order the pairs come in: a simulated labelling run is reproducible.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from nanoforge.post.rewards import extract_answer, parse_integer

_WORDS = re.compile(r"\w+")
_INTEGERS = re.compile(r"[+-]?\d[\d,]*")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def answer_of(response: str, numeric: bool) -> str | None:
    """The answer a response gives (see rule 1); None when it gives none."""
    tagged = extract_answer(response)
    text = tagged if tagged is not None else response
    if numeric:
        found = _INTEGERS.findall(text)
        return found[-1] if found else None
    return text


def is_correct(response: str, reference: str) -> bool:
    expected = extract_answer(reference)
    expected = reference if expected is None else expected
    ref_number = parse_integer(expected)
    answer = answer_of(response, ref_number is not None)
    if answer is None:
        return False
    if ref_number is not None:
        return parse_integer(answer) == ref_number
    return words(answer) == words(expected) and bool(words(expected))


def token_f1(response: str, reference: str) -> float:
    """SQuAD's token F1 between the words of a response and of the reference."""
    got, want = Counter(words(response)), Counter(words(reference))
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def repetition(text: str) -> float:
    """The share of word bigrams that repeat an earlier bigram of the same text (0 for fewer than 2 bigrams)."""
    w = words(text)
    bigrams = list(zip(w, w[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if len(bigrams) >= 2 else 0.0


@dataclass
class RuleJudge:
    """The documented rule (module docstring); `compare` returns ("A" | "B" | "tie", the reason)."""

    f1_gap: float = 0.05
    repetition_gap: float = 0.1
    length_ratio: float = 0.8
    noise: float = 0.0
    seed: int = 0

    def compare(self, a: str, b: str, reference: str | None = None) -> tuple[str, str]:
        if self.noise:
            first, second = sorted((a, b))
            draw = hashlib.blake2b(f"{self.seed}\0{first}\0{second}".encode(), digest_size=9).digest()
            if int.from_bytes(draw[:8], "little") / 2**64 < self.noise:
                pick = first if draw[8] % 2 else second
                return ("A" if pick == a else "B"), "noise: a random pick"
        return self.rule(a, b, reference)

    def rule(self, a: str, b: str, reference: str | None = None) -> tuple[str, str]:
        empty_a, empty_b = not a.strip(), not b.strip()
        if empty_a != empty_b:
            return ("B", "A is empty") if empty_a else ("A", "B is empty")
        if reference is not None:
            ok_a, ok_b = is_correct(a, reference), is_correct(b, reference)
            if ok_a != ok_b:
                return ("A", "only A matches the reference") if ok_a else ("B", "only B matches the reference")
            f1_a, f1_b = token_f1(a, reference), token_f1(b, reference)
            if abs(f1_a - f1_b) >= self.f1_gap:
                return ("A" if f1_a > f1_b else "B"), f"token F1 with the reference {f1_a:.2f} vs {f1_b:.2f}"
        rep_a, rep_b = repetition(a), repetition(b)
        if abs(rep_a - rep_b) >= self.repetition_gap:
            return ("A" if rep_a < rep_b else "B"), f"repetition {rep_a:.2f} vs {rep_b:.2f}"
        len_a, len_b = len(words(a)), len(words(b))
        if len_a != len_b and min(len_a, len_b) <= self.length_ratio * max(len_a, len_b):
            return ("A" if len_a < len_b else "B"), f"length {len_a} vs {len_b} words"
        return "tie", "no rule separates them"
