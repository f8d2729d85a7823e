"""Verifiable tasks and rule-based rewards (nanoforge/post/tasks.py, rewards.py): problem streams, the held-out
split, demonstrations the checkers accept, and checkers that survive whatever a model writes."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from nanoforge.errors import NanoforgeError
from nanoforge.post.rewards import RewardWeights, extract_answer, format_reward, parse_integer
from nanoforge.post.tasks import TASKS, Problem, Task, get_task, register_task

TASK_SETTINGS = [("arithmetic", {}), ("arithmetic", {"digits": 3, "mul_digits": 2, "negative": True}),
                 ("countdown", {}), ("countdown", {"count": 4, "max_number": 50})]


@pytest.mark.parametrize(("name", "options"), TASK_SETTINGS)
def test_streams_are_seeded_and_heldout_is_fixed_and_disjoint(name, options):
    task = get_task(name, **options)
    train = task.problems(seed=1, n=3000)
    assert train == task.problems(seed=1, n=3000)
    assert train[:50] != task.problems(seed=2, n=50)
    heldout = task.heldout(200)
    assert heldout == get_task(name, **options).heldout(200)  # the same set on every call
    assert len({p.prompt for p in heldout}) == 200
    assert all(task.is_heldout(p) for p in heldout)
    assert not {p.prompt for p in heldout} & {p.prompt for p in train}
    assert not any(task.is_heldout(task.sample(random.Random(s))) for s in range(200))


@pytest.mark.parametrize(("name", "options"), TASK_SETTINGS)
def test_demonstrations_are_in_the_r1_template_and_correct(name, options):
    task = get_task(name, **options)
    for p in task.problems(seed=0, n=300) + task.heldout(50):
        demo = task.demonstration(p)
        assert demo.startswith("<think>") and demo.endswith(f"<answer>{p.answer}</answer>")
        assert task.score(demo, p) == {"correct": 1.0, "format": 1.0}


def test_arithmetic_answers_and_worked_steps():
    task = get_task("arithmetic", digits=3, mul_digits=2, negative=True)
    for p in task.problems(seed=3, n=500):
        a, op, b = p.data
        assert p.prompt == f"What is {a} {chr(op)} {b}?"
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[chr(op)]
        assert a < 1000 and b < (100 if chr(op) == "*" else 1000)
    add, sub, mul = (get_task("arithmetic", ops=op) for op in "+-*")
    assert add.demonstration(Problem("What is 47 + 85?", "132", (47, ord("+"), 85))) == \
        "<think>7+5=12, 4+8+1=13</think><answer>132</answer>"
    assert sub.demonstration(Problem("What is 93 - 28?", "65", (93, ord("-"), 28))) == \
        "<think>13-8=5, 8-2=6</think><answer>65</answer>"
    assert mul.demonstration(Problem("What is 57 * 6?", "342", (57, ord("*"), 6))) == \
        "<think>7*6=42, 5*6+4=34</think><answer>342</answer>"
    assert all(int(p.answer) >= 0 for p in sub.problems(0, 300))  # larger number first by default


def test_countdown_checker_accepts_any_valid_expression_and_nothing_else():
    task = get_task("countdown")
    p = Problem("Using the numbers 2, 3, 5, make 16.", "(3+5)*2", (16, 2, 3, 5))
    ok = ["(3+5)*2", "2*(5+3)", " 2 * ( 3 + 5 ) ", "(3+5)×2"]
    assert [task.check(a, p) for a in ok] == [1.0] * 4
    wrong = ["3+5*2", "(3+5)*2*1", "(3+3)*2+4", "16", "(3+5)*2+0", "2**4", "(3+5)/(2-2)", "8*2", "x", "",
             "(3+5)*2)", "__import__('os')", "(3+5).__class__", "3.0+5+8", "-(3+5)*-2"]
    assert [task.check(a, p) for a in wrong] == [0.0] * len(wrong)
    assert task.check(None, p) == 0.0
    # each number at most once, not necessarily all of them
    assert task.check("16", Problem("Using the numbers 16, 3, 5, make 16.", "16", (16, 3, 5, 16))) == 1.0


MALFORMED = ["", "no tags at all: 132", "<answer>", "<answer></answer>", "</answer>132<answer>",
             "<think>" + "x" * 10_000, "<answer>" + "9" * 5000 + "</answer>", "<answer>1e999</answer>",
             "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
             "<answer>" + "(" * 45 + "1" + ")" * 45 + "</answer>", "<answer>" + "9" * 60 + "*" + "9" * 39 + "</answer>",
             "<answer>132 apples</answer>", "<answer>\x00\ufffd😀</answer>", "<answer>-0x84</answer>",
             "<think><answer>1</answer></think><answer>2</answer>", "<answer>1_000</answer>", "<answer>NaN</answer>",
             "<answer>" + "1" * 4301 + "</answer>", "<answer>" + "9" * 99 + "</answer>"]


@pytest.mark.parametrize(("name", "options"), TASK_SETTINGS)
def test_checkers_survive_malformed_completions(name, options):
    task = get_task(name, **options)
    for p in task.problems(seed=0, n=5):
        for completion in MALFORMED:
            scores = task.score(completion, p)
            assert set(scores) == {"correct", "format"}
            assert scores["correct"] == 0.0 and scores["format"] in (0.0, 1.0)


def test_format_reward_wants_exactly_one_think_then_one_answer():
    assert format_reward("<think>7+5=12</think><answer>12</answer>") == 1.0
    assert format_reward("  <think>\nsteps\n</think>\n<answer> 12 </answer>\n") == 1.0
    for bad in ["<answer>12</answer>", "<think>a</think>", "<think>a</think><answer>12</answer> trailing",
                "preamble <think>a</think><answer>12</answer>", "<answer>12</answer><think>a</think>",
                "<think>a<think>b</think><answer>12</answer>", "<think>a</think><answer>1</answer><answer>2</answer>",
                "<think>a</think><answer>12"]:
        assert format_reward(bad) == 0.0, bad


def test_answer_extraction_and_integer_parsing():
    assert extract_answer("<think>x</think><answer> 1,024 </answer>") == "1,024"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("no answer") is None and extract_answer("<answer>" + "1" * 201 + "</answer>") is None
    assert [parse_integer(t) for t in ("132", " -7 ", "+5", "1,024", "007")] == [132, -7, 5, 1024, 7]
    assert [parse_integer(t) for t in ("7.0", "1e3", "", "0x10", "12 3", None, "9" * 101)] == [None] * 7
    # commas group thousands and nothing else: "3,4" is a list of two answers, not 34
    assert [parse_integer(t) for t in ("-1,234,567", "12,345", "999,999")] == [-1234567, 12345, 999999]
    assert [parse_integer(t) for t in ("3,4", "12,3456", "1,,000", ",5", "5,", "1234,567")] == [None] * 6


def test_reward_weights():
    w = RewardWeights.parse("correct=1, format=0.5")
    assert w.weights == {"correct": 1.0, "format": 0.5}
    assert w.total({"correct": 1.0, "format": 1.0, "other": 9.0}) == 1.5
    assert RewardWeights().total({"correct": 0.0, "format": 1.0}) == pytest.approx(0.2)
    for bad in ["correct", "correct=x", "=1", "", "correct=nan", "format=inf", "correct=1,correct=2"]:
        with pytest.raises(NanoforgeError):
            RewardWeights.parse(bad)


def test_a_user_task_is_one_class():
    @register_task("parity-test")
    @dataclass(frozen=True)
    class Parity(Task):
        limit: int = 1000

        def draw(self, rng):
            n = rng.randrange(self.limit)
            return Problem(f"Is {n} even?", "yes" if n % 2 == 0 else "no", (n,))

        def demonstration(self, p):
            return f"<think>last digit {p.data[0] % 10}</think><answer>{p.answer}</answer>"

        def check(self, answer, p):
            return float(answer == p.answer)

    try:
        task = get_task("parity-test", limit="500")  # string options (from the CLI) take the field's type
        assert task.limit == 500
        p = task.problems(0, 1)[0]
        assert task.score(task.demonstration(p), p) == {"correct": 1.0, "format": 1.0}
        assert task.score("<answer>maybe</answer>", p) == {"correct": 0.0, "format": 0.0}
        assert len(task.heldout(20)) == 20
    finally:
        del TASKS["parity-test"]


def test_bad_task_requests_are_one_line_errors():
    with pytest.raises(NanoforgeError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(NanoforgeError, match="digit"):
        get_task("arithmetic", digit=3)
    with pytest.raises(NanoforgeError, match="ops"):
        get_task("arithmetic", ops="/")
    with pytest.raises(NanoforgeError, match="heldout_fraction"):
        get_task("countdown", heldout_fraction=1.5)
    with pytest.raises(NanoforgeError, match="distinct held-out problems"):
        get_task("arithmetic", digits=1, ops="+").heldout(50)  # only 100 problems exist, ~10 held out
